#!/usr/bin/env bash
# The README's first hour, run as the README writes it, from the repository root:
#   1. `make demo` (creates .venv when missing, then runs the demo),
#   2. the command the demo's last lines print, exactly as printed,
#   3. `make demo` again: it must find everything done and change no file under .demo/ (but the lease record).
# Exits non-zero on the first step that fails. tests/test_demo.py checks steps 2 and 3 on every `make test` (on a
# demo run into a temporary folder); this script checks the path through `make` itself.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

make demo 2>&1 | tee "$log"
mapfile -t commands < <(sed -n 's/^  look at it: //p; s/^              \(.*modalmill .*\)$/\1/p' "$log")
if [ "${#commands[@]}" -eq 0 ]; then
  echo "first_hour: the demo printed no command to run" >&2
  exit 1
fi
for cmd in "${commands[@]}"; do
  echo "+ $cmd"
  bash -c "$cmd"
done

# every file but the records of the writer's lease (a writer takes the lease before it knows there is nothing to do)
snapshot() { find .demo -type f -not -path '*/_modalmill/lease/*' -printf '%P %s %T@\n' | LC_ALL=C sort; }
before=$(snapshot)
start=$(date +%s)
make demo > "$log" 2>&1 || { cat "$log"; exit 1; }
took=$(( $(date +%s) - start ))
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "first_hour: a second make demo changed files under .demo/:" >&2
  diff <(echo "$before") <(echo "$after") | head -20 >&2
  exit 1
fi
echo "first_hour: OK (a second make demo took ${took} s and changed no file)"

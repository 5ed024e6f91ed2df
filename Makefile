# modalmill: every target creates the virtual environment when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: venv demo test test-fast bench bench-scale lint clean

venv: $(STAMP)

# torch/torchvision are pinned (2.14.1/0.29.1: the pair whose torchvision works on these machines) in pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "modalmill: installing modalmill and its dependencies into $(VENV) (torch, Ray, the models' packages:"
	@echo "modalmill: about 5 minutes and 6.5 GB on a fresh machine; pip shows each package as it goes)"
	$(BIN)/python -m pip install --progress-bar on -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/modalmill demo --workdir .demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=40

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not cluster"

# the full suite writes benchmarks/RESULTS.md (budget 15 min on 2 cores; the last full run took 40: over); `make bench BENCH_ARGS=--quick` for development
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# corpus-scale bookkeeping at 1k and 10k output shards, local and on loopback S3 with 20 ms per request (about
# 12-25 min on 2 cores; its own section of benchmarks/RESULTS.md; docs/scaling.md). SCALE_ARGS="--sizes 1000": shorter
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py $(SCALE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check modalmill tests benchmarks

clean:
	rm -rf .demo benchmarks/_work .pytest_cache

"""The ``modalmill`` command.

Exit codes: 0 everything written; 1 a usage, config or I/O error (one line on stderr, no traceback);
3 the job finished but some samples failed (see the manifest); 4 some shards failed (see ``modalmill status``).
Set ``MODALMILL_DEBUG=1`` to get tracebacks.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI turns errors into one line
            if os.environ.get("MODALMILL_DEBUG"):
                raise
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _report(summary: dict) -> None:
    click.echo(
        f"{summary['output']}: {summary['shards_processed']} shard(s) processed, {summary['shards_skipped']} already "
        f"done, {summary['shards_failed']} failed; {summary['samples_written']} sample(s) written, "
        f"{summary['samples_failed']} failed, {summary['samples_dropped']} dropped ({summary['seconds']:.1f} s)")
    for reason, n in sorted(summary["errors_by_reason"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed samples: {n:6d}  {reason}")
    for f in summary["failed_shards"]:
        click.echo(f"  failed shard {f['shard']} ({f['source']}): {f['error']}")


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="modalmill")
def main():
    """modalmill: raw image corpora in, aligned 4M-style multimodal (token) datasets out."""


_common = [
    click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray)."),
    click.option("--only", default=None, help="Add or recompute only these modalities on existing output."),
    click.option("--force", is_flag=True, help="Recompute even what is already done."),
    click.option("--shards", default=None, help="Only these output shards, e.g. '0-9,42'."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@main.command()
@click.argument("input_spec", metavar="INPUT")
@click.argument("output")
@click.option("--modalities", "-m", default="rgb,crop_settings,canny_edge,color_palette,metadata", show_default=True,
              help="Comma-separated modalities to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Images per shard for folder input.")
@click.option("--max-size", type=int, default=None, help="Cap the stored image's longer side (pixels).")
@click.option("--n-crops", type=int, default=1, show_default=True, help="Crops per sample in crop_settings.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all).")
@_with_common
def label(input_spec, output, modalities, seed, batch_size, shard_size, max_size, n_crops, num_cpus, address, only,
          force, shards, no_progress):
    """Label INPUT (tar shard pattern, s3:// pattern or image folder) into OUTPUT (local or s3:// root)."""
    from .jobs.runner import run_job
    from .jobs.spec import job_from_dict

    data = {"input": input_spec, "output": output, "modalities": _csv(modalities), "seed": seed,
            "batch_size": batch_size, "shard_size": shard_size, "shards": shards,
            "decode": {"max_size": max_size}, "crops": {"n_crops": n_crops}, "ray": {"num_cpus": num_cpus}}
    spec = job_from_dict(data, where="modalmill label")
    summary = run_job(spec, only=_csv(only), force=force, address=address, show_progress=not no_progress)
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("job_file", metavar="JOB.yaml")
@click.option("--output", default=None, help="Override the job's output root.")
@_with_common
def run(job_file, output, address, only, force, shards, no_progress):
    """Run a job spec (YAML) on the embedded Ray or on --address."""
    from .jobs.runner import run_job
    from .jobs.spec import load_job

    spec = load_job(job_file, output=output, shards=shards)
    summary = run_job(spec, only=_csv(only), force=force, address=address, show_progress=not no_progress)
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("job_file", metavar="JOB.yaml")
@click.option("--address", required=True, help="The Ray cluster's dashboard address, e.g. http://HEAD:8265.")
@click.option("--only", default=None)
@click.option("--force", is_flag=True)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the job and print its logs.")
@click.option("--pip", "pip_packages", default=None, help="Extra pip packages for the job's runtime env (comma-separated).")
def submit(job_file, address, only, force, wait, pip_packages):
    """Submit a job spec to a running Ray cluster through the Ray Jobs API."""
    from .jobs.submit import submit_job

    status, job_id, logs = submit_job(job_file, address, only=_csv(only), force=force, wait=wait,
                                      pip=_csv(pip_packages))
    if logs:
        click.echo(logs.rstrip())
    click.echo(f"ray job {job_id}: {status}")
    if wait and status != "SUCCEEDED":
        sys.exit(1)


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(output, as_json):
    """Shards done / failed, samples written / failed, and errors by reason of an OUTPUT root."""
    from .jobs.status import output_status

    st = output_status(output)
    if as_json:
        click.echo(json.dumps(st, indent=1, sort_keys=True))
        return
    click.echo(f"{output}")
    total = st["shards_total"]
    click.echo(f"  shards: {st['shards_done']} done, {st['shards_failed']} failed, "
               f"{st['shards_pending'] if total is not None else '?'} pending (of {total if total is not None else '?'})")
    click.echo(f"  samples: {st['samples_read']} read, {st['samples_ok']} written, {st['samples_failed']} failed")
    click.echo(f"  modalities: {', '.join(f'{m} ({n} shards)' for m, n in sorted(st['modalities'].items()))}")
    for reason, n in sorted(st["errors_by_reason"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed samples: {n:6d}  {reason}")
    for shard, err in sorted(st["failures"].items()):
        click.echo(f"  failed shard {shard}: {err}")


@main.command()
def modalities():
    """The modality registry as a table."""
    from .schemas.modalities import MODALITIES

    rows = [("name", "kind", "file", "dtype", "shape", "vocab", "tokens")]
    for s in MODALITIES.values():
        rows.append((s.name, s.kind, s.ext, s.dtype or "-", "[" + ", ".join(map(str, s.shape)) + "]",
                     str(s.vocab_size or "-"), str(s.n_tokens or "-")))
    _table(rows)


@main.command()
def labelers():
    """Every registered labeler with its modalities, default weights, licence and resources."""
    from .labelers import LABELERS, load_entry_points

    load_entry_points()
    rows = [("name", "outputs", "weights", "licence", "resources", "runs in")]
    for cls in LABELERS.values():
        r = cls.default_resources
        res = f"cpu={r.num_cpus:g} gpu={r.num_gpus:g}" + (f" mem={r.memory_mb}MiB" if r.memory_mb else "")
        rows.append((cls.name, ",".join(cls.outputs), cls.weights or "-", cls.license, res,
                     "actor pool" if cls.stateful else "shard task"))
    _table(rows)


@main.command()
@click.option("--workdir", default=".demo", show_default=True, help="Where the demo corpus and output go.")
@click.option("--force", is_flag=True, help="Rebuild the corpus and recompute the output.")
@click.option("--no-progress", is_flag=True)
def demo(workdir, force, no_progress):
    """Build a small corpus from real photos (scikit-image) and run the demo job end to end."""
    from .jobs.demo import run_demo

    summary, out = run_demo(workdir, force=force, show_progress=not no_progress)
    _report(summary)
    click.echo(f"demo output: {out}")
    click.echo(f"  look at it: modalmill status {out}")


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()

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
    from .labelers import load_entry_points

    load_entry_points()  # third-party labelers and their modalities, for every command (check, show, stats, ...)


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
@click.option("--pip", "pip_packages", default=None,
              help="Extra pip packages for the job's runtime env (comma-separated).")
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
               f"{st['shards_pending'] if total is not None else '?'} pending "
               f"(of {total if total is not None else '?'})")
    click.echo(f"  samples: {st['samples_read']} read, {st['samples_ok']} written, {st['samples_failed']} failed")
    click.echo(f"  modalities: {', '.join(f'{m} ({n} shards)' for m, n in sorted(st['modalities'].items()))}")
    for reason, n in sorted(st["errors_by_reason"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  failed samples: {n:6d}  {reason}")
    for shard, err in sorted(st["failures"].items()):
        click.echo(f"  failed shard {shard}: {err}")


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-parse", is_flag=True, help="Check layout, keys and markers only (do not decode members).")
@click.option("--workers", type=int, default=4, show_default=True, help="Shards checked in parallel.")
def check(output, as_json, no_parse, workers):
    """Verify the 4M contract on OUTPUT (any 4M-layout root): one line per violation; exit 1 if any."""
    from .jobs.check import check_output

    report = check_output(output, parse=not no_parse, workers=workers)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for v in report.violations:
            click.echo(v.line())
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        verdict = "clean" if report.ok else f"{len(report.violations)} violation(s)"
        click.echo(f"{output}: {report.shards} shard(s), {len(report.modalities)} modalities, {report.samples} "
                   f"sample(s), {report.markers} marker(s): {verdict}")
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("output")
@click.option("--key", required=True, help="The sample key.")
@click.option("--out", "out_file", default=None, help="PNG to write (default: ./<output>_<key>.png).")
@click.option("--shard", default=None, help="Look only in this shard (e.g. shard-00003).")
@click.option("--modalities", "-m", default=None, help="Only these modalities (comma-separated).")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="M=PATH",
              help="Decode token modality M with the tokenizer at PATH (needs modalmill.tokenize, issue 4).")
def show(output, key, out_file, shard, modalities, tokenizers):
    """Render every modality of one sample of OUTPUT into one PNG and print its path."""
    from .jobs.show import parse_tokenizers, show_sample

    result = show_sample(output, key, out=out_file, shard=shard, modalities=_csv(modalities),
                         tokenizers=parse_tokenizers(tokenizers))
    bad = [p.modality for p in result.panels if not p.ok]
    if bad:
        click.echo(f"could not render: {', '.join(bad)} (see their panels)", err=True)
    click.echo(result.path)


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (includes full token histograms).")
@click.option("--modalities", "-m", default=None, help="Only these modalities (comma-separated).")
@click.option("--workers", type=int, default=4, show_default=True, help="Tars read in parallel.")
def stats(output, as_json, modalities, workers):
    """Per-modality counts, failure reasons, token usage and value ranges of OUTPUT."""
    from .jobs.stats import corpus_stats, format_stats

    st = corpus_stats(output, modalities=_csv(modalities), workers=workers)
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    for line in format_stats(st):
        click.echo(line)


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


@main.command("convert-weights")
@click.argument("labeler")
@click.argument("src")
@click.argument("dst")
def convert_weights(labeler, src, dst):
    """Convert an official checkpoint SRC into the format LABELER loads, written to DST (use DST as weights).

    Labelers that support it define a ``convert_weights(src, dst)`` classmethod (e.g. omnidata_depth and
    omnidata_normal: Omnidata's .ckpt -> a transformers DPT directory)."""
    from .labelers import get_labeler, load_entry_points

    load_entry_points()
    cls = get_labeler(labeler)
    convert = getattr(cls, "convert_weights", None)
    if convert is None:
        raise click.ClickException(f"labeler {labeler!r} has no weight conversion (it loads its official "
                                   "weights directly)")
    click.echo(f"{labeler}: wrote {convert(src, dst)}")


@main.command()
@click.option("--workdir", default=".demo", show_default=True, help="Where the demo corpus and output go.")
@click.option("--force", is_flag=True, help="Rebuild the corpus and recompute the output.")
@click.option("--no-progress", is_flag=True)
@click.option("--tokenizer-steps", type=click.IntRange(min=1), default=None,
              help="Training steps of the demo's tiny tokenizers (default 150).")
def demo(workdir, force, no_progress, tokenizer_steps):
    """Build a small corpus from real photos (scikit-image) and run the demo job end to end."""
    from .jobs.demo import run_demo

    summary, out = run_demo(workdir, force=force, show_progress=not no_progress, tokenizer_steps=tokenizer_steps)
    _report(summary)
    click.echo(f"demo output: {out}")
    click.echo(f"  look at it: modalmill status {out}")


@main.command("train-tokenizer")
@click.option("--modality", required=True, help="Source modality (rgb, canny_edge, depth, ..., caption = text).")
@click.option("--data", required=True, help="The labeled output root (local or s3://).")
@click.option("--config", "config_file", default=None, help="YAML/JSON with model:/train: overrides.")
@click.option("--out", default=None, help="Checkpoint directory (default: DATA/_modalmill/tokenizers/MODALITY).")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=None, help="Default: base (4M sizes).")
@click.option("--quantizer", type=click.Choice(["vq", "fsq", "memcodes"]), default=None)
@click.option("--steps", type=int, default=None, help="Training steps (overrides the config).")
@click.option("--workers", type=int, default=1, show_default=True, help="Ray Train workers (data parallel).")
@click.option("--gpu", is_flag=True, help="One GPU per worker.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--in-process", is_flag=True, help="Train in this process, without Ray.")
@click.option("--force", is_flag=True, help="Start over instead of resuming from the last training state.")
@click.option("--vocab-size", type=int, default=None,
              help="Text tokenizer only (--modality caption): WordPiece vocabulary size (default 30000, as 4M).")
@click.option("--text-tokenizer", "text_source", default=None, metavar="PATH|4m",
              help="Text tokenizer only: install this one instead of training (4M's released "
                   "text_tokenizer_4m_wordpiece_30k.json, an ml-4m checkout, or '4m' = $MODALMILL_4M_TEXT_TOKENIZER).")
@click.option("--no-progress", is_flag=True)
def train_tokenizer_cmd(modality, data, config_file, out, preset, quantizer, steps, workers, gpu, address,
                        in_process, force, vocab_size, text_source, no_progress):
    """Train (or resume) a tokenizer for MODALITY on the labeled shards of DATA; report held-out quality."""
    from .tokenize.train import default_out, format_report, train_tokenizer

    if modality in ("caption", "text"):
        from .tokenize.text import install_text_tokenizer, train_text_tokenizer_on_output

        if text_source is not None:
            if vocab_size is not None:
                raise click.UsageError("--vocab-size trains a tokenizer; --text-tokenizer installs an existing one")
            info = install_text_tokenizer(text_source, out or default_out(data, "text"))
            click.echo(f"text tokenizer: {info['path']} ({info['vocab_size']} tokens, copied from {info['source']})")
            return
        info = train_text_tokenizer_on_output(data, out or default_out(data, "text"),
                                              vocab_size=30_000 if vocab_size is None else vocab_size)
        click.echo(f"text tokenizer: {info['path']} ({info['vocab_size']} tokens, {info['captions']} captions)")
        return
    if text_source is not None:
        raise click.UsageError("--text-tokenizer is for --modality caption (the text tokenizer)")
    if vocab_size is not None:
        raise click.UsageError("--vocab-size is for the text tokenizer (--modality caption); the size of the other "
                               "tokenizers' codebooks comes from --preset / --config")
    report = train_tokenizer(modality, data, out, config=config_file, preset=preset, quantizer=quantizer,
                             steps=steps, workers=workers, use_gpu=gpu, address=address, use_ray=not in_process,
                             force=force, show_progress=not no_progress)
    for line in format_report(report):
        click.echo(line)


@main.command()
@click.option("--data", required=True, help="The labeled output root to add token shards to.")
@click.option("--modalities", "-m", default=None, help="Sources or token modalities, e.g. rgb,canny_edge.")
@click.option("--text-tokenizer", "text_source", default=None, metavar="PATH|4m",
              help="Make this the output's text tokenizer (DATA/_modalmill/tokenizers/text, what load_dataset("
                   "text_tokenizer=True) uses): 4M's text_tokenizer_4m_wordpiece_30k.json, an ml-4m checkout or '4m'.")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="M=PATH",
              help="Checkpoint per modality (default: DATA/_modalmill/tokenizers/M).")
@click.option("--force", is_flag=True, help="Recompute tokens made with another checkpoint.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--shards", default=None, help="Only these output shards, e.g. '0-9,42'.")
@click.option("--workers", type=int, default=1, show_default=True, help="Tokenizer actors per modality.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True)
@click.option("--no-progress", is_flag=True)
def tokenize(data, modalities, text_source, tokenizers, force, address, shards, workers, gpus_per_worker,
             no_progress):
    """Write tok_*@224 shards for DATA with trained tokenizers (the pipeline's --only mode)."""
    from .jobs.tokenize import parse_tokenizer_args, tokenize_output

    if text_source is not None:
        from .tokenize.text import install_text_tokenizer
        from .tokenize.train import default_out

        info = install_text_tokenizer(text_source, default_out(data, "text"))
        click.echo(f"text tokenizer: {info['path']} ({info['vocab_size']} tokens, copied from {info['source']})")
        if not modalities:
            return
    if not modalities:
        raise click.UsageError("give --modalities (and/or --text-tokenizer)")

    summary = tokenize_output(data, _csv(modalities), parse_tokenizer_args(tokenizers), force=force, address=address,
                              shards=shards, workers=workers, gpus_per_worker=gpus_per_worker,
                              show_progress=not no_progress)
    _report(summary)
    sys.exit(summary["exit_code"])


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()

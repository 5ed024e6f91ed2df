"""The ``modalmill`` command.

Exit codes (docs/cli.md, "Exit codes"): 0 everything written (or already done); 1 a config, weights or I/O error,
or ``check`` found violations (one line on stderr, no traceback); 2 a command-line usage error (click's); 3 the job
finished but some samples failed (see the manifest); 4 some shards failed (see ``modalmill status``); 5 another
driver holds the output's lease (see ``--wait``). Set ``MODALMILL_DEBUG=1`` to get tracebacks.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__

EXIT_LEASE = 5  # = modalmill.jobs.runner.EXIT_LEASE (not imported here: `modalmill --help` stays light)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI turns errors into one line
            if os.environ.get("MODALMILL_DEBUG"):
                raise
            from .io.lease import LeaseHeld

            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            click.echo(f"error: {msg or type(e).__name__}", err=True)
            sys.exit(EXIT_LEASE if isinstance(e, LeaseHeld) else 1)


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
    if summary.get("lease_lost"):
        click.echo(f"error: {summary['lease_lost']}; check the output with `modalmill check`", err=True)


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
    click.option("--wait", is_flag=True, help="If another driver is writing OUTPUT, wait until it is done instead "
                                              "of refusing (exit 5)."),
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
@click.option("--shard-size", type=int, default=1000, show_default=True,
              help="Images per shard for folder input; rows per shard of each parquet file.")
@click.option("--max-size", type=int, default=None, help="Cap the stored image's longer side (pixels).")
@click.option("--n-crops", type=int, default=1, show_default=True, help="Crops per sample in crop_settings.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all).")
@click.option("--caption-source", type=click.Choice(["input", "model", "input_or_model"]), default="input",
              show_default=True, help="caption from the samples' own text, from the captioning model, or the "
                                      "input's text with the model only where a sample has none.")
@click.option("--text-member", default="txt", show_default=True, help="Member extension holding a sample's text.")
@click.option("--text-json-key", default="caption", show_default=True,
              help="Else the field of the sample's .json holding its text ('' for none).")
@click.option("--image-column", default="image", show_default=True,
              help="Parquet input: the column with the image bytes (or {'bytes', 'path'} structs).")
@click.option("--text-column", default=None, help="Parquet input: the column with the text (caption).")
@click.option("--id-column", default=None, help="Parquet input: the column with the sample keys (default: row).")
@_with_common
def label(input_spec, output, modalities, seed, batch_size, shard_size, max_size, n_crops, num_cpus, caption_source,
          text_member, text_json_key, image_column, text_column, id_column, address, only, force, shards, no_progress,
          wait):
    """Label INPUT (tar shard pattern, parquet pattern, s3:// pattern or image folder) into OUTPUT (local or s3://)."""
    from .jobs.runner import run_job
    from .jobs.spec import job_from_dict

    data = {"input": input_spec, "output": output, "modalities": _csv(modalities), "seed": seed,
            "batch_size": batch_size, "shard_size": shard_size, "shards": shards,
            "decode": {"max_size": max_size}, "crops": {"n_crops": n_crops}, "ray": {"num_cpus": num_cpus},
            "text": {"caption_source": caption_source, "member": text_member, "json_key": text_json_key or None},
            "parquet": {"image_column": image_column, "text_column": text_column, "id_column": id_column}}
    spec = job_from_dict(data, where="modalmill label")
    summary = run_job(spec, only=_csv(only), force=force, address=address, show_progress=not no_progress, wait=wait)
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("job_file", metavar="JOB.yaml")
@click.option("--output", default=None, help="Override the job's output root.")
@_with_common
def run(job_file, output, address, only, force, shards, no_progress, wait):
    """Run a job spec (YAML) on the embedded Ray or on --address."""
    from .jobs.runner import run_job
    from .jobs.spec import load_job

    spec = load_job(job_file, output=output, shards=shards)
    summary = run_job(spec, only=_csv(only), force=force, address=address, show_progress=not no_progress, wait=wait)
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("job_file", metavar="JOB.yaml")
@click.option("--address", default=None, help="A Ray cluster to measure on (default: an embedded Ray).")
@click.option("--sample", default=200, show_default=True, help="Images of the input to measure on.")
@click.option("--devices", type=int, default=None,
              help="Project for this many accelerators of the kind measured (default: the cluster's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(job_file, address, sample, devices, as_json):
    """Measure the job's labelers on a sample of its input and project its cost: actors per pool, images/s,
    bottleneck, device-hours per million images."""
    from .jobs.plan import plan as plan_job, render
    from .jobs.spec import load_job

    p = plan_job(load_job(job_file), sample=sample, address=address, devices=devices)
    click.echo(json.dumps(p, indent=1) if as_json else render(p))


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
    for shard, why in sorted(st.get("torn", {}).items()):
        click.echo(f"  torn shard {shard}: {why} (not done: the next run redoes it)")


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
@click.option("--key", default=None, help="The sample key (required unless --dedup is given).")
@click.option("--out", "out_file", default=None, help="PNG to write (default: ./<output>_<key>.png).")
@click.option("--shard", default=None, help="Look only in this shard (e.g. shard-00003).")
@click.option("--modalities", "-m", default=None, help="Only these modalities (comma-separated).")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="M=PATH",
              help="Decode token modality M with the 4M-format tokenizer at PATH (VQ-VAE decoders).")
@click.option("--dedup", "dedup_name", default=None, metavar="NAME",
              help="Draw a duplicate group of `modalmill dedup --name NAME` instead of one sample.")
@click.option("--group", type=int, default=None, help="With --dedup: the group id [default: the largest group].")
def show(output, key, out_file, shard, modalities, tokenizers, dedup_name, group):
    """Render every modality of one sample of OUTPUT into one PNG (or a duplicate group) and print its path."""
    from .jobs.show import parse_tokenizers, show_sample

    if dedup_name is not None:
        from .jobs.show.dedup_group import show_group

        click.echo(show_group(output, dedup_name, group=group, out=out_file))
        return
    if key is None:
        raise click.UsageError("--key is required (or --dedup NAME to draw a duplicate group)")

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
@click.option("--workers", type=int, default=None, help="Tars read in parallel [default: 32 on s3://, 4 locally].")
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
@click.argument("output")
@click.option("--method", type=click.Choice(["exact", "phash", "semantic"]), default="phash", show_default=True,
              help="exact: same decoded pixels; phash: near duplicates (perceptual hash); semantic: SemDeDup on "
                   "a global embedding.")
@click.option("--name", default=None, help="Name of the result: _modalmill/dedup/NAME.parquet [default: the method].")
@click.option("--threshold", type=float, default=None,
              help="phash: max Hamming distance in bits [10]; semantic: min cosine similarity [0.95].")
@click.option("--modality", default="dinov2_global", show_default=True,
              help="semantic: the global-embedding modality (crop 0 of each sample).")
@click.option("--cluster-size", type=int, default=1000, show_default=True, help="semantic: mean samples per cluster.")
@click.option("--seed", type=int, default=0, show_default=True, help="semantic: k-means seed.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def dedup(output, method, name, threshold, modality, cluster_size, seed, address, no_progress):
    """Find duplicate samples of OUTPUT and write their groups with a keep decision."""
    from .jobs.dedup import DedupConfig, run_dedup
    from .jobs.dedup.semantic import SemanticConfig

    cfg = DedupConfig(method=method, name=name or "", threshold=threshold, modality=modality,
                      semantic=SemanticConfig(cluster_size=cluster_size, seed=seed))
    s = run_dedup(output, cfg, progress=not no_progress, address=address)
    click.echo(f"{s['url']}: {s['n_samples']} sample(s), {s['n_groups']} duplicate group(s) holding "
               f"{s['n_in_groups']} sample(s); {s['n_dropped']} would be dropped ({s['seconds']:.1f} s)")
    click.echo(f"keep rule: {s['keep_rule']}")


@main.command("filter")
@click.argument("output")
@click.argument("new")
@click.option("--where", "where", default=None,
              help='Keep samples for which this holds, e.g. "aesthetic_score >= 5 and watermark_score < 0.5".')
@click.option("--drop-duplicates", "dedup_names", multiple=True, metavar="NAME",
              help="Drop the samples a `modalmill dedup --name NAME` result does not keep (repeatable).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per output shard.")
@click.option("--modalities", "-m", default=None, help="Only these modalities (default: every one).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--wait", is_flag=True, help="If another driver holds NEW's lease, wait until it is done instead of "
                                          "refusing (exit 5).")
def filter_cmd(output, new, where, dedup_names, shard_size, modalities, no_progress, address, wait):
    """Write NEW: the samples of OUTPUT that pass the filters, every modality rewritten aligned and resharded.
    The filter holds NEW's lease while it writes (a second filter into NEW is refused, exit 5)."""
    from .jobs.filter import FilterConfig, run_filter

    cfg = FilterConfig(where=where, drop_duplicates=tuple(dedup_names), shard_size=shard_size,
                       modalities=tuple(_csv(modalities) or ()))
    s = run_filter(output, new, cfg, progress=not no_progress, address=address, wait=wait)
    click.echo(f"{new}: {s['n_kept']} of {s['n_samples']} sample(s) kept in {s['n_shards']} shard(s); "
               f"{s['n_dropped']} dropped")
    for rule, n in sorted(s["dropped_by_rule"].items(), key=lambda kv: -kv[1]):
        click.echo(f"  dropped {n:6d}  {rule}")


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
@click.option("--wide", is_flag=True, help="Every column in full (weights, licence, quality): one long line each.")
def labelers(wide):
    """Every registered labeler with its modalities, default weights, licence, resources and published quality.

    The table fits 100 columns, long cells shortened with "…"; --wide prints every cell in full."""
    from .labelers import LABELERS, load_entry_points

    load_entry_points()
    rows = [("name", "outputs", "weights", "licence", "resources", "runs in", "quality")]
    for cls in LABELERS.values():
        r = cls.default_resources
        res = f"cpu={r.num_cpus:g} gpu={r.num_gpus:g}" + (f" mem={r.memory_mb}MiB" if r.memory_mb else "")
        rows.append((cls.name, ",".join(cls.outputs), cls.weights or "-", cls.license, res,
                     "actor pool" if cls.stateful else "shard task", cls.quality or "-"))
    # quality, then weights, licence and outputs give up characters first
    _table(rows, width=None if wide else TABLE_WIDTH, shrink=[(6, 8), (2, 18), (3, 14), (1, 18)])


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with where each hash comes from).")
@click.pass_context
def weights(ctx, as_json):
    """Every labeler's default weights: source, licence, size, sha256, and whether they are cached here.

    `modalmill weights fetch [LABELER ...] --to DIR|s3://PREFIX` downloads them once (verified against the pinned
    sha256) and stages them for workers without internet; a job then sets `weights_from: PREFIX`."""
    if ctx.invoked_subcommand is not None:
        return
    from .jobs.weights import human_size, table

    rows = table()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=1))
        return
    out = [("labeler", "source", "licence", "size", "sha256", "cached")]
    for r in rows:
        sha = r.sha256 or "not pinned (no published hash)"
        if r.sha256 and r.pinned_file:
            sha = f"{r.sha256} ({r.pinned_file})"
        here = "bundled" if r.cached == "bundled" else ("yes: " + r.cached if r.cached else "no")
        out.append((r.labeler, r.source, r.licence, human_size(r.size) if r.kind != "bundled" else "-",
                    sha if r.kind != "bundled" else "-", here))
    _table(out)


@weights.command("fetch")
@click.argument("labelers", nargs=-1)
@click.option("--to", "to", default=None, metavar="DIR|s3://PREFIX",
              help="Also stage the weights at DIR/<labeler> (a job reads them with `weights_from: DIR`).")
def weights_fetch(labelers, to):
    """Download the default weights of LABELERS (default: all downloadable ones) into the local weights cache,
    checked against their pinned sha256; with --to, copy them to DIR/<labeler> for clusters without internet."""
    from .jobs.weights import fetch
    from .io.fetch import WeightsError

    try:
        done, errors = fetch(list(labelers) or None, to, echo=click.echo)
    except (WeightsError, KeyError) as e:
        raise click.ClickException(str(e).strip("'\"")) from None
    if to and done:
        click.echo(f"staged {len(done)} labeler(s) under {to}; run jobs with `weights_from: {to}` "
                   f"(or MODALMILL_WEIGHTS_FROM={to})")
    if errors:
        raise click.ClickException(f"{len(errors)} labeler(s) failed: " + "; ".join(errors))


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
    cmd, where = command_as_run(), shown_path(out)
    click.echo(f"  look at it: {cmd} status {where}")
    click.echo(f"              {cmd} show {where} --key 000000 --out {shown_path(os.path.dirname(out))}/sample.png")
    for line in summary.get("skipped_steps", ()):
        click.echo(f"skipped: {line}", err=True)
    sys.exit(summary["exit_code"])


@main.command("train-tokenizer")
@click.option("--modality", required=True, help="Source modality (rgb, canny_edge, depth, ..., caption = text).")
@click.option("--data", required=True, help="The labeled output root (local or s3://).")
@click.option("--config", "config_file", default=None, help="YAML/JSON with model:/train: overrides.")
@click.option("--out", default=None, help="Checkpoint directory (default: DATA/_modalmill/tokenizers/MODALITY).")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default=None, help="Default: base (4M sizes).")
@click.option("--quantizer", type=click.Choice(["lucid", "vq", "memcodes", "fsq"]), default=None,
              help="lucid (spatial; 'vq' is the same) or memcodes (vectors): 4M's quantizers. fsq is refused.")
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
        from .tokenize.text_tokenizer import install_text_tokenizer, train_text_tokenizer_on_output

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
    if report.get("skipped"):
        click.echo(f"{report['checkpoint']}: already trained with this config on these labels (its report.json "
                   "records their hashes): nothing to do; --force trains it again")
    for line in format_report(report):
        click.echo(line)


@main.command()
@click.option("--data", required=True, help="The labeled output root to add token shards to.")
@click.option("--modalities", "-m", default=None, help="Sources or token modalities, e.g. rgb,canny_edge.")
@click.option("--text-tokenizer", "text_source", default=None, metavar="PATH|4m",
              help="Make this the output's text tokenizer (DATA/_modalmill/tokenizers/text, what load_dataset("
                   "text_tokenizer=True) uses): 4M's text_tokenizer_4m_wordpiece_30k.json, an ml-4m checkout or '4m'.")
@click.option("--tokenizer", "tokenizers", multiple=True, metavar="M=REF",
              help="Tokenizer per modality in 4M's layout: a hub id (EPFL-VILAB/4M_tokenizers_rgb_16k_224-448), a "
                   "local or s3:// folder (config.json + model.safetensors); default: DATA/_modalmill/tokenizers/M.")
@click.option("--force", is_flag=True, help="Recompute tokens made with another checkpoint.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--shards", default=None, help="Only these output shards, e.g. '0-9,42'.")
@click.option("--workers", type=int, default=1, show_default=True, help="Tokenizer actors per modality.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True)
@click.option("--no-progress", is_flag=True)
@click.option("--wait", is_flag=True, help="If another driver is writing DATA, wait until it is done instead of "
                                           "refusing (exit 5).")
def tokenize(data, modalities, text_source, tokenizers, force, address, shards, workers, gpus_per_worker,
             no_progress, wait):
    """Write tok_*@224 shards for DATA with 4M-format tokenizers (the pipeline's --only mode); --text-tokenizer
    installs the output's text tokenizer."""
    from .jobs.tokenize_output import parse_tokenizer_args, tokenize_output

    if text_source is not None:
        from .tokenize.text_tokenizer import install_text_tokenizer
        from .tokenize.train import default_out

        info = install_text_tokenizer(text_source, default_out(data, "text"))
        click.echo(f"text tokenizer: {info['path']} ({info['vocab_size']} tokens, copied from {info['source']})")
        if not modalities:
            return
    if not modalities:
        raise click.UsageError("give --modalities (and/or --text-tokenizer)")

    summary = tokenize_output(data, _csv(modalities), parse_tokenizer_args(tokenizers), force=force, address=address,
                              shards=shards, workers=workers, gpus_per_worker=gpus_per_worker,
                              show_progress=not no_progress, wait=wait)
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command("import")
@click.argument("output")
@click.option("--modality", required=True, help="det, semseg_coco, depth, normal or caption.")
@click.option("--from", "source", required=True, metavar="SOURCE",
              help="COCO instances JSON, YOLO label folder, folder of PNG/.npy maps, or a CSV/JSONL caption table.")
@click.option("--format", "fmt", type=click.Choice(["coco", "yolo", "png", "npy", "csv", "jsonl"]), default=None,
              help="The source's format [default: from the modality and the source's name].")
@click.option("--match", type=click.Choice(["key", "filename", "source_url"]), default="key", show_default=True,
              help="How an annotation finds its sample: the sample key, the image's file name, or the manifest's "
                   "source_url.")
@click.option("--missing", type=click.Choice(["fail", "drop"]), default="fail", show_default=True,
              help="Samples without an annotation: refuse (nothing written), or drop them from every modality "
                   "(manifest reason no_annotation).")
@click.option("--class-map", default=None, metavar="JSON",
              help="det: source class name -> 4M (COCO) class name; semseg: source id -> 4M id or COCO class name.")
@click.option("--classes", default=None, metavar="FILE", help="YOLO class names, one per line [SOURCE/classes.txt].")
@click.option("--units", type=click.Choice(["metres", "inverse_depth", "disparity"]), default="metres",
              show_default=True, help="depth: what the values are (metres = any linear depth).")
@click.option("--png-scale", type=float, default=1.0, show_default=True,
              help="depth: 16-bit PNG value x this = the value in --units (e.g. 0.001 for millimetres).")
@click.option("--panoptic-dir", default=None, metavar="DIR",
              help="semseg from a COCO panoptic JSON: its PNG folder [default: the JSON's path without .json].")
@click.option("--force", is_flag=True, help="Replace the modality when the output already has it (pseudo labels).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray).")
@click.option("--no-progress", is_flag=True)
@click.option("--wait", is_flag=True, help="Wait for another driver writing OUTPUT instead of refusing (exit 5).")
def import_(output, modality, source, fmt, match, missing, class_map, classes, units, png_scale, panoptic_dir, force,
            address, no_progress, wait):
    """Import ground-truth annotations into OUTPUT as a modality, aligned with everything else
    (docs/own-labels.md)."""
    from .jobs.importer import import_annotations

    summary = import_annotations(output, modality, source, fmt=fmt, match=match, missing=missing,
                                 class_map=class_map, classes=classes, units=units, png_scale=png_scale,
                                 panoptic_dir=panoptic_dir, force=force,
                                 address=address, show_progress=not no_progress, wait=wait)
    rep = summary["import"]
    click.echo(f"import {rep['modality']} from {rep['source']} ({rep['format']}, {rep['digest'][:19]}...): "
               f"{rep['matched']} of {rep['samples']} samples annotated, {rep['unannotated']} without annotation, "
               f"{rep['annotations_matching_no_sample']} annotation(s) matching no sample")
    for name, n in sorted((rep.get("unmapped_classes") or {}).items(), key=lambda kv: -kv[1]):
        click.echo(f"  not a 4M (COCO) class: {name!r} ({n} instances; kept, tokenised as plain words)")
    if rep.get("crowd_regions_left_out"):
        click.echo(f"  {rep['crowd_regions_left_out']} COCO crowd region(s) left out")
    _report(summary)
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("output")
@click.argument("dest")
@click.option("--layout", type=click.Choice(["4m-folder"]), default="4m-folder", show_default=True)
@click.option("--modalities", "-m", default=None, help="Only these (default: every modality all shards have).")
@click.option("--split", default=None, help="Write DEST/SPLIT/<modality>/... (e.g. train, val).")
@click.option("--tokens-only", is_flag=True, help="Token modalities, crop_settings and text-like ones only.")
@click.option("--no-progress", is_flag=True)
def export(output, dest, layout, modalities, split, tokens_only, no_progress):
    """Write OUTPUT in ml-4m's folder layout (DEST/<modality>/<shard>/<key>.<ext>) for its fine-tuning and
    evaluation configs (docs/own-labels.md)."""
    from .jobs.export import export_folder

    s = export_folder(output, dest, modalities=_csv(modalities), split=split, tokens_only=tokens_only,
                      layout=layout, show_progress=not no_progress)
    click.echo(f"exported {s['samples']} samples of {s['shards']} shard(s) to {s['dest']}: "
               f"{', '.join(s['modalities'])}")


def command_as_run() -> str:
    """How to run modalmill again from this working directory, as this process was started: ``modalmill`` when
    that name finds this very program on PATH, else its path (relative to the working directory when it lies
    below it: ``.venv/bin/modalmill`` after ``make demo``), or ``PYTHON -m modalmill``."""
    import shutil

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "modalmill" and os.path.exists(argv0):
        program, suffix = argv0, ""
    else:  # python -m modalmill (argv[0] is modalmill/__main__.py), or an embedding
        program, suffix = sys.executable, " -m modalmill"
    on_path = shutil.which(os.path.basename(program))
    if on_path and os.path.realpath(on_path) == os.path.realpath(program) and not suffix:
        return "modalmill"
    return shown_path(os.path.abspath(program)) + suffix


def shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (``.demo/output``), else absolute."""
    if "://" in path:
        return path
    path = os.path.abspath(path)
    rel = os.path.relpath(path, os.getcwd())
    if rel.startswith(".."):
        return path
    return rel if os.sep in rel else os.path.join(".", rel)  # ./modalmill, not a name looked up on PATH


TABLE_WIDTH = 100


def _fit_widths(widths: list[int], width: int, shrink: list[tuple[int, int]] | None = None) -> list[int]:
    """Column widths whose row (two spaces between columns) fits ``width``. ``shrink``: (column, narrowest) in the
    order they give up characters; then, if that is not enough, the widest column, down to 6."""
    widths = list(widths)

    def over() -> int:
        return sum(widths) + 2 * (len(widths) - 1) - width

    for col, narrowest in shrink or []:
        widths[col] = max(min(widths[col], narrowest), widths[col] - max(0, over()))
    while over() > 0:
        i = max(range(len(widths)), key=lambda j: widths[j])
        if widths[i] <= 6:
            break
        widths[i] -= 1
    return widths


def _table(rows, width: int | None = None, shrink: list[tuple[int, int]] | None = None):
    """Print ``rows`` (the first is the header) as aligned columns; with ``width``, cells too long for it are
    shortened with "…" (those of the ``shrink`` columns first) so every line fits."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if width is not None:
        widths = _fit_widths(widths, width, shrink)
        rows = [[c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(r, widths)] for r in rows]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()

"""`f2m-ray synthesize`: labeled synthetic masses as Parquet shards (local or s3://)."""

from __future__ import annotations

import click

from f2m_ray.core.mixing import DEFAULT_SCHEME, SCHEMES
from f2m_ray.pretrained import DEFAULT_OUT
from f2m_ray.runtime.stop import on_stop
from f2m_ray_cli.main import cli, command_again


@cli.command("synthesize")
@click.option("--category", "categories", multiple=True, required=True, metavar="C",
              help="MARGIN-SHAPE (e.g. spiculated-irregular), repeatable; 'all' = every category in the bank "
                   "with 2 or more seeds.")
@click.option("--n", "n", type=int, required=True, help="Masses per category.")
@click.option("--out", default=DEFAULT_OUT, show_default=True,
              help="Output folder: a local path or s3://bucket/prefix.")
@click.option("--model", default=None, metavar="CKPT",
              help="Checkpoint dir, run folder (its latest checkpoint), or 'pretrained' (the shipped model) "
                   "[default: the bank's checkpoint with --bank, else the newest finished run under --storage, "
                   "else the shipped model].")
@click.option("--bank", default=None, help="Feature bank [default: CKPT/feature_bank.parquet].")
@click.option("--storage", default=None, metavar="PATH|s3://...",
              help="Where `f2m-ray train` put its runs, searched for the newest finished one "
                   "[default: $F2M_STORAGE, else ./f2m-runs].")
@click.option("--mixing", default=DEFAULT_SCHEME, show_default=True, type=click.Choice(list(SCHEMES)),
              help="How seeds combine: 'paper' = eq. 2 over K=20 (masses near the category mean), "
                   "'variance-preserving' = same weights around the category centroid, rescaled to a single seed's spread, "
                   "'sparse' = eq. 2 over K=3.")
@click.option("--k", "k", type=int, default=None, help="Seeds mixed per mass [default: the scheme's, 20 or 3].")
@click.option("--step", type=float, default=0.05, show_default=True, help="Weight grid.")
@click.option("--alpha", type=float, default=None,
              help="Dirichlet concentration (1 = uniform over grid compositions) [default: 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Run seed.")
@click.option("--rows-per-file", type=int, default=10_000, show_default=True,
              help="Masses per Parquet file (the unit of work and of --resume).")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Decode batch (part of what fixes the output bytes).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Decode precision: bf16 autocast or fp32; auto = bf16 on GPU, fp32 on CPU. Part of what fixes the bytes.")
@click.option("--seed-split", type=click.Choice(["all", "train"]), default="all", show_default=True,
              help="Draw seeds from all labeled ROIs (as the paper) or only the training split.")
@click.option("--workers", type=int, default=None,
              help="Ray actor pool size [default: one per core, at most one per file; GPUs are shared among them].")
@click.option("--executor", type=click.Choice(["auto", "ray", "in-process"]), default="auto", show_default=True,
              help="Where the files are made: a Ray Data actor pool, or this process; auto = this process when "
                   "the work takes less than starting Ray would (about 30 s on 2 cores), else Ray. Same bytes either way.")
@click.option("--judge", default=None, metavar="JUDGE",
              help="A judge (f2m-ray judge train): stores its label_confidence for every mass.")
@click.option("--min-label-confidence", type=float, default=None, metavar="P",
              help="Guard: reject masses the judge gives below P for their target margin and shape (needs --judge).")
@click.option("--min-seed-distance", type=float, default=None, metavar="D",
              help="Guard: reject masses within D (RMS pixel difference, images in [-1, 1]) of a real ROI of the seed split.")
@click.option("--max-attempts", type=int, default=10, show_default=True,
              help="Candidates a mass tries under the guards; if none passes, the closest is kept and flagged.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out, keeping its finished files.")
@click.option("--overwrite", is_flag=True, help="Replace an existing synthetic dataset in --out.")
@click.option("--dry-run", is_flag=True, help="Print the resolved run and exit.")
def synthesize(categories, n, out, model, bank, storage, mixing, k, step, alpha, seed, rows_per_file, batch_size,
               seed_split, precision, workers, executor, judge, min_label_confidence, min_seed_distance, max_attempts, resume, overwrite,
               dry_run) -> None:
    """Mix K same-category bank features per mass, decode, and write N masses per category."""
    from f2m_ray.synth import driver as synthesis, plan

    config = plan.SynthesisConfig(
        categories=tuple(categories), n=n, out=out, model=model, bank=bank, storage=storage, mixing=mixing, k=k, step=step, alpha=alpha,
        seed=seed, rows_per_file=rows_per_file, batch_size=batch_size, seed_split=seed_split, precision=precision,
        workers=workers, executor=executor, resume=resume, overwrite=overwrite, judge=judge,
        min_label_confidence=min_label_confidence, min_seed_distance=min_seed_distance, max_attempts=max_attempts,
    )
    if dry_run:
        for line in plan.resolve(config).describe():
            click.echo(line)
        return
    on_stop(lambda: _kept(out))
    summary = synthesis.synthesize(config, report=lambda line: click.echo(line, err=True))
    if summary.written_files == 0 and summary.files:
        click.echo(f"nothing to do: all {summary.files} files of {out} were already finished")
    else:
        kept = summary.files - summary.written_files
        click.echo(
            f"wrote {summary.written_rows} masses in {summary.written_files} files in {summary.seconds:.1f} s "
            f"({summary.masses_per_second:.0f} masses/s)" + (f"; kept {kept} finished files" if kept else "")
        )
    if summary.guards:
        g = summary.guards
        click.echo(f"guards: {g['rejected']} of {g['candidates']} candidates rejected "
                   f"({100 * g['rejection_rate']:.1f}%)")
        if g["unmet"]:
            click.echo(f"warning: {g['unmet']} masses passed no guard in {config.max_attempts} attempts; "
                       f"each keeps its closest candidate, flagged guards_passed = false", err=True)
    click.echo(f"dataset: {out}  ({summary.rows} masses, {summary.files} files)")
    click.echo(f"manifest: {summary.manifest}")




def _kept(out: str) -> str:
    """What a stopped synthesis leaves in `out`, and the command that finishes it."""
    from f2m_ray.synth.output import finished_files

    done = finished_files(out)
    if done is None:
        return f"nothing was written to {out}; run the same command again"
    return (f"{done} finished file{'s' if done != 1 else ''} kept in {out}; "
            f"finish the run with: {command_again('--resume', drop=('--overwrite',))}")

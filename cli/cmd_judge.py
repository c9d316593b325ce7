"""`f2m-ray judge train|info`: the independent margin/shape classifier that `evaluate` scores with."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from f2m_ray.errors import F2MError
from f2m_ray_cli.main import cli


@cli.group("judge")
def judge() -> None:
    """The independent judge: a small CNN trained on real labeled masses only."""


@judge.command("train")
@click.option("--data", required=True, help="Labeled ROIs: phantom[:N], a manifest CSV/Parquet, or a folder with manifest.csv.")
@click.option("--format", "fmt", default="auto", show_default=True, help="Data format: auto or manifest.")
@click.option("--out", required=True, help="Judge directory to write (local or s3://).")
@click.option("--epochs", type=int, default=None, help="Passes over the training split [default: 100].")
@click.option("--batch-size", type=int, default=None, help="Global batch size [default: 64].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate [default: 1e-3].")
@click.option("--val-fraction", type=float, default=None,
              help="Held-out share of patients; use the GAN's value so the splits match [default: 0.1].")
@click.option("--seed", type=int, default=None, help="Split, initialisation and batch-order seed [default: 0].")
@click.option("--workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP).")
@click.option("--overwrite", is_flag=True, help="Replace an existing judge at --out.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def judge_train(data: str, fmt: str, out: str, epochs: int | None, batch_size: int | None, lr: float | None,
                val_fraction: float | None, seed: int | None, workers: int, overwrite: bool, dry_run: bool) -> None:
    """Train the judge on the training split of DATA and report its held-out accuracy."""
    from f2m_ray.judge_model import META_FILE, JudgeConfig, JudgeTrainConfig
    from f2m_ray.storage import filesystem, join

    changes = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
                                     seed=seed).items() if v is not None}
    train_config = JudgeTrainConfig(**changes)
    _check(train_config, workers)
    if dry_run:
        click.echo(json.dumps({"data": data, "format": fmt, "out": out, "workers": workers,
                               "config": asdict(JudgeConfig()), "train_config": asdict(train_config)}, indent=2))
        return
    fs, root = filesystem(out)
    if fs.exists(join(root, META_FILE)) and not overwrite:
        raise F2MError(f"a judge already exists at {out}; pass --overwrite to replace it")

    import ray

    from f2m_ray.evaluation.judge import collect_labeled

    from f2m_ray.evaluation.judge_ray import train_judge_on_ray
    from f2m_ray.data.readers import read_labeled
    from f2m_ray.runtime.cluster import ensure_ray
    from f2m_ray.runtime.console import quiet_ray_data

    ensure_ray()  # epoch lines come through train_judge_on_ray's progress
    quiet_ray_data()
    source = read_labeled(data, fmt, train_config.val_fraction, train_config.seed)
    arrays = collect_labeled(source.dataset)
    train_rows = int((arrays.split == "train").sum())
    click.echo(f"judge: {source.description}; {train_rows} train, {len(arrays) - train_rows} held out", err=True)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    report = train_judge_on_ray(arrays, out, JudgeConfig(), train_config, workers, use_gpu, data_description=data,
                                progress=lambda line: click.echo(line, err=True))
    click.echo(_summary(report))
    click.echo(f"judge: {out}")


def _check(train_config, workers: int) -> None:
    if train_config.epochs <= 0:
        raise F2MError(f"--epochs must be a positive integer, got {train_config.epochs}")
    if train_config.batch_size < 2:
        raise F2MError(f"--batch-size must be at least 2, got {train_config.batch_size}")
    if not 0.0 < train_config.val_fraction < 1.0:
        raise F2MError(f"--val-fraction must be between 0 and 1, got {train_config.val_fraction}")
    if train_config.lr <= 0:
        raise F2MError(f"--lr must be positive, got {train_config.lr}")
    if train_config.seed < 0:
        raise F2MError(f"--seed must be >= 0, got {train_config.seed}")
    if workers < 1:
        raise F2MError(f"--workers must be at least 1, got {workers}")


def _summary(report: dict) -> str:
    line = f"trained on {report['train_rows']} real masses in {report['seconds']:.0f} s ({report['epochs']} epochs)"
    val = report.get("val_accuracy")
    if not val:
        return line + "; no held-out rows to score"
    chance = report["val_majority_accuracy"]
    return (
        f"{line}; held-out accuracy on {report['val_rows']}: margin {val['margin']:.3f}, shape {val['shape']:.3f} "
        f"(majority class: {chance['margin']:.3f}, {chance['shape']:.3f})"
    )


@judge.command("info")
@click.argument("path")
def judge_info(path: str) -> None:
    """Print a judge's training data, size and held-out accuracy."""
    from f2m_ray.judge_model import read_judge_metadata

    meta = read_judge_metadata(path)
    click.echo(f"judge        {path}")
    click.echo(f"judge id     {meta.get('judge_id')}")
    click.echo(f"trained on   {meta.get('data') or '?'}")
    click.echo(f"features     {meta['config']['feature_dim']}-d")
    if meta.get("report"):
        click.echo(f"result       {_summary(meta['report'])}")
    click.echo(f"written by   f2m-ray {meta.get('tool_version')}")

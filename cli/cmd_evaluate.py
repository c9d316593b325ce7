"""`f2m-ray evaluate`: label fidelity, realism, coverage, diversity, memorization and usefulness."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from f2m_ray_cli.main import cli


@cli.command("evaluate")
@click.option("--synthetic", "synthetic", required=True, help="Synthetic dataset folder (local or s3://) with _manifest.json.")
@click.option("--real", "real", required=True, help="Real labeled ROIs: phantom[:N], a manifest CSV/Parquet, or a folder.")
@click.option("--judge", "judge", default=None, help="Judge directory from `f2m-ray judge train` [default: train one here].")
@click.option("--out", required=True, help="Report folder: report.json and report.html (local or s3://).")
@click.option("--format", "fmt", default="auto", show_default=True, help="Real data format: auto or manifest.")
@click.option("--val-fraction", type=float, default=None,
              help="Held-out share of real patients; must match training [default: the judge's, else 0.1].")
@click.option("--seed", type=int, default=None, help="Split and subsampling seed [default: the judge's, else 0].")
@click.option("--usefulness-real", "usefulness_real", type=int, default=200, show_default=True,
              help="R: real masses for the usefulness classifiers.")
@click.option("--usefulness-synthetic", "usefulness_synthetic", type=int, default=10_000, show_default=True,
              help="S: synthetic masses added (capped at the dataset's size).")
@click.option("--usefulness-steps", "usefulness_steps", type=int, default=1000, show_default=True,
              help="Optimizer steps for each usefulness classifier.")
@click.option("--usefulness-real-share", "usefulness_real_share", default="0.5", show_default=True,
              help="Expected share of real masses in the real + synthetic classifier's batches, "
                   "or 'uniform' to draw from the union as it is (R of R+S).")
@click.option("--usefulness-protocol", "usefulness_protocol", type=click.Choice(["scarce", "classic"]),
              default="scarce", show_default=True,
              help="scarce: arms real / real + mixup / real + synthetic on the GAN's R real ROIs, several seeds; "
                   "classic: R real, R + S, S synthetic, one seed.")
@click.option("--usefulness-seeds", "usefulness_seeds", type=int, default=3, show_default=True,
              help="Classifier seeds per arm (scarce protocol): mean and sd.")
@click.option("--mixup-alpha", "mixup_alpha", type=float, default=0.4, show_default=True,
              help="Beta(a, a) of the real + mixup arm (scarce protocol).")
@click.option("--no-usefulness", is_flag=True, help="Skip the usefulness classifiers (the slowest step).")
@click.option("--judge-epochs", type=int, default=100, show_default=True, help="Epochs for a judge trained here.")
@click.option("--k", type=int, default=3, show_default=True, help="Neighbourhood of the precision/recall manifolds.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report in --out.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
def evaluate_command(synthetic: str, real: str, judge: str | None, out: str, fmt: str, val_fraction: float | None,
                     seed: int | None, usefulness_real: int, usefulness_synthetic: int, usefulness_steps: int,
                     usefulness_real_share: str, usefulness_protocol: str, usefulness_seeds: int, mixup_alpha: float,
                     no_usefulness: bool, judge_epochs: int, k: int, overwrite: bool,
                     dry_run: bool) -> None:
    """Score a synthetic dataset against real masses; write OUT/report.json and OUT/report.html."""
    from f2m_ray.evaluation.evaluate import REPORT_HTML, REPORT_JSON, EvaluateConfig, ProgressPrinter, check_config, evaluate

    config = EvaluateConfig(
        val_fraction=val_fraction, seed=seed, usefulness_real=usefulness_real,
        usefulness_synthetic=usefulness_synthetic, usefulness_steps=usefulness_steps,
        usefulness_real_share=_real_share(usefulness_real_share), usefulness=not no_usefulness,
        judge_epochs=judge_epochs, k=k, usefulness_protocol=usefulness_protocol, usefulness_seeds=usefulness_seeds,
        mixup_alpha=mixup_alpha,
    )
    check_config(config)
    if dry_run:
        click.echo(json.dumps({"synthetic": synthetic, "real": real, "judge": judge, "out": out, "format": fmt,
                               "config": asdict(config)}, indent=2))
        return
    from f2m_ray.runtime.console import quiet_ray_data
    from f2m_ray.runtime.cluster import ensure_ray

    ensure_ray()
    quiet_ray_data()
    report = evaluate(synthetic, real, out, judge, config, fmt, overwrite, ProgressPrinter(),
                      echo=lambda line: click.echo(line, err=True))
    click.echo(_summary(report))
    click.echo(f"report: {out.rstrip('/')}/{REPORT_HTML} and {REPORT_JSON}")


def _real_share(text: str) -> float | None:
    """'uniform' -> None; a number -> float (range checked by check_config); else one clear line."""
    from f2m_ray.errors import F2MError

    if text.strip().lower() == "uniform":
        return None
    try:
        return float(text)
    except ValueError:
        raise F2MError(f"--usefulness-real-share must be a number between 0 and 1 or 'uniform', got {text!r}") from None


def _summary(report: dict) -> str:
    overall = report["groups"]["overall"]
    fidelity = overall["label_fidelity"]
    realism = overall["realism"]
    pr = overall["precision_recall"]
    dc = overall["density_coverage"]
    memo = overall["memorization"]

    def f(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"label fidelity  margin {f(fidelity['synthetic']['margin'])} vs real {f((fidelity['heldout_real'] or {}).get('margin'))}, "
        f"shape {f(fidelity['synthetic']['shape'])} vs real {f((fidelity['heldout_real'] or {}).get('shape'))}",
        f"realism (FD)    synthetic {f(realism['synthetic_vs_half'])} vs floor {f(realism['floor_half_vs_half'])} "
        f"(all held-out: {f(realism['synthetic_vs_heldout'])})",
        f"precision {f(pr['precision'])}  recall {f(pr['recall'])}  density {f(dc['density'])}  "
        f"coverage {f(dc['coverage'])}  "
        f"diversity {f(overall['diversity']['synthetic'])} vs real {f(overall['diversity']['heldout_real'])}",
        f"memorized       {f(memo['share'])} (features), {f(memo['share_pixels'])} (pixels)",
    ]
    useful = report.get("usefulness")
    if useful and useful["protocol"] == "scarce":
        for arm, result in useful["arms"].items():
            acc, delta = result["accuracy"]["mean"], result["delta_vs_real"]
            change = f"  {100 * delta['mean']['mean']:+.1f} +- {100 * delta['mean']['sd']:.1f} points vs real" if delta else ""
            lines.append(f"usefulness      {arm:<20} {f(acc['mean'])} +- {f(acc['sd'])}{change}  "
                         f"(R={useful['R']}, {useful['seeds']} seeds)")
    elif useful:
        acc = {k: v["accuracy"]["mean"] for k, v in useful["classifiers"].items()}
        lines.append(
            f"usefulness      R={useful['R']} real {f(acc['real'])}, +S={useful['S']} synthetic "
            f"{f(acc['real_plus_synthetic'])} ({useful['delta_vs_real']['real_plus_synthetic']['mean']:+.3f}), "
            f"synthetic only {f(acc['synthetic'])}"
        )
    return "\n".join(lines)

"""`f2m-ray evaluate`: how good, how faithful, how new and how useful a synthetic dataset is.

Inputs: a finished synthetic dataset (Parquet shards + ``_manifest.json``), the real labeled
data (any `f2m_ray.data.readers` source) and optionally a judge (f2m_ray.evaluation.judge; trained here on the
real training split when none is given). Output: ``REPORT_DIR/report.json`` and a
self-contained ``REPORT_DIR/report.html`` (images inline), the JSON written last.

The real rows fall in three sets:
    seen      what the GAN trained on (the training split recorded in the feature bank that the
              synthetic dataset's manifest names; the split rule when the bank cannot be read)
              plus every ROI that a synthetic row names among its seeds (synthesis may mix
              held-out ROIs too): the "training seeds" of the memorization metric
    held out  never seen by the GAN, the synthesis or the judge (the judge's own training ids
              are recorded beside it); every comparison and test uses these
    the rest  seen by the judge only: unused
So a real source larger than the GAN's (``--real phantom:10000`` after training on
``phantom:2000``) gives a larger held-out set, and with it steadier figures.

Metrics, per synthetic category and overall (real rows restricted to the synthetic dataset's
categories, so that "overall" compares like with like), all in the judge's penultimate
features unless said otherwise:
    label fidelity   judge accuracy on synthetic masses against their target labels, beside its
                     accuracy on held-out real masses of the same categories, and the ratio
    realism          Frechet distance synthetic vs held-out real; the floor is the distance
                     between two random halves A, B of the held-out real set, and
                     `synthetic_vs_half` (|A| synthetic masses vs B) is the figure comparable to it
                     (same sizes, same reference: the FD estimate is biased by sample size)
    precision/recall k-NN manifolds (Kynkaanniemi et al. 2019), synthetic subsampled to the
                     size of the held-out real set (the estimate depends on set sizes)
    density/coverage Naeem et al. 2020 (k = 5) on the same subsamples: how many real k-NN balls a
                     synthetic mass falls in, and the share of real balls that hold one
    diversity        mean pairwise distance within synthetic and within held-out real
    memorization     each synthetic mass's distance to the nearest seen real mass; the share at or
                     below the 1st percentile of held-out-real-to-seen distances (one threshold,
                     from all held-out rows); in judge features and in pixels (RMS, [-1, 1] units)
    usefulness       fresh classifiers of the judge's architecture trained for the same number of
                     steps on R seen real, R real + S synthetic, and S synthetic masses, tested on
                     held-out real (the synthetic dataset's categories); half of each batch of the
                     mixed one is real in expectation (`usefulness_real_share`), so that 200 real
                     rows are not 2% of what it sees; `evaluate` trains the
                     three as parallel Ray tasks, `evaluate_arrays` one after another in-process
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from f2m_ray import __version__
from f2m_ray.core import mass_metrics, metrics
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES
from f2m_ray.storage import filesystem, join
from f2m_ray.evaluation.usefulness import Runner, run_in_process, run_on_ray, scarce_usefulness, usefulness
from f2m_ray.evaluation.report_html import grids, histogram_svg, render_html
from f2m_ray.evaluation.inputs import Progress, SyntheticArrays, check_sizes, gan_training_ids, read_synthetic, split_real
from f2m_ray.evaluation.judge import collect_labeled, train_judge
from f2m_ray.judge_model import JudgeConfig, JudgeTrainConfig, load_judge, predict
from f2m_ray.data.readers import read_labeled
from f2m_ray.runtime.cluster import ensure_ray


REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_FORMAT = "f2m-ray-evaluation"
REPORT_VERSION = 1
OVERALL = "overall"
DENSITY_COVERAGE_K = 5  # Naeem et al. 2020's neighbourhood
USEFULNESS_PROTOCOLS = ("scarce", "classic")


@dataclass(frozen=True)
class EvaluateConfig:
    """What `f2m-ray evaluate` computes and on how much data."""

    val_fraction: float | None = None  # real split; None: the judge's (or 0.1, as `train`)
    seed: int | None = None  # split and subsampling seed; None: the judge's (or 0)
    usefulness_real: int = 200  # R: seen real masses the usefulness classifiers start from
    usefulness_synthetic: int = 10_000  # S: synthetic masses added (capped at what the dataset holds)
    usefulness_steps: int = 1000  # optimizer steps for each usefulness classifier (same for all three)
    # Expected share of real masses in the batches of the real + synthetic classifier; None draws
    # uniformly from the union, where 200 real rows next to 10,000 synthetic are 2% of what it sees.
    usefulness_real_share: float | None = 0.5
    usefulness: bool = True  # train the usefulness classifiers (the slowest step)
    usefulness_protocol: str = "scarce"  # "scarce" (f2m_ray.evaluation.usefulness) or "classic" (R real / R + S / S)
    usefulness_seeds: int = 3  # scarce: classifier seeds per arm (mean and sd)
    mixup_alpha: float = 0.4  # scarce: Beta(a, a) of the real + mixup arm
    judge_epochs: int = 100  # epochs for a judge trained here (no --judge)
    k: int = 3  # neighbourhood of the precision/recall manifolds
    percentile: float = 1.0  # memorization threshold: this percentile of held-out-to-seen distances
    grid_images: int = 8  # masses per category and row in the report's grids
    diversity_samples: int = metrics.DIVERSITY_MAX_SAMPLES  # subsample for mean pairwise distance

    def resolved(self, judge_train_config) -> "EvaluateConfig":
        """Fill the split from the judge (its held-out rows must be ours), else the defaults."""
        val = self.val_fraction if self.val_fraction is not None else (
            judge_train_config.val_fraction if judge_train_config else 0.1)
        seed = self.seed if self.seed is not None else (judge_train_config.seed if judge_train_config else 0)
        return replace(self, val_fraction=val, seed=seed)




class ProgressPrinter:
    """Progress on stderr: a redrawn bar on a terminal, a line per quarter otherwise (logs, CI)."""

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.stage = ""
        self.last_quarter = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            if self.tty and self.stage:
                self.stream.write("\n")
            self.stage, self.last_quarter = stage, -1
        fraction = done / total if total else 1.0
        elapsed = time.perf_counter() - self.started
        if self.tty:
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{stage:<34} [{bar}] {done}/{total}  {elapsed:5.0f} s")
            if done >= total:
                self.stream.write("\n")
                self.stage = ""
        else:
            quarter = int(fraction * 4)
            if quarter > self.last_quarter:
                self.last_quarter = quarter
                self.stream.write(f"{stage}: {done}/{total} ({elapsed:.0f} s)\n")
        self.stream.flush()


# ---------------------------------------------------------------- metrics per group


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _nan_to_none(value.item())
    return value


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def group_metrics(
    syn_features: np.ndarray,
    syn_pred: tuple[np.ndarray, np.ndarray],
    syn_labels: tuple[np.ndarray, np.ndarray],
    real_features: np.ndarray,
    real_pred: tuple[np.ndarray, np.ndarray],
    real_labels: tuple[np.ndarray, np.ndarray],
    syn_to_seen: np.ndarray,
    syn_to_seen_pixels: np.ndarray,
    threshold: float,
    threshold_pixels: float,
    config: EvaluateConfig,
    seed: int,
    syn_outlines: np.ndarray | None = None,
    real_outlines: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every per-group metric for one group of synthetic rows against its held-out real rows.

    ``syn_outlines`` / ``real_outlines``: the segmented mass of each image (mass_metrics.outline_masks),
    for the outline spread (mean 1 - IoU between outlines: a template in varied light scores near 0).
    """
    n_syn, n_real = len(syn_features), len(real_features)
    syn_acc = metrics.head_accuracies(*syn_pred, *syn_labels)
    real_acc = metrics.head_accuracies(*real_pred, *real_labels) if n_real else None
    out: dict[str, Any] = {
        "synthetic_rows": n_syn,
        "heldout_real_rows": n_real,
        "label_fidelity": {
            "synthetic": syn_acc,
            "heldout_real": real_acc,
            "ratio": {h: _ratio(syn_acc[h], real_acc[h] if real_acc else None) for h in ("margin", "shape", "mean")},
        },
    }
    rng = np.random.default_rng(seed)
    realism: dict[str, Any] = {"synthetic_vs_heldout": None, "synthetic_vs_half": None, "floor_half_vs_half": None,
                               "half_rows": None}
    if n_syn >= 2 and n_real >= 2:
        realism["synthetic_vs_heldout"] = metrics.frechet_distance(syn_features, real_features)
    if n_real >= 4 and n_syn >= n_real // 2:
        order = rng.permutation(n_real)
        half_a, half_b = real_features[order[: n_real // 2]], real_features[order[n_real // 2 :]]
        syn_half = syn_features[metrics.subsample_indices(n_syn, len(half_a), seed)]
        realism.update(
            synthetic_vs_half=metrics.frechet_distance(syn_half, half_b),
            floor_half_vs_half=metrics.frechet_distance(half_a, half_b),
            half_rows=int(len(half_a)),
        )
    realism["ratio_to_floor"] = _ratio(realism["synthetic_vs_half"], realism["floor_half_vs_half"])
    out["realism"] = realism
    if n_real >= 2 and n_syn >= 2:
        rows = min(n_real, n_syn)
        k = min(config.k, rows - 1)
        pr = metrics.precision_recall(real_features[metrics.subsample_indices(n_real, rows, seed)],
                                      syn_features[metrics.subsample_indices(n_syn, rows, seed + 1)], k=k)
        out["precision_recall"] = {"precision": pr.precision, "recall": pr.recall, "k": pr.k, "rows": rows}
    else:
        out["precision_recall"] = {"precision": None, "recall": None, "k": None, "rows": 0}
    dc_k = min(DENSITY_COVERAGE_K, min(n_real, n_syn) - 1)
    if dc_k >= 1:  # Naeem et al. 2020 on the same equal-size subsamples as precision/recall
        rows = min(n_real, n_syn)
        dc = metrics.density_coverage(real_features[metrics.subsample_indices(n_real, rows, seed)],
                                      syn_features[metrics.subsample_indices(n_syn, rows, seed + 1)], k=dc_k)
        out["density_coverage"] = {"density": dc.density, "coverage": dc.coverage, "k": dc.k, "rows": rows}
    else:
        out["density_coverage"] = {"density": None, "coverage": None, "k": None, "rows": 0}
    out["diversity"] = {
        "synthetic": metrics.diversity(syn_features, config.diversity_samples, seed) if n_syn >= 2 else None,
        "heldout_real": metrics.diversity(real_features, config.diversity_samples, seed) if n_real >= 2 else None,
    }
    out["diversity"]["ratio"] = _ratio(out["diversity"]["synthetic"], out["diversity"]["heldout_real"])
    if syn_outlines is not None and real_outlines is not None:
        out["outline_spread"] = {
            "synthetic": mass_metrics.outline_spread(syn_outlines, seed=seed) if n_syn >= 2 else None,
            "heldout_real": mass_metrics.outline_spread(real_outlines, seed=seed) if n_real >= 2 else None,
        }
        out["outline_spread"]["ratio"] = _ratio(out["outline_spread"]["synthetic"], out["outline_spread"]["heldout_real"])
    flagged = syn_to_seen <= threshold
    flagged_pixels = syn_to_seen_pixels <= threshold_pixels
    out["memorization"] = {
        "share": float(flagged.mean()) if n_syn else None,
        "count": int(flagged.sum()),
        "share_pixels": float(flagged_pixels.mean()) if n_syn else None,
        "count_pixels": int(flagged_pixels.sum()),
        "median_distance": float(np.median(syn_to_seen)) if n_syn else None,
        "median_distance_pixels": float(np.median(syn_to_seen_pixels)) if n_syn else None,
    }
    return out


# ---------------------------------------------------------------- the whole evaluation


def evaluate(
    synthetic_path: str,
    real: str,
    out: str,
    judge_path: str | None = None,
    config: EvaluateConfig = EvaluateConfig(),
    fmt: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Evaluate a synthetic dataset against real data; writes REPORT_DIR/report.{html,json}; returns the report."""
    started = time.perf_counter()
    check_config(config)
    fs, root = filesystem(out)
    if fs.exists(join(root, REPORT_JSON)) and not overwrite:
        raise F2MError(f"a report already exists in {out}; pass --overwrite to replace it")
    judge = load_judge(judge_path) if judge_path else None  # refuses another vocabulary before any work
    config = config.resolved(judge.train_config if judge else None)
    synthetic = read_synthetic(synthetic_path, progress)
    echo(f"synthetic: {len(synthetic.margin)} masses in {len(set(synthetic.category.tolist()))} categories")
    if judge:
        check_sizes(synthetic.images.shape, synthetic.images.shape, judge.config.image_size)

    ensure_ray()
    source = read_labeled(real, fmt, config.val_fraction, config.seed)
    real_all = collect_labeled(source.dataset)
    echo(f"real: {source.description}")
    inputs = {"synthetic": synthetic_path, "real": real, "real_description": source.description, "judge": judge_path}
    gan_train_ids, gan_source = gan_training_ids(synthetic.manifest)
    inputs["gan_training_set"] = gan_source
    report, figures = evaluate_arrays(synthetic, real_all, judge, config, inputs, progress, echo,
                                      gan_train_ids=gan_train_ids, runner=run_on_ray)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if progress:
        progress("writing the report", 0, 1)
    write_report(out, report, render_html(report, figures))
    if progress:
        progress("writing the report", 1, 1)
    return report


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_arrays(
    synthetic: SyntheticArrays,
    real_all,  # f2m_ray.evaluation.judge.LabeledArrays: every real row, with its split
    judge=None,  # f2m_ray.evaluation.judge.LoadedJudge, or None to train one on the real training split
    config: EvaluateConfig = EvaluateConfig(),
    inputs: dict[str, Any] | None = None,
    progress: Progress | None = None,
    echo: Callable[[str], None] = lambda line: None,
    device: str | None = None,
    gan_train_ids: set[str] | None = None,
    runner: Runner = run_in_process,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation on arrays in memory (no Ray, no files): (report, figures for the HTML page).

    `gan_train_ids`: the roi ids the GAN trained on; None means the rows of split "train".
    """
    started = time.perf_counter()
    inputs = dict(inputs or {})
    device = device or default_device()
    config = config.resolved(judge.train_config if judge else None)
    check_sizes(synthetic.images.shape, real_all.images.shape, judge.config.image_size if judge else None)
    notes: list[str] = []
    inputs.setdefault("gan_training_set", "split rule" if gan_train_ids is None else "given roi ids")
    if judge and judge.train_ids is None and judge.data and judge.data == inputs.get("real") and (
            judge.train_config.val_fraction, judge.train_config.seed) != (config.val_fraction, config.seed):
        notes.append("the judge was trained on these data with another split: some held-out rows were in its training set")

    seen_mask, heldout_all_mask = split_real(real_all, synthetic.seed_ids, gan_train_ids, judge)
    seen, heldout_all = real_all.subset(np.flatnonzero(seen_mask)), real_all.subset(np.flatnonzero(heldout_all_mask))
    echo(f"real: {len(seen)} seen by the GAN or used as seeds, {len(heldout_all)} held out")
    if len(heldout_all) < 2:
        raise F2MError(
            f"only {len(heldout_all)} held-out real masses (seen by neither the GAN, the seeds nor the judge): "
            f"use more real data"
        )

    model, judge_info, judge_config, judge_train_config = _the_judge(judge, real_all, config, inputs, progress, echo, device)

    # Real rows of the synthetic dataset's categories: the reference of every comparison.
    categories = sorted(set(synthetic.category.tolist()))
    real_category = np.array([f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(real_all.margin, real_all.shape)])
    in_scope = np.isin(real_category, categories)
    heldout_mask = heldout_all_mask & in_scope
    heldout = real_all.subset(np.flatnonzero(heldout_mask))
    missing = [c for c in categories if c not in set(real_category[heldout_mask].tolist())]
    if missing:
        notes.append(f"no held-out real masses of {', '.join(missing)}: their real-side metrics are empty")

    syn_pred = predict(model, synthetic.images, progress=(lambda d, t, _w: progress("judging synthetic masses", d, t))
                       if progress else None)
    real_pred = predict(model, real_all.images, progress=(lambda d, t, _w: progress("judging real masses", d, t))
                        if progress else None)

    syn_to_seen, heldout_to_seen, syn_to_seen_pixels, heldout_to_seen_pixels = _nearest_seen(
        syn_pred, real_pred, seen_mask, heldout_all_mask, synthetic.images, seen.images, heldout_all.images, progress)
    memo = metrics.memorization(syn_to_seen, heldout_to_seen, config.percentile)
    memo_pixels = metrics.memorization(syn_to_seen_pixels, heldout_to_seen_pixels, config.percentile)

    groups = _groups(synthetic, syn_pred, real_all, real_pred, real_category, heldout_mask, categories,
                     (syn_to_seen, syn_to_seen_pixels), (memo.threshold, memo_pixels.threshold), config, progress)
    useful = None
    if config.usefulness:
        seen_in_scope = real_all.subset(np.flatnonzero(seen_mask & in_scope))
        if len(heldout) == 0 or len(seen_in_scope) == 0:
            notes.append("usefulness skipped: no seen or no held-out real masses of the synthetic categories")
        else:
            useful = _usefulness(judge_config, judge_train_config, seen_in_scope, heldout, synthetic, config,
                                 progress, device, runner)

    report = _report(inputs, synthetic, categories, real_all, seen, heldout_all, heldout, judge_config, config,
                     judge_info, (memo, memo_pixels), groups, useful, notes, started)
    figures = {
        "grids": grids(synthetic, real_all, real_category, categories, config.grid_images, config.seed),
        "histograms": [
            histogram_svg("Distance to the nearest seen real mass (judge features)", syn_to_seen, heldout_to_seen,
                           memo.threshold),
            histogram_svg("Distance to the nearest seen real mass (pixels, RMS)", syn_to_seen_pixels,
                           heldout_to_seen_pixels, memo_pixels.threshold),
        ],
    }
    return _nan_to_none(report), figures


def _report(inputs, synthetic, categories, real_all, seen, heldout_all, heldout, judge_config, config, judge_info,
            memos, groups, useful, notes, started: float) -> dict[str, Any]:
    """report.json's content (before NaN -> null)."""
    memo, memo_pixels = memos
    return {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "tool_version": __version__,
        "inputs": {
            **inputs,
            "model_id": synthetic.manifest.get("model_id"),
            "synthetic_rows": int(len(synthetic.margin)),
            "categories": categories,
            "real_rows": int(len(real_all)),
            "seen_real_rows": int(len(seen)),
            "heldout_real_rows": int(len(heldout_all)),
            "heldout_real_rows_in_categories": int(len(heldout)),
            "features": f"judge penultimate layer ({judge_config.feature_dim}-d)",
        },
        "config": asdict(config),
        "judge": judge_info,
        "memorization_threshold": {"features": memo.threshold, "pixels": memo_pixels.threshold,
                                   "percentile": config.percentile},
        "groups": groups,
        "usefulness": useful,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _the_judge(judge, real_all, config: EvaluateConfig, inputs: dict[str, Any], progress, echo, device):
    """(model, its report entry, JudgeConfig, JudgeTrainConfig): the given judge, or one trained on real_all's train split."""
    if judge is not None:
        info = {"path": inputs.get("judge"), "trained_here": False, "judge_id": judge.judge_id, "data": judge.data,
                "report": judge.report, "training_set": "recorded roi ids" if judge.train_ids is not None else "split rule"}
        return judge.model.to(device), info, judge.config, judge.train_config
    train_rows = int((real_all.split == "train").sum())
    echo(f"no --judge: training one on the {train_rows} real masses of the training split ({config.judge_epochs} epochs)")
    train_config = JudgeTrainConfig(epochs=config.judge_epochs, val_fraction=config.val_fraction, seed=config.seed)
    model, report = train_judge(
        real_all, JudgeConfig(), train_config, device=device,
        progress=(lambda d, t, _w: progress("training the judge", d, t)) if progress else None,
    )
    return model, {"path": None, "trained_here": True, "report": report, "training_set": "split rule"}, model.cfg, train_config


def _nearest_seen(syn_pred, real_pred, seen_mask, heldout_mask, syn_images, seen_images, heldout_images, progress):
    """Distances of synthetic and held-out real masses to their nearest seen real mass: judge features, then pixels."""
    if progress:
        progress("nearest seen real masses", 0, 2)
    seen_features = real_pred.features[seen_mask]
    syn_to_seen, _ = metrics.nearest_distances(syn_pred.features, seen_features)
    heldout_to_seen, _ = metrics.nearest_distances(real_pred.features[heldout_mask], seen_features)
    if progress:
        progress("nearest seen real masses", 1, 2)
    syn_pixels = metrics.nearest_rms_pixel_distances(syn_images, seen_images)
    heldout_pixels = metrics.nearest_rms_pixel_distances(heldout_images, seen_images)
    if progress:
        progress("nearest seen real masses", 2, 2)
    return syn_to_seen, heldout_to_seen, syn_pixels, heldout_pixels


def _groups(synthetic, syn_pred, real_all, real_pred, real_category, heldout_mask, categories, syn_distances,
            thresholds, config: EvaluateConfig, progress) -> dict[str, Any]:
    """group_metrics overall and per category."""
    groups: dict[str, Any] = {}
    names = [OVERALL, *categories]
    syn_outlines = mass_metrics.outline_masks(synthetic.images)
    real_outlines = mass_metrics.outline_masks(real_all.images[heldout_mask]) if heldout_mask.any() else None
    heldout_index = np.cumsum(heldout_mask) - 1  # row of real_all -> row of real_outlines
    for i, name in enumerate(names):
        if progress:
            progress("metrics per category", i, len(names))
        syn_rows = np.arange(len(synthetic.margin)) if name == OVERALL else np.flatnonzero(synthetic.category == name)
        real_rows = np.flatnonzero(heldout_mask if name == OVERALL else heldout_mask & (real_category == name))
        groups[name] = group_metrics(
            syn_pred.features[syn_rows],
            (syn_pred.margin[syn_rows], syn_pred.shape[syn_rows]),
            (synthetic.margin[syn_rows], synthetic.shape[syn_rows]),
            real_pred.features[real_rows],
            (real_pred.margin[real_rows], real_pred.shape[real_rows]),
            (real_all.margin[real_rows], real_all.shape[real_rows]),
            syn_distances[0][syn_rows],
            syn_distances[1][syn_rows],
            thresholds[0],
            thresholds[1],
            config,
            config.seed,
            syn_outlines[syn_rows],
            real_outlines[heldout_index[real_rows]] if real_outlines is not None else None,
        )
    if progress:
        progress("metrics per category", len(names), len(names))
    return groups


def _usefulness(judge_config, judge_train_config, seen, heldout, synthetic, config: EvaluateConfig, progress, device,
                runner):
    """The usefulness protocol of the config: scarce (default) or classic."""
    if config.usefulness_protocol == "scarce":
        return scarce_usefulness(
            judge_config, judge_train_config, seen, heldout, {"synthetic": synthetic},
            real=config.usefulness_real, synthetic=config.usefulness_synthetic, steps=config.usefulness_steps,
            seeds=config.usefulness_seeds, real_share=config.usefulness_real_share,
            mixup_alpha=config.mixup_alpha, seed=config.seed, progress=progress, device=device, runner=runner)
    return usefulness(judge_config, judge_train_config, seen, heldout, synthetic, config, config.seed, progress, device,
                      runner)


def check_config(config: EvaluateConfig) -> None:
    """Refuse out-of-range options (one line each) before any work."""
    if config.val_fraction is not None and not 0.0 < config.val_fraction < 1.0:
        raise F2MError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    if config.seed is not None and config.seed < 0:
        raise F2MError(f"--seed must be >= 0, got {config.seed}")
    for name, value in (("--usefulness-real", config.usefulness_real), ("--usefulness-synthetic", config.usefulness_synthetic),
                        ("--usefulness-steps", config.usefulness_steps), ("--judge-epochs", config.judge_epochs),
                        ("--k", config.k), ("--usefulness-seeds", config.usefulness_seeds)):
        if value < 1:
            raise F2MError(f"{name} must be a positive integer, got {value}")
    if config.usefulness_protocol not in USEFULNESS_PROTOCOLS:
        raise F2MError(f"unknown usefulness protocol {config.usefulness_protocol!r}; "
                       f"choose one of {', '.join(USEFULNESS_PROTOCOLS)}")
    if not (math.isfinite(config.mixup_alpha) and config.mixup_alpha > 0):
        raise F2MError(f"--mixup-alpha must be a positive number (Beta(a, a) of the mixup arm), got {config.mixup_alpha}")
    share = config.usefulness_real_share
    if share is not None and not 0.0 < share < 1.0:
        raise F2MError(f"--usefulness-real-share must be between 0 and 1 (or 'uniform'), got {share}")
    if not 0.0 < config.percentile < 100.0:
        raise F2MError(f"the memorization percentile must be between 0 and 100, got {config.percentile}")


def write_report(out: str, report: dict[str, Any], page: str) -> None:
    """HTML first, JSON last: a folder with report.json holds a finished report."""
    fs, root = filesystem(out)
    try:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(join(root, REPORT_JSON)):
            fs.rm(join(root, REPORT_JSON))  # an overwritten report is unfinished until the new JSON lands
        with fs.open(join(root, REPORT_HTML), "w") as f:
            f.write(page)
        with fs.open(join(root, REPORT_JSON), "w") as f:
            json.dump(report, f, indent=2)
    except OSError as err:
        raise F2MError(f"cannot write the report to {out}: {err.strerror or err}") from None

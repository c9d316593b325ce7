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

import base64
import html
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from f2m_ray import __version__
from f2m_ray.core import metrics
from f2m_ray.errors import F2MError, first_line
from f2m_ray.labels import MARGINS, SHAPES
from f2m_ray.storage import filesystem, join
from f2m_ray.evaluation.usefulness import USEFULNESS_LABELS, Runner, run_in_process, run_on_ray, scarce_usefulness, usefulness

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_FORMAT = "f2m-ray-evaluation"
REPORT_VERSION = 1
SYNTHETIC_COLUMNS = ["image", "height", "width", "margin_id", "shape_id", "category", "seed_ids"]
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


Progress = Callable[[str, int, int], None]  # (stage, done, total)


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


# ---------------------------------------------------------------- inputs


@dataclass
class SyntheticArrays:
    images: np.ndarray  # (N, H, W) float32 in [-1, 1]
    margin: np.ndarray  # (N,) int64 target margin ids
    shape: np.ndarray  # (N,) int64 target shape ids
    category: np.ndarray  # (N,) str
    seed_ids: set[str]  # every ROI id used as a seed
    manifest: dict[str, Any]


def read_synthetic(path: str, progress: Progress | None = None) -> SyntheticArrays:
    """Decode a finished synthetic dataset (refused without its manifest) into arrays."""
    from f2m_ray.data.readers import to_model_range
    from f2m_ray.schema import decode_png
    from f2m_ray.synthetic import read_manifest, read_table

    manifest = read_manifest(path)
    try:
        table = read_table(path, columns=SYNTHETIC_COLUMNS)
    except F2MError:
        raise
    except Exception as err:  # pyarrow: a listed file missing, foreign or lacking a column
        raise F2MError(f"cannot read synthetic dataset {path}: {first_line(err)}") from None
    sizes = set(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))
    if len(sizes) > 1:
        raise F2MError(f"synthetic dataset {path} mixes image sizes {sorted(sizes)}")
    png = table.column("image").combine_chunks().field("bytes").to_pylist()
    if not png:
        raise F2MError(f"synthetic dataset {path} holds no masses")
    images = []
    for i, data in enumerate(png):
        images.append(to_model_range(decode_png(data)))
        if progress and ((i + 1) % 1000 == 0 or i + 1 == len(png)):
            progress("decoding synthetic masses", i + 1, len(png))
    decoded_sizes = {im.shape for im in images}
    if len(decoded_sizes) > 1 or decoded_sizes != {tuple(next(iter(sizes)))}:
        raise F2MError(f"synthetic dataset {path}: PNG sizes {sorted(decoded_sizes)} differ from its height/width columns")
    seed_ids = set()
    for ids in table.column("seed_ids").to_pylist():
        seed_ids.update(ids or [])
    return SyntheticArrays(
        images=np.stack(images),
        margin=table.column("margin_id").to_numpy().astype(np.int64),
        shape=table.column("shape_id").to_numpy().astype(np.int64),
        category=np.array(table.column("category").to_pylist(), dtype=str),
        seed_ids=seed_ids,
        manifest=manifest,
    )


def check_sizes(synthetic_shape: tuple[int, ...], real_shape: tuple[int, ...], judge_size: int | None) -> None:
    """Refuse comparisons across image sizes (one line)."""
    syn, real = tuple(synthetic_shape[-2:]), tuple(real_shape[-2:])
    if syn != real:
        raise F2MError(
            f"synthetic masses are {syn[0]}x{syn[1]} pixels but the real ones are {real[0]}x{real[1]}: "
            f"evaluate compares images of one size"
        )
    if judge_size is not None and (judge_size, judge_size) != real:
        raise F2MError(f"the judge takes {judge_size}x{judge_size} images but the masses are {real[0]}x{real[1]}")


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
) -> dict[str, Any]:
    """Every per-group metric for one group of synthetic rows against its held-out real rows."""
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
    from f2m_ray.evaluation.judge import collect_labeled, load_judge
    from f2m_ray.data.readers import read_labeled
    from f2m_ray.runtime.cluster import ensure_ray

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


def gan_training_ids(manifest: dict[str, Any]) -> tuple[set[str] | None, str]:
    """The roi ids the GAN trained on, from the feature bank the manifest names: (ids or None, where from)."""
    from f2m_ray.bank import load_feature_bank

    bank = (manifest.get("arguments") or {}).get("bank")
    if not bank:
        return None, "split rule (the manifest names no feature bank)"
    try:
        loaded = load_feature_bank(str(bank))
    except F2MError as err:
        return None, f"split rule (feature bank unreadable: {err})"
    return set(loaded.roi_id[loaded.split == "train"].tolist()), f"feature bank {bank}"


def split_real(real_all, seed_ids: set[str], gan_train_ids: set[str] | None, judge=None) -> tuple[np.ndarray, np.ndarray]:
    """(seen, held out) masks over `real_all`: seen = what the GAN trained on (None: split "train")
    plus every seed a synthetic mass was mixed from; held out = seen by neither them nor the judge."""
    in_training_split = real_all.split == "train"
    gan_seen = in_training_split if gan_train_ids is None else np.isin(real_all.roi_id, list(gan_train_ids))
    seen_mask = gan_seen | np.isin(real_all.roi_id, list(seed_ids))
    if judge is not None and judge.train_ids is not None:
        judge_seen = np.isin(real_all.roi_id, list(judge.train_ids))
    else:
        judge_seen = in_training_split  # a judge trained here, or one without recorded ids, used the split
    return seen_mask, ~seen_mask & ~judge_seen


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
    from f2m_ray.evaluation.judge import JudgeConfig, JudgeTrainConfig, predict, train_judge

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

    if judge is None:
        train_rows = int((real_all.split == "train").sum())
        echo(f"no --judge: training one on the {train_rows} real masses of the training split ({config.judge_epochs} epochs)")
        judge_train_config = JudgeTrainConfig(epochs=config.judge_epochs, val_fraction=config.val_fraction, seed=config.seed)
        model, judge_report = train_judge(
            real_all, JudgeConfig(), judge_train_config, device=device,
            progress=(lambda d, t, _w: progress("training the judge", d, t)) if progress else None,
        )
        judge_info = {"path": None, "trained_here": True, "report": judge_report, "training_set": "split rule"}
        judge_config = model.cfg
    else:
        model = judge.model.to(device)
        judge_info = {"path": inputs.get("judge"), "trained_here": False, "judge_id": judge.judge_id,
                      "data": judge.data, "report": judge.report,
                      "training_set": "recorded roi ids" if judge.train_ids is not None else "split rule"}
        judge_config, judge_train_config = judge.config, judge.train_config

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

    if progress:
        progress("nearest seen real masses", 0, 2)
    seen_features = real_pred.features[seen_mask]
    syn_to_seen, _ = metrics.nearest_distances(syn_pred.features, seen_features)
    heldout_to_seen, _ = metrics.nearest_distances(real_pred.features[heldout_all_mask], seen_features)
    if progress:
        progress("nearest seen real masses", 1, 2)
    syn_to_seen_pixels = metrics.nearest_rms_pixel_distances(synthetic.images, seen.images)
    heldout_to_seen_pixels = metrics.nearest_rms_pixel_distances(heldout_all.images, seen.images)
    if progress:
        progress("nearest seen real masses", 2, 2)
    memo = metrics.memorization(syn_to_seen, heldout_to_seen, config.percentile)
    memo_pixels = metrics.memorization(syn_to_seen_pixels, heldout_to_seen_pixels, config.percentile)

    groups: dict[str, Any] = {}
    names = [OVERALL, *categories]
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
            syn_to_seen[syn_rows],
            syn_to_seen_pixels[syn_rows],
            memo.threshold,
            memo_pixels.threshold,
            config,
            config.seed,
        )
    if progress:
        progress("metrics per category", len(names), len(names))

    useful = None
    if config.usefulness:
        seen_in_scope = real_all.subset(np.flatnonzero(seen_mask & in_scope))
        if len(heldout) == 0 or len(seen_in_scope) == 0:
            notes.append("usefulness skipped: no seen or no held-out real masses of the synthetic categories")
        else:
            if config.usefulness_protocol == "scarce":
                useful = scarce_usefulness(
                    judge_config, judge_train_config, seen_in_scope, heldout, {"synthetic": synthetic},
                    real=config.usefulness_real, synthetic=config.usefulness_synthetic, steps=config.usefulness_steps,
                    seeds=config.usefulness_seeds, real_share=config.usefulness_real_share,
                    mixup_alpha=config.mixup_alpha, seed=config.seed, progress=progress, device=device, runner=runner)
            else:
                useful = usefulness(judge_config, judge_train_config, seen_in_scope, heldout, synthetic, config,
                                    config.seed, progress, device, runner)

    report = {
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
    figures = {
        "grids": _grids(synthetic, real_all, real_category, categories, config.grid_images, config.seed),
        "histograms": [
            _histogram_svg("Distance to the nearest seen real mass (judge features)", syn_to_seen, heldout_to_seen,
                           memo.threshold),
            _histogram_svg("Distance to the nearest seen real mass (pixels, RMS)", syn_to_seen_pixels,
                           heldout_to_seen_pixels, memo_pixels.threshold),
        ],
    }
    return _nan_to_none(report), figures


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


# ---------------------------------------------------------------- figures


def _png_base64(tile: np.ndarray) -> str:
    from f2m_ray.schema import png_bytes, to_uint8

    return base64.b64encode(png_bytes(to_uint8(tile))).decode()


def _tile(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """(n, H, W) -> one (H, n*W + gaps) strip, gaps white."""
    if len(images) == 0:
        return np.ones((8, 8), dtype=np.float32)
    h, w = images.shape[1:]
    strip = np.ones((h, len(images) * (w + gap) - gap), dtype=np.float32)
    for i, image in enumerate(images):
        strip[:, i * (w + gap) : i * (w + gap) + w] = image
    return strip


def _grids(synthetic: SyntheticArrays, real_all, real_category: np.ndarray, categories: list[str], n: int,
           seed: int) -> dict[str, dict[str, str]]:
    """Per category: base64 PNG strips of n synthetic and n real masses (deterministic picks)."""
    out = {}
    for i, category in enumerate(categories):
        syn_rows = np.flatnonzero(synthetic.category == category)
        real_rows = np.flatnonzero(real_category == category)
        syn_pick = syn_rows[metrics.subsample_indices(len(syn_rows), n, seed + i)]
        real_pick = real_rows[metrics.subsample_indices(len(real_rows), n, seed + i)]
        out[category] = {"synthetic": _png_base64(_tile(synthetic.images[syn_pick])),
                         "real": _png_base64(_tile(real_all.images[real_pick]))}
    return out


def _histogram_svg(title: str, synthetic: np.ndarray, heldout: np.ndarray, threshold: float,
                   bins: int = 40, width: int = 560, height: int = 220) -> str:
    """Two overlaid histograms (share of each set per bin) and the threshold as a line, as inline SVG."""
    values = np.concatenate([synthetic, heldout])
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    syn_share = np.histogram(synthetic, edges)[0] / max(1, len(synthetic))
    real_share = np.histogram(heldout, edges)[0] / max(1, len(heldout))
    top = max(syn_share.max(), real_share.max(), 1e-9)
    left, bottom, plot_w, plot_h = 40, height - 30, width - 60, height - 60
    bar_w = plot_w / bins

    def x_of(v: float) -> float:
        return left + (v - low) / (high - low) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" font-family="sans-serif">',
             f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>']
    for shares, colour in ((real_share, "#1f77b4"), (syn_share, "#ff7f0e")):
        for i, share in enumerate(shares):
            if share <= 0:
                continue
            bar_h = share / top * plot_h
            parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{bottom - bar_h:.1f}" width="{bar_w:.1f}" '
                         f'height="{bar_h:.1f}" fill="{colour}" fill-opacity="0.55"/>')
    tx = x_of(threshold)
    parts += [
        f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{tx:.1f}" y1="{bottom - plot_h}" x2="{tx:.1f}" y2="{bottom}" stroke="red" stroke-dasharray="4 3"/>',
        f'<text x="{tx + 3:.1f}" y="{bottom - plot_h + 10}" fill="red">threshold {threshold:.3g}</text>',
        f'<text x="{left}" y="{height - 14}">{low:.3g}</text>',
        f'<text x="{left + plot_w}" y="{height - 14}" text-anchor="end">{high:.3g}</text>',
        f'<rect x="{left + plot_w - 150}" y="22" width="10" height="10" fill="#ff7f0e"/>'
        f'<text x="{left + plot_w - 136}" y="31">synthetic ({len(synthetic)})</text>',
        f'<rect x="{left + plot_w - 150}" y="38" width="10" height="10" fill="#1f77b4"/>'
        f'<text x="{left + plot_w - 136}" y="47">held-out real ({len(heldout)})</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def _share_text(share: float | None) -> str:
    if share is None:
        return "the mixed classifier draws uniformly from real and synthetic rows"
    return f"the mixed classifier's batches are {share:.0%} real in expectation"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


SUMMARY_ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("synthetic masses", ("synthetic_rows",)),
    ("held-out real masses", ("heldout_real_rows",)),
    ("judge margin accuracy: synthetic", ("label_fidelity", "synthetic", "margin")),
    ("judge margin accuracy: held-out real", ("label_fidelity", "heldout_real", "margin")),
    ("margin fidelity ratio", ("label_fidelity", "ratio", "margin")),
    ("judge shape accuracy: synthetic", ("label_fidelity", "synthetic", "shape")),
    ("judge shape accuracy: held-out real", ("label_fidelity", "heldout_real", "shape")),
    ("shape fidelity ratio", ("label_fidelity", "ratio", "shape")),
    ("FD synthetic vs held-out real", ("realism", "synthetic_vs_heldout")),
    ("FD synthetic vs real half B", ("realism", "synthetic_vs_half")),
    ("FD floor: real half A vs half B", ("realism", "floor_half_vs_half")),
    ("precision", ("precision_recall", "precision")),
    ("recall", ("precision_recall", "recall")),
    ("density (k = 5)", ("density_coverage", "density")),
    ("coverage (k = 5)", ("density_coverage", "coverage")),
    ("diversity: synthetic", ("diversity", "synthetic")),
    ("diversity: held-out real", ("diversity", "heldout_real")),
    ("memorized share (features)", ("memorization", "share")),
    ("memorized share (pixels)", ("memorization", "share_pixels")),
]


def _scarce_html(useful: dict[str, Any]) -> list[str]:
    """The scarce-data usefulness table: mean +- sd over the classifier seeds, delta to real."""
    def pm(stat: dict[str, Any] | None, scale: float = 1.0) -> str:
        if not stat:
            return ""
        return f"{scale * stat['mean']:.3g} &plusmn; {scale * stat['sd']:.2g}"

    parts = [f"<h2>Usefulness (scarce real data)</h2><p>Every arm sees the same R = {useful['R']} real ROIs "
             f"(the GAN's training set) with flips and crops, {useful['steps']} steps, {useful['seeds']} classifier "
             f"seeds (mean &plusmn; sd); tested on {useful['test_rows']} held-out real ROIs of "
             f"{useful['test_categories']} categories; mixup Beta({useful['mixup_alpha']:g}, {useful['mixup_alpha']:g}); "
             f"S = {useful['S']} synthetic, {_share_text(useful.get('real_share'))}.</p>",
             "<table><tr><th>arm</th><th>margin</th><th>shape</th><th>mean</th><th>&Delta; mean vs real (points)</th></tr>"]
    for arm, result in useful["arms"].items():
        label = USEFULNESS_LABELS.get(arm.split(":")[0], arm) + (f" [{arm.split(':', 1)[1]}]" if ":" in arm else "")
        acc = result["accuracy"]
        parts.append(f"<tr><th>{html.escape(label)}</th><td>{pm(acc['margin'])}</td><td>{pm(acc['shape'])}</td>"
                     f"<td>{pm(acc['mean'])}</td><td>{pm((result['delta_vs_real'] or {}).get('mean'), 100)}</td></tr>")
    parts.append("</table>")
    return parts


def _dig(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def render_html(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The self-contained page: tables, image strips (base64 PNG) and SVG histograms."""
    groups = report["groups"]
    names = list(groups)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for label, path in SUMMARY_ROWS:
        cells = "".join(f"<td>{_fmt(_dig(groups[n], path))}</td>" for n in names)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    inputs = report["inputs"]
    judge = report["judge"]
    judge_val = _dig(judge, ("report", "val_accuracy"))
    judge_line = (f"judge {html.escape(str(judge.get('path') or 'trained for this report'))}; "
                  f"its held-out accuracy when trained: margin {_fmt(_dig(judge_val or {}, ('margin',)))}, "
                  f"shape {_fmt(_dig(judge_val or {}, ('shape',)))}")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>f2m-ray evaluation</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child{text-align:left}"
        "img{image-rendering:pixelated;height:96px}.note{color:#a40}</style></head><body>",
        "<h1>f2m-ray evaluation</h1>",
        f"<p>synthetic <code>{html.escape(str(inputs.get('synthetic', '')))}</code> ({inputs['synthetic_rows']} masses, model "
        f"{html.escape(str(inputs.get('model_id')))}); real <code>{html.escape(str(inputs.get('real', '')))}</code>: "
        f"{inputs['seen_real_rows']} seen, {inputs['heldout_real_rows']} held out. {judge_line}. Features: "
        f"{html.escape(inputs['features'])}. f2m-ray {html.escape(report['tool_version'])}, {report['seconds']} s.</p>",
    ]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in report.get("notes", [])]
    parts += ["<h2>Per category and overall</h2>", f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>",
              "<p>FD: Frechet distance in judge features; compare <em>synthetic vs real half B</em> with the floor "
              "(same sizes, same reference). Memorized: share of synthetic masses at or below percentile "
              f"{report['memorization_threshold']['percentile']:g} of held-out-real-to-seen distances "
              f"(thresholds {report['memorization_threshold']['features']:.4g} in features, "
              f"{report['memorization_threshold']['pixels']:.4g} in pixels).</p>"]
    useful = report.get("usefulness")
    if useful and useful.get("protocol") == "scarce":
        parts += _scarce_html(useful)
    elif useful:
        parts.append(f"<h2>Usefulness</h2><p>Fresh classifiers of the judge's architecture, {useful['steps']} steps "
                     f"each, tested on {useful['test_rows']} held-out real masses; R = {useful['R']}, S = {useful['S']}; "
                     f"{_share_text(useful.get('real_share'))}.</p><table><tr><th>trained on</th><th>rows</th><th>margin</th><th>shape</th><th>mean</th>"
                     "<th>&Delta; mean vs real</th></tr>")
        for name, result in useful["classifiers"].items():
            delta = useful["delta_vs_real"].get(name, {}).get("mean")
            acc = result["accuracy"]
            parts.append(f"<tr><th>{html.escape(name.replace('_', ' + ' if name == 'real_plus_synthetic' else ' '))}"
                         f"</th><td>{result['train_rows']}</td><td>{_fmt(acc['margin'])}</td><td>{_fmt(acc['shape'])}"
                         f"</td><td>{_fmt(acc['mean'])}</td><td>{_fmt(delta) if delta is not None else ''}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Masses: synthetic (top) beside real (bottom)</h2>")
    for category, strips in figures["grids"].items():
        parts.append(f"<h3>{html.escape(category)}</h3>"
                     f"<div>synthetic<br><img alt='synthetic {html.escape(category)}' "
                     f"src='data:image/png;base64,{strips['synthetic']}'></div>"
                     f"<div>real<br><img alt='real {html.escape(category)}' src='data:image/png;base64,{strips['real']}'></div>")
    parts.append("<h2>Distances to the nearest seen real mass</h2>")
    parts += [f"<div>{svg}</div>" for svg in figures["histograms"]]
    parts.append("</body></html>")
    return "\n".join(parts)

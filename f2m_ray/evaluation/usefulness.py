"""Usefulness: does synthetic data help a classifier of real masses? Two protocols.

``classic`` (``usefulness``): fresh classifiers of the judge's architecture trained for the same
number of steps on R seen real, R real + S synthetic, and S synthetic masses, tested on held-out
real masses of the synthetic categories.

``scarce`` (``scarce_usefulness``, the default of `evaluate`): the setting where synthetic data
is meant to matter. The GAN, its feature bank and every classifier have seen the same R real ROIs
(the GAN's training set); arms, each trained with the same steps and standard flips and crops:

    real                  the R real ROIs
    real + mixup          the R real ROIs with pixel-space mixup (Zhang et al. 2018) on top
    real + synthetic[X]   the R real ROIs plus S masses of synthetic dataset X (half of each batch real)

every arm for several classifier seeds (initialisation, batch order, augmentation and the
synthetic subsample), reported as mean and standard deviation on held-out real ROIs nothing
trained on, with the per-seed difference to ``real``.

Classifiers run in this process one after another or as parallel Ray tasks (``run_on_ray``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from f2m_ray.core import metrics
from f2m_ray.config import build_dataclass
from f2m_ray.evaluation.judge import fit, new_judge
from f2m_ray.judge_model import JudgeConfig, JudgeTrainConfig, predict
from f2m_ray.labels import MARGINS, SHAPES

Progress = Callable[[str, int, int], None]  # (stage, done, total)
HEADS = ("margin", "shape", "mean")


USEFULNESS_SETS = ("real", "real_plus_synthetic", "synthetic")
USEFULNESS_LABELS = {"real": "real", "real_plus_synthetic": "real + synthetic", "synthetic": "synthetic",
                     "real_mixup": "real + mixup"}


@dataclass(frozen=True)
class ClassifierJob:
    """One usefulness classifier: which rows it trains on (plain data, so it can travel to a Ray task)."""

    name: str  # one of USEFULNESS_SETS
    real_rows: np.ndarray  # positions in the seen-real images
    synthetic_rows: np.ndarray  # positions in the synthetic images
    judge_config: dict[str, Any]  # asdict(JudgeConfig)
    train_config: dict[str, Any]  # asdict(JudgeTrainConfig) with `steps` set
    real_share: float | None = None  # expected real share of a batch when both parts are non-empty; None: uniform
    arm: str = ""  # the arm it belongs to (scarce protocol), default its name


def mixing_weights(n_real: int, n_synthetic: int, real_share: float | None) -> np.ndarray | None:
    """Per-row sampling weights (real rows first) that give real rows `real_share` of the draws.

    None (uniform over the union) when `real_share` is None or one of the parts is empty.
    """
    if real_share is None or n_real == 0 or n_synthetic == 0:
        return None
    return np.concatenate([np.full(n_real, real_share / n_real), np.full(n_synthetic, (1.0 - real_share) / n_synthetic)])


def train_classifier(job: ClassifierJob, real: tuple[np.ndarray, ...], synthetic: tuple[np.ndarray, ...],
                     test_images: np.ndarray, device: str = "cpu",
                     progress: Callable[[int, int, str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train a fresh judge-architecture classifier on the job's rows; its (margin, shape) predictions on the test images.

    `real` and `synthetic` are (images, margins, shapes) arrays.
    """
    judge_config = build_dataclass(JudgeConfig, job.judge_config)
    train_config = build_dataclass(JudgeTrainConfig, job.train_config)
    images, margins, shapes = (np.concatenate([r[job.real_rows], s[job.synthetic_rows]]) for r, s in zip(real, synthetic))
    model = new_judge(judge_config, train_config.seed).to(device)
    weights = mixing_weights(len(job.real_rows), len(job.synthetic_rows), job.real_share)
    fit(model, images, margins, shapes, train_config, device=device, progress=progress, sample_weights=weights)
    prediction = predict(model, test_images)
    return prediction.margin, prediction.shape


def run_in_process(jobs: list[ClassifierJob], real, synthetic, test_images, device: str,
                   progress: Progress | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The classifiers one after another in this process, with a progress line per classifier."""
    out = []
    for job in jobs:
        rows = len(job.real_rows) + len(job.synthetic_rows)
        stage = f"usefulness: {USEFULNESS_LABELS.get(job.arm or job.name, job.arm or job.name)} ({rows})"
        out.append(train_classifier(job, real, synthetic, test_images, device,
                                    (lambda d, t, _w, stage=stage: progress(stage, d, t)) if progress else None))
    return out


def _classifier_task(job, real, synthetic, test_images, device):
    import torch

    if device == "cpu":
        # One thread per task: tasks run side by side, and small convolutions gain little from
        # more threads (and lose much when the cores are shared).
        torch.set_num_threads(1)
    return train_classifier(job, real, synthetic, test_images, device)


def run_on_ray(jobs: list[ClassifierJob], real, synthetic, test_images, device: str,
               progress: Progress | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The classifiers as parallel Ray tasks (one GPU each where the cluster has GPUs); arrays go to the object store once."""
    import ray

    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0)(_classifier_task)
    real_ref, synthetic_ref, test_ref = ray.put(real), ray.put(synthetic), ray.put(test_images)
    refs = [task.remote(job, real_ref, synthetic_ref, test_ref, "cuda" if use_gpu else "cpu") for job in jobs]
    stage = f"usefulness: {len(jobs)} classifiers as Ray tasks"
    if progress:
        progress(stage, 0, len(refs))
    pending, done = list(refs), 0
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        done += len(finished)
        if progress:
            progress(stage, done, len(refs))
    return ray.get(refs)


Runner = Callable[..., list]


def usefulness(
    judge_config,
    train_config,
    real_seen,  # LabeledArrays of seen real rows (the synthetic categories)
    heldout,  # LabeledArrays of held-out real rows (the synthetic categories)
    synthetic,  # evaluate.SyntheticArrays
    config,  # evaluate.EvaluateConfig
    seed: int,
    progress: Progress | None = None,
    device: str = "cpu",
    runner: Runner = run_in_process,
) -> dict[str, Any]:
    """Accuracy on held-out real of fresh classifiers trained on R real, R real + S synthetic, S synthetic.

    All three train for the same number of steps from the same initialisation, so that the
    200-row set is not under-trained next to the 10,200-row one. The mixed classifier draws its
    batches with `config.usefulness_real_share` real rows in expectation (None: uniformly).
    """
    r = min(config.usefulness_real, len(real_seen))
    s = min(config.usefulness_synthetic, len(synthetic.margin))
    real_rows = metrics.subsample_indices(len(real_seen), r, seed)
    syn_rows = metrics.subsample_indices(len(synthetic.margin), s, seed + 2)
    none = np.zeros(0, dtype=np.int64)
    steps_config = asdict(replace(train_config, steps=config.usefulness_steps, seed=seed))
    jobs = [
        ClassifierJob(name, real_part, syn_part, asdict(judge_config), steps_config, config.usefulness_real_share)
        for name, real_part, syn_part in (("real", real_rows, none), ("real_plus_synthetic", real_rows, syn_rows),
                                          ("synthetic", none, syn_rows))
    ]
    predictions = runner(jobs, (real_seen.images, real_seen.margin, real_seen.shape),
                         (synthetic.images, synthetic.margin, synthetic.shape), heldout.images, device, progress)
    categories = sorted(set(synthetic.category.tolist()))
    heldout_category = np.array([f"{MARGINS[m]}-{SHAPES[s_]}" for m, s_ in zip(heldout.margin, heldout.shape)])
    results: dict[str, Any] = {}
    for job, (margin_pred, shape_pred) in zip(jobs, predictions):
        per_category = {}
        for category in categories:
            rows = heldout_category == category
            per_category[category] = metrics.head_accuracies(margin_pred[rows], shape_pred[rows],
                                                             heldout.margin[rows], heldout.shape[rows])
        results[job.name] = {
            "train_rows": int(len(job.real_rows) + len(job.synthetic_rows)),
            "accuracy": metrics.head_accuracies(margin_pred, shape_pred, heldout.margin, heldout.shape),
            "categories": per_category,
        }
    base = results["real"]["accuracy"]
    deltas = {
        other: {h: results[other]["accuracy"][h] - base[h] for h in ("margin", "shape", "mean")}
        for other in ("real_plus_synthetic", "synthetic")
    }
    return {
        "protocol": "classic",
        "R": r,
        "S": s,
        "steps": config.usefulness_steps,
        "batch_size": train_config.batch_size,
        "real_share": config.usefulness_real_share,
        "test_rows": int(len(heldout)),
        "classifiers": results,
        "delta_vs_real": deltas,
    }


# ---------------------------------------------------------------- the scarce-data protocol

REAL_ARM = "real"
MIXUP_ARM = "real_mixup"
SYNTHETIC_ARM = "real_plus_synthetic"  # + ":" + dataset name when several are compared


def _mean_sd(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": [float(x) for x in v]}


def scarce_usefulness(
    judge_config,
    train_config,
    real_seen,  # LabeledArrays: the R real ROIs every arm sees (the GAN's training set)
    heldout,  # LabeledArrays: real ROIs nothing trained on
    synthetic_sets: dict[str, Any],  # name -> evaluate.SyntheticArrays (or anything with images, margin, shape)
    *,
    real: int,  # R: cap on the real rows (all of `real_seen` when it holds fewer)
    synthetic: int,  # S: synthetic rows per classifier (capped at what a set holds)
    steps: int,
    seeds: int = 3,
    real_share: float | None = 0.5,
    mixup_alpha: float = 0.4,
    seed: int = 0,
    progress: Progress | None = None,
    device: str = "cpu",
    runner: Runner = run_in_process,
) -> dict[str, Any]:
    """Held-out accuracy of each arm over `seeds` classifier seeds: mean, sd and delta to ``real``."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    r = min(real, len(real_seen))
    real_rows = metrics.subsample_indices(len(real_seen), r, seed)
    names = list(synthetic_sets)
    offsets = np.cumsum([0] + [len(synthetic_sets[n].margin) for n in names])
    none = np.zeros(0, dtype=np.int64)
    arm_names = [REAL_ARM, MIXUP_ARM] + [SYNTHETIC_ARM if len(names) == 1 else f"{SYNTHETIC_ARM}:{n}" for n in names]
    jobs: list[ClassifierJob] = []
    for s in range(seeds):
        steps_config = replace(train_config, steps=steps, seed=seed + 101 * s)
        plain = asdict(replace(steps_config, mixup_alpha=0.0))
        jobs.append(ClassifierJob(REAL_ARM, real_rows, none, asdict(judge_config), plain, real_share, REAL_ARM))
        jobs.append(ClassifierJob(MIXUP_ARM, real_rows, none, asdict(judge_config),
                                  asdict(replace(steps_config, mixup_alpha=mixup_alpha)), real_share, MIXUP_ARM))
        for name, arm, offset in zip(names, arm_names[2:], offsets):
            n_syn = len(synthetic_sets[name].margin)
            rows = offset + metrics.subsample_indices(n_syn, min(synthetic, n_syn), seed + 101 * s + 2)
            jobs.append(ClassifierJob("real_plus_synthetic", real_rows, rows, asdict(judge_config), plain, real_share, arm))
    pooled = tuple(np.concatenate([getattr(synthetic_sets[n], key) for n in names]) if names else np.zeros(0)
                   for key in ("images", "margin", "shape"))
    predictions = runner(jobs, (real_seen.images, real_seen.margin, real_seen.shape), pooled, heldout.images, device,
                         progress)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arm_names}
    for job, (margin_pred, shape_pred) in zip(jobs, predictions):
        runs[job.arm].append(metrics.head_accuracies(margin_pred, shape_pred, heldout.margin, heldout.shape))
    arms = {}
    for arm in arm_names:
        accuracy = {h: _mean_sd([run[h] for run in runs[arm]]) for h in HEADS}
        delta = {h: _mean_sd([run[h] - base[h] for run, base in zip(runs[arm], runs[REAL_ARM])]) for h in HEADS}
        arms[arm] = {"accuracy": accuracy, "delta_vs_real": delta if arm != REAL_ARM else None,
                     "synthetic_rows": int(len(next(j for j in jobs if j.arm == arm).synthetic_rows))}
    return {
        "protocol": "scarce",
        "R": r,
        "S": min([synthetic] + [len(synthetic_sets[n].margin) for n in names]),
        "steps": steps,
        "seeds": seeds,
        "batch_size": train_config.batch_size,
        "real_share": real_share,
        "mixup_alpha": mixup_alpha,
        "test_rows": int(len(heldout)),
        "test_categories": len({(m, s_) for m, s_ in zip(heldout.margin.tolist(), heldout.shape.tolist())}),
        "arms": arms,
    }

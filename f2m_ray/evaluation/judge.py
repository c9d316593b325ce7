"""Training the independent judge (`f2m-ray judge train`), and the usefulness classifiers' loop.

The judge measures the GAN and never learns from it: trained on real labeled ROIs only, with
its own architecture and weights (nothing shared with D1/D2, f2m_ray.judge_model), it scores
label fidelity (does a synthetic "spiculated" mass look spiculated?), embeds masses for the
realism, coverage and memorization metrics (``features``: the penultimate layer), and gives
synthesis its label-confidence score. The same architecture, freshly initialised, is the
"usefulness" classifier of `evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from f2m_ray.core.augment import augment
from f2m_ray.core.metrics import head_accuracies
from f2m_ray.errors import F2MError
from f2m_ray.judge_model import Judge, JudgeConfig, JudgeTrainConfig, Progress, predict


# ---------------------------------------------------------------- data


@dataclass
class LabeledArrays:
    """Labeled ROIs as arrays on one machine, sorted by roi_id (Ray Data's order is not stable)."""

    roi_id: np.ndarray  # (N,) str
    images: np.ndarray  # (N, 64, 64) float32 in [-1, 1]
    margin: np.ndarray  # (N,) int64
    shape: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str: "train" / "val"

    def __len__(self) -> int:
        return len(self.roi_id)

    def subset(self, rows: np.ndarray) -> "LabeledArrays":
        return LabeledArrays(self.roi_id[rows], self.images[rows], self.margin[rows], self.shape[rows], self.split[rows])

    def where_split(self, split: str) -> "LabeledArrays":
        return self.subset(np.flatnonzero(self.split == split))


def collect_labeled(dataset) -> LabeledArrays:
    """A Ray Dataset with the readers' row contract -> LabeledArrays (small sets: a few thousand ROIs)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("roi_id", "image", "margin", "shape", "split")}
    for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        for key in parts:
            parts[key].append(np.asarray(batch[key]))
    if not parts["roi_id"]:
        raise F2MError("the labeled data source produced no rows")
    roi_id = np.concatenate(parts["roi_id"]).astype(str)
    order = np.argsort(roi_id, kind="stable")
    return LabeledArrays(
        roi_id=roi_id[order],
        images=np.concatenate(parts["image"]).astype(np.float32)[order],
        margin=np.concatenate(parts["margin"]).astype(np.int64)[order],
        shape=np.concatenate(parts["shape"]).astype(np.int64)[order],
        split=np.concatenate(parts["split"]).astype(str)[order],
    )


# ---------------------------------------------------------------- training


def fit(
    model: nn.Module,
    images: np.ndarray,
    margins: np.ndarray,
    shapes: np.ndarray,
    config: JudgeTrainConfig,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    sample_weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Train `model` (a Judge, or its DDP wrapper) on (N, 64, 64) images with margin and shape ids.

    Every rank draws the same global batches from one seeded generator and trains on its
    slice ``batch[rank::world_size]``, so the batch order (and, up to float reduction order,
    the result) does not depend on the number of workers. Each epoch is a permutation of the
    rows, or, with ``sample_weights`` (N,), N rows drawn with replacement in proportion to them.
    Returns the last epoch's mean loss and the number of steps.
    """
    n = len(images)
    if n < 2 * world_size:  # BatchNorm needs two rows per worker
        raise F2MError(f"{n} training rows are too few for the classifier (need {2 * world_size})")
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total_steps = config.steps if config.steps > 0 else config.epochs * steps_per_epoch
    # The whole set lives on the training device (10,000 masses are 160 MB): no copy per batch.
    images_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None].to(device)  # (N, 1, H, W)
    margins_t = torch.from_numpy(np.asarray(margins, dtype=np.int64)).to(device)
    shapes_t = torch.from_numpy(np.asarray(shapes, dtype=np.int64)).to(device)
    weights_t = None
    if sample_weights is not None:
        weights_t = torch.as_tensor(np.asarray(sample_weights, dtype=np.float64))
        if weights_t.shape != (n,) or not bool(torch.isfinite(weights_t).all()) or bool((weights_t < 0).any()) \
                or float(weights_t.sum()) <= 0:
            raise F2MError(f"sample_weights must be {n} finite non-negative numbers with a positive sum")
    order_generator = torch.Generator().manual_seed(config.seed + 1)
    mixup_rng = np.random.default_rng(config.seed + 3)
    augment_generator = torch.Generator().manual_seed(config.seed + 2 + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    model.train()
    step, epoch, last_loss = 0, 0, float("nan")
    if progress:
        progress(0, total_steps, "steps")
    while step < total_steps:
        if weights_t is None:
            permutation = torch.randperm(n, generator=order_generator)
        else:
            permutation = torch.multinomial(weights_t, n, replacement=True, generator=order_generator)
        losses = []
        for start in range(0, n, config.batch_size):
            if step >= total_steps:
                break
            batch = permutation[start : start + config.batch_size]
            if len(batch) < 2 * world_size:  # a tiny tail batch: every rank skips it alike (BatchNorm needs 2)
                continue
            rows = batch[rank::world_size].to(device)
            x = augment(images_t[rows], config.flips, config.crop_padding, augment_generator)  # (b, 1, H, W)
            if config.mixup_alpha > 0:
                lam = float(mixup_rng.beta(config.mixup_alpha, config.mixup_alpha))
                partner = torch.from_numpy(mixup_rng.permutation(len(rows))).to(device)
                x = lam * x + (1.0 - lam) * x[partner]
            margin_logits, shape_logits = model(x)
            # Both heads weigh the same: the metrics report them side by side.
            loss = F.cross_entropy(margin_logits, margins_t[rows]) + F.cross_entropy(shape_logits, shapes_t[rows])
            if config.mixup_alpha > 0:  # the labels mixed as the pixels: lam * CE(y) + (1 - lam) * CE(y_partner)
                loss = lam * loss + (1.0 - lam) * (F.cross_entropy(margin_logits, margins_t[rows][partner])
                                                   + F.cross_entropy(shape_logits, shapes_t[rows][partner]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            if progress and (step % 20 == 0 or step == total_steps):
                progress(step, total_steps, "steps")
        epoch += 1
        last_loss = float(np.mean(losses)) if losses else last_loss
        if on_epoch:
            on_epoch(epoch, last_loss)
    model.eval()
    return {"loss": last_loss, "steps": step, "epochs": epoch}


def new_judge(config: JudgeConfig, seed: int) -> Judge:
    """A freshly initialised judge; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return Judge(config)


def evaluate_heads(model: Judge, data: LabeledArrays) -> dict[str, float]:
    """Head accuracies of `model` on labeled rows."""
    predictions = predict(model, data.images)
    return head_accuracies(predictions.margin, predictions.shape, data.margin, data.shape)


def majority_baseline(train: LabeledArrays, test: LabeledArrays) -> dict[str, float]:
    """Accuracy of always answering the training set's most common class (what 'chance' means here)."""
    margin = int(np.bincount(train.margin).argmax())
    shape = int(np.bincount(train.shape).argmax())
    return head_accuracies(np.full(len(test), margin), np.full(len(test), shape), test.margin, test.shape)


def train_judge(
    data: LabeledArrays,
    config: JudgeConfig = JudgeConfig(),
    train_config: JudgeTrainConfig = JudgeTrainConfig(),
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Judge, dict[str, Any]]:
    """Train a judge in this process on the rows of split "train"; report accuracy on split "val"."""
    train, val = data.where_split("train"), data.where_split("val")
    if len(train) == 0:
        raise F2MError("no training rows (split 'train') for the judge")
    started = time.perf_counter()
    model = new_judge(config, train_config.seed).to(device)
    result = fit(model, train.images, train.margin, train.shape, train_config, device=device, progress=progress)
    report = judge_report(model, train, val, result, time.perf_counter() - started)
    return model, report


def judge_report(model: Judge, train: LabeledArrays, val: LabeledArrays, result: dict[str, float],
                 seconds: float) -> dict[str, Any]:
    """What the judge's metadata says about it: sizes, held-out and training accuracy, chance."""
    return {
        "train_rows": int(len(train)),
        "val_rows": int(len(val)),
        "steps": int(result["steps"]),
        "epochs": int(result["epochs"]),
        "final_loss": float(result["loss"]),
        "seconds": round(float(seconds), 1),
        "train_accuracy": evaluate_heads(model, train),
        "val_accuracy": evaluate_heads(model, val) if len(val) else None,
        "val_majority_accuracy": majority_baseline(train, val) if len(val) else None,
    }

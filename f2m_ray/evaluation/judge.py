"""The independent judge: a small CNN that tells a mass's margin and shape.

It measures the GAN and never learns from it: trained on real labeled ROIs only, with
its own architecture and weights (nothing shared with D1/D2), it scores label fidelity
(does a synthetic "spiculated" mass look spiculated?), embeds masses for the realism,
coverage and memorization metrics (``features``: the penultimate layer), and gives
synthesis its label-confidence score.

    Judge       (B, 1, 64, 64) in [-1, 1]
                -> stem conv 3x3 (stride 1) -> 4 convs 3x3 stride 2 (64 -> 4), BN + ReLU each
                -> FC -> ReLU -> features (B, feature_dim)
                -> dropout -> margin head (B, n_margins), shape head (B, n_shapes)

The same architecture, freshly initialised, is the "usefulness" classifier of `evaluate`.

Directory format (like f2m_ray.checkpoint, and read with its helpers):

    JUDGE/
      f2m_judge.json   format, version, tool version, judge config, training config,
                       vocabulary, judge id (weights hash), data, held-out report
      judge.pt         the state dict (tensors only; torch.load(weights_only=True))
      train_ids.json   the roi ids of its training rows (evaluate never scores it on them)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from f2m_ray import __version__
from f2m_ray.core.augment import augment
from f2m_ray.checkpoint import model_id, read_format_metadata, read_torch, strip_ddp, write_torch
from f2m_ray.config import build_dataclass
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES, check_vocabulary, vocabulary
from f2m_ray.core.metrics import head_accuracies
from f2m_ray.storage import filesystem, join


FORMAT = "f2m-ray-judge"
FORMAT_VERSION = 1
META_FILE = "f2m_judge.json"
WEIGHTS_FILE = "judge.pt"
TRAIN_IDS_FILE = "train_ids.json"  # the roi ids it learned from: evaluate keeps them out of its held-out set
PREDICT_BATCH = 512  # images per forward pass when scoring

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass(frozen=True)
class JudgeConfig:
    """The judge's network."""

    image_size: int = 64  # input side; four stride-2 convs bring 64 down to 4
    stem_channels: int = 8  # the stride-1 conv at full resolution: margins live in fine edge detail
    channels: tuple[int, ...] = (16, 32, 64, 128)  # stride-2 conv widths: 64 -> 32 -> 16 -> 8 -> 4
    feature_dim: int = 128  # width of the penultimate layer: the embedding of every metric
    # Dropout before the heads only (so `features` never see it); off by default: on 2,000
    # phantoms the judge underfits rather than overfits (train and held-out accuracy agree).
    dropout: float = 0.0
    n_margins: int = len(MARGINS)  # margin head classes (f2m_ray.labels)
    n_shapes: int = len(SHAPES)  # shape head classes

    def __post_init__(self) -> None:
        if self.image_size % 2 ** len(self.channels):
            raise F2MError(f"image_size {self.image_size} must be divisible by 2**{len(self.channels)}")


@dataclass(frozen=True)
class JudgeTrainConfig:
    """Optimisation of the judge (and of the usefulness classifiers of `evaluate`)."""

    epochs: int = 100  # passes over the training rows (ignored when `steps` > 0); 30 leaves it underfit
    steps: int = 0  # > 0: exactly this many optimizer steps, whatever the data size
    batch_size: int = 64  # global batch, split over workers
    lr: float = 1e-3  # AdamW peak learning rate, cosine decay to 0
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    flips: bool = True  # random horizontal and vertical flips (a mass has no orientation)
    crop_padding: int = 4  # random shifts up to this many pixels (reflect padding)
    val_fraction: float = 0.1  # held-out share of patients (same split rule as `train`)
    seed: int = 0  # seeds the split, the initialisation, batch order and augmentation
    # > 0: pixel-space mixup (Zhang et al. 2018) after the flips and crops, lambda ~ Beta(a, a) per
    # batch; a baseline arm of evaluate's usefulness, not used for the judge itself
    mixup_alpha: float = 0.0


class Judge(nn.Module):
    """Two heads on one CNN: (B, 1, H, W) -> margin logits (B, n_margins), shape logits (B, n_shapes)."""

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [
            nn.Conv2d(1, cfg.stem_channels, 3, 1, 1),
            nn.BatchNorm2d(cfg.stem_channels),
            nn.ReLU(),
        ]
        width = cfg.stem_channels
        for out in cfg.channels:
            layers += [nn.Conv2d(width, out, 3, 2, 1), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
        self.convs = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, cfg.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(cfg.dropout)
        self.margin_head = nn.Linear(cfg.feature_dim, cfg.n_margins)
        self.shape_head = nn.Linear(cfg.feature_dim, cfg.n_shapes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding: (B, 1, H, W) or (B, H, W) -> (B, feature_dim)."""
        if images.dim() == 3:
            images = images[:, None]
        return self.embed(self.convs(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(self.features(images))  # (B, feature_dim)
        return self.margin_head(h), self.shape_head(h)


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


@dataclass(frozen=True)
class Predictions:
    margin_probs: np.ndarray  # (N, n_margins)
    shape_probs: np.ndarray  # (N, n_shapes)
    features: np.ndarray  # (N, feature_dim) float32

    @property
    def margin(self) -> np.ndarray:
        return self.margin_probs.argmax(axis=1)

    @property
    def shape(self) -> np.ndarray:
        return self.shape_probs.argmax(axis=1)


def predict(model: Judge, images: np.ndarray, batch_size: int = PREDICT_BATCH,
            progress: Progress | None = None) -> Predictions:
    """Class probabilities and features for (N, 64, 64) images in [-1, 1], in eval mode."""
    model = getattr(model, "module", model)  # a DDP wrapper's inner judge
    model.eval()
    device = next(model.parameters()).device
    margin, shape, features = [], [], []
    if progress:
        progress(0, len(images), "images")
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))  # a writable copy
            h = model.features(x.to(device))  # (B, feature_dim)
            margin.append(torch.softmax(model.margin_head(h), dim=1).cpu().numpy())
            shape.append(torch.softmax(model.shape_head(h), dim=1).cpu().numpy())
            features.append(h.float().cpu().numpy())
            if progress:
                progress(min(start + batch_size, len(images)), len(images), "images")
    if not margin:
        cfg = model.cfg
        return Predictions(np.zeros((0, cfg.n_margins)), np.zeros((0, cfg.n_shapes)), np.zeros((0, cfg.feature_dim), np.float32))
    return Predictions(np.concatenate(margin), np.concatenate(shape), np.concatenate(features))


def label_confidence(model: Judge, images: np.ndarray, margin_ids: np.ndarray, shape_ids: np.ndarray) -> np.ndarray:
    """The judge's probability of each image's target margin *and* shape: p(m | x) * p(s | x), (N,) float32.

    The heads are read as independent given the image, so the joint probability is the
    product; a mass whose target margin and shape both get 0.95 scores about 0.90.
    """
    predictions = predict(model, images)
    rows = np.arange(len(images))
    joint = predictions.margin_probs[rows, np.asarray(margin_ids)] * predictions.shape_probs[rows, np.asarray(shape_ids)]
    return joint.astype(np.float32)


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


# ---------------------------------------------------------------- save and load


@dataclass
class LoadedJudge:
    path: str
    model: Judge  # eval mode, on the CPU
    config: JudgeConfig
    train_config: JudgeTrainConfig
    judge_id: str  # hash of the weights
    report: dict[str, Any] = field(default_factory=dict)
    data: str = ""  # the labeled data it was trained on
    train_ids: set[str] | None = None  # roi ids of its training rows (None: not recorded)


def save_judge(directory: str, model: Judge, train_config: JudgeTrainConfig, report: dict[str, Any],
               data: str = "", train_ids: list[str] | None = None) -> str:
    """Write a judge directory (local or s3://); the metadata file goes last."""
    model = getattr(model, "module", model)
    state = strip_ddp(model.state_dict())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "config": asdict(model.cfg),
        "train_config": asdict(train_config),
        "vocabulary": vocabulary(),
        "judge_id": model_id(state),
        "data": data,
        "report": report,
    }
    fs, root = filesystem(directory)
    try:
        fs.makedirs(root, exist_ok=True)
        write_torch(fs, join(root, WEIGHTS_FILE), state)
        if train_ids is not None:
            with fs.open(join(root, TRAIN_IDS_FILE), "w") as f:
                json.dump(sorted(map(str, train_ids)), f)
        elif fs.exists(join(root, TRAIN_IDS_FILE)):
            fs.rm(join(root, TRAIN_IDS_FILE))  # an overwritten judge must not keep another's ids
        with fs.open(join(root, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    except OSError as err:
        raise F2MError(f"cannot write judge to {directory}: {err.strerror or err}") from None
    return directory


def read_judge_metadata(path: str) -> dict[str, Any]:
    """The judge's JSON metadata (format, version and vocabulary checked), without weights."""
    fs, root = filesystem(path)
    if not fs.exists(root):
        raise F2MError(f"no judge at {path}: the path does not exist")
    meta = read_format_metadata(fs, root, META_FILE, FORMAT, FORMAT_VERSION, "judge")
    check_vocabulary(meta.get("vocabulary", {}), f"judge {path}")
    return meta


def load_judge(path: str) -> LoadedJudge:
    """Load a judge (local or s3://); refuses other formats, versions and vocabularies in one line."""
    meta = read_judge_metadata(path)
    fs, root = filesystem(path)
    try:
        config = build_dataclass(JudgeConfig, meta["config"])
        train_config = build_dataclass(JudgeTrainConfig, meta.get("train_config", {}))
    except (KeyError, TypeError) as err:
        raise F2MError(f"corrupt judge metadata in {path}: bad config ({err})") from None
    state = read_torch(fs, join(root, WEIGHTS_FILE), "judge weights")
    model = Judge(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError):
        raise F2MError(f"judge weights in {path} do not match its own config") from None
    train_ids = None
    if fs.exists(join(root, TRAIN_IDS_FILE)):
        try:
            with fs.open(join(root, TRAIN_IDS_FILE), "r") as f:
                train_ids = set(map(str, json.load(f)))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            raise F2MError(f"corrupt judge file {join(path, TRAIN_IDS_FILE)}: not a JSON list of roi ids") from None
    return LoadedJudge(path, model.eval(), config, train_config, str(meta.get("judge_id", "")),
                       meta.get("report", {}), str(meta.get("data", "")), train_ids)

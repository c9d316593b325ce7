"""The judge's model and its directory format: a small CNN that tells a mass's margin and shape.

What every workflow shares: `evaluate` measures with it, `synthesize` guards with its label
confidence, `judge train` (f2m_ray.evaluation.judge) fits and saves it. The network:

    Judge       (B, 1, 64, 64) in [-1, 1]
                -> stem conv 3x3 (stride 1) -> 4 convs 3x3 stride 2 (64 -> 4), BN + ReLU each
                -> FC -> ReLU -> features (B, feature_dim)
                -> dropout -> margin head (B, n_margins), shape head (B, n_shapes)

Directory format (like f2m_ray.checkpoint, and read with its helpers):

    JUDGE/
      f2m_judge.json   format, version, tool version, judge config, training config,
                       vocabulary, judge id (weights hash), data, held-out report
      judge.pt         the state dict (tensors only; torch.load(weights_only=True))
      train_ids.json   the roi ids of its training rows (evaluate never scores it on them)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from f2m_ray import __version__
from f2m_ray.checkpoint import model_id, read_format_metadata, read_torch, strip_ddp, write_torch
from f2m_ray.config import build_dataclass
from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES, check_vocabulary, vocabulary
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

"""The feature bank: every labeled ROI encoded once with its own labels (paper 2.2, 3.3).

    bank = { (roi_id, margin, shape, split, source, image, v = enc([I, E1(m), E2(s)])) }

Which ROIs: every labeled ROI of the source, train and val splits alike (the paper
draws its seeds from all labeled masses); the ``split`` column records which split
each ROI had in training (same val fraction and seed as the checkpoint's run), so
that synthesis can restrict seeds to the training split (``seed_split="train"``) and
the nearest-seed distance is measured against training ROIs of the category only.

Ray Data maps the labeled rows (f2m_ray.data.readers) through an actor pool whose actors
load the checkpoint once and encode in eval mode. The bank is small (a few thousand
rows of ``feature_dim`` floats), so the driver gathers it, sorts it by roi_id and
writes one Parquet file with its metadata (f2m_ray.schema). Never pickle.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from f2m_ray import __version__
from f2m_ray.errors import F2MError, first_line
from f2m_ray.labels import MARGINS, SHAPES, Category, check_vocabulary, vocabulary
from f2m_ray.schema import (
    BANK_FORMAT,
    BANK_METADATA_KEY,
    BANK_SCHEMA_VERSION,
    bank_schema,
    image_column,
    png_bytes,
    read_json_metadata,
    to_uint8,
    write_table,
)
from f2m_ray.storage import arrow_filesystem, join

BANK_FILE = "feature_bank.parquet"
ENCODE_BATCH = 128  # rows per encoder call
SEED_SPLITS = ("all", "train")


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each one asks Ray for."""

    actors: int  # actor pool size
    torch_threads: int  # intra-op threads per actor (actors x threads = cores)
    num_cpus: float  # Ray CPU request per actor
    num_gpus: float  # Ray GPU request per actor: a share of a GPU when the cluster has GPUs

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def local_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_actors(work_units: int, workers: int | None = None) -> ActorPlan:
    """Actor pool for `work_units` independent units: one per GPU, else cores split evenly.

    Locally Ray's logical CPUs are oversubscribed (f2m_ray.runtime.cluster), so real cores come
    from the OS; on a cluster they come from Ray. Fewer units than cores: fewer actors
    with more threads each, so that no core idles.
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cores = int(resources.get("CPU", 1)) if os.environ.get("RAY_ADDRESS") else local_cores()
    if gpus:
        # A GPU decodes ~50x faster than one core plans and PNG-encodes (measured on an H100:
        # 130k masses/s decode, 1.7k/s per process end to end), so each GPU is shared by
        # single-core actors (fractional num_gpus) that run the CPU stages side by side.
        actors = workers or max(1, min(work_units, max(gpus, cores)))
        share = min(1.0, math.floor(gpus / actors * 10_000) / 10_000)  # Ray counts GPU fractions in 1e-4 units
        return ActorPlan(actors, torch_threads=1, num_cpus=1, num_gpus=share)
    actors = workers or max(1, min(cores, work_units))
    threads = max(1, cores // actors)
    return ActorPlan(actors, torch_threads=threads, num_cpus=float(threads), num_gpus=0)


# The driver's storage settings, handed to Ray workers: workers started before these were
# set (or on other nodes) would otherwise talk to another endpoint or have no credentials.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "F2M_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def worker_runtime_env() -> dict[str, Any] | None:
    """A Ray runtime_env carrying the driver's storage variables (None when none are set)."""
    env_vars = {name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name)}
    return {"env_vars": env_vars} if env_vars else None


def worker_error(err: BaseException) -> str:
    """The innermost cause of a failure raised inside a Ray worker, in one line."""
    cause, seen = err, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[-1] if isinstance(cause, F2MError) and lines else (lines[0] if lines else "")
    return text if isinstance(cause, F2MError) else f"{type(cause).__name__}: {text}"


def prepare_torch(threads: int, device: str) -> None:
    """Per-actor torch settings: thread count and deterministic kernels."""
    import torch

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning may pick other kernels per run
        torch.backends.cudnn.deterministic = True


# ---------------------------------------------------------------- the bank


@dataclass(frozen=True)
class FeatureBank:
    """A loaded feature bank; rows sorted by roi_id."""

    path: str
    roi_id: np.ndarray  # (N,) str
    margin: np.ndarray  # (N,) int64 margin ids
    shape: np.ndarray  # (N,) int64 shape ids
    split: np.ndarray  # (N,) str: "train" / "val"
    source: np.ndarray  # (N,) str
    features: np.ndarray  # (N, D) float32
    model_id: str  # the generator that encoded it
    bank_id: str  # hash of (roi ids, labels, features)
    vocabulary: dict[str, list[str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    images: list[bytes] | None = None  # (N,) PNG bytes when loaded with_images

    def __len__(self) -> int:
        return len(self.roi_id)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def pool(self, category: Category, seed_split: str = "all") -> np.ndarray:
        """Row positions of the category's seeds, in roi_id order: (P,) int64."""
        rows = self.seed_rows(seed_split)
        return rows[(self.margin[rows] == category.margin_id) & (self.shape[rows] == category.shape_id)]

    def seed_rows(self, seed_split: str = "all") -> np.ndarray:
        """Row positions of every ROI of the seed split, all categories: (R,) int64."""
        if seed_split not in SEED_SPLITS:
            raise F2MError(f"unknown seed split {seed_split!r}; valid: {', '.join(SEED_SPLITS)}")
        return self.train_rows() if seed_split == "train" else np.arange(len(self.roi_id), dtype=np.int64)

    def train_rows(self) -> np.ndarray:
        """Row positions of the training split: (T,) int64."""
        return np.flatnonzero(self.split == "train").astype(np.int64)

    def row_of(self, roi_id: str) -> int:
        position = int(np.searchsorted(self.roi_id, roi_id))
        if position >= len(self.roi_id) or self.roi_id[position] != roi_id:
            examples = ", ".join(map(str, self.roi_id[:3]))
            raise F2MError(f"unknown seed id {roi_id!r}: the bank {self.path} has {len(self)} ROIs (e.g. {examples})")
        return position

    def counts(self) -> dict[str, int]:
        """Rows per category name."""
        out: dict[str, int] = {}
        for m, s in zip(self.margin, self.shape):
            name = f"{MARGINS[m]}-{SHAPES[s]}"
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))


def bank_hash(roi_id: np.ndarray, margin: np.ndarray, shape: np.ndarray, features: np.ndarray) -> str:
    """What a synthetic sample depends on from the bank: ids, labels and features, in order."""
    digest = hashlib.sha256()
    digest.update("\0".join(map(str, roi_id)).encode())
    digest.update(np.ascontiguousarray(margin, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def default_bank_path(checkpoint_path: str) -> str:
    """Where `f2m-ray train` and `f2m-ray encode` put the bank: beside the checkpoint."""
    return join(checkpoint_path, BANK_FILE)


class _Encoder:
    """Ray Data actor: loads the generator once, encodes batches of labeled rows."""

    def __init__(self, checkpoint: str, torch_threads: int, device: str):
        from f2m_ray.checkpoint import load_generator

        prepare_torch(torch_threads, device)
        self.device = device
        self.generator, _ = load_generator(checkpoint, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = np.array(batch["image"], dtype=np.float32)  # (B, 64, 64) in [-1, 1]; a writable copy for torch
        with torch.inference_mode():
            features = self.generator.encode(
                torch.from_numpy(images[:, None]).to(self.device),  # (B, 1, 64, 64)
                torch.from_numpy(np.array(batch["margin"], dtype=np.int64)).to(self.device),  # writable copies
                torch.from_numpy(np.array(batch["shape"], dtype=np.int64)).to(self.device),
            )  # (B, D)
        pixels = to_uint8(images)
        return {
            "roi_id": batch["roi_id"],
            "margin": batch["margin"],
            "shape": batch["shape"],
            "split": batch["split"],
            "patient_id": batch["patient_id"],
            "source": batch["source"],
            "png": np.array([png_bytes(p) for p in pixels], dtype=object),
            "feature": features.float().cpu().numpy(),
        }


def build_feature_bank(
    checkpoint: str,
    data: str = "phantom",
    out: str | None = None,
    fmt: str = "auto",
    seed: int = 0,
    val_fraction: float | None = None,
    workers: int | None = None,
    stored_checkpoint: str | None = None,
) -> str:
    """Encode every labeled ROI of `data` with the checkpoint's generator; write the bank.

    `seed` and `val_fraction` (default: the checkpoint's) must be those of training so
    that the stored split matches. Returns the bank's path (default: beside the checkpoint).
    The bank names its checkpoint (`synthesize --bank` alone finds the model through it):
    its path, or `stored_checkpoint` (``pretrained:NAME`` for a shipped model).
    """
    import ray

    from f2m_ray.checkpoint import find_checkpoint, read_metadata
    from f2m_ray.data.readers import read_labeled
    from f2m_ray.runtime.cluster import ensure_ray

    from f2m_ray.storage import is_remote

    path = find_checkpoint(checkpoint)
    if not is_remote(path):
        path = os.path.abspath(path)  # the encoder actors may run in another working directory
    meta = read_metadata(path)
    if val_fraction is None:
        val_fraction = float(meta["preset"].get("train", {}).get("val_fraction", 0.1))
    out = out or default_bank_path(path)
    ensure_ray()
    source = read_labeled(data, fmt, val_fraction, seed)
    actors = plan_actors(work_units=max(1, source.rows // ENCODE_BATCH), workers=workers or 1)
    encoded = source.dataset.map_batches(
        _Encoder,
        fn_constructor_kwargs={"checkpoint": path, "torch_threads": actors.torch_threads, "device": actors.device},
        batch_size=ENCODE_BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors.actors),
        num_cpus=actors.num_cpus,
        num_gpus=actors.num_gpus,
        runtime_env=worker_runtime_env(),
    )
    parts: dict[str, list] = {k: [] for k in ("roi_id", "margin", "shape", "split", "patient_id", "source", "png", "feature")}
    try:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for key in parts:
                parts[key].append(batch[key])
    except (F2MError, KeyboardInterrupt):
        raise
    except Exception as err:  # Ray wraps what failed in a worker
        raise F2MError(f"encoding failed: {worker_error(err)}") from None
    if not parts["roi_id"]:
        raise F2MError(f"no labeled ROIs in {data}: the feature bank would be empty")
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    return write_feature_bank(
        out,
        roi_id=columns["roi_id"].astype(str),
        margin=columns["margin"].astype(np.int64),
        shape=columns["shape"].astype(np.int64),
        split=columns["split"].astype(str),
        patient_id=columns["patient_id"].astype(str),
        source=columns["source"].astype(str),
        png=list(columns["png"]),
        features=np.asarray(columns["feature"], dtype=np.float32),
        model_id=str(meta["model_id"]),
        info={
            "checkpoint": stored_checkpoint or path,
            "preset": meta["preset"]["name"],
            "data": data,
            "data_description": source.description,
            "dropped": source.dropped,
            "seed": seed,
            "val_fraction": val_fraction,
        },
    )


def write_feature_bank(
    out: str,
    roi_id: np.ndarray,
    margin: np.ndarray,
    shape: np.ndarray,
    split: np.ndarray,
    patient_id: np.ndarray,
    source: np.ndarray,
    png: list[bytes],
    features: np.ndarray,
    model_id: str,
    info: dict[str, Any] | None = None,
) -> str:
    """Sort by roi_id, check, and write one bank file with its metadata."""
    import json

    import pyarrow as pa

    order = np.argsort(roi_id, kind="stable")
    roi_id, margin, shape, split = roi_id[order], margin[order], shape[order], split[order]
    patient_id, source, features = patient_id[order], source[order], features[order]
    png = [png[i] for i in order]
    duplicated = roi_id[1:][roi_id[1:] == roi_id[:-1]]
    if len(duplicated):
        raise F2MError(f"duplicate roi ids in the labeled data (e.g. {duplicated[0]!r}): ids must be unique")
    if not np.all(np.isfinite(features)):
        raise F2MError("the encoder produced non-finite features: the checkpoint is broken")
    feature_dim = int(features.shape[1])
    categories = [f"{MARGINS[m]}-{SHAPES[s]}" for m, s in zip(margin, shape)]
    bank_id = bank_hash(roi_id, margin, shape, features)
    counts: dict[str, int] = {}
    for name in categories:
        counts[name] = counts.get(name, 0) + 1
    metadata = {
        "format": BANK_FORMAT,
        "schema_version": BANK_SCHEMA_VERSION,
        "tool_version": __version__,
        "model_id": model_id,
        "bank_id": bank_id,
        "feature_dim": feature_dim,
        "rows": int(len(roi_id)),
        "vocabulary": vocabulary(),
        "counts": dict(sorted(counts.items())),
        "splits": {s: int(np.sum(split == s)) for s in sorted(set(split.tolist()))},
        **(info or {}),
    }
    schema = bank_schema(feature_dim).with_metadata({BANK_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    table = pa.Table.from_arrays(
        [
            pa.array(roi_id.tolist(), pa.string()),
            pa.array([MARGINS[m] for m in margin], pa.string()),
            pa.array([SHAPES[s] for s in shape], pa.string()),
            pa.array(categories, pa.string()),
            pa.array(margin, pa.int64()),
            pa.array(shape, pa.int64()),
            pa.array(split.tolist(), pa.string()),
            pa.array(patient_id.tolist(), pa.string()),
            pa.array(source.tolist(), pa.string()),
            image_column(png, [f"{r}.png" for r in roi_id]),
            pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), feature_dim),
        ],
        schema=schema,
    )
    try:
        write_table(table, out)
    except OSError as err:
        raise F2MError(f"cannot write feature bank to {out}: {err.strerror or err}") from None
    return out


def load_feature_bank(path: str, with_images: bool = False) -> FeatureBank:
    """Read a bank (local or s3://); refuses foreign files and other vocabularies."""
    import pyarrow.parquet as pq

    fs, inner = arrow_filesystem(path)
    columns = ["roi_id", "margin_id", "shape_id", "split", "source", "feature"] + (["image"] if with_images else [])
    try:
        with fs.open_input_file(inner) as f:
            table = pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise F2MError(f"no feature bank at {path} (run `f2m-ray encode --model CKPT` first)") from None
    except OSError as err:
        raise F2MError(f"cannot read feature bank {path}: {first_line(err)}") from None
    except Exception as err:  # pyarrow raises ArrowInvalid for non-Parquet files
        raise F2MError(f"not a feature bank: {path} ({first_line(err)})") from None
    meta = read_json_metadata(table.schema, BANK_METADATA_KEY, f"feature bank {path}")
    if meta.get("format") != BANK_FORMAT:
        raise F2MError(f"not a feature bank: {path} has format {meta.get('format')!r}")
    if meta.get("schema_version") != BANK_SCHEMA_VERSION:
        raise F2MError(
            f"feature bank schema version {meta.get('schema_version')} in {path} is not supported "
            f"(this f2m-ray {__version__} reads version {BANK_SCHEMA_VERSION})"
        )
    check_vocabulary(meta.get("vocabulary", {}), f"feature bank {path}")
    feature_column = table.column("feature").combine_chunks()
    dim = feature_column.type.list_size
    features = feature_column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    roi_id = np.array(table.column("roi_id").to_pylist(), dtype=str)
    margin = table.column("margin_id").to_numpy().astype(np.int64)
    shape = table.column("shape_id").to_numpy().astype(np.int64)
    images = None
    if with_images:
        images = table.column("image").combine_chunks().field("bytes").to_pylist()
    return FeatureBank(
        path=path,
        roi_id=roi_id,
        margin=margin,
        shape=shape,
        split=np.array(table.column("split").to_pylist(), dtype=str),
        source=np.array(table.column("source").to_pylist(), dtype=str),
        features=features,
        model_id=str(meta.get("model_id")),
        bank_id=bank_hash(roi_id, margin, shape, features),
        vocabulary=meta["vocabulary"],
        metadata=meta,
        images=images,
    )

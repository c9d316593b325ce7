"""`f2m-ray encode`: every labeled ROI through the encoder with its own labels, into a feature bank.

Ray Data maps the labeled rows (f2m_ray.data.readers) through an actor pool whose actors
load the checkpoint once and encode in eval mode; the driver gathers the (small) bank and
writes it with f2m_ray.bank.write_feature_bank.
"""

from __future__ import annotations

import os

import numpy as np

from f2m_ray.bank import default_bank_path, write_feature_bank
from f2m_ray.checkpoint import find_checkpoint, load_generator
from f2m_ray.errors import F2MError
from f2m_ray.runtime.actors import ResourceWatch, plan_actors, prepare_torch
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.runtime.errors import worker_error
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import png_bytes
from f2m_ray.storage import is_remote
from f2m_ray.data.readers import read_labeled
from f2m_ray.runtime.cluster import ensure_ray

ENCODE_BATCH = 128  # rows per encoder call


class _Encoder:
    """Ray Data actor: loads the generator once, encodes batches of labeled rows."""

    def __init__(self, checkpoint: str, torch_threads: int, device: str):
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

    path = find_checkpoint(checkpoint)
    if not is_remote(path):
        path = os.path.abspath(path)  # the encoder actors may run in another working directory
    meta = load_generator(path)[1]  # the weights too: a corrupt model.pt is one line here, not in an actor
    if val_fraction is None:
        val_fraction = float(meta["preset"].get("train", {}).get("val_fraction", 0.1))
    out = out or default_bank_path(path)
    ensure_ray()
    source = read_labeled(data, fmt, val_fraction, seed)
    # The actors read what Ray Data tasks decode: on a cluster they leave those tasks a CPU.
    actors = plan_actors(work_units=max(1, source.rows // ENCODE_BATCH), workers=workers or 1, upstream_tasks=True)
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
        with ResourceWatch("encoding", gpus=actors.num_gpus) as watch:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                watch.heard()
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

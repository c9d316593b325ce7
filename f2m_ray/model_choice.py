"""Which model a command uses: the one named, else the newest finished run, else the shipped one.

``f2m_ray.checkpoint`` is the checkpoint format; this module chooses among checkpoints. A run is
finished when its latest checkpoint has a feature bank beside it (``train`` builds it last).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from f2m_ray.bank import default_bank_path
from f2m_ray.checkpoint import find_checkpoint
from f2m_ray.errors import F2MError
from f2m_ray.pretrained import MODEL_CARD, SHIPPED_MODEL, default_storage, shipped_model
from f2m_ray.storage import filesystem, is_remote, join


@dataclass(frozen=True)
class ModelChoice:
    checkpoint: str  # a checkpoint directory (or a run folder: its latest checkpoint)
    why: str  # how it was chosen, for the line that names it


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return 0.0


def newest_run(storage: str) -> str | None:
    """The latest checkpoint of the newest finished run under `storage`, or None."""
    fs, root = filesystem(storage)
    try:
        if not fs.isdir(root):
            return None
        entries = fs.ls(root, detail=False)
    except (OSError, PermissionError):
        return None
    found: list[tuple[float, str]] = []
    for entry in entries:
        run = join(storage, entry.rstrip("/").rsplit("/", 1)[-1])
        try:
            checkpoint = find_checkpoint(run)
        except F2MError:
            continue  # not a run folder, or a run with no checkpoint yet
        bank = default_bank_path(checkpoint)
        bank_inner = filesystem(bank)[1]
        if fs.exists(bank_inner):
            found.append((_modified(fs, bank_inner), checkpoint))
    return max(found)[1] if found else None


def default_model(storage: str | None = None) -> ModelChoice:
    """The model a command uses when none is named (see the module docstring)."""
    where = default_storage(storage)
    run = newest_run(where)
    if run is not None:
        return ModelChoice(run, f"the newest finished run under {where}")
    try:
        return ModelChoice(shipped_model(), f"the shipped model {SHIPPED_MODEL}: no finished run under {where}")
    except F2MError:
        raise F2MError(f"no finished run under {where} and no shipped model: name one with --model CKPT, "
                       f"or train one with `f2m-ray train --storage {where}`") from None


def model_card(checkpoint: str) -> str | None:
    """The MODEL_CARD.md in a checkpoint directory or its run folder, if there is one."""
    if is_remote(checkpoint):
        candidates = [join(checkpoint, MODEL_CARD)]
    else:
        candidates = [os.path.join(checkpoint, MODEL_CARD), os.path.join(os.path.dirname(checkpoint.rstrip("/")), MODEL_CARD)]
    for path in candidates:
        fs, inner = filesystem(path)
        try:
            with fs.open(inner, "r", encoding="utf-8") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, OSError):
            continue
    return None

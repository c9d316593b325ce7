"""Which model a command uses when none is named: the newest finished run, else the shipped one.

The package ships one model, ``small-phantom`` (``f2m_ray/pretrained/small-phantom/``): a
synthesis-only export of a ``small`` generator trained on procedural phantoms by
``jobs/build_pretrained.py``, with its feature bank and ``MODEL_CARD.md`` (how it was made,
what it measures). It is an ordinary checkpoint directory, loaded the same way (JSON,
``torch.load(weights_only=True)``, Parquet): nothing in it runs code.

Importing this module is cheap (the command line reads its defaults at start-up).

A finished run is a run folder under the storage (``--storage``, ``$F2M_STORAGE``, or
``./f2m-runs``, as for ``f2m-ray train``) whose latest checkpoint has its feature bank beside
it, which `train` writes last. The newest is the one whose bank was written last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from f2m_ray.errors import F2MError

DEFAULT_OUT = "f2m-synthetic"  # where `synthesize` writes without --out, relative to the working directory
STORAGE_ENV = "F2M_STORAGE"
DEFAULT_STORAGE = "f2m-runs"
PRETRAINED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
SHIPPED_MODEL = "small-phantom"
MODEL_CARD = "MODEL_CARD.md"
PRETRAINED_PREFIX = "pretrained"  # `--model pretrained` or `--model pretrained:NAME`
BANK_FILE = "feature_bank.parquet"  # as f2m_ray.bank.BANK_FILE (that module imports Ray)


@dataclass(frozen=True)
class ModelChoice:
    checkpoint: str  # a checkpoint directory (or a run folder: its latest checkpoint)
    why: str  # how it was chosen, for the line that names it


def default_storage(storage: str | None = None) -> str:
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def shipped_models() -> list[str]:
    if not os.path.isdir(PRETRAINED_ROOT):
        return []
    return sorted(n for n in os.listdir(PRETRAINED_ROOT) if os.path.isfile(os.path.join(PRETRAINED_ROOT, n, BANK_FILE)))


def shipped_model(name: str = SHIPPED_MODEL) -> str:
    """The directory of a model shipped in the package."""
    path = os.path.join(PRETRAINED_ROOT, name)
    if not os.path.isfile(os.path.join(path, BANK_FILE)):
        have = shipped_models()
        raise F2MError(f"no shipped model {name!r} in this installation"
                       + (f" (shipped: {', '.join(have)})" if have else " (it ships none: train one with `f2m-ray train`)"))
    return path


def named_model(model: str) -> str:
    """`model` itself, or the shipped model it names (``pretrained``, ``pretrained:NAME``)."""
    if model == PRETRAINED_PREFIX:
        return shipped_model()
    if model.startswith(PRETRAINED_PREFIX + ":"):
        return shipped_model(model.split(":", 1)[1])
    return model


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return 0.0


def newest_run(storage: str) -> str | None:
    """The latest checkpoint of the newest finished run under `storage`, or None."""
    from f2m_ray.checkpoint import find_checkpoint
    from f2m_ray.storage import filesystem, join

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
        bank = join(checkpoint, BANK_FILE)
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
    from f2m_ray.storage import filesystem, is_remote, join
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

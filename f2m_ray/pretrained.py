"""The model shipped in the package, and the defaults that name models and folders.

The package ships one model, ``small-phantom`` (``f2m_ray/pretrained/small-phantom/``): a
synthesis-only export of a ``small`` generator trained on procedural phantoms by
``jobs/build_pretrained.py``, with its feature bank and ``MODEL_CARD.md`` (how it was made,
what it measures). It is an ordinary checkpoint directory, loaded the same way (JSON,
``torch.load(weights_only=True)``, Parquet): nothing in it runs code.

Importing this module is cheap (the command line reads its defaults at start-up).

Which model a command uses when none is named (the newest finished run under the storage,
else the shipped one) is ``f2m_ray.model_choice.default_model``.
"""

from __future__ import annotations

import os

from f2m_ray.errors import F2MError
from f2m_ray.bank import BANK_FILE, default_bank_path

DEFAULT_OUT = "f2m-synthetic"  # where `synthesize` writes without --out, relative to the working directory
STORAGE_ENV = "F2M_STORAGE"
DEFAULT_STORAGE = "f2m-runs"
PRETRAINED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
SHIPPED_MODEL = "small-phantom"
MODEL_CARD = "MODEL_CARD.md"
PRETRAINED_PREFIX = "pretrained"  # `--model pretrained` or `--model pretrained:NAME`


def default_storage(storage: str | None = None) -> str:
    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def shipped_models() -> list[str]:
    if not os.path.isdir(PRETRAINED_ROOT):
        return []
    return sorted(n for n in os.listdir(PRETRAINED_ROOT) if os.path.isfile(os.path.join(PRETRAINED_ROOT, n, BANK_FILE)))


def shipped_model(name: str = SHIPPED_MODEL) -> str:
    """The directory of a model shipped in the package."""
    path = os.path.join(PRETRAINED_ROOT, name)
    if not os.path.isfile(default_bank_path(path)):
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

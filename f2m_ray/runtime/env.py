"""What every Ray worker inherits from the driver: the storage settings.

A worker process started before the driver set these (or on another node) would otherwise
talk to another S3 endpoint or have no credentials. Every Ray entry point passes them the same
way, as a runtime_env (``worker_runtime_env``; Ray Train: ``worker_env`` in its RunConfig).
"""

from __future__ import annotations

import os
from typing import Any

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


def worker_env() -> dict[str, str]:
    """The storage variables set on the driver."""
    return {name: os.environ[name] for name in STORAGE_ENV if os.environ.get(name)}


def worker_runtime_env() -> dict[str, Any] | None:
    """A Ray runtime_env carrying the driver's storage variables (None when none are set)."""
    env_vars = worker_env()
    return {"env_vars": env_vars} if env_vars else None

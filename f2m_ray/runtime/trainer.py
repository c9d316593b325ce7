"""Ray Train settings shared by GAN and judge training: resources per worker, threads, storage."""

from __future__ import annotations

import os
from typing import Any

from f2m_ray.errors import F2MError
from f2m_ray.runtime.actors import local_cores
from f2m_ray.storage import arrow_filesystem, is_remote


def cpu_per_worker(use_gpu: bool) -> float:
    # One logical slot each: with local Ray's oversubscribed slots (2 per core) there are
    # slots left for Ray Data, and on a GPU node the worker needs one core to feed its GPU.
    return 1.0


def threads_per_worker(workers_on_node: int) -> int:
    """Torch threads for one CPU worker: the node's cores shared out, never oversubscribed."""
    return max(1, local_cores() // max(1, workers_on_node))


def check_resources(workers: int, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse (one line) a worker count the cluster cannot hold, instead of waiting forever."""
    if use_gpu:
        gpus = int(resources.get("GPU", 0))
        if workers > gpus:
            raise F2MError(f"--workers {workers} needs {workers} GPUs but the Ray cluster has {gpus}")
    cpus = resources.get("CPU", 0)
    needed = workers * cpu_per_worker(use_gpu)
    if needed > cpus:
        most = int(cpus // cpu_per_worker(use_gpu))
        raise F2MError(
            f"--workers {workers} needs {needed:g} CPU slots but the Ray cluster has {cpus:g} "
            f"(use --workers {most} or fewer)"
        )


def storage_args(storage: str) -> dict[str, Any]:
    """Ray Train's RunConfig storage arguments for a local folder or an s3:// URL."""
    if is_remote(storage):
        pa_fs, inner = arrow_filesystem(storage)
        return {"storage_path": inner, "storage_filesystem": pa_fs}
    return {"storage_path": os.path.abspath(storage)}

"""Actor plans: how many model actors, and what each asks Ray for (encode, synthesize)."""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass

from f2m_ray.errors import F2MError


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


def check_workers(workers: int | None, resources: dict[str, float] | None = None) -> None:
    """Refuse (one line) an actor count the cluster cannot hold, instead of waiting for it forever."""
    if workers is None:
        return
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 0))
    if workers > slots:
        raise F2MError(f"--workers {workers} needs {workers} CPU slots but the Ray cluster has {slots} "
                       f"(use --workers {slots} or fewer)")


def plan_actors(work_units: int, workers: int | None = None) -> ActorPlan:
    """Actor pool for `work_units` independent units: one per GPU, else cores split evenly.

    Locally Ray's logical CPUs are oversubscribed (f2m_ray.runtime.cluster), so real cores come
    from the OS; on a cluster they come from Ray. Fewer units than cores: fewer actors
    with more threads each, so that no core idles.
    """
    import ray

    resources = ray.cluster_resources()
    check_workers(workers, resources)
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


def prepare_torch(threads: int, device: str) -> None:
    """Per-actor torch settings: thread count, deterministic kernels, an allocator that keeps big blocks."""
    import torch

    torch.set_num_threads(threads)
    keep_large_allocations()
    if device == "cuda":
        torch.backends.cudnn.benchmark = False  # autotuning may pick other kernels per run
        torch.backends.cudnn.deterministic = True


MALLOC_KEEP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_large_allocations() -> bool:
    """Let glibc reuse freed blocks of up to 1 GiB instead of returning them to the OS.

    A decode batch allocates activations of tens of MB per layer. By default glibc serves
    each from a fresh mmap and unmaps it on free, so every batch pays the page faults and
    zeroing of all of them again: 30% of a paper-size decode on CPU (5.6 instead of 8.0 ms
    per mass, one thread). The memory kept is what one batch needs at its peak. Returns
    False where the C library is not glibc (macOS, musl): nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES))
    except (OSError, AttributeError):
        return False

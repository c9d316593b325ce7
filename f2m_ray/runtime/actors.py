"""Actor plans: how many model actors, and what each asks Ray for (encode, synthesize)."""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
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


def largest_node_cpus() -> int:
    """CPUs of the cluster's largest live node (an actor cannot span nodes)."""
    import ray

    return int(max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


def plan_actors(work_units: int, workers: int | None = None, upstream_tasks: bool = False) -> ActorPlan:
    """Actor pool for `work_units` independent units: one per GPU, else cores split evenly.

    Locally Ray's logical CPUs are oversubscribed (f2m_ray.runtime.cluster), so real cores come
    from the OS; on a cluster they come from Ray. Fewer units than cores: fewer actors
    with more threads each, so that no core idles; but an actor lives on one node, so it
    never asks for more CPUs than the largest node has. With `upstream_tasks` (a pipeline whose
    actors consume what Ray Data tasks read), the actors leave one of a cluster's CPUs to those
    tasks: actors holding every CPU would wait forever for input that no task can be scheduled
    to read.
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
    if os.environ.get("RAY_ADDRESS"):
        threads = min(threads, max(1, largest_node_cpus()))
    num_cpus = float(threads)
    if upstream_tasks and os.environ.get("RAY_ADDRESS") and actors * num_cpus > cores - 1:
        num_cpus = max(1.0, math.floor((cores - 1) / actors * 100) / 100)  # Ray counts CPU fractions in 1e-2 units here
    return ActorPlan(actors, torch_threads=threads, num_cpus=num_cpus, num_gpus=0)


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


RESOURCE_WAIT_ENV = "F2M_RESOURCE_WAIT_S"
RESOURCE_WAIT_SECONDS = 300.0


class ResourceWatch:
    """Ends, in one line, a wait for Ray resources that do not come, instead of waiting forever.

    Ray queues an actor or task that asks for more than is free for as long as it takes (on an
    autoscaling cluster new nodes may come). A command that has heard nothing from its workers
    for F2M_RESOURCE_WAIT_S seconds (300) while the cluster has no CPU free (or fewer GPUs than
    one worker asks for) stops: the thread that entered the watch gets a `ResourceWaitExpired`
    raised into it (a KeyboardInterrupt, so that no `except Exception` on the way swallows it),
    turned into an F2MError naming what it waited for and what the cluster holds. Use as a
    context manager around the loop that receives the workers' results; call `heard()` for each.
    """

    def __init__(self, what: str, gpus: float = 0.0, seconds: float | None = None):
        self.what, self.gpus = what, gpus
        self.seconds = float(os.environ.get(RESOURCE_WAIT_ENV, RESOURCE_WAIT_SECONDS)) if seconds is None else seconds
        self.message: str | None = None
        self._last = time.monotonic()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="f2m-resource-watch", daemon=True)

    def heard(self) -> None:
        self._last = time.monotonic()

    def _short(self) -> str | None:
        """What the cluster lacks for one more worker, or None if it has room."""
        import ray

        free, total = ray.available_resources(), ray.cluster_resources()
        if self.gpus and free.get("GPU", 0.0) < self.gpus:
            return f"{free.get('GPU', 0.0):g} of {total.get('GPU', 0.0):g} GPUs free"
        if free.get("CPU", 0.0) < 1.0:
            return f"{free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} CPUs free"
        return None

    def _watch(self) -> None:
        while not self._done.wait(1.0):
            if time.monotonic() - self._last < self.seconds:
                continue
            short = self._short()
            if short is None:  # slow, not starved: keep waiting
                self.heard()
                continue
            self.message = (f"{self.what}: nothing from the workers for {self.seconds:.0f} s while the Ray cluster "
                            f"has {short}; other work holds them (see `ray status`), or the cluster is too small. "
                            f"Stopped waiting ({RESOURCE_WAIT_ENV} sets how long)")
            with self._lock:  # not once the watched block has ended
                if not self._done.is_set():
                    # Raised in the waiting thread at its next Python instruction, whatever signal
                    # handlers Ray or a test runner installed (which a simulated Ctrl-C would go through).
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._waiter),
                                                               ctypes.py_object(ResourceWaitExpired))
            return

    def __enter__(self) -> "ResourceWatch":
        self._waiter = threading.get_ident()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._lock:
            self._done.set()
        self._thread.join()
        if self.message and exc_type is not None and issubclass(exc_type, ResourceWaitExpired):
            raise F2MError(self.message) from None


class ResourceWaitExpired(KeyboardInterrupt):
    """What a ResourceWatch raises into the thread it watches when the wait is given up."""

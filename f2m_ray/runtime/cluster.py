"""Starting or joining Ray: one place for the settings that make local Ray work.

On a cluster (``RAY_ADDRESS`` set, or inside ``ray job submit``) we join it and say which
one. Otherwise we start an embedded Ray of our own (``address="local"``: whatever a dead or
live ``ray start`` cluster left behind on this machine is ignored), with logical CPU
oversubscription: Ray Data's operators and Ray Train's workers each hold a CPU slot, and with
one slot per core a 2-core laptop deadlocks before the first batch. Torch threads are set per
worker, so the real CPU use stays at the number of cores.

On the command line, starting Ray also filters the console (f2m_ray.runtime.console).
"""

from __future__ import annotations

import logging
import os
import sys

from f2m_ray.runtime.console import filter_native_stderr
from f2m_ray.runtime.stop import reinstall

LOCAL_CPU_SLOTS_MIN = 4  # logical CPU slots for embedded Ray, at least
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB: enough for blocks of 64x64 images, small for laptops


def _quiet_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")



def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = False,
               report=None) -> None:
    """Join the cluster in RAY_ADDRESS, or start embedded local Ray with settings that work on 2 cores.

    Every command prints its own progress, and what fails in a worker comes back as an exception
    (one line, f2m_ray.runtime.errors), so by default the workers' own log lines (Ray Train's
    bookkeeping, Ray Data's banners and deprecation notes, remote tracebacks, the state-API
    warnings of embedded Ray without a dashboard) stay in Ray's session log files instead of
    the console, on a cluster too, where the console is a job's log. ``log_to_driver=True``
    streams them.
    Joining a cluster prints one line naming it (through `report`, default stderr).
    """
    _quiet_defaults()
    import ray

    if ray.is_initialized():
        return
    filter_native_stderr()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(logging_level=logging.WARNING, log_to_driver=log_to_driver)
        reinstall()
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        line = (f"joined the Ray cluster at {address}: {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
                f"{resources.get('GPU', 0):g} GPU")
        (report or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        return
    slots = num_cpus or max(LOCAL_CPU_SLOTS_MIN, 2 * (os.cpu_count() or 1))
    # Ray Train's preemption watcher polls for cloud nodes being drained: one process more and nothing
    # to watch on a single machine (the processes of embedded Ray inherit this environment).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",  # never a cluster that `ray start` left behind
        log_to_driver=log_to_driver,
        num_cpus=slots,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
    )
    reinstall()  # Ray's core worker took SIGTERM over with a native stack dump: the command line's own again


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())

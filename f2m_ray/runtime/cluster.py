"""Starting or joining Ray: one place for the settings that make local Ray work.

On a cluster (``RAY_ADDRESS`` set, or inside ``ray job submit``) we join it and say which
one. Otherwise we start an embedded Ray of our own (``address="local"``: whatever a dead or
live ``ray start`` cluster left behind on this machine is ignored), with logical CPU
oversubscription: Ray Data's operators and Ray Train's workers each hold a CPU slot, and with
one slot per core a 2-core laptop deadlocks before the first batch. Torch threads are set per
worker, so the real CPU use stays at the number of cores.

The command line owns its process's console (``own_console``): there, Ray's native
(C++) log lines that a user cannot act on are filtered out of stderr (``NATIVE_NOISE``),
and Ray Train's per-report INFO dumps are silenced in the workers.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

LOCAL_CPU_SLOTS_MIN = 4  # logical CPU slots for embedded Ray, at least
OBJECT_STORE_BYTES = 1 << 30  # 1 GiB: enough for blocks of 64x64 images, small for laptops

# Native log lines of a successful run that say nothing a user can act on. Every Ray Data
# actor pool passes its context by reference to actors that may restart, and Ray's core
# worker logs that at error level (ray-project/ray#57733); our actors are restartable
# because they rebuild everything from paths, not from those references.
NATIVE_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               rb"and max_restarts > 0"),
)
# Ray Train's worker logs every ray.train.report() at INFO, about 1,000 characters each.
TRAIN_REPORT_LOGGERS = ("ray.train", "ray.train.v2._internal.execution.context")

_console = {"owned": False, "filter": None}


def _quiet_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def own_console() -> None:
    """Called by the command line: this process's stderr is ours to filter."""
    _console["owned"] = True


class NativeStderrFilter:
    """Stderr (file descriptor 2) through a pipe that drops lines matching `patterns`.

    Native libraries write to the descriptor, not to ``sys.stderr``, so this is the only
    place their lines can be filtered. Everything else passes through unchanged; a partial
    line is held back only while it could still become a native log line (``[`` first).
    """

    def __init__(self, patterns=NATIVE_NOISE):
        self.patterns = patterns
        self.dropped = 0
        sys.stderr.flush()
        self._target = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._thread = threading.Thread(target=self._pump, name="f2m-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _keep(self, line: bytes) -> bool:
        if any(p.search(line) for p in self.patterns):
            self.dropped += 1
            return False
        return True

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._target, data):]

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_end, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if self._keep(line))
            if pending and not pending.startswith(b"["):
                out, pending = out + pending, b""
            if out:
                self._write(out)
        if pending and self._keep(pending):
            self._write(pending)

    def close(self) -> None:
        """Put the real stderr back and let the pump drain (also at exit)."""
        if self._target is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._target, 2)  # the pipe's last write end in this process closes: the pump sees EOF
        self._thread.join(timeout=2.0)
        os.close(self._target)
        self._target = None


def _filter_native_stderr() -> None:
    if _console["owned"] and _console["filter"] is None:
        _console["filter"] = NativeStderrFilter()


def quiet_train_reports() -> None:
    """In a Ray Train worker: no INFO dump of every reported result."""
    for name in TRAIN_REPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = True,
               report=None) -> None:
    """Join the cluster in RAY_ADDRESS, or start embedded local Ray with settings that work on 2 cores.

    ``log_to_driver=False`` keeps the actors' own log lines (Ray Train's bookkeeping, and the
    state-API warnings that embedded Ray without a dashboard produces) out of the console,
    for commands that print their own progress; they stay in Ray's session log files.
    Joining a cluster prints one line naming it (through `report`, default stderr).
    """
    _quiet_defaults()
    import ray

    if ray.is_initialized():
        return
    _filter_native_stderr()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        line = (f"joined the Ray cluster at {address}: {nodes} node(s), {resources.get('CPU', 0):g} CPU, "
                f"{resources.get('GPU', 0):g} GPU")
        (report or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        return
    slots = num_cpus or max(LOCAL_CPU_SLOTS_MIN, 2 * (os.cpu_count() or 1))
    ray.init(
        address="local",  # never a cluster that `ray start` left behind
        log_to_driver=log_to_driver,
        num_cpus=slots,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        logging_level=logging.WARNING,
    )


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())

"""The console of a command: ours, not Ray's.

The command line owns its process's console (``own_console``): there, Ray's native (C++)
log lines that a user cannot act on are filtered out of stderr (``NATIVE_NOISE``). Ray
Train's per-report INFO dumps are silenced in the workers (``quiet_train_reports``), and Ray
Data's progress bars and per-dataset banners on the driver (``quiet_ray_data``): commands
print their own progress lines.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

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


def own_console() -> None:
    """Called by the command line: this process's stderr is ours to filter."""
    _console["owned"] = True
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedUploads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropAbandonedUploads())


class _DropAbandonedUploads(logging.Filter):
    """asyncio's "Task exception was never retrieved" for an aiohttp request cut short by a lost connection.

    s3fs leaves the request's writer task behind when it gives up on a connection; the failure
    itself reaches the command as an exception and is reported there in one line.
    """

    def filter(self, record) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Task exception was never retrieved")
                    and type(error).__module__.split(".")[0] == "aiohttp")


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


def filter_native_stderr() -> None:
    """Install the stderr filter, once, where the command line owns the console."""
    if _console["owned"] and _console["filter"] is None:
        _console["filter"] = NativeStderrFilter()


def quiet_train_reports() -> None:
    """In a Ray Train worker: no INFO dump of every reported result."""
    for name in TRAIN_REPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _DropRecords(logging.Filter):
    """A logging filter: drops INFO chatter, and warnings that only echo our own settings."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING and "Progress bars disabled" not in record.getMessage()


RAY_DATA_LOGGERS = ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress",
                    "ray.data._internal.progress.logging_progress")


def quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners on the driver (they would interleave with ours).

    Ray Data re-applies its logging config for every dataset, so levels set on its loggers
    do not last; a filter on the loggers that print the banners does.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    for name in RAY_DATA_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in log.filters):
            log.addFilter(_DropRecords())

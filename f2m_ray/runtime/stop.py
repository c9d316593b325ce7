"""Stopped by a scheduler or by hand: SIGTERM (what Kubernetes, SLURM and `ray job stop` send) and
Ctrl-C end a command with one line of its own, saying what was kept and the command that resumes.

`stop_on_signals()` makes SIGTERM (and Ctrl-C) raise `Stopped`, a KeyboardInterrupt, in the main
thread, so the command unwinds like an interrupt (files written whole are kept,
temporary ones are never read as finished). The command line calls it at start, and
`f2m_ray.runtime.cluster.ensure_ray` again once Ray is up: Ray's core worker installs a native
SIGTERM handler that prints a stack dump and kills the process, which this one replaces.
A command says what a stop leaves behind with `on_stop(note)`: the note is asked for its line
only when a stop happens.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable

_state: dict = {"installed": False, "notes": [], "signum": None}


class Stopped(KeyboardInterrupt):
    """A SIGTERM received by the command line, raised where its main thread was."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    # One SIGTERM is enough: a second must not cut the clean-up short. A second Ctrl-C is the usual way out.
    signal.signal(signum, signal.SIG_IGN if signum == signal.SIGTERM else signal.default_int_handler)
    _state["signum"] = signum  # what unwinds may be re-raised as a plain KeyboardInterrupt (Ray Train does)
    _quiet_ray_errors()
    raise Stopped(signum)


def _quiet_ray_errors() -> None:
    """No more of Ray's error notes on the console: after a stop they only report the actors and tasks that
    the stop itself ends ("The actor is dead because it was killed by `ray.kill`")."""
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "print_to_stdstream"):
        worker.print_to_stdstream = lambda data, ignore_prefix=False: None


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise `Stopped` (a KeyboardInterrupt) in the main thread from now on."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["installed"] = True
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)


def reinstall() -> None:
    """After something native (Ray's core worker) took SIGTERM over: ours again, if the command line set it."""
    if _state["installed"]:
        stop_on_signals()


def on_stop(note: Callable[[], str]) -> None:
    """What a stop of this command keeps and how to resume it: `note()` is asked when a stop happens."""
    _state["notes"].append(note)


def stop_line(err: KeyboardInterrupt) -> tuple[str, int]:
    """(the one line, the exit status) for a command stopped by `err`: 128 + the signal, as a shell reports it."""
    signum = err.signum if isinstance(err, Stopped) else _state["signum"] or int(signal.SIGINT)
    line = f"stopped by {signal.Signals(signum).name}"
    for note in reversed(_state["notes"]):
        try:
            text = note()
        except Exception as failure:  # the note must never hide the stop itself
            text = f"(could not tell what was kept: {type(failure).__name__})"
        if text:
            line += f": {text}"
            break
    return line, 128 + signum

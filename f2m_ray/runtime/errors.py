"""Errors coming back from Ray, as the one line the in-process path would print."""

from __future__ import annotations

import re

from f2m_ray.errors import F2MError

# The last line of a Python traceback: "package.module.SomeError: what happened".
_RAISED = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (.+)$")


def _innermost(err: BaseException) -> BaseException:
    """Follow Ray's `.cause` and Python's `__cause__` inward, past wrappers that carry no message of their own
    (Ray Data raises an actor's death ``from SystemException()``, whose text is empty)."""
    cause, seen = err, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException) or not str(inner).strip():
            break
        cause = inner
    return cause


def worker_error(err: BaseException) -> str:
    """The innermost cause of a failure raised inside a Ray worker, in one line: an F2MError's own
    message, else ``Type: message``, as the same failure raised in this process reads."""
    cause = _innermost(err)
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    if isinstance(cause, F2MError) and lines:
        return lines[-1]
    # An actor that died in its constructor comes back as ActorDiedError whose text is the remote
    # traceback: its last "Type: message" line is what was raised there.
    raised = [m for m in (_RAISED.match(line.strip()) for line in lines) if m]
    if raised and len(lines) > 1:
        name, message = raised[-1].groups()
        return message if name == F2MError.__name__ else f"{name}: {message}"
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def ray_error_line(err: BaseException) -> str:
    """An error's own message where Ray puts the remote traceback first: its last unindented line."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith((" ", "Traceback", "\t"))]
    return (lines[-1] if lines else type(cause).__name__)[:300]


def unwrap_training_error(err: Exception) -> Exception:
    """The first worker's own exception inside Ray Train's error, if there is one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        inner = failures[rank]
        cause = getattr(inner, "cause", None) or inner
        return cause
    controller = getattr(err, "controller_failure", None)
    return controller or err

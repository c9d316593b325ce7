"""Errors coming back from Ray, as the one line the in-process path would print."""

from __future__ import annotations

from f2m_ray.errors import F2MError


def worker_error(err: BaseException) -> str:
    """The innermost cause of a failure raised inside a Ray worker, in one line."""
    cause, seen = err, set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[-1] if isinstance(cause, F2MError) and lines else (lines[0] if lines else "")
    return text if isinstance(cause, F2MError) else f"{type(cause).__name__}: {text}"


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

"""Local paths and ``s3://`` URLs through one filesystem layer (fsspec / s3fs, pyarrow).

S3-compatible stores: the endpoint comes from ``AWS_ENDPOINT_URL`` (or
``F2M_S3_ENDPOINT_URL``), credentials from the usual AWS variables or files.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from f2m_ray.errors import F2MError, first_line


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def s3_endpoint() -> str | None:
    return os.environ.get("F2M_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options(path: str) -> dict[str, Any]:
    """fsspec options for `path` (the S3 endpoint for s3:// URLs)."""
    if str(path).startswith("s3://"):
        endpoint = s3_endpoint()
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or a URL."""
    path = str(path)
    try:
        return url_to_fs(path, **storage_options(path))
    except (ImportError, ValueError) as err:
        raise F2MError(f"cannot open {path}: {err}") from None


def arrow_filesystem(path: str):
    """(pyarrow filesystem, path within it), for pyarrow and Ray Data readers/writers.

    S3 uses pyarrow's native client (fast, multi-part) with the same endpoint as s3fs.
    """
    import pyarrow.fs as pafs

    path = str(path)
    if path.startswith("s3://"):
        endpoint = s3_endpoint()
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            if region:
                kwargs["region"] = region
        # Explicit keys from the environment travel with the (pickled) filesystem into Ray
        # actors that started before the variables were set (e.g. Ray Train's controller).
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret)
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        return pafs.S3FileSystem(**kwargs), path[len("s3://"):]
    if is_remote(path):
        fs, inner = filesystem(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for URLs and os.path.join for local paths."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def quick_s3(path: str):
    """An s3fs filesystem for `path` that fails fast (one attempt, short timeouts)."""
    import s3fs

    options = storage_options(path)
    options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 1}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.retries = 1
    return fs


def probe_storage(path: str, what: str) -> None:
    """Fail early, in one line, when an s3:// path is unreachable or refused."""
    if not str(path).startswith("s3://"):
        return
    fs = quick_s3(path)
    bucket = path[len("s3://"):].split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)  # one request, whatever the bucket holds
    except FileNotFoundError:
        raise F2MError(f"{what} {path}: bucket {bucket!r} does not exist") from None
    except PermissionError as err:
        raise F2MError(f"{what} {path}: S3 refused access ({first_line(err)}); check the credentials") from None
    except Exception as err:  # botocore's connection errors are not OSErrors
        if type(err).__name__ == "NoCredentialsError":  # botocore looks for keys before it connects
            raise F2MError(f"{what} {path}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
        endpoint = s3_endpoint() or "the default AWS endpoint"
        raise F2MError(f"{what} {path}: cannot reach S3 at {endpoint} ({first_line(err)})") from None

"""Ray Datasets over files the driver names (local or s3://), read with the driver's storage settings."""

from __future__ import annotations

from f2m_ray.runtime.cluster import ensure_ray
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.storage import arrow_filesystem


def read_parquet(files: list[str], columns: list[str] | None = None):
    """These Parquet files (all on one filesystem) as one ``ray.data.Dataset``."""
    import ray

    fs, _ = arrow_filesystem(files[0])
    ensure_ray()
    return ray.data.read_parquet([arrow_filesystem(f)[1] for f in files], filesystem=fs, columns=columns,
                                 runtime_env=worker_runtime_env())

"""Ray Datasets over files the driver names (local or s3://), read with the driver's storage settings.

One read task per file (``from_items`` + ``map_batches``) rather than ``ray.data.read_parquet``:
for a dataset's few known files, Ray 2.60's reader spends ~3 s listing and planning and reads
them all in one task (benchmarks/consumer_throughput.py), where this takes 0.2 s and reads on
every core. An optional `transform` (a module-level function of a pyarrow Table) runs in the
same task, on each file's rows.
"""

from __future__ import annotations

from typing import Any, Callable

from f2m_ray.runtime.cluster import ensure_ray
from f2m_ray.runtime.console import quiet_ray_data
from f2m_ray.runtime.env import worker_runtime_env
from f2m_ray.storage import arrow_filesystem


def _read_files(batch: dict[str, Any], columns: list[str] | None, transform: Callable | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for url in batch["path"]:
        fs, inner = arrow_filesystem(str(url))
        with fs.open_input_file(inner) as f:
            tables.append(pq.read_table(f, columns=columns))
    table = pa.concat_tables(tables)
    return transform(table) if transform else table


def read_parquet(files: list[str], columns: list[str] | None = None, transform: Callable | None = None):
    """These Parquet files (local paths or URLs) as one ``ray.data.Dataset``, a read task per file."""
    import ray

    ensure_ray()
    quiet_ray_data()
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_files, fn_kwargs={"columns": columns, "transform": transform}, batch_size=1,
        runtime_env=worker_runtime_env())

"""The files of a finished synthetic dataset (local or s3://): its manifest, its Parquet files, one table.

A dataset is what its ``_manifest.json`` lists, written last by ``f2m-ray synthesize``: a folder
without one is an unfinished run and is refused, so a half-written dataset is never read as a
finished one. Schema versions 2 (Parquet at OUT/CATEGORY/) and 3 (OUT/data/CATEGORY/) are read.
"""

from __future__ import annotations

import json
from typing import Any

from f2m_ray.errors import F2MError
from f2m_ray.schema import MANIFEST_NAME, READABLE_SCHEMA_VERSIONS, SCHEMA_VERSION
from f2m_ray.storage import arrow_filesystem, filesystem, join


def read_manifest(path: str) -> dict[str, Any]:
    """The dataset's manifest; refuses unfinished or foreign folders with one clear line."""
    fs, root = filesystem(path)
    manifest_path = join(root, MANIFEST_NAME)
    try:
        with fs.open(manifest_path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        if fs.exists(join(root, "_run.json")):
            raise F2MError(
                f"{path} is an unfinished synthetic dataset (no {MANIFEST_NAME}); "
                f"finish it with the same `f2m-ray synthesize` command plus --resume"
            ) from None
        raise F2MError(f"{path} is not a synthetic dataset: no {MANIFEST_NAME} there") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise F2MError(f"corrupt manifest {join(path, MANIFEST_NAME)}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "f2m-ray-synthetic":
        raise F2MError(f"{join(path, MANIFEST_NAME)} is not an f2m-ray synthetic dataset manifest")
    if manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
        newer = isinstance(manifest.get("schema_version"), int) and manifest["schema_version"] > SCHEMA_VERSION
        raise F2MError(
            f"{path} has schema version {manifest.get('schema_version')}; this f2m-ray reads versions {readable}"
            + ("; upgrade f2m-ray to read it" if newer else "")
        )
    return manifest


def synthetic_files(path: str) -> list[str]:
    """Full paths (local or s3://) of the dataset's Parquet files, in manifest order."""
    return [join(path, record["path"]) for record in read_manifest(path)["files"]]


def read_table(path: str, columns: list[str] | None = None):
    """A finished synthetic dataset as one ``pyarrow.Table`` (for small data and tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file in synthetic_files(path):
        fs, inner = arrow_filesystem(file)
        with fs.open_input_file(inner) as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        raise F2MError(f"{path} lists no files")
    return pa.concat_tables(tables)

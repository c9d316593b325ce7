"""A synthetic dataset for training jobs: read back (local or s3://) as a Ray Dataset or a torch
Dataset, or streamed from the model without writing it (``stream``).

Both read exactly the files listed in the dataset's ``_manifest.json`` and refuse a
folder without one (an unfinished run), so a half-written dataset is never read as a
finished one. The Parquet files also read as-is with pandas, pyarrow.dataset, DuckDB
and Hugging Face ``datasets`` (f2m_ray.schema documents the columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from f2m_ray.errors import F2MError
from f2m_ray.schema import decode_png, decoded_images
from f2m_ray.storage import arrow_filesystem, join
from f2m_ray.synthetic_files import read_manifest, read_table, synthetic_files  # noqa: F401 (part of this API)
from f2m_ray.runtime.datasets import read_parquet
from f2m_ray.synth.stream import stream_dataset, stream_options
from f2m_ray.labels import parse_category
from f2m_ray.core.images import to_model_range

LABEL_COLUMNS = ("margin_id", "shape_id")


def open_synthetic(path: str, columns: list[str] | None = None, decode_images: bool = False,
                   categories: list[str] | None = None):
    """A finished synthetic dataset as a ``ray.data.Dataset`` (one row per mass).

    With ``decode_images=True`` the ``image`` column holds (64, 64) float32 arrays in [-1, 1]
    instead of PNG bytes (decoded in Ray Data tasks) and, unless ``columns`` says otherwise, the
    dataset holds only what a training loop needs: ``image``, ``margin_id`` and ``shape_id``, all
    numeric, so ``iter_torch_batches`` takes it as it is. ``categories`` keeps those categories
    (any spelling the command line accepts; one the dataset lacks is an error, not 0 rows).
    """
    if decode_images:
        columns = ["image", *LABEL_COLUMNS] if columns is None else list(dict.fromkeys(["image", *columns]))
    manifest = read_manifest(path)
    files = manifest["files"]
    if categories:
        wanted = set(_chosen_categories(path, categories, set(manifest["counts"])))
        files = [record for record in files if record["category"] in wanted]
    return read_parquet([join(path, record["path"]) for record in files], columns,
                        transform=decoded_images if decode_images else None)


def stream(model: str | None = None, category: str | list[str] = "all", n: int = 1000, *,
           decode_images: bool = False, columns: list[str] | None = None, **options):
    """Synthetic masses decoded on the fly, as a lazy ``ray.data.Dataset``: nothing is written.

    The same run as ``f2m-ray synthesize --category CATEGORY --n N`` with the same options
    (``seed``, ``mixing``, ``k``, ``bank``, ``judge`` and the guards, ``workers``, ...): the same
    plan, mixing and guards, and for the same seed and sample index the same rows and PNG bytes
    as the written Parquet. ``decode_images`` and ``columns`` as in ``open_synthetic``. Feed it to
    a Ray Train job (``TorchTrainer(..., datasets={"synthetic": stream(...)})``); each pass over it
    decodes the masses again.
    """
    categories = (category,) if isinstance(category, str) else tuple(category)
    return stream_dataset(stream_options(categories, n, model, options), decode_images, columns)


def _chosen_categories(path: str, categories: list[str], held: set[str]) -> list[str]:
    """The canonical names of `categories` (accepted spellings); unknown or absent ones are an F2MError."""
    wanted = [parse_category(name).name for name in categories]  # any accepted spelling; unknown: F2MError
    missing = [name for name in wanted if name not in held]
    if missing:
        raise F2MError(f"{path} holds no masses of {', '.join(missing)}; it holds {', '.join(sorted(held))}")
    return wanted


try:  # torch is a dependency of f2m-ray; the base class keeps DataLoader happy
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object  # type: ignore[assignment,misc]


class SyntheticTorchDataset(_TorchDataset):
    """A map-style torch Dataset: item i -> (image (1, 64, 64) float32 in [-1, 1], margin id, shape id).

    Keeps the compressed PNG bytes and label ids in memory (about 4 KB per mass, so
    100,000 masses take ~0.4 GB) and decodes each image on access, in DataLoader workers
    when there are any.
    """

    def __init__(self, path: str, categories: list[str] | None = None):
        import pyarrow as pa
        import pyarrow.compute as pc

        table = read_table(path, columns=["image", "category", *LABEL_COLUMNS])
        if categories:
            wanted = _chosen_categories(path, categories, set(pc.unique(table.column("category")).to_pylist()))
            table = table.filter(pc.is_in(table.column("category"), value_set=pa.array(wanted)))
        self.path = path
        self.images = table.column("image").combine_chunks().field("bytes")
        self.margin_ids = table.column("margin_id").to_numpy().astype(np.int64)
        self.shape_ids = table.column("shape_id").to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.margin_ids)

    def __getitem__(self, index: int):
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} masses")
        pixels = decode_png(self.images[index].as_py())  # (64, 64) uint8
        image = torch.from_numpy(to_model_range(pixels))[None]  # (1, 64, 64) in [-1, 1]
        return image, int(self.margin_ids[index]), int(self.shape_ids[index])


def inspect_dataset(path: str) -> dict[str, Any]:
    """What a finished dataset holds: the manifest's counts checked against the files' footers."""
    import pyarrow.parquet as pq

    manifest = read_manifest(path)
    footer_counts: dict[str, int] = {}
    total_bytes = 0
    for record in manifest["files"]:
        fs, inner = arrow_filesystem(join(path, record["path"]))
        try:
            with fs.open_input_file(inner) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except FileNotFoundError:
            raise F2MError(f"{path} is damaged: {record['path']} is listed in the manifest but missing") from None
        footer_counts[record["category"]] = footer_counts.get(record["category"], 0) + rows
        total_bytes += int(record.get("bytes", 0))
    if footer_counts != manifest["counts"]:
        raise F2MError(f"{path} is damaged: the files hold {footer_counts}, the manifest says {manifest['counts']}")
    return {
        "path": path,
        "schema_version": manifest["schema_version"],
        "tool_version": manifest.get("tool_version"),
        "model_id": manifest.get("model_id"),
        "bank_id": manifest.get("bank_id"),
        "preset": manifest.get("preset"),
        "rows": manifest["rows"],
        "files": len(manifest["files"]),
        "bytes": total_bytes,
        "counts": manifest["counts"],
        "arguments": manifest.get("arguments", {}),
        "notes": manifest.get("notes", []) + _layout_notes(manifest),
    }


def _layout_notes(manifest: dict[str, Any]) -> list[str]:
    if manifest["schema_version"] < 3:
        return ["this dataset uses the version-2 layout (the Parquet at OUT/CATEGORY/, beside the card): f2m-ray reads "
                "it; for plain Parquet readers on OUT/data, write it again with `f2m-ray synthesize ... --overwrite`"]
    return []


def sample_images(path: str, per_category: int = 8) -> dict[str, list[np.ndarray]]:
    """The first `per_category` masses of each category as (64, 64) uint8 arrays."""
    import pyarrow.parquet as pq

    manifest = read_manifest(path)
    first: dict[str, str] = {}
    for record in sorted(manifest["files"], key=lambda r: (r["category"], r["start"])):
        first.setdefault(record["category"], record["path"])
    out: dict[str, list[np.ndarray]] = {}
    for category, relative in first.items():
        fs, inner = arrow_filesystem(join(path, relative))
        with fs.open_input_file(inner) as f:
            table = pq.ParquetFile(f).read_row_group(0, columns=["image"]).slice(0, per_category)
        out[category] = [decode_png(b) for b in table.column("image").combine_chunks().field("bytes").to_pylist()]
    return out

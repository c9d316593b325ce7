"""The ``README.md`` of a finished synthetic dataset: a Hugging Face dataset card.

Its YAML header names the features (from ``f2m_ray.schema.SYNTHETIC_SCHEMA``) and one
config per category, each pointing at that category's Parquet files, plus an ``all``
config (the default), so that ``datasets.load_dataset(OUT)`` reads the folder as it is and a
hub upload renders with a viewer per category. The body says what the data is: counts,
model, mixing, guards, and how to load it. Built from the manifest alone (pure: no I/O).

The card's first body line is ``CARD_MARKER``: ``--overwrite`` replaces a README.md that
carries it and refuses one that does not (a user's own file).
"""

from __future__ import annotations

import json
from typing import Any

from f2m_ray.croissant import CROISSANT_NAME, source_words
from f2m_ray.schema import DATA_DIR

CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by f2m-ray synthesize: replaced when the dataset is rewritten -->"
ALL_CONFIG = "all"
LICENSE_NAME = "terms of the model's training data and of the seed ROIs"
LICENSE_LINK = "README.md#license"  # the card's own License section says whose terms apply


def _yaml_feature(name: str, feature: dict[str, Any], indent: str) -> list[str]:
    kind = feature["_type"]
    if kind == "Image":
        return [f"{indent}- name: {name}", f"{indent}  dtype: image"]
    if kind == "Value":
        return [f"{indent}- name: {name}", f"{indent}  dtype: {feature['dtype']}"]
    if kind in ("Sequence", "List"):
        inner = feature["feature"]
        if inner.get("_type") != "Value":
            raise ValueError(f"nested feature {name} has no YAML form here")
        return [f"{indent}- name: {name}", f"{indent}  list: {inner['dtype']}"]
    raise ValueError(f"feature {name} has an unknown type {kind}")


def _size_category(rows: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if rows < bound:
            return label
    return "10M<n<100M"


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML scalar


def _source_datasets(provenance: dict[str, Any]) -> list[str]:
    """The hub's `source_datasets`: `original` for phantoms, else `extended|DATA` for the real data behind the masses."""
    specs = [provenance.get("model_training_data"), provenance.get("seed_data")]
    sources = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            continue
        entry = "original" if spec.startswith("phantom") else f"extended|{spec.split(':', 1)[0]}"
        if entry not in sources:
            sources.append(entry)
    return sources or ["original"]


def card_header(counts: dict[str, int], features: dict[str, dict[str, Any]],
                provenance: dict[str, Any] | None = None) -> list[str]:
    rows = sum(counts.values())
    lines = [
        "---",
        f"pretty_name: {_quote('Synthetic BI-RADS breast masses (f2m-ray, Feature2Mass)')}",
        "license: other",
        f"license_name: {_quote(LICENSE_NAME)}",
        f"license_link: {_quote(LICENSE_LINK)}",
        "annotations_creators:",
        "- machine-generated",
        "source_datasets:",
        *[f"- {_quote(source)}" for source in _source_datasets(provenance or {})],
        "task_categories:",
        "- image-classification",
        "task_ids:",
        "- multi-class-image-classification",
        "tags:",
        "- synthetic",
        "- medical-imaging",
        "- mammography",
        "- bi-rads",
        "- feature2mass",
        "size_categories:",
        f"- {_size_category(rows)}",
        "configs:",
        f"- config_name: {ALL_CONFIG}",
        "  default: true",
        "  data_files:",
        "  - split: train",
        f"    path: {_quote(DATA_DIR + '/*/part-*.parquet')}",
    ]
    for category in sorted(counts):
        lines += [
            f"- config_name: {category}",
            "  data_files:",
            "  - split: train",
            f"    path: {_quote(f'{DATA_DIR}/{category}/part-*.parquet')}",
        ]
    lines += ["dataset_info:", "  features:"]
    for name, feature in features.items():
        lines += _yaml_feature(name, feature, "  ")
    lines.append("---")
    return lines


def card_text(manifest: dict[str, Any], features: dict[str, dict[str, Any]]) -> str:
    """The whole README.md for a finished dataset described by `manifest`."""
    counts: dict[str, int] = manifest["counts"]
    arguments = manifest.get("arguments", {})
    guards = manifest.get("guards", {})
    rows = sum(counts.values())
    trained_words, seed_words = source_words(manifest.get("provenance") or {})
    body = [
        CARD_MARKER,
        "",
        "# Synthetic BI-RADS breast masses",
        "",
        f"{rows:,} synthetic mass ROIs (64x64, 8-bit grey PNG) in {len(counts)} BI-RADS "
        f"categor{'y' if len(counts) == 1 else 'ies'}, made by `f2m-ray synthesize` "
        f"(f2m-ray {manifest.get('tool_version')}, Feature2Mass). Every mass is labeled by construction: it is "
        "decoded from a mix of visual features of real (or phantom) ROIs of its own margin and shape.",
        "",
        "| category | masses |",
        "|---|---:|",
        *[f"| {name} | {n:,} |" for name, n in sorted(counts.items())],
        "",
        "## How it was made",
        "",
        f"- model `{manifest.get('model_id')}` (preset `{manifest.get('preset')}`), feature bank `{manifest.get('bank_id')}`",
        f"- mixing `{arguments.get('mixing')}`: K={arguments.get('k')} seeds per mass, weights on a "
        f"{arguments.get('step')} grid, Dirichlet alpha {arguments.get('alpha')}, run seed {arguments.get('seed')}, "
        f"seeds from the `{arguments.get('seed_split')}` ROIs",
    ]
    if guards.get("min_label_confidence") is not None or guards.get("min_seed_distance") is not None:
        total = guards.get("total", {})
        body.append(
            f"- guards: label confidence >= {guards.get('min_label_confidence')}, distance to the nearest seed >= "
            f"{guards.get('min_seed_distance')}; {total.get('rejected', 0)} of {total.get('candidates', 0)} candidates "
            f"rejected, {total.get('unmet', 0)} masses kept unguarded (`guards_passed = false`)"
        )
    else:
        body.append("- guards: none")
    body += [
        f"- finished {manifest.get('finished')}; `_manifest.json` lists every file with its row range",
        "",
        "Columns: `image` (PNG), `margin`, `shape`, `category` and their ids (`margin_id`, `shape_id`), "
        "`seed_ids` and `weights` (the mix), `model_id`, `bank_id`, `run_seed`, `sample_index`, and the guard "
        "columns `label_confidence`, `nearest_seed_distance`, `attempt`, `guards_passed`.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        f"ds = load_dataset(\"PATH\")                        # config {_quote(ALL_CONFIG)}: every category",
        f"one = load_dataset(\"PATH\", {_quote(sorted(counts)[0])})  # one category",
        "",
        "import pandas as pd",
        "df = pd.read_parquet(\"PATH/data\")                # any Parquet reader: the folder data/",
        "",
        "from f2m_ray.synthetic import SyntheticTorchDataset, open_synthetic",
        "torch_ds = SyntheticTorchDataset(\"PATH\")          # (image (1, 64, 64) in [-1, 1], margin id, shape id)",
        "ray_ds = open_synthetic(\"PATH\")                   # a Ray Dataset",
        "```",
        "",
        "The Parquet files are under `data/CATEGORY/`; `_manifest.json` lists them, and "
        f"`{CROISSANT_NAME}` describes the dataset in MLCommons Croissant (fields and responsible-AI notes).",
        "",
        "## License",
        "",
        f"The masses are decoded from a model trained on {trained_words}, mixing the features of seed ROIs from "
        f"{seed_words}. They carry the terms of that data: check them before you share or publish this dataset.",
        "",
        "Synthetic data: not for diagnosis. Check label fidelity and realism against your own real data "
        "(`f2m-ray evaluate`) before training on it.",
        "",
    ]
    return "\n".join(card_header(counts, features, manifest.get("provenance")) + body)


def is_our_card(text: str) -> bool:
    return CARD_MARKER in text

"""Synthesis streamed as a Ray Dataset: the rows `synthesize` writes, decoded on the fly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from f2m_ray.core.images import to_model_range
from f2m_ray.schema import decode_png
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.synthetic import read_table, stream

CATEGORIES = ("spiculated-irregular", "circumscribed-oval")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.ray
def test_stream_gives_the_bytes_synthesize_writes(ray_local, tmp_path):
    options = dict(seed=7, k=5, min_seed_distance=0.12, max_attempts=3)  # a guard: its retries must match too
    streamed = stream("pretrained", list(CATEGORIES), 300, **options).to_pandas()
    written = tmp_path / "written"
    synthesize(SynthesisConfig(categories=CATEGORIES, n=300, out=str(written), model="pretrained", rows_per_file=128,
                               **options), report=None, use_ray=False)
    table = read_table(str(written)).to_pandas()
    assert len(streamed) == 600 == len(table) and streamed["sample_id"].is_unique
    streamed, table = streamed.set_index("sample_id").sort_index(), table.set_index("sample_id").sort_index()
    assert list(streamed.index) == list(table.index)
    assert [cell["bytes"] for cell in streamed["image"]] == [cell["bytes"] for cell in table["image"]]
    for column in ("margin_id", "shape_id", "category", "attempt", "guards_passed", "nearest_seed_distance"):
        assert streamed[column].tolist() == table[column].tolist(), column
    assert [list(s) for s in streamed["seed_ids"]] == [list(s) for s in table["seed_ids"]]
    assert (table["attempt"] > 0).any()  # the guard did retry some masses


@pytest.mark.ray
def test_stream_decodes_images_for_torch_batches(ray_local):
    dataset = stream("pretrained", CATEGORIES[0], 100, seed=2, decode_images=True)
    batches = list(dataset.iter_torch_batches(batch_size=64))
    assert [len(b["image"]) for b in batches] == [64, 36] and set(batches[0]) == {"image", "margin_id", "shape_id"}
    assert tuple(batches[0]["image"].shape[1:]) == (64, 64) and set(batches[0]["margin_id"].tolist()) == {4}
    rows = stream("pretrained", CATEGORIES[0], 100, seed=2, columns=["sample_index", "image"]).to_pandas()
    first = rows.sort_values("sample_index")["image"].iloc[0]["bytes"]
    images = np.concatenate([b["image"].numpy() for b in batches])
    assert any(np.array_equal(image, to_model_range(decode_png(first))) for image in images)


def test_stream_refuses_an_option_synthesize_does_not_take():
    with pytest.raises(TypeError, match="unknown options out, pace; it takes"):
        stream("pretrained", "spiculated-irregular", 10, out="x", pace=3)


def _readme_example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- stream-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README's streaming example (marked <!-- stream-example -->) is missing"
    return match.group(1)


@pytest.mark.ray
@pytest.mark.slow
def test_the_readme_torchtrainer_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp"), "HOME": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{'masses seen': {'real': 2000, 'synthetic': 2000}" in done.stdout, done.stdout[-2000:]

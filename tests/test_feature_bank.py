"""The feature bank: every labeled ROI encoded with its own labels, as one Parquet file."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from f2m_ray.checkpoint import load_checkpoint
from f2m_ray.config import PRESETS
from f2m_ray.errors import F2MError
from f2m_ray.bank import BANK_FILE, load_feature_bank, write_feature_bank
from f2m_ray.labels import parse_category
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.schema import BANK_METADATA_KEY
from f2m_ray_cli.main import _register, cli
from test_synthesize import make_checkpoint

N_ROIS = 60


@pytest.fixture(scope="module")
def bank(tmp_path_factory, ray_local):
    """Built through `f2m-ray encode` (in this process, on the session's Ray)."""
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("bank") / "ckpt"))
    _register()
    result = CliRunner().invoke(cli, ["encode", "--model", ckpt, "--data", f"phantom:{N_ROIS}", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert f"encoded {N_ROIS} ROIs" in result.stdout and "spiculated-irregular" in result.stdout
    return ckpt, f"{ckpt}/{BANK_FILE}"


def test_rows_sorted_labeled_and_split(bank):
    ckpt, path = bank
    loaded = load_feature_bank(path, with_images=True)
    assert len(loaded) == N_ROIS and loaded.features.shape == (N_ROIS, PRESETS["tiny"].model.feature_dim)
    assert list(loaded.roi_id) == [f"phantom-{i:06d}" for i in range(N_ROIS)]
    # Phantoms take turns over the 20 default categories; phantom 3 is circumscribed-irregular.
    assert loaded.counts()["circumscribed-irregular"] == 3 and len(loaded.counts()) == 20
    assert (loaded.margin[3], loaded.shape[3]) == (0, 3)
    # The stored split is the training split: same val fraction (checkpoint's) and seed.
    assert list(loaded.split) == assign_split(list(loaded.roi_id), 0.1, 3)
    assert loaded.model_id == load_checkpoint(ckpt).model_id and len(loaded.bank_id) == 16
    assert loaded.metadata["splits"] == {"train": int(np.sum(loaded.split == "train")),
                                         "val": int(np.sum(loaded.split == "val"))}
    assert loaded.metadata["seed"] == 3 and loaded.metadata["feature_dim"] == 64
    assert loaded.metadata["val_fraction"] == 0.1 and loaded.metadata["data"] == f"phantom:{N_ROIS}"
    assert len(loaded.images) == N_ROIS and loaded.images[0][:4] == b"\x89PNG"


def test_features_are_the_encoder_in_eval_mode(bank):
    ckpt, path = bank
    loaded = load_feature_bank(path)
    rows = list(generate_phantoms(3, seed=3))
    generator = load_checkpoint(ckpt).generator()
    images = torch.from_numpy(np.stack([to_model_range(img) for _, img, _ in rows]))[:, None]
    with torch.no_grad():
        expected = generator.encode(images, torch.tensor([c.margin_id for *_, c in rows]),
                                    torch.tensor([c.shape_id for *_, c in rows])).numpy()
    np.testing.assert_allclose(loaded.features[:3], expected, rtol=1e-5, atol=1e-5)


def test_pools_follow_roi_order(bank):
    _, path = bank
    loaded = load_feature_bank(path)
    pool = loaded.pool(parse_category("spiculated-irregular"))
    assert list(pool) == [19, 39, 59]  # category index 19 of 20
    assert set(loaded.pool(parse_category("spiculated-irregular"), "train")) <= set(pool)
    assert len(loaded.pool(parse_category("spiculated-architectural-distortion"))) == 0
    with pytest.raises(F2MError, match="unknown seed id 'nope'.*has 60 ROIs"):
        loaded.row_of("nope")
    # The seed split as a whole, every category: what nearest_seed_distance compares against.
    assert list(loaded.seed_rows("all")) == list(range(60))
    train = loaded.seed_rows("train")
    assert list(train) == list(np.flatnonzero(loaded.split == "train")) and 0 < len(train) < 60
    with pytest.raises(F2MError, match="unknown seed split 'val'; valid: "):
        loaded.seed_rows("val")


def _rewrite_metadata(src, dst, change):
    table = pq.read_table(src)
    meta = json.loads(table.schema.metadata[BANK_METADATA_KEY])
    change(meta)
    pq.write_table(table.replace_schema_metadata({BANK_METADATA_KEY: json.dumps(meta).encode()}), dst)


def test_foreign_files_refused(bank, tmp_path):
    _, path = bank
    other = tmp_path / "other.parquet"
    _rewrite_metadata(path, other, lambda m: m["vocabulary"].update(shapes=["round", "oval"]))
    with pytest.raises(F2MError, match="another BI-RADS vocabulary"):
        load_feature_bank(str(other))
    _rewrite_metadata(path, other, lambda m: m.update(schema_version=99))
    with pytest.raises(F2MError, match="schema version 99"):
        load_feature_bank(str(other))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(F2MError, match="not a feature bank"):
        load_feature_bank(str(tmp_path / "junk.parquet"))
    with pytest.raises(F2MError, match="no feature bank at"):
        load_feature_bank(str(tmp_path / "missing.parquet"))


def test_duplicate_ids_refused(tmp_path):
    ids = np.array(["a", "b", "a"])
    with pytest.raises(F2MError, match="duplicate roi ids"):
        write_feature_bank(str(tmp_path / "b.parquet"), ids, np.zeros(3, np.int64), np.zeros(3, np.int64),
                           np.array(["train"] * 3), ids, ids, [b""] * 3, np.zeros((3, 4), np.float32), "m")
    assert not (tmp_path / "b.parquet").exists()


@pytest.mark.s3
def test_s3_round_trip(bank, s3_bucket):
    _, path = bank
    local = load_feature_bank(path, with_images=True)
    remote_path = f"{s3_bucket}/banks/{BANK_FILE}"
    write_feature_bank(remote_path, local.roi_id, local.margin, local.shape, local.split, local.roi_id,
                       local.source, local.images, local.features, local.model_id)
    remote = load_feature_bank(remote_path)
    np.testing.assert_array_equal(remote.features, local.features)
    assert remote.bank_id == local.bank_id

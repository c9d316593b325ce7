"""The judge: network shapes, training on constructed data, label confidence, save/load, CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from f2m_ray import judge_model
from f2m_ray.evaluation import judge as judge_module
from f2m_ray.errors import F2MError
from f2m_ray.evaluation.judge import LabeledArrays
from f2m_ray.judge_model import JudgeConfig, JudgeTrainConfig
from f2m_ray_cli.main import _register, cli

# A narrow judge: the same code paths in a fraction of the time.
TINY = JudgeConfig(stem_channels=4, channels=(8, 8, 16, 16), feature_dim=16, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def easy_set(n: int, seed: int, val: int) -> LabeledArrays:
    """A centred disc: its brightness tells the margin, its radius the shape (flip and shift invariant)."""
    rng = np.random.default_rng(seed)
    margin = rng.integers(0, 5, n)
    shape = rng.integers(0, 5, n)
    yy, xx = np.mgrid[:64, :64] - 31.5
    radius = np.hypot(yy, xx)
    images = np.empty((n, 64, 64), dtype=np.float32)
    for i in range(n):
        disc = radius < 6 + 5 * shape[i]
        images[i] = np.where(disc, -0.6 + 0.35 * margin[i], -1.0) + rng.normal(0, 0.05, (64, 64))
    split = np.array(["train"] * (n - val) + ["val"] * val)
    ids = np.array([f"roi-{i:04d}" for i in range(n)])
    return LabeledArrays(ids, images.clip(-1, 1), margin.astype(np.int64), shape.astype(np.int64), split)


def test_shapes_and_features():
    torch.manual_seed(0)
    model = judge_model.Judge(JudgeConfig())
    margin, shape = model(torch.zeros(3, 1, 64, 64))
    assert margin.shape == (3, 5) and shape.shape == (3, 5)
    assert model.features(torch.zeros(3, 64, 64)).shape == (3, 128)  # (B, H, W) accepted too
    # Nothing shared with the GAN: no parameter of the judge comes from f2m_ray.core.networks modules.
    from f2m_ray.core.networks import Discriminator

    assert not any(isinstance(m, Discriminator) for m in model.modules())
    with pytest.raises(F2MError, match="divisible"):
        JudgeConfig(image_size=60)


def test_true_labels_score_high_and_shuffled_labels_score_chance():
    data = easy_set(600, seed=0, val=200)
    config = JudgeTrainConfig(epochs=6, batch_size=32, lr=1e-2, seed=0)
    model, report = judge_module.train_judge(data, TINY, config)
    assert report["train_rows"] == 400 and report["val_rows"] == 200
    assert report["val_accuracy"]["margin"] > 0.85 and report["val_accuracy"]["shape"] > 0.85

    shuffled = LabeledArrays(data.roi_id, data.images, data.margin.copy(), data.shape.copy(), data.split)
    rng = np.random.default_rng(1)
    train_rows = np.flatnonzero(data.split == "train")
    shuffled.margin[train_rows] = rng.permutation(shuffled.margin[train_rows])
    shuffled.shape[train_rows] = rng.permutation(shuffled.shape[train_rows])
    _, shuffled_report = judge_module.train_judge(shuffled, TINY, config)
    # Five balanced classes: chance is 0.2; 200 held-out rows put 0.35 more than 3.5 std above it.
    assert shuffled_report["val_accuracy"]["margin"] < 0.35
    assert shuffled_report["val_accuracy"]["shape"] < 0.35
    assert report["val_majority_accuracy"]["margin"] < 0.35


def test_label_confidence_is_the_product_of_head_probabilities():
    torch.manual_seed(3)
    model = judge_model.Judge(TINY).eval()
    data = easy_set(10, seed=1, val=0)
    predictions = judge_model.predict(model, data.images, batch_size=4)
    assert predictions.features.shape == (10, 16) and predictions.features.dtype == np.float32
    np.testing.assert_allclose(predictions.margin_probs.sum(axis=1), 1.0, rtol=1e-5)
    confidence = judge_model.label_confidence(model, data.images, data.margin, data.shape)
    expected = predictions.margin_probs[np.arange(10), data.margin] * predictions.shape_probs[np.arange(10), data.shape]
    assert confidence.shape == (10,) and confidence.dtype == np.float32
    np.testing.assert_allclose(confidence, expected, rtol=1e-5)
    assert ((confidence > 0) & (confidence < 1)).all()


def test_same_seed_same_judge():
    data = easy_set(64, seed=2, val=0)
    config = JudgeTrainConfig(steps=5, batch_size=16, seed=4)
    first, _ = judge_module.train_judge(data, TINY, config)
    second, _ = judge_module.train_judge(data, TINY, config)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_fit_counts_steps_and_epochs():
    data = easy_set(50, seed=3, val=0)
    model = judge_module.new_judge(TINY, 0)
    result = judge_module.fit(model, data.images, data.margin, data.shape, JudgeTrainConfig(steps=7, batch_size=16))
    assert (result["steps"], result["epochs"]) == (7, 2)  # 4 batches per epoch (the tail of 2 rows is one)
    result = judge_module.fit(model, data.images, data.margin, data.shape, JudgeTrainConfig(epochs=2, batch_size=16))
    assert (result["steps"], result["epochs"]) == (8, 2)


def test_fit_draws_rows_by_sample_weights():
    data = easy_set(40, seed=5, val=0)
    images = data.images.copy()
    images[20:] = np.nan  # a row drawn from here makes the loss NaN
    config = JudgeTrainConfig(steps=10, batch_size=8)
    weights = np.r_[np.ones(20), np.zeros(20)]
    model = judge_module.new_judge(TINY, 0)
    result = judge_module.fit(model, images, data.margin, data.shape, config, sample_weights=weights)
    assert np.isfinite(result["loss"]) and result["steps"] == 10
    model = judge_module.new_judge(TINY, 0)
    result = judge_module.fit(model, images, data.margin, data.shape, config)  # a permutation: the NaN rows come
    assert np.isnan(result["loss"])
    with pytest.raises(F2MError, match="sample_weights must be 40 finite non-negative numbers"):
        judge_module.fit(model, images, data.margin, data.shape, config, sample_weights=np.ones(39))
    with pytest.raises(F2MError, match="with a positive sum"):
        judge_module.fit(model, images, data.margin, data.shape, config, sample_weights=np.zeros(40))


def test_save_load_round_trip_and_refusals(tmp_path):
    data = easy_set(40, seed=4, val=10)
    model, report = judge_module.train_judge(data, TINY, JudgeTrainConfig(steps=2, batch_size=16))
    path = str(tmp_path / "judge")
    judge_model.save_judge(path, model, JudgeTrainConfig(steps=2, batch_size=16), report, data="constructed",
                            train_ids=["roi-0002", "roi-0001"])
    loaded = judge_model.load_judge(path)
    assert loaded.config == TINY and loaded.train_config.steps == 2 and loaded.data == "constructed"
    assert loaded.train_ids == {"roi-0001", "roi-0002"}
    assert loaded.report["val_rows"] == 10 and len(loaded.judge_id) == 16
    np.testing.assert_allclose(judge_model.predict(loaded.model, data.images).features,
                               judge_model.predict(model, data.images).features, rtol=1e-6)
    state = torch.load(tmp_path / "judge" / "judge.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    meta_path = tmp_path / "judge" / "f2m_judge.json"
    meta = json.loads(meta_path.read_text())
    meta["vocabulary"]["margins"] = ["smooth", "rough"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(F2MError, match="another BI-RADS vocabulary"):
        judge_model.load_judge(path)
    meta_path.write_text(json.dumps({**meta, "format": "f2m-ray-checkpoint"}))
    with pytest.raises(F2MError, match="not an f2m-ray judge"):
        judge_model.load_judge(path)
    with pytest.raises(F2MError, match="does not exist"):
        judge_model.load_judge(str(tmp_path / "nowhere"))


def invoke(*args):
    """The real command, in this process (shares the session's Ray)."""
    _register()
    return CliRunner().invoke(cli, list(args))


@pytest.mark.slow
def test_cli_judge_train_on_ray_train_and_info(ray_local, tmp_path):
    out = str(tmp_path / "judge")
    result = invoke("judge", "train", "--data", "phantom:120", "--out", out, "--epochs", "1", "--val-fraction", "0.25",
                    "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "held-out accuracy on" in result.stdout
    assert result.stderr.count("judge epoch 1/1: loss ") == 1  # rank 0's line, once, on the driver
    meta = json.loads((tmp_path / "judge" / "f2m_judge.json").read_text())
    assert meta["format"] == "f2m-ray-judge" and meta["data"] == "phantom:120"
    report = meta["report"]
    assert report["train_rows"] + report["val_rows"] == 120 and report["epochs"] == 1
    train_ids = json.loads((tmp_path / "judge" / "train_ids.json").read_text())
    assert len(train_ids) == report["train_rows"] and train_ids == sorted(train_ids)
    for head in ("margin", "shape"):  # a share of the held-out rows: a whole count of them
        correct = report["val_accuracy"][head] * report["val_rows"]
        assert abs(correct - round(correct)) < 1e-9, report
    info = invoke("judge", "info", out)
    assert info.exit_code == 0 and meta["judge_id"] in info.stdout
    again = invoke("judge", "train", "--data", "phantom:120", "--out", out)
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    dry = invoke("judge", "train", "--data", "phantom", "--out", out, "--epochs", "3", "--dry-run")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["train_config"]["epochs"] == 3
    bad = invoke("judge", "train", "--data", "phantom", "--out", out, "--val-fraction", "1.5")
    assert bad.exit_code == 1 and bad.stderr.strip().count("\n") == 0 and "--val-fraction" in bad.stderr

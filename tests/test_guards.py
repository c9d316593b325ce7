"""Guards in `synthesize`: label confidence from a judge, distance to the nearest seed, retries."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from f2m_ray import judge_model
from f2m_ray.evaluation import judge as judge_module
from f2m_ray.core import metrics
from f2m_ray.errors import F2MError
from f2m_ray.bank import default_bank_path, load_feature_bank
from f2m_ray.labels import parse_category
from f2m_ray.core.mixing import plan_sample
from f2m_ray.core.images import to_model_range
from f2m_ray.schema import MANIFEST_NAME, decode_png
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import resolve
from f2m_ray.synthetic import read_table
from f2m_ray_cli.main import _register, cli
from test_judge import TINY
from test_synthesize import CATEGORY, by_index, config

N, ROWS_PER_FILE = 300, 150

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A random-init narrow judge: its scores vary from mass to mass, which is all a guard needs."""
    torch.manual_seed(0)
    model = judge_module.new_judge(TINY, seed=0)
    path = str(tmp_path_factory.mktemp("guard-judge") / "judge")
    return judge_model.save_judge(path, model, judge_model.JudgeTrainConfig(steps=1), {}, data="random init")


def run(model, out, **changes):
    """In-process synthesis (the same actor code as on Ray) of N masses in two files; rows by index."""
    summary = synthesize(config(model, out, n=N, rows_per_file=ROWS_PER_FILE, **changes), report=None, use_ray=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return by_index(read_table(str(out))).to_pandas(), manifest, summary


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory):
    return run(model, tmp_path_factory.mktemp("plain") / "out")


def seed_images(model) -> np.ndarray:
    """Every ROI of the bank (the default seed split "all"), whatever its category."""
    bank = load_feature_bank(default_bank_path(model), with_images=True)
    assert len(bank.pool(parse_category(CATEGORY))) < len(bank.roi_id)  # other categories are in it too
    return np.stack([to_model_range(decode_png(bank.images[r])) for r in bank.seed_rows("all")])  # (R, 64, 64)


def images_of(frame) -> np.ndarray:
    return np.stack([to_model_range(decode_png(image["bytes"])) for image in frame["image"]])


def tries(frame, max_attempts: int) -> np.ndarray:
    """Candidates each sample tried: up to its first passing one, or all of them."""
    return np.where(frame["guards_passed"], frame["attempt"] + 1, max_attempts)


def test_unguarded_rows_carry_the_pixel_distance_to_the_nearest_seed(plain, model):
    frame, manifest, summary = plain
    expected = metrics.nearest_rms_pixel_distances(images_of(frame), seed_images(model))
    np.testing.assert_allclose(frame["nearest_seed_distance"], expected, rtol=1e-5, atol=1e-6)
    assert 0.02 < expected.min() and expected.max() < 2.0
    assert (frame["attempt"] == 0).all() and frame["guards_passed"].all()
    assert frame["label_confidence"].isna().all()
    assert manifest["guards"]["total"] == {"candidates": N, "rejected": 0, "unmet": 0, "rejection_rate": 0.0}
    assert summary.guards is None


def test_seed_distance_guard_retries_each_sample_with_its_own_sub_seeds(plain, model, tmp_path):
    base = plain[0]
    threshold = float(np.median(base["nearest_seed_distance"]))
    frame, manifest, summary = run(model, tmp_path / "guarded", min_seed_distance=threshold, max_attempts=8)
    assert len(frame) == N and frame["sample_id"].nunique() == N
    assert (frame.loc[frame["guards_passed"], "nearest_seed_distance"] >= threshold).all()
    assert frame["guards_passed"].mean() > 0.95  # 8 tries at a median threshold: about 0.5**8 fail
    # Samples whose first candidate passed are the unguarded run's samples, byte for byte.
    first = frame["attempt"] == 0
    assert 0.3 < first.mean() < 0.7
    assert (base.loc[first, "nearest_seed_distance"] >= threshold).all()
    assert (base.loc[~first, "nearest_seed_distance"] < threshold).all()
    for column in ("seed_ids", "weights"):
        assert [list(v) for v in frame.loc[first, column]] == [list(v) for v in base.loc[first, column]]
    assert [i["bytes"] for i in frame.loc[first, "image"]] == [i["bytes"] for i in base.loc[first, "image"]]
    # A retried sample holds the plan of its accepted sub-seed.
    bank = load_feature_bank(default_bank_path(model))
    pool = bank.pool(parse_category(CATEGORY))
    for _, row in frame[~first].head(20).iterrows():
        plan = plan_sample(0, parse_category(CATEGORY).id, int(row["sample_index"]), len(pool), attempt=int(row["attempt"]))
        carried = plan.weights > 0  # only the seeds that carry weight are stored
        assert list(row["seed_ids"]) == list(bank.roi_id[pool[plan.seed_positions[carried]]])
        np.testing.assert_array_equal(np.asarray(row["weights"]), plan.weights[carried])
    # The manifest counts what was tried, per category and in total.
    candidates = int(tries(frame, 8).sum())
    passed = int(frame["guards_passed"].sum())
    total = manifest["guards"]["total"]
    assert total["candidates"] == candidates and total["rejected"] == candidates - passed
    assert total["unmet"] == N - passed and total["rejection_rate"] == round((candidates - passed) / candidates, 6)
    assert manifest["guards"]["per_category"] == {CATEGORY: total}
    assert manifest["guards"]["min_seed_distance"] == threshold and summary.guards == total


def test_unmet_samples_keep_their_closest_candidate_and_are_flagged(plain, model, tmp_path):
    base = plain[0]
    frame, manifest, _ = run(model, tmp_path / "impossible", min_seed_distance=5.0, max_attempts=3)
    assert not frame["guards_passed"].any()
    assert manifest["guards"]["total"] == {"candidates": 3 * N, "rejected": 3 * N, "unmet": N, "rejection_rate": 1.0}
    assert (frame["nearest_seed_distance"].to_numpy() >= base["nearest_seed_distance"].to_numpy()).all()
    assert set(frame["attempt"]) <= {0, 1, 2} and (frame["attempt"] > 0).any()


def test_judge_scores_every_mass_and_the_confidence_guard_uses_them(plain, model, judge, tmp_path):
    scored, manifest, _ = run(model, tmp_path / "scored", judge=judge)
    category = parse_category(CATEGORY)
    loaded = judge_model.load_judge(judge)
    expected = judge_model.label_confidence(loaded.model, images_of(scored), np.full(N, category.margin_id),
                                             np.full(N, category.shape_id))
    np.testing.assert_allclose(scored["label_confidence"], expected, rtol=1e-4, atol=1e-6)
    assert expected.std() > 0
    # Scoring alone changes nothing else.
    assert [i["bytes"] for i in scored["image"]] == [i["bytes"] for i in plain[0]["image"]]
    assert manifest["guards"]["judge_id"] == loaded.judge_id and manifest["arguments"]["judge"] == judge

    threshold = float(np.median(expected))
    guarded, manifest, _ = run(model, tmp_path / "confident", judge=judge, min_label_confidence=threshold)
    passed = guarded["guards_passed"]
    assert passed.mean() > 0.9 and (guarded.loc[passed, "label_confidence"] >= threshold).all()
    assert manifest["guards"]["total"]["rejected"] == int(tries(guarded, 10).sum()) - int(passed.sum())


def test_guarded_run_is_the_same_on_two_ray_actors_and_after_resume(plain, model, judge, ray_local, tmp_path):
    threshold = float(np.median(plain[0]["nearest_seed_distance"]))
    guards = dict(judge=judge, min_seed_distance=threshold, max_attempts=4)
    reference, manifest, _ = run(model, tmp_path / "in-process", **guards)
    out = tmp_path / "ray"
    synthesize(config(model, out, n=N, rows_per_file=ROWS_PER_FILE, workers=2, **guards), report=None)
    on_ray = by_index(read_table(str(out))).to_pandas()
    assert (reference["attempt"] > 0).any()
    for column in ("seed_ids", "weights"):
        assert [list(v) for v in on_ray[column]] == [list(v) for v in reference[column]], column
    for column in ("image", "label_confidence", "nearest_seed_distance", "attempt", "guards_passed"):
        assert on_ray[column].tolist() == reference[column].tolist(), column
    # Resume: one file lost; the guard counts of the kept file come from its metadata.
    (out / MANIFEST_NAME).unlink()
    next((out / "data" / CATEGORY).glob("part-000150-*.parquet")).unlink()
    synthesize(config(model, out, n=N, rows_per_file=ROWS_PER_FILE, resume=True, **guards), report=None,
               use_ray=False)
    assert json.loads((out / MANIFEST_NAME).read_text())["guards"] == manifest["guards"]
    # Other guard settings are another run: resume refuses it.
    with pytest.raises(F2MError, match="cannot resume.*min_seed_distance"):
        synthesize(config(model, out, n=N, rows_per_file=ROWS_PER_FILE, resume=True, judge=judge,
                          min_seed_distance=threshold * 2, max_attempts=4), report=None, use_ray=False)


def test_guard_arguments_are_checked(model, judge, tmp_path):
    out = tmp_path / "o"
    cases = [
        (dict(min_label_confidence=0.5), "--min-label-confidence needs a judge.*--judge"),
        (dict(min_label_confidence=1.5, judge=judge), "probability in \\(0, 1\\], got 1.5"),
        (dict(min_seed_distance=0.0), "--min-seed-distance must be > 0"),
        (dict(min_seed_distance=0.1, max_attempts=0), "--max-attempts must be at least 1"),
        (dict(judge=str(tmp_path / "nowhere")), "no judge at .*nowhere"),
    ]
    for changes, message in cases:
        with pytest.raises(F2MError, match=message):
            resolve(config(model, out, **changes))
    described = "\n".join(resolve(config(model, out, judge=judge, min_label_confidence=0.3,
                                          min_seed_distance=0.1, max_attempts=5)).describe())
    assert "guards      label confidence >= 0.3 and RMS pixel distance to the nearest real ROI of the seed " \
           "split >= 0.1; up to 5 candidates per mass" in described
    assert not out.exists()


def test_cli_guard_error_is_one_line_and_the_summary_counts_rejections(model, tmp_path, monkeypatch):
    from functools import partial

    from f2m_ray.synth import driver as synthesis

    _register()
    runner = CliRunner()
    result = runner.invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--model", model,
                                 "--out", str(tmp_path / "x"), "--min-label-confidence", "0.9"])
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "needs a judge" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()

    monkeypatch.setattr(synthesis, "synthesize", partial(synthesis.synthesize, use_ray=False))
    result = runner.invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--model", model,
                                 "--out", str(tmp_path / "y"), "--min-seed-distance", "5", "--max-attempts", "2"])
    assert result.exit_code == 0, result.output
    assert "guards: 20 of 20 candidates rejected (100.0%)" in result.stdout
    assert "warning: 10 masses passed no guard in 2 attempts" in result.stderr

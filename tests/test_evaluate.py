"""`evaluate` end to end on phantoms and small synthetic fixtures; bad inputs refused in one line."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from f2m_ray.evaluation import evaluate as evaluate_module
from f2m_ray import judge_model
from f2m_ray.evaluation import judge as judge_module
from f2m_ray.evaluation import usefulness as usefulness_module
from f2m_ray.errors import F2MError
from f2m_ray.bank import write_feature_bank
from f2m_ray.labels import parse_category
from f2m_ray.data.phantom import generate_phantoms
from f2m_ray.core.images import to_model_range
from f2m_ray.data.rows import assign_split
from f2m_ray.schema import MANIFEST_NAME, SCHEMA_VERSION, SYNTHETIC_SCHEMA, image_column, png_bytes, write_table
from f2m_ray_cli.main import _register, cli

REAL = "phantom:200"
VAL_FRACTION = 0.3
CATEGORIES = [parse_category(c) for c in ("ill-defined-round", "spiculated-irregular", "circumscribed-oval")]
TINY = judge_model.JudgeConfig(stem_channels=4, channels=(8, 8, 16, 16), feature_dim=16, dropout=0.0)
FAST = dict(usefulness_steps=4, usefulness_real=40, usefulness_synthetic=60)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def real_phantoms():
    """phantom:200 of seed 0 as the reader makes it: (ids, uint8 images, categories, splits)."""
    rows = list(generate_phantoms(200, 0))
    ids = [f"phantom-{i:06d}" for i, _, _ in rows]
    return ids, np.stack([img for _, img, _ in rows]), [c for _, _, c in rows], assign_split(ids, VAL_FRACTION, 0)


def write_synthetic(path, images, categories, seed_ids, manifest=True, bank=None):
    """A synthetic dataset as `f2m-ray synthesize` lays it out: one Parquet file and the manifest."""
    n = len(images)
    table = pa.table(
        {
            "sample_id": [f"{c.name}-{i:09d}" for i, c in enumerate(categories)],
            "sample_index": list(range(n)),
            "image": image_column([png_bytes(im) for im in images], [f"{i}.png" for i in range(n)]),
            "height": pa.array([images.shape[1]] * n, pa.int32()),
            "width": pa.array([images.shape[2]] * n, pa.int32()),
            "margin": [c.margin for c in categories],
            "shape": [c.shape for c in categories],
            "category": [c.name for c in categories],
            "margin_id": [c.margin_id for c in categories],
            "shape_id": [c.shape_id for c in categories],
            "seed_ids": seed_ids,
            "weights": [[1.0 / len(s)] * len(s) for s in seed_ids],
            "model_id": ["0" * 16] * n,
            "bank_id": ["1" * 16] * n,
            "run_seed": [0] * n,
            "label_confidence": pa.nulls(n, pa.float32()),
            "nearest_seed_distance": pa.nulls(n, pa.float32()),
            "attempt": pa.array([0] * n, pa.int32()),
            "guards_passed": [True] * n,
        },
        schema=SYNTHETIC_SCHEMA,
    )
    write_table(table, str(path / "part-000.parquet"))
    counts = {}
    for c in categories:
        counts[c.name] = counts.get(c.name, 0) + 1
    if manifest:
        (path / MANIFEST_NAME).write_text(json.dumps({
            "format": "f2m-ray-synthetic", "schema_version": SCHEMA_VERSION, "model_id": "0" * 16, "rows": n,
            "counts": counts, "files": [{"path": "part-000.parquet", "category": "mixed", "rows": n, "start": 0, "stop": n}],
            "arguments": {"bank": bank} if bank else {},
        }))
    return str(path)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """A tiny judge trained on the real phantoms' training split, and three synthetic datasets."""
    root = tmp_path_factory.mktemp("evaluate")
    ids, images, categories, splits = real_phantoms()
    data = judge_module.LabeledArrays(
        np.array(ids), to_model_range(images), np.array([c.margin_id for c in categories]),
        np.array([c.shape_id for c in categories]), np.array(splits))
    train_config = judge_model.JudgeTrainConfig(epochs=2, batch_size=32, val_fraction=VAL_FRACTION)
    torch.set_num_threads(1)
    model, report = judge_module.train_judge(data, TINY, train_config)
    judge_train_ids = [i for i, s in zip(ids, splits) if s == "train"]
    judge_path = judge_model.save_judge(str(root / "judge"), model, train_config, report, data=REAL,
                                         train_ids=judge_train_ids)

    # The GAN's feature bank: it trained on the training-split phantoms among the first 100 only.
    gan_train = np.array([s == "train" and i < 100 for i, s in enumerate(splits)])
    bank = write_feature_bank(
        str(root / "feature_bank.parquet"), np.array(ids), np.array([c.margin_id for c in categories]),
        np.array([c.shape_id for c in categories]), np.where(gan_train, "train", "val"), np.array(ids),
        np.array(["phantom"] * 200), [png_bytes(im) for im in images], np.zeros((200, 4), np.float32), "0" * 16)

    # "fresh": phantoms of another seed in the three categories, mixed from training seeds.
    fresh = list(generate_phantoms(60, 7, CATEGORIES))
    train_ids = [i for i, s in zip(ids, splits) if s == "train"]
    fresh_dir = root / "fresh"
    fresh_dir.mkdir()
    write_synthetic(fresh_dir, np.stack([im for _, im, _ in fresh]), [c for _, _, c in fresh],
                    [train_ids[i % len(train_ids): i % len(train_ids) + 3] for i in range(60)])

    # "copies": exact copies of training phantoms of the three categories.
    copy_rows = [i for i, (c, s) in enumerate(zip(categories, splits)) if c in CATEGORIES and s == "train"]
    copies_dir = root / "copies"
    copies_dir.mkdir()
    write_synthetic(copies_dir, images[copy_rows], [categories[i] for i in copy_rows], [[ids[i]] for i in copy_rows],
                    bank=bank)
    seen = gan_train.copy()
    seen[copy_rows] = True
    heldout = ~seen & (np.array(splits) != "train")  # the judge trained on the whole training split

    # "small": 32x32 masses; "unfinished": no manifest.
    small_dir, unfinished_dir = root / "small", root / "unfinished"
    small_dir.mkdir()
    unfinished_dir.mkdir()
    write_synthetic(small_dir, images[:6, :32, :32], categories[:6], [[ids[0]]] * 6)
    write_synthetic(unfinished_dir, images[:6], categories[:6], [[ids[0]]] * 6, manifest=False)
    return {"root": root, "judge": judge_path, "fresh": str(fresh_dir), "copies": str(copies_dir),
            "small": str(small_dir), "unfinished": str(unfinished_dir), "copy_rows": len(copy_rows),
            "copies_seen": int(seen.sum()), "copies_heldout": int(heldout.sum()), "bank": bank}


def test_exact_copies_are_flagged_memorized(ray_local, fixtures, tmp_path):
    config = evaluate_module.EvaluateConfig(**FAST)
    report = evaluate_module.evaluate(fixtures["copies"], REAL, str(tmp_path / "report"), fixtures["judge"], config)
    overall = report["groups"]["overall"]
    assert overall["synthetic_rows"] == fixtures["copy_rows"]
    assert overall["memorization"]["share"] == 1.0 and overall["memorization"]["share_pixels"] == 1.0
    assert overall["memorization"]["median_distance_pixels"] == 0.0
    for category in ("ill-defined-round", "spiculated-irregular", "circumscribed-oval"):
        assert report["groups"][category]["memorization"]["count"] == report["groups"][category]["synthetic_rows"]
    assert report["config"]["val_fraction"] == VAL_FRACTION  # taken from the judge
    # Seen: the bank's training rows plus the seeds; held out: neither those nor the judge's training rows.
    inputs = report["inputs"]
    assert inputs["gan_training_set"] == f"feature bank {fixtures['bank']}"
    assert (inputs["seen_real_rows"], inputs["heldout_real_rows"]) == (fixtures["copies_seen"], fixtures["copies_heldout"])
    assert report["judge"]["training_set"] == "recorded roi ids"
    assert (tmp_path / "report" / "report.json").exists() and (tmp_path / "report" / "report.html").exists()


def invoke(*args):
    """The real command, in this process (shares the session's Ray)."""
    _register()
    return CliRunner().invoke(cli, list(args))


def test_cli_end_to_end(ray_local, fixtures, tmp_path):
    out = tmp_path / "report"
    result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--judge", fixtures["judge"],
                    "--out", str(out), "--usefulness-steps", "4", "--usefulness-real", "12",
                    "--usefulness-synthetic", "30", "--usefulness-protocol", "classic")
    assert result.exit_code == 0, result.output
    assert "label fidelity" in result.stdout and "usefulness" in result.stdout
    assert "usefulness: 3 classifiers as Ray tasks: 3/3" in result.stderr  # progress lines name each step
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "f2m-ray-evaluation"
    assert report["inputs"]["synthetic_rows"] == 60
    assert report["inputs"]["seen_real_rows"] + report["inputs"]["heldout_real_rows"] == 200
    assert set(report["groups"]) == {"overall", "ill-defined-round", "spiculated-irregular", "circumscribed-oval"}
    overall = report["groups"]["overall"]
    assert set(overall) == {"synthetic_rows", "heldout_real_rows", "label_fidelity", "realism", "precision_recall",
                            "density_coverage", "diversity", "outline_spread", "memorization"}
    for name in ("overall", "spiculated-irregular"):  # phantoms of another seed: outlines as varied as real ones
        spread = report["groups"][name]["outline_spread"]
        assert 0.3 < spread["synthetic"] < 0.9 and 0.3 < spread["heldout_real"] < 0.9
        assert spread["ratio"] == pytest.approx(spread["synthetic"] / spread["heldout_real"])
    dc = overall["density_coverage"]
    assert dc["rows"] == overall["heldout_real_rows"] and dc["k"] == min(5, dc["rows"] - 1) and 0.0 < dc["coverage"] <= 1.0
    assert dc["density"] > 0.0 and "coverage (k = 5)" in (out / "report.html").read_text()
    assert overall["synthetic_rows"] == sum(report["groups"][c]["synthetic_rows"] for c in report["inputs"]["categories"])
    assert overall["heldout_real_rows"] == report["inputs"]["heldout_real_rows_in_categories"]
    for head in ("margin", "shape"):  # the judge's reading of the 60 synthetic masses: a whole count of them
        correct = overall["label_fidelity"]["synthetic"][head] * 60
        assert abs(correct - round(correct)) < 1e-9, overall["label_fidelity"]
    assert overall["realism"]["synthetic_vs_heldout"] > 0.0 and overall["realism"]["floor_half_vs_half"] > 0.0
    assert overall["precision_recall"]["rows"] == overall["heldout_real_rows"]
    assert overall["memorization"]["share"] < 0.5  # phantoms of another seed are not copies
    useful = report["usefulness"]
    assert (useful["R"], useful["S"], useful["steps"], useful["real_share"]) == (12, 30, 4, 0.5)
    rows = {k: v["train_rows"] for k, v in useful["classifiers"].items()}
    assert rows == {"real": 12, "real_plus_synthetic": 42, "synthetic": 30}
    delta = useful["delta_vs_real"]["real_plus_synthetic"]["mean"]
    assert delta == pytest.approx(useful["classifiers"]["real_plus_synthetic"]["accuracy"]["mean"]
                                  - useful["classifiers"]["real"]["accuracy"]["mean"])
    page = (out / "report.html").read_text()
    assert "<tr><th>spiculated-irregular</th>" in page and "<th class='metric'>outline spread: synthetic</th>" in page
    assert page.count("data:image/png;base64,") == 6  # synthetic and real strip per category
    assert page.count("<svg") == 2 and "spiculated-irregular" in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_cli_scarce_protocol_is_the_default(ray_local, fixtures, tmp_path):
    out = tmp_path / "report"
    result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--judge", fixtures["judge"],
                    "--out", str(out), "--usefulness-steps", "3", "--usefulness-real", "12",
                    "--usefulness-synthetic", "30", "--usefulness-seeds", "2")
    assert result.exit_code == 0, result.output
    useful = json.loads((out / "report.json").read_text())["usefulness"]
    assert (useful["protocol"], useful["R"], useful["S"], useful["seeds"], useful["mixup_alpha"]) == (
        "scarce", 12, 30, 2, 0.4)
    assert list(useful["arms"]) == ["real", "real_mixup", "real_plus_synthetic"]
    assert all(len(arm["accuracy"]["mean"]["runs"]) == 2 for arm in useful["arms"].values())
    assert "usefulness: 6 classifiers as Ray tasks: 6/6" in result.stderr
    assert "real_plus_synthetic" in result.stdout and "points vs real" in result.stdout
    page = (out / "report.html").read_text()
    assert "Usefulness (scarce real data)" in page and "real + mixup" in page and "&plusmn;" in page


def test_different_image_sizes_refused(ray_local, fixtures, tmp_path):
    with pytest.raises(F2MError, match="synthetic masses are 32x32 pixels but the real ones are 64x64"):
        evaluate_module.evaluate(fixtures["small"], REAL, str(tmp_path / "r"), None, evaluate_module.EvaluateConfig(**FAST))
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.slow
def test_bad_inputs_one_line(fixtures, tmp_path):
    out = str(tmp_path / "r")
    # A real process: the user sees one line on stderr and exit status 1, no traceback.
    result = subprocess.run([sys.executable, "-m", "f2m_ray_cli", "evaluate", "--synthetic", fixtures["unfinished"],
                             "--real", REAL, "--judge", fixtures["judge"], "--out", out], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a synthetic dataset: no _manifest.json" in lines[0], result.stderr

    foreign = tmp_path / "judge"
    foreign.mkdir()
    meta = json.loads((fixtures["root"] / "judge" / "f2m_judge.json").read_text())
    meta["vocabulary"]["shapes"] = ["round", "oval"]
    (foreign / "f2m_judge.json").write_text(json.dumps(meta))
    result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--judge", str(foreign), "--out", out)
    assert result.exit_code == 1 and "was written with another BI-RADS vocabulary" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--out", out, "--usefulness-steps", "0")
    assert result.exit_code == 1 and "--usefulness-steps must be a positive integer" in result.stderr
    for option, value, message in (("--usefulness-seeds", "0", "--usefulness-seeds must be a positive integer, got 0"),
                                   ("--mixup-alpha", "0", "--mixup-alpha must be a positive number"),
                                   ("--mixup-alpha", "nan", "--mixup-alpha must be a positive number"),
                                   ("--usefulness-protocol", "fair", "'fair' is not one of 'scarce', 'classic'")):
        result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--out", out, option, value)
        assert result.exit_code in (1, 2) and message in result.output, (option, value, result.output)
        assert "Traceback" not in result.output
    for share, message in (("1.5", "--usefulness-real-share must be between 0 and 1 (or 'uniform'), got 1.5"),
                           ("half", "--usefulness-real-share must be a number between 0 and 1 or 'uniform', got 'half'")):
        result = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--out", out,
                        "--usefulness-real-share", share)
        assert result.exit_code == 1 and message in result.stderr and result.stderr.strip().count("\n") == 0
    dry = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--out", out, "--dry-run", "--k", "5",
                 "--usefulness-real-share", "uniform")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["config"]["k"] == 5
    assert json.loads(dry.stdout)["config"]["usefulness_real_share"] is None
    dry = invoke("evaluate", "--synthetic", fixtures["fresh"], "--real", REAL, "--out", out, "--dry-run")
    assert json.loads(dry.stdout)["config"]["usefulness_real_share"] == 0.5
    assert not (tmp_path / "r").exists()


def test_mixing_weights_give_the_real_share():
    weights = usefulness_module.mixing_weights(200, 10_000, 0.5)
    assert weights.shape == (10_200,)
    assert weights[:200].sum() == pytest.approx(0.5) and weights[200:].sum() == pytest.approx(0.5)
    assert len(set(weights[:200])) == 1 and len(set(weights[200:])) == 1  # uniform within each part
    assert usefulness_module.mixing_weights(40, 60, 0.25)[:40].sum() == pytest.approx(0.25)
    assert usefulness_module.mixing_weights(200, 10_000, None) is None  # uniform over the union
    assert usefulness_module.mixing_weights(0, 60, 0.5) is None and usefulness_module.mixing_weights(40, 0, 0.5) is None


def test_progress_printer_lines():
    import io

    stream = io.StringIO()
    printer = evaluate_module.ProgressPrinter(stream)
    for done in range(0, 101, 10):
        printer("usefulness: real (200)", done, 100)
    lines = stream.getvalue().splitlines()
    # Not a terminal: one line per quarter (0, 25, 50, 75, 100 percent reached).
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == ["real", "real", "real", "real", "real"]
    assert [line.split()[3] for line in lines] == ["0/100", "30/100", "50/100", "80/100", "100/100"]


def _seen_and_heldout():
    """The real phantoms of CATEGORIES as (training split, held-out split) LabeledArrays."""
    ids, images, categories, splits = real_phantoms()
    rows = [i for i, c in enumerate(categories) if c in CATEGORIES]
    real = judge_module.LabeledArrays(
        np.array(ids)[rows], to_model_range(images[rows]), np.array([categories[i].margin_id for i in rows]),
        np.array([categories[i].shape_id for i in rows]), np.array(splits)[rows])
    return real.where_split("train"), real.where_split("val")


def _phantom_arrays(n: int, seed: int):
    """Fresh phantoms standing in for a synthetic dataset."""
    fresh = list(generate_phantoms(n, seed, CATEGORIES))
    return evaluate_module.SyntheticArrays(
        to_model_range(np.stack([im for _, im, _ in fresh])), np.array([c.margin_id for *_, c in fresh]),
        np.array([c.shape_id for *_, c in fresh]), np.array([c.name for *_, c in fresh]), set(), {})


def test_usefulness_on_ray_tasks_matches_in_process(ray_local):
    seen, heldout = _seen_and_heldout()
    synthetic = _phantom_arrays(30, 7)
    config = evaluate_module.EvaluateConfig(usefulness_real=10, usefulness_synthetic=20, usefulness_steps=3)
    args = (TINY, judge_model.JudgeTrainConfig(batch_size=8), seen, heldout, synthetic, config, 0)
    local = usefulness_module.usefulness(*args, runner=usefulness_module.run_in_process)
    remote = usefulness_module.usefulness(*args, runner=usefulness_module.run_on_ray)
    assert local == remote
    assert {k: v["train_rows"] for k, v in local["classifiers"].items()} == {
        "real": 10, "real_plus_synthetic": 30, "synthetic": 20}
    assert local["test_rows"] == len(heldout) and set(local["classifiers"]["real"]["categories"]) == {
        c.name for c in CATEGORIES}


def test_scarce_protocol_arms_seeds_and_deltas(ray_local):
    seen, heldout = _seen_and_heldout()
    sets = {"a": _phantom_arrays(30, 7), "b": _phantom_arrays(24, 8)}
    kwargs = dict(real=10, synthetic=20, steps=3, seeds=3, seed=0)
    args = (TINY, judge_model.JudgeTrainConfig(batch_size=8), seen, heldout, sets)
    local = usefulness_module.scarce_usefulness(*args, **kwargs, runner=usefulness_module.run_in_process)
    remote = usefulness_module.scarce_usefulness(*args, **kwargs, runner=usefulness_module.run_on_ray)
    assert local == remote
    arms = local["arms"]
    assert list(arms) == ["real", "real_mixup", "real_plus_synthetic:a", "real_plus_synthetic:b"]
    assert (local["R"], local["S"], local["seeds"], local["test_rows"]) == (10, 20, 3, len(heldout))
    assert [arms[a]["synthetic_rows"] for a in arms] == [0, 0, 20, 20]
    for arm in arms:
        runs = arms[arm]["accuracy"]["mean"]["runs"]
        assert len(runs) == 3 and arms[arm]["accuracy"]["mean"]["mean"] == pytest.approx(np.mean(runs))
        assert arms[arm]["accuracy"]["mean"]["sd"] == pytest.approx(np.std(runs, ddof=1))
    base = arms["real"]["accuracy"]["mean"]["runs"]
    assert arms["real"]["delta_vs_real"] is None
    delta = arms["real_plus_synthetic:a"]["delta_vs_real"]["mean"]["runs"]
    assert delta == pytest.approx([a - b for a, b in zip(arms["real_plus_synthetic:a"]["accuracy"]["mean"]["runs"], base)])
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        usefulness_module.scarce_usefulness(*args, **{**kwargs, "seeds": 0})


def test_mixup_changes_what_the_classifier_learns():
    ids, images, categories, _ = real_phantoms()
    x = to_model_range(images[:40])
    m = np.array([c.margin_id for c in categories[:40]])
    s = np.array([c.shape_id for c in categories[:40]])
    out = {}
    for alpha in (0.0, 0.4):
        model = judge_module.new_judge(TINY, 0)
        result = judge_module.fit(model, x, m, s, judge_model.JudgeTrainConfig(batch_size=8, steps=4, mixup_alpha=alpha))
        out[alpha] = (result["steps"], [p.detach().clone() for p in model.parameters()])
    assert out[0.0][0] == out[0.4][0] == 4
    assert not all(torch.equal(a, b) for a, b in zip(out[0.0][1], out[0.4][1]))

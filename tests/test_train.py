"""`f2m-ray train` on local Ray: 2 DDP workers on tiny phantoms, checkpoints, resume, S3, bad input."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2m_ray.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from f2m_ray.config import PRESETS
from f2m_ray.errors import F2MError
from f2m_ray.core.networks import build_networks
from f2m_ray.train.driver import train
from f2m_ray.train.options import RunOptions, describe_run, resolve_run
from f2m_ray.train.worker import state_checksum
from f2m_ray.train.report import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
# phantom:200 -> 173 train rows (seed 0) -> 86 per worker -> 5 steps of 16 per epoch and rank.
STEPS_PER_EPOCH = 5


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "f2m_ray_cli", *args], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---------------------------------------------------------------- one local run: 2 epochs, then resumed to 3


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory):
    """2 epochs, then the same call asked for 3: the second resumes the run from its epoch-2 checkpoint."""
    storage = str(tmp_path_factory.mktemp("runs"))
    first: list[str] = []
    lines: list[str] = []
    options = RunOptions(data="phantom:200", workers=2, storage=storage, name="local", feature_bank=False)
    # with G's weight average (half-life 160 images: 5 steps of 32), as a recipe that keeps one trains
    started = train(TINY.with_train(epochs=2, keep_checkpoints=2, ema_kimg=0.16), options, echo=first.append)
    summary = train(TINY.with_train(epochs=3, keep_checkpoints=2, ema_kimg=0.16), options, echo=lines.append)
    return {"storage": storage, "options": options, "started": started, "summary": summary, "first": first,
            "lines": lines}


@pytest.mark.slow
def test_a_second_call_resumes_the_run_where_its_checkpoint_left_it(local_run):
    run_dir = Path(local_run["storage"]) / "local"
    assert (local_run["started"].start_epoch, local_run["started"].end_epoch) == (0, 2)
    assert (local_run["summary"].start_epoch, local_run["summary"].end_epoch) == (2, 3)
    assert local_run["first"][0] == f"new run {run_dir}"
    assert local_run["lines"][0] == f"resuming run {run_dir} from epoch 2 ({run_dir}/checkpoint_epoch_000002)"
    assert [line.split()[1] for line in local_run["lines"] if line.startswith("epoch")] == ["3/3"]
    assert [r["event"] for r in read_metrics(str(run_dir), events=True) if "event" in r] == ["start", "start"]
    # Adam's state came back with the weights: its step counts every step of both calls, not the last call's 5.
    state = load_checkpoint(str(run_dir), with_optimizer=True).optim_state["generator"]["state"]
    assert {int(v["step"]) for v in state.values()} == {3 * STEPS_PER_EPOCH}


@pytest.mark.slow
def test_embedded_ray_trains_without_a_preemption_watcher(local_run):
    """A single machine has no cloud node to be drained: Ray Train's watcher would be one idle process more."""
    from ray._private.state import actors

    classes = {a["ActorClassName"] for a in actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= classes and "PreemptionWatcher" not in classes, classes


@pytest.mark.slow
def test_three_epochs_leave_the_last_two_checkpoints_metrics_and_pictures(local_run):
    run_dir = Path(local_run["storage"]) / "local"
    # keep-last-2: epoch 1 was dropped when epoch 3 arrived
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_000002", "checkpoint_epoch_000003"]
    meta = read_metadata(str(run_dir))
    assert (meta["epoch"], meta["step"], meta["preset"]["name"]) == (3, 3 * STEPS_PER_EPOCH, "tiny")
    assert meta["extra"]["world_size"] == 2 and meta["extra"]["train_rows"] == 173
    rows = read_metrics(str(run_dir))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [5, 10, 15]
    assert all(r["images"] == 2 * STEPS_PER_EPOCH * 16 for r in rows)
    for r in rows:  # accuracies of 27 held-out phantoms: whole counts out of 27
        assert r["val_rows"] == 27
        assert [abs(r[k] * 27 - round(r[k] * 27)) < 1e-9 for k in ("val_margin_accuracy", "val_shape_accuracy")] == [True, True]
    assert png_size((run_dir / "loss_curve.png").read_bytes()) == (960, 600)
    # one row per category (20 phantom categories) of 64 px under a 16 px header
    width, height = png_size((run_dir / "samples" / "epoch_000003.png").read_bytes())
    assert height == 16 + 20 * 64
    epoch_lines = [line for line in local_run["first"] + local_run["lines"] if line.startswith("epoch")]
    assert len(epoch_lines) == 3 and "img/s" in epoch_lines[0] and "margin" in epoch_lines[0]


@pytest.mark.slow
def test_the_weight_average_is_kept_and_held_out_masses_are_scored_each_epoch(local_run):
    import torch

    from f2m_ray.checkpoint import load_generator

    run_dir = str(Path(local_run["storage"]) / "local")
    state = load_checkpoint(run_dir).model_state
    assert set(state) == {"generator", "generator_ema", "d_margin", "d_shape"}
    moved = [not torch.equal(state["generator"][k], state["generator_ema"][k])
             for k in state["generator"] if state["generator"][k].is_floating_point() and "running" not in k]
    assert any(moved)  # the average lags the live weights
    loaded, meta = load_generator(run_dir)
    assert all(torch.equal(v, state["generator_ema"][k]) for k, v in loaded.state_dict().items())
    rows = read_metrics(run_dir)
    for row in rows:  # phantom data: 16 held-out masses of each paper category, scored on every sample grid
        assert -1.0 <= row["mass_fidelity"] <= 1.0
        assert row["mass_identity"] * 16 * 3 == pytest.approx(round(row["mass_identity"] * 48), abs=1e-9)
    epoch_lines = [line for line in local_run["first"] + local_run["lines"] if line.startswith("epoch")]
    assert all(f"mass fidelity {row['mass_fidelity']:.2f} identity" in line for row, line in zip(rows, epoch_lines))


@pytest.mark.slow
def test_ranks_hold_identical_parameters(local_run):
    rows = read_metrics(str(Path(local_run["storage"]) / "local"))
    for row in rows:
        assert len(row["rank_checksums"]) == 2
        assert row["rank_checksums"][0] == row["rank_checksums"][1]
    assert rows[0]["rank_checksums"][0] != rows[1]["rank_checksums"][0]  # weights moved between epochs
    # the checksum is of the state that was saved: recompute it from the last (epoch-3) checkpoint
    loaded = load_checkpoint(str(Path(local_run["storage"]) / "local"))
    nets = loaded.networks()
    assert state_checksum(*nets) == rows[-1]["rank_checksums"][0]


@pytest.mark.slow
def test_resuming_with_another_preset_is_refused_before_ray(local_run):
    result = run_cli("train", "--preset", "small", "--storage", local_run["storage"], "--name", "local",
                     "--epochs", "5", "--workers", "2")
    assert_one_line_error(result, "was trained with preset 'tiny'")


@pytest.mark.slow
def test_run_already_at_its_epochs_trains_nothing(local_run):
    lines: list[str] = []
    options = RunOptions(**{**local_run["options"].__dict__, "feature_bank": False})
    summary = train(TINY.with_train(epochs=1), options, echo=lines.append)
    assert summary.start_epoch == summary.end_epoch >= 2
    assert "nothing to train" in lines[0]


# ---------------------------------------------------------------- bad input


def _write_manifest(folder: Path, rows: list[tuple[str, str, str]], missing: set[str] = frozenset()) -> str:
    """A manifest of 64x64 PNGs, one per (margin, shape, split) row; names in `missing` are not written."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["path,margin,shape,split"]
    for i, (margin, shape, split) in enumerate(rows):
        name = f"images/{i:04d}.png"
        if name not in missing:
            Image.fromarray(np.full((64, 64), 40 + i % 200, dtype=np.uint8)).save(folder / name)
        lines.append(f"{name},{margin},{shape},{split}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "manifest.csv")


def _options(tmp_path, data: str, **changes) -> RunOptions:
    values = {"data": data, "workers": 2, "storage": str(tmp_path / "runs"), "name": "bad", "feature_bank": False}
    return RunOptions(**{**values, **changes})


def test_empty_manifest_is_refused(ray_local, tmp_path):
    manifest = _write_manifest(tmp_path, [])
    with pytest.raises(F2MError, match="no usable rows"):
        train(TINY, _options(tmp_path, manifest), echo=lambda line: None)


def test_unreadable_dataset_is_refused(ray_local, tmp_path):
    rows = [("circumscribed", "round", "train")] * 8
    manifest = _write_manifest(tmp_path, rows, missing={f"images/{i:04d}.png" for i in range(8)})
    with pytest.raises(F2MError, match=r"nothing usable in manifest .*missing file x8") as err:
        train(TINY, _options(tmp_path, manifest), echo=lambda line: None)
    assert "\n" not in str(err.value)


def test_category_without_training_samples_is_refused(ray_local, tmp_path):
    rows = [("circumscribed", "round", "train")] * 40 + [("spiculated", "irregular", "val")] * 3
    manifest = _write_manifest(tmp_path, rows)
    with pytest.raises(F2MError, match="category spiculated-irregular has no samples in the train split"):
        train(TINY, _options(tmp_path, manifest), echo=lambda line: None)


def test_more_workers_than_the_cluster_is_refused(ray_local, tmp_path):
    with pytest.raises(F2MError, match="--workers 64 needs 64 CPU slots but the Ray cluster has"):
        train(TINY.with_train(batch_size=64), _options(tmp_path, "phantom:100", workers=64), echo=lambda line: None)


def test_unwritable_storage_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(F2MError, match="cannot write to storage"):
        train(TINY, _options(tmp_path, "phantom:100", storage=str(blocker)), echo=lambda line: None)


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    small = PRESETS["small"]
    save_checkpoint(str(tmp_path / "runs" / "bad" / "checkpoint_epoch_000001"), small, *build_networks(small.model),
                    epoch=1, step=3)
    with pytest.raises(F2MError, match="trained with preset 'small'; refusing to resume it with preset 'tiny'"):
        train(TINY, _options(tmp_path, "phantom:100"), echo=lambda line: None)


def test_cli_bad_input_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("train", "--storage", str(blocker), "--name", "r", "--preset", "tiny"),
                          "cannot write to storage")
    assert_one_line_error(run_cli("train", "--preset", "huge", "--dry-run"), "unknown preset 'huge'")
    assert_one_line_error(run_cli("train", "--workers", "3", "--batch-size", "32", "--dry-run"),
                          "does not split evenly over 3 workers")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[train]\nepochz = 3\n")
    assert_one_line_error(run_cli("train", "--config", str(bad_config), "--dry-run"), "unknown TrainConfig field(s): epochz")


# ---------------------------------------------------------------- configuration


def test_config_file_and_flags_resolve_onto_the_dataclasses(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[train]\nepochs = 7\nlr = 1e-4\n[run]\ndata = "phantom:300"\nworkers = 2\n'
                    f'storage = "{tmp_path}"\nname = "from-file"\n')
    preset, options = resolve_run(str(toml), train_overrides={"epochs": 9, "batch_size": None})
    assert (preset.name, preset.train.epochs, preset.train.lr, preset.train.batch_size) == ("tiny", 9, 1e-4, 32)
    assert (options.data, options.workers, options.name, options.run_dir) == (
        "phantom:300", 2, "from-file", str(tmp_path / "from-file"))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: tiny\ntrain: {epochs: 4}\nrun: {workers: 1, use_gpu: false}\n")
    preset, options = resolve_run(str(yaml_file), run_overrides={"name": "y"})
    assert (preset.train.epochs, options.workers, options.use_gpu, options.name) == (4, 1, False, "y")
    with pytest.raises(F2MError, match="unknown run option"):
        resolve_run(None, "tiny", run_overrides={"wrokers": 2})
    text = describe_run(preset, options)
    assert "preset    tiny" in text and "workers   1" in text and "gpu       no" in text


def test_dry_run_prints_without_starting_ray(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[train]\nepochs = 7\n[run]\nname = "cfg"\n')
    result = run_cli("train", "--config", str(toml), "--epochs", "11", "--storage", str(tmp_path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "epochs=11" in result.stdout and f"{tmp_path}/cfg" in result.stdout and "preset    tiny" in result.stdout
    assert not (tmp_path / "cfg").exists()  # nothing written
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--preset", "tiny", "--name", "j",
                          "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "preset    tiny" in job.stdout and f"run       {tmp_path}/f2m-runs/j" in job.stdout


def test_epoch_line_shows_the_mix_term_only_when_trained():
    from f2m_ray.train.report import format_epoch_line

    row = {"epoch": 3, "images_per_second": 50.0, "d_margin_loss": 1.0, "d_shape_loss": 2.0, "g_loss": 3.0,
           "g_adversarial": 0.7, "l1": 0.08, "val_l1": 0.09, "val_margin_accuracy": 0.5, "val_shape_accuracy": 0.25}
    plain = format_epoch_line(row, 10)
    assert "(adv 0.700)" in plain and "mix" not in plain
    mixed = format_epoch_line({**row, "g_mix_adversarial": 1.25, "g_mix_labels": 0.5}, 10)
    assert "(adv 0.700, mix adv 1.250)" in mixed and mixed.startswith("epoch    3/10")


def test_mix_weight_flag_and_loss_table(tmp_path):
    from f2m_ray.train.options import resolve_run

    preset, _ = resolve_run(None, "small", loss_overrides={"lambda_mix": 0.5})
    assert preset.loss.lambda_mix == 0.5 and preset.loss.fake_label_weight == 0.1  # the rest of small stays
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "paper"\n[loss]\nlambda_mix = 2.0\n')
    preset, _ = resolve_run(str(toml), loss_overrides={"lambda_mix": None})
    assert preset.name == "paper" and preset.loss.lambda_mix == 2.0
    with pytest.raises(F2MError, match="--mix-weight \\(lambda_mix\\) must be >= 0, got -1"):
        resolve_run(None, "tiny", loss_overrides={"lambda_mix": -1.0})
    toml.write_text('[loss]\nlambda_mixx = 1\n')
    with pytest.raises(F2MError, match="unknown LossConfig field\\(s\\): lambda_mixx"):
        resolve_run(str(toml))
    assert PRESETS["paper"].loss.lambda_mix == 0.0  # the paper's eq. 3-5


def test_relative_paths_mean_the_folder_the_command_ran_in(tmp_path, monkeypatch):
    from f2m_ray.train.options import resolve_run

    monkeypatch.chdir(tmp_path)
    _, options = resolve_run(None, "tiny", run_overrides={"storage": "runs", "name": "demo", "data": "rois/labels.csv"})
    assert options.run_dir == str(tmp_path / "runs" / "demo") and options.data == str(tmp_path / "rois" / "labels.csv")
    _, options = resolve_run(None, "tiny", run_overrides={"storage": "s3://bucket/runs", "name": "d", "data": "phantom:50"})
    assert options.run_dir == "s3://bucket/runs/d" and options.data == "phantom:50"

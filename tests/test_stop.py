"""Stopped by a scheduler (SIGTERM) or by hand (Ctrl-C): one line of ours, the usual exit status, and a
resume that gives what an undisturbed run gives."""

from __future__ import annotations

import os
import shlex
import signal

import pytest
from click.testing import CliRunner

from f2m_ray.checkpoint import load_checkpoint
from f2m_ray.runtime import stop
from f2m_ray.synth.driver import synthesize
from f2m_ray.synth.plan import SynthesisConfig
from f2m_ray.train.report import read_metrics
from f2m_ray_cli.main import _register, cli
from test_faults import f2m, wait_for

CATEGORY = "spiculated-irregular"
NATIVE_DUMP = ("SIGTERM received at time", "PC: @", "*** ", "Traceback")


@pytest.fixture()
def sigterm_restored():
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    saved = dict(stop._state, notes=list(stop._state["notes"]))
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    stop._state.clear()
    stop._state.update(saved)


def test_sigterm_raises_stopped_in_the_main_thread_once(sigterm_restored):
    stop.stop_on_signals()
    with pytest.raises(stop.Stopped) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs at the next bytecode boundary
            pass
    assert caught.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    stop.on_stop(lambda: "3 files kept")
    assert stop.stop_line(caught.value) == ("stopped by SIGTERM: 3 files kept", 143)
    # re-raised by a library as a plain KeyboardInterrupt, the signal that started it is still named
    assert stop.stop_line(KeyboardInterrupt()) == ("stopped by SIGTERM: 3 files kept", 143)
    stop._state["signum"] = None
    assert stop.stop_line(KeyboardInterrupt()) == ("stopped by SIGINT: 3 files kept", 130)
    with pytest.raises(stop.Stopped) as caught:  # Ctrl-C: the same, and a second one is the usual way out
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass
    assert caught.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_a_stopped_command_prints_one_line_and_exits_128_plus_the_signal(monkeypatch, tmp_path, sigterm_restored):
    from f2m_ray.synth import driver

    def stopped(*args, **kwargs):
        raise stop.Stopped(signal.SIGTERM)

    monkeypatch.setattr(driver, "synthesize", stopped)
    monkeypatch.chdir(tmp_path)
    _register()
    result = CliRunner().invoke(cli, ["synthesize", "--category", CATEGORY, "--n", "10", "--out", "syn"])
    assert result.exit_code == 143, result.output
    assert result.stderr.splitlines() == ["stopped by SIGTERM: nothing was written to syn; run the same command again"]


def _stop_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert not any(mark in stderr for mark in NATIVE_DUMP), stderr
    return lines[-1]


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_mid_synthesis_keeps_whole_files_and_its_resume_gives_the_undisturbed_bytes(tmp_path):
    args = ["synthesize", "--category", CATEGORY, "--n", "12000", "--rows-per-file", "500", "--executor", "ray",
            "--out", "syn"]
    proc = f2m(args, tmp_path)
    folder = tmp_path / "syn" / "data" / CATEGORY
    wait_for(lambda: folder.is_dir() and len(list(folder.glob("part-*.parquet"))) >= 2, "2 finished files", proc,
             seconds=180)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    line = _stop_line(stderr)
    kept = len(list(folder.glob("part-*.parquet")))
    assert proc.returncode == 143 and 2 <= kept < 24, (proc.returncode, stderr)
    assert line.startswith(f"stopped by SIGTERM: {kept} finished files kept in syn; finish the run with: f2m-ray "), line
    assert not (tmp_path / "syn" / "_manifest.json").exists() and stdout == ""
    resume = shlex.split(line.split("finish the run with: ", 1)[1])
    assert resume[-1] == "--resume" and resume[1:-1] == args
    proc = f2m(resume[1:], tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"kept {kept} finished files" in stdout, stderr
    reference = tmp_path / "reference"
    synthesize(SynthesisConfig(categories=(CATEGORY,), n=12000, rows_per_file=500, out=str(reference)),
               report=None, use_ray=False)
    written = sorted(p.relative_to(tmp_path / "syn") for p in (tmp_path / "syn" / "data").rglob("*.parquet"))
    assert written == sorted(p.relative_to(reference) for p in (reference / "data").rglob("*.parquet"))
    assert len(written) == 24
    for name in written:
        assert (tmp_path / "syn" / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_mid_training_keeps_its_checkpoint_and_the_resumed_run_is_the_undisturbed_one(tmp_path):
    args = ["train", "--preset", "tiny", "--data", "phantom:200", "--epochs", "40", "--checkpoint-every", "1",
            "--no-bank", "--storage", "runs"]
    proc = f2m(args, tmp_path)
    runs = tmp_path / "runs"

    def epochs() -> list[int]:
        folders = list(runs.glob("*")) if runs.is_dir() else []
        try:
            return [r["epoch"] for r in read_metrics(str(folders[0]))] if folders else []
        except (OSError, ValueError):
            return []

    wait_for(lambda: len(epochs()) >= 2, "epoch 2", proc, seconds=240)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    line = _stop_line(stderr)
    assert proc.returncode == 143, stderr
    name = next(runs.glob("*")).name
    assert line.startswith("stopped by SIGTERM: checkpoint epoch "), line
    assert f" kept in {runs / name}; resume with: f2m-ray " in line, line
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[1:len(args) + 1] == args and resume[len(args) + 1:] == ["--name", name]  # --storage was given
    stopped_at = len(epochs())
    proc = f2m([*resume[1:], "--epochs", str(stopped_at + 2)], tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resuming run" in stdout, stderr
    undisturbed = f2m([*args[:6], str(stopped_at + 2), *args[7:], "--name", "calm"], tmp_path)
    _, stderr = undisturbed.communicate(timeout=300)
    assert undisturbed.returncode == 0, stderr
    assert [r["epoch"] for r in read_metrics(str(runs / name))] == list(range(1, stopped_at + 3))  # each epoch once
    assert load_checkpoint(str(runs / name)).model_id == load_checkpoint(str(runs / "calm")).model_id

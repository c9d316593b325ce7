"""The README's quick start, run as written: relative paths, from an empty working directory.

The commands are read from the README itself (the `bash` block of "Quick start"), so that
the README and what the tool does cannot drift apart. Only sizes shrink: training runs the
`tiny` preset on 200 phantoms for 2 epochs with one worker (flags given later win; data-parallel
training is test_train's and test_faults'), synthesis makes 300 masses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER_TRAINING = ["--preset", "tiny", "--data", "phantom:200", "--epochs", "2", "--workers", "1"]


def quick_start_commands() -> list[list[str]]:
    """Every `f2m-ray ...` command of the Quick start's bash blocks, in order (pip steps left out)."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split("#", 1)[0])
                if words and words[0] == "f2m-ray":
                    commands.append(words[1:])
    return commands


def _smaller(args: list[str]) -> list[str]:
    if args[0] == "train":
        return args + SMALLER_TRAINING
    if args[0] == "synthesize":
        return [("300" if previous == "--n" else word) for previous, word in zip([""] + args, args)]
    return args


def run_timed(args: list[str], cwd: Path) -> tuple[int, list[tuple[float, str]]]:
    """Run `f2m-ray ARGS`; every output line with the time it arrived."""
    env = {k: v for k, v in os.environ.items() if k != "F2M_STORAGE"}
    proc = subprocess.Popen([sys.executable, "-m", "f2m_ray_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    return proc.wait(timeout=600), lines


def test_the_quick_start_names_the_design_command_and_a_training_run():
    commands = quick_start_commands()
    assert ["synthesize", "--category", "spiculate-irregular", "--n", "100000"] in commands
    assert any(c[0] == "train" for c in commands) and any(c[0] == "synthesize" and "--out" not in c for c in commands)


@pytest.mark.ray
@pytest.mark.slow
def test_the_design_command_in_an_empty_folder_uses_the_shipped_model(tmp_path):
    from f2m_ray.pretrained import shipped_model

    command = next(c for c in quick_start_commands() if c[:2] == ["synthesize", "--category"])
    code, lines = run_timed(_smaller(command), tmp_path)
    text = "\n".join(line for _, line in lines)
    assert code == 0, text
    assert f"model: {shipped_model()} " in text and "the shipped model small-phantom: no finished run under f2m-runs" in text
    assert "core_worker.cc" not in text and "Traceback" not in text
    manifest = json.loads((tmp_path / "f2m-synthetic" / "_manifest.json").read_text())
    assert manifest["counts"] == {"spiculated-irregular": 300}
    assert (tmp_path / "f2m-synthetic" / "README.md").read_text().startswith("---\npretty_name:")


@pytest.mark.ray
@pytest.mark.slow
def test_the_training_quick_start_writes_its_run_folder_and_prints_each_epoch_as_it_ends(tmp_path):
    train = next(c for c in quick_start_commands() if c[0] == "train")
    code, lines = run_timed(_smaller(train), tmp_path)
    text = "\n".join(line for _, line in lines)
    assert code == 0, text
    storage = train[train.index("--storage") + 1]
    run = tmp_path / storage / train[train.index("--name") + 1]
    assert (run / "metrics.jsonl").is_file() and (run / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_000001.png", "epoch_000002.png"]
    epochs = [(t, line) for t, line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for _, line in epochs] == ["1/2", "2/2"]
    finished = next(t for t, line in lines if line.startswith("final checkpoint:"))
    assert epochs[0][0] < epochs[1][0] < finished  # printed while training, not at the end
    assert "core_worker.cc" not in text and "Reporting training result" not in text

    # The next quick-start command, in the same folder, takes the run just trained.
    synthesize = next(c for c in quick_start_commands() if c[0] == "synthesize" and "--storage" in c)
    code, lines = run_timed(_smaller(synthesize), tmp_path)
    text = "\n".join(line for _, line in lines)
    assert code == 0, text
    assert f"model: {run}/checkpoint_epoch_000002 " in text and f"the newest finished run under {storage}" in text


@pytest.mark.ray
@pytest.mark.slow
def test_no_ray_alarm_or_dump_in_the_console_of_a_successful_run(tmp_path):
    """synthesize on Ray (Ray Data actors) as a user runs it, relative paths, its own process; training's
    console (Ray Train) is the training quick start's test, encode's the job logs' (test_jobs)."""
    steps = [
        ["synthesize", "--model", "pretrained", "--category", "spiculated-irregular", "--n", "60", "--out", "syn",
         "--executor", "ray"],  # the Ray console: a run this small would otherwise stay in its own process
    ]
    for args in steps:
        code, lines = run_timed(args, tmp_path)
        text = "\n".join(line for _, line in lines)
        assert code == 0, f"{args[0]}: {text}"
        for noise in ("core_worker.cc", "Traceback", "Reporting training result", "TrainingReport("):
            assert noise not in text, f"{args[0]} printed {noise!r}:\n{text}"
    assert (tmp_path / "syn" / "_manifest.json").is_file()

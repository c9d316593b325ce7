"""The command line: error handling shared by every command, and `model-info`."""

import subprocess
import sys

import torch

from f2m_ray.checkpoint import save_checkpoint
from f2m_ray.config import PRESETS
from f2m_ray.core.networks import build_networks


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "f2m_ray_cli", *args], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0], lines[0]


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "phantoms" in result.stdout and "model-info" in result.stdout


def test_model_info(tmp_path):
    torch.manual_seed(0)
    nets = build_networks(PRESETS["tiny"].model)
    save_checkpoint(str(tmp_path / "checkpoint_000004"), PRESETS["tiny"], *nets, epoch=4, step=40)
    result = run_cli("model-info", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout and "4, 40" in result.stdout


def test_corrupt_and_foreign_checkpoints_one_line(tmp_path):
    assert_one_line_error(run_cli("model-info", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "f2m_checkpoint.json").write_text("garbage")
    assert_one_line_error(run_cli("model-info", str(tmp_path)), "not valid JSON")
    (tmp_path / "f2m_checkpoint.json").write_text('{"format": "something-else"}')
    assert_one_line_error(run_cli("model-info", str(tmp_path)), "not an f2m-ray checkpoint")

"""The model shipped in the package, and how commands choose a model when none is named."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from f2m_ray.checkpoint import load_generator
from f2m_ray.errors import F2MError
from f2m_ray.bank import load_feature_bank
from f2m_ray.model_choice import model_card
from f2m_ray.pretrained import MODEL_CARD, SHIPPED_MODEL, named_model, shipped_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED_FILES = ["MODEL_CARD.md", "f2m_checkpoint.json", "feature_bank.parquet", "masses.png", "model.pt"]


def test_the_shipped_model_is_small_complete_and_self_consistent():
    path = shipped_model()
    assert sorted(os.listdir(path)) == SHIPPED_FILES
    assert sum(os.path.getsize(os.path.join(path, n)) for n in SHIPPED_FILES) <= 15_000_000
    generator, meta = load_generator(path)  # JSON + torch.load(weights_only=True): no code runs
    assert meta["preset"]["name"] == "small" and meta["export"]["weights_dtype"] == "float16"
    assert meta["export"]["recipe"] == {"preset": "small", "data": "phantom:2000", "epochs": 60, "seed": 0, "workers": 2}
    stored = torch.load(os.path.join(path, "model.pt"), weights_only=True)
    assert set(stored) == {"generator"}
    bank = load_feature_bank(os.path.join(path, "feature_bank.parquet"))
    assert bank.model_id == meta["model_id"] and len(bank.counts()) == 20 and len(bank.roi_id) == 2000
    assert bank.metadata["checkpoint"] == f"pretrained:{SHIPPED_MODEL}"  # no path of the machine that built it
    with torch.no_grad():
        image = generator.decode(torch.from_numpy(bank.features[:4]))
    assert image.shape == (4, 1, 64, 64) and float(image.std()) > 0.05


def test_the_model_card_names_the_model_and_how_to_rebuild_it():
    path = shipped_model()
    _, meta = load_generator(path)
    card = model_card(path)
    assert card.startswith("# small-phantom") and f"model id `{meta['model_id']}`" in card
    assert "python jobs/build_pretrained.py" in card and "not on mammograms" in card
    # its figures: mass fidelity and identity per paper category, and the picture they describe
    assert "| spiculated-irregular |" in card and "](masses.png)" in card
    from PIL import Image

    with Image.open(os.path.join(path, "masses.png")) as picture:  # 3 categories x (real, reconstructed, synthesized)
        assert picture.size == (200 + 10 * 128, 9 * 128) and picture.mode == "L"


def test_model_info_prints_the_shipped_models_card():
    result = subprocess.run([sys.executable, "-m", "f2m_ray_cli", "model-info", "pretrained"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"checkpoint   {shipped_model()}\npreset       small")
    assert "export       generator only, float16 weights" in result.stdout
    assert "# small-phantom: the model shipped with f2m-ray" in result.stdout


def test_pretrained_names_and_their_errors():
    assert named_model("pretrained") == named_model(f"pretrained:{SHIPPED_MODEL}") == shipped_model()
    assert named_model("runs/demo") == "runs/demo"
    with pytest.raises(F2MError, match=f"no shipped model 'nope' in this installation .shipped: {SHIPPED_MODEL}."):
        named_model("pretrained:nope")


def test_the_package_data_ships_every_file_of_the_model():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["f2m_ray"]
    for name in SHIPPED_FILES:
        relative = f"pretrained/{SHIPPED_MODEL}/{name}"
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
    assert MODEL_CARD in SHIPPED_FILES

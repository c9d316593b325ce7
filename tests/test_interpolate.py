"""Interpolation figures: Fig. 3 (a line between two seeds) and Fig. 4 (a barycentric triangle)."""

import numpy as np
import pytest
import torch
from PIL import Image

from f2m_ray.checkpoint import load_checkpoint
from f2m_ray.errors import F2MError
from f2m_ray.bank import default_bank_path, load_feature_bank
from f2m_ray.synth.interpolate import GAP, SEPARATION, TILE, interpolate, write_interpolation
from f2m_ray.core.images import to_uint8
from f2m_ray.schema import decode_png
from test_synthesize import make_bank, make_checkpoint

A, B, C = "roi-0000", "roi-0001", "roi-0002"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt = make_checkpoint(str(tmp_path_factory.mktemp("interpolate") / "ckpt"))
    make_bank(ckpt)
    return ckpt


def test_line_ends_are_the_seeds_decoded(model):
    result = interpolate(model, [A, B], steps=5)
    np.testing.assert_allclose(result.weights[:, 1], [0, 0.25, 0.5, 0.75, 1.0])
    bank = load_feature_bank(default_bank_path(model), with_images=True)
    generator = load_checkpoint(model).generator()
    with torch.no_grad():
        ends = generator.decode(torch.from_numpy(bank.features[[0, 1]])).numpy()[:, 0]
    np.testing.assert_array_equal(result.images[[0, -1]], to_uint8(ends))
    np.testing.assert_array_equal(result.seed_images[1], decode_png(bank.images[1]))
    assert not np.array_equal(result.images[1], result.images[3])


def test_fig3_layout(model, tmp_path):
    out = tmp_path / "fig3.png"
    result = write_interpolation(model, [A, B], str(out), steps=8)
    figure = np.asarray(Image.open(out))
    assert figure.shape[1] == 2 * (TILE + SEPARATION) + 8 * (TILE + GAP) - GAP
    np.testing.assert_array_equal(figure[:TILE, :TILE], result.seed_images[0])  # real A at the left end
    np.testing.assert_array_equal(figure[:TILE, -TILE:], result.seed_images[1])  # real B at the right end
    x = TILE + SEPARATION
    np.testing.assert_array_equal(figure[:TILE, x:x + TILE], result.images[0])


def test_fig4_triangle(model, tmp_path):
    out = tmp_path / "fig4.png"
    result = write_interpolation(model, [A, B, C], str(out), steps=4)
    assert result.images.shape == (10, 64, 64) and result.weights.shape == (10, 3)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0)
    np.testing.assert_array_equal(result.weights[[0, 6, 9]], np.eye(3))  # corners A (top), B, C (bottom)
    figure = np.asarray(Image.open(out))
    bottom = 3 * (TILE + GAP)
    np.testing.assert_array_equal(figure[bottom:bottom + TILE, :TILE], result.seed_images[1])  # real B, bottom left


def test_command_line(model, tmp_path):
    from click.testing import CliRunner

    from f2m_ray_cli.main import _register, cli

    _register()
    result = CliRunner().invoke(cli, ["interpolate", "--model", model, "--seeds", f"{A},{B},{C}", "--steps", "3",
                                      "--out", str(tmp_path / "fig.png")])
    assert result.exit_code == 0, result.output
    assert "triangle (Fig. 4) of 6 decoded mixes" in result.stdout and (tmp_path / "fig.png").exists()
    result = CliRunner().invoke(cli, ["interpolate", "--model", model, "--seeds", f"{A},nope", "--out", "f.png"])
    assert result.exit_code == 1 and result.stderr.startswith("Error: unknown seed id 'nope'")


def test_bad_seeds(model, tmp_path):
    with pytest.raises(F2MError, match="2 roi ids .* or 3"):
        interpolate(model, [A], steps=4)
    with pytest.raises(F2MError, match="unknown seed id 'roi-9999'"):
        interpolate(model, [A, "roi-9999"])
    with pytest.raises(F2MError, match="repeats"):
        interpolate(model, [A, A])
    with pytest.raises(F2MError, match="at least 2 steps"):
        interpolate(model, [A, B], steps=1)
    with pytest.raises(F2MError, match="must name a .png"):
        write_interpolation(model, [A, B], str(tmp_path / "fig.jpg"))

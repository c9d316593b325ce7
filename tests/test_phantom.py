"""Tests for f2m_ray.data.phantom and `f2m-ray phantoms`."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from f2m_ray.errors import F2MError
from f2m_ray.labels import MARGINS, SHAPES, Category, all_categories
from f2m_ray.data.phantom import (
    DEFAULT_CATEGORIES,
    _render,
    generate_phantoms,
    phantom_category,
    phantom_rng,
    render_phantom,
)
from f2m_ray.data.phantom_files import contact_sheet, write_phantoms

N_STATS = 30  # phantoms per category in the label-effect measurements


# ---------------------------------------------------------------- measurements


def _roughness(mask: np.ndarray) -> float:
    """perimeter^2 / (4 pi area) of a binary mask: 1 for a disc, large for spicules."""
    m = mask.astype(bool)
    perimeter = np.sum(m[1:, :] != m[:-1, :]) + np.sum(m[:, 1:] != m[:, :-1])
    return float(perimeter**2 / (4.0 * np.pi * m.sum()))


def _elongation(mask: np.ndarray) -> float:
    """sqrt of the ratio of the second-moment eigenvalues (major / minor axis)."""
    ys, xs = np.nonzero(mask)
    eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
    return float(np.sqrt(eig[1] / eig[0]))


def _boundary_pixels(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    interior = np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
    return m & ~interior


def _edge_gradient(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean image gradient magnitude on the mass's nominal boundary pixels."""
    gy, gx = np.gradient(image.astype(np.float64))
    return float(np.hypot(gx, gy)[_boundary_pixels(mask)].mean())


def _inside_minus_ring(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean brightness inside the mass minus a 3-pixel ring just outside it."""
    m = mask.astype(bool)
    grown = m.copy()
    for _ in range(3):
        grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
        grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
    return float(image[m].mean() - image[grown & ~m].mean())


def _radial_high_frequency(mask: np.ndarray, first_order: int = 8) -> float:
    """Energy of the boundary's radial profile r(theta) / mean(r) at orders >= first_order."""
    m = mask.astype(bool)
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean(), xs.mean()
    steps = np.arange(0.0, 40.0, 0.25)
    radii = []
    for t in np.linspace(0.0, 2.0 * np.pi, 256, endpoint=False):
        px = np.rint(cx + steps * np.cos(t)).astype(int)
        py = np.rint(cy + steps * np.sin(t)).astype(int)
        ok = (px >= 0) & (px < m.shape[1]) & (py >= 0) & (py < m.shape[0])
        inside = np.zeros(steps.size, bool)
        inside[ok] = m[py[ok], px[ok]]
        radii.append(steps[np.argmin(inside)])  # first step outside the mass
    r = np.array(radii)
    spectrum = np.abs(np.fft.rfft(r / r.mean())) / r.size
    return float(np.sum(spectrum[first_order:] ** 2))


def _measure(margin: str, shape: str, metric, seed: int = 7) -> np.ndarray:
    values = []
    for i in range(N_STATS):
        image, mask = _render(Category(margin, shape), phantom_rng(seed, i))
        values.append(metric(image, mask))
    return np.array(values)


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("category", all_categories(), ids=str)
def test_render_shape_dtype_range(category):
    image = render_phantom(category, phantom_rng(0, 3))
    assert image.shape == (64, 64)
    assert image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.02  # not a flat field


def test_render_other_size_and_mask():
    image, mask = _render(Category("spiculated", "irregular"), phantom_rng(1, 2), size=32)
    assert image.shape == mask.shape == (32, 32)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert 10 < mask.sum() < 32 * 32 / 2  # a mass, not the whole ROI
    with pytest.raises(F2MError):
        render_phantom(Category("circumscribed", "round"), phantom_rng(0, 0), size=15)


def test_determinism_and_variety():
    cat = Category("spiculated", "round")
    a = render_phantom(cat, phantom_rng(3, 5))
    b = render_phantom(cat, phantom_rng(3, 5))
    assert a.tobytes() == b.tobytes()
    assert np.abs(a - render_phantom(cat, phantom_rng(3, 6))).mean() > 0.01
    assert np.abs(a - render_phantom(cat, phantom_rng(4, 5))).mean() > 0.01
    with pytest.raises(F2MError):
        phantom_rng(-1, 0)


def test_default_categories_and_balanced_assignment():
    assert len(DEFAULT_CATEGORIES) == 20 == len(set(DEFAULT_CATEGORIES))
    assert {c.margin for c in DEFAULT_CATEGORIES} == set(MARGINS)
    assert {c.shape for c in DEFAULT_CATEGORIES} == set(SHAPES) - {"architectural-distortion"}
    counts = Counter(phantom_category(i, DEFAULT_CATEGORIES) for i in range(100))
    assert set(counts.values()) == {5}


def test_generate_phantoms():
    cats = [Category("obscured", "oval"), Category("ill-defined", "lobulated")]
    out = list(generate_phantoms(5, seed=2, categories=cats))
    assert [i for i, _, _ in out] == [0, 1, 2, 3, 4]
    assert [c for _, _, c in out] == [cats[0], cats[1], cats[0], cats[1], cats[0]]
    for index, image, category in out:
        assert image.dtype == np.uint8 and image.shape == (64, 64)
        expected = np.round(render_phantom(category, phantom_rng(2, index)) * 255)
        assert np.array_equal(image, expected.astype(np.uint8))


# ---------------------------------------------------------------- label effects


def test_spiculated_boundary_rougher_than_circumscribed():
    for shape in ("round", "oval"):
        smooth = _measure("circumscribed", shape, lambda img, m: _roughness(m))
        spiky = _measure("spiculated", shape, lambda img, m: _roughness(m))
        assert smooth.mean() < 2.5
        assert spiky.mean() > 3.0 * smooth.mean()


def test_microlobulated_boundary_has_more_high_frequency_energy():
    smooth = _measure("circumscribed", "round", lambda img, m: _radial_high_frequency(m))
    bumpy = _measure("microlobulated", "round", lambda img, m: _radial_high_frequency(m))
    assert bumpy.mean() > 1.4 * smooth.mean()


def test_oval_more_elongated_than_round():
    round_ = _measure("circumscribed", "round", lambda img, m: _elongation(m))
    oval = _measure("circumscribed", "oval", lambda img, m: _elongation(m))
    assert round_.mean() < 1.2
    assert oval.mean() > 1.4
    assert np.median(oval) > np.percentile(round_, 90)


def test_ill_defined_and_obscured_edges_softer_on_the_image():
    # Measured on the rendered image (noise and background included).
    sharp = _measure("circumscribed", "round", _edge_gradient)
    obscured = _measure("obscured", "round", _edge_gradient)
    soft = _measure("ill-defined", "round", _edge_gradient)
    assert soft.mean() < 0.65 * sharp.mean()
    assert obscured.mean() < 0.9 * sharp.mean()


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES[::3], ids=str)
def test_mass_brighter_than_its_surroundings(category):
    diff = np.array([
        _inside_minus_ring(*_render(category, phantom_rng(11, i))) for i in range(10)
    ])
    assert (diff > 0.02).all()


# ---------------------------------------------------------------- writing


def _read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["id", "path", "margin", "shape", "patient_id"]
        return list(reader)


def test_write_phantoms_files_and_manifest(tmp_path):
    out = tmp_path / "ph"
    manifest = write_phantoms(out, 45, seed=1)
    assert manifest == out / "manifest.csv"
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.csv"]
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 45 and pngs[0].name == "000000.png" and pngs[-1].name == "000044.png"
    rows = _read_manifest(manifest)
    assert len(rows) == 45
    assert rows[7]["id"] == "phantom-000007" == rows[7]["patient_id"]
    assert rows[7]["path"] == "images/000007.png"
    for row in rows:
        with Image.open(manifest.parent / row["path"]) as img:
            assert img.mode == "L" and img.size == (64, 64)
    counts = Counter((r["margin"], r["shape"]) for r in rows)
    assert len(counts) == 20 and max(counts.values()) - min(counts.values()) <= 1
    assert rows[1]["margin"] == DEFAULT_CATEGORIES[1].margin
    assert rows[1]["shape"] == DEFAULT_CATEGORIES[1].shape
    assert all(r["shape"] != "architectural-distortion" for r in rows)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_write_phantoms_reproducible_serial_and_parallel(tmp_path):
    write_phantoms(tmp_path / "a", 24, seed=5, workers=1)
    write_phantoms(tmp_path / "b", 24, seed=5, workers=2)
    write_phantoms(tmp_path / "a", 24, seed=5, workers=1, overwrite=True)
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert len(a) == 25 and a == b
    write_phantoms(tmp_path / "c", 24, seed=6)
    assert _snapshot(tmp_path / "c")["images/000003.png"] != a["images/000003.png"]


def test_write_phantoms_refusals(tmp_path):
    for bad in (0, -1):
        with pytest.raises(F2MError, match="positive integer"):
            write_phantoms(tmp_path / "x", bad)
    assert not (tmp_path / "x").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(F2MError, match="not empty"):
        write_phantoms(busy, 3)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]

    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(F2MError, match=str(regular)):
        write_phantoms(regular / "sub", 3)
    with pytest.raises(F2MError, match="not a folder"):
        write_phantoms(regular, 3)


def test_overwrite_drops_stale_phantoms(tmp_path):
    out = tmp_path / "o"
    write_phantoms(out, 30)
    (out / "notes.txt").write_text("kept")
    write_phantoms(out, 10, overwrite=True)
    assert len(list((out / "images").glob("*.png"))) == 10
    assert len(_read_manifest(out / "manifest.csv")) == 10
    assert (out / "notes.txt").read_text() == "kept"


def test_contact_sheet(tmp_path):
    images = {
        "circumscribed-round": [np.zeros((64, 64), np.float32)] * 3,
        "spiculated-irregular": [np.full((64, 64), 255, np.uint8)] * 2,
    }
    path = contact_sheet(images, tmp_path / "s.png")
    with Image.open(path) as sheet:
        arr = np.asarray(sheet)
    assert arr.shape[0] == 2 * (64 + 2) + 2
    label_width = arr.shape[1] - 3 * (64 + 2)
    assert arr[2:66, :label_width].max() > 200  # the row's name is drawn
    assert arr[68:132, label_width:label_width + 64].min() == 255  # second row, first tile


# ---------------------------------------------------------------- command line


@pytest.fixture()
def run_cli():
    import f2m_ray_cli.cmd_phantoms  # noqa: F401  (registers the command)
    from f2m_ray_cli.main import cli

    def run(*args: str):
        return CliRunner().invoke(cli, ["phantoms", *args])

    return run


def _assert_one_line_error(result, fragment: str):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_cli_writes_phantoms_and_preview(run_cli, tmp_path):
    out, sheet = tmp_path / "out", tmp_path / "sheet.png"
    result = run_cli("--n", "40", "--out", str(out), "--preview", str(sheet))
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == 40
    assert len(_read_manifest(out / "manifest.csv")) == 40
    assert "wrote 40 phantoms" in result.stdout and "manifest.csv" in result.stdout
    with Image.open(sheet) as img:
        assert img.height == 20 * (64 + 2) + 2  # one row per default category


def test_cli_category_all_and_aliases(run_cli, tmp_path):
    result = run_cli("--n", "25", "--out", str(tmp_path / "a"), "--category", "all")
    assert result.exit_code == 0, result.output
    rows = _read_manifest(tmp_path / "a" / "manifest.csv")
    assert len({(r["margin"], r["shape"]) for r in rows}) == 25
    result = run_cli("--n", "4", "--out", str(tmp_path / "b"),
                     "--category", "SPICULATED-lobular", "--category", "ill_defined-round")
    assert result.exit_code == 0, result.output
    rows = _read_manifest(tmp_path / "b" / "manifest.csv")
    assert [(r["margin"], r["shape"]) for r in rows[:2]] == [
        ("spiculated", "lobulated"), ("ill-defined", "round")]


@pytest.mark.parametrize("n", ["0", "-1"])
def test_cli_rejects_bad_count(run_cli, tmp_path, n):
    result = run_cli("--n", n, "--out", str(tmp_path / "o"))
    _assert_one_line_error(result, "--n must be a positive integer")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_non_empty_and_unwritable(run_cli, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    _assert_one_line_error(run_cli("--n", "2", "--out", str(tmp_path / "busy")), "--overwrite")
    regular = tmp_path / "regular"
    regular.write_text("x")
    _assert_one_line_error(run_cli("--n", "2", "--out", str(regular / "out")), str(regular))


def test_cli_unknown_category_lists_valid_ones(run_cli, tmp_path):
    result = run_cli("--n", "2", "--out", str(tmp_path / "o"), "--category", "fuzzy-blob")
    _assert_one_line_error(result, "fuzzy-blob")
    assert "spiculated" in result.stderr and "architectural-distortion" in result.stderr
    assert "'all'" in result.stderr

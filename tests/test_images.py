"""Decoding (PNG/JPEG/TIFF 8/16-bit, DICOM 12/16-bit), the windowing rule, ROI crops and the resize rule."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2m_ray.core import images
from f2m_ray.core.images import ImageProblem, Pixels, crop_window, decode, fit_square, mask_window, model_image, window
from test_cbis_ddsm import write_dicom


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_png_and_tiff_keep_their_values(fmt):
    array = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)  # up to 61100: needs 16 bits
    pixels = decode(_encode(array, fmt))
    assert pixels.bits == 16 and pixels.array.dtype == np.uint16
    np.testing.assert_array_equal(pixels.array, array)


def test_8_bit_png_and_colour_jpeg():
    array = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels = decode(_encode(array, "PNG"))
    assert pixels.bits == 8 and pixels.array.dtype == np.uint8
    np.testing.assert_array_equal(pixels.array, array)
    rgb = np.stack([np.full((16, 16), 200, np.uint8)] * 3, axis=-1)
    grey = decode(_encode(rgb, "JPEG"))
    assert grey.array.shape == (16, 16) and abs(int(grey.array.mean()) - 200) <= 2


@pytest.mark.parametrize("bits", [12, 16])
def test_dicom_12_and_16_bit(tmp_path, bits):
    array = np.linspace(0, (1 << bits) - 1, 30 * 20).reshape(30, 20).astype(np.uint16)
    write_dicom(tmp_path / "1-1.dcm", array, bits, "cropped images")
    pixels = decode((tmp_path / "1-1.dcm").read_bytes(), "1-1.dcm")
    assert pixels.bits == bits and pixels.description == "cropped images"
    np.testing.assert_array_equal(pixels.array, array)


def test_dicom_bits_above_bits_stored_are_not_pixel_data(tmp_path):
    # Bits above HighBit are not part of the value (DICOM PS3.5 8.1.1): 5000 stored in 12 bits reads 904.
    write_dicom(tmp_path / "a.dcm", np.array([[100, 5000], [4095, 0]], np.uint16), 12, "x")
    pixels = decode((tmp_path / "a.dcm").read_bytes())
    np.testing.assert_array_equal(pixels.array, [[100, 5000 & 0xFFF], [4095, 0]])
    assert pixels.array.max() <= 4095


def test_dicom_monochrome1_is_inverted(tmp_path):
    import pydicom

    array = np.array([[0, 1000], [4095, 2000]], dtype=np.uint16)
    write_dicom(tmp_path / "m1.dcm", array, 12, "x")
    ds = pydicom.dcmread(tmp_path / "m1.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(decode((tmp_path / "m1.dcm").read_bytes()).array, 4095 - array)


def test_truncated_dicom_and_non_image_are_named_problems(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.ones((64, 64), np.uint16), 16, "x")
    raw = (tmp_path / "a.dcm").read_bytes()
    with pytest.raises(ImageProblem) as info:
        decode(raw[: len(raw) // 2], "a.dcm")
    assert info.value.reason == images.UNREADABLE_DICOM
    with pytest.raises(ImageProblem) as info:
        decode(b"patient_id,margin\n1,2\n", "notes.png")
    assert info.value.reason == images.NOT_AN_IMAGE
    png = _encode(np.zeros((40, 40), np.uint8), "PNG")
    with pytest.raises(ImageProblem) as info:
        decode(png[: len(png) // 2], "cut.png")
    assert info.value.reason == images.NOT_AN_IMAGE


def _broken_jpeg2000(path) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    write_dicom(path, np.ones((8, 8), np.uint16), 12, "x")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])  # a codestream no decoder can read
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path.read_bytes()


def test_compressed_dicom_without_a_decoder_names_its_syntax_and_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "decoder_available", lambda syntax: False)  # as without the `dicom` extra
    with pytest.raises(ImageProblem) as info:
        decode(_broken_jpeg2000(tmp_path / "c.dcm"), "c.dcm")
    assert info.value.reason == ("no installed decoder for JPEG 2000 Image Compression (Lossless Only) "
                                 "(pip install 'f2m-ray[dicom]')")


def test_a_corrupt_codestream_with_its_decoder_installed_is_unreadable_not_missing_a_plugin(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    assert images.decoder_available(JPEG2000Lossless)  # the `dicom` extra is part of the test extras
    with pytest.raises(ImageProblem) as info:
        decode(_broken_jpeg2000(tmp_path / "c.dcm"), "c.dcm")
    assert info.value.reason == images.UNREADABLE_DICOM


def test_header_size_reads_only_the_header(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.ones((300, 200), np.uint16), 16, "x")
    head = (tmp_path / "a.dcm").read_bytes()[:4096]
    assert images.header_size(head, "a.dcm") == (300, 200)
    assert images.header_size(_encode(np.zeros((7, 9), np.uint8), "PNG")[:200]) == (7, 9)
    assert images.header_size(b"garbage") is None


# ---------------------------------------------------------------- windowing


def test_auto_window_8_bit_is_the_fixed_display_map():
    out = window(Pixels(np.array([[0, 255], [127, 128]], np.uint8), 8))
    np.testing.assert_allclose(out, [[-1.0, 1.0], [127 / 127.5 - 1, 128 / 127.5 - 1]], atol=1e-6)


def test_percentile_window_ignores_hot_pixels_and_is_per_roi():
    rng = np.random.default_rng(0)
    tissue = rng.integers(1000, 2001, size=(100, 100)).astype(np.uint16)
    tissue[0, 0] = 65535  # one hot pixel: 0.01 % of the ROI
    out = window(Pixels(tissue, 16))  # auto -> percentile for 16-bit
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    # Tissue spans the range (1000 -> about -1, 2000 -> about +1), not squashed by the hot pixel.
    assert out[tissue <= 1005].mean() < -0.97 and out[(tissue >= 1995) & (tissue < 2001)].mean() > 0.97
    lo, hi = np.percentile(tissue.astype(np.float32), images.PERCENTILES)
    mid = tissue == 1500
    np.testing.assert_allclose(out[mid], (1500 - lo) / (hi - lo) * 2 - 1, atol=1e-5)
    # The same ROI 4x brighter (another scanner's calibration) windows to the same image.
    brighter = np.minimum(tissue.astype(np.uint32) * 4, 65535).astype(np.uint16)
    np.testing.assert_allclose(window(Pixels(brighter, 16)), out, atol=1e-5)
    assert np.all(window(Pixels(np.full((5, 5), 700, np.uint16), 16)) == -1.0)  # flat ROI


def test_bits_window_uses_the_stored_range():
    twelve = Pixels(np.array([[0, 4095, 2048]], np.uint16), 12)
    np.testing.assert_allclose(window(twelve, "bits"), [[-1.0, 1.0, 2048 / 4095 * 2 - 1]], atol=1e-6)
    sixteen = Pixels(np.array([[0, 65535, 4095]], np.uint16), 16)
    np.testing.assert_allclose(window(sixteen, "bits"), [[-1.0, 1.0, 4095 / 65535 * 2 - 1]], atol=1e-6)
    with pytest.raises(ValueError, match="unknown window rule"):
        window(twelve, "gamma")


# ---------------------------------------------------------------- geometry


def _disc(height: int, width: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.where((yy - height / 2 + 0.5) ** 2 + (xx - width / 2 + 0.5) ** 2 <= radius**2, 1.0, -1.0).astype(np.float32)


@pytest.mark.parametrize("height, width", [(32, 128), (128, 32), (20, 10), (64, 64), (640, 480)])
def test_fit_square_keeps_aspect_ratio(height, width):
    radius = min(height, width) * 0.4
    out = fit_square(_disc(height, width, radius))
    assert out.shape == (64, 64) and out.dtype == np.float32
    bright = out > 0
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    # A disc stays a disc: its extent is the same along both axes (within a pixel of blur).
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1
    expected = 2 * radius * 64 / max(height, width)
    assert abs((cols[-1] - cols[0] + 1) - expected) <= 2
    # The padded band is one flat value: the border median (-1 here: background).
    scale = 64 / max(height, width)
    pad = (64 - round(min(height, width) * scale)) // 2
    if pad:
        band = out[:pad] if height < width else out[:, :pad]
        assert np.all(band == -1.0)


def test_mask_window_grows_the_box_and_stays_inside():
    mask = np.zeros((400, 300), np.uint8)
    mask[100:141, 200:261] = 255  # box 41 x 61
    top, left, side = mask_window(mask, margin=0.2)
    assert side == round(61 * 1.4)
    assert (top + side / 2, left + side / 2) == pytest.approx((120.5, 230.5), abs=1)
    edge = np.zeros((400, 300), np.uint8)
    edge[5:45, 270:300] = 1  # at the corner: the square shifts inside instead of padding
    top, left, side = mask_window(edge, margin=0.2)
    assert side == 56 and top == 0 and left == 300 - 56
    with pytest.raises(ImageProblem) as info:
        mask_window(np.zeros((10, 10), np.uint8))
    assert info.value.reason == images.EMPTY_MASK


def test_crop_window_pads_outside_the_image():
    image = np.arange(100, dtype=np.uint16).reshape(10, 10)
    np.testing.assert_array_equal(crop_window(image, 2, 3, 4), image[2:6, 3:7])
    big = crop_window(image, -2, -2, 14)  # larger than the image
    assert big.shape == (14, 14)
    np.testing.assert_array_equal(big[2:12, 2:12], image)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert np.all(big[0] == int(np.median(border)))


def test_model_image_range_and_shape():
    rng = np.random.default_rng(1)
    crop = rng.integers(0, 4096, size=(90, 150)).astype(np.uint16)
    out = model_image(Pixels(crop, 12))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    with pytest.raises(ImageProblem) as info:
        model_image(Pixels(np.zeros((1, 50), np.uint16), 16))
    assert info.value.reason == images.TOO_SMALL


# ---------------------------------------------------------------- DICOM written by other toolkits


def _bundled_dicom_files():
    """pydicom's own test files (DCMTK, GDCM and others), grouped by transfer syntax."""
    import glob
    import os

    import pydicom

    folder = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.dcm"), recursive=True)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            syntax = ds.file_meta.TransferSyntaxUID
        except Exception:
            continue
        found.setdefault(syntax.name, []).append(path)
    return found


# The transfer syntaxes of real archives, and the number of pydicom's bundled files of each.
ARCHIVE_SYNTAXES = {
    "Explicit VR Little Endian", "Implicit VR Little Endian", "Explicit VR Big Endian", "RLE Lossless",
    "Deflated Explicit VR Little Endian", "JPEG Baseline (Process 1)", "JPEG Extended (Process 2 and 4)",
    "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    "JPEG-LS Lossless Image Compression", "JPEG-LS Lossy (Near-Lossless) Image Compression",
    "JPEG 2000 Image Compression (Lossless Only)", "JPEG 2000 Image Compression",
}


def test_every_transfer_syntax_of_real_archives_loads_with_the_dicom_extra():
    import warnings

    files = _bundled_dicom_files()
    assert ARCHIVE_SYNTAXES <= set(files), sorted(ARCHIVE_SYNTAXES - set(files))
    loaded, refused = {}, {}
    for syntax in sorted(ARCHIVE_SYNTAXES):
        for path in files[syntax]:
            raw = open(path, "rb").read()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    image = images.model_image(decode(raw, path))
                except ImageProblem as problem:
                    refused.setdefault(syntax, []).append(problem.reason)
                    continue
            assert image.shape == (64, 64) and image.dtype == np.float32 and -1 <= image.min() <= image.max() <= 1
            loaded[syntax] = loaded.get(syntax, 0) + 1
    assert set(loaded) == ARCHIVE_SYNTAXES, {s: refused.get(s) for s in ARCHIVE_SYNTAXES - set(loaded)}
    # What is refused is refused for a reason of its own (files without pixel data, odd test vectors), never a plugin.
    assert not [r for reasons in refused.values() for r in reasons if "no installed decoder" in r], refused


def _testdata(name: str) -> Path:
    """One of pydicom's bundled test files, or a skip where it is not on disk (nothing is downloaded)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's {name} is not on disk")
    return Path(path)


def test_12_bit_jpeg_extended_that_libjpeg_rejects_loads_with_the_dicom_extra():
    # JPEG-lossy.dcm (NEMA's NM1_JPLY): a sequential scan header whose spectral selection is not 0-63, which
    # libjpeg rejects and pydicom's other plugins decline (12 bits); GDCM reads it. JPGExtended.dcm is the
    # same image with the header fixed, decoded by pylibjpeg.
    pixels = decode(_testdata("JPEG-lossy.dcm").read_bytes(), "JPEG-lossy.dcm")
    assert pixels.array.shape == (1024, 256) and pixels.array.dtype == np.uint16 and pixels.bits == 12
    assert pixels.array.min() == 0 and 200 < pixels.array.max() <= 4095 and pixels.array.std() > 10
    fixed = decode(_testdata("JPGExtended.dcm").read_bytes(), "JPGExtended.dcm")
    assert np.abs(pixels.array.astype(np.int32) - fixed.array).max() <= 1  # the same image, up to IDCT rounding
    image = model_image(pixels)
    assert image.shape == (64, 64) and -1 <= image.min() < image.max() <= 1


# pydicom's bundled files with pixel data that cannot load, and why: broken on purpose, or not an image.
BROKEN_BUNDLED_FILES = {
    "JPEG2000-embedded-sequence-delimiter.dcm": "4 bytes of its JPEG 2000 codestream replaced by a Sequence Delimiter",
    "MR_truncated.dcm": "pixel data cut short (8130 of 8192 bytes)",
    "badVR.dcm": "Number of Frames '1A' is not an integer",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID in its file meta; 2 bytes of Pixel Data, no Image Pixel module",
    "nested_priv_SQ.dcm": "not an image: a 2-byte Pixel Data without an Image Pixel module (no Rows, Columns, Bits)",
}


def test_every_bundled_pydicom_file_with_pixel_data_loads_but_the_broken_ones():
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    loaded, refused = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                if "PixelData" not in pydicom.dcmread(path, force=True):
                    continue
            except Exception:  # not DICOM (JSON, ICC profiles, dumps)
                continue
            try:
                image = model_image(decode(path.read_bytes(), path.name))
            except ImageProblem as problem:
                refused[path.name] = problem.reason
                continue
            assert image.shape == (64, 64) and image.dtype == np.float32 and -1 <= image.min() <= image.max() <= 1
            loaded.append(path.name)
    if not loaded:
        pytest.skip(f"no pydicom test file with pixel data on disk under {folder}")
    assert "JPEG-lossy.dcm" in loaded
    assert {name: reason for name, reason in refused.items() if name not in BROKEN_BUNDLED_FILES} == {}
    # The broken ones are refused as broken, never for a missing decoder; and the list holds only refused files.
    assert set(refused.values()) <= {images.UNREADABLE_DICOM}, refused
    assert not set(BROKEN_BUNDLED_FILES) & set(loaded)


def _without_the_dicom_extra(monkeypatch, syntax, kept=()):
    """pydicom's decoder for ``syntax`` as without the `dicom` extra: only the plugins ``kept``, no python-gdcm."""
    get_decoder = pytest.importorskip("pydicom.pixels", reason="decoder plugins are pydicom 3's").get_decoder

    decoder = get_decoder(syntax)
    monkeypatch.setattr(decoder, "_available", {n: f for n, f in decoder._available.items() if n in kept})
    monkeypatch.setitem(sys.modules, "gdcm", None)  # `import gdcm` raises ImportError


@pytest.mark.parametrize("kept", [(), ("pillow",)], ids=["no plugin", "Pillow alone"])
def test_jpeg_extended_without_a_decoder_is_dropped_for_the_decoder_not_as_corrupt(monkeypatch, kept):
    # Pillow is a core dependency; it declines 12-bit JPEG Extended, as every installed plugin does then.
    from pydicom.uid import JPEGExtended12Bit

    _without_the_dicom_extra(monkeypatch, JPEGExtended12Bit, kept)
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        with pytest.raises(ImageProblem) as info:
            decode(_testdata(name).read_bytes(), name)
        reason = info.value.reason
        assert "no installed decoder for JPEG Extended" in reason and "truncated or corrupt" not in reason
        assert reason == "no installed decoder for JPEG Extended (Process 2 and 4) (pip install 'f2m-ray[dicom]')"
        assert reason == images.no_decoder(JPEGExtended12Bit)
        assert "truncated or corrupt" not in str(info.value)


def test_a_corrupt_jpeg_that_pillow_alone_tries_is_still_unreadable(tmp_path, monkeypatch):
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(_testdata("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG Baseline, which Pillow decodes
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(tmp_path / "cut.dcm")
    _without_the_dicom_extra(monkeypatch, JPEGBaseline8Bit, kept=("pillow",))
    with pytest.raises(ImageProblem) as info:
        decode((tmp_path / "cut.dcm").read_bytes(), "cut.dcm")
    assert info.value.reason == images.UNREADABLE_DICOM

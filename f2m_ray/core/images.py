"""Pixels in: decode ROI image files and turn them into model-ready 64x64 arrays in [-1, 1].

Pure functions on bytes and arrays (no Ray, no filesystem): the readers call them in
their Ray Data workers.

Formats
    PNG, JPEG, TIFF (8 or 16 bit; colour is converted to grey) through Pillow, and DICOM
    through pydicom (uncompressed, RLE and deflated transfer syntaxes; JPEG baseline, extended
    and lossless, JPEG-LS and JPEG 2000 with the ``dicom`` extra, ``DICOM_EXTRA``). Bytes are read as DICOM when they carry the ``DICM``
    marker at offset 128 or the file name ends in ``.dcm``/``.dicom``. MONOCHROME1 DICOM
    (0 = white) is inverted so that dense tissue is bright, as in MONOCHROME2. A valid compressed
    file that no installed decoder reads is dropped as ``no_decoder(syntax)`` (naming its transfer
    syntax and the extra), a broken one as ``UNREADABLE_DICOM``.

Windowing rule (stored pixel values -> [-1, 1]), ``window=``
    ``auto``        8-bit images: the fixed linear map 0 -> -1, 255 -> +1 (they are display
                    images already, and 8-bit phantoms and exports round-trip exactly).
                    Deeper images (12/16-bit DICOM, 16-bit PNG/TIFF, float TIFF): ``percentile``.
    ``percentile``  per ROI: the 0.5th percentile of the ROI's pixels -> -1, the 99.5th -> +1,
                    linear in between, clipped. Computed on the cropped ROI at its original
                    resolution, before resizing. Why per ROI: DDSM films were digitised by
                    different scanners with 12- and 16-bit output and different optical-density
                    calibrations, so one fixed window gives one scanner's ROIs another
                    brightness than another's; the percentiles ignore a few hot pixels and
                    film-edge artefacts. A flat ROI (both percentiles equal) maps to -1.
                    A linear modality rescale (RescaleSlope > 0) does not change this window,
                    so none is applied.
    ``bits``        the fixed linear map of the stored range [0, 2**bits - 1] -> [-1, 1], with
                    bits = DICOM BitsStored (12 for 12-bit data in 16-bit words), 8 for 8-bit
                    and 16 for 16-bit PNG/TIFF: absolute intensities stay comparable across
                    ROIs. Float images have no stored range and fall back to ``percentile``.

Resize rule (``fit_square``)
    Scale so that the longer side becomes 64 pixels (aspect ratio kept; Pillow's bilinear
    filter widens its support when shrinking, so downsampling averages rather than
    aliases), then pad the shorter side symmetrically to 64 with the median of the ROI's
    border pixels: a flat tissue-like fill instead of black bars that the GAN would learn
    as content.

ROI from a mask (``mask_window``)
    The bounding box of the mask's non-zero pixels, grown to a square of side
    ``max(box height, box width) * (1 + 2 * margin)`` around the box centre (``margin`` = 0.2:
    a fifth of the mass's size of surrounding tissue on each side, so that spicules and an
    ill-defined edge stay in the ROI), shifted to lie inside the image where it fits (a
    mass at the skin line stays off-centre rather than half padded); where the image is
    smaller than the square, ``crop_window`` pads with the border median.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from f2m_ray.errors import first_line

MODEL_SIZE = 64
WINDOW_RULES = ("auto", "percentile", "bits")
PERCENTILES = (0.5, 99.5)  # the percentile window's low and high points
DEFAULT_MASK_MARGIN = 0.2

# Reasons a single ROI cannot be used; the readers count rows by these strings.
MISSING_FILE = "missing file"
UNREADABLE_DICOM = "unreadable DICOM (truncated or corrupt)"
NOT_AN_IMAGE = "not an image (or a truncated one)"
DICOM_EXTRA = "pip install 'f2m-ray[dicom]'"  # pylibjpeg (libjpeg, openjpeg), pyjpegls and python-gdcm
EMPTY_MASK = "empty ROI mask"
MASK_SIZE_MISMATCH = "ROI mask and full image differ in size"
ONLY_MASKS = "no cropped image found (only ROI masks)"
NO_MASK = "no ROI mask found (no binary image)"
NO_FULL_IMAGE = "no full mammogram found"
TOO_SMALL = "image smaller than 2x2 pixels"


class ImageProblem(Exception):
    """One ROI cannot be used; ``reason`` is the counted reason (one of the constants above)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Pixels:
    """Decoded pixel data as stored: (H, W) uint8, uint16 or float32, and its bit depth."""

    array: np.ndarray  # (H, W)
    bits: int  # significant bits of the stored values; 0 for float images
    description: str = ""  # DICOM SeriesDescription, when there is one


# ---------------------------------------------------------------- decoding


def is_dicom(raw: bytes, name: str = "") -> bool:
    return raw[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def decode(raw: bytes, name: str = "") -> Pixels:
    """Bytes of an image file -> Pixels; raises ImageProblem for unusable files."""
    return _decode_dicom(raw) if is_dicom(raw, name) else _decode_pillow(raw)


def _decode_pillow(raw: bytes) -> Pixels:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(NOT_AN_IMAGE, str(err)) from None
    mode = img.mode
    if mode.startswith("I;16"):
        return Pixels(np.asarray(img).astype(np.uint16), 16)
    if mode == "I":  # 32-bit integer; 16-bit PNGs open so in some Pillow versions
        arr = np.asarray(img)
        if arr.size and arr.min() >= 0 and arr.max() < 1 << 16:
            return Pixels(arr.astype(np.uint16), 16)
        return Pixels(arr.astype(np.float32), 0)
    if mode == "F":
        return Pixels(np.asarray(img, dtype=np.float32), 0)
    if mode != "L":
        img = img.convert("L")
    return Pixels(np.asarray(img, dtype=np.uint8), 8)


def decoder_available(syntax) -> bool:
    """Whether pydicom has a working decoder plugin for a transfer syntax (pydicom >= 3; else False)."""
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except Exception:  # pydicom 2, or a syntax pydicom has no decoder for at all
        return False


def no_decoder(syntax) -> str:
    """The reason for a valid compressed DICOM that no installed decoder reads: one string per transfer syntax."""
    try:
        from pydicom.pixels import get_decoder

        get_decoder(syntax)
    except NotImplementedError:  # pydicom has no decoder for this syntax at all: the extra would not help
        return f"no installed decoder for {syntax.name} (pydicom cannot decode it)"
    except ImportError:  # pydicom 2
        pass
    return f"no installed decoder for {syntax.name} ({DICOM_EXTRA})"


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (pydicom lists each decoder plugin's error on a line of its own)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _plugin_errors(ds) -> list[BaseException]:
    """Decode ``ds`` again and return what each of pydicom's decoder plugins raised (pydicom >= 3).

    pydicom tries every installed plugin and raises one RuntimeError that keeps only their messages;
    the plugins' own exceptions reach its logger (``LOGGER.exception``), which is where they are
    collected, for this thread only.
    """
    import logging
    import threading

    errors: list[BaseException] = []
    thread = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread and record.exc_info and record.exc_info[1] is not None:
                errors.append(record.exc_info[1])

    logger = logging.getLogger("pydicom.pixels.decoders.base")
    handler = _Collect(logging.ERROR)
    logger.addHandler(handler)
    try:
        ds.pixel_array  # noqa: B018 - decoded for the plugins' errors only
    except Exception:
        pass
    finally:
        logger.removeHandler(handler)
    return errors


def _lacks_a_decoder(ds, syntax) -> bool:
    """Whether decoding failed for want of a decoder rather than because the file is broken.

    True when pydicom has no decoder plugin installed for the transfer syntax, or when every installed
    plugin declined the file: pydicom's plugins raise NotImplementedError for data they do not handle
    (Pillow and GDCM both decline 12-bit JPEG Extended, which of pydicom's plugins only pylibjpeg
    decodes). Any other error from a plugin is the file's.
    """
    try:
        if syntax is None or not syntax.is_encapsulated:
            return False
    except ValueError:  # not a transfer syntax pydicom knows
        return False
    if not decoder_available(syntax):
        return True
    errors = _plugin_errors(ds)
    return bool(errors) and all(isinstance(err, NotImplementedError) for err in errors)


def _gdcm_jpeg_extended(ds) -> np.ndarray | None:
    """The first frame of a 12-bit JPEG Extended DICOM decoded by GDCM directly, or None without python-gdcm.

    pydicom's GDCM plugin declines 12-bit JPEG Extended, leaving it to pylibjpeg's libjpeg, which rejects
    some files that GDCM reads (a sequential scan header with a spectral selection other than 0-63, as in
    NEMA's NM1_JPLY). Raises when GDCM cannot decode the frame either.
    """
    try:
        import gdcm
        from pydicom.encaps import generate_frames  # pydicom >= 3
    except ImportError:
        return None

    rows, columns = int(ds.Rows), int(ds.Columns)
    bits, signed = int(ds.BitsStored), int(ds.get("PixelRepresentation", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(next(generate_frames(ds.PixelData, number_of_frames=frames)))
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(ds.get("PhotometricInterpretation", "MONOCHROME2")))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(ds.file_meta.TransferSyntaxUID))))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, signed))
    buffer = image.GetBuffer()  # the decoded bytes as a str (GDCM's char*), or False
    data = buffer.encode("utf-8", "surrogateescape") if isinstance(buffer, str) else b""
    if len(data) != 2 * rows * columns:
        raise ValueError(f"GDCM decoded {len(data)} bytes, not {2 * rows * columns}")
    return np.frombuffer(data, dtype=np.int16 if signed else np.uint16).reshape(rows, columns)


def _decode_dicom(raw: bytes) -> Pixels:
    import pydicom
    from pydicom.uid import JPEGExtended12Bit

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        description = str(ds.get("SeriesDescription", "") or "")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if "PixelData" not in ds:
            raise ImageProblem(UNREADABLE_DICOM, "no pixel data")
        try:
            arr = ds.pixel_array
        except (RuntimeError, NotImplementedError) as err:
            arr = None
            if (syntax == JPEGExtended12Bit and int(ds.get("BitsStored", 8) or 8) > 8
                    and int(ds.get("SamplesPerPixel", 1) or 1) == 1):
                try:
                    arr = _gdcm_jpeg_extended(ds)
                except Exception as gdcm_err:  # GDCM, which reads 12-bit JPEG Extended, cannot: a broken file
                    raise ImageProblem(UNREADABLE_DICOM, f"{_one_line(err)}; GDCM: {first_line(gdcm_err)}") from None
            if arr is None:
                if _lacks_a_decoder(ds, syntax):
                    # A valid file no installed decoder reads: its own reason, naming the syntax and the fix.
                    raise ImageProblem(no_decoder(syntax), _one_line(err)) from None
                raise ImageProblem(UNREADABLE_DICOM, _one_line(err)) from None
        bits = int(ds.get("BitsStored", 0) or 0) or 8 * arr.dtype.itemsize
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    except ImageProblem:
        raise
    except Exception as err:  # pydicom raises many types for truncated/corrupt files
        raise ImageProblem(UNREADABLE_DICOM, f"{type(err).__name__}: {err}") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:  # multi-frame: mammography ROIs are single images; keep the first
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and photometric.startswith(("RGB", "YBR")):
        arr = arr[..., :3].mean(axis=-1)  # pydicom gives YBR as RGB
    elif arr.ndim == 3:  # frames without a NumberOfFrames
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageProblem(UNREADABLE_DICOM, f"pixel array of shape {arr.shape}")
    if arr.dtype.kind == "f":
        return Pixels(arr.astype(np.float32), 0, description)
    if arr.dtype.kind == "i":  # signed storage: shift to non-negative (windowing is linear)
        arr = arr.astype(np.int64) - int(arr.min())
    top = (1 << bits) - 1
    if arr.itemsize * 8 > bits and arr.max() > top:  # stray bits above BitsStored (overlays, noise)
        arr = np.minimum(arr, top)
    if photometric == "MONOCHROME1":
        arr = top - arr
    dtype = np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32
    return Pixels(arr.astype(dtype, copy=False), bits, description)


def header_size(raw_head: bytes, name: str = "") -> tuple[int, int] | None:
    """(height, width) from the first bytes of a file (DICOM Rows/Columns, or Pillow's header), or None."""
    try:
        if is_dicom(raw_head, name):
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(raw_head), stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns)
        from PIL import Image

        width, height = Image.open(io.BytesIO(raw_head)).size
        return height, width
    except Exception:  # a header we cannot parse: the caller decodes the whole file instead
        return None


def is_binary(array: np.ndarray) -> bool:
    """True for a mask: at most two distinct values, one of them 0."""
    top = array.max() if array.size else 0
    return bool(np.count_nonzero((array != 0) & (array != top)) == 0)


# ---------------------------------------------------------------- windowing


def window(pixels: Pixels | np.ndarray, rule: str = "auto", bits: int | None = None) -> np.ndarray:
    """Stored values -> float32 in [-1, 1] by the module's windowing rule (same shape)."""
    if isinstance(pixels, Pixels):
        array, bits = pixels.array, pixels.bits if bits is None else bits
    else:
        array = np.asarray(pixels)
        bits = bits if bits is not None else (8 if array.dtype == np.uint8 else 0)
    if rule not in WINDOW_RULES:
        raise ValueError(f"unknown window rule {rule!r}; valid rules: {', '.join(WINDOW_RULES)}")
    x = array.astype(np.float32)
    if rule == "auto":
        rule = "bits" if array.dtype == np.uint8 else "percentile"
    if rule == "bits" and bits > 0:
        # Divide by half the range (127.5 for 8 bits): bit-identical to the phantoms' own map.
        return np.clip(x / np.float32(((1 << bits) - 1) / 2.0) - 1.0, -1.0, 1.0)
    lo, hi = np.percentile(x, PERCENTILES)
    if hi <= lo:
        return np.full(x.shape, -1.0, dtype=np.float32)
    return np.clip((x - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- geometry


def _border_median(image: np.ndarray) -> float:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return float(np.median(border))


def fit_square(image: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """float32 (H, W) -> (size, size): longer side scaled to `size`, shorter side padded (border median)."""
    from PIL import Image

    h, w = image.shape
    if h < 2 or w < 2:
        raise ImageProblem(TOO_SMALL, f"{h}x{w}")
    scale = size / max(h, w)
    new_h, new_w = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
            (new_w, new_h), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    if (new_h, new_w) == (size, size):
        return resized.copy()
    out = np.full((size, size), _border_median(image), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def mask_window(mask: np.ndarray, margin: float = DEFAULT_MASK_MARGIN) -> tuple[int, int, int]:
    """(top, left, side) of the square ROI around a mask's non-zero pixels (see the module docstring)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ImageProblem(EMPTY_MASK)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(2, int(round(max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin))))
    top = int(round((y0 + y1) / 2.0 - side / 2.0))
    left = int(round((x0 + x1) / 2.0 - side / 2.0))
    height, width = mask.shape
    # Keep the square inside the image where it fits: shift rather than pad.
    if side <= height:
        top = min(max(top, 0), height - side)
    if side <= width:
        left = min(max(left, 0), width - side)
    return top, left, side


def crop_window(image: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """The (side, side) square at (top, left); parts outside the image are the border median."""
    height, width = image.shape
    y0, y1 = max(top, 0), min(top + side, height)
    x0, x1 = max(left, 0), min(left + side, width)
    inside = image[y0:y1, x0:x1]
    if inside.shape == (side, side):
        return inside
    out = np.full((side, side), _border_median(inside), dtype=image.dtype)
    out[y0 - top : y1 - top, x0 - left : x1 - left] = inside
    return out


def model_image(pixels: Pixels, rule: str = "auto", size: int = MODEL_SIZE) -> np.ndarray:
    """Decoded ROI pixels -> float32 (size, size) in [-1, 1]: window, then fit_square."""
    if min(pixels.array.shape) < 2:
        raise ImageProblem(TOO_SMALL, "x".join(map(str, pixels.array.shape)))
    return np.clip(fit_square(window(pixels, rule), size), -1.0, 1.0)


# ---------------------------------------------------------------- model range <-> 8-bit


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] -> uint8 [0, 255], rounding half to even (inverse of to_model_range)."""
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)

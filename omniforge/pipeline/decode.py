"""Decoding of arbitrary corpus image bytes into the canonical rgb array.

`decode_image` is the single place where untrusted image bytes become pixels. Every bad input ends as a
`SampleError` with a short snake_case `error_type` ("empty_file", "decode_error", "too_many_pixels"); no
Pillow exception or warning escapes, and no global Pillow setting is changed.
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from omniforge.errors import SampleError

DEFAULT_STORAGE_SIZE = 512
DEFAULT_MAX_PIXELS = 64_000_000

# Formats a corpus image may be in (Pillow format ids; JPEG includes MPO). Deliberately excludes formats
# whose decoding shells out to external programs (EPS via Ghostscript) or that Pillow can only identify,
# not decode (WMF, MPEG, HDF5, ...). Ids this Pillow build lacks (e.g. AVIF) are skipped.
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "AVIF",
    "PSD", "QOI", "SGI", "PCX",
)

_MAX_MESSAGE = 200
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_image(
    data: bytes, *, storage_size: int = DEFAULT_STORAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode image bytes to the stored rgb form.

    Returns a C-contiguous (H, W, 3) uint8 RGB array: first frame of animations, EXIF orientation applied,
    any colour mode converted (alpha and transparent palettes composited over white, 16-bit and float
    images stretched to their actual value range), downscaled (never upscaled) so that the shorter side is
    at most `storage_size`, aspect ratio kept.

    Raises `SampleError` with error_type "empty_file" (zero bytes), "too_many_pixels" (header size above
    `max_pixels`, or above Pillow's own decompression-bomb limit) or "decode_error" (not an image, an
    unsupported format, truncated or corrupt data).
    """
    if storage_size < 1:
        raise ValueError(f"storage_size must be >= 1, got {storage_size}")
    if not data:
        raise SampleError("empty_file", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning; it must not print per image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _decode(data, storage_size=storage_size, max_pixels=max_pixels)
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError("too_many_pixels", _short(exc)) from None
    except UnidentifiedImageError:
        raise SampleError("decode_error", f"not a supported image file (starts with {data[:16]!r})") from None
    except Exception as exc:  # noqa: BLE001 - any failure inside Pillow means undecodable input
        raise SampleError("decode_error", _short(exc)) from None


def target_size(width: int, height: int, storage_size: int) -> tuple[int, int]:
    """(width, height) after downscaling so the shorter side is at most `storage_size` (never upscales)."""
    short = min(width, height)
    if short <= storage_size:
        return width, height
    scale = storage_size / short
    if width <= height:
        return storage_size, max(1, round(height * scale))
    return max(1, round(width * scale)), storage_size


def _decode(data: bytes, *, storage_size: int, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=_open_formats()) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise SampleError(
                "too_many_pixels",
                f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}",
            )
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if img.format in ("JPEG", "MPO"):
            _jpeg_draft(img, storage_size)
        img.load()
        out = _to_rgb(_exif_transpose(img))
        size = target_size(out.width, out.height, storage_size)
        if size != out.size:
            out = out.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        # np.array copies, so the result never aliases the Pillow image closed on leaving this block
        return np.ascontiguousarray(np.array(out, dtype=np.uint8))


@functools.cache
def _open_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS restricted to those this Pillow build can open (Image.open raises on unknown ids)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _jpeg_draft(img: Image.Image, storage_size: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers the target size."""
    width, height = img.size
    short = min(width, height)
    if short <= 2 * storage_size:
        return
    scale = storage_size / short
    wanted = (math.ceil(width * scale), math.ceil(height * scale))
    mode = "RGB" if img.mode in ("RGB", "YCbCr") else None
    img.draft(mode, wanted)


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - corrupt EXIF must not fail an otherwise good image
        return img
    return img if out is None else out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited over white, high bit depths stretched)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode.startswith("I;16") or mode == "F":
        return _stretch_to_rgb(np.asarray(img))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and img.has_transparency_data):
        return _over_white(img.convert("RGBA"))
    return img.convert("RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(white, rgba).convert("RGB")


def _stretch_to_rgb(arr: np.ndarray) -> Image.Image:
    """Map a single-channel integer or float array onto 0..255 by its actual min..max range."""
    values = arr.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        gray = np.zeros(values.shape, dtype=np.uint8)
    else:
        lo, hi = float(values[finite].min()), float(values[finite].max())
        values = np.where(finite, values, lo)
        if hi > lo:
            gray = np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        else:  # a constant image: keep its value when it fits in 8 bits, else white
            gray = np.full(values.shape, int(np.clip(lo, 0, 255)), dtype=np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:_MAX_MESSAGE]

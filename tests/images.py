"""Generators of real and deliberately nasty image inputs for tests (imported by tests, not collected).

Every file is built in memory from scikit-image's bundled sample photos or synthetic arrays, so nothing
needs the network. `write_bad_corpus` returns the outcome `omniforge.pipeline.decode.decode_image` must
produce for each file when called with `max_pixels=BAD_CORPUS_MAX_PIXELS`.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# The max_pixels the expected outcomes of write_bad_corpus assume.
BAD_CORPUS_MAX_PIXELS = 50_000_000

EXIF_ORIENTATION_TAG = 0x0112


def sample_photo(name: str = "chelsea", size: int | None = None) -> np.ndarray:
    """A scikit-image bundled photo as uint8 (H, W, 3) or (H, W); `size`: shorter side after resizing."""
    from skimage import data as skdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = np.asarray(getattr(skdata, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if size is not None:
        img = Image.fromarray(np.ascontiguousarray(arr))
        scale = size / min(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        arr = np.asarray(img.resize(new, Image.Resampling.LANCZOS))
    return np.ascontiguousarray(arr)


def photo_bytes(name: str = "chelsea", size: int | None = None, *, quality: int = 92) -> bytes:
    """JPEG bytes of a scikit-image sample photo; `size`: shorter side after resizing (None = original)."""
    return _encode(Image.fromarray(sample_photo(name, size)), "JPEG", quality=quality)


def exif_rotated_jpeg(source: np.ndarray, orientation: int = 6) -> bytes:
    """JPEG bytes of `source` stored as is, with an EXIF orientation tag telling viewers to rotate it."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return _encode(Image.fromarray(source), "JPEG", quality=95, exif=exif.tobytes())


def sixteen_bit_png(lo: int = 1000, hi: int = 5000, shape: tuple[int, int] = (64, 96)) -> bytes:
    """A 16-bit grayscale PNG (Pillow mode I;16) with a horizontal ramp spanning exactly lo..hi."""
    ramp = np.linspace(lo, hi, shape[1]).round().astype(np.uint16)
    arr = np.ascontiguousarray(np.broadcast_to(ramp, shape))
    return _encode(Image.fromarray(arr), "PNG")


def palette_png_with_transparency() -> bytes:
    """A P-mode PNG whose palette index 0 is fully transparent; the top-left 8x8 block uses index 0."""
    idx = np.full((32, 32), 1, dtype=np.uint8)
    idx[8:, :] = 2
    idx[:8, :8] = 0
    img = Image.frombytes("P", (idx.shape[1], idx.shape[0]), idx.tobytes())
    img.putpalette([0, 0, 0, 200, 30, 30, 30, 30, 200] + [0] * (256 * 3 - 9))
    return _encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    """An RGBA PNG: red, with a fully transparent left half and an opaque right half."""
    arr = np.zeros((20, 40, 4), dtype=np.uint8)
    arr[:, :, 0] = 255
    arr[:, 20:, 3] = 255
    return _encode(Image.fromarray(arr), "PNG")


def animated_gif(colors: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> bytes:
    """A GIF with one solid-colour 24x24 frame per colour (3 by default); frame 0 is red."""
    frames = [Image.new("RGB", (24, 24), c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG of width x height pixels, a few kB on disk (a decompression bomb).

    Written by hand with streamed compression, so building even a 20000x20000 bomb needs no big buffer.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 20) // len(row))
    parts: list[bytes] = []
    for start in range(0, height, rows_per_block):
        parts.append(comp.compress(row * min(rows_per_block, height - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Write good and nasty image files under `folder`; return {relative posix path: expected outcome}.

    The outcome is "ok" or the SampleError error_type that decode_image(data,
    max_pixels=BAD_CORPUS_MAX_PIXELS) must raise. Names include nested folders, spaces, unicode and
    multiple dots.
    """
    folder = Path(folder)
    photo = sample_photo("chelsea", 120)
    truncated_source = photo_bytes("astronaut", 256)
    files: dict[str, tuple[bytes, str]] = {
        "photo.jpg": (photo_bytes("chelsea", 120), "ok"),
        "broken/truncated.jpg": (truncated_source[: len(truncated_source) // 2], "decode_error"),
        "broken/zero bytes.jpg": (b"", "empty_file"),
        "broken/not an image.png": (b"this is a plain text file, not a PNG\n", "decode_error"),
        "broken/error-page.jpg": (b"<html><body>403 Forbidden</body></html>", "decode_error"),
        "modes/cmyk.jpg": (_encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95), "ok"),
        "modes/16bit.png": (sixteen_bit_png(), "ok"),
        "modes/palette transparent.png": (palette_png_with_transparency(), "ok"),
        "modes/rgba.png": (rgba_png(), "ok"),
        "modes/grayscale.jpg": (photo_bytes("camera", 64), "ok"),
        "modes/float.tiff": (_encode(Image.fromarray(np.linspace(-1, 3, 48 * 32, dtype=np.float32)
                                                     .reshape(32, 48)), "TIFF"), "ok"),
        "animated.3frames.gif": (animated_gif(), "ok"),
        "nested/deeper/exif rotated.orientation-6.jpg": (exif_rotated_jpeg(photo), "ok"),
        "sizes/one_pixel.png": (_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "ok"),
        "sizes/wide 4000x8.png": (_encode(Image.new("RGB", (4000, 8), (0, 128, 255)), "PNG"), "ok"),
        "nested/ünïcødé ファイル.v2.final.png": (_encode(Image.fromarray(photo), "PNG"), "ok"),
        "bombs/bomb 20000x20000.png": (png_bomb(20_000, 20_000), "too_many_pixels"),
        "bombs/bomb 10000x10000.png": (png_bomb(10_000, 10_000), "too_many_pixels"),
        "bombs/over limit 8000x8000.png": (png_bomb(8_000, 8_000), "too_many_pixels"),
        "bombs/under limit 4000x4000.png": (png_bomb(4_000, 4_000), "ok"),
    }
    expected: dict[str, str] = {}
    for rel, (payload, outcome) in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        expected[rel] = outcome
    return expected


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

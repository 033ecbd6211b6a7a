"""decode_image: every nasty input ends as an rgb array or one typed SampleError."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from images import (
    BAD_CORPUS_MAX_PIXELS,
    exif_rotated_jpeg,
    palette_png_with_transparency,
    photo_bytes,
    png_bomb,
    rgba_png,
    sample_photo,
    sixteen_bit_png,
    write_bad_corpus,
)
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from omniforge.errors import SampleError
from omniforge.pipeline.decode import decode_image


def _outcome(data: bytes, **kwargs: int) -> str:
    try:
        arr = decode_image(data, **kwargs)
    except SampleError as exc:
        assert exc.message and len(exc.message) <= 200 and "\n" not in exc.message
        return exc.error_type
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.c_contiguous
    assert min(arr.shape[:2]) <= kwargs.get("storage_size", 512)
    return "ok"


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("bad")
    return root, write_bad_corpus(root)


def test_bad_corpus_layout(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = bad_corpus
    assert len(expected) >= 14
    names = list(expected)
    assert any("/" in n for n in names) and any(" " in n for n in names)
    assert any(not n.isascii() for n in names) and any(n.count(".") >= 2 for n in names)
    for rel in expected:
        assert (root / rel).is_file()
    assert {"ok", "decode_error", "empty_file", "too_many_pixels"} <= set(expected.values())


def test_every_bad_corpus_entry_has_its_expected_outcome(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    root, expected = bad_corpus
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Pillow DecompressionBombWarning must not escape either
        got = {rel: _outcome((root / rel).read_bytes(), max_pixels=BAD_CORPUS_MAX_PIXELS) for rel in expected}
    assert got == expected


def test_pil_limit_is_not_changed_globally(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    before = Image.MAX_IMAGE_PIXELS
    root, _ = bad_corpus
    assert _outcome((root / "bombs/bomb 20000x20000.png").read_bytes()) == "too_many_pixels"
    assert Image.MAX_IMAGE_PIXELS == before


def test_bomb_message_names_the_size() -> None:
    with pytest.raises(SampleError) as info:
        decode_image(png_bomb(9000, 9000), max_pixels=BAD_CORPUS_MAX_PIXELS)
    assert info.value.error_type == "too_many_pixels" and "9000x9000" in info.value.message


def test_exif_orientation_6_is_applied() -> None:
    src = sample_photo("chelsea", 120)  # (120, 180, 3)
    arr = decode_image(exif_rotated_jpeg(src, orientation=6))
    assert arr.shape == (src.shape[1], src.shape[0], 3)
    clockwise = np.rot90(src, k=-1).astype(np.int16)  # orientation 6: rotate 90 degrees clockwise to view
    counter = np.rot90(src, k=1).astype(np.int16)
    err = np.abs(arr.astype(np.int16) - clockwise).mean()
    assert err < 4.0
    assert np.abs(arr.astype(np.int16) - counter).mean() > 4 * err


def test_no_upscaling() -> None:
    data = photo_bytes("chelsea", 100)
    arr = decode_image(data, storage_size=512)
    assert arr.shape[:2] == (100, 150)
    assert decode_image(_png(np.zeros((1, 1, 3), np.uint8))).shape == (1, 1, 3)
    assert decode_image(_png(np.zeros((8, 4000, 3), np.uint8)), storage_size=512).shape == (8, 4000, 3)


@pytest.mark.parametrize(("h", "w"), [(300, 451), (451, 300), (512, 512), (257, 1000)])
def test_downscale_to_storage_size_keeps_aspect(h: int, w: int) -> None:
    img = Image.fromarray(sample_photo("astronaut")).resize((w, h))
    arr = decode_image(_png(np.asarray(img)), storage_size=128)
    oh, ow = arr.shape[:2]
    assert min(oh, ow) == 128
    if h <= w:
        assert abs(ow - w * 128 / h) <= 1
    else:
        assert abs(oh - h * 128 / w) <= 1


def test_jpeg_draft_path_matches_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    data = photo_bytes("astronaut", 2048, quality=95)  # 2048x2048 -> draft 1/8 = 256 -> resize to 200
    calls: list[tuple[object, object]] = []
    original = JpegImageFile.draft

    def spy(self: JpegImageFile, mode: str | None, size: tuple[int, int] | None):  # type: ignore[no-untyped-def]
        calls.append((mode, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    fast = decode_image(data, storage_size=200)
    assert calls, "the JPEG draft fast path was not used"
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(img.convert("RGB").resize((200, 200), Image.Resampling.LANCZOS))
    assert fast.shape == full.shape == (200, 200, 3)
    assert np.abs(fast.astype(np.int16) - full.astype(np.int16)).mean() < 4.0


def test_small_jpeg_skips_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: calls.append(size))
    decode_image(photo_bytes("chelsea", 300), storage_size=512)
    assert not calls


def test_sixteen_bit_uses_full_range() -> None:
    with Image.open(io.BytesIO(sixteen_bit_png(1000, 5000))) as img:
        assert img.mode.startswith("I")
    arr = decode_image(sixteen_bit_png(1000, 5000))
    assert arr.min() == 0 and arr.max() == 255
    row = arr[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0)  # the ramp stays monotonic
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_alpha_composited_over_white() -> None:
    arr = decode_image(rgba_png())
    assert tuple(arr[0, 0]) == (255, 255, 255)  # fully transparent -> white
    assert tuple(arr[0, -1]) == (255, 0, 0)  # opaque red stays red
    pal = decode_image(palette_png_with_transparency())
    assert tuple(pal[0, 0]) == (255, 255, 255)
    assert tuple(pal[0, 20]) == (200, 30, 30) and tuple(pal[20, 20]) == (30, 30, 200)


def test_half_transparent_blends_with_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 128  # half-transparent black
    arr = decode_image(_png(rgba))
    assert np.all(np.abs(arr.astype(int) - 127) <= 1)


def test_animated_gif_gives_first_frame(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_corpus
    arr = decode_image((root / "animated.3frames.gif").read_bytes())
    assert tuple(arr[5, 5]) == (255, 0, 0)


def test_cmyk_jpeg_is_close_to_source(bad_corpus: tuple[Path, dict[str, str]]) -> None:
    root, _ = bad_corpus
    arr = decode_image((root / "modes/cmyk.jpg").read_bytes())
    src = sample_photo("chelsea", 120)
    assert arr.shape == src.shape
    assert np.abs(arr.astype(np.int16) - src.astype(np.int16)).mean() < 12.0


def test_float_image_is_normalized() -> None:
    arr32 = np.linspace(-1, 3, 100, dtype=np.float32).reshape(10, 10)
    buf = io.BytesIO()
    Image.fromarray(arr32).save(buf, format="TIFF")
    arr = decode_image(buf.getvalue())
    assert arr.min() == 0 and arr.max() == 255


def test_grayscale_and_bilevel_become_rgb() -> None:
    gray = decode_image(photo_bytes("camera", 64))
    assert gray.shape == (64, 64, 3)
    buf = io.BytesIO()
    Image.new("1", (10, 6), 1).save(buf, format="PNG")
    assert (decode_image(buf.getvalue()) == 255).all()


def test_messages_are_short_first_lines() -> None:
    with pytest.raises(SampleError) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert info.value.error_type == "decode_error"
    assert len(info.value.message) <= 200 and "\n" not in info.value.message


def test_eps_is_refused_without_running_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(SampleError) as info:
        decode_image(eps)
    assert info.value.error_type == "decode_error"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()

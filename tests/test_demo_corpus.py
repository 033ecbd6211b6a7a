"""The demo corpus: real bundled photos, captions, one broken file, identical bytes on every build."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from omniforge.errors import SampleError
from omniforge.jobs.demo_corpus import BROKEN_PATH, DEMO_PHOTOS, build_demo_corpus
from omniforge.pipeline.decode import decode_image

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_corpus(tmp_path_factory.mktemp("demo"))


def test_images_decode_and_have_captions(corpus: Path) -> None:
    images = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in _IMAGE_EXTS)
    assert {p.suffix.lower() for p in images} == {".jpg", ".png"}
    assert any(len(p.relative_to(corpus).parts) > 1 for p in images)
    ok, failed = [], []
    for path in images:
        caption = path.with_suffix(".txt")
        assert caption.is_file() and caption.read_text("utf-8").strip(), f"no caption for {path}"
        try:
            arr = decode_image(path.read_bytes())
        except SampleError as exc:
            failed.append((path.relative_to(corpus).as_posix(), exc.error_type))
            continue
        assert arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) <= 512
        ok.append(path)
    assert len(ok) >= 8
    assert len(ok) == len(DEMO_PHOTOS)
    assert failed == [(BROKEN_PATH, "decode_error")]


def test_deterministic_across_builds(tmp_path: Path, corpus: Path) -> None:
    again = build_demo_corpus(tmp_path / "second")
    assert _hashes(again) == _hashes(corpus)
    rebuilt = build_demo_corpus(tmp_path / "second")  # rebuilding in place changes nothing either
    assert _hashes(rebuilt) == _hashes(corpus)
    assert not any(p.name.endswith(".tmp") for p in rebuilt.rglob("*"))


def test_n_images_limits_the_photos(tmp_path: Path) -> None:
    root = build_demo_corpus(tmp_path, n_images=3)
    images = [p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_EXTS]
    assert len(images) == 4  # 3 photos + the broken file
    assert (root / BROKEN_PATH).is_file()

"""A small, real, offline demo corpus built from the photos bundled with scikit-image.

Used by `omniforge demo` and the tests: a folder corpus with nested subfolders, JPEG and PNG files, a
sidecar caption `<name>.txt` beside every image, and one deliberately truncated JPEG so that a demo run
shows a recorded failure. Only images that ship inside the scikit-image wheel are used (no pooch
downloads), and the output is byte-for-byte deterministic.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from omniforge.errors import CorpusError

JPEG_QUALITY = 90
BROKEN_PATH = "broken/truncated.jpg"


@dataclass(frozen=True)
class DemoPhoto:
    """One demo image: the skimage.data loader, where it goes in the corpus, and its caption."""

    loader: str
    path: str  # relative to the corpus folder; the extension decides the encoding
    caption: str


DEMO_PHOTOS: tuple[DemoPhoto, ...] = (
    DemoPhoto("astronaut", "people/astronaut.jpg",
              "an astronaut in a spacesuit smiling in front of the US flag, holding a helmet"),
    DemoPhoto("chelsea", "animals/chelsea the cat.jpg",
              "a close up of a tabby cat with green eyes looking to the side"),
    DemoPhoto("coffee", "objects/coffee.png",
              "a red cup of espresso on a saucer with a spoon, on a wooden table"),
    DemoPhoto("rocket", "space/rocket.jpg",
              "a rocket on its launch pad between lightning towers at dusk"),
    DemoPhoto("camera", "people/cameraman.png",
              "a black and white photo of a man in a coat operating a camera on a tripod"),
    DemoPhoto("coins", "objects/coins.png",
              "a grayscale photo of old coins laid out in rows on a dark background"),
    DemoPhoto("hubble_deep_field", "space/hubble deep field.jpg",
              "a deep space image full of distant galaxies of many colours on black"),
    DemoPhoto("immunohistochemistry", "science/immunohistochemistry.png",
              "a microscope image of stained tissue with brown and blue cells"),
    DemoPhoto("stereo_motorcycle", "objects/motorcycle.jpg",
              "a red motorcycle parked in a garage full of shelves and boxes"),
    DemoPhoto("retina", "science/retina.jpg",
              "a photo of the back of a human eye showing the retina and its blood vessels"),
    DemoPhoto("moon", "space/moon.png",
              "a grayscale close up of the surface of the moon with craters"),
    DemoPhoto("logo", "logo/scikit-image logo.png",
              "the scikit-image logo: a snake in a green and orange circle, on a transparent background"),
)
BROKEN_CAPTION = "a photo whose download was cut off halfway, so the file is truncated"


def build_demo_corpus(out_dir: Path, *, n_images: int | None = None) -> Path:
    """Write the demo folder corpus under `out_dir / "images"` and return that folder.

    The folder holds the first `n_images` photos of DEMO_PHOTOS (all of them by default), each with a
    sidecar caption `<stem>.txt`, plus the truncated JPEG BROKEN_PATH with its caption. Files are
    rewritten on every call with identical bytes. Raises CorpusError when scikit-image is missing.
    """
    photos = DEMO_PHOTOS if n_images is None else DEMO_PHOTOS[: max(0, n_images)]
    root = Path(out_dir) / "images"
    for photo in photos:
        _write(root / photo.path, _encode(_load(photo.loader), photo.path))
        _write_caption(root / photo.path, photo.caption)
    _write(root / BROKEN_PATH, _truncated_jpeg())
    _write_caption(root / BROKEN_PATH, BROKEN_CAPTION)
    return root


def _load(name: str) -> np.ndarray:
    """A bundled skimage.data image as uint8 (H, W), (H, W, 3) or (H, W, 4)."""
    try:
        from skimage import data as skdata
    except ImportError as exc:
        raise CorpusError(
            f"the demo corpus needs scikit-image ({exc}); install it with: pip install scikit-image"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = getattr(skdata, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle -> (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise CorpusError(f"skimage.data.{name} is {arr.dtype}, expected uint8")
    return np.ascontiguousarray(arr)


def _encode(arr: np.ndarray, path: str) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if path.lower().endswith((".jpg", ".jpeg")):
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    data = _encode(_load("coffee"), "coffee.jpg")
    return data[: len(data) // 2]


def _write_caption(image_path: Path, caption: str) -> None:
    _write(image_path.with_suffix(".txt"), (caption + "\n").encode("utf-8"))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)

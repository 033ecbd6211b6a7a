"""render_sample draws every modality of a sample; pca_rgb recovers planted structure."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from images import sample_photo
from PIL import Image

from omniforge._render import pca_rgb, render_sample


def _sample() -> dict[str, object]:
    rng = np.random.default_rng(0)
    rgb = sample_photo("chelsea", 160)
    depth = np.tile(np.linspace(0, 65535, rgb.shape[1]).astype(np.uint16), (rgb.shape[0], 1))
    semseg = np.full(rgb.shape[:2], 255, np.uint8)
    semseg[40:120, 60:200] = 15  # "cat"
    return {
        "rgb": rgb,
        "caption": "a ginger cat sitting on a wooden floor, looking slightly to the left of the camera",
        "canny_edge": cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200),
        "clip": rng.standard_normal((14, 14, 512)).astype(np.float16),
        "dinov2_global": rng.standard_normal(768).astype(np.float16),
        "color_palette": [{str(k): [[180, 120, 80], [40, 30, 20], [230, 220, 210]][:k] for k in range(1, 8)}],
        "depth": depth,
        "normal": np.full((*rgb.shape[:2], 3), (128, 128, 255), np.uint8),
        "semseg_coco": Image.fromarray(semseg).convert("P"),
        "det": {"instances": [{"boxes": [0.2, 0.2, 0.8, 0.9], "class_name": "cat", "score": 0.93}]},
        "metadata": {"brightness": 0.4, "colourfulness": 0.2, "watermark": False},
        "mystery": np.arange(24, dtype=np.int32).reshape(2, 3, 4),
    }


def test_render_sample_is_a_reasonable_rgb_image() -> None:
    img = render_sample("sample-0001", _sample(), failures={"depth_extra": "teacher_error: CUDA out of memory"})
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    w, h = img.size
    assert 600 <= w <= 3000 and 400 <= h <= 4000
    arr = np.asarray(img)
    assert arr.std() > 20  # not a blank canvas
    # the failure panel draws red text
    red = (arr[..., 0] > 180) & (arr[..., 1] < 60) & (arr[..., 2] < 60)
    assert red.sum() > 20


def test_a_palette_label_is_drawn_as_swatches_for_every_k() -> None:
    red, blue = [255, 0, 0], [0, 0, 255]
    label = [{str(k): ([red] if k == 1 else [blue] * k) for k in range(1, 8)}]
    arr = np.asarray(render_sample("k", {"color_palette": label})).astype(int)
    is_red = (arr[..., 0] > 240) & (arr[..., 1] < 15) & (arr[..., 2] < 15)
    is_blue = (arr[..., 2] > 240) & (arr[..., 0] < 15) & (arr[..., 1] < 15)
    assert is_red.sum() > 50 and is_blue.sum() > 20 * is_red.sum()  # 27 blue swatches, 1 red


def test_render_handles_empty_and_odd_values() -> None:
    img = render_sample("k", {}, failures=None, title="nothing here")
    assert img.mode == "RGB" and min(img.size) > 50
    odd = {"caption": "", "weird": {"nested": [1, 2, {"x": None}]}, "raw": b"\x00\x01", "det": {"bad": 1},
           "empty": np.zeros((0,), np.float32), "vec": np.array([np.nan, 1.0, 2.0])}
    assert render_sample("k", odd).mode == "RGB"


def test_render_does_not_touch_pyplot_state() -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    render_sample("k", {"rgb": np.zeros((8, 8, 3), np.uint8)})
    assert matplotlib.get_backend() == backend


def test_pca_rgb_recovers_planted_pattern() -> None:
    rng = np.random.default_rng(1)
    h, w, c = 14, 14, 512
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = np.sin(xx / 2.0) + np.cos(yy / 3.0)
    direction = rng.standard_normal(c)
    direction /= np.linalg.norm(direction)
    feats = np.outer(pattern.ravel(), direction).reshape(h, w, c) * 5.0
    feats += 0.05 * rng.standard_normal((h, w, c))
    out = pca_rgb(feats.astype(np.float16))
    assert out.shape == (h, w, 3) and out.dtype.kind == "f"
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out[..., 0].min() == pytest.approx(0.0) and out[..., 0].max() == pytest.approx(1.0)
    r = np.corrcoef(out[..., 0].ravel(), pattern.ravel())[0, 1]
    assert abs(r) > 0.9


def test_pca_rgb_edge_cases() -> None:
    assert (pca_rgb(np.zeros((3, 4, 8), np.float32)) == 0).all()
    two = pca_rgb(np.random.default_rng(0).standard_normal((5, 5, 2)))
    assert two.shape == (5, 5, 3) and (two[..., 2] == 0).all()
    assert pca_rgb(np.ones((1, 1, 16))).shape == (1, 1, 3)
    with pytest.raises(ValueError):
        pca_rgb(np.zeros((4, 4)))


def test_an_embedding_is_drawn_as_its_valid_vectors() -> None:
    from matplotlib.figure import Figure

    from omniforge._render import _painter

    emb = np.zeros((1, 77, 4096), np.float16)
    emb[0, :12] = np.random.default_rng(0).standard_normal((12, 4096))
    label = {"emb": emb, "mask_valid": (np.arange(77) < 12)[None]}
    for value, desc in ((label, "float16 (1, 77, 4096), 12 of 77 valid"), (emb[0, :12], "(12, 4096) vectors")):
        ax = Figure().subplots()
        assert desc in _painter("t5_caption (input)", value, {})(ax)
        (image,) = ax.get_images()
        assert image.get_array().shape == (12, 4096)
    assert render_sample("k", {"t5_caption": label}).size[0] > 100

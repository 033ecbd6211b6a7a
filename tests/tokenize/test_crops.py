"""Crop settings and one crop applied to every modality (omniforge.tokenize.crops).

Expected positions are computed by hand from the crop's coordinate change (x_crop = (x - left) * size / w,
mirrored as size - x_crop), never read back from the code under test.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from omniforge.errors import ConfigError, SampleError
from omniforge.coco import COCO_KEYPOINTS
from omniforge.tokenize.crops import (
    CropConfig,
    crop_dense,
    crop_det,
    crop_image,
    crop_keypoints,
    crop_sam,
    crop_settings,
    uncrop_mask,
)

SIZE = 224


# ---------------------------------------------------------------------------------------------- crop settings


def test_crop_settings_deterministic_and_per_key():
    cfg = CropConfig(n_crops=4, seed=3)
    a = crop_settings("img_0001", 512, 683, cfg)
    assert a.dtype == np.int32 and a.shape == (4, 5)
    np.testing.assert_array_equal(a, crop_settings("img_0001", 512, 683, CropConfig(n_crops=4, seed=3)))
    # A fresh interpreter with a different str hash seed draws the same crops.
    code = ("import json; from omniforge.tokenize.crops import CropConfig, crop_settings; "
            "print(json.dumps(crop_settings('img_0001', 512, 683, CropConfig(n_crops=4, seed=3)).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert json.loads(out.stdout) == a.tolist()
    # Other keys and other seeds draw other random crops; crop 0 is the same centre crop for all.
    others = [crop_settings(f"img_{i:04d}", 512, 683, cfg) for i in range(2, 22)]
    assert all(not np.array_equal(o[1:], a[1:]) for o in others)
    assert len({o[1:].tobytes() for o in others}) == len(others)
    assert not np.array_equal(crop_settings("img_0001", 512, 683, CropConfig(n_crops=4, seed=4))[1:], a[1:])
    # Crop i does not depend on how many crops are asked for.
    np.testing.assert_array_equal(crop_settings("img_0001", 512, 683, CropConfig(n_crops=2, seed=3)), a[:2])


@pytest.mark.parametrize("h, w, expected", [
    (512, 683, (0, 85, 512, 512)),   # landscape: (683 - 512) // 2 columns cut on the left
    (700, 512, (94, 0, 512, 512)),   # portrait: (700 - 512) // 2 rows cut on top
    (300, 300, (0, 0, 300, 300)),
    (1, 9, (0, 4, 1, 1)),
])
def test_crop_zero_is_the_centred_largest_square(h, w, expected):
    crops = crop_settings("k", h, w, CropConfig(n_crops=3, hflip=1.0))
    assert tuple(crops[0]) == (*expected, 0)
    assert (crops[1:, 4] == 1).all()


def test_random_crops_respect_bounds_scale_ratio_and_flip_rate():
    height, width = 512, 683
    cfg = CropConfig(n_crops=4, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    rows = np.concatenate([crop_settings(f"key-{i}", height, width, cfg)[1:] for i in range(400)])
    top, left, h, w, flip = rows.T.astype(np.float64)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # w and h are each rounded to the nearest integer, so allow half a pixel on each side.
    area = height * width
    assert ((w + 0.5) * (h + 0.5) >= 0.35 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    # The crops actually vary over the allowed range, and about half are flipped (1200 draws: sd 0.0144).
    assert (w * h / area).min() < 0.45 and (w * h / area).max() > 0.9
    assert len(set(top.tolist())) > 50 and len(set(left.tolist())) > 50
    assert 0.44 < flip.mean() < 0.56
    assert (crop_settings("key-0", height, width, CropConfig(n_crops=8, hflip=0.0))[:, 4] == 0).all()


def test_crops_fit_in_tiny_and_extreme_images():
    for h, w in [(1, 1), (2, 1), (1, 500), (500, 3)]:
        crops = crop_settings("x", h, w, CropConfig(n_crops=6))
        assert (crops[:, 2:4] >= 1).all()
        assert (crops[:, 0] + crops[:, 2] <= h).all() and (crops[:, 1] + crops[:, 3] <= w).all()


def test_crop_config_validation_and_fingerprint():
    cfg = CropConfig(n_crops=3, scale=[0.2, 1], seed=7)
    assert cfg.scale == (0.2, 1.0)
    assert CropConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.fingerprint() == CropConfig(n_crops=3, scale=(0.2, 1.0), seed=7).fingerprint()
    assert cfg.fingerprint() != CropConfig(n_crops=3, scale=(0.2, 1.0), seed=8).fingerprint()
    assert cfg.fingerprint() != CropConfig(n_crops=3, scale=(0.2, 1.0), seed=7, size=256).fingerprint()
    for field, kwargs in [("n_crops", {"n_crops": 0}), ("size", {"size": 0}), ("scale", {"scale": (0.5, 0.2)}),
                          ("scale", {"scale": (0.0, 1.0)}), ("scale", {"scale": (0.5, 1.5)}),
                          ("ratio", {"ratio": (2.0, 1.0)}), ("hflip", {"hflip": 1.5}), ("seed", {"seed": "a"})]:
        with pytest.raises(ConfigError, match=field):
            CropConfig(**kwargs)
    with pytest.raises(ConfigError, match="bogus"):
        CropConfig.from_dict({"bogus": 1})


# ----------------------------------------------------------------------------- one object seen by every modality

H, W = 300, 400
OBJ = (240, 100, 320, 160)  # the object's pixels: columns 240..319, rows 100..159 (XYXY, exclusive max)
CLASS_ID = 7


def _scene():
    x0, y0, x1, y1 = OBJ
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[y0:y1, x0:x1] = 255
    semseg = np.full((H, W), 255, np.uint8)
    semseg[y0:y1, x0:x1] = CLASS_ID
    det = {"instances": [{"boxes": [x0 / W, y0 / H, x1 / W, y1 / H], "class_name": "dog", "score": 0.9}]}
    kps = [[0.05, 0.05, 0.8] for _ in COCO_KEYPOINTS]
    centre = ((x0 + x1) / 2 / W, (y0 + y1) / 2 / H)
    kps[COCO_KEYPOINTS.index("left_wrist")] = [centre[0], centre[1], 0.9]
    poses = {"keypoint_names": list(COCO_KEYPOINTS),
             "instances": [{"bbox": [x0 / W, y0 / H, x1 / W, y1 / H], "score": 0.8, "keypoints": kps}]}
    m = np.zeros((H, W), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    sam = {"instances": [{"segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")},
                          "bbox": [x0, y0, x1 - 1, y1 - 1], "score": 0.9, "stability_score": 0.95,
                          "area": int(m.sum())}], "image_size": [H, W]}
    return rgb, semseg, det, poses, sam


def _expected_box(crop):
    """The object's XYXY in pixels of the SIZE crop, by hand: clip to the crop, scale, mirror."""
    top, left, h, w, flip = (int(v) for v in crop)
    x0, y0, x1, y1 = OBJ
    ex0 = (min(max(x0, left), left + w) - left) * SIZE / w
    ex1 = (min(max(x1, left), left + w) - left) * SIZE / w
    ey0 = (min(max(y0, top), top + h) - top) * SIZE / h
    ey1 = (min(max(y1, top), top + h) - top) * SIZE / h
    if flip:
        ex0, ex1 = SIZE - ex1, SIZE - ex0
    return np.array([ex0, ey0, ex1, ey1])


def _pixel_box(mask):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


HAND_CROPS = [
    (0, 50, 300, 300, 0),    # the centre crop of a 300 x 400 image
    (0, 50, 300, 300, 1),
    (50, 150, 200, 250, 1),  # object fully inside, flipped, non-square crop
    (80, 200, 150, 150, 0),  # object cut by the crop's right and bottom borders
    (20, 280, 240, 120, 1),  # object cut on the left, flipped
]


@pytest.mark.parametrize("crop", HAND_CROPS + [tuple(c) for c in crop_settings("scene", H, W, CropConfig(
    n_crops=6, scale=(0.5, 1.0), hflip=0.5, seed=1))[1:]])
def test_one_crop_puts_every_modality_at_the_same_place(crop):
    crop = np.array(crop, dtype=np.int32)
    expected = _expected_box(crop)
    rgb, semseg, det, poses, sam = _scene()
    if expected[2] - expected[0] < 3 or expected[3] - expected[1] < 3:
        pytest.skip("object (almost) outside this random crop")
    flip = bool(crop[4])

    sem = crop_dense(semseg, crop, SIZE, mode="nearest")
    assert sem.shape == (SIZE, SIZE) and sem.dtype == np.uint8
    np.testing.assert_allclose(_pixel_box(sem == CLASS_ID), expected, atol=1.5)

    img = crop_image(rgb, crop, SIZE)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(_pixel_box(img[:, :, 0] > 127), expected, atol=1.5)

    (inst,) = crop_det(det, crop, H, W)
    np.testing.assert_allclose(np.array(inst["boxes"]) * SIZE, expected, atol=0.01)
    assert inst["class_name"] == "dog" and inst["score"] == 0.9

    (person,) = crop_keypoints(poses, crop, H, W)["instances"]
    np.testing.assert_allclose(np.array(person["bbox"]) * SIZE, expected, atol=0.01)
    top, left, h, w, _ = (int(v) for v in crop)
    cx, cy = (280 - left) * SIZE / w, (130 - top) * SIZE / h
    if flip:
        cx = SIZE - cx
    wrist = "right_wrist" if flip else "left_wrist"  # a flipped left wrist is seen as a right wrist
    x, y, score = person["keypoints"][COCO_KEYPOINTS.index(wrist)]
    if 0 <= cx <= SIZE and 0 <= cy <= SIZE:
        assert score == 0.9
        np.testing.assert_allclose([x * SIZE, y * SIZE], [cx, cy], atol=0.01)
    else:
        assert score == 0.0

    (si,) = crop_sam(sam, crop, H, W, size=SIZE)
    np.testing.assert_allclose(si.bbox, expected, atol=1.5)
    assert si.full.shape == (SIZE, SIZE) and si.full.dtype == bool
    inter = np.logical_and(si.full, sem == CLASS_ID).sum()
    union = np.logical_or(si.full, sem == CLASS_ID).sum()
    assert inter / union > 0.95
    assert si.mask.shape == (64, 64) and si.mask.dtype == np.uint8
    assert si.mask.mean() > 0.95  # a rectangle fills its own bbox


# -------------------------------------------------------------------------------------------------- dense modes


def test_nearest_never_invents_class_ids():
    rng = np.random.default_rng(0)
    ids = np.array([3, 17, 99, 255], np.uint8)
    semseg = ids[rng.integers(0, 4, (60, 80))].repeat(5, axis=0).repeat(5, axis=1)  # 300 x 400 blocks
    for crop in [(0, 50, 300, 300, 0), (13, 27, 171, 233, 1), (100, 100, 37, 51, 0)]:
        out = crop_dense(semseg, np.array(crop), SIZE, mode="nearest")
        assert set(np.unique(out).tolist()) <= {3, 17, 99, 255}
        assert len(np.unique(out)) == 4
    # Bilinear on the same map does blend ids, so the test above can fail.
    blended = crop_dense(semseg, np.array((13, 27, 171, 233, 1)), SIZE, mode="bilinear")
    assert not set(np.unique(blended).tolist()) <= {3, 17, 99, 255}


def test_uint16_depth_keeps_dtype_range_and_precision():
    ramp = (np.arange(400, dtype=np.float64) / 399 * 65535)
    depth = np.tile(np.rint(ramp).astype(np.uint16), (300, 1))
    crop = np.array((10, 100, 200, 200, 0))
    out = crop_dense(depth, crop, SIZE, mode="bilinear")
    assert out.dtype == np.uint16 and out.shape == (SIZE, SIZE)
    assert out.min() >= depth[:, 100:300].min() and out.max() <= depth[:, 100:300].max()
    # Output column j samples image column 100 + (j + 0.5) * 200 / 224 - 0.5 of a linear ramp.
    j = np.arange(8, SIZE - 8)
    src = 100 + (j + 0.5) * 200 / SIZE - 0.5
    np.testing.assert_allclose(out[SIZE // 2, j].astype(np.float64), src / 399 * 65535, atol=3.0)
    assert len(np.unique(out)) > 200  # finer than 8 bits over a ~30000-wide span
    flipped = crop_dense(depth, np.array((10, 100, 200, 200, 1)), SIZE, mode="bilinear")
    np.testing.assert_array_equal(flipped, out[:, ::-1])


def test_float_features_keep_dtype_and_channels():
    feat = np.random.default_rng(1).standard_normal((32, 48, 5)).astype(np.float16)
    out = crop_dense(feat, np.array((0, 8, 32, 32, 0)), 16, mode="bilinear")
    assert out.dtype == np.float16 and out.shape == (16, 16, 5)
    # An exact 2x downsampling of a constant patch stays that constant.
    const = np.full((32, 32), 1.25, np.float32)
    np.testing.assert_array_equal(crop_dense(const, np.array((0, 0, 32, 32, 1)), 16, mode="bicubic"), 1.25)


def test_normal_flip_mirrors_x():
    normal = np.empty((H, W, 3), np.uint8)
    normal[:, :, 1:] = 128
    normal[:, : W // 2, 0] = 255  # left half faces right (n_x = +1)
    normal[:, W // 2:, 0] = 0     # right half faces left (n_x = -1)
    whole = np.array((0, 0, H, W, 0))
    same = crop_dense(normal, whole, SIZE, mode="normal")
    assert (same[:, :100, 0] == 255).all() and (same[:, -100:, 0] == 0).all()
    flipped = crop_dense(normal, np.array((0, 0, H, W, 1)), SIZE, mode="normal")
    # The right-facing half moves to the right and now faces left, and vice versa: n_x = -1 on the right.
    assert (flipped[:, -100:, 0] == 0).all() and (flipped[:, :100, 0] == 255).all()
    facing_right = np.full((H, W, 3), (255, 128, 128), np.uint8)
    out = crop_dense(facing_right, np.array((0, 50, 300, 300, 1)), SIZE, mode="normal")
    assert (out[:, :, 0] == 0).all() and (out[:, :, 1:] == 128).all()
    assert (crop_dense(facing_right, np.array((0, 50, 300, 300, 0)), SIZE, mode="normal")[:, :, 0] == 255).all()


def test_dense_rejects_bad_modes_and_crops():
    with pytest.raises(ConfigError, match="mode"):
        crop_dense(np.zeros((10, 10), np.uint8), np.array((0, 0, 10, 10, 0)), 4, mode="lanczos")
    with pytest.raises(SampleError):
        crop_dense(np.zeros((10, 10), np.uint8), np.array((5, 0, 10, 10, 0)), 4, mode="nearest")


# --------------------------------------------------------------------------------------- det, poses and SAM


def test_det_drops_boxes_outside_and_below_min_visibility():
    det = {"instances": [
        {"boxes": [0.0, 0.0, 0.1, 0.1], "class_name": "cat", "score": 0.9},    # wholly left of the crop
        {"boxes": [0.2, 0.4, 0.3, 0.6], "class_name": "dog", "score": 0.8},    # half inside (x 0.2..0.3)
        {"boxes": [0.5, 0.5, 0.6, 0.6], "class_name": "cup", "score": 0.7},    # fully inside
    ]}
    crop = np.array((0, 100, 300, 300, 0))  # columns 100..399 of a 300 x 400 image: x >= 0.25
    kept = crop_det(det, crop, H, W)
    assert [i["class_name"] for i in kept] == ["dog", "cup"]
    np.testing.assert_allclose(kept[0]["boxes"], [0, 0.4, (120 - 100) / 300, 0.6])
    np.testing.assert_allclose(kept[1]["boxes"], [100 / 300, 0.5, 140 / 300, 0.6])
    assert [i["class_name"] for i in crop_det(det, crop, H, W, min_visibility=0.6)] == ["cup"]
    assert [i["class_name"] for i in crop_det(det, crop, H, W, min_visibility=0.4)] == ["dog", "cup"]
    flipped = crop_det(det, np.array((0, 100, 300, 300, 1)), H, W)
    np.testing.assert_allclose(flipped[1]["boxes"], [1 - 140 / 300, 0.5, 1 - 100 / 300, 0.6])
    inverted = {"instances": [{"boxes": [0.6, 0.6, 0.5, 0.5], "class_name": "cup", "score": 0.7}]}
    assert crop_det(inverted, crop, H, W) == []
    with pytest.raises(SampleError):
        crop_det({"instances": [{"boxes": [0, 0, 1], "class_name": "x", "score": 1}]}, crop, H, W)


def test_poses_swap_left_and_right_on_flip():
    names = list(COCO_KEYPOINTS)
    kps = [[0.5, 0.5, 0.5] for _ in names]
    kps[names.index("left_eye")] = [0.30, 0.2, 0.91]
    kps[names.index("right_eye")] = [0.35, 0.2, 0.92]
    kps[names.index("nose")] = [0.32, 0.25, 0.93]
    kps[names.index("left_ankle")] = [0.30, 0.99, 0.94]  # below the crop used further down
    label = {"keypoint_names": names, "instances": [
        {"bbox": [0.25, 0.1, 0.4, 1.0], "score": 0.8, "keypoints": kps},
        {"bbox": [0.9, 0.1, 1.0, 0.5], "score": 0.7, "keypoints": kps},  # right of the crop below
    ]}
    out = crop_keypoints(label, np.array((0, 0, H, W, 1)), H, W)  # the whole image, mirrored
    assert out["keypoint_names"] == names and len(out["instances"]) == 2
    got = out["instances"][0]["keypoints"]
    np.testing.assert_allclose(got[names.index("left_eye")], [1 - 0.35, 0.2, 0.92])
    np.testing.assert_allclose(got[names.index("right_eye")], [1 - 0.30, 0.2, 0.91])
    np.testing.assert_allclose(got[names.index("nose")], [1 - 0.32, 0.25, 0.93])
    np.testing.assert_allclose(out["instances"][0]["bbox"], [0.6, 0.1, 0.75, 1.0])

    # Top-left 240 x 240: the second person is outside (x >= 0.9 * 400 = 360 > 240) and dropped.
    cut = crop_keypoints(label, np.array((0, 0, 240, 240, 0)), H, W)
    (person,) = cut["instances"]
    ankle = person["keypoints"][names.index("left_ankle")]
    assert ankle[2] == 0.0 and 0 <= ankle[0] <= 1 and 0 <= ankle[1] <= 1
    np.testing.assert_allclose(person["keypoints"][names.index("left_eye")], [0.3 * 400 / 240, 0.2 * 300 / 240, 0.91])


def _rle(mask):
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in enc["size"]], "counts": enc["counts"].decode("ascii")}


def test_sam_order_limits_and_filters():
    def inst(y0, y1, x0, x1, score):
        m = np.zeros((H, W), np.uint8)
        m[y0:y1, x0:x1] = 1
        return {"segmentation": _rle(m), "bbox": [x0, y0, x1 - 1, y1 - 1], "score": score}

    label = {"image_size": [H, W], "instances": [
        inst(10, 40, 10, 40, 0.9),      # 30 x 30
        inst(100, 200, 100, 250, 0.5),  # 100 x 150, the largest
        inst(250, 252, 300, 302, 0.8),  # 2 x 2: far below min_area
        inst(0, 300, 0, 20, 0.7),       # columns 0..19: outside a crop starting at column 50
    ]}
    crop = np.array((0, 50, 300, 300, 0))
    # Instance 0 (columns 10..39) and instance 3 lie left of column 50; instance 2 is too small.
    got = crop_sam(label, crop, H, W)
    assert [g.index for g in got] == [1]
    assert got[0].score == 0.5
    label["instances"][0] = inst(10, 40, 60, 90, 0.9)  # now inside the crop, smaller than instance 1
    got = crop_sam(label, crop, H, W)
    assert [g.index for g in got] == [1, 0]
    assert [g.index for g in crop_sam(label, crop, H, W, max_instances=1)] == [1]
    assert len(crop_sam(label, crop, H, W, min_area=0.0)) == 3  # the 2 x 2 instance is back
    # inclusive-exclusive bbox of instance 1: columns 100..249, rows 100..199 scaled by 224 / 300.
    np.testing.assert_allclose(got[0].bbox, [50 * SIZE / 300, 100 * SIZE / 300, 200 * SIZE / 300,
                                             200 * SIZE / 300], atol=1.0)
    for counts in ["", "zzzz!!"]:
        bad = {"instances": [{"segmentation": {"size": [H, W], "counts": counts}}]}
        with pytest.raises(SampleError, match="RLE"):
            crop_sam(bad, crop, H, W)
    with pytest.raises(SampleError, match="size"):
        crop_sam({"instances": [inst(0, 5, 0, 5, 1.0)]}, np.array((0, 0, 10, 10, 0)), 10, 10)


def test_uncrop_mask_restores_the_instance():
    m = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[:H, :W]
    m[(yy - 150) ** 2 / 60 ** 2 + (xx - 200) ** 2 / 90 ** 2 <= 1] = 1  # an ellipse
    (si,) = crop_sam({"instances": [{"segmentation": _rle(m), "score": 1.0}], "image_size": [H, W]},
                     np.array((0, 50, 300, 300, 1)), H, W, mask_size=32)
    assert si.mask.shape == (32, 32) and set(np.unique(si.mask).tolist()) == {0, 1}
    back = uncrop_mask(si.mask, si.bbox, SIZE)
    assert back.shape == (SIZE, SIZE) and back.dtype == np.uint8
    inter, union = np.logical_and(back, si.full).sum(), np.logical_or(back, si.full).sum()
    assert inter / union > 0.9
    soft = uncrop_mask(si.mask.astype(np.float32), si.bbox, SIZE)
    x0, y0, x1, y1 = si.bbox
    outside = np.ones((SIZE, SIZE), bool)
    outside[y0:y1, x0:x1] = False
    assert soft.dtype == np.float32 and outside.any() and (soft[outside] == 0).all()
    assert math.isclose(float(soft[y0:y1, x0:x1].mean()), float(back[y0:y1, x0:x1].mean()), abs_tol=0.05)
    assert uncrop_mask(si.mask, (0, 0, 0, 0), SIZE).sum() == 0


def test_sam_resize_window_matches_a_whole_region_resize():
    """crop_sam resizes each mask only around its pixels; that must equal resizing the whole crop region
    (PIL antialiased bilinear coverage >= 1/2, or > 0 when that leaves nothing), except for float ties at
    exactly 1/2."""
    from PIL import Image

    from omniforge.tokenize.crops import _binary_resize_sparse

    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(5, 400, 2))
        size = int(rng.choice([7, 64, 224]))
        m = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y:y + int(rng.integers(1, h)), x:x + int(rng.integers(1, w))] = 1
        cover = np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
        got = _binary_resize_sparse(m, size)
        expected = cover >= 0.5
        if not expected.any():  # a thin mask keeps every pixel it touches rather than vanishing
            expected = cover > 0.0
        differ = got != expected
        assert np.abs(cover[differ] - 0.5).max(initial=0.0) < 1e-4
        assert got.any()

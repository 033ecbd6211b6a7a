"""Schemas of the raw labels: what a decoded label of each format must be.

A modality names its schema in the registry (`ModalityInfo.schema`, "module:function"): a function that
takes one decoded label (`omniforge.codecs.decode`) and raises SampleError("bad_label", <what is wrong>)
unless the label is well formed. `omniforge verify` runs it on every label; the readers (tokenize, the
trainer's raw sequence folders, `export`) run the serializers, which check the same rules as they read.
Array labels (images, maps, feature vectors) are checked against the registry's own fields by
`check_array`, so a plugin modality gets that check without writing a schema.

The JSON formats are the ones ml-4m's transforms read (fourm/data/modality_transforms.py), except
sam_instance, whose ml-4m form needs a pickle (`omniforge export --dialect ml4m` writes that one).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from omniforge.errors import SampleError
from omniforge.modalities import ModalityInfo


def _bad(message: str) -> SampleError:
    return SampleError("bad_label", message)


def _numbers(value: Any, n: int) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def _instances(label: Any, what: str) -> list[Any]:
    if not isinstance(label, dict) or not isinstance(label.get("instances"), list):
        raise _bad(f"a {what} label is a JSON object with an \"instances\" list")
    return label["instances"]


def check_caption(label: Any) -> None:
    if not isinstance(label, str) or not label.strip():
        raise _bad("a caption is non-empty UTF-8 text")


def check_det(label: Any) -> None:
    """{"instances": [{"boxes": [xmin, ymin, xmax, ymax] in 0..1, "class_name": str, "score": 0..1}]}."""
    for i, inst in enumerate(_instances(label, "det")):
        box = _numbers(inst.get("boxes") if isinstance(inst, dict) else None, 4)
        if box is None or not all(0.0 <= c <= 1.0 for c in box) or box[0] > box[2] or box[1] > box[3]:
            raise _bad(f"det instance {i}: \"boxes\" must be [xmin, ymin, xmax, ymax] in 0..1 with min <= max")
        if not isinstance(inst.get("class_name"), str) or not inst["class_name"].strip():
            raise _bad(f"det instance {i}: \"class_name\" must be a non-empty string")
        score = _numbers([inst.get("score")], 1)
        if score is None or not 0.0 <= score[0] <= 1.0:
            raise _bad(f"det instance {i}: \"score\" must be a number in 0..1")


def check_metadata(label: Any) -> None:
    """{4M-21 field name: finite number}, ml-4m's names and units (see `text.metadata_units`)."""
    from omniforge.tokenize.text import check_metadata as check

    check(label)


def check_color_palette(label: Any) -> None:
    """[{"1": [[R, G, B]], ..., "7": [...]}]: for every k, 1..k colours in 0..255 (see `text.palettes_of`)."""
    from omniforge.tokenize.text import palette_units, palettes_of

    for k, colors in palettes_of(label).items():
        palette_units(colors)
        if len(colors) > k:
            raise _bad(f"color_palette: the palette for k={k} has {len(colors)} colours")


def _score(label: Any, what: str, low: float | None = None, high: float | None = None) -> None:
    value = _numbers([label], 1)
    if value is None or (low is not None and value[0] < low) or (high is not None and value[0] > high):
        bounds = f" in {low:g}..{high:g}" if low is not None and high is not None else ""
        raise _bad(f"a {what} label is a JSON number{bounds}, got {label!r}")


def check_aesthetic_score(label: Any) -> None:
    """A finite JSON number (the LAION aesthetic predictor's score, about 1..10)."""
    _score(label, "aesthetic_score")


def check_watermark_score(label: Any) -> None:
    """A JSON number in 0..1 (the LAION watermark detector's probability)."""
    _score(label, "watermark_score", 0.0, 1.0)


def check_sam_instance(label: Any) -> None:
    """{"instances": [{"segmentation": COCO RLE {"size": [H, W], "counts": str}, "bbox": XYXY pixels, "score",
    ...}], "image_size": [H, W]}."""
    instances = _instances(label, "sam_instance")
    size = _numbers(label.get("image_size"), 2)
    if size is None or not all(s >= 1 and s == int(s) for s in size):
        raise _bad("sam_instance: \"image_size\" must be [H, W] in pixels")
    for i, inst in enumerate(instances):
        seg = inst.get("segmentation") if isinstance(inst, dict) else None
        if not isinstance(seg, dict) or _numbers(seg.get("size"), 2) != size or not isinstance(seg.get("counts"), str):
            raise _bad(f"sam_instance instance {i}: \"segmentation\" must be a COCO compressed RLE of the image size")
        if _numbers(inst.get("bbox"), 4) is None or _numbers([inst.get("score")], 1) is None:
            raise _bad(f"sam_instance instance {i}: needs a \"bbox\" [xmin, ymin, xmax, ymax] and a \"score\"")


def check_human_keypoints(label: Any) -> None:
    """{"instances": [{"bbox": 4 numbers, "keypoints": [[x, y, score], ...], ...}], ...}."""
    for i, inst in enumerate(_instances(label, "human_keypoints")):
        if not isinstance(inst, dict) or _numbers(inst.get("bbox"), 4) is None:
            raise _bad(f"human_keypoints person {i}: needs a \"bbox\" of 4 numbers")
        kps = inst.get("keypoints", [])
        if not isinstance(kps, list) or any(_numbers(kp, 3) is None for kp in kps):
            raise _bad(f"human_keypoints person {i}: \"keypoints\" must be [x, y, score] triples")


def _shaped(value: Any, shape: tuple[int, ...]) -> bool:
    """Whether `value` is a nested list of finite numbers of exactly `shape`."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return arr.shape == shape and bool(np.isfinite(arr).all())


def check_human_poses(label: Any) -> None:
    """HMR2.0's people as ml-4m's HumanPoseTransform reads them: {} when there is nobody, else
    {"bbox_xyxy": N x [x0, y0, x1, y1] (pixels), "pred_smpl_params": {"global_orient": N x (1, 3, 3),
    "body_pose": N x (23, 3, 3), "betas": N x (10,)}, "pred_cam": N x (3,), ...} with the same N > 0 everywhere;
    the teacher's "box_center" (N x 2), "box_size" (N) and "score" (N) are checked when present, other keys allowed."""
    if not isinstance(label, dict):
        raise _bad("a human_poses label is a JSON object ({} when there is nobody)")
    if not label:
        return
    boxes, smpl, cam = label.get("bbox_xyxy"), label.get("pred_smpl_params"), label.get("pred_cam")
    if not isinstance(boxes, list) or not boxes or not isinstance(smpl, dict):
        raise _bad('human_poses: needs "bbox_xyxy" (one box per person) and "pred_smpl_params" ({} for nobody)')
    n = len(boxes)
    parts = [("bbox_xyxy", boxes, (n, 4)), ("pred_cam", cam, (n, 3)),
             ("pred_smpl_params.global_orient", smpl.get("global_orient"), (n, 1, 3, 3)),
             ("pred_smpl_params.body_pose", smpl.get("body_pose"), (n, 23, 3, 3)),
             ("pred_smpl_params.betas", smpl.get("betas"), (n, 10))]
    optional = (("box_center", (n, 2)), ("box_size", (n,)), ("score", (n,)))
    parts += [(name, label[name], shape) for name, shape in optional if name in label]
    for name, value, shape in parts:
        if not _shaped(value, shape):
            raise _bad(f"human_poses: {name} must be finite numbers of shape {shape} (one entry per person)")


_DTYPES = {"uint8": (np.uint8,), "uint16": (np.uint16,), "float": (np.float16, np.float32)}


def check_array(info: ModalityInfo, value: Any) -> None:
    """An image, map or vector label against the registry: its shape, channels and dtype."""
    if info.ext not in ("jpg", "png", "npy") or info.crop not in ("dense", "features", "global"):
        return
    arr = np.asarray(value)
    if info.shape is not None:
        if arr.shape != info.shape:
            raise _bad(f"{info.name}: shape {arr.shape}, expected {info.shape}")
    elif info.crop == "dense":
        channels = 1 if arr.ndim == 2 else (arr.shape[2] if arr.ndim == 3 else None)
        if channels != info.channels or min(arr.shape[:2], default=0) < 1:
            raise _bad(f"{info.name}: a map of shape {arr.shape}, expected (H, W) with {info.channels} channel(s)")
    if info.dtype in _DTYPES and arr.dtype.type not in _DTYPES[info.dtype] and info.ext != "png":
        raise _bad(f"{info.name}: dtype {arr.dtype}, expected {info.dtype}")
    if info.dtype == "float" and not np.isfinite(arr).all():
        raise _bad(f"{info.name}: holds NaN or infinite values")


def check_embedding(info: ModalityInfo, label: Any) -> None:
    """An embedding label (npz) against ml-4m's schema at the registry's (L, D) (`codecs.embedding_problem`)."""
    from omniforge.codecs import embedding_problem

    problem = embedding_problem(label, info.shape)
    if problem:
        raise _bad(f"{info.name}: {problem}")


def check_label(info: ModalityInfo, label: Any) -> None:
    """Raise SampleError("bad_label", ...) unless `label` (decoded) is a well-formed label of `info`."""
    if info.embedded:
        check_embedding(info, label)
    check_array(info, label)
    if info.schema is not None:
        info.resolve_schema()(label)


__all__ = ["check_aesthetic_score", "check_array", "check_caption", "check_color_palette", "check_det",
           "check_embedding", "check_human_keypoints", "check_human_poses", "check_label", "check_metadata",
           "check_sam_instance", "check_watermark_score"]

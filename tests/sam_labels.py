"""sam_instance labels in omniforge's format built from masks (imported by tests, not collected): a random-init
SAM finds one tiny mask or none, so tests that need overlapping instances make them."""

from __future__ import annotations

import numpy as np


def sam_label(masks: list[np.ndarray]) -> dict:
    """{"instances": [...], "image_size": [H, W]} with one COCO-RLE instance per (H, W) boolean mask."""
    from pycocotools import mask as mask_utils

    instances = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        ys, xs = np.nonzero(m)
        instances.append({"segmentation": {"size": list(m.shape), "counts": rle["counts"].decode("ascii")},
                          "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], "score": 0.9,
                          "stability_score": 0.9, "area": int(m.sum())})
    return {"instances": instances, "image_size": list(masks[0].shape)}


def rectangles(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    """One mask per (y0, y1, x0, x1) box."""
    out = []
    for y0, y1, x0, x1 in boxes:
        m = np.zeros((height, width), bool)
        m[y0:y1, x0:x1] = True
        out.append(m)
    return out

"""One small labeled corpus shared by the session (imported by tests/conftest.py and tests, not collected).

The first 6 photos of the demo corpus and its truncated JPEG, labeled once by a real label job with tiny
teachers: every test that tokenizes such labels reads them from here instead of labeling its own corpus.
The `tiny_labels` fixture (tests/conftest.py) hands out the root read-only: a test that writes copies it
(`copy_labels`) or tokenizes with its own `output=`; the fixture checks at the end of the session that no
file under the root changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LABELED = ("rgb", "caption", "depth", "semseg_coco", "det", "sam_instance", "clip", "dinov2_global",
           "color_palette", "metadata")
# A random-init detector and SAM find nothing at their default thresholds: these let them write instances.
OPTIONS = {"det": {"threshold": 0.0, "max_detections": 8},
           "sam_instance": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}}
N_PHOTOS = 6  # and the truncated JPEG: 7 samples, 6 labeled
SHARD_SIZE = 3  # 7 samples in shards 0, 1, 2


def label_tiny_corpus(folder: Path, ray_address: str) -> str:
    """Build the corpus under `folder` and label it; the label root."""
    from omniforge.jobs.demo_corpus import build_demo_corpus
    from omniforge.pipeline import LabelConfig, label, parse_weights

    corpus = build_demo_corpus(folder / "corpus", n_images=N_PHOTOS)
    root = str(folder / "labels")
    label(LabelConfig(input=str(corpus), output=root, modalities=LABELED, weights=parse_weights("tiny"),
                      options=OPTIONS, shard_size=SHARD_SIZE, batch_size=4, progress=False), ray_address=ray_address)
    return root


def copy_labels(root: str, dest: Path) -> str:
    """A private copy of the label root `root` at `dest`, for a test that writes beside the labels."""
    shutil.copytree(root, dest)
    return str(dest)


def digest(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out

"""Synthetic human_poses labels in the HMR2.0 teacher's format (ml-4m's form), for the tests.

A pose set with structure, as real people have: every body pose is one of a few prototype poses (joint rotations
up to 60 degrees) turned by a small random rotation at every joint, so a tokenizer of 8 tokens can learn it; the
global orientation is any rotation.
"""

from __future__ import annotations

import numpy as np

from omniforge import shards
from omniforge._smpl import random_rotations


def prototypes(rng: np.random.Generator, n: int = 8) -> np.ndarray:
    """(n, 23, 3, 3) prototype body poses."""
    return random_rotations(rng, (n, 23), 60.0)


def smpl_label(rng: np.random.Generator, boxes: list[list[float]], protos: np.ndarray | None = None) -> dict:
    """A label of len(boxes) people (pixel boxes [x0, y0, x1, y1]); {} for no box. Values float32, as the teacher's."""
    n = len(boxes)
    if n == 0:
        return {}
    protos = prototypes(rng) if protos is None else protos
    poses = random_rotations(rng, (n, 23), 8.0) @ protos[rng.integers(len(protos), size=n)]
    f32 = lambda a: np.asarray(a, dtype=np.float32).tolist()  # noqa: E731
    cams = np.stack([rng.uniform(0.5, 1.5, n), rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)], 1)
    return {"bbox_xyxy": f32(boxes),
            "pred_smpl_params": {"global_orient": f32(random_rotations(rng, (n, 1), 180.0)), "body_pose": f32(poses),
                                 "betas": f32(rng.normal(0.0, 1.0, (n, 10)))},
            "pred_cam": f32(cams), "score": f32(rng.uniform(0.5, 1.0, n))}


def random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> list[list[float]]:
    """n pixel boxes inside a height x width image, each at least a tenth of it on a side."""
    out = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, 0.8 * width), rng.uniform(0, 0.8 * height)
        out.append([x0, y0, rng.uniform(x0 + 0.1 * width, width), rng.uniform(y0 + 0.1 * height, height)])
    return out


def write_label_shard(root: str, shard: int, labels: dict[str, dict], failed: dict[str, str] | None = None,
                      *, fingerprint: str = "test") -> None:
    """human_poses/shard-NNNNNN.tar and its _status as the label job commits them (failed keys: a status row with
    the reason, no member)."""
    failed = failed or {}
    shards.write_tar(shards.tar_uri(root, "human_poses", shard),
                     [(f"{k}.json", _json(labels[k])) for k in sorted(labels)])
    rows = [{"key": k, "ok": k in labels, "error_type": None if k in labels else "teacher_error",
             "error_message": None if k in labels else failed[k], "fingerprint": fingerprint, "seconds": 0.0}
            for k in sorted(set(labels) | set(failed))]
    shards.write_status(shards.status_uri(root, "human_poses", shard), rows)


def _json(value: dict) -> bytes:
    from omniforge import codecs

    return codecs.encode("json", value)

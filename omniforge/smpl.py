"""SMPL facts the human_poses modality needs without the SMPL body model: joint names, the left-right mirror of a
pose, and rotation-matrix helpers.

HMR2.0 (and ml-4m's human_poses) describe a person by SMPL parameters: `global_orient`, the (3, 3) rotation of the
pelvis from the body frame to the camera frame; `body_pose`, the (23, 3, 3) rotations of the other 23 joints,
each relative to its parent, in `BODY_JOINTS` order (SMPL's joints 1..23); `betas`, 10 shape coefficients; and
`pred_cam`, the weak-perspective camera (s, tx, ty) of the person's square crop. SMPL's body frame has x pointing
to the body's left, y up and z forward; HMR2.0's camera frame has x to the image's right.

Mirroring an image left-right (x -> -x in the camera frame) mirrors the person: the mirrored body is the original
reflected across its sagittal plane, with left and right joints exchanged. With M = diag(-1, 1, 1) a rotation R
becomes M R M (an axis-angle (a, b, c) becomes (a, -b, -c), as SPIN's and HMR's pose flips), for the global
orientation as for every joint; the shape does not change; the camera's tx changes sign (`mirror_person`).
"""

from __future__ import annotations

import numpy as np

SMPL_JOINTS: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle", "right_ankle",
    "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand",
)
BODY_JOINTS: tuple[str, ...] = SMPL_JOINTS[1:]  # body_pose's 23 joints, in order
NUM_BETAS = 10
POSE_CHANNELS = len(BODY_JOINTS) * 9  # 207: body_pose flattened, the pose tokenizer's input (ml-4m's num_channels)
MIRROR = np.diag([-1.0, 1.0, 1.0])  # the left-right reflection, in the body frame as in the camera frame


def _twin(name: str) -> str:
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a):]
    return name


# BODY_MIRROR[i]: the body_pose joint whose rotation joint i takes in the mirrored body (left <-> right)
BODY_MIRROR: tuple[int, ...] = tuple(BODY_JOINTS.index(_twin(n)) for n in BODY_JOINTS)


def mirror_rotations(r: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations -> M R M, their mirror images (M = diag(-1, 1, 1))."""
    r = np.asarray(r, dtype=np.float64)
    return MIRROR @ r @ MIRROR


def mirror_person(global_orient: np.ndarray, body_pose: np.ndarray, betas: np.ndarray, cam: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One person's SMPL parameters ((3, 3), (23, 3, 3), (10,), (3,) [s, tx, ty]) in the left-right mirrored image:
    every rotation mirrored, left and right joints exchanged, betas kept, tx negated."""
    pose = mirror_rotations(body_pose)[list(BODY_MIRROR)]
    cam = np.asarray(cam, dtype=np.float64) * np.array([1.0, -1.0, 1.0])
    return mirror_rotations(global_orient), pose, np.asarray(betas, dtype=np.float64), cam


def nearest_rotation(a: np.ndarray) -> np.ndarray:
    """(..., 3, 3) matrices -> the nearest rotations (Frobenius norm; SVD, with the sign that keeps det = +1)."""
    a = np.asarray(a, dtype=np.float64)
    u, _, vt = np.linalg.svd(a)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    fix = np.ones(a.shape[:-1])
    fix[..., -1] = d
    return (u * fix[..., None, :]) @ vt


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The geodesic angle in degrees between rotations a and b (..., 3, 3): the angle of a^T b."""
    rel = np.swapaxes(np.asarray(a, dtype=np.float64), -1, -2) @ np.asarray(b, dtype=np.float64)
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(rng: np.random.Generator, shape: tuple[int, ...], max_angle_deg: float = 180.0) -> np.ndarray:
    """Rotations (*shape, 3, 3) about uniform random axes, by angles uniform in [0, max_angle_deg]: a synthetic
    pose set (180 covers every rotation, though not uniformly over SO(3))."""
    axis = rng.standard_normal((*shape, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    angle = np.radians(rng.uniform(0.0, max_angle_deg, shape))[..., None, None]
    k = np.zeros((*shape, 3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    k = k - np.swapaxes(k, -1, -2)  # the cross-product matrix of the axis
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)  # Rodrigues


__all__ = ["BODY_JOINTS", "BODY_MIRROR", "MIRROR", "NUM_BETAS", "POSE_CHANNELS", "SMPL_JOINTS", "mirror_person",
           "mirror_rotations", "nearest_rotation", "random_rotations", "rotation_angle_deg"]

"""HMR2.0's people placed in their image: the person box, the crop camera, and the SMPL body model.

A `human_poses` label holds, per person, the detector box (`bbox_xyxy`, pixels of the stored image), SMPL's
parameters (`pred_smpl_params`) and `pred_cam = [s, tx, ty]`, HMR2.0's weak-perspective camera of the person
crop. Drawing a person's 3D joints needs three things, each a function here:

- `person_box`: the square crop HMR2.0 saw, as 4D-Humans makes it (hmr2/datasets/vitdet_dataset.py): centred on
  the box, the box (times `rescale_factor`) grown to the model's 192:256 (w:h) aspect, its larger side the size;
- `cam_crop_to_full`: that crop camera as a translation of the body in the full image's camera, whose focal
  length is HMR2.0's 5000 px for a 256 px crop scaled to the image's larger side (4D-Humans' demo.py and
  hmr2/utils/renderer.py), principal point the image centre;
- `SmplBody`: the SMPL body model (licensed separately, read through `smplx`): the parameters to the 24
  kinematic joints, as HMR2.0 runs it (`smplx.SMPLLayer`, rotation matrices, `pose2rot=False`).

`project` is HMR2.0's pinhole projection (hmr2/utils/geometry.py perspective_projection) and `place_people`
puts it together. Coordinates are pixels of the stored image, x right and y down; the body frame is HMR2.0's
camera frame (x right, y down, z forward), in metres.

The pose itself, without the body model (the pose tokenizer and the crops of `omniforge.tokenize`): `body_pose`
holds the (3, 3) rotations of the 23 joints `BODY_JOINTS` (SMPL's joints 1..23, each relative to its parent),
`global_orient` the pelvis' rotation into the camera frame. Mirroring the image left-right (x -> -x in the camera
frame) mirrors the person: the body reflected across its sagittal plane (SMPL's x axis is the body's left-right
axis, in every joint's rest frame), left and right joints exchanged. With M = diag(-1, 1, 1) a rotation R becomes
M R M (an axis-angle (a, b, c) becomes (a, -b, -c), as SPIN's and HMR's pose flips), for the global orientation as
for every joint; the shape does not change; the crop camera's tx changes sign (`mirror_person`).
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniforge.errors import ConfigError

FOCAL_LENGTH = 5000.0  # HMR2.0's EXTRA.FOCAL_LENGTH, in pixels of its crop
CROP_SIZE = 256  # HMR2.0's MODEL.IMAGE_SIZE: the crop side the focal length refers to
BOX_ASPECT = (192, 256)  # HMR2.0's MODEL.BBOX_SHAPE (w, h) for its ViT backbone
RESCALE_FACTOR = 1.0  # 4D-Humans' ViTDetDataset crops the detector box as is (HaMeR's hands use 2.5)
NUM_JOINTS = 24  # SMPL's kinematic joints: the pelvis and its 23 posed descendants
SMPL_MODEL_OPTION = "smpl_model"  # the teacher option (--option <teacher>.smpl_model=PATH) `show` reads
MODEL_FILES = ("SMPL_NEUTRAL.pkl", "SMPL_NEUTRAL.npz")  # what a model folder holds (HMR2.0's data/smpl layout)
SMPL_URL = "https://smpl.is.tue.mpg.de"

_MODEL_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


def person_box(bbox_xyxy: Sequence[float], rescale_factor: float = RESCALE_FACTOR,
               aspect: tuple[float, float] = BOX_ASPECT) -> tuple[np.ndarray, float]:
    """The square crop HMR2.0 cuts around a detector box: its centre (x, y) and its side, in the box's pixels.

    The box (x0, y0, x1, y1), scaled by `rescale_factor` about its centre, is grown (never shrunk) to the
    aspect `aspect` = (w, h): a box wider than w:h gets the height width * h / w, a taller one the width
    height * w / h; the side is the larger of the two (a box of zero area has side 0). float32 arithmetic as
    4D-Humans' (which keeps box sides in units of 200 px, `scale = wh / 200`, and multiplies back), so that the
    teacher's crops (`omniforge.labelers._hmr2.person_crop`) match the official ones bit for bit."""
    box = np.asarray(bbox_xyxy, np.float32)
    w, h = (box[2:] - box[:2]) * np.float32(rescale_factor) / np.float32(200.0) * np.float32(200.0)
    side = max(h, w * np.float32(aspect[1] / aspect[0]))
    return (box[:2].astype(np.float64) + box[2:]) / 2.0, float(side)


def full_image_focal(image_size: tuple[int, int]) -> float:
    """The focal length (pixels) HMR2.0's crop camera implies for the whole (width, height) image."""
    return FOCAL_LENGTH / CROP_SIZE * max(image_size)


def cam_crop_to_full(pred_cam: np.ndarray, center: np.ndarray, size: np.ndarray, image_size: tuple[int, int],
                     focal: float) -> np.ndarray:
    """HMR2.0's crop cameras (N, 3) [s, tx, ty] -> body translations (N, 3) in the full image's camera.

    `center` (N, 2) and `size` (N,) are the crops (`person_box`), `image_size` (width, height), `focal` the
    full image's focal length (`full_image_focal`). With bs = size * s, the body sits at depth 2 * focal / bs
    and is shifted by 2 * (crop centre - image centre) / bs on top of the crop's own (tx, ty). A scale s <= 0
    (a body at or behind the camera) gives a depth <= 0, which `project` turns into NaN."""
    cam = np.asarray(pred_cam, dtype=np.float64).reshape(-1, 3)
    center = np.asarray(center, dtype=np.float64).reshape(-1, 2)
    half = np.asarray(image_size, dtype=np.float64) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        bs = np.asarray(size, dtype=np.float64).reshape(-1) * cam[:, 0] + 1e-9
        tz = 2.0 * focal / bs
        txy = 2.0 * (center - half) / bs[:, None] + cam[:, 1:]
    return np.concatenate([txy, tz[:, None]], axis=1)


def project(points: np.ndarray, translation: np.ndarray, focal: float, image_size: tuple[int, int]) -> np.ndarray:
    """Body points (N, J, 3), moved by `translation` (N, 3), through a pinhole camera at the origin looking down
    +z with focal `focal` and the principal point at the image centre -> pixels (N, J, 2). A point not in front
    of the camera (z <= 0 after the move) is NaN."""
    p = np.asarray(points, dtype=np.float64) + np.asarray(translation, dtype=np.float64)[:, None, :]
    z = p[..., 2:3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = focal * p[..., :2] / z + np.asarray(image_size, dtype=np.float64) / 2.0
    return np.where(z > 0, uv, np.nan)


@dataclass(frozen=True, eq=False)
class SmplBody:
    """A loaded SMPL body model (`load_smpl`): `layer` is the `smplx.SMPLLayer`, `parents` the kinematic tree
    (parents[j] is joint j's parent, -1 for the pelvis), `path` the file it was read from."""

    path: str
    layer: Any
    parents: tuple[int, ...]

    def joints(self, smpl_params: Mapping[str, Any]) -> np.ndarray:
        """The 24 posed joints (N, 24, 3) of N people, in metres in HMR2.0's camera frame before the camera
        translation, from ml-4m's `pred_smpl_params`: global_orient N x (1, 3, 3) and body_pose N x (23, 3, 3)
        rotation matrices, betas N x (10,), run as HMR2.0 runs SMPL (`pose2rot=False`)."""
        import torch

        def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            return torch.from_numpy(np.asarray(smpl_params[name], dtype=np.float32).reshape(shape))

        betas = tensor("betas", (-1, 10))[:, : self.layer.num_betas]
        tensors = {"global_orient": tensor("global_orient", (-1, 1, 3, 3)),
                   "body_pose": tensor("body_pose", (-1, NUM_JOINTS - 1, 3, 3)), "betas": betas}
        with torch.no_grad():
            out = self.layer(**tensors, pose2rot=False)
        return out.joints[:, :NUM_JOINTS].double().numpy()


def place_people(label: Mapping[str, Any], body: SmplBody, image_size: tuple[int, int],
                 rescale_factor: float = RESCALE_FACTOR) -> np.ndarray:
    """Every person's 24 SMPL joints in the image: pixels (N, 24, 2) of a `human_poses` label (N >= 1 people,
    the schema checked) in an image of (width, height); NaN where a joint is not in front of the camera.
    The crop each pred_cam refers to is the label's "box_center" and "box_size" (the teacher records them),
    else `person_box` of its bbox_xyxy with `rescale_factor` (decoded tokens carry boxes only)."""
    if "box_center" in label and "box_size" in label:
        center, size = np.asarray(label["box_center"], np.float64), np.asarray(label["box_size"], np.float64)
    else:
        boxes = [person_box(b, rescale_factor) for b in label["bbox_xyxy"]]
        center = np.stack([c for c, _ in boxes])
        size = np.array([s for _, s in boxes])
    focal = full_image_focal(image_size)
    translation = cam_crop_to_full(np.asarray(label["pred_cam"]), center, size, image_size, focal)
    return project(body.joints(label["pred_smpl_params"]), translation, focal, image_size)


def missing_model_note(option: str) -> str:
    """The one line `show` prints when it draws people without the SMPL body model."""
    return (f"human poses: drew each person's box only; the SMPL body model file is missing (licensed separately, "
            f"{SMPL_URL}): pass --option {option}=/path/to/SMPL_NEUTRAL.pkl to draw their 3D joints")


def load_smpl(path: str, *, option: str) -> SmplBody:
    """The neutral SMPL body model at `path` (a SMPL .pkl or .npz, or a folder holding SMPL_NEUTRAL.pkl or .npz),
    through `smplx`. A missing path, a file that is not an SMPL model, or a pickle holding anything but arrays
    (chumpy objects included) is a one-line ConfigError naming `option`, the flag that passed the path.

    The .pkl is read with a restricted unpickler that builds only numpy arrays, scalars and scipy sparse
    matrices (SMPL's J_regressor): a pickle naming any other class or function is refused, so a file from
    anywhere cannot run code; smplx then gets the arrays (`data_struct`) and never unpickles it itself."""
    file = _model_file(path, option)
    data = _read_model(file, option)
    problem = _model_problem(data)
    if problem:
        raise ConfigError(f"--option {option}={path}: {file} is not an SMPL body model ({problem}); pass the SMPL "
                          f"model file (SMPL_NEUTRAL.pkl, {SMPL_URL})")
    try:
        import smplx
        from smplx.utils import Struct
        from smplx.vertex_ids import vertex_ids
    except ImportError as e:
        raise ConfigError(f"drawing SMPL people needs smplx: pip install smplx ({e})") from None
    # smplx appends joints picked from SMPL's vertices (nose, eyes, toes, fingertips) after the 24 kinematic
    # ones; they are not drawn, so vertex 0 stands for each (SMPL's own indices need its 6890 vertices).
    unused = {name: 0 for name in vertex_ids["smplh"]}
    with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a warning for SMPL's 10 shape components
        layer = smplx.SMPLLayer(model_path=file, data_struct=Struct(**data), gender="neutral", num_betas=10,
                                vertex_ids=unused)
    parents = tuple(int(p) for p in layer.parents.tolist())
    return SmplBody(path=file, layer=layer.eval(), parents=parents)


def _model_file(path: str, option: str) -> str:
    if os.path.isdir(path):
        for name in MODEL_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"--option {option}={path}: the folder holds no {' or '.join(MODEL_FILES)}; pass the SMPL "
                          f"body model file ({SMPL_URL})")
    if not os.path.isfile(path):
        raise ConfigError(f"--option {option}={path}: no such file; pass the SMPL body model file "
                          f"(SMPL_NEUTRAL.pkl, licensed separately: {SMPL_URL})")
    return path


def _read_model(file: str, option: str) -> dict[str, Any]:
    """The model's arrays by name (plain float/int numpy arrays; J_regressor made dense)."""
    try:
        if file.endswith(".npz"):
            with np.load(file, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        else:
            with open(file, "rb") as f:
                raw = _ArrayUnpickler(io.BytesIO(f.read())).load()
    except _RefusedPickle as e:
        raise ConfigError(f"--option {option}={file}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line answer
        raise ConfigError(f"--option {option}={file}: not an SMPL body model (cannot read it: {type(e).__name__}: "
                          f"{e}); pass SMPL_NEUTRAL.pkl ({SMPL_URL})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"--option {option}={file}: not an SMPL body model (it holds a {type(raw).__name__}, not "
                          f"SMPL's arrays by name); pass SMPL_NEUTRAL.pkl ({SMPL_URL})")
    out = {}
    for key in _MODEL_KEYS:
        value = raw.get(key)
        if value is not None and hasattr(value, "toarray"):  # scipy sparse (SMPL's J_regressor)
            value = value.toarray()
        out[key] = None if value is None else np.asarray(value)
    return out


def _model_problem(data: Mapping[str, np.ndarray | None]) -> str | None:
    """What makes `data` not an SMPL model (keys, shapes, dtypes), or None."""
    missing = [k for k in _MODEL_KEYS if data.get(k) is None]
    if missing:
        return f"no {', '.join(missing)}"
    for key, value in data.items():
        if value.dtype.kind not in "biuf":
            return f"{key} holds {value.dtype} values, not numbers"
    v = data["v_template"].shape
    if len(v) != 2 or v[1] != 3 or v[0] < 1:
        return f"v_template has shape {v}, not (V, 3)"
    n = v[0]
    expected = {"shapedirs": (n, 3), "posedirs": (n, 3), "J_regressor": (NUM_JOINTS, n), "weights": (n, NUM_JOINTS),
                "kintree_table": (2, NUM_JOINTS)}
    for key, lead in expected.items():
        if data[key].shape[:2] != lead:
            return f"{key} has shape {data[key].shape}, expected it to start with {lead}"
    if data["shapedirs"].ndim != 3 or data["shapedirs"].shape[2] < 10:
        return f"shapedirs has shape {data['shapedirs'].shape}, expected (V, 3, >= 10) shape components"
    if data["posedirs"].shape != (n, 3, 9 * (NUM_JOINTS - 1)):
        return f"posedirs has shape {data['posedirs'].shape}, expected {(n, 3, 9 * (NUM_JOINTS - 1))}"
    parents = data["kintree_table"][0].astype(np.int64)[1:]
    if not all(0 <= p < j for j, p in enumerate(parents, start=1)):
        return "kintree_table is not a tree of 24 joints whose parents come first"
    f = data["f"]
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and not (0 <= f.min() and f.max() < n)):
        return f"f has shape {f.shape} or indices outside the {n} vertices, not (F, 3) triangles"
    return None


class _RefusedPickle(Exception):
    """A pickle names a class or function that an SMPL model file never needs."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what SMPL's .pkl files are made of: dicts, lists, strings and numbers (pickle's own
    opcodes), numpy arrays, dtypes and scalars, and scipy's sparse matrices (plus `object` and copyreg's
    reconstructor, which build instances of those classes only, and `_codecs.encode`, str to bytes); Python 2
    pickles are read as latin1, as SMPL's are. Every other global, chumpy's objects included, raises
    `_RefusedPickle`."""

    _NUMPY = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
              ("numpy._core.numeric", "_frombuffer")}
    _SPARSE = ("csc_matrix", "csr_matrix", "coo_matrix")

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            if module == "numpy":
                return getattr(np, name)
            leaf = module.rsplit(".", 1)[1]
            try:  # numpy 2 keeps these under numpy._core, numpy 1 under numpy.core
                return getattr(importlib.import_module(f"numpy._core.{leaf}"), name)
            except ImportError:
                return getattr(importlib.import_module(f"numpy.core.{leaf}"), name)
        if module.startswith("scipy.sparse") and name in self._SPARSE:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if (module, name) in (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")):
            import copyreg

            return copyreg._reconstructor  # builds objects only of the classes allowed above
        if (module, name) in (("__builtin__", "object"), ("builtins", "object")):
            return object
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2: str -> bytes
            return codecs.encode
        if module.split(".")[0] == "chumpy":
            raise _RefusedPickle("the file holds chumpy objects (SMPL's v1.0.0 pickles); convert it to plain arrays "
                                 "first (smplx's tools/clean_ch.py does), or pass a chumpy-free SMPL_NEUTRAL.pkl")
        raise _RefusedPickle(f"the pickle wants {module}.{name}, which an SMPL model file never holds; refused "
                             f"(only arrays are read from it)")


# ------------------------------------------------------------------------------------------- the pose

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

"""Crop settings, and one crop applied consistently to every modality of a sample.

A crop is one row of `crop_settings`: int32 (top, left, h, w, hflip) in the pixel frame of the sample's rgb
label (every dense label shares rgb's H x W). Applying it means: take rows top..top+h-1 and columns
left..left+w-1, resize that region to size x size, then mirror left-right when hflip is 1, the order 4M's
`ImageTransform` uses. Every modality maps through the same continuous coordinate change, with pixel edges
at integer coordinates and pixel i covering [i, i + 1):

    x_crop = (x_image - left) * size / w        y_crop = (y_image - top) * size / h
    on hflip: x_crop -> size - x_crop           (pixel column i -> size - 1 - i)

so a box, a keypoint, a mask pixel and a semseg pixel that coincide in the image coincide in the crop.
Normalized coordinates (det boxes, pose keypoints) use the same map divided by size. On hflip a person's SMPL
parameters are mirrored with the image (`crop_smpl`).

Crop 0 is the centre crop: the largest centred square, never flipped (the crop the label job fed to the
feature teachers). Crops 1.. are random resized crops (torchvision `RandomResizedCrop.get_params`'
algorithm) with random horizontal flips, drawn from a stream seeded by sha256 of (config seed, key): the
same key, image size and config give the same crops on any machine, and crop i does not depend on
n_crops, so raising n_crops keeps the crops already drawn.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from omniforge.errors import ConfigError, SampleError
from omniforge.coco import COCO_KEYPOINTS

# Bumped whenever crop_settings would draw different crops for the same config: part of the fingerprint.
_ALGORITHM_VERSION = 1
_RESIZED_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params

CROP_FIELDS: tuple[str, ...] = ("top", "left", "h", "w", "hflip")

DENSE_MODES: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "normal")
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST, "normal": Image.Resampling.BILINEAR}


@dataclass(frozen=True, kw_only=True)
class CropConfig:
    """How many crops per sample and how they are drawn.

    n_crops: crops per sample, >= 1 (crop 0 is always the centre crop).
    size: output side in pixels of every cropped dense label.
    scale: (min, max) area of a random crop as a fraction of the image area, 0 < min <= max <= 1.
    ratio: (min, max) aspect ratio w / h of a random crop, 0 < min <= max.
    hflip: probability that a random crop is mirrored left-right, in [0, 1].
    seed: mixed with each key into the per-sample crop stream.
    """

    n_crops: int = 1
    size: int = 224
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_crops", "size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"CropConfig.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.n_crops < 1:
            raise ConfigError(f"CropConfig.n_crops must be >= 1 (crop 0 is the centre crop), got {self.n_crops}")
        if self.size < 1:
            raise ConfigError(f"CropConfig.size must be >= 1 pixel, got {self.size}")
        object.__setattr__(self, "scale", _float_pair("scale", self.scale))
        object.__setattr__(self, "ratio", _float_pair("ratio", self.ratio))
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"CropConfig.scale must satisfy 0 < min <= max <= 1 (area fractions), got {self.scale}")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi or not math.isfinite(hi):
            raise ConfigError(f"CropConfig.ratio must satisfy 0 < min <= max (aspect w / h), got {self.ratio}")
        if isinstance(self.hflip, bool) or not isinstance(self.hflip, (int, float)) or not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"CropConfig.hflip must be a probability in [0, 1], got {self.hflip!r}")
        object.__setattr__(self, "hflip", float(self.hflip))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (pairs as lists); `CropConfig.from_dict(cfg.to_dict()) == cfg`."""
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropConfig:
        unknown = sorted(set(d) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"unknown CropConfig field(s) {unknown}: valid are {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the settings and the crop algorithm version."""
        payload = json.dumps({"algorithm": _ALGORITHM_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _float_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"CropConfig.{name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"CropConfig.{name} must be finite, got {value!r}")
    return lo, hi


# ---------------------------------------------------------------------------------------------- crop settings


class _Stream:
    """Uniform floats in [0, 1) from sha256 in counter mode: identical on every platform and numpy version."""

    def __init__(self, seed: bytes):
        self._seed = seed
        self._counter = 0

    def random(self) -> float:
        digest = hashlib.sha256(self._seed + struct.pack("<Q", self._counter)).digest()
        self._counter += 1
        return (struct.unpack("<Q", digest[:8])[0] >> 11) * 2.0**-53

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integer(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        return min(int(self.random() * n), n - 1)


def centre_crop(height: int, width: int) -> np.ndarray:
    """int32 (5,): the largest centred square of a height x width image, not flipped (crop 0)."""
    side = min(height, width)
    return np.array([(height - side) // 2, (width - side) // 2, side, side, 0], dtype=np.int32)


def _random_resized_crop(rng: _Stream, height: int, width: int, cfg: CropConfig) -> tuple[int, int, int, int]:
    area = height * width
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for _ in range(_RESIZED_CROP_ATTEMPTS):
        target_area = area * rng.uniform(*cfg.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integer(height - h + 1), rng.integer(width - w + 1), h, w
    # No attempt fitted: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        w, h = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        h, w = height, int(round(height * cfg.ratio[1]))
    else:
        h, w = height, width
    h, w = min(max(h, 1), height), min(max(w, 1), width)
    return (height - h) // 2, (width - w) // 2, h, w


def crop_settings(key: str, height: int, width: int, cfg: CropConfig) -> np.ndarray:
    """int32 (n_crops, 5) rows (top, left, h, w, hflip) for the sample `key` of size height x width.

    Row 0 is `centre_crop`; the others are random resized crops (area fraction in cfg.scale, aspect w / h in
    cfg.ratio, up to rounding) mirrored with probability cfg.hflip. Every crop lies inside the image.
    """
    if not isinstance(key, str) or not key:
        raise ConfigError(f"crop_settings needs a non-empty str sample key, got {key!r}")
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise SampleError("bad_input", f"cannot crop a {height}x{width} image (sample {key})")
    out = np.empty((cfg.n_crops, 5), dtype=np.int32)
    out[0] = centre_crop(height, width)
    base = hashlib.sha256(f"omniforge-crops\0{cfg.seed}\0{key}".encode("utf-8")).digest()
    for i in range(1, cfg.n_crops):
        rng = _Stream(base + struct.pack("<Q", i))
        top, left, h, w = _random_resized_crop(rng, height, width, cfg)
        flip = int(rng.random() < cfg.hflip)
        out[i] = (top, left, h, w, flip)
    return out


def min_storage_size(cfg: CropConfig, size: int) -> int:
    """The shorter side an image label must be stored at (`omniforge label --storage-size`) so that every crop
    `crop_settings` draws with `cfg` covers at least size x size stored pixels.

    Crop 0 is the shorter side square. A random crop keeps an area fraction >= scale[0] of an image of at least
    S x S pixels with an aspect w / h in ratio, so its shorter side is at least S * sqrt(scale[0] * min(ratio[0],
    1 / ratio[1])) (one pixel less after rounding)."""
    if cfg.n_crops == 1:
        return size
    shortest = math.sqrt(cfg.scale[0] * min(cfg.ratio[0], 1.0 / cfg.ratio[1], 1.0))
    return max(size, math.ceil((size + 1) / shortest))


def check_crop_sides(crops: np.ndarray, size: int, cfg: CropConfig, *, what: str) -> None:
    """SampleError("too_small", ...) unless every crop row covers at least size x size stored pixels: `what`
    (e.g. tok_depth@448) is never made by upsampling a smaller region. The message names the label option that
    stores labels large enough (`min_storage_size`)."""
    for i, row in enumerate(np.asarray(crops).reshape(-1, 5)):
        h, w = int(row[2]), int(row[3])
        if min(h, w) < size:
            raise SampleError("too_small", f"{what}: crop {i} covers {h} x {w} stored pixels, under {size} on a side "
                                           f"(never upsampled): relabel rgb and the dense labels into a new --output "
                                           f"with `omniforge label --storage-size {min_storage_size(cfg, size)}` "
                                           f"(images smaller than that stay at their own size)")


def _unpack(crop: np.ndarray, height: int, width: int) -> tuple[int, int, int, int, bool]:
    row = np.asarray(crop).reshape(-1)
    if row.shape[0] != 5:
        raise ValueError(f"a crop is (top, left, h, w, hflip), got {row.tolist()}")
    top, left, h, w, flip = (int(v) for v in row)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > height or left + w > width:
        raise SampleError("bad_input", f"crop (top={top}, left={left}, h={h}, w={w}) is not inside the "
                                       f"{height}x{width} image: crop settings and labels disagree")
    return top, left, h, w, bool(flip)


# ----------------------------------------------------------------------------------------------- dense labels


def _resize(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """PIL resize (antialiased when shrinking, as 4M's PIL pipeline) of (h, w) or (h, w, C) to size x size."""
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:  # not RGBA: PIL premultiplies alpha
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    if arr.ndim == 3:
        return np.stack([_resize(arr[:, :, c], size, resample) for c in range(arr.shape[2])], axis=2)
    # Any other single channel goes through PIL's 32-bit float mode: exact for uint8 / uint16 / float16 values.
    out = np.asarray(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).resize((size, size), resample))
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    return out.astype(arr.dtype)


def crop_dense(arr: np.ndarray, crop: np.ndarray, size: int, *, mode: str) -> np.ndarray:
    """Crop, resize to size x size and maybe mirror one dense label; same dtype and channels out.

    arr: (H, W) or (H, W, C) uint8 / uint16 / float16 / float32 (a PIL image is read as its array, a P-mode
    semseg map as its class ids). mode: "bicubic" (rgb), "bilinear" (depth, edges), "nearest" (semseg:
    every output value is an input value), "normal" (bilinear; on flip the x component is mirrored, 255 -
    channel 0 of the uint8 (n + 1) / 2 * 255 encoding, as 4M's NormalTransform).
    """
    if mode not in _PIL_FILTERS:
        raise ConfigError(f"unknown crop mode {mode!r}: valid are {list(DENSE_MODES)}")
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(f"dense labels are (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16, np.float16, np.float32):
        raise TypeError(f"dense labels are uint8, uint16, float16 or float32, got {arr.dtype}")
    if mode == "normal" and (arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3):
        raise TypeError(f"mode 'normal' expects (H, W, 3) uint8 normals, got {arr.dtype} {arr.shape}")
    top, left, h, w, flip = _unpack(crop, arr.shape[0], arr.shape[1])
    out = _resize(np.ascontiguousarray(arr[top:top + h, left:left + w]), size, _PIL_FILTERS[mode])
    if flip:
        out = out[:, ::-1].copy()
        if mode == "normal":
            out[:, :, 0] = 255 - out[:, :, 0]
    return out


def crop_image(rgb: np.ndarray, crop: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the rgb label cropped with bicubic resampling (what feature teachers see)."""
    return crop_dense(rgb, crop, size, mode="bicubic")


# ----------------------------------------------------------------------------------------- boxes and keypoints


def _crop_box(box: Any, top: int, left: int, h: int, w: int, flip: bool, height: int, width: int
              ) -> tuple[list[float], float] | None:
    """A normalized image box in the crop's normalized frame, clipped; with its visible fraction of area.

    None when the box is empty or inverted or nothing of its area is inside the crop.
    """
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    x0, x1 = (xmin * width - left) / w, (xmax * width - left) / w
    y0, y1 = (ymin * height - top) / h, (ymax * height - top) / h
    if not (x1 > x0 and y1 > y0):  # empty or inverted box
        return None
    cx0, cx1 = min(max(x0, 0.0), 1.0), min(max(x1, 0.0), 1.0)
    cy0, cy1 = min(max(y0, 0.0), 1.0), min(max(y1, 0.0), 1.0)
    visible = (cx1 - cx0) * (cy1 - cy0)
    if not visible > 0.0:
        return None
    if flip:
        cx0, cx1 = 1.0 - cx1, 1.0 - cx0
    return [cx0, cy0, cx1, cy1], visible / ((x1 - x0) * (y1 - y0))


def _instances(label: Any, what: str) -> list[dict[str, Any]]:
    instances = label.get("instances") if isinstance(label, dict) else None
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise SampleError("bad_input", f'a {what} is not {{"instances": [{{...}}, ...]}}')
    return instances


def _box(inst: dict[str, Any], field: str, what: str) -> list[float]:
    box = inst.get(field)
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise SampleError("bad_input", f"a {what}'s {field} must be 4 finite numbers, got {box!r}")
    return values


def crop_det(label: dict[str, Any], crop: np.ndarray, height: int, width: int, *,
             min_visibility: float = 0.0) -> list[dict[str, Any]]:
    """det instances in the crop frame (4M's DetectionTransform crop, filter and flip).

    label: {"instances": [{"boxes": [xmin, ymin, xmax, ymax] normalized to the height x width image,
    "class_name", "score"}]}. Returns the instances (all other fields kept, order kept) whose box keeps some
    area inside the crop and at least `min_visibility` of its area, with "boxes" normalized to the crop,
    clipped to [0, 1] and mirrored (xmin, xmax -> 1 - xmax, 1 - xmin) when the crop is flipped.
    """
    top, left, h, w, flip = _unpack(crop, height, width)
    out = []
    for inst in _instances(label, "box label"):
        cropped = _crop_box(_box(inst, "boxes", "box"), top, left, h, w, flip, height, width)
        if cropped is None or cropped[1] < min_visibility:
            continue
        out.append({**inst, "boxes": cropped[0]})
    return out


def _mirror_permutation(names: list[str]) -> list[int]:
    """perm[i] = index of the keypoint that lands on name i after a left-right flip (left_x <-> right_x)."""
    index = {n: i for i, n in enumerate(names)}
    perm = []
    for i, name in enumerate(names):
        if name.startswith("left_"):
            twin = "right_" + name[len("left_"):]
        elif name.startswith("right_"):
            twin = "left_" + name[len("right_"):]
        else:
            twin = name
        perm.append(index.get(twin, i))
    return perm


def crop_keypoints(label: dict[str, Any], crop: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """human_keypoints label in the crop frame, same schema.

    Each person's "bbox" goes through the crop like a det box (clipped, normalized to the crop, mirrored on
    flip); people whose box has no area inside the crop are dropped. Keypoints [x, y, score] are mapped to
    the crop's normalized frame; one falling outside [0, 1] is clipped to the border and gets score 0. On
    flip x -> 1 - x and left/right keypoints swap slots (the "left_eye" slot then holds what was the right
    eye, now on the image's left) so the sequence stays anatomically correct. Other fields are kept.
    """
    top, left, h, w, flip = _unpack(crop, height, width)
    names = label.get("keypoint_names", list(COCO_KEYPOINTS)) if isinstance(label, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SampleError("bad_input", "pose keypoint_names must be a list of names")
    perm = _mirror_permutation(names) if flip else list(range(len(names)))
    people = []
    for inst in _instances(label, "pose label"):
        cropped = _crop_box(_box(inst, "bbox", "person"), top, left, h, w, flip, height, width)
        if cropped is None:
            continue
        person = {**inst, "bbox": cropped[0]}
        if "keypoints" in inst:
            kps = _keypoints(inst["keypoints"], len(names))
            mapped = []
            for x, y, score in kps:
                cx, cy = (x * width - left) / w, (y * height - top) / h
                if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
                    cx, cy, score = min(max(cx, 0.0), 1.0), min(max(cy, 0.0), 1.0), 0.0
                mapped.append([1.0 - cx if flip else cx, cy, score])
            person["keypoints"] = [mapped[j] for j in perm]
        people.append(person)
    return {**label, "instances": people}


def _keypoints(value: Any, n: int) -> list[tuple[float, float, float]]:
    try:
        kps = [(float(x), float(y), float(s)) for x, y, s in value]
    except (TypeError, ValueError):
        kps = []
    if len(kps) != n:
        raise SampleError("bad_input", f"pose keypoints must be {n} [x, y, score] triples")
    return kps


# ----------------------------------------------------------------------------------------------- SMPL people


@dataclass
class SmplPerson:
    """One HMR2.0 person of a human_poses label, in a crop's frame.

    box: (xmin, ymin, xmax, ymax) normalized to the crop, clipped to [0, 1] (it may have no area: a box that only
    touches the crop); global_orient (3, 3), body_pose (23, 3, 3), betas (10,), cam (3,) [s, tx, ty]: float64, the
    label's values, mirrored on a flipped crop (`omniforge._smpl.mirror_person`); index: its place in the label.
    """

    box: tuple[float, float, float, float]
    global_orient: np.ndarray
    body_pose: np.ndarray
    betas: np.ndarray
    cam: np.ndarray
    index: int

    def pose_input(self) -> np.ndarray:
        """float32 (207,): the body pose flattened, the pose tokenizer's input (ml-4m's `only_pose` form)."""
        return self.body_pose.astype(np.float32).reshape(-1)


def smpl_people(label: Any) -> list[SmplPerson]:
    """Every person of a human_poses label as stored (no crop); SampleError("bad_label", ...) naming what is
    wrong when the label is not in ml-4m's form (`omniforge.schemas.check_human_poses`: shapes, NaN, ...)."""
    from omniforge.schemas import check_human_poses

    check_human_poses(label)
    if not label:
        return []
    smpl = label["pred_smpl_params"]
    boxes = np.asarray(label["bbox_xyxy"], dtype=np.float64)
    orients = np.asarray(smpl["global_orient"], dtype=np.float64).reshape(-1, 3, 3)
    poses = np.asarray(smpl["body_pose"], dtype=np.float64)
    betas = np.asarray(smpl["betas"], dtype=np.float64)
    cams = np.asarray(label["pred_cam"], dtype=np.float64)
    return [SmplPerson(tuple(float(v) for v in boxes[i]), orients[i], poses[i], betas[i], cams[i], i)
            for i in range(len(boxes))]


def crop_smpl(label: Any, crop: np.ndarray, height: int, width: int) -> list[SmplPerson]:
    """The people of a human_poses label inside one crop, in label order (ml-4m's HumanPoseTransform crop).

    A box ("bbox_xyxy", pixels of the height x width image) goes to the crop's normalized frame with ml-4m's own
    arithmetic (albumentations' bbox_crop of the box normalized to the image: ((x / W) * W - left) / w); a person
    is dropped when both x or both y of its box lie below 0, or both above 1 (wholly outside the crop), and the box
    is then clipped to [0, 1]: a box that only touches the crop is kept with no area, as ml-4m keeps it.

    Flip: ml-4m's transform ignores the crop's flip, so a mirrored image would get unmirrored people. omniforge
    mirrors them: the box (xmin, xmax -> 1 - xmax, 1 - xmin) and the SMPL parameters (`omniforge._smpl.mirror_person`:
    left and right joints exchanged, every rotation R -> M R M with M = diag(-1, 1, 1), tx -> -tx). An unflipped
    crop gives ml-4m's result exactly.
    """
    from omniforge._smpl import mirror_person

    top, left, h, w, flip = _unpack(crop, height, width)
    out = []
    for p in smpl_people(label):
        x0, y0, x1, y1 = p.box
        xs = [((x0 / width) * width - left) / w, ((x1 / width) * width - left) / w]
        ys = [((y0 / height) * height - top) / h, ((y1 / height) * height - top) / h]
        if all(v < 0 for v in ys) or all(v < 0 for v in xs) or all(v > 1 for v in ys) or all(v > 1 for v in xs):
            continue
        cx0, cx1 = (min(max(v, 0.0), 1.0) for v in xs)
        cy0, cy1 = (min(max(v, 0.0), 1.0) for v in ys)
        if flip:
            orient, pose, betas, cam = mirror_person(p.global_orient, p.body_pose, p.betas, p.cam)
            out.append(SmplPerson((1.0 - cx1, cy0, 1.0 - cx0, cy1), orient, pose, betas, cam, p.index))
        else:
            out.append(SmplPerson((cx0, cy0, cx1, cy1), p.global_orient, p.body_pose, p.betas, p.cam, p.index))
    return out


# ---------------------------------------------------------------------------------------------- SAM instances


@dataclass
class SamInstance:
    """One SAM instance in a size x size crop.

    bbox: (xmin, ymin, xmax, ymax) pixels of the crop, inclusive-exclusive (the mask's pixels are rows
        ymin..ymax-1, columns xmin..xmax-1; 0 <= xmin < xmax <= size).
    mask: (mask_size, mask_size) uint8 0/1, the instance inside its own bbox stretched to mask_size (4M's
        get_binary_masks).
    full: (size, size) bool, the instance in the crop frame.
    score: the label's SAM score; index: the instance's position in the label's "instances".
    """

    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    full: np.ndarray
    score: float = 0.0
    index: int = -1


def _binary_resize(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """bool (out_h, out_w): pixels whose antialiased bilinear coverage is at least one half.

    A thin mask that this erases entirely falls back to any coverage, so a nonempty mask stays nonempty.
    """
    cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((out_w, out_h), Image.Resampling.BILINEAR))
    out = cover >= 0.5
    if not out.any() and mask.any():
        out = cover > 0.0
    return out


def _window(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int, int, int]:
    """Along one axis: the output pixels [o0, o1) a mask occupying input pixels [lo, hi) can reach under
    PIL's antialiased bilinear resize of n_in -> n_out pixels, and the input pixels [s0, s1) their filter
    supports read. Resizing input [s0, s1) with PIL's box [o0 * scale - s0, o1 * scale - s0] to o1 - o0
    pixels then gives those output pixels of the full resize (up to float rounding), and the rest are 0."""
    scale = n_in / n_out
    support = max(1.0, scale)
    o0 = max(0, math.floor((lo - support) / scale - 0.5) - 1)
    o1 = min(n_out, math.ceil((hi + support) / scale - 0.5) + 2)
    s0 = max(0, math.floor(o0 * scale - support) - 1)
    s1 = min(n_in, math.ceil(o1 * scale + support) + 2)
    return o0, o1, s0, s1


def _binary_resize_sparse(mask: np.ndarray, size: int) -> np.ndarray:
    """`_binary_resize(mask, size, size)` computed only around the mask's nonzero pixels (SAM masks are
    mostly small: resizing each whole crop region would dominate crop_sam's time)."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    oy0, oy1, sy0, sy1 = _window(int(rows[0]), int(rows[-1]) + 1, h, size)
    ox0, ox1, sx0, sx1 = _window(int(cols[0]), int(cols[-1]) + 1, w, size)
    sub = Image.fromarray(mask[sy0:sy1, sx0:sx1].astype(np.float32))
    box = (ox0 * w / size - sx0, oy0 * h / size - sy0, ox1 * w / size - sx0, oy1 * h / size - sy0)
    cover = np.asarray(sub.resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=box))
    out = np.zeros((size, size), dtype=bool)
    win = cover >= 0.5
    if not win.any():
        win = cover > 0.0
    out[oy0:oy1, ox0:ox1] = win
    return out


def crop_sam(label: dict[str, Any], crop: np.ndarray, height: int, width: int, *, size: int = 224,
             mask_size: int = 64, max_instances: int | None = None, min_area: float = 0.0005
             ) -> list[SamInstance]:
    """sam_instance label -> its instances inside the crop, largest (mask area in the crop) first.

    Each COCO RLE mask is decoded, cropped, resized to size x size (coverage >= 1/2) and mirrored on flip.
    Instances with an empty mask in the crop, or a bbox covering less than `min_area` of the crop (4M's
    bbox_area_threshold), are dropped; at most `max_instances` (the largest) are kept.
    """
    from pycocotools import mask as mask_utils

    if size < 1 or mask_size < 1:
        raise ConfigError(f"crop_sam size and mask_size must be >= 1, got {size} and {mask_size}")
    if max_instances is not None and max_instances < 0:
        raise ConfigError(f"crop_sam max_instances must be None or >= 0, got {max_instances}")
    top, left, h, w, flip = _unpack(crop, height, width)
    kept: list[tuple[int, int, SamInstance]] = []
    for index, inst in enumerate(_instances(label, "SAM label")):
        seg = inst.get("segmentation")
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise SampleError("bad_input", "SAM segmentation must be a COCO RLE {'size', 'counts'}")
        if [int(v) for v in seg["size"]] != [height, width]:
            raise SampleError("bad_input", f"SAM mask of size {seg['size']} on a {height}x{width} image")
        if _box_misses_crop(inst.get("bbox"), top, left, h, w):
            continue
        counts = seg["counts"]
        counts = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
        try:
            if not isinstance(counts, bytes) or not counts:
                raise ValueError("empty or non-string counts")
            decoded = mask_utils.decode({"size": [height, width], "counts": counts})
        except ValueError as e:
            raise SampleError("bad_input", f"SAM instance {index} has an invalid COCO RLE: {e}") from None
        if decoded.max(initial=0) > 1:
            raise SampleError("bad_input", f"SAM instance {index} RLE does not decode to a 0/1 mask")
        region = decoded[top:top + h, left:left + w]
        if not region.any():
            continue
        full = _binary_resize_sparse(region, size)
        if flip:
            full = full[:, ::-1].copy()
        rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
        if rows.size == 0:
            continue
        ymin, ymax, xmin, xmax = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if (xmax - xmin) * (ymax - ymin) / (size * size) < min_area:
            continue
        mask = _binary_resize(full[ymin:ymax, xmin:xmax], mask_size, mask_size).astype(np.uint8)
        score = float(inst.get("score", 0.0))
        kept.append((int(full.sum()), index,
                     SamInstance(bbox=(xmin, ymin, xmax, ymax), mask=mask, full=full, score=score, index=index)))
    kept.sort(key=lambda t: (-t[0], t[1]))
    if max_instances is not None:
        kept = kept[:max_instances]
    return [t[2] for t in kept]


def _box_misses_crop(bbox: Any, top: int, left: int, h: int, w: int) -> bool:
    """True only when the label's inclusive XYXY pixel bbox is valid and lies wholly outside the crop."""
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return False
    return xmax < left or xmin >= left + w or ymax < top or ymin >= top + h


def uncrop_mask(mask: np.ndarray, bbox: Any, size: int) -> np.ndarray:
    """Place a (mask_size, mask_size) instance mask back into a (size, size) frame at bbox (SamInstance's
    inclusive-exclusive XYXY pixels; the part outside the frame is cut off).

    A float mask (e.g. a decoder's probabilities) is resized bilinearly and comes back float32; a bool or
    integer 0/1 mask comes back uint8 0/1 (coverage >= 1/2).
    """
    mask = np.asarray(mask)
    is_float = np.issubdtype(mask.dtype, np.floating)
    out = np.zeros((size, size), dtype=np.float32 if is_float else np.uint8)
    xmin, ymin, xmax, ymax = (int(round(float(v))) for v in bbox)
    bw, bh = xmax - xmin, ymax - ymin
    if bw < 1 or bh < 1 or mask.ndim != 2 or mask.size == 0:
        return out
    if is_float:
        placed = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((bw, bh), Image.Resampling.BILINEAR))
    else:
        placed = _binary_resize(mask != 0, bh, bw).astype(np.uint8)
    x0, y0, x1, y1 = max(xmin, 0), max(ymin, 0), min(xmax, size), min(ymax, size)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = placed[y0 - ymin:y1 - ymin, x0 - xmin:x1 - xmin]
    return out


__all__ = ["CROP_FIELDS", "DENSE_MODES", "CropConfig", "SamInstance", "SmplPerson", "centre_crop", "check_crop_sides",
           "crop_dense", "crop_det", "crop_image", "crop_keypoints", "crop_sam", "crop_settings", "crop_smpl",
           "min_storage_size", "smpl_people", "uncrop_mask"]

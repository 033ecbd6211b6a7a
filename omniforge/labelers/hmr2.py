"""human_poses: HMR2.0 (4D-Humans), the SMPL body pose, shape and camera of every det person, 4M-21's modality.

The network, the person crop and the checkpoint reader are in `_hmr2.py` (omniforge's own implementation of
the published architecture); this module is the teacher: options, weights, batching and the JSON ml-4m reads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from omniforge._smpl import RESCALE_FACTOR, person_box
from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, autocast_for, seeded, short_error
from omniforge.labelers.base import PRETRAINED, PROFILE_4M21, TINY, LabelerOptions, Profile, Sample, file_sha256, \
    option
from omniforge.labelers.detection import ROUND, det_persons

PERSON_THRESHOLD = 0.5  # 4D-Humans' demo keeps detector persons scoring above 0.5
MAX_PERSONS = 20
PIXEL_DECIMALS = 2  # bbox_xyxy is in pixels: 0.01 px is far below the det box's own precision
OUTPUTS = ("global_orient", "body_pose", "betas", "pred_cam")
SMPL_MODEL_HELP = ("the SMPL body model (licensed separately from https://smpl.is.tue.mpg.de, e.g. SMPL_NEUTRAL.pkl "
                   "or a folder of SMPL models), read by `omniforge show` to draw each person's 3D joints; not used "
                   "for labeling and not part of the fingerprint")


@dataclass(frozen=True, kw_only=True)
class HumanPosesOptions(LabelerOptions):
    person_threshold: float = option(PERSON_THRESHOLD, "run on det's person boxes scoring at least this (4D-Humans' "
                                                       "demo: 0.5)", ge=0.0, le=1.0)
    max_persons: int = option(MAX_PERSONS, "at most this many persons per image, highest det score first", ge=1)
    rescale_factor: float = option(RESCALE_FACTOR, "each det box's sides are multiplied by this before the crop "
                                                   "(4D-Humans' demo and ViTDetDataset: 1, the box as detected)",
                                   ge=0.1, le=10.0)
    backbone_heads: int = option(16, "attention heads of the ViT backbone, which its weights do not tell (16 for the "
                                     "released ViT-H/16)", ge=1)
    batch_size: int = option(32, "person crops per forward pass (memory only: not part of the fingerprint)", ge=1)
    smpl_model: str | None = option(None, SMPL_MODEL_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.smpl_model is not None and not os.path.exists(os.path.expanduser(self.smpl_model)):
            raise ConfigError(f"option smpl_model={self.smpl_model!r}: no such file or folder; pass the path of the "
                              f"SMPL body model (SMPL_NEUTRAL.pkl, or its folder), or leave the option out")


@register_labeler
class HumanPosesLabeler(TorchLabeler):
    """human_poses: HMR2.0's SMPL parameters and camera for every det person, in the JSON ml-4m reads.

    Output: human_poses, JSON {"bbox_xyxy": [[x0, y0, x1, y1] per person], "pred_smpl_params": {"global_orient":
    [(1, 3, 3) per person], "body_pose": [(23, 3, 3) per person], "betas": [(10,) per person]}, "pred_cam":
    [(3,) per person], "box_center": [[x, y] per person], "box_size": [side per person], "score": [det score
    per person]}, people in det-score order (highest first), one entry
    per det "person" scoring at least `person_threshold` (default 0.5), of det's `max_persons` (default 20) best.
    bbox_xyxy is det's box in pixels of the labeled image (x right, y down, origin at its top-left corner;
    rounded to 0.01 px); global_orient is the body's root rotation and body_pose the 23 SMPL joints' rotations
    relative to their parents, as row-major 3 x 3 rotation matrices in HMR2.0's camera frame; betas the 10 SMPL
    shape coefficients; pred_cam HMR2.0's weak-perspective camera (s, tx, ty) of the 256 x 256 crop (4D-Humans
    turns it into the translation (tx, ty, 2 * 5000 / (256 * s)) for its 5000 px focal length); box_center and
    box_size the square crop pred_cam refers to (pixels; `omniforge._smpl.person_box` of the box with
    `rescale_factor`), which `show` needs to place the person in the image (ml-4m ignores them); rounded to
    5 decimals (pixels to 0.01). An image with no person is {} (ml-4m's transform reads an empty label as "none"). A det
    box of zero width or height is skipped (it has no crop); a non-finite output fails that image
    (SampleError "teacher_error"); a sample without det fails with "missing_input".
    Input: the image and `Sample.inputs["det"]`; each box (its sides times `rescale_factor`) is cropped as
    4D-Humans' ViTDetDataset does (`_hmr2.person_crop`: square of the box expanded to 192:256, anti-aliased,
    256 x 256, ImageNet-normalized), the backbone sees its middle 256 x 192; the crops of every person of
    the batch run together, `batch_size` at a time; on CUDA the backbone runs in bfloat16 autocast, the head
    always in float32.

    Weights: a path loads the publisher's release: its run folder (model_config.yaml and checkpoints/ with one
    .ckpt) or the .ckpt itself (model_config.yaml two folders up, as 4D-Humans' load_hmr2), read safely (only
    the tensors: `_hmr2.read_lightning_checkpoint` explains how); "pretrained" loads it from where 4D-Humans'
    own download puts it, ~/.cache/4DHumans/logs/train/multiruns/hmr2/0 (there is no hub copy: download
    hmr2_data.tar.gz from the publisher, `_hmr2.RELEASE_URL`); "tiny" builds the same network at width 64 with
    2 blocks and a 2-layer, 32-wide head, random weights seeded identically in every process. No SMPL body
    model is needed for labeling (`smpl_model` is only for `omniforge show`).
    """

    name = "human_poses"
    modalities = default_for = ("human_poses",)
    learned = True
    options_class = HumanPosesOptions
    options: HumanPosesOptions
    requires = ("det",)
    checkpoint_format = "4D-Humans release: its run folder (model_config.yaml, checkpoints/*.ckpt) or the .ckpt"
    profiles = {PROFILE_4M21: Profile(
        reference="HMR2.0 (4D-Humans' released checkpoint: ViT-H/16 backbone, SMPL transformer-decoder head) on the "
                  "detector's person boxes, 4D-Humans' crops; 4M-21's human_poses",
        options={"person_threshold": PERSON_THRESHOLD})}

    # -- fingerprint ---------------------------------------------------------------------------------------

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        """Every option but `batch_size` (memory) and `smpl_model` (read by `show` only): changing them does not
        change a label."""
        values = super().identity_options(options, weights=weights, given=given)
        return {k: v for k, v in values.items() if k not in ("batch_size", "smpl_model")}

    @classmethod
    def identify_weights(cls, weights: str) -> str:
        """A release path by the content of its checkpoint and its model_config.yaml (when there is one)."""
        if weights in (TINY, PRETRAINED):
            return weights
        from omniforge.labelers._hmr2 import MODEL_CONFIG, resolve_release

        path = os.path.abspath(os.path.expanduser(weights))
        if os.path.isdir(path):
            files = resolve_release(path)
        else:
            config = os.path.join(os.path.dirname(os.path.dirname(path)), MODEL_CONFIG)
            files = (path, config) if os.path.isfile(config) else (path,)
        digest = hashlib.sha256(":".join(file_sha256(f) for f in files).encode()).hexdigest()
        return f"hmr2-sha256:{digest}"

    # -- building ------------------------------------------------------------------------------------------

    def _load(self) -> tuple[Any, Callable | None]:
        """tiny, pretrained (the release where 4D-Humans downloads it) or a release path; never one for another."""
        from omniforge.labelers import _hmr2

        heads = self.options.backbone_heads
        if self.weights == TINY:
            with seeded():
                return _hmr2.build_tiny(heads), None
        path = self.weights
        if self.weights == PRETRAINED:
            path = os.path.join(os.path.expanduser(_hmr2.CACHE_DIR), _hmr2.RELEASE_RUN)
            if not os.path.isdir(path):
                raise WeightsError(f"{self.name}: the HMR2.0 release is not in {_hmr2.CACHE_DIR} (no hub hosts it): "
                                   f"download {_hmr2.RELEASE_URL} and extract it there (tar -xzf hmr2_data.tar.gz "
                                   f"-C {_hmr2.CACHE_DIR}), or pass --weights {self.name}=/path/to/its run folder, or "
                                   f"--weights tiny for random weights")
        try:
            return _hmr2.load_hmr2(path, heads), None
        except (WeightsError, ConfigError, ImportError):
            raise
        except Exception as e:
            raise WeightsError(f"{self.name}: cannot load {path} as 4D-Humans' HMR2.0 release ({short_error(e)}); "
                               f"pass its run folder or .ckpt, or --weights tiny") from e

    # -- labeling ------------------------------------------------------------------------------------------

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        from omniforge.labelers._hmr2 import person_crop

        out: list[dict[str, Any] | SampleError | None] = [None] * len(samples)
        people: list[tuple[int, list[float], float]] = []  # (sample index, XYXY pixel box, det score)
        for i, sample in enumerate(samples):
            persons = det_persons(sample, self.name, self.options.person_threshold, self.options.max_persons)
            if isinstance(persons, SampleError):
                out[i] = persons
                continue
            kept = [(i, box, score) for _, box, score in persons if box[2] > box[0] and box[3] > box[1]]
            if not kept:
                out[i] = {"human_poses": {}}
            people += kept
        if people:
            cfg = self.model.cfg
            crops = np.stack([person_crop(samples[i].image, box, self.options.rescale_factor, cfg.mean, cfg.std)
                              for i, box, _ in people])  # (P, 3, 256, 256)
            preds = self.predict(crops)
            rows: dict[int, list[int]] = {}
            for row, (i, _, _) in enumerate(people):
                rows.setdefault(i, []).append(row)
            for i, idx in rows.items():
                out[i] = self._people_json([people[r][1:] for r in idx], {k: v[idx] for k, v in preds.items()})
        return out  # type: ignore[return-value]

    def predict(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """(P, 3, 256, 256) normalized crops -> {global_orient (P, 1, 3, 3), body_pose (P, 23, 3, 3), betas (P, 10),
        pred_cam (P, 3)} float32, `batch_size` crops per forward."""
        import torch

        parts = []
        for start in range(0, len(crops), self.options.batch_size):
            x = torch.from_numpy(crops[start:start + self.options.batch_size]).to(self.torch_device)
            with torch.inference_mode(), autocast_for(self.torch_device):
                pred = self.model(x)
            parts.append({k: pred[k].float().cpu().numpy() for k in OUTPUTS})
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}

    def _people_json(self, people: list[tuple[list[float], float]], preds: dict[str, np.ndarray]
                     ) -> dict[str, Any] | SampleError:
        bad = [k for k, v in preds.items() if not np.isfinite(v).all()]
        if bad:
            return SampleError("teacher_error", f"{self.name}: non-finite {', '.join(bad)} for a person of this image")

        def rounded(a: Any, decimals: int = ROUND) -> list:
            return np.round(np.asarray(a, np.float64), decimals).tolist()

        crops = [person_box(box, self.options.rescale_factor) for box, _ in people]
        return {"human_poses": {
            "bbox_xyxy": rounded([box for box, _ in people], PIXEL_DECIMALS),
            "pred_smpl_params": {k: rounded(preds[k]) for k in ("global_orient", "body_pose", "betas")},
            "pred_cam": rounded(preds["pred_cam"]),
            "box_center": rounded([center for center, _ in crops], PIXEL_DECIMALS),
            "box_size": rounded([side for _, side in crops], PIXEL_DECIMALS),
            "score": [round(score, ROUND) for _, score in people]}}


__all__ = ["HumanPosesLabeler", "HumanPosesOptions"]

"""det (RT-DETR, COCO objects) and human_keypoints (ViTPose COCO-17 keypoints on det's person boxes).

Both teachers run transformers models: `AutoModelForObjectDetection` / `VitPoseForPoseEstimation` with the
checkpoint's own `AutoImageProcessor` for preprocessing and post-processing, so omniforge's output is what
the transformers predictor gives, normalized to 0..1 image coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from omniforge.errors import SampleError, WeightsError
from omniforge.coco import COCO_DETECTION_CLASSES, COCO_KEYPOINTS
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, autocast_for, check_image, require, to_pil
from omniforge.labelers.base import PROFILE_4M21, LabelerOptions, Profile, Sample, option

DET_HUB_ID = "PekingU/rtdetr_r50vd"  # RT-DETR R50-vd, COCO 2017 (53.1 AP)
DET_THRESHOLD = 0.3  # RT-DETR's sigmoid scores: 0.3 keeps confident objects (transformers' RT-DETR/ViTPose docs use it)
DET_MAX_DETECTIONS = 100
POSE_HUB_ID = "usyd-community/vitpose-base-simple"  # ViTPose-B, simple decoder, COCO-17 keypoints
PERSON_THRESHOLD = 0.3
MAX_PERSONS = 20
ROUND = 5  # decimals kept in the JSON (1e-5 of the image side: far below a pixel at any storage size)

_TRANSFORMERS = ("transformers", "transformers>=4.49")
_FOLDER = "save_pretrained folder (config.json, model.safetensors, preprocessor_config.json)"


@dataclass(frozen=True, kw_only=True)
class DetOptions(LabelerOptions):
    hub_id: str = option(DET_HUB_ID, "the transformers object-detection checkpoint loaded by --weights pretrained "
                                     "(e.g. facebook/detr-resnet-50)")
    threshold: float = option(DET_THRESHOLD, "keep detections scoring at least this", ge=0.0, le=1.0)
    max_detections: int = option(DET_MAX_DETECTIONS, "keep at most this many detections, highest score first", ge=1)


@dataclass(frozen=True, kw_only=True)
class HumanKeypointsOptions(LabelerOptions):
    hub_id: str = option(POSE_HUB_ID, "the transformers ViTPose checkpoint (COCO-17 keypoints) loaded by --weights "
                                      "pretrained")
    person_threshold: float = option(PERSON_THRESHOLD, "run on det's person boxes scoring at least this", ge=0.0,
                                     le=1.0)
    max_persons: int = option(MAX_PERSONS, "at most this many persons per image, highest det score first", ge=1)


def det_persons(sample: Sample, teacher: str, threshold: float, max_persons: int
                ) -> list[tuple[list[float], list[float], float]] | SampleError:
    """The people of the pose teachers (human_keypoints, human_poses): det's person instances in
    `sample.inputs["det"]` scoring at least `threshold`, highest score first, at most `max_persons`, each as
    (XYXY box clipped to [0, 1], the same box in pixels of `sample.image`, score). An image that breaks the
    Sample contract: SampleError("bad_image"); no det input: SampleError("missing_input"); a det label that is
    not {"instances": [{"boxes", "class_name", "score"}]} with finite numbers: SampleError("bad_input")."""
    err = check_image(sample)
    if err is not None:
        return err
    if "det" not in sample.inputs:
        return SampleError("missing_input", f"{teacher} needs the det label of this sample")
    det = sample.inputs["det"]
    instances = det.get("instances") if isinstance(det, dict) else None
    if not isinstance(instances, list):
        return SampleError("bad_input", 'det label is not {"instances": [...]}')
    persons = []
    for inst in instances:
        try:
            box, score, cls = inst["boxes"], float(inst["score"]), inst["class_name"]
            box = [float(v) for v in box]
        except (KeyError, TypeError, ValueError):
            return SampleError("bad_input", f"det instance {str(inst)[:100]} lacks boxes, class_name or score")
        if len(box) != 4 or not all(math.isfinite(v) for v in [*box, score]):
            return SampleError("bad_input", f"det instance has a bad box {box} or score {score}")
        if cls == "person" and score >= threshold:
            persons.append(([min(max(v, 0.0), 1.0) for v in box], score))
    persons.sort(key=lambda p: -p[1])
    h, w = sample.image.shape[:2]
    return [(box, [box[0] * w, box[1] * h, box[2] * w, box[3] * h], score) for box, score in persons[:max_persons]]


class _TransformersLabeler(TorchLabeler):
    """A teacher whose weights are a transformers checkpoint: a hub id, or a local `save_pretrained` folder
    holding the model and its image processor."""

    checkpoint_is_dir = True
    checkpoint_format = _FOLDER
    model_class: ClassVar[str]  # the transformers class that loads the checkpoint

    @property
    def hub_id(self) -> str:
        return self.options.hub_id  # type: ignore[attr-defined]  # both subclasses' options have a hub_id

    def _from_pretrained(self, source: str, **kwargs: Any) -> tuple[Any, Any]:
        transformers = require(*_TRANSFORMERS)
        model = getattr(transformers, self.model_class).from_pretrained(source, **kwargs)
        processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
        return self.check_model(model), processor

    def check_model(self, model: Any) -> Any:
        return model

    def build_pretrained(self) -> tuple[Any, Callable]:
        return self._from_pretrained(self.hub_id)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        return self._from_pretrained(path, local_files_only=True)

    @property
    def processor(self) -> Any:
        return self.transform


@register_labeler
class DetLabeler(_TransformersLabeler):
    """det: COCO object detection with RT-DETR (transformers), 4M-21's det modality.

    Output: det, JSON {"instances": [{"boxes": [xmin, ymin, xmax, ymax], "class_name": str, "score": float}]}:
    boxes are XYXY corners divided by the image width and height, clipped to [0, 1] (x right, y down, origin
    at the top-left corner of the image); class_name is the checkpoint's `id2label` name (the 80 COCO classes
    for the default model); score in [0, 1]. Instances are sorted by score, highest first, keep
    score >= `threshold` (default 0.3) and number at most `max_detections` (default 100). An image with no
    detection gives {"instances": []}.
    Input: the whole image, the checkpoint's own image processor (RT-DETR: resized to 640 x 640) and its
    `post_process_object_detection`.

    Weights: "pretrained" loads `hub_id` (default "PekingU/rtdetr_r50vd"; any transformers object-detection
    checkpoint works, e.g. "facebook/detr-resnet-50"); a path loads a local `save_pretrained` folder (model
    and `preprocessor_config.json`); "tiny" builds a 2-layer RT-DETR with a small ResNet backbone, d_model 32,
    the COCO classes and a 320 x 320 processor, random weights seeded identically in every process (its
    scores stay near 0.1: pass threshold=0 to see boxes).
    """

    name = "det"
    modalities = default_for = ("det",)
    learned = True
    options_class = DetOptions
    options: DetOptions
    model_class = "AutoModelForObjectDetection"
    profiles = {PROFILE_4M21: Profile(
        reference="ViTDet ViT-H with Cascade Mask R-CNN (detectron2), COCO boxes",
        options={"hub_id": DET_HUB_ID, "threshold": DET_THRESHOLD, "max_detections": DET_MAX_DETECTIONS},
        stand_in="ViTDet's Cascade Mask R-CNN runs only in detectron2, which has no PyPI release, and transformers "
                 "ports ViTDet's backbone without its detection head; RT-DETR R50-vd (transformers, 53.1 COCO AP) "
                 "writes the same COCO classes and boxes, from a smaller, less accurate detector")}

    def build_tiny(self) -> tuple[Any, Callable]:
        transformers = require(*_TRANSFORMERS)
        backbone = transformers.RTDetrResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"])
        config = transformers.RTDetrConfig(
            backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64,
            encoder_attention_heads=2, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64,
            decoder_layers=2, decoder_attention_heads=2, num_queries=DET_MAX_DETECTIONS, num_denoising=0,
            id2label=dict(enumerate(COCO_DETECTION_CLASSES)))
        model = transformers.RTDetrForObjectDetection(config)
        processor = transformers.RTDetrImageProcessor(size={"height": 320, "width": 320})
        return model, processor

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out: list[dict[str, Any] | SampleError | None] = [check_image(s) for s in samples]
        rows = [i for i, o in enumerate(out) if o is None]
        if not rows:
            return out  # type: ignore[return-value]
        sizes = [samples[i].image.shape[:2] for i in rows]
        inputs = self.processor(images=[to_pil(samples[i].image) for i in rows], return_tensors="pt")
        inputs = {k: v.to(self.torch_device) for k, v in inputs.items()}
        with torch.inference_mode(), autocast_for(self.torch_device):
            outputs = self.model(**inputs)
        for key in ("logits", "pred_boxes"):  # post-process in float32 whatever the autocast dtype
            outputs[key] = outputs[key].float()
        results = self.processor.post_process_object_detection(
            outputs, threshold=self.options.threshold, target_sizes=[(int(h), int(w)) for h, w in sizes])
        id2label = self.model.config.id2label
        for i, (h, w), res in zip(rows, sizes, results):
            scores = res["scores"].float().cpu().numpy()
            labels = res["labels"].cpu().numpy()
            boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
            if not (np.isfinite(scores).all() and np.isfinite(boxes).all()):
                out[i] = SampleError("teacher_error", f"{self.name}: non-finite boxes or scores")
                continue
            order = np.argsort(-scores, kind="stable")[: self.options.max_detections]
            norm = np.clip(boxes / np.array([w, h, w, h], dtype=np.float32), 0.0, 1.0)
            out[i] = {"det": {"instances": [
                {"boxes": [round(float(v), ROUND) for v in norm[j]],
                 "class_name": id2label.get(int(labels[j]), f"LABEL_{int(labels[j])}"),
                 "score": round(float(scores[j]), ROUND)}
                for j in order]}}
        return out  # type: ignore[return-value]


@register_labeler
class HumanKeypointsLabeler(_TransformersLabeler):
    """human_keypoints: COCO-17 body keypoints with ViTPose (transformers), top-down on det's person boxes.

    Output: human_keypoints, JSON {"keypoint_names": [17 COCO names], "instances": [{"bbox": [xmin, ymin, xmax,
    ymax], "score": float, "keypoints": [[x, y, score] x 17]}]}: one instance per det "person" with
    score >= `person_threshold` (default 0.3), highest det score first, at most `max_persons` (default 20);
    bbox and score are that det instance's (bbox clipped to [0, 1]); keypoints are in the order of
    `keypoint_names` (COCO's person_keypoints order), x and y divided by the image width and height and
    clipped to [0, 1] (x right, y down, origin at the top-left corner), score the heatmap peak (ViTPose's
    keypoint confidence, not a probability). An image with no person gives {"keypoint_names": [...],
    "instances": []}; a person box narrower or lower than one pixel is skipped. No SMPL parameters.
    Input: the image and `Sample.inputs["det"]`; each box goes to the checkpoint's image processor in its own
    COCO xywh pixel format (the processor's affine crop, 256 x 192 for ViTPose), keypoints come from its
    `post_process_pose_estimation`.

    Weights: "pretrained" loads `hub_id` (default "usyd-community/vitpose-base-simple"; ViTPose++ MoE
    checkpoints run their COCO expert, dataset_index 0); a path loads a local `save_pretrained` folder
    (model and `preprocessor_config.json`); "tiny" builds a 2-layer, width-32 ViTPose at 64 x 48 input with
    random weights seeded identically in every process.
    """

    name = "human_keypoints"
    modalities = default_for = ("human_keypoints",)
    learned = True
    options_class = HumanKeypointsOptions
    options: HumanKeypointsOptions
    requires = ("det",)
    model_class = "VitPoseForPoseEstimation"

    def check_model(self, model: Any) -> Any:
        if model.config.num_labels != len(COCO_KEYPOINTS):
            raise WeightsError(f"{self.name}: the checkpoint predicts {model.config.num_labels} keypoints; "
                               f"human_keypoints needs a COCO-17 keypoint model such as {POSE_HUB_ID!r}")
        return model

    def build_tiny(self) -> tuple[Any, Callable]:
        transformers = require(*_TRANSFORMERS)
        backbone = transformers.VitPoseBackboneConfig(
            image_size=[64, 48], patch_size=[8, 8], hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            mlp_ratio=2, out_indices=[2])
        config = transformers.VitPoseConfig(backbone_config=backbone, num_labels=len(COCO_KEYPOINTS))
        model = transformers.VitPoseForPoseEstimation(config)
        processor = transformers.VitPoseImageProcessor(size={"height": 64, "width": 48})
        return model, processor

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out: list[dict[str, Any] | SampleError | None] = [None] * len(samples)
        jobs = []  # (sample index, persons, COCO xywh pixel boxes)
        for i, sample in enumerate(samples):
            persons = det_persons(sample, self.name, self.options.person_threshold, self.options.max_persons)
            if isinstance(persons, SampleError):
                out[i] = persons
                continue
            kept, xywh = [], []
            for box, (x0, y0, x1, y1), score in persons:
                if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
                    kept.append((box, score))
                    xywh.append([x0, y0, x1 - x0, y1 - y0])
            if kept:
                jobs.append((i, kept, xywh))
            else:
                out[i] = {"human_keypoints": {"keypoint_names": list(COCO_KEYPOINTS), "instances": []}}
        if not jobs:
            return out  # type: ignore[return-value]

        boxes = [np.asarray(xywh, dtype=np.float32) for _, _, xywh in jobs]
        inputs = self.processor(images=[to_pil(samples[i].image) for i, _, _ in jobs], boxes=boxes,
                                return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.torch_device)  # (total persons, 3, H, W)
        kwargs = {}
        if getattr(self.model.config.backbone_config, "num_experts", 1) > 1:  # ViTPose++: the COCO expert
            kwargs["dataset_index"] = torch.zeros(len(pixel_values), dtype=torch.long, device=self.torch_device)
        with torch.inference_mode(), autocast_for(self.torch_device):
            outputs = self.model(pixel_values=pixel_values, **kwargs)
        outputs["heatmaps"] = outputs["heatmaps"].float()
        poses = self.processor.post_process_pose_estimation(outputs, boxes=boxes)
        for (i, kept, _), image_poses in zip(jobs, poses):
            h, w = samples[i].image.shape[:2]
            instances = []
            for (box, score), pose in zip(kept, image_poses):
                xy = pose["keypoints"].float().cpu().numpy().reshape(-1, 2)
                kp_scores = pose["scores"].float().cpu().numpy().reshape(-1)
                if not (np.isfinite(xy).all() and np.isfinite(kp_scores).all()):
                    out[i] = SampleError("teacher_error", f"{self.name}: non-finite keypoints")
                    break
                xy = np.clip(xy / np.array([w, h], dtype=np.float32), 0.0, 1.0)
                instances.append({
                    "bbox": [round(v, ROUND) for v in box], "score": round(score, ROUND),
                    "keypoints": [[round(float(x), ROUND), round(float(y), ROUND), round(float(s), ROUND)]
                                  for (x, y), s in zip(xy, kp_scores)]})
            else:
                out[i] = {"human_keypoints": {"keypoint_names": list(COCO_KEYPOINTS), "instances": instances}}
        return out  # type: ignore[return-value]


__all__ = ["DetLabeler", "DetOptions", "HumanKeypointsLabeler", "HumanKeypointsOptions", "det_persons"]

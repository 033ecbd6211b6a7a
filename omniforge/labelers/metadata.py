"""metadata: the 4M-21 image metadata that can be computed from the modalities of a job.

A derived labeler: it reads whatever of caption, det, human_poses, sam_instance, semseg_coco, normal, depth,
aesthetic_score and watermark_score exist for a sample (from the same job or from shards written earlier) and
never invents a field whose source did not run.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from omniforge.labelers._coco_panoptic import COCO_PANOPTIC_CLASSES, COCO_PANOPTIC_STUFF_IDS
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import PROFILE_4M21, Labeler, LabelerOptions, Profile, Sample
from omniforge.errors import SampleError

# Stuff classes a person can walk on: the walkability score counts their pixels.
WALKABLE_CLASSES = frozenset({
    "road", "pavement-merged", "floor-wood", "floor-other-merged", "grass-merged", "dirt-merged", "sand",
    "gravel", "playingfield", "railroad", "rug-merged", "snow", "stairs", "platform", "bridge",
})


@register_labeler
class MetadataLabeler(Labeler):
    """metadata: a JSON object of the 4M-21 metadata fields computable from this job's modalities.

    Field names and units are ml-4m's (its MetadataTransform reads the label as it is).

    Always (from the decoded rgb image and the manifest):
      original_width, original_height  size of the source image as stored in the corpus (pixels)
      colorfulness      Hasler & Suesstrunk (2003) M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2),
                        rg = R - G, yb = (R + G) / 2 - B, on 0..255 values
      brightness        mean Rec.601 luma, 0..255
      contrast          RMS contrast: standard deviation of the Rec.601 luma, 0..255 (at most 127.5)
      saturation        mean HSV saturation (OpenCV), 0..255
      entropy           Shannon entropy of the 8-bit luma histogram, bits (0..8)
    From caption (when present): caption_n_chars, caption_n_words, caption_n_sentences (runs of text
      ended by . ! ? or the end).
    From human_poses (HMR2.0, 4M-21's source) when it ran, else from human_keypoints (ViTPose): n_humans
      (crowdedness), the number of people the pose teacher found (both run on the same det person boxes).
    From sam_instance: n_sam_instances (SAM clutter), the number of SAM instances.
    From det: n_coco_instances (COCO clutter) and coco_instance_diversity, the number of detections and of
      distinct classes among them.
    From semseg_coco (pixels labeled 255 = none are left out of every fraction):
      walkability       fraction of labeled pixels whose class is walkable (WALKABLE_CLASSES)
      objectness        fraction of labeled pixels that belong to a "thing" (countable) class
      semantic_diversity  number of distinct classes present
    From normal: geometric_complexity, the circular variance of the unit surface normals,
      1 - |mean(n)|, 0 (one plane) .. 1 (normals spread in every direction).
    From depth: occlusion_score, the fraction of pixels on occlusion edges, 0..1 (`occlusion_score`).
    From aesthetic_score and watermark_score (the LAION teachers, `omniforge.labelers.laion`): those scores,
      as the teachers wrote them (about 1..10, and a probability 0..1).
    """

    name = "metadata"
    version = "2"  # 1: omniforge's own field names (n_sam_masks, n_coco_classes) and brightness etc. in 0..1
    modalities = default_for = ("metadata",)
    options_class = LabelerOptions
    optional_inputs = ("human_poses", "human_keypoints", "sam_instance", "det", "semseg_coco", "normal", "depth",
                       "aesthetic_score", "watermark_score")
    profiles = {PROFILE_4M21: Profile(
        reference="4M-21's 21 metadata fields, from the image, the caption and the other pseudo labels",
        stand_in="4M-21's metadata code is not published: omniforge computes each field from the paper's "
                 "definition (omniforge list metadata), only from the sources the job labeled; occlusion_score's "
                 "edge threshold is omniforge's own (the paper gives none)")}

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        return [{"metadata": self.label_one(s)} for s in samples]

    def label_one(self, sample: Sample) -> dict[str, Any]:
        out: dict[str, Any] = {}
        h, w = sample.image.shape[:2]
        out["original_width"] = int(sample.meta.get("orig_width") or w)
        out["original_height"] = int(sample.meta.get("orig_height") or h)
        out.update(image_statistics(sample.image))
        if sample.caption:
            out.update(caption_statistics(sample.caption))
        inputs = sample.inputs
        if "human_poses" in inputs:  # 4M-21's: HMR2.0's people ({} when there is nobody)
            out["n_humans"] = len(inputs["human_poses"].get("bbox_xyxy", []))
        elif "human_keypoints" in inputs:
            out["n_humans"] = len(inputs["human_keypoints"].get("instances", []))
        if "sam_instance" in inputs:
            out["n_sam_instances"] = len(inputs["sam_instance"].get("instances", []))
        if "det" in inputs:
            instances = inputs["det"].get("instances", [])
            out["n_coco_instances"] = len(instances)
            out["coco_instance_diversity"] = len({i["class_name"] for i in instances})
        if "semseg_coco" in inputs:
            out.update(semseg_statistics(np.asarray(inputs["semseg_coco"])))
        if "normal" in inputs:
            out["geometric_complexity"] = geometric_complexity(np.asarray(inputs["normal"]))
        if "depth" in inputs:
            out["occlusion_score"] = occlusion_score(np.asarray(inputs["depth"]))
        for name in ("aesthetic_score", "watermark_score"):
            if name in inputs:
                out[name] = teacher_score(name, inputs[name])
        return out


def image_statistics(image: np.ndarray) -> dict[str, float]:
    import cv2
    from skimage.measure import shannon_entropy

    rgb = image.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    colorfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    luma = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]
    return {
        "colorfulness": round(float(colorfulness), 4),
        "brightness": round(float(luma.mean()), 4),
        "contrast": round(float(luma.std()), 4),
        "saturation": round(float(saturation.mean()), 4),
        "entropy": round(float(shannon_entropy(luma)), 4),
    }


def caption_statistics(caption: str) -> dict[str, int]:
    text = caption.strip()
    sentences = [s for s in re.split(r"[.!?]+", text) if s.strip()]
    return {"caption_n_chars": len(text), "caption_n_words": len(text.split()), "caption_n_sentences": len(sentences)}


def semseg_statistics(classes: np.ndarray, names: tuple[str, ...] = COCO_PANOPTIC_CLASSES) -> dict[str, float | int]:
    labeled = classes[classes != 255]
    if labeled.size == 0:
        return {"semantic_diversity": 0}
    is_thing = np.zeros(256, bool)
    is_thing[[i for i in range(len(names)) if i not in COCO_PANOPTIC_STUFF_IDS]] = True
    walkable = np.zeros(256, bool)
    walkable[[i for i, n in enumerate(names) if n in WALKABLE_CLASSES]] = True
    return {
        "walkability": round(float(walkable[labeled].mean()), 4),
        "objectness": round(float(is_thing[labeled].mean()), 4),
        "semantic_diversity": int(len(np.unique(labeled))),
    }


def geometric_complexity(normal_rgb: np.ndarray) -> float:
    n = normal_rgb.reshape(-1, 3).astype(np.float64) / 255.0 * 2.0 - 1.0
    norms = np.linalg.norm(n, axis=1, keepdims=True)
    n = n[norms[:, 0] > 1e-6] / norms[norms[:, 0] > 1e-6]
    if len(n) == 0:
        return 0.0
    return round(float(1.0 - np.linalg.norm(n.mean(axis=0))), 4)


# occlusion_score (4M-21 metadata field 18, binned by ml-4m's MetadataTransform over 0..0.25 in 50 bins).
# Definition: the fraction of the image's pixels that are occlusion edges, i.e. whose depth discontinuity is above
# a fixed threshold. ml-4m fixes only the field's id and binning; the definition is 4M-21's (arXiv 2406.09406,
# appendix on metadata), as issue 12 quotes it, not checked against the paper's text here. Occlusion edges are
# Taskonomy's / Omnidata's edge_occlusion: the Sobel gradient magnitude of the depth map
# (EPFL-VILAB/omnidata, omnidata_annotator/scripts/create_edge_3d_images.py, which stores it unthresholded).
# Constants that no source gives, chosen here:
# - the gradient is taken on the depth label as stored (relative, min-max scaled per image, 0..1), not on
#   Omnidata's sqrt of metric z-buffer depth: a min-max scaled map has 0 at its nearest pixel, where a square
#   root's slope is unbounded;
# - a map whose shorter side exceeds OCCLUSION_SIZE is first shrunk to it (area interpolation), so the score
#   does not depend on the storage size: an edge is about 2 pixels wide at any resolution, and its share of the
#   pixels would otherwise fall as the image grows (smaller maps are used as they are);
# - OCCLUSION_EDGE_THRESHOLD: a pixel is an occlusion edge when the depth changes by more than this fraction of
#   the image's depth range per pixel (Sobel / 8, the slope estimate); a depth step of height s gives s / 2 on
#   the two pixels beside it, so steps of more than 6% of the depth range count, while a plane slanting across
#   the whole depth range in fewer than ~33 pixels (a grazing floor or wall) would count as well.
OCCLUSION_SIZE = 256
OCCLUSION_EDGE_THRESHOLD = 0.03


def occlusion_edges(depth: np.ndarray) -> np.ndarray:
    """(h, w) bool occlusion-edge map of an (H, W) uint16 relative depth label (0..65535), at the working size
    (shorter side at most OCCLUSION_SIZE)."""
    import cv2

    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise ValueError(f"depth must be an (H, W) uint16 map, got {depth.dtype} {depth.shape}")
    d = depth.astype(np.float32) / 65535.0
    h, w = d.shape
    scale = OCCLUSION_SIZE / min(h, w)
    if scale < 1:
        d = cv2.resize(d, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) / 8.0
    return np.hypot(gx, gy) > OCCLUSION_EDGE_THRESHOLD


def occlusion_score(depth: np.ndarray) -> float:
    """The fraction of pixels on occlusion edges (`occlusion_edges`), 0..1; 0 for a flat or smooth depth map."""
    return round(float(occlusion_edges(depth).mean()), 4)


def teacher_score(name: str, value: Any) -> float:
    """A teacher's score label (a JSON number) as a metadata field; anything else is a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{name} label {value!r} is not a finite number: relabel {name}")
    return round(float(value), 4)

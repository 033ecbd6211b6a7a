"""semseg_coco: Mask2Former Swin-B (COCO panoptic) class maps through transformers."""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.labelers._coco_panoptic import (
    COCO_PANOPTIC_CATEGORIES,
    COCO_PANOPTIC_CLASSES,
    COCO_PANOPTIC_STUFF_IDS,
    NUM_COCO_PANOPTIC_CLASSES,
)
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, autocast_for, check_image, require, short_error
from omniforge.labelers.base import PROFILE_4M21, LabelerOptions, Profile, Sample, option

HUB_ID = "facebook/mask2former-swin-base-coco-panoptic"
# Mask2Former's own COCO evaluation size (its configs' INPUT.MIN_SIZE_TEST and MAX_SIZE_TEST); the hub checkpoints'
# image processors resize to 384 x 384 instead
MASK2FORMER_TEST_SIZE = (800, 1333)
RESIZE_OPTIONS = ("shortest_edge", "longest_edge")  # in the fingerprint only when set (they came after release 1fda641)
NONE = 255  # pixels in no segment
INFERENCES = ("panoptic", "semantic")
_TRANSFORMERS = ("transformers", "transformers>=4.40")


def _tiny_model_and_processor() -> tuple[Any, Any]:
    """weights="tiny": Mask2Former with a one-block-per-stage Swin (embed_dim 16), a one-layer pixel decoder,
    two decoder layers, 10 queries, the 133 COCO panoptic classes, and a processor at shortest edge 256."""
    transformers = require(*_TRANSFORMERS)
    swin = transformers.SwinConfig(image_size=224, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                   window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=64, num_queries=10,
        id2label=dict(enumerate(COCO_PANOPTIC_CLASSES)),
        label2id={name: i for i, name in enumerate(COCO_PANOPTIC_CLASSES)})
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    processor = transformers.Mask2FormerImageProcessor(
        size={"shortest_edge": 256, "longest_edge": 512}, size_divisor=32, ignore_index=NONE, do_reduce_labels=False)
    return model, processor


@functools.lru_cache(maxsize=1)
def palette() -> list[int]:
    """The fixed 768-entry palette of semseg_coco PNGs: class i gets the COCO panoptic API colour of class i;
    unused indices and 255 (none) are black."""
    flat = [0] * (256 * 3)
    for i, (_, _, _, rgb) in enumerate(COCO_PANOPTIC_CATEGORIES):
        flat[3 * i:3 * i + 3] = rgb
    return flat


def class_map_image(class_map: np.ndarray) -> Any:
    """(H, W) uint8 class ids -> a P-mode PIL image with the semseg_coco palette."""
    from PIL import Image

    class_map = np.ascontiguousarray(class_map, dtype=np.uint8)
    image = Image.frombytes("P", (class_map.shape[1], class_map.shape[0]), class_map.tobytes())
    image.putpalette(palette())
    return image


def panoptic_to_class_map(segmentation: Any, segments_info: list[dict[str, Any]]) -> np.ndarray:
    """A transformers panoptic result (segment ids, 0 or -1 where no segment) -> (H, W) uint8 class ids, 255
    where no segment."""
    seg = np.asarray(segmentation.cpu(), dtype=np.int64)
    lut = np.full(max([s["id"] for s in segments_info], default=0) + 2, NONE, dtype=np.uint8)
    for s in segments_info:
        lut[s["id"] + 1] = s["label_id"]
    return lut[np.clip(seg, -1, None) + 1]


@dataclass(frozen=True, kw_only=True)
class SemsegCocoOptions(LabelerOptions):
    hub_id: str = option(HUB_ID, "the Mask2Former checkpoint (133 COCO panoptic classes) loaded by --weights "
                                 "pretrained")
    # defaults: Mask2Former's own COCO panoptic inference settings (TEST.OBJECT_MASK_THRESHOLD, TEST.OVERLAP_THRESHOLD)
    threshold: float = option(0.8, "panoptic: keep queries whose class score exceeds this", ge=0.0, le=1.0)
    mask_threshold: float = option(0.5, "panoptic: binarize the query masks at this", ge=0.0, le=1.0)
    overlap_mask_area_threshold: float = option(0.8, "panoptic: keep a query's segment when it wins more than this "
                                                     "fraction of its mask", ge=0.0, le=1.0)
    inference: str = option("panoptic", "panoptic (the semantic map of the panoptic prediction, as 4M-21) or "
                                        "semantic (argmax of the query-weighted masks: no pixel left as none)",
                            choices=INFERENCES)
    shortest_edge: int | None = option(None, "resize the shorter side to this, aspect kept, the longer side at most "
                                             "longest_edge (Mask2Former's own COCO test size: 800, with 1333); null = "
                                             "the checkpoint's image processor's size (facebook/mask2former-*: "
                                             "384 x 384, aspect not kept)", ge=32)
    longest_edge: int | None = option(None, "with shortest_edge: the most the longer side may be", ge=32)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.shortest_edge is None) != (self.longest_edge is None):
            raise ConfigError(f"options shortest_edge={self.shortest_edge}, longest_edge={self.longest_edge} are not "
                              f"valid: give both (e.g. 800 and 1333) or neither")
        if self.shortest_edge is not None and self.longest_edge < self.shortest_edge:
            raise ConfigError(f"options shortest_edge={self.shortest_edge}, longest_edge={self.longest_edge} are not "
                              f"valid: need longest_edge >= shortest_edge")

    def processor_size(self) -> dict[str, int] | None:
        """The `size` the image processor runs with, or None for the checkpoint processor's own."""
        if self.shortest_edge is None:
            return None
        return {"shortest_edge": self.shortest_edge, "longest_edge": self.longest_edge}


@register_labeler
class SemsegCocoLabeler(TorchLabeler):
    """semseg_coco: per-pixel COCO panoptic classes from Mask2Former Swin-B, 4M-21's semseg_coco teacher.

    Output: semseg_coco, a P-mode PIL image of the Sample.image's H x W (pixel-aligned with rgb): uint8 class
    ids 0..132 indexing the 133 COCO panoptic classes (80 things, then 53 stuff, the contiguous order of
    `omniforge.labelers._coco_panoptic.COCO_PANOPTIC_CLASSES` and of the checkpoint's id2label), 255 = none;
    the palette is fixed (class i -> the COCO panoptic API colour of class i, 255 -> black).

    How: the whole image goes through the checkpoint's own image processor (resized to the processor's own size,
    which for the facebook/mask2former-* hub checkpoints is 384 x 384 with the aspect not kept, or, with the
    options shortest_edge and longest_edge, the shorter side to shortest_edge and the longer at most longest_edge,
    aspect kept, as Mask2Former's own evaluation at 800 / 1333; rounded up to a multiple of 32; no padding, each
    image is run at its own size and images of the same processed size are batched) and the model; then, with
    inference="panoptic" (default), the processor's `post_process_panoptic_segmentation` (Mask2Former's panoptic
    inference: queries whose class score > `threshold`, masks binarized at `mask_threshold`, a query's segment
    kept when it wins more than `overlap_mask_area_threshold` of its mask, stuff classes fused) at target size
    (H, W), and every pixel takes the class of its segment; pixels in no segment are 255. This is the semantic map
    of the panoptic prediction, as 4M-21 used. inference="semantic" uses `post_process_semantic_segmentation`
    instead (argmax over classes of the query-weighted masks): every pixel gets a class, never 255.
    An image with no segment gives an all-255 map (a valid answer, not an error).

    Weights: "pretrained" loads `hub_id` (default "facebook/mask2former-swin-base-coco-panoptic") with
    `Mask2FormerForUniversalSegmentation` and `AutoImageProcessor`; a path loads a local `save_pretrained`
    folder (config.json, model weights and preprocessor_config.json); "tiny" builds Mask2Former with a
    tiny Swin backbone, the 133 COCO panoptic classes and a 256-pixel processor, random weights seeded
    identically in every process (its scores stay near 1/134: pass threshold=0, mask_threshold=0,
    overlap_mask_area_threshold=0 to see segments). A checkpoint without 133 classes is refused.

    Options (`SemsegCocoOptions`, part of the fingerprint): hub_id, threshold (0.8), mask_threshold (0.5),
    overlap_mask_area_threshold (0.8), inference ("panoptic" | "semantic"), shortest_edge and longest_edge (unset:
    the processor's size; in the fingerprint only when set).
    """

    name = "semseg_coco"
    modalities = default_for = ("semseg_coco",)
    learned = True
    options_class = SemsegCocoOptions
    options: SemsegCocoOptions
    profiles = {PROFILE_4M21: Profile(
        reference="Mask2Former Swin-B, COCO panoptic (facebook/mask2former-swin-base-coco-panoptic, the model zoo "
                  "checkpoint) at Mask2Former's own test size, shorter side 800 (longer <= 1333), not the hub "
                  "processor's 384 x 384: the semantic map of its panoptic prediction",
        options={"hub_id": HUB_ID, "inference": "panoptic", "threshold": 0.8, "mask_threshold": 0.5,
                 "overlap_mask_area_threshold": 0.8, "shortest_edge": MASK2FORMER_TEST_SIZE[0],
                 "longest_edge": MASK2FORMER_TEST_SIZE[1]})}
    checkpoint_is_dir = True

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        """Every option (a learned teacher), but the resize options only when set: fingerprints of corpora labeled
        before they existed stay."""
        values = super().identity_options(options, weights=weights, given=given)
        return {k: v for k, v in values.items() if not (k in RESIZE_OPTIONS and v is None)}
    checkpoint_format = "mask2former-swin-base-coco-panoptic/ (a save_pretrained folder)"

    @property
    def processor(self) -> Any:
        return self.transform

    @property
    def _size_kwargs(self) -> dict[str, Any]:
        size = self.options.processor_size()
        return {} if size is None else {"size": size}

    # -- building ------------------------------------------------------------------------------------------

    def _check_model(self, model: Any, source: str) -> Any:
        n = model.config.num_labels
        if n != NUM_COCO_PANOPTIC_CLASSES:
            raise WeightsError(f"semseg_coco: {source} predicts {n} classes; semseg_coco needs a checkpoint of "
                               f"the {NUM_COCO_PANOPTIC_CLASSES} COCO panoptic classes (like {HUB_ID})")
        return model

    def _from_pretrained(self, source: str, **kwargs: Any) -> tuple[Any, Callable]:
        transformers = require(*_TRANSFORMERS)
        model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(source, **kwargs)
        processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
        return self._check_model(model, source), processor

    def build_pretrained(self) -> tuple[Any, Callable]:
        return self._from_pretrained(self.options.hub_id)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        return self._from_pretrained(path, local_files_only=True)

    def build_tiny(self) -> tuple[Any, Callable]:
        return _tiny_model_and_processor()

    # -- labeling ------------------------------------------------------------------------------------------

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out: list[dict[str, Any] | SampleError | None] = [None] * len(samples)
        groups: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        for i, sample in enumerate(samples):
            err = check_image(sample)
            if err is not None:
                out[i] = err
                continue
            try:
                # channels_last stated explicitly: a 1 x W or 3 x W image is ambiguous to the processor
                pixels = self.processor(images=[np.ascontiguousarray(sample.image)], return_tensors="pt",
                                        input_data_format="channels_last", **self._size_kwargs)["pixel_values"]
            except Exception as e:  # noqa: BLE001 - one image the processor refuses fails that sample only
                out[i] = SampleError("bad_image", f"semseg_coco: the image processor refused the image: "
                                                  f"{short_error(e)}")
                continue
            groups.setdefault(tuple(pixels.shape[-2:]), []).append((i, pixels))
        for rows in groups.values():
            x = torch.cat([p for _, p in rows]).to(self.torch_device)
            with torch.inference_mode():
                with autocast_for(self.torch_device):
                    outputs = self.model(pixel_values=x)
                outputs = types.SimpleNamespace(class_queries_logits=outputs.class_queries_logits.float(),
                                                masks_queries_logits=outputs.masks_queries_logits.float())
                sizes = [samples[i].image.shape[:2] for i, _ in rows]
                for (i, _), class_map in zip(rows, self._class_maps(outputs, sizes)):
                    out[i] = {"semseg_coco": class_map_image(class_map)}
        return out  # type: ignore[return-value]

    def _class_maps(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        o = self.options
        if o.inference == "semantic":
            maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            return [m.cpu().numpy().astype(np.uint8) for m in maps]
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=o.threshold, mask_threshold=o.mask_threshold,
            overlap_mask_area_threshold=o.overlap_mask_area_threshold,
            label_ids_to_fuse=set(COCO_PANOPTIC_STUFF_IDS), target_sizes=sizes)
        return [panoptic_to_class_map(r["segmentation"], r["segments_info"]) for r in results]

"""SAM (segment-anything) automatic instance masks, and the edge map derived from them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, cast

import numpy as np

from omniforge.errors import SampleError, WeightsError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, check_image, require
from omniforge.labelers.base import PROFILE_4M21, TINY, LabelerOptions, Profile, Sample, option
from omniforge.labelers.classical import _ClassicalLabeler

PIP_NAME = "segment-anything"
CHECKPOINT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
CHECKPOINT_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                    "vit_b": "sam_vit_b_01ec64.pth"}
MODEL_TYPES = tuple(CHECKPOINT_FILES)
DEFAULT_MODEL_TYPE = "vit_h"


@dataclass(frozen=True)
class SamArch:
    """The sizes of a SAM network; everything else is fixed by segment_anything's `_build_sam`."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256


# The official sizes (segment_anything.build_sam), used to recognize a checkpoint's model type.
OFFICIAL_ARCHS = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11)),
}
# weights="tiny": the same Sam / ImageEncoderViT / MaskDecoder classes at a very small size. The mask decoder
# shrinks too (its official 256-wide transformer over 64 x 64 image tokens per prompt dominates CPU time).
TINY_ARCH = SamArch(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                    prompt_embed_dim=32, decoder_depth=2, decoder_mlp_dim=64, iou_head_hidden_dim=32)
DECODER_NUM_HEADS = 8  # official value; a state dict cannot record it
IMAGE_SIZE, PATCH_SIZE, WINDOW_SIZE = 1024, 16, 14

# Generator options: official SamAutomaticMaskGenerator defaults, and the tiny variant's defaults. A random
# model's predicted IoU is ~0.15 and its stability score 0 (its logits are tiny), so the official thresholds
# would keep nothing: tiny keeps every mask (thresholds 0) and uses a 4 x 4 point grid to stay fast on CPU.
DEFAULTS = dict(points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95, crop_n_layers=0,
                min_mask_region_area=0, points_per_batch=64)
TINY_DEFAULTS = dict(DEFAULTS, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def _default_text(key: str) -> str:
    tiny = f", {TINY_DEFAULTS[key]} with --weights tiny" if TINY_DEFAULTS[key] != DEFAULTS[key] else ""
    return f"null = {DEFAULTS[key]}{tiny}"


@dataclass(frozen=True, kw_only=True)
class SamInstanceOptions(LabelerOptions):
    """SamAutomaticMaskGenerator's options. An unset (null) generator option takes its default for the weights
    kind (`generator_options`): the official one, or the tiny variant's (`TINY_DEFAULTS`)."""

    model_type: str = option(DEFAULT_MODEL_TYPE, "the SAM size: its official checkpoint for --weights pretrained, the "
                                                 "size a local checkpoint must have", choices=MODEL_TYPES)
    points_per_side: int | None = option(None, f"point grid per image side ({_default_text('points_per_side')})",
                                         ge=1)
    pred_iou_thresh: float | None = option(None, f"keep masks whose predicted IoU is at least this "
                                                 f"({_default_text('pred_iou_thresh')})", ge=0.0, le=1.0)
    stability_score_thresh: float | None = option(None, f"keep masks whose stability score is at least this "
                                                        f"({_default_text('stability_score_thresh')})", ge=0.0, le=1.0)
    crop_n_layers: int | None = option(None, f"layers of image crops also run ({_default_text('crop_n_layers')})",
                                       ge=0)
    min_mask_region_area: int | None = option(None, f"remove mask holes and islands smaller than this many pixels "
                                                    f"({_default_text('min_mask_region_area')})", ge=0)
    points_per_batch: int | None = option(None, f"prompt points per decoder batch "
                                                f"({_default_text('points_per_batch')})", ge=1)

    def generator_options(self, weights: str) -> dict[str, Any]:
        """The SamAutomaticMaskGenerator keywords: the options set, the weights kind's defaults for the rest."""
        defaults = TINY_DEFAULTS if weights == TINY else DEFAULTS
        return {k: default if getattr(self, k) is None else getattr(self, k) for k, default in defaults.items()}


def arch_from_state_dict(state: dict[str, Any]) -> SamArch:
    """Read a SAM network's sizes from the tensor shapes of its state dict."""
    try:
        embed_dim = int(state["image_encoder.patch_embed.proj.weight"].shape[0])
        blocks = sorted(int(m.group(1)) for k in state
                        if (m := re.fullmatch(r"image_encoder\.blocks\.(\d+)\.norm1\.weight", k)))
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_size = 2 * (IMAGE_SIZE // PATCH_SIZE) - 1  # windowed blocks have 2 * 14 - 1 relative positions
        global_idx = tuple(i for i in blocks
                           if state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == global_size)
        layers = [k for k in state if re.fullmatch(r"mask_decoder\.transformer\.layers\.\d+\.norm1\.weight", k)]
        return SamArch(
            encoder_embed_dim=embed_dim, encoder_depth=len(blocks), encoder_num_heads=embed_dim // head_dim,
            encoder_global_attn_indexes=global_idx,
            prompt_embed_dim=int(state["mask_decoder.iou_token.weight"].shape[1]), decoder_depth=len(layers),
            decoder_mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
            iou_head_hidden_dim=int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]))
    except (KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise WeightsError(f"sam_instance: not a segment_anything SAM state dict (missing or malformed {e}); pass "
                           f"the official sam_vit_*.pth file, or --weights tiny") from None


def build_sam(arch: SamArch) -> Any:
    """A segment_anything `Sam` at the given sizes, assembled exactly as `build_sam._build_sam` does."""
    import functools

    import torch

    require("segment_anything", PIP_NAME)
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = IMAGE_SIZE // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth, embed_dim=arch.encoder_embed_dim, img_size=IMAGE_SIZE, mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.encoder_num_heads,
            patch_size=PATCH_SIZE, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes, window_size=WINDOW_SIZE,
            out_chans=arch.prompt_embed_dim),
        prompt_encoder=PromptEncoder(embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                                          mlp_dim=arch.decoder_mlp_dim, num_heads=DECODER_NUM_HEADS),
            transformer_dim=arch.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=arch.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _smooth_random_init(sam: Any) -> None:
    """Make a random SAM segment by colour instead of pixel noise (tiny only).

    Random patch-embedding kernels respond to texture, and random 2x2 transposed-conv kernels add a
    checkerboard, so a random SAM's masks are salt and pepper: their RLEs are huge and slow to build. Tying
    each kernel across its spatial positions (the patch's mean colour; nearest-neighbour upsampling) gives
    blob-shaped masks that follow the image, still from random weights.
    """
    import torch

    with torch.no_grad():
        convs = [sam.image_encoder.patch_embed.proj,
                 *(m for m in sam.mask_decoder.output_upscaling if isinstance(m, torch.nn.ConvTranspose2d))]
        for conv in convs:
            w = conv.weight
            w.copy_(w.mean(dim=(2, 3), keepdim=True).expand_as(w) * (w.shape[2] * w.shape[3]) ** 0.5)


def _xywh_to_xyxy(box: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


@register_labeler
class SamInstanceLabeler(TorchLabeler):
    """sam_instance: SAM automatic instance masks (segment-anything `SamAutomaticMaskGenerator`), as 4M-21.

    Input: the whole Sample.image (SAM resizes its longest side to 1024 internally); masks come back at the
    image's H x W. Runs in float32.

    Output: sam_instance, JSON
        {"instances": [{"segmentation": {"size": [H, W], "counts": "<COCO compressed RLE string>"},
                        "bbox": [xmin, ymin, xmax, ymax],
                        "score": <SAM predicted IoU>, "stability_score": <float>, "area": <int pixels>}, ...],
         "image_size": [H, W]}
    Instances are sorted by score, highest first. `bbox` is XYXY in pixels of the Sample.image: the column /
    row index of the mask's first and last pixel (inclusive; SAM's own XYWH box converted to XYXY). Decode a
    mask with `pycocotools.mask.decode(segmentation)` -> (H, W) uint8. No mask passing the thresholds is a
    valid, empty result ({"instances": [], "image_size": [H, W]}).

    Options (`SamInstanceOptions`, SamAutomaticMaskGenerator's): model_type ("vit_h" default, "vit_l",
    "vit_b"), points_per_side (32), pred_iou_thresh (0.88), stability_score_thresh (0.95), crop_n_layers (0),
    min_mask_region_area (0), points_per_batch (64). With weights="tiny", unset options default to
    points_per_side=4 and both thresholds 0, since a random model's scores never pass the official thresholds.

    Weights: "pretrained" downloads the official checkpoint for model_type
    (https://dl.fbaipublicfiles.com/segment_anything/sam_vit_{h_4b8939,l_0b3195,b_01ec64}.pth) through
    torch.hub into $TORCH_HOME/hub/checkpoints; a path loads such an official `.pth` state dict into
    `sam_model_registry[model_type]` (a checkpoint of another official size is a WeightsError naming its
    model_type; one at a non-standard size is built at the size its tensors say); "tiny" builds the same
    Sam classes at a very small size (32-wide 2-block encoder, 32-wide decoder) with seeded random weights,
    its patch-embedding and upsampling kernels tied across positions so masks are colour blobs, not noise.
    """

    name = "sam_instance"
    modalities = default_for = ("sam_instance",)
    learned = True
    options_class = SamInstanceOptions
    options: SamInstanceOptions
    checkpoint_format = "sam_vit_h_4b8939.pth"
    # the generator options stay unset: SamAutomaticMaskGenerator's own defaults for real weights (DEFAULTS), the
    # tiny variant's for --weights tiny (whose scores never pass the official thresholds)
    profiles = {PROFILE_4M21: Profile(
        reference="SAM ViT-H (sam_vit_h_4b8939.pth), segment-anything's automatic mask generator with its defaults: "
                  "32 x 32 point grid, predicted IoU >= 0.88, stability >= 0.95, no crops",
        options={"model_type": "vit_h"})}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        from segment_anything import SamAutomaticMaskGenerator

        self.generator = SamAutomaticMaskGenerator(self.model, output_mode="coco_rle",
                                                   **self.options.generator_options(self.weights))

    @property
    def model_type(self) -> str:
        return self.options.model_type

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        """Every generator option as it applies to these weights (an unset one by its default), and model_type."""
        sam = cast(SamInstanceOptions, options)
        return {"model_type": sam.model_type, **sam.generator_options(weights)}

    # -- building ------------------------------------------------------------------------------------------

    def _official(self, state: dict[str, Any]) -> Any:
        require("segment_anything", PIP_NAME)
        from segment_anything import sam_model_registry

        model = sam_model_registry[self.model_type](checkpoint=None)
        model.load_state_dict(state)
        return model

    def build_pretrained(self) -> tuple[Any, Callable | None]:
        import torch

        require("segment_anything", PIP_NAME)
        url = CHECKPOINT_BASE_URL + CHECKPOINT_FILES[self.model_type]
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, check_hash=False,
                                                   file_name=CHECKPOINT_FILES[self.model_type])
        return self._official(state), None

    def build_from_file(self, path: str) -> tuple[Any, Callable | None]:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise WeightsError(f"sam_instance: {path} holds a {type(state).__name__}, not a SAM state dict")
        arch = arch_from_state_dict(state)
        if arch == OFFICIAL_ARCHS[self.model_type]:
            return self._official(state), None
        other = [t for t, a in OFFICIAL_ARCHS.items() if a == arch]
        if other:
            raise WeightsError(f"sam_instance: {path} is a SAM {other[0]} checkpoint but model_type is "
                               f"{self.model_type!r}: pass model_type={other[0]!r}")
        model = build_sam(arch)  # a non-standard size (e.g. a distilled or test model): built as its tensors say
        model.load_state_dict(state)
        return model, None

    def build_tiny(self) -> tuple[Any, Callable | None]:
        model = build_sam(TINY_ARCH)  # seeded by TorchLabeler._load
        _smooth_random_init(model)
        return model, None

    # -- labeling ------------------------------------------------------------------------------------------

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out: list[dict[str, Any] | SampleError] = []
        for sample in samples:
            err = check_image(sample)
            if err is not None:
                out.append(err)
                continue
            with torch.inference_mode():
                records = self.generator.generate(np.ascontiguousarray(sample.image))
            out.append({"sam_instance": self._to_json(records, sample.image.shape[:2])})
        return out

    @staticmethod
    def _to_json(records: list[dict[str, Any]], size: tuple[int, int]) -> dict[str, Any]:
        instances = []
        for r in records:
            seg = r["segmentation"]
            counts = seg["counts"]
            instances.append({
                "segmentation": {"size": [int(seg["size"][0]), int(seg["size"][1])],
                                 "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)},
                "bbox": _xywh_to_xyxy(r["bbox"]),
                "score": float(r["predicted_iou"]),
                "stability_score": float(r["stability_score"]),
                "area": int(r["area"]),
            })
        instances = [i for i in instances if np.isfinite([i["score"], i["stability_score"]]).all()]
        instances.sort(key=lambda i: -i["score"])
        return {"instances": instances, "image_size": [int(size[0]), int(size[1])]}


def instance_boundaries(instances: list[dict[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8: 255 on the boundary pixels of any instance mask, 0 elsewhere.

    A boundary pixel belongs to a mask and has a 4-neighbour outside it; the image border is not a boundary
    (a mask touching it is closed by the border, not outlined along it).
    """
    from pycocotools import mask as mask_utils

    h, w = size
    edges = np.zeros((h, w), dtype=bool)
    for inst in instances:
        seg = inst["segmentation"]
        if [int(v) for v in seg["size"]] != [h, w]:
            raise SampleError("bad_input", f"sam_instance mask of size {seg['size']} on a {h}x{w} image")
        counts = seg["counts"]
        m = mask_utils.decode({"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts})
        m = m.astype(bool)
        p = np.pad(m, 1, mode="edge")
        inside_all = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        edges |= m & ~inside_all
    return edges.astype(np.uint8) * 255


@register_labeler
class SamEdgeLabeler(_ClassicalLabeler):
    """sam_edge: the boundaries of the sam_instance masks, as 4M-21's SAM edges.

    Input: Sample.inputs["sam_instance"] (the decoded sam_instance JSON). Output: (H, W) uint8 at the rgb
    image's size, 255 on any instance's boundary (a mask pixel with a 4-neighbour outside that mask), 0
    elsewhere; the image border itself is not an edge. No instances gives an all-zero image.
    """

    name = "sam_edge"
    modalities = default_for = ("sam_edge",)
    learned = False
    requires = ("sam_instance",)
    profiles = {PROFILE_4M21: Profile(reference="SAM edges: the boundaries of the SAM ViT-H instance masks")}

    def label_one(self, sample: Sample) -> np.ndarray:
        h, w = sample.image.shape[:2]
        data = sample.inputs.get("sam_instance")
        if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
            raise SampleError("missing_input", "sam_edge needs the sam_instance JSON of this sample")
        try:
            return instance_boundaries(data["instances"], (h, w))
        except SampleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise SampleError("bad_input", f"malformed sam_instance JSON: {type(e).__name__}: {e}") from None


__all__ = ["OFFICIAL_ARCHS", "SamArch", "SamEdgeLabeler", "SamInstanceLabeler", "SamInstanceOptions", "TINY_ARCH",
           "arch_from_state_dict", "build_sam", "instance_boundaries"]

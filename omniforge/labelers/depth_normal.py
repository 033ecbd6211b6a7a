"""Two depth teachers (Depth Anything V2 through transformers, the default; Omnidata DPT-Hybrid v2, the 4M-21
reference, chosen with `--teacher depth=omnidata`) and surface normals (Omnidata DPT-Hybrid v2, the 4M-21
reference teacher)."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from omniforge.errors import SampleError, WeightsError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, autocast_for, check_image, require, to_pil
from omniforge.labelers.base import PROFILE_4M21, TINY, LabelerOptions, Profile, Sample, option

# the names of the two depth models in their fingerprints (see _depth_identity_options)
DEPTH_ANYTHING = "depth_anything_v2"
OMNIDATA = "omnidata_dpt_hybrid"
DEFAULT_HUB_ID = "depth-anything/Depth-Anything-V2-Base-hf"
DEPTH_ANYTHING_HUB_IDS = ("depth-anything/Depth-Anything-V2-Small-hf", DEFAULT_HUB_ID,
                          "depth-anything/Depth-Anything-V2-Large-hf")
# The publisher's v2 checkpoints (EPFL-VILAB/omnidata, tools/download_*_models.sh), cached under TORCH_HOME
OMNIDATA_URLS = {
    "depth": "https://zenodo.org/records/10447888/files/omnidata_dpt_depth_v2.ckpt",
    "normal": "https://zenodo.org/records/10447888/files/omnidata_dpt_normal_v2.ckpt",
}
OMNIDATA_SIZE = 384  # Omnidata's training and demo resolution
DISPARITY_EPS = 0.01  # depth = 1 / (disparity + DISPARITY_EPS * max disparity)
TINY_DA_SIZE = 126  # 9 x 9 patches of 14


def _check_finite(name: str, arr: np.ndarray) -> SampleError | None:
    if not np.isfinite(arr).all():
        return SampleError("teacher_error", f"{name}: non-finite prediction")
    return None


def to_uint16(depth: np.ndarray) -> np.ndarray:
    """Per-image min-max of a (H, W) float map to 0..65535 (all zeros when the map is constant)."""
    lo, hi = float(depth.min()), float(depth.max())
    if not hi > lo:
        return np.zeros(depth.shape, np.uint16)
    return np.round((depth - lo) / (hi - lo) * 65535.0).astype(np.uint16)


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """Depth Anything's relative inverse depth -> relative depth: 1 / (max(d, 0) + 0.01 * max(d)).

    Scale-free (multiplying the disparity by a constant scales the depth, which the min-max removes); the
    epsilon caps the farthest points (sky, disparity ~0) at 100x the depth of the nearest one.
    """
    d = np.maximum(disparity.astype(np.float64), 0.0)
    top = float(d.max())
    if not top > 0:
        return np.zeros(d.shape, np.float64)
    return 1.0 / (d + DISPARITY_EPS * top)


def _omnidata_transform(normalize: bool) -> Callable:
    """PIL -> (3, 384, 384) float tensor: the whole image resized (bilinear, aspect not kept), in [0, 1]
    (normals) or normalized to [-1, 1] (depth), as Omnidata's demo prepares its inputs."""
    from torchvision import transforms as T

    steps = [T.Resize((OMNIDATA_SIZE, OMNIDATA_SIZE), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor()]
    if normalize:
        steps.append(T.Normalize(mean=[0.5] * 3, std=[0.5] * 3))
    return T.Compose(steps)


class _OmnidataMixin:
    """Building the Omnidata DPT-Hybrid v2 (publisher's Lightning `.ckpt`, or tiny) with an n-channel head."""

    name: ClassVar[str]
    omnidata_task: ClassVar[str]  # "depth" | "normal"
    omnidata_channels: ClassVar[int]

    def _omnidata_from_checkpoint(self, checkpoint: Any) -> Any:
        from omniforge.labelers._dpt import build_dpt, convert_omnidata_state_dict

        try:
            state = convert_omnidata_state_dict(checkpoint)
        except ValueError as e:
            raise WeightsError(f"{self.name}: not an Omnidata DPT-Hybrid checkpoint: {e}") from e
        model = build_dpt(channels=self.omnidata_channels, tiny=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"{self.name}: the checkpoint does not match Omnidata's DPT-Hybrid "
                               f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                               f"e.g. {unexpected[:3]}); pass omnidata_dpt_{self.omnidata_task}_v2.ckpt")
        return model

    def build_pretrained(self) -> tuple[Any, Callable]:
        import torch

        url = OMNIDATA_URLS[self.omnidata_task]
        checkpoint = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True,
                                                        file_name=url.rsplit("/", 1)[1])
        return self._omnidata_from_checkpoint(checkpoint), _omnidata_transform(self.omnidata_task == "depth")

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return self._omnidata_from_checkpoint(checkpoint), _omnidata_transform(self.omnidata_task == "depth")

    def build_tiny(self) -> tuple[Any, Callable]:
        from omniforge.labelers._dpt import build_dpt

        return build_dpt(channels=self.omnidata_channels, tiny=True), _omnidata_transform(self.omnidata_task == "depth")

    def _omnidata_predict(self, samples: list[Sample]) -> list[Any]:
        """Per sample: SampleError, or the (C, H, W) prediction clamped to [0, 1] at the image's size."""
        import torch
        import torch.nn.functional as F

        out, batch, rows = self.preprocess(samples)
        if not batch:
            return out
        x = torch.stack(batch).to(self.torch_device)  # type: ignore[attr-defined]  # (B, 3, 384, 384)
        with torch.inference_mode(), autocast_for(self.torch_device):  # type: ignore[attr-defined]
            pred = self.model(x).float().clamp(0, 1)  # type: ignore[attr-defined]  # (B, C, 384, 384)
            mode = "bicubic" if pred.shape[1] == 1 else "bilinear"  # depth as Omnidata's demo; normals bilinear
            for j, i in enumerate(rows):
                size = samples[i].image.shape[:2]
                out[i] = F.interpolate(pred[j:j + 1], size=size, mode=mode, align_corners=False)[0].clamp(0, 1) \
                    .cpu().numpy()  # (C, H, W)
        return out


def _depth_identity_options(model: str, options: LabelerOptions) -> dict[str, Any]:
    """The depth teachers' fingerprint options: before Depth Anything and Omnidata were two teachers, one class
    chose between them with an option `model`. Writing it still keeps every fingerprint of release 1fda641, so
    depth labeled then counts as done now."""
    return {"model": model, **options.to_dict()}


@dataclass(frozen=True, kw_only=True)
class DepthAnythingOptions(LabelerOptions):
    hub_id: str = option(DEFAULT_HUB_ID, "the Depth Anything V2 checkpoint loaded by --weights pretrained: "
                                         + ", ".join(DEPTH_ANYTHING_HUB_IDS))
    removed = {"model": "Depth Anything V2 and Omnidata are two teachers of depth now: drop the option for Depth "
                        "Anything V2 (the default), or pass --teacher depth=omnidata for Omnidata DPT-Hybrid (its "
                        "--weights and --option are keyed omnidata); depth labeled with either model before counts "
                        "as done"}


@register_labeler
class DepthAnythingLabeler(TorchLabeler):
    """depth (the default depth teacher): relative depth from Depth Anything V2, (H, W) uint16, larger = farther.

    Output: depth, (H, W) uint16 at Sample.image's size, LARGER = FARTHER, min-max scaled per image to
    0..65535 (0 = the nearest point, 65535 = the farthest; a constant prediction, e.g. a 1x1 image, gives all
    zeros). Relative: no units, no metric meaning across images.

    transformers `DepthAnythingForDepthEstimation`: the image goes through the model's own
    `AutoImageProcessor` (Base: shorter side ~518, aspect kept, multiple of 14, ImageNet normalization);
    the predicted relative disparity d (larger = nearer) is resized back to H x W with the processor's
    `post_process_depth_estimation` (bicubic), then converted to depth = 1 / (max(d, 0) + 0.01 * max(d))
    (`disparity_to_depth`) and min-max scaled. Weights: "pretrained" = `hub_id`
    ("depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf", default Base); a path = a local
    `save_pretrained` folder (config.json, model.safetensors, preprocessor_config.json); "tiny" = the same
    transformers class with a 4-layer, 32-wide DINOv2 backbone at 126 pixels, random seeded weights.
    Omnidata DPT-Hybrid, the 4M-21 reference, is the other depth teacher (`--teacher depth=omnidata`).
    """

    name = "depth"
    modalities = default_for = ("depth",)
    learned = True
    options_class = DepthAnythingOptions
    options: DepthAnythingOptions
    checkpoint_format = "Depth-Anything-V2-Base-hf (a save_pretrained folder)"
    checkpoint_is_dir = True

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        return _depth_identity_options(DEPTH_ANYTHING, options)

    # -- building ------------------------------------------------------------------------------------------

    def build_pretrained(self) -> tuple[Any, Callable]:
        transformers = require("transformers", "transformers>=4.45")
        processor = transformers.AutoImageProcessor.from_pretrained(self.options.hub_id)
        return transformers.DepthAnythingForDepthEstimation.from_pretrained(self.options.hub_id), processor

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        transformers = require("transformers", "transformers>=4.45")
        processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        model = transformers.DepthAnythingForDepthEstimation.from_pretrained(path, local_files_only=True)
        return model, processor

    def build_tiny(self) -> tuple[Any, Callable]:
        transformers = require("transformers", "transformers>=4.45")
        backbone = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                             intermediate_size=64, patch_size=14, image_size=TINY_DA_SIZE,
                                             out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
        config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                                  neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                                  head_hidden_size=8)
        processor = transformers.DPTImageProcessor(
            size={"height": TINY_DA_SIZE, "width": TINY_DA_SIZE}, keep_aspect_ratio=True, ensure_multiple_of=14,
            resample=3, do_rescale=True, do_normalize=True, image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225])
        return transformers.DepthAnythingForDepthEstimation(config), processor

    # -- labeling ------------------------------------------------------------------------------------------

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        out: list[Any] = [None] * len(samples)
        for i, disparity in self._disparities(samples).items():
            if isinstance(disparity, SampleError):
                out[i] = disparity
                continue
            out[i] = _check_finite(self.name, disparity) or {"depth": to_uint16(disparity_to_depth(disparity))}
        return out

    def _disparities(self, samples: list[Sample]) -> dict[int, Any]:
        """{sample index: (H, W) float32 disparity at the image's size, or SampleError}; one forward per group
        of samples the processor resizes to the same shape."""
        import torch

        result: dict[int, Any] = {}
        groups: dict[tuple[int, ...], list[tuple[int, Any]]] = {}
        for i, sample in enumerate(samples):
            err = check_image(sample)
            if err is not None:
                result[i] = err
                continue
            pixels = self.transform(images=to_pil(sample.image), return_tensors="pt")["pixel_values"]  # (1, 3, h, w)
            groups.setdefault(tuple(pixels.shape), []).append((i, pixels))
        for members in groups.values():
            x = torch.cat([p for _, p in members]).to(self.torch_device)
            with torch.inference_mode(), autocast_for(self.torch_device):
                predicted = self.model(pixel_values=x).predicted_depth.float()  # (B, h, w)
            sizes = [tuple(samples[i].image.shape[:2]) for i, _ in members]
            post = self.transform.post_process_depth_estimation(types.SimpleNamespace(predicted_depth=predicted),
                                                                target_sizes=sizes)
            for (i, _), size, p in zip(members, sizes, post):
                result[i] = p["predicted_depth"].reshape(size).cpu().numpy()  # (H, W); squeeze() drops 1-px sides
        return result


@register_labeler
class OmnidataDepthLabeler(_OmnidataMixin, TorchLabeler):
    """omnidata (a depth teacher, `--teacher depth=omnidata`): Omnidata DPT-Hybrid v2 relative depth, the 4M-21
    reference, (H, W) uint16, larger = farther.

    Output: depth, in the same format as the default depth teacher's (`DepthAnythingLabeler`): (H, W) uint16
    at Sample.image's size, LARGER = FARTHER, min-max scaled per image to 0..65535, relative.

    The image resized (bilinear, aspect not kept) to 384 x 384 and normalized to [-1, 1] as in Omnidata's
    demo; the prediction (larger = farther, clamped to [0, 1]) is resized back to H x W (bicubic) and min-max
    scaled. Weights (`--weights omnidata=...`): "pretrained" = the publisher's omnidata_dpt_depth_v2.ckpt
    (`OMNIDATA_URLS`, via torch.hub, cached under TORCH_HOME); a path = that `.ckpt` file; "tiny" = the same
    DPT over a toy hybrid backbone (see `omniforge.labelers._dpt`).
    """

    name = "omnidata"
    modalities = ("depth",)
    learned = True
    profiles = {PROFILE_4M21: Profile(reference="Omnidata DPT-B-Hybrid v2 depth: the publisher's "
                                                "omnidata_dpt_depth_v2.ckpt at Omnidata's 384 x 384 input")}
    checkpoint_format = "omnidata_dpt_depth_v2.ckpt"
    omnidata_task = "depth"
    omnidata_channels = 1

    @classmethod
    def identity(cls, *, weights: str = TINY, **options: Any) -> dict[str, Any]:
        # the labeler name of release 1fda641, where this was the depth teacher with model=omnidata_dpt_hybrid
        return {**super().identity(weights=weights, **options), "labeler": DepthAnythingLabeler.name}

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        return _depth_identity_options(OMNIDATA, options)

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        return [p if isinstance(p, SampleError) else (_check_finite(self.name, p) or {"depth": to_uint16(p[0])})
                for p in self._omnidata_predict(samples)]


@register_labeler
class NormalLabeler(_OmnidataMixin, TorchLabeler):
    """normal: surface normals in the camera frame, (H, W, 3) uint8 RGB at Sample.image's size, each channel
    round((n + 1) / 2 * 255) with the unit normal's components n clamped to [-1, 1] (Omnidata's convention:
    the model predicts (n + 1) / 2 directly, clamped to [0, 1] here).

    Omnidata DPT-Hybrid v2 (the 4M-21 reference): the image resized (bilinear, aspect not kept) to 384 x 384
    in [0, 1] (Omnidata's normal models take unnormalized RGB); the 3-channel prediction resized back to
    H x W (bilinear). Weights: "pretrained" = the publisher's omnidata_dpt_normal_v2.ckpt (`OMNIDATA_URLS`,
    via torch.hub, cached under TORCH_HOME); a path = that PyTorch Lightning `.ckpt` ({"state_dict":
    {"model.<DPT key>": tensor}}), converted by `omniforge.labelers._dpt.convert_omnidata_state_dict` and
    loaded strictly; "tiny" = the same DPT over a toy timm hybrid backbone, random seeded weights.
    """

    name = "normal"
    modalities = default_for = ("normal",)
    learned = True
    profiles = {PROFILE_4M21: Profile(reference="Omnidata DPT-B-Hybrid v2 surface normals: the publisher's "
                                                "omnidata_dpt_normal_v2.ckpt at Omnidata's 384 x 384 input")}
    checkpoint_format = "omnidata_dpt_normal_v2.ckpt"
    omnidata_task = "normal"
    omnidata_channels = 3

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        out: list[Any] = []
        for p in self._omnidata_predict(samples):
            if isinstance(p, SampleError):
                out.append(p)
                continue
            err = _check_finite(self.name, p)
            out.append(err or {"normal": np.round(p.transpose(1, 2, 0) * 255.0).astype(np.uint8)})
        return out

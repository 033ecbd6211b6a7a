"""ImageBind-H/14 image tower: patch tokens and class token of crop 0, as 4M-21's ImageBind teacher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omniforge.errors import ConfigError, WeightsError
from omniforge.labelers._imagebind import (build_imagebind_vision, imagebind_transform, is_imagebind_state_dict,
                                           is_open_clip_state_dict, load_state_dict)
from omniforge.labelers._open_clip import OpenClipLabeler, pretrained_tag_option
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import PROFILE_4M21, LabelerOptions, Profile, option

ARCH = "ViT-H-14"
DEFAULT_TAG = "laion2b_s32b_b79k"
# weights="tiny": the same open_clip CLIP class with a one-block vision tower. Width 1280, patch 14 and image 224
# stay those of ViT-H/14, so the outputs keep the (16, 16, 1280) and (1280,) contract.
TINY_CFG = dict(
    embed_dim=1024,
    vision_cfg=dict(image_size=224, patch_size=14, width=1280, layers=1, head_width=80),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=1),
)


@dataclass(frozen=True, kw_only=True)
class ImageBindOptions(LabelerOptions):
    model_name: str = option(ARCH, "the open_clip architecture of open_clip weights: one whose tower gives a 16 x 16 "
                                   "grid and width 1280 (an ImageBind checkpoint carries its own)")
    pretrained_tag: str | None = pretrained_tag_option(DEFAULT_TAG)


@register_labeler
class ImageBindLabeler(OpenClipLabeler):
    """imagebind, imagebind_global: ImageBind-H/14 image features at 224, as 4M-21's ImageBind teacher.

    ImageBind's image encoder is OpenCLIP ViT-H/14 (laion2b_s32b_b79k), kept frozen while ImageBind trained
    its other modalities; omniforge runs it as open_clip's VisionTransformer, from either weights format.

    Output: imagebind, (16, 16, 1280) float16: the 256 last-layer patch tokens after the final LayerNorm
    (open_clip's `ln_post`, ImageBind's vision head LayerNorm), not projected (1280 is the tower width),
    row-major; imagebind_global, (1280,) float16: the class token after that LayerNorm, not projected and not
    normalized (4M-21's ImageBind-H14-global: 1280 channels, not ImageBind's 1024-d joint embedding). One forward
    gives both; only the requested modalities are returned. Input: crop 0 resized with the shorter side to 224
    (bicubic), centre crop 224, CLIP normalization: open_clip's eval preprocess for the release, which for
    laion2b_s32b_b79k is ImageBind's own `load_and_transform_vision_data`.

    Weights: "pretrained" downloads open_clip's `model_name` / `pretrained_tag` (default `ViT-H-14` /
    "laion2b_s32b_b79k"). A path loads either ImageBind's own checkpoint (`imagebind_huge.pth`, a state dict of
    `ImageBindModel`: its vision preprocessor, trunk and head are mapped onto open_clip's tower, the 2-frame
    Conv3d stem folded into a Conv2d, every LayerNorm eps 1e-6 as ImageBind's; sizes read from the checkpoint,
    ImageBind's preprocessing; see `_imagebind.py`) or a local open_clip checkpoint (`open_clip_pytorch_model.bin`,
    `.safetensors`, or a training checkpoint with "state_dict") through open_clip's own loader; the format is
    told by the keys, and a file that is neither is a WeightsError. "tiny" builds the same CLIP class with a
    one-block, width-1280 vision tower and random weights seeded identically in every process.

    Options (`ImageBindOptions`), for open_clip weights: `model_name`, the open_clip architecture (any
    registered open_clip model config whose tower gives a 16 x 16 grid and width 1280); `pretrained_tag`, the
    open_clip release the weights are (it sets preprocessing and activation for every weights kind), or None for
    a local checkpoint that is no open_clip release (the architecture's default preprocessing and activation).
    An ImageBind checkpoint takes neither (a non-default value is a ConfigError). Both are part of the fingerprint.
    """

    name = "imagebind"
    modalities = default_for = ("imagebind", "imagebind_global")
    learned = True
    # 2: imagebind_global became the (1280,) class token after the final LayerNorm; it was the 1024-d projection
    version = "2"
    options_class = ImageBindOptions
    options: ImageBindOptions
    checkpoint_format = "imagebind_huge.pth or open_clip_pytorch_model.bin"
    tiny_cfg = TINY_CFG
    project_pooled = False
    profiles = {PROFILE_4M21: Profile(
        reference="ImageBind-H/14's image encoder, OpenCLIP ViT-H/14 laion2b_s32b_b79k, frozen in ImageBind: "
                  "'pretrained' is that open_clip release (the same weights; ImageBind's own imagebind_huge.pth, "
                  "LayerNorm eps 1e-6 instead of 1e-5, loads with --weights imagebind=PATH); patch tokens and the "
                  "1280-d class token at 224",
        options={"model_name": ARCH, "pretrained_tag": DEFAULT_TAG})}

    @property
    def model_name(self) -> str:
        return self.options.model_name

    @property
    def pretrained_tag(self) -> str | None:
        return self.options.pretrained_tag

    # -- building ------------------------------------------------------------------------------------------

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        """ImageBind's own checkpoint or an open_clip one, told apart by their keys."""
        state = load_state_dict(path)
        if is_imagebind_state_dict(state):
            if self.model_name != ARCH or self.pretrained_tag not in (DEFAULT_TAG, None):
                raise ConfigError(f"{self.name}: {path} is an ImageBind checkpoint, which carries its own "
                                  f"architecture and preprocessing: drop the options model_name and pretrained_tag "
                                  f"(they describe open_clip weights)")
            return self._tower(build_imagebind_vision(state)), imagebind_transform()
        if is_open_clip_state_dict(state):
            del state
            return super().build_from_file(path)
        raise WeightsError(f"{self.name}: {path} is neither an ImageBind checkpoint (imagebind_huge.pth, an "
                           f"ImageBindModel state dict with modality_preprocessors.vision.rgbt_stem.proj.1.weight) "
                           f"nor an open_clip one (open_clip_pytorch_model.bin, keys visual.*); pass one of those, or "
                           f"--weights tiny")

    # -- features ------------------------------------------------------------------------------------------

    def forward(self, x: Any) -> dict[str, Any]:
        pooled, tokens = self.encode(x)  # (B, 1280) class token and (B, 16, 16, 1280) patches, after the final LN
        return {"imagebind": tokens, "imagebind_global": pooled}

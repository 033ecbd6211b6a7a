"""ImageBind-H/14 image tower (OpenCLIP ViT-H/14): patch tokens and global embedding of crop 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniforge.labelers._open_clip import OpenClipLabeler
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import LabelerOptions, option

ARCH = "ViT-H-14"
DEFAULT_TAG = "laion2b_s32b_b79k"
# weights="tiny": the same open_clip CLIP class with a one-block vision tower. Width 1280, patch 14, image 224
# and embed_dim 1024 stay those of ViT-H/14, so the outputs keep the (16, 16, 1280) and (1024,) contract.
TINY_CFG = dict(
    embed_dim=1024,
    vision_cfg=dict(image_size=224, patch_size=14, width=1280, layers=1, head_width=80),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=1),
)


@dataclass(frozen=True, kw_only=True)
class ImageBindOptions(LabelerOptions):
    model_name: str = option(ARCH, "the open_clip architecture: one whose tower gives a 16 x 16 grid, width 1280 and "
                                   "embedding 1024")
    pretrained_tag: str | None = option(DEFAULT_TAG, "the open_clip release the weights are (sets preprocessing and "
                                                     "activation for every weights kind); null for a local checkpoint "
                                                     "that is no open_clip release")


@register_labeler
class ImageBindLabeler(OpenClipLabeler):
    """imagebind, imagebind_global: ImageBind-H/14 image features at 224, as 4M-21's ImageBind teacher.

    ImageBind's image encoder is OpenCLIP ViT-H/14 (laion2b_s32b_b79k), kept frozen while ImageBind trained
    its other modalities, so it is loaded through open_clip.

    Output: imagebind, (16, 16, 1280) float16: the 256 last-layer patch tokens after `ln_post`, not
    projected (1280 is the tower width), row-major; imagebind_global, (1024,) float16: the projected global
    image embedding (class token after `ln_post`, @ `proj`), not L2-normalized. One forward gives both;
    only the requested modalities are returned. Input: crop 0, open_clip's own eval preprocess for the
    release (shorter side resized to 224 bicubic, centre crop 224, CLIP normalization).

    Weights: "pretrained" downloads open_clip's `model_name` / `pretrained_tag` (default `ViT-H-14` /
    "laion2b_s32b_b79k"); a path loads a local open_clip checkpoint (`open_clip_pytorch_model.bin`,
    `.safetensors`, or a training checkpoint with "state_dict") through open_clip's own loader; "tiny"
    builds the same CLIP class with a one-block, width-1280 vision tower and random weights seeded
    identically in every process.

    Options (`ImageBindOptions`): `model_name`, the open_clip architecture (any registered open_clip model
    config whose tower gives a 16 x 16 grid, width 1280 and embedding 1024); `pretrained_tag`, the open_clip
    release the weights are (it sets preprocessing and activation for every weights kind), or None for a local
    checkpoint that is no open_clip release (the architecture's default preprocessing and activation). Both
    are part of the fingerprint.
    """

    name = "imagebind"
    modalities = default_for = ("imagebind", "imagebind_global")
    learned = True
    options_class = ImageBindOptions
    options: ImageBindOptions
    tiny_cfg = TINY_CFG

    @property
    def model_name(self) -> str:
        return self.options.model_name

    @property
    def pretrained_tag(self) -> str | None:
        return self.options.pretrained_tag

    # -- features ------------------------------------------------------------------------------------------

    def forward(self, x: Any) -> dict[str, Any]:
        pooled, tokens = self.encode(x)  # (B, 1024) projected; (B, 16, 16, 1280) after ln_post
        return {"imagebind": tokens, "imagebind_global": pooled}

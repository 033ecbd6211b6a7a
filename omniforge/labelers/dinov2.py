"""DINOv2 ViT-B/14 (timm): patch features and CLS token of crop 0 at 224."""

from __future__ import annotations

from typing import Any, Callable

from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, require
from omniforge.labelers.base import PROFILE_4M21, Profile

ARCH = "vit_base_patch14_dinov2"
IMG_SIZE = 224  # 16 x 16 patches of 14 pixels
# weights="tiny": the same timm VisionTransformer with one block; embed_dim stays 768 for the contract. LayerScale
# starts at 1.0 instead of 1e-5 so the random block visibly mixes the image into the tokens (CLS included).
TINY_KWARGS = dict(depth=1, init_values=1.0)


@register_labeler
class DinoV2Labeler(TorchLabeler):
    """dinov2, dinov2_global: DINOv2 ViT-B/14 features at 224, as 4M-21's DINOv2 teacher.

    Output: dinov2, (16, 16, 768) float16: the last layer's patch tokens after the final norm, row-major;
    dinov2_global, (768,) float16: the CLS token after the final norm. One forward gives both; only the
    requested modalities are returned. Input: crop 0, timm's own eval transform at 224 (shorter side
    resized to 224 bicubic, centre crop 224, ImageNet normalization).

    Weights: "pretrained" downloads timm's `vit_base_patch14_dinov2.lvd142m`; a path loads a local timm
    checkpoint (`model.safetensors`, `.pth` or `.bin`, as on the timm hub) through timm's own loader, whose
    checkpoint filter resamples the 518-pixel (37 x 37) position embedding to 16 x 16; "tiny" builds the
    same timm model with one block and random weights seeded identically in every process.
    """

    name = "dinov2"
    modalities = default_for = ("dinov2", "dinov2_global")
    learned = True
    checkpoint_format = "model.safetensors"
    profiles = {PROFILE_4M21: Profile(
        reference="DINOv2 ViT-B/14 (dinov2_vitb14; timm's vit_base_patch14_dinov2.lvd142m is that checkpoint): "
                  "last-layer patch tokens and CLS at 224")}

    # -- building ------------------------------------------------------------------------------------------

    def _create(self, **kwargs: Any) -> tuple[Any, Callable]:
        timm = require("timm", "timm>=1.0")
        model = timm.create_model(ARCH, img_size=IMG_SIZE, **kwargs)
        # resolve_data_config reads the input size from the pretrained cfg (518 for DINOv2) even when the
        # model was built for 224: state the size the model was built for.
        data_cfg = timm.data.resolve_data_config({"input_size": (3, *model.patch_embed.img_size)}, model=model)
        return model, timm.data.create_transform(**data_cfg, is_training=False)

    def build_pretrained(self) -> tuple[Any, Callable]:
        return self._create(pretrained=True)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        return self._create(pretrained=True, pretrained_cfg_overlay=dict(file=path))

    def build_tiny(self) -> tuple[Any, Callable]:
        return self._create(pretrained=False, **TINY_KWARGS)

    # -- features ------------------------------------------------------------------------------------------

    def forward(self, x: Any) -> dict[str, Any]:
        tokens = self.model.forward_features(x)  # (B, 1 + 256, 768), after the final norm
        patches = tokens[:, self.model.num_prefix_tokens:]  # (B, 256, 768)
        grid_h, grid_w = self.model.patch_embed.grid_size
        return {"dinov2": patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[-1]),  # (B, 16, 16, 768)
                "dinov2_global": tokens[:, 0]}  # (B, 768)

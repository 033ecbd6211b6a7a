"""DPT-Hybrid (Ranftl et al. 2021) as Omnidata v2 ships it: timm's R50+ViT-B/16 hybrid backbone, a
reassemble stage with "project" readout, four fusion blocks and a small convolutional head.

The network is written here (architecture only); the backbone is timm's own hybrid VisionTransformer.
`convert_omnidata_state_dict` maps the publisher's checkpoint (`omnidata_dpt_{depth,normal}_v2.ckpt`, a
PyTorch Lightning checkpoint whose "state_dict" holds the MiDaS/DPT `DPTDepthModel` under the prefix
"model.") onto `DPT`'s module names. The mapping, publisher key -> omniforge key:

    model.pretrained.model.<k>                    -> vit.<k>            (timm hybrid ViT, names unchanged)
    model.pretrained.model.head.{weight,bias}     -> dropped            (the unused ImageNet classifier)
    model.pretrained.act_postprocess{3,4}.0.project.0.<p> -> reassemble{3,4}.readout.<p>  (Linear 2D -> D)
    model.pretrained.act_postprocess{3,4}.3.<p>   -> reassemble{3,4}.proj.<p>       (1x1 conv)
    model.pretrained.act_postprocess4.4.<p>       -> reassemble4.resample.<p>      (3x3 conv, stride 2)
    model.scratch.layer{i}_rn.weight              -> project{i}.weight             (3x3 conv, no bias)
    model.scratch.refinenet{i}.resConfUnit{j}.conv{k}.<p> -> fusion{i}.unit{j}.conv{k}.<p>
    model.scratch.refinenet{i}.out_conv.<p>       -> fusion{i}.out_conv.<p>
    model.scratch.output_conv.{0,2,4}.<p>         -> head.conv{1,2,3}.<p>

Reassemble 1 and 2 of the hybrid take the ResNet stages 1 and 2 as they are (the publisher's
act_postprocess1/2 are identities, without parameters); 3 and 4 take ViT blocks 8 and 11 (before the final
norm). Everything else is an error (`WeightsError` from the caller): no silent partial loads.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 256  # DPT's fusion width
VIT_HOOKS = (8, 11)  # ViT blocks read by reassemble 3 and 4 (DPT-Hybrid's hooks [0, 1, 8, 11])


class Reassemble(nn.Module):
    """ViT tokens -> feature map: project readout (concat CLS, Linear + GELU), 1x1 conv, optional stride-2 conv."""

    def __init__(self, dim: int, out_dim: int, downsample: bool):
        super().__init__()
        self.readout = nn.Linear(2 * dim, dim)
        self.proj = nn.Conv2d(dim, out_dim, kernel_size=1)
        self.resample = nn.Conv2d(out_dim, out_dim, kernel_size=3, stride=2, padding=1) if downsample else None

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches, cls = tokens[:, 1:], tokens[:, :1]  # (B, N, D), (B, 1, D)
        x = F.gelu(self.readout(torch.cat([patches, cls.expand_as(patches)], dim=-1)))  # (B, N, D)
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)  # (B, D, h, w)
        x = self.proj(x)
        return self.resample(x) if self.resample is not None else x


class ResidualUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))) with 3x3 convs (DPT's residual conv unit, no batch norm)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Fusion(nn.Module):
    """(path + unit1(skip)) -> unit2 -> 2x bilinear upsample (align_corners) -> 1x1 conv."""

    def __init__(self, features: int):
        super().__init__()
        self.unit1 = ResidualUnit(features)  # unused by the deepest block, but part of the checkpoint
        self.unit2 = ResidualUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.unit1(skip)
        x = self.unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Head(nn.Module):
    """conv3x3 (F -> F/2), 2x bilinear upsample, conv3x3 (-> 32), ReLU, conv1x1 (-> channels), ReLU."""

    def __init__(self, features: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features // 2, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.conv1(x), scale_factor=2, mode="bilinear", align_corners=True)
        return F.relu(self.conv3(F.relu(self.conv2(x))))


class DPT(nn.Module):
    """DPT-Hybrid over a timm hybrid VisionTransformer (`vit.patch_embed.backbone` is a ResNetV2 with at least
    3 stages). forward: (B, 3, H, W) with H, W multiples of 32 -> (B, channels, H, W), non-negative."""

    def __init__(self, vit: nn.Module, *, channels: int, features: int = FEATURES,
                 vit_hooks: tuple[int, int] = VIT_HOOKS):
        super().__init__()
        self.vit = vit
        self.vit_hooks = vit_hooks
        stages = vit.patch_embed.backbone.stages
        dim = vit.embed_dim
        in_channels = (stages[0].blocks[-1].conv3.out_channels, stages[1].blocks[-1].conv3.out_channels, dim, dim)
        self.reassemble3 = Reassemble(dim, dim, downsample=False)
        self.reassemble4 = Reassemble(dim, dim, downsample=True)
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"project{i}", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"fusion{i}", Fusion(features))
        self.head = Head(features, channels)

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.vit.pos_embed  # (1, 1 + g*g, D)
        old = int(round((pos.shape[1] - 1) ** 0.5))
        if (old, old) == grid:
            return pos
        g = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=grid, mode="bilinear").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([pos[:, :1], g], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.vit.patch_embed.backbone
        f = backbone.stem(x)  # (B, C0, H/4, W/4)
        layer1 = backbone.stages[0](f)  # (B, C1, H/4, W/4)
        layer2 = backbone.stages[1](layer1)  # (B, C2, H/8, W/8)
        f = layer2
        for stage in backbone.stages[2:]:
            f = stage(f)  # (B, C3, H/16, W/16)
        f = backbone.norm(f)
        f = self.vit.patch_embed.proj(f)  # (B, D, H/16, W/16)
        grid = (f.shape[2], f.shape[3])
        tokens = f.flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(grid)  # (B, 1 + N, D)
        taken = []
        for i, block in enumerate(self.vit.blocks):
            tokens = block(tokens)
            if i in self.vit_hooks:
                taken.append(tokens)
            if i >= max(self.vit_hooks):
                break
        layer3 = self.reassemble3(taken[0], grid)  # (B, D, H/16, W/16)
        layer4 = self.reassemble4(taken[1], grid)  # (B, D, H/32, W/32)

        path = self.fusion4(self.project4(layer4))  # (B, F, H/16, W/16)
        path = self.fusion3(path, self.project3(layer3))  # (B, F, H/8, W/8)
        path = self.fusion2(path, self.project2(layer2))  # (B, F, H/4, W/4)
        path = self.fusion1(path, self.project1(layer1))  # (B, F, H/2, W/2)
        return self.head(path)  # (B, channels, H, W)


def hybrid_vit(*, tiny: bool) -> nn.Module:
    """timm's `vit_base_r50_s16_384` (R50 stages (3, 4, 9) + ViT-B/16 at 384), or for `tiny` the same timm
    classes at a toy size: ResNetV2 stages (1, 1, 1) of 16/32/64 channels, a 2-block ViT of width 32."""
    import timm
    from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid

    if not tiny:
        return timm.create_model("vit_base_r50_s16_384", pretrained=False, num_classes=0)
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    backbone = ResNetV2(layers=(1, 1, 1), channels=(16, 32, 64, 128), stem_chs=16, num_classes=0, global_pool="",
                        preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=8))
    return _create_vision_transformer_hybrid("vit_base_r50_s16_384", backbone=backbone, pretrained=False,
                                             img_size=384, embed_dim=32, depth=2, num_heads=2, num_classes=0)


def build_dpt(*, channels: int, tiny: bool) -> DPT:
    """DPT-Hybrid with a `channels`-channel head: 1 for Omnidata depth, 3 for Omnidata normals."""
    if tiny:
        return DPT(hybrid_vit(tiny=True), channels=channels, features=16, vit_hooks=(0, 1))
    return DPT(hybrid_vit(tiny=False), channels=channels)


# publisher (after the "model." prefix) -> omniforge; applied in order, first match wins
_RULES: tuple[tuple[str, str], ...] = (
    (r"^pretrained\.model\.head\.(weight|bias)$", ""),  # ImageNet classifier of the timm ViT: unused
    (r"^pretrained\.model\.", "vit."),
    (r"^pretrained\.act_postprocess([34])\.0\.project\.0\.", r"reassemble\1.readout."),
    (r"^pretrained\.act_postprocess([34])\.3\.", r"reassemble\1.proj."),
    (r"^pretrained\.act_postprocess4\.4\.", "reassemble4.resample."),
    (r"^scratch\.layer([1-4])_rn\.", r"project\1."),
    (r"^scratch\.refinenet([1-4])\.resConfUnit([12])\.", r"fusion\1.unit\2."),
    (r"^scratch\.refinenet([1-4])\.out_conv\.", r"fusion\1.out_conv."),
    (r"^scratch\.output_conv\.0\.", "head.conv1."),
    (r"^scratch\.output_conv\.2\.", "head.conv2."),
    (r"^scratch\.output_conv\.4\.", "head.conv3."),
)


def convert_omnidata_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The publisher's checkpoint (a dict with "state_dict" keyed "model.<DPTDepthModel key>", or a bare
    DPTDepthModel state dict) -> a state dict for `DPT`. Raises ValueError on a key no rule maps."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        k = key[len("model."):] if "state_dict" in checkpoint and key.startswith("model.") else key
        for pattern, repl in _RULES:
            if re.match(pattern, k):
                if repl:
                    out[re.sub(pattern, repl, k)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not part of Omnidata's DPT-Hybrid, e.g. {unknown[:3]}")
    return out

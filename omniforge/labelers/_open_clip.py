"""open_clip machinery shared by the teachers that run an open_clip image tower (clip, imagebind).

An `OpenClipLabeler` builds an open_clip architecture (`model_name`) three ways: the release named by
`pretrained_tag` from the hub, a local open_clip checkpoint through open_clip's own loader, or a tiny random
model of the same CLIP class (`tiny_cfg` overrides the architecture config). It keeps only the image tower,
with `output_tokens=True`, and uses open_clip's own eval preprocess for that release.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from omniforge.errors import ConfigError
from omniforge.labelers._torch_utils import TorchLabeler, require
from omniforge.labelers.base import option

OPEN_CLIP_PIP = "open_clip_torch>=2.26"


def open_clip_module() -> Any:
    return require("open_clip", OPEN_CLIP_PIP)


class OpenClipLabeler(TorchLabeler):
    """Base of the open_clip image-tower teachers.

    Subclasses set `tiny_cfg` (open_clip model kwargs for weights="tiny": `embed_dim`, `vision_cfg`,
    `text_cfg`) and provide `model_name` (an open_clip architecture) and `pretrained_tag` (an open_clip
    release of that architecture, or None for weights that are no open_clip release), as class attributes
    or as properties reading their options. The tag decides the preprocessing (mean, std, interpolation,
    resize mode) and the activation (QuickGELU for the OpenAI, DFN and MetaCLIP releases, which a state dict
    cannot record), for every weights kind.
    """

    checkpoint_format = "open_clip_pytorch_model.bin"
    tiny_cfg: ClassVar[dict[str, Any]]
    # False: `encode` returns the pooled class token after ln_post as it is, not `@ proj` (the tower's `proj` is
    # dropped once built)
    project_pooled: ClassVar[bool] = True
    model_name: str
    pretrained_tag: str | None

    # -- building ------------------------------------------------------------------------------------------

    def _release_cfg(self) -> dict[str, Any]:
        """open_clip's pretrained config of (model_name, pretrained_tag); {} when the tag is None."""
        open_clip = open_clip_module()
        if self.model_name not in open_clip.list_models():
            raise ConfigError(f"{self.name}: unknown model_name {self.model_name!r}; it must be an open_clip "
                              f"architecture (open_clip.list_models())")
        if self.pretrained_tag is None:
            return {}
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained_tag)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            raise ConfigError(f"{self.name}: unknown pretrained_tag {self.pretrained_tag!r}; open_clip "
                              f"{self.model_name} tags: {', '.join(tags) or '(none)'}")
        return cfg

    def _create(self, pretrained: str | None, **kwargs: Any) -> tuple[Any, Callable]:
        open_clip = open_clip_module()
        cfg = self._release_cfg()
        # open_clip 3.x no longer switches to QuickGELU for the "openai" tag by itself (it only warns), and a
        # local file has no tag at all: take the activation from the release's pretrained config.
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=pretrained, force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            weights_only=True, image_mean=cfg.get("mean"), image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"), **kwargs)
        visual = model.visual  # the text tower is not needed
        visual.output_tokens = True
        return self._tower(visual), preprocess

    def _tower(self, visual: Any) -> Any:
        """The built image tower as `encode` runs it: without `proj` unless `project_pooled`."""
        if not self.project_pooled:
            visual.proj = None  # open_clip's VisionTransformer then returns the pooled token unprojected
        return visual

    def build_pretrained(self) -> tuple[Any, Callable]:
        if self.pretrained_tag is None:
            raise ConfigError(f"{self.name}: weights=pretrained needs a pretrained_tag naming an open_clip "
                              f"{self.model_name} release")
        self._release_cfg()  # an unknown tag is a ConfigError, not a hub error
        return self._create(self.pretrained_tag)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        return self._create(path)

    def build_tiny(self) -> tuple[Any, Callable]:
        return self._create(None, **self.tiny_cfg)

    # -- features ------------------------------------------------------------------------------------------

    def encode(self, x: Any, tower: Any = None) -> tuple[Any, Any]:
        """(the class token after ln_post, @ proj when `project_pooled`: (B, embed_dim) or (B, width); the
        last-layer patch tokens after ln_post: (B, grid_h, grid_w, width)), through `tower` (default the
        model; `tower_at(self.model, size)` for another input size)."""
        tower = self.model if tower is None else tower
        pooled, tokens = tower(x)  # tokens: (B, grid_h * grid_w, width), class token removed
        grid_h, grid_w = tower.grid_size
        return pooled, tokens.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1])


def resize_positions(table: Any, grid: int) -> Any:
    """A ViT position table (1 + g * g, width), class position first, resized to a `grid` x `grid` patch grid
    the way ml-4m runs its CLIP teacher above 224 (`fourm/utils/clip/model.py`, the DINO convention): the
    patch positions as a (width, g, g) image, bicubic (a = -0.75, align_corners=False, no antialias) with the
    scale factor (grid + 0.1) / g, so the output is grid x grid; the class position unchanged. The table itself
    when grid == g. (open_clip's `resize_pos_embed` and timm's `resample_abs_pos_embed` resize to the exact
    size with antialias, a = -0.5: other values, so neither is used.)"""
    import math

    import torch
    import torch.nn.functional as F

    cls, patches = table[:1], table[1:]
    side, width = math.isqrt(patches.shape[0]), table.shape[1]
    if side * side != patches.shape[0]:
        raise ValueError(f"position table of {patches.shape[0]} patches is not a square grid")
    if grid == side:
        return table
    scale = (grid + 0.1) / side
    image = patches.float().reshape(1, side, side, width).permute(0, 3, 1, 2)  # (1, width, g, g)
    image = F.interpolate(image, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(image.shape[-2:]) != (grid, grid):
        raise ValueError(f"resizing the {side} x {side} positions gave {tuple(image.shape[-2:])}, not {grid} x {grid}")
    resized = image.permute(0, 2, 3, 1).reshape(grid * grid, width).to(table.dtype)  # (grid * grid, width)
    return torch.cat([cls, resized], dim=0)


def tower_at(visual: Any, size: int) -> Any:
    """open_clip's image tower `visual` run on `size` x `size` inputs: a shallow copy sharing every weight
    (no memory for a second tower) but its own position table, `resize_positions` to the size's patch grid,
    and its own `grid_size` / `image_size`. `visual` itself at its own size. ConfigError when `size` is no
    multiple of the patch side."""
    import copy

    import torch

    patch = visual.patch_size[0]
    if size % patch or size < patch:
        raise ConfigError(f"an open_clip tower with {patch}-pixel patches cannot run at {size}: use a multiple of "
                          f"{patch}")
    grid = size // patch
    if tuple(visual.grid_size) == (grid, grid):
        return visual
    tower = copy.copy(visual)
    object.__setattr__(tower, "_parameters", dict(visual._parameters))  # the copy's own table; shared weights
    tower.positional_embedding = torch.nn.Parameter(resize_positions(visual.positional_embedding.detach(), grid),
                                                    requires_grad=False)
    tower.grid_size, tower.image_size = (grid, grid), (size, size)
    return tower


def transform_at(visual: Any, size: int) -> Callable:
    """open_clip's eval preprocess of the tower's release (mean, std, interpolation, resize mode) at `size`."""
    cfg = open_clip_module().get_model_preprocess_cfg(visual)
    return open_clip_module().image_transform(
        size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"), resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"), fill_color=cfg.get("fill_color", 0))


def pretrained_tag_option(default: str) -> Any:
    """The `pretrained_tag` option of an open_clip teacher: the release its weights are."""
    return option(default, "the open_clip release the weights are (sets preprocessing and activation for every "
                           "weights kind); null for a local checkpoint that is no open_clip release")


__all__ = ["OPEN_CLIP_PIP", "OpenClipLabeler", "open_clip_module", "pretrained_tag_option", "resize_positions",
           "tower_at", "transform_at"]

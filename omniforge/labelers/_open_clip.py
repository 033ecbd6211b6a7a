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

    def encode(self, x: Any) -> tuple[Any, Any]:
        """(the class token after ln_post, @ proj when `project_pooled`: (B, embed_dim) or (B, width); the
        last-layer patch tokens after ln_post: (B, grid_h, grid_w, width))."""
        pooled, tokens = self.model(x)  # tokens: (B, grid_h * grid_w, width), class token removed
        grid_h, grid_w = self.model.grid_size
        return pooled, tokens.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1])


def pretrained_tag_option(default: str) -> Any:
    """The `pretrained_tag` option of an open_clip teacher: the release its weights are."""
    return option(default, "the open_clip release the weights are (sets preprocessing and activation for every "
                           "weights kind); null for a local checkpoint that is no open_clip release")


__all__ = ["OPEN_CLIP_PIP", "OpenClipLabeler", "open_clip_module", "pretrained_tag_option"]

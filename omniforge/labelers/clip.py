"""CLIP ViT-B/16 (open_clip): projected last-layer patch features of crop 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omniforge.errors import SampleError
from omniforge.labelers._open_clip import OpenClipLabeler, tower_at, transform_at
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import PROFILE_4M21, LabelerOptions, Profile, Sample, option

ARCH = "ViT-B-16"
DEFAULT_TAG = "openai"
# weights="tiny": the same open_clip CLIP class at a very small size. embed_dim stays 512 so the output keeps
# the (14, 14, 512) contract; image and patch size stay 224 / 16 so the grid stays 14 x 14.
TINY_CFG = dict(
    embed_dim=512,
    vision_cfg=dict(image_size=224, patch_size=16, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=1),
)


@dataclass(frozen=True, kw_only=True)
class ClipOptions(LabelerOptions):
    pretrained_tag: str = option(DEFAULT_TAG, f"the open_clip {ARCH} release the weights are (sets the activation and "
                                 f"preprocessing for every weights kind), e.g. laion2b_s34b_b88k")


@register_labeler
class ClipLabeler(OpenClipLabeler):
    """clip: CLIP ViT-B/16 projected last-layer patch features, as 4M-21's CLIP teacher.

    Output: clip, (14, 14, 512) float16: the 196 patch tokens of the last layer after `ln_post`, multiplied
    by the visual projection `proj` (the map open_clip applies to the pooled token), in row-major patch order.
    Input: crop 0, open_clip's own eval preprocess (shorter side resized to 224 bicubic, centre crop 224,
    CLIP normalization).

    Weights: "pretrained" downloads open_clip's `ViT-B-16` / `pretrained_tag` (default "openai"); a path
    loads a local open_clip checkpoint (`open_clip_pytorch_model.bin`, `.safetensors`, or a training
    checkpoint with "state_dict") through open_clip's own loader; "tiny" builds the same CLIP class with a
    2-layer, width-64 vision tower and random weights seeded identically in every process.

    Other input sizes (`label_at`, for tok_clip@448): the same tower on a `size` x `size` input, its position
    table resized to the (size / 16)^2 patch grid as ml-4m runs its CLIP teacher at 448
    (`omniforge.labelers._open_clip.resize_positions`: bicubic, scale (grid + 0.1) / 14, class position kept),
    open_clip's eval preprocess at that size: clip (size / 16, size / 16, 512) float16, (28, 28, 512) at 448.

    Option `pretrained_tag` (`ClipOptions`) names the open_clip release; for a local file it says which
    release the file is (its activation: the OpenAI and DFN/MetaCLIP releases use QuickGELU, which a state
    dict cannot record, and its preprocessing), so it is part of the fingerprint for every weights kind.
    """

    name = "clip"
    modalities = default_for = ("clip",)
    learned = True
    options_class = ClipOptions
    options: ClipOptions
    profiles = {PROFILE_4M21: Profile(
        reference="OpenAI CLIP ViT-B/16, OpenAI's weights (open_clip tag openai): projected last-layer patch features "
                  "of the 224 centre crop",
        options={"pretrained_tag": "openai"})}
    model_name = ARCH
    tiny_cfg = TINY_CFG

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._towers: dict[int, tuple[Any, Any]] = {}  # input side -> (tower_at, transform_at), built on first use

    @property
    def pretrained_tag(self) -> str:
        return self.options.pretrained_tag

    # -- features ------------------------------------------------------------------------------------------

    def forward(self, x: Any, tower: Any = None) -> dict[str, Any]:
        _, tokens = self.encode(x, tower)  # (B, 14, 14, width) at 224: last layer, after ln_post, no class token
        return {"clip": tokens @ self.model.proj}  # (B, 14, 14, 512); (B, 28, 28, 512) at 448

    def label_at(self, samples: list[Sample], size: int) -> list[dict[str, Any] | SampleError]:
        """`label` with the teacher run at `size` x `size` (see the class docstring): clip is
        (size / 16, size / 16, 512) float16. `label` itself at 224."""
        if size == self.model.image_size[0]:
            return self.label(samples)
        if size not in self._towers:
            self._towers[size] = (tower_at(self.model, size), transform_at(self.model, size))
        tower, transform = self._towers[size]
        grid = tower.grid_size[0]
        return self.run_batch(samples, transform, lambda x: self.forward(x, tower),
                              {"clip": (grid, grid, int(self.model.proj.shape[1]))})

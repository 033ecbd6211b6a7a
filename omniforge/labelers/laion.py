"""LAION's two image scores, 4M-21 metadata fields the metadata labeler reads: aesthetic_score (the LAION
aesthetic predictor, an MLP on the CLIP ViT-L/14 image embedding) and watermark_score (the LAION-5B watermark
detector, a timm EfficientNet-B3 with a small MLP head). Each is a label-only modality of one JSON number."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, cast
from urllib.parse import unquote, urlparse

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.labelers._open_clip import OpenClipLabeler, pretrained_tag_option
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, autocast_for, require, short_error
from omniforge.labelers.base import PROFILE_4M21, TINY, LabelerOptions, Profile, Sample, option, weights_identity

SCORE_DECIMALS = 4  # a score is written rounded to this many decimals

# -- the aesthetic predictor (christophschuhmann/improved-aesthetic-predictor) --------------------------------

AESTHETIC_ARCH = "ViT-L-14"
AESTHETIC_TAG = "openai"
AESTHETIC_MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{AESTHETIC_MLP_FILE}"
# The publisher's MLP (simple_inference.py, class MLP; the "linear" variant its released checkpoints are): widths
# of its Linear layers and the dropout after each of the first three, no activation anywhere. nn.Sequential
# indices 0, 2, 4, 6, 7 are the Linear layers: the state dict keys are layers.{0,2,4,6,7}.{weight,bias}.
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
AESTHETIC_DROPOUTS = (0.2, 0.2, 0.1)
# weights="tiny": the same open_clip CLIP class with a 2-block, width-64 tower. embed_dim stays 768 (ViT-L/14's)
# so the MLP has the published checkpoint's shapes; image 224 and patch 14 keep ViT-L/14's 16 x 16 grid.
AESTHETIC_TINY_CFG = dict(
    embed_dim=768,
    vision_cfg=dict(image_size=224, patch_size=14, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=1),
)

# -- the watermark detector (LAION-AI/LAION-5B-WatermarkDetection) --------------------------------------------

# The publisher creates timm's "efficientnet_b3a"; timm >= 0.9 maps that deprecated name to efficientnet_b3,
# the same network (timm's b3a had b3's width and depth multipliers, 1.2 and 1.4, and another default test size).
WATERMARK_ARCH = "efficientnet_b3"
WATERMARK_FILE = "watermark_model_v1.pt"
WATERMARK_URL = f"https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/{WATERMARK_FILE}"
WATERMARK_SIZE = 256  # the whole image resized to 256 x 256, aspect not kept
WATERMARK_HIDDEN = (625, 256)  # the publisher's classifier: Linear 625, ReLU, Dropout, Linear 256, ReLU, Linear 2
WATERMARK_DROPOUT = 0.3
WATERMARK_COLUMN = 0  # softmax column of "watermark" (their example: `water_sym, clear_sym = sym`)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# weights="tiny": timm's own small EfficientNet for tests, with GroupNorm, under the publisher's head. A randomly
# initialized BatchNorm EfficientNet shrinks its activations about threefold per stage in eval mode (it divides
# by running variances of 1 that its activations never reach) and gives every image the same score; GroupNorm
# normalizes each image, so the random network's score depends on the image.
WATERMARK_TINY_ARCH = "test_efficientnet_gn"


class _ScoreLabeler(TorchLabeler):
    """A torch teacher that gives one number per image: `forward(x)` returns {modality: (B,) tensor}, and each
    score is written as a JSON number rounded to SCORE_DECIMALS; a non-finite score fails that sample."""

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out, batch, rows = self.preprocess(samples)
        if batch:
            x = torch.stack(batch).to(self.torch_device)  # (B, 3, S, S)
            with torch.inference_mode(), autocast_for(self.torch_device):
                scores = {m: s.float().cpu().tolist() for m, s in self.forward(x).items() if m in self.wanted}
            for j, i in enumerate(rows):
                values = {m: s[j] for m, s in scores.items()}
                bad = [m for m, v in values.items() if not math.isfinite(v)]
                out[i] = (SampleError("teacher_error", f"{self.name}: non-finite {', '.join(bad)}") if bad
                          else {m: round(v, SCORE_DECIMALS) for m, v in values.items()})
        return out  # type: ignore[return-value]


# -- aesthetic_score ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AestheticOptions(LabelerOptions):
    model_name: str = option(AESTHETIC_ARCH, "the open_clip architecture of the CLIP tower; its embedding width must "
                                             "be the MLP's input width (768 for ViT-L-14)")
    pretrained_tag: str | None = pretrained_tag_option(AESTHETIC_TAG)
    mlp_checkpoint: str = option(AESTHETIC_MLP_URL, f"the aesthetic MLP, a state dict like the publisher's "
                                                    f"{AESTHETIC_MLP_FILE}: its URL (downloaded once into TORCH_HOME) "
                                                    f"or a local path; not read with --weights tiny (random MLP)")


def build_aesthetic_head(embed_dim: int) -> Any:
    """The publisher's MLP at random init, under the attribute `layers` (its state dict keys are theirs)."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = embed_dim
    for k, out in enumerate(AESTHETIC_WIDTHS):
        layers.append(nn.Linear(width, out))
        if k < len(AESTHETIC_DROPOUTS):
            layers.append(nn.Dropout(AESTHETIC_DROPOUTS[k]))
        width = out
    return nn.Sequential(OrderedDict(layers=nn.Sequential(*layers)))


@register_labeler
class AestheticLabeler(_ScoreLabeler, OpenClipLabeler):
    """aesthetic_score: the LAION aesthetic predictor's score of the image, a JSON number (about 1..10, higher =
    more aesthetic), as 4M-21's aesthetic_score metadata field.

    Output: the MLP of christophschuhmann/improved-aesthetic-predictor (`AESTHETIC_WIDTHS`, linear, its dropout
    inactive) applied in float32 to the L2-normalized CLIP image embedding (open_clip's `encode_image`: the
    pooled class token @ proj, a zero vector left as is), rounded to 4 decimals. Input: crop 0, open_clip's own
    eval preprocess for the release (shorter side resized to 224 bicubic, centre crop 224, CLIP normalization),
    which is what the publisher's `clip.load("ViT-L/14")` preprocess does.

    Weights: two checkpoints. The CLIP tower: "pretrained" downloads open_clip's `model_name` / `pretrained_tag`
    (default ViT-L-14 / "openai"); a path loads a local open_clip checkpoint (`open_clip_pytorch_model.bin`,
    `.safetensors`, or a training checkpoint with "state_dict"); "tiny" is the same CLIP class with a 2-block,
    width-64 tower (embedding 768) and a random MLP, both seeded identically in every process. The MLP: option
    `mlp_checkpoint`, the publisher's state dict (`torch.save(mlp.state_dict())`, keys layers.N.weight/bias),
    by URL (default: sac+logos+ava1-l14-linearMSE.pth from the publisher's repository, cached under
    TORCH_HOME) or by local path for an air-gapped cluster; a local file is fingerprinted by its sha256. With
    --weights tiny the MLP is random and `mlp_checkpoint` must be left at its default.
    """

    name = "aesthetic"
    modalities = default_for = ("aesthetic_score",)
    learned = True
    options_class = AestheticOptions
    options: AestheticOptions
    profiles = {PROFILE_4M21: Profile(
        reference="the LAION aesthetic predictor (improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE.pth) on "
                  "OpenAI CLIP ViT-L/14 image embeddings: metadata's aesthetic_score")}
    tiny_cfg = AESTHETIC_TINY_CFG

    @property
    def model_name(self) -> str:
        return self.options.model_name

    @property
    def pretrained_tag(self) -> str | None:
        return self.options.pretrained_tag

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        """Every option; a local `mlp_checkpoint` by its content hash, so replacing the file relabels."""
        opts = cast(AestheticOptions, options)
        _check_tiny_mlp(opts, weights)
        values = super().identity_options(opts, weights=weights, given=given)
        if weights != TINY:
            values["mlp_checkpoint"] = weights_identity(_local_or_url(opts.mlp_checkpoint))
        return values

    # -- building ------------------------------------------------------------------------------------------

    def _with_head(self, build: Callable[[], tuple[Any, Callable]], head_state: dict[str, Any] | None) -> \
            tuple[Any, Callable]:
        import torch.nn as nn

        visual, preprocess = build()
        embed_dim = int(visual.output_dim)
        if head_state is None:
            head = build_aesthetic_head(embed_dim)
        else:
            head = _aesthetic_head_from_state(head_state, embed_dim, self.model_name, self.options.mlp_checkpoint)
        return nn.ModuleDict({"visual": visual, "head": head}), preprocess

    def build_pretrained(self) -> tuple[Any, Callable]:
        head = self._mlp_state()  # first: it is small, and its errors name the option
        return self._with_head(super().build_pretrained, head)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        head = self._mlp_state()
        return self._with_head(lambda: super(AestheticLabeler, self).build_from_file(path), head)

    def build_tiny(self) -> tuple[Any, Callable]:
        _check_tiny_mlp(self.options, TINY)
        return self._with_head(super().build_tiny, None)

    def _mlp_state(self) -> dict[str, Any]:
        """The MLP's state dict from `mlp_checkpoint` (a URL through torch.hub, or a local file)."""
        import torch

        source = self.options.mlp_checkpoint
        hint = (f"pass the publisher's {AESTHETIC_MLP_FILE} with --option {self.name}.mlp_checkpoint=/path/to/it, "
                f"or --weights tiny for random weights")
        try:
            if "://" in source:
                return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True,
                                                          check_hash=False, file_name=_url_file_name(source))
            path = _local_or_url(source)
            if not os.path.isfile(path):
                raise WeightsError(f"{self.name}: mlp_checkpoint {source} not found; {hint}")
            return torch.load(path, map_location="cpu", weights_only=True)
        except WeightsError:
            raise
        except Exception as e:  # download, cache or unpickling errors
            raise WeightsError(f"{self.name}: cannot load mlp_checkpoint {source} ({short_error(e)}); {hint}") from e

    # -- scores --------------------------------------------------------------------------------------------

    def forward(self, x: Any) -> dict[str, Any]:
        import torch

        pooled, _ = self.model["visual"](x)  # (B, D): encode_image, not normalized (output_tokens is set)
        with torch.autocast(x.device.type, enabled=False):  # the MLP in float32, as the publisher runs it
            emb = pooled.float()
            norm = emb.norm(dim=-1, keepdim=True)  # (B, 1)
            emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)
            return {"aesthetic_score": self.model["head"](emb)[:, 0]}  # (B,)


def _check_tiny_mlp(options: AestheticOptions, weights: str) -> None:
    if weights == TINY and options.mlp_checkpoint != AESTHETIC_MLP_URL:
        raise ConfigError("aesthetic: --weights tiny uses a random MLP, so option mlp_checkpoint would be ignored: "
                          "drop it, or give real CLIP weights (--weights aesthetic=pretrained or a checkpoint path)")


def _local_or_url(source: str) -> str:
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def _url_file_name(url: str) -> str:
    """The cache file name of a URL: its last path segment, %-decoded (sac%2Blogos... -> sac+logos...)."""
    return unquote(urlparse(url).path.rsplit("/", 1)[-1]) or AESTHETIC_MLP_FILE


def _aesthetic_head_from_state(state: Any, embed_dim: int, model_name: str, source: str) -> Any:
    """The publisher's MLP loaded strictly from `state`, checked against the CLIP embedding width."""
    first = state.get("layers.0.weight") if isinstance(state, dict) else None
    if first is None or getattr(first, "ndim", 0) != 2:
        keys = ", ".join(list(state)[:4]) if isinstance(state, dict) else type(state).__name__
        raise WeightsError(f"aesthetic: mlp_checkpoint {source} is not a LAION aesthetic MLP state dict (no "
                           f"layers.0.weight; it holds {keys or 'nothing'}); pass a file like {AESTHETIC_MLP_FILE}")
    if first.shape[1] != embed_dim:
        raise WeightsError(f"aesthetic: mlp_checkpoint {source} takes {first.shape[1]}-d embeddings but {model_name} "
                           f"gives {embed_dim}-d ones: pass the MLP trained on this CLIP model, or its model_name")
    head = build_aesthetic_head(embed_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"aesthetic: mlp_checkpoint {source} does not match the publisher's MLP "
                           f"({short_error(e)}); pass a file like {AESTHETIC_MLP_FILE}") from e
    return head


# -- watermark_score ----------------------------------------------------------------------------------------------

def build_watermark_model(arch: str = WATERMARK_ARCH) -> Any:
    """The publisher's detector at random init: timm's `arch` (EfficientNet-B3) with its classifier replaced by
    their MLP head (keys classifier.{0,3,5}.{weight,bias}; its input width is the backbone's, 1536 for B3)."""
    import torch.nn as nn

    timm = require("timm", "timm>=1.0")
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    hidden, second = WATERMARK_HIDDEN
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, hidden), nn.ReLU(), nn.Dropout(p=WATERMARK_DROPOUT),
        nn.Linear(hidden, second), nn.ReLU(), nn.Linear(second, 2))
    return model


def watermark_transform() -> Callable:
    """PIL -> (3, 256, 256): the whole image resized (bilinear, aspect not kept), ImageNet-normalized, as the
    publisher's `preprocessing`."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((WATERMARK_SIZE, WATERMARK_SIZE)), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@register_labeler
class WatermarkLabeler(_ScoreLabeler):
    """watermark_score: the LAION-5B watermark detector's probability that the image carries a watermark, a JSON
    number in [0, 1], as 4M-21's watermark_score metadata field.

    Output: softmax column 0 ("watermark") of LAION-AI/LAION-5B-WatermarkDetection's classifier (timm
    EfficientNet-B3, its classifier replaced by Linear 1536-625, ReLU, Dropout 0.3, Linear 625-256, ReLU,
    Linear 256-2), rounded to 4 decimals. Input: the whole image resized to 256 x 256 (bilinear, aspect not
    kept) and ImageNet-normalized, as the publisher's preprocessing.

    Weights: "pretrained" downloads the publisher's watermark_model_v1.pt (`WATERMARK_URL`, through torch.hub,
    cached under TORCH_HOME); a path loads that file (a state dict of the whole network, as their
    example_use.py loads it, or {"weights": state dict}, as their inference.py does) strictly; "tiny" is timm's small
    GroupNorm EfficientNet for tests (`WATERMARK_TINY_ARCH`) under the same head, random weights seeded
    identically in every process.
    """

    name = "watermark"
    modalities = default_for = ("watermark_score",)
    learned = True
    profiles = {PROFILE_4M21: Profile(
        reference="the LAION-5B watermark detector (watermark_model_v1.pt, an EfficientNet-B3 with LAION's head): "
                  "metadata's watermark_score")}
    checkpoint_format = WATERMARK_FILE

    # -- building ------------------------------------------------------------------------------------------

    def _from_state(self, state: Any, source: str) -> Any:
        if isinstance(state, dict) and isinstance(state.get("weights"), dict):
            state = state["weights"]
        if not isinstance(state, dict):
            raise WeightsError(f"{self.name}: {source} holds a {type(state).__name__}, not a state dict like "
                               f"{WATERMARK_FILE}")
        model = build_watermark_model()
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise WeightsError(f"{self.name}: {source} does not match the LAION watermark detector "
                               f"({short_error(e)}); pass {WATERMARK_FILE}") from e
        if missing or unexpected:
            raise WeightsError(f"{self.name}: {source} is not the LAION watermark detector ({len(missing)} missing "
                               f"keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
                               f"pass {WATERMARK_FILE}")
        return model

    def build_pretrained(self) -> tuple[Any, Callable]:
        import torch

        state = torch.hub.load_state_dict_from_url(WATERMARK_URL, map_location="cpu", weights_only=True,
                                                   check_hash=False, file_name=WATERMARK_FILE)
        return self._from_state(state, WATERMARK_URL), watermark_transform()

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        import torch

        return self._from_state(torch.load(path, map_location="cpu", weights_only=True), path), watermark_transform()

    def build_tiny(self) -> tuple[Any, Callable]:
        return build_watermark_model(WATERMARK_TINY_ARCH), watermark_transform()  # seeded by TorchLabeler._load

    # -- scores --------------------------------------------------------------------------------------------

    def forward(self, x: Any) -> dict[str, Any]:
        logits = self.model(x).float()  # (B, 2): watermark, clear
        return {"watermark_score": logits.softmax(dim=-1)[:, WATERMARK_COLUMN]}  # (B,)


__all__ = ["AESTHETIC_MLP_URL", "AestheticLabeler", "AestheticOptions", "WATERMARK_URL", "WatermarkLabeler",
           "build_aesthetic_head", "build_watermark_model", "watermark_transform"]

"""ImageBind's own checkpoint (imagebind_huge.pth) as an open_clip image tower.

facebookresearch/ImageBind publishes `imagebind_huge.pth`, `torch.save(ImageBindModel.state_dict())` with every
modality's preprocessor, trunk, head and postprocessor. Its vision modality is a ViT written in ImageBind's own
classes (`imagebind/models/imagebind_model.py`, `multimodal_preprocessors.py`, `transformer.py`, `helpers.py`):

    preprocessor  PadIm2Video(ntimes=2, pad_type="repeat") then Conv3d(3, W, kernel=stride=(2, 14, 14),
                  bias=False): the image is repeated into 2 frames and the time kernel covers both, so one
                  output frame; then a class token and a learnable (1, 1 + 256, W) position embedding
    trunk         LayerNorm(eps=1e-6) before the blocks, then pre-norm blocks: x + attn(norm_1(x)),
                  x + mlp(norm_2(x)); attention nn.MultiheadAttention(W, 16 heads, bias=True, no bias_kv, no
                  mask); MLP Linear(W, 4W) -> exact GELU -> Linear(4W, W); every LayerNorm eps=1e-6; drop path
                  0.0 for vision (an Identity) and no layer scale
    head          LayerNorm(eps=1e-6) -> the class token -> Linear(W, 1024, bias=False)
    postprocessor L2 normalize (no parameters)

That is open_clip's `VisionTransformer` (conv1 without bias, class and position embeddings, ln_pre, pre-norm
residual blocks, ln_post, the class token, `@ proj`) with LayerNorm eps 1e-6, once the stem is folded: on an
input repeated along time, a Conv3d whose time kernel spans both frames equals a Conv2d whose kernel is the sum
of the two time slices. `convert_imagebind_state_dict` maps the publisher's vision keys onto open_clip's:

    modality_preprocessors.vision.rgbt_stem.proj.1.weight (W, 3, 2, p, p) -> conv1.weight, summed over time
    modality_preprocessors.vision.cls_token (1, 1, W)                      -> class_embedding (W,)
    modality_preprocessors.vision.pos_embedding_helper.pos_embed (1, N, W) -> positional_embedding (N, W)
    modality_trunks.vision.pre_transformer_layer.0.<p>                      -> ln_pre.<p>
    modality_trunks.vision.blocks.<i>.attn.<p>              -> transformer.resblocks.<i>.attn.<p>
    modality_trunks.vision.blocks.<i>.norm_{1,2}.<p>        -> transformer.resblocks.<i>.ln_{1,2}.<p>
    modality_trunks.vision.blocks.<i>.mlp.fc{1,2}.<p>       -> transformer.resblocks.<i>.mlp.c_{fc,proj}.<p>
    modality_heads.vision.0.<p>                             -> ln_post.<p>
    modality_heads.vision.2.weight (out, W)                 -> proj (W, out), transposed

The other modalities' keys (text, audio, depth, thermal, imu, the postprocessors' logit scales) are dropped; a
vision key no rule maps, or a missing one, is an error: no silent partial loads. The sizes (width, blocks, MLP
width, patch, grid, output width) are read from the checkpoint; the head count cannot be (a state dict does not
record it) and is ImageBind's: 16 vision heads in `ImageBindModel` and `imagebind_huge` alike.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

VISION_HEADS = 16  # ImageBind's vision_num_heads (ImageBindModel's default and imagebind_huge's)
LAYER_NORM_EPS = 1e-6  # every LayerNorm of ImageBind's vision trunk and head
STEM_FRAMES = 2  # PadIm2Video(ntimes=2) and the Conv3d time kernel (2, 14, 14)
IMAGE_SIZE = 224  # RGBDTPreprocessor(img_size=[3, 2, 224, 224]) and data.py's transform
# ImageBind's own eval preprocessing (imagebind/data.py load_and_transform_vision_data): Resize(224, bicubic),
# CenterCrop(224), ToTensor, Normalize with the OpenAI CLIP mean and std.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

_PRE, _TRUNK, _HEAD = "modality_preprocessors.vision.", "modality_trunks.vision.", "modality_heads.vision."
_STEM = _PRE + "rgbt_stem.proj.1.weight"
_RULES = [  # (publisher key relative to its prefix, omniforge key); the stem, tokens and proj are reshaped
    (_PRE + r"cls_token", "class_embedding"),
    (_PRE + r"pos_embedding_helper\.pos_embed", "positional_embedding"),
    (_TRUNK + r"pre_transformer_layer\.0\.(weight|bias)", r"ln_pre.\1"),
    (_TRUNK + r"blocks\.(\d+)\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     r"transformer.resblocks.\1.attn.\2"),
    (_TRUNK + r"blocks\.(\d+)\.norm_([12])\.(weight|bias)", r"transformer.resblocks.\1.ln_\2.\3"),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (_HEAD + r"0\.(weight|bias)", r"ln_post.\1"),
    (_HEAD + r"2\.weight", "proj"),
]


@dataclass(frozen=True)
class VisionArch:
    """The sizes of an ImageBind vision tower, as read from its checkpoint."""

    width: int
    layers: int
    mlp_width: int
    patch_size: int
    grid: int
    output_dim: int

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size


def load_state_dict(path: str) -> Mapping[str, Any]:
    """A local checkpoint's tensors: a .safetensors file, or a torch file loaded with weights_only=True
    (memory-mapped when it is a zip archive, so imagebind_huge.pth's 4.5 GB of every modality cost no copy). A
    training checkpoint's "state_dict" is unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    return obj


def is_imagebind_state_dict(state: Mapping[str, Any]) -> bool:
    """True for ImageBindModel's layout (its vision stem key is there)."""
    return _STEM in state


def is_open_clip_state_dict(state: Mapping[str, Any]) -> bool:
    """True for an open_clip CLIP state dict (image tower under "visual.", DDP's "module." prefix allowed)."""
    return any(str(k).removeprefix("module.").startswith("visual.") for k in state)


def vision_arch(state: Mapping[str, Any]) -> VisionArch:
    """The tower's sizes, from the shapes of its stem, position embedding, blocks and head."""
    stem = state[_STEM]  # (W, 3, T, p, p)
    if stem.ndim != 5 or stem.shape[1] != 3 or stem.shape[2] != STEM_FRAMES or stem.shape[3] != stem.shape[4]:
        raise ValueError(f"{_STEM} has shape {tuple(stem.shape)}, expected (width, 3, {STEM_FRAMES}, p, p): "
                         f"ImageBind's Conv3d stem with kernel ({STEM_FRAMES}, p, p)")
    width, patch = int(stem.shape[0]), int(stem.shape[3])
    if width % VISION_HEADS:
        raise ValueError(f"vision width {width} does not split into ImageBind's {VISION_HEADS} heads")
    pos = state[_PRE + "pos_embedding_helper.pos_embed"]  # (1, 1 + grid * grid, W)
    grid = math.isqrt(pos.shape[1] - 1)
    if pos.ndim != 3 or grid * grid != pos.shape[1] - 1 or pos.shape[2] != width or grid * patch != IMAGE_SIZE:
        raise ValueError(f"position embedding has shape {tuple(pos.shape)}, expected (1, 1 + g * g, {width}) with "
                         f"g = {IMAGE_SIZE} / patch {patch}: ImageBind's vision input is {IMAGE_SIZE} x {IMAGE_SIZE}")
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(_TRUNK) + r"blocks\.(\d+)\.", str(k)))}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"vision blocks {sorted(blocks)} are not numbered 0..n-1")
    mlp_width = int(state[_TRUNK + "blocks.0.mlp.fc1.weight"].shape[0]) if blocks else 4 * width
    return VisionArch(width=width, layers=len(blocks), mlp_width=mlp_width, patch_size=patch, grid=grid,
                      output_dim=int(state[_HEAD + "2.weight"].shape[0]))


def convert_imagebind_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """ImageBindModel's state dict -> a float32 state dict for open_clip's VisionTransformer (see the module
    docstring for the map). Raises ValueError on a vision key no rule maps."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        key = str(key)
        if not key.startswith((_PRE, _TRUNK, _HEAD)):
            continue  # another modality, or a postprocessor's logit scale
        if key == _STEM:
            out["conv1.weight"] = value.float().sum(dim=2)  # (W, 3, 2, p, p) -> (W, 3, p, p)
            continue
        for pattern, repl in _RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value.float()
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} vision keys are not part of ImageBind's vision tower, e.g. {unknown[:3]}")
    for name in ("class_embedding", "positional_embedding"):
        if name in out:
            out[name] = out[name].reshape(out[name].shape[-2:] if name == "positional_embedding" else (-1,))
    if "proj" in out:
        out["proj"] = out["proj"].t().contiguous()  # Linear (out, W) -> open_clip's x @ proj, (W, out)
    return out


def build_imagebind_vision(state: Mapping[str, Any]) -> Any:
    """open_clip's VisionTransformer holding ImageBind's vision tower, with `output_tokens=True`. Built on the
    meta device and filled from the checkpoint (strict: a missing key is an error), so no random init is paid."""
    import torch
    from open_clip.transformer import LayerNorm, VisionTransformer

    arch = vision_arch(state)
    mlp_ratio = arch.mlp_width / arch.width
    if int(arch.width * mlp_ratio) != arch.mlp_width:
        raise ValueError(f"MLP width {arch.mlp_width} is not a ratio open_clip can build from width {arch.width}")
    with torch.device("meta"):
        tower = VisionTransformer(image_size=arch.image_size, patch_size=arch.patch_size, width=arch.width,
                                  layers=arch.layers, heads=VISION_HEADS, mlp_ratio=mlp_ratio,
                                  output_dim=arch.output_dim, act_layer=torch.nn.GELU,
                                  norm_layer=partial(LayerNorm, eps=LAYER_NORM_EPS), output_tokens=True)
    tower.load_state_dict(convert_imagebind_state_dict(state), strict=True, assign=True)
    return tower


def imagebind_transform() -> Any:
    """ImageBind's own eval preprocessing, PIL RGB -> (3, 224, 224) float tensor (open_clip's equivalent)."""
    from open_clip.transform import image_transform

    return image_transform(IMAGE_SIZE, is_train=False, mean=MEAN, std=STD, interpolation="bicubic",
                           resize_mode="shortest")


__all__ = ["IMAGE_SIZE", "LAYER_NORM_EPS", "VISION_HEADS", "VisionArch", "build_imagebind_vision",
           "convert_imagebind_state_dict", "imagebind_transform", "is_imagebind_state_dict", "is_open_clip_state_dict",
           "load_state_dict", "vision_arch"]

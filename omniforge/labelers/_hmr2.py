"""HMR2.0 (Goel et al. 2023, "Humans in 4D", the 4D-Humans release) as omniforge runs it: the person crop, the
network, and a safe loader for the publisher's PyTorch Lightning checkpoint.

Network (architecture only, written here): a ViT backbone (`ViTBackbone`, ViT-H/16 in the release: width 1280,
32 blocks, 16 heads, MLP 5120) on the 256 x 192 middle of a 256 x 256 person crop, giving a (B, 1280, 16, 12)
feature map; and the SMPL transformer-decoder head (`SMPLHead`): one query token of zeros embedded by a Linear,
6 pre-norm layers of self-attention, cross-attention to the 192 backbone tokens and an MLP, then three Linear
read-outs whose outputs are added to the SMPL mean parameters (24 joint rotations in 6-d form, 10 betas, the
weak-perspective camera), `ief_iters` times, and the 6-d rotations turned into rotation matrices.

Key map, publisher (`state_dict` of the Lightning checkpoint) -> omniforge (`HMR2` module names):

    backbone.<k>                                                     -> backbone.<k>   (names unchanged)
    smpl_head.transformer.to_token_embedding.<p>                     -> head.token_embed.<p>
    smpl_head.transformer.pos_embedding                              -> head.query_pos
    smpl_head.transformer.transformer.layers.{i}.0.norm.<p>          -> head.layers.{i}.self_norm.<p>
    smpl_head.transformer.transformer.layers.{i}.0.fn.to_qkv.weight  -> head.layers.{i}.self_attn.qkv.weight
    smpl_head.transformer.transformer.layers.{i}.0.fn.to_out.0.<p>   -> head.layers.{i}.self_attn.out.<p>
    smpl_head.transformer.transformer.layers.{i}.1.norm.<p>          -> head.layers.{i}.cross_norm.<p>
    smpl_head.transformer.transformer.layers.{i}.1.fn.to_q.weight    -> head.layers.{i}.cross_attn.q.weight
    smpl_head.transformer.transformer.layers.{i}.1.fn.to_kv.weight   -> head.layers.{i}.cross_attn.kv.weight
    smpl_head.transformer.transformer.layers.{i}.1.fn.to_out.0.<p>   -> head.layers.{i}.cross_attn.out.<p>
    smpl_head.transformer.transformer.layers.{i}.2.norm.<p>          -> head.layers.{i}.mlp_norm.<p>
    smpl_head.transformer.transformer.layers.{i}.2.fn.net.0.<p>      -> head.layers.{i}.mlp.0.<p>
    smpl_head.transformer.transformer.layers.{i}.2.fn.net.3.<p>      -> head.layers.{i}.mlp.2.<p>
    smpl_head.dec{pose,shape,cam}.<p>                                -> head.dec_{pose,shape,cam}.<p>
    smpl_head.init_{body_pose,betas,cam}                             -> head.mean_{pose,betas,cam}

Every other key (discriminator.*, smpl.*, initialized) is dropped. A missing key, a key under backbone. or
smpl_head. that the map does not know, or a shape that differs is a WeightsError: no partial loads.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omniforge._smpl import BOX_ASPECT, CROP_SIZE, NUM_JOINTS, RESCALE_FACTOR, person_box
from omniforge.errors import WeightsError

# -- the release -------------------------------------------------------------------------------------------------

RELEASE_URL = "https://people.eecs.berkeley.edu/~jathushan/projects/4dhumans/hmr2_data.tar.gz"
CACHE_DIR = "~/.cache/4DHumans"  # where 4D-Humans' download_models() extracts the release
RELEASE_RUN = "logs/train/multiruns/hmr2/0"  # the run folder inside it: model_config.yaml, checkpoints/
RELEASE_CHECKPOINT = "epoch=35-step=1000000.ckpt"
MODEL_CONFIG = "model_config.yaml"

# From omniforge._smpl: CROP_SIZE (256, the square person crop), BOX_ASPECT ((192, 256), w:h: the box is expanded
# to it; the backbone sees the crop's middle 192 columns), NUM_JOINTS (24: the global orientation and 23 joints).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_BETAS, N_CAM = 10, 3


@dataclass(frozen=True)
class HMR2Config:
    """The sizes of one HMR2.0 network. The defaults are the release's: ViT-H/16 (4D-Humans builds it with
    these numbers in code; its model_config.yaml does not hold them) and the head of hmr_vit_transformer.yaml."""

    width: int = 1280
    depth: int = 32
    heads: int = 16
    mlp_hidden: int = 5120
    patch: int = 16
    head_width: int = 1024  # TRANSFORMER_DECODER.dim (4D-Humans' default; the release does not set it)
    head_depth: int = 6
    head_heads: int = 8
    head_dim_head: int = 64
    head_mlp: int = 1024
    ief_iters: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def grid(self) -> tuple[int, int]:
        """The backbone's token grid on the 256 x 192 input (its patch conv pads 2 pixels on every side)."""
        h, w = CROP_SIZE, CROP_SIZE * BOX_ASPECT[0] // BOX_ASPECT[1]
        return (h + 2 * PatchEmbed.PADDING - self.patch) // self.patch + 1, \
            (w + 2 * PatchEmbed.PADDING - self.patch) // self.patch + 1


# -- the person crop --------------------------------------------------------------------------------------------

def crop_size(box: np.ndarray, rescale: float = RESCALE_FACTOR) -> np.float32:
    """The side of the square crop of an XYXY pixel box (`omniforge._smpl.person_box`, which `show` uses to
    place the people too)."""
    return np.float32(person_box(box, rescale)[1])


def person_crop(image: np.ndarray, box: np.ndarray, rescale: float = RESCALE_FACTOR,
                mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> np.ndarray:
    """4D-Humans' person crop: (H, W, 3) uint8 RGB image, XYXY pixel box -> (3, 256, 256) float32, normalized.

    The square of side `crop_size(box, rescale)` centred on the box centre is mapped onto 256 x 256 pixels by
    an affine warp (OpenCV's bilinear `warpAffine`, zeros outside the image: a box partly or wholly outside the
    image gives a crop with black borders, or all black). When the square is more than 2.2 times the crop (a
    downsampling by more than 1.1 beyond the factor 2 bilinear interpolation already filters), the image is
    first blurred with a gaussian of sigma (f - 1) / 2 for f = side / 512, scikit-image's `gaussian` as
    4D-Humans calls it; then (x / 255 - mean) / std per channel (ImageNet's).

    One difference, on purpose: 4D-Humans warps the uint8 image when it does not blur, so its crop is rounded
    to integers, by an OpenCV fixed-point path that changed between OpenCV 4 and 5 (up to 4 levels apart on
    the same input); omniforge always warps in floating point, which is OpenCV's float path in both, so its
    crop is the unrounded one: within half a level (0.5 / 255 before normalization) of 4D-Humans' own.
    Only the pixels the warp reads (plus the gaussian's reach around them) are converted and blurred, which
    gives the same values as blurring the whole image. A box of zero width or height has no crop (the caller
    skips it)."""
    import cv2
    from skimage.filters import gaussian

    box = np.asarray(box, np.float32)
    center = (box[:2] + box[2:]) / np.float32(2.0)
    side = crop_size(box, rescale)
    factor = side / np.float32(CROP_SIZE) / np.float32(2.0)
    sigma = float((factor - 1) / 2) if factor > 1.1 else 0.0
    half = CROP_SIZE / 2
    src_pts = np.float32([center, center + [0, side / 2], center + [side / 2, 0]])  # centre, down, right
    dst_pts = np.float32([[half, half], [half, CROP_SIZE], [CROP_SIZE, half]])
    to_image = cv2.invertAffineTransform(cv2.getAffineTransform(src_pts, dst_pts))  # crop -> image pixels
    reach = 2 + (int(4.0 * sigma + 0.5) if sigma else 0)  # bilinear neighbours, scipy's gaussian radius
    (x0, y0), (x1, y1) = _window(center, side, reach, image.shape[:2])
    patch = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.float64)
    if x1 > x0 and y1 > y0:  # else the square is wholly outside the image: black
        region = image[y0:y1, x0:x1]
        region = (gaussian(region, sigma=sigma, channel_axis=2, preserve_range=True) if sigma
                  else region.astype(np.float64))  # OpenCV 5 interpolates float32 more coarsely
        to_region = to_image - np.array([[0, 0, x0], [0, 0, y0]], np.float64)
        patch = cv2.warpAffine(region, to_region, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR |
                               cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    patch = patch.transpose(2, 0, 1).astype(np.float32)  # (3, 256, 256), 0..255
    scale = np.float32(255.0)
    return (patch - np.float32(mean)[:, None, None] * scale) / (np.float32(std)[:, None, None] * scale)


def _window(center: np.ndarray, side: float, reach: int, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """((x0, y0), (x1, y1)): the image pixels within `reach` of the square of `side` around `center`, clipped
    to the image (so that OpenCV's and scipy's border rules act at the image's own borders)."""
    h, w = shape
    lo = np.floor(center.astype(np.float64) - side / 2).astype(int) - reach
    hi = np.ceil(center.astype(np.float64) + side / 2).astype(int) + reach + 1
    return (max(lo[0], 0), max(lo[1], 0)), (min(hi[0], w), min(hi[1], h))


# -- the network ------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """16 x 16 patches by a strided conv that pads 2 pixels on every side (4D-Humans' ViTPose-style stem)."""

    PADDING: ClassVar[int] = 2

    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch, padding=self.PADDING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, h, w)


class ViTBackbone(nn.Module):
    """Patch embedding, an absolute position embedding (its first entry, a class token's slot in the pretrained
    ViTPose, added to every patch), pre-norm blocks (timm's), a final LayerNorm: (B, 3, 256, 192) ->
    (B, D, 16, 12)."""

    def __init__(self, cfg: HMR2Config):
        super().__init__()
        from timm.models.vision_transformer import Block

        h, w = cfg.grid
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(cfg.width, cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w + 1, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_hidden / cfg.width, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.depth))
        self.last_norm = norm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
        x = x + self.pos_embed[:, 1:] + self.pos_embed[:, :1]
        for block in self.blocks:
            x = block(x)
        x = self.last_norm(x)
        return x.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)


class Attention(nn.Module):
    """Multi-head attention without q/k/v biases; self-attention (one `qkv` projection) or cross-attention to a
    context (`q` and `kv`). The output projection is absent when one head spans the whole width."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        else:
            self.q = nn.Linear(dim, inner, bias=False)
            self.kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.out = nn.Identity() if heads == 1 and dim_head == dim else nn.Linear(inner, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, N, dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, inner) each
        else:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        return self.out(out.transpose(1, 2).flatten(2))  # (B, N, dim)


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the image tokens, and a GELU MLP, each added back."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp: int, context_dim: int):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dim_head)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dim_head, context_dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_norm(x))
        x = x + self.cross_attn(self.cross_norm(x), context)
        return x + self.mlp(self.mlp_norm(x))


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3): the 6-d rotation form of Zhou et al. 2019, the matrix's first two columns one
    after the other, made orthonormal by Gram-Schmidt; the third column is their cross product."""
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    return torch.stack((b1, b2, torch.linalg.cross(b1, b2, dim=-1)), dim=-1)


class SMPLHead(nn.Module):
    """Backbone features -> SMPL parameters and camera (see the module docstring), in float32."""

    def __init__(self, cfg: HMR2Config):
        super().__init__()
        dim = cfg.head_width
        self.ief_iters = cfg.ief_iters
        self.token_embed = nn.Linear(1, dim)
        self.query_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(DecoderLayer(dim, cfg.head_heads, cfg.head_dim_head, cfg.head_mlp, cfg.width)
                                    for _ in range(cfg.head_depth))
        self.dec_pose = nn.Linear(dim, 6 * NUM_JOINTS)
        self.dec_shape = nn.Linear(dim, N_BETAS)
        self.dec_cam = nn.Linear(dim, N_CAM)
        self.register_buffer("mean_pose", torch.zeros(1, 6 * NUM_JOINTS))
        self.register_buffer("mean_betas", torch.zeros(1, N_BETAS))
        self.register_buffer("mean_cam", torch.zeros(1, N_CAM))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        # float32 whatever the autocast: the head is a few percent of the network's work, and bfloat16 here
        # doubles the error of the rotations
        with torch.autocast(features.device.type, enabled=False):
            b = features.shape[0]
            context = features.float().flatten(2).transpose(1, 2)  # (B, h*w, C)
            x = self.token_embed(context.new_zeros(b, 1, 1)) + self.query_pos  # (B, 1, dim)
            for layer in self.layers:
                x = layer(x, context)
            token = x[:, 0]  # (B, dim)
            # The query is the zero token at every refinement step, so the decoder's output is the same each
            # time: 4D-Humans' loop adds the same three read-outs `ief_iters` times.
            pose, betas, cam = self.mean_pose.expand(b, -1), self.mean_betas.expand(b, -1), self.mean_cam.expand(b, -1)
            for _ in range(self.ief_iters):
                pose = self.dec_pose(token) + pose
                betas = self.dec_shape(token) + betas
                cam = self.dec_cam(token) + cam
            rotations = rot6d_to_rotmat(pose.reshape(b, NUM_JOINTS, 6))  # (B, 24, 3, 3)
        return {"global_orient": rotations[:, :1], "body_pose": rotations[:, 1:], "betas": betas, "pred_cam": cam,
                "pose_6d": pose, "token": token}


class HMR2(nn.Module):
    """(B, 3, 256, 256) normalized person crops -> {"global_orient": (B, 1, 3, 3), "body_pose": (B, 23, 3, 3),
    "betas": (B, 10), "pred_cam": (B, 3), "pose_6d": (B, 144), "token": (B, head width), "features":
    (B, D, 16, 12)}. The backbone sees the crop's middle 192 columns, as 4D-Humans' forward_step."""

    def __init__(self, cfg: HMR2Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = ViTBackbone(cfg)
        self.head = SMPLHead(cfg)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        margin = (CROP_SIZE - CROP_SIZE * BOX_ASPECT[0] // BOX_ASPECT[1]) // 2  # 32
        features = self.backbone(crops[..., margin:CROP_SIZE - margin])  # (B, D, 16, 12)
        return {**self.head(features), "features": features}


# -- the release's model_config.yaml ---------------------------------------------------------------------------

def _get(cfg: Any, path: str, default: Any = None) -> Any:
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def read_model_config(path: str) -> dict[str, Any]:
    """The head sizes and preprocessing of a 4D-Humans model_config.yaml (read with yaml.safe_load: plain data,
    whatever OmegaConf wrote), checked against what omniforge implements; everything else in it is unused."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise WeightsError(f"cannot read the HMR2.0 model config {path}: {' '.join(str(e).split())[:200]}") from e

    def require(key: str, want: Any, default: Any = None) -> None:
        got = _get(cfg, key, default)
        if got != want:
            raise WeightsError(f"{path}: {key} is {got!r}; omniforge's HMR2.0 implements {want!r} (the release's)")

    require("MODEL.IMAGE_SIZE", CROP_SIZE)
    require("MODEL.BBOX_SHAPE", list(BOX_ASPECT), list(BOX_ASPECT))
    require("MODEL.BACKBONE.TYPE", "vit")
    require("MODEL.SMPL_HEAD.TYPE", "transformer_decoder")
    require("MODEL.SMPL_HEAD.JOINT_REP", "6d", "6d")
    require("MODEL.SMPL_HEAD.TRANSFORMER_INPUT", "zero", "zero")
    require("SMPL.NUM_BODY_JOINTS", NUM_JOINTS - 1)
    decoder = _get(cfg, "MODEL.SMPL_HEAD.TRANSFORMER_DECODER")
    if not isinstance(decoder, dict):
        raise WeightsError(f"{path}: MODEL.SMPL_HEAD.TRANSFORMER_DECODER is missing: pass the model_config.yaml "
                           f"that came with the checkpoint")
    for key, want in (("norm", "layer"), ("skip_token_embedding", False), ("norm_cond_dim", -1)):
        if decoder.get(key, want) != want:
            raise WeightsError(f"{path}: TRANSFORMER_DECODER.{key} is {decoder[key]!r}; omniforge implements {want!r}")
    sizes = {"head_width": decoder.get("dim", 1024), "head_depth": decoder.get("depth"),
             "head_heads": decoder.get("heads"), "head_dim_head": decoder.get("dim_head", 64),
             "head_mlp": decoder.get("mlp_dim"), "ief_iters": _get(cfg, "MODEL.SMPL_HEAD.IEF_ITERS", 1)}
    context = decoder.get("context_dim")
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WeightsError(f"{path}: the head's {key} is {value!r}, expected a positive integer")
    mean, std = _get(cfg, "MODEL.IMAGE_MEAN", list(IMAGENET_MEAN)), _get(cfg, "MODEL.IMAGE_STD", list(IMAGENET_STD))
    for key, value in (("IMAGE_MEAN", mean), ("IMAGE_STD", std)):
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise WeightsError(f"{path}: MODEL.{key} is {value!r}, expected 3 numbers")
    return {**sizes, "context_dim": context, "mean": tuple(map(float, mean)), "std": tuple(map(float, std))}


# -- the safe checkpoint reader -------------------------------------------------------------------------------

class Inert(dict):
    """What the checkpoint reader makes of every class or function it does not allow: an empty shell. Creating
    it, calling it, setting its state or appending to it does nothing and runs nothing; items set on it are
    kept as plain data. `pickled_as` names what the pickle asked for."""

    pickled_as: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __hash__(self) -> int:  # usable as a dict key or in a set, as the object it replaces may be (an Enum)
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"<inert {self.pickled_as}>"


_ALLOWED_GLOBALS = frozenset({  # what a tensor state dict needs; torch resolves the storage types itself
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
})


class _TensorOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        full = f"{module}.{name}"
        return type(f"Inert[{full}]", (Inert,), {"pickled_as": full})


class TensorOnlyPickle:
    """The `pickle_module` torch.load is given: its Unpickler resolves only the globals in _ALLOWED_GLOBALS."""

    __name__ = "omniforge.labelers._hmr2.TensorOnlyPickle"
    Unpickler = _TensorOnlyUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _TensorOnlyUnpickler(file, **kwargs).load()


def read_lightning_checkpoint(path: str) -> dict[str, Any]:
    """The whole Lightning checkpoint dict, with every tensor real and every other object inert.

    Why this is safe. A pickle can run code only through the callables it names: the GLOBAL/STACK_GLOBAL
    opcodes (and INST/OBJ/EXT, which go the same way) ask the unpickler's `find_class` for a class or function,
    and REDUCE, NEWOBJ and BUILD then call it, create it or hand it state. Here `find_class` returns the real
    object only for torch's tensor-rebuild functions and OrderedDict (torch itself resolves the storage types,
    and its own persistent_load reads the storages from the file's data records); any other name, e.g. the
    omegaconf DictConfig or yacs CfgNode in `hyper_parameters`, or `builtins.exec` in a crafted file, becomes
    an `Inert` class whose construction, call, state and appends are no-ops. So nothing the file names runs,
    and the tensors come out whole. (`torch.load(weights_only=True)`, the rule elsewhere in omniforge, refuses
    these checkpoints outright: their hyper_parameters hold config classes it does not know.)
    """
    kwargs = dict(map_location="cpu", pickle_module=TensorOnlyPickle, weights_only=False)
    try:
        try:
            return torch.load(path, mmap=True, **kwargs)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, **kwargs)  # a file in torch's legacy (non-zip) format cannot be mapped
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise WeightsError(f"cannot read {path} as a PyTorch Lightning checkpoint ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}): pass HMR2.0's .ckpt, e.g. {RELEASE_CHECKPOINT}") from e


_KEY_MAP = (  # (publisher, omniforge), see the module docstring; {i} a layer, {p} weight or bias, {k} anything
    ("backbone.{k}", "backbone.{k}"),
    ("smpl_head.transformer.to_token_embedding.{p}", "head.token_embed.{p}"),
    ("smpl_head.transformer.pos_embedding", "head.query_pos"),
    ("smpl_head.transformer.transformer.layers.{i}.0.norm.{p}", "head.layers.{i}.self_norm.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.0.fn.to_qkv.weight", "head.layers.{i}.self_attn.qkv.weight"),
    ("smpl_head.transformer.transformer.layers.{i}.0.fn.to_out.0.{p}", "head.layers.{i}.self_attn.out.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.1.norm.{p}", "head.layers.{i}.cross_norm.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.1.fn.to_q.weight", "head.layers.{i}.cross_attn.q.weight"),
    ("smpl_head.transformer.transformer.layers.{i}.1.fn.to_kv.weight", "head.layers.{i}.cross_attn.kv.weight"),
    ("smpl_head.transformer.transformer.layers.{i}.1.fn.to_out.0.{p}", "head.layers.{i}.cross_attn.out.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.2.norm.{p}", "head.layers.{i}.mlp_norm.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.2.fn.net.0.{p}", "head.layers.{i}.mlp.0.{p}"),
    ("smpl_head.transformer.transformer.layers.{i}.2.fn.net.3.{p}", "head.layers.{i}.mlp.2.{p}"),
    ("smpl_head.decpose.{p}", "head.dec_pose.{p}"),
    ("smpl_head.decshape.{p}", "head.dec_shape.{p}"),
    ("smpl_head.deccam.{p}", "head.dec_cam.{p}"),
    ("smpl_head.init_body_pose", "head.mean_pose"),
    ("smpl_head.init_betas", "head.mean_betas"),
    ("smpl_head.init_cam", "head.mean_cam"),
)
_FIELDS = {"i": r"\d+", "p": "weight|bias", "k": ".+"}
_PREFIXES = ("backbone.", "smpl_head.")


def _pattern(template: str) -> re.Pattern[str]:
    text = re.escape(template)
    for name, regex in _FIELDS.items():
        text = text.replace(re.escape("{" + name + "}"), f"(?P<{name}>{regex})")
    return re.compile(text)


_COMPILED = tuple((_pattern(pub), pub, _pattern(ours), ours) for pub, ours in _KEY_MAP)


def rename(key: str, *, to_publisher: bool = False) -> str | None:
    """A publisher key under omniforge's name (or, `to_publisher`, the other way); None when the map has none."""
    for pub_re, pub, ours_re, ours in _COMPILED:
        m = (ours_re if to_publisher else pub_re).fullmatch(key)
        if m:
            return (pub if to_publisher else ours).format(**m.groupdict())
    return None


def convert_hmr2_state_dict(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The publisher's backbone.* and smpl_head.* tensors under omniforge's names (float32); the other keys of
    the Lightning state dict are dropped. A key under those prefixes that the map does not know is an error."""
    out = {}
    for key, value in state.items():
        if not (isinstance(key, str) and key.startswith(_PREFIXES)):
            continue
        ours = rename(key)
        if ours is None:
            raise WeightsError(f"{source}: {key} is not part of HMR2.0's ViT backbone or SMPL transformer-decoder "
                               f"head as omniforge implements them; pass the release's checkpoint")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        out[ours] = value.float() if value.is_floating_point() else value
    return out


def config_from_weights(state: dict[str, torch.Tensor], head: dict[str, Any], backbone_heads: int,
                        source: str) -> HMR2Config:
    """The backbone's sizes read from its tensors (its head count cannot be: `backbone_heads`), the head's from
    model_config.yaml, checked against each other."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise WeightsError(f"{source}: {key} is missing; pass HMR2.0's checkpoint with its backbone")
        return tuple(state[key].shape)

    width, _, patch, _ = shape("backbone.patch_embed.proj.weight")
    depth = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    hidden = shape("backbone.blocks.0.mlp.fc1.weight")[0]
    if width % backbone_heads:
        raise WeightsError(f"{source}: the backbone is {width} wide, which backbone_heads={backbone_heads} does not "
                           f"divide: set --option human_poses.backbone_heads to its head count (16 for ViT-H)")
    context = head.pop("context_dim")
    if context is not None and context != width:
        raise WeightsError(f"{source}: the head's context_dim {context} is not the backbone's width {width}")
    return HMR2Config(width=width, depth=depth, heads=backbone_heads, mlp_hidden=hidden, patch=patch, **head)


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor of `model` from `state` (assigned, so a meta-device model takes the file's tensors);
    a missing, unexpected or differently shaped key is a WeightsError naming the first one."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise WeightsError(f"{source}: {_publisher_name(key)} is missing (omniforge's {key}); pass HMR2.0's "
                               f"checkpoint with the model_config.yaml that came with it")
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightsError(f"{source}: {_publisher_name(key)} has shape {tuple(state[key].shape)}, the model "
                               f"built from model_config.yaml expects {tuple(value.shape)}: pass the checkpoint's "
                               f"own model_config.yaml")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise WeightsError(f"{source}: {_publisher_name(extra[0])} has no place in the model built from "
                           f"model_config.yaml ({len(extra)} such keys): pass the checkpoint's own model_config.yaml")
    model.load_state_dict(state, strict=True, assign=True)


def _publisher_name(key: str) -> str:
    return rename(key, to_publisher=True) or key


def resolve_release(path: str) -> tuple[str, str]:
    """(checkpoint file, model_config.yaml) of `path`: a .ckpt file (its config two folders up, as 4D-Humans'
    load_hmr2 finds it) or a run folder holding model_config.yaml and checkpoints/ with one .ckpt."""
    path = os.path.abspath(os.path.expanduser(path))
    hint = (f"pass --weights human_poses=PATH with PATH the release's run folder ({CACHE_DIR}/{RELEASE_RUN}, "
            f"holding {MODEL_CONFIG} and checkpoints/) or its .ckpt file")
    if os.path.isdir(path):
        folder = os.path.join(path, "checkpoints")
        ckpts = sorted(f for f in os.listdir(folder) if f.endswith(".ckpt")) if os.path.isdir(folder) else []
        if len(ckpts) != 1:
            found = f"{len(ckpts)} .ckpt files ({', '.join(ckpts[:3])})" if ckpts else "no .ckpt file"
            raise WeightsError(f"human_poses: {folder} holds {found}; {hint}")
        ckpt = os.path.join(folder, ckpts[0])
    elif os.path.isfile(path):
        ckpt = path
    else:
        raise WeightsError(f"human_poses: checkpoint {path} not found; {hint}, or --weights tiny for random weights")
    config = os.path.join(os.path.dirname(os.path.dirname(ckpt)), MODEL_CONFIG)
    if not os.path.isfile(config):
        raise WeightsError(f"human_poses: {config} not found (4D-Humans keeps it two folders above the .ckpt); {hint}")
    return ckpt, config


def load_hmr2(path: str, backbone_heads: int) -> HMR2:
    """HMR2.0 from the publisher's release (`resolve_release`), on the CPU, in eval mode."""
    ckpt, config = resolve_release(path)
    head = read_model_config(config)
    checkpoint = read_lightning_checkpoint(ckpt)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{ckpt} has no state_dict: it is not a PyTorch Lightning checkpoint like "
                           f"{RELEASE_CHECKPOINT}")
    state = convert_hmr2_state_dict(state, ckpt)
    cfg = config_from_weights(state, head, backbone_heads, ckpt)
    with torch.device("meta"):
        model = HMR2(cfg)
    load_state_dict_strict(model, state, ckpt)
    return model.eval()


def tiny_config(backbone_heads: int) -> HMR2Config:
    """The `tiny` network: the release's layout at width 64 (2 blocks) and a 32-wide, 2-layer head."""
    return HMR2Config(width=64, depth=2, heads=backbone_heads, mlp_hidden=256, head_width=32, head_depth=2,
                      head_heads=2, head_dim_head=16, head_mlp=64)


def build_tiny(backbone_heads: int) -> HMR2:
    """A random HMR2 at `tiny_config` (seed it first) with mean parameters of identity rotations, zero betas and
    the camera (0.9, 0, 0)."""
    model = HMR2(tiny_config(backbone_heads))
    with torch.no_grad():
        model.head.mean_pose.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]).repeat(NUM_JOINTS)[None])
        model.head.mean_cam.copy_(torch.tensor([[0.9, 0.0, 0.0]]))
        nn.init.trunc_normal_(model.backbone.pos_embed, std=0.02)
        nn.init.normal_(model.head.query_pos)
    return model.eval()


__all__ = ["CACHE_DIR", "HMR2", "HMR2Config", "Inert", "RELEASE_CHECKPOINT", "RELEASE_RUN",
           "RELEASE_URL", "SMPLHead", "TensorOnlyPickle", "ViTBackbone", "build_tiny", "convert_hmr2_state_dict",
           "crop_size", "load_hmr2", "person_crop", "read_lightning_checkpoint", "read_model_config",
           "rename", "resolve_release", "rot6d_to_rotmat", "tiny_config"]

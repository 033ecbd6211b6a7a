"""Tokenizer models: turn label arrays into discrete tokens and back, as 4M-21 does.

- Image-like labels (rgb, depth, normal, edges, semantic segmentation, feature maps, SAM instance masks):
  a ViT encoder/decoder VQ-VAE. Patches are embedded, run through a pre-norm transformer with fixed 2-D
  sin-cos position embeddings, projected to a 32-d latent and quantized with an EMA, cosine-similarity
  codebook with dead-code restarts (lucidrains' `vector_quantize_pytorch.VectorQuantize`); a mirror
  transformer decodes the codes back to patches.
- Global embeddings (dinov2_global, imagebind_global): a bottleneck MLP maps the vector to 16 queries,
  quantized with Memcodes (`memcodes.py`), and a second MLP maps the 16 codes back to the vector.

Data flows through three spaces:

    label arrays --prepare()--> model batch --encode()--> token ids (B, num_tokens)
    token ids --decode()--> model-space reconstruction --restore()--> label arrays

`prepare` / `restore` are pure functions of the tokenizer name; the model never sees uint8 or uint16 data.
The model space per kind:

    pixels        float (B, C, H, W) in [-1, 1]                 decode: float (B, C, H, W), unclamped
    segmentation  int64 (B, H, W), class ids, 133 = none        decode: class logits (B, 134, H, W)
    features      float (B, C, h, w)                            decode: float (B, C, h, w)
    global        float (B, D)                                  decode: float (B, D)
    mask          float (B, 1, 64, 64) in {0, 1}                decode: probabilities (B, 1, 64, 64)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.modalities import get_modality
from omniforge.tokenize._vit import BottleneckMLP, ViTStack, unpatchify
from omniforge.tokenize.memcodes import Memcodes

KINDS = ("pixels", "segmentation", "features", "global", "mask")
SIZES = ("tiny", "base")

SEMSEG_NUM_CLASSES = 134  # 133 COCO panoptic classes + 1 "none"
SEMSEG_NONE_CLASS = 133  # the model's class for label value 255
SEMSEG_NONE_LABEL = 255  # "no class" in the semseg_coco label png
SAM_MASK_SIZE = 64
SAM_MASK_CODEBOOK = 1024

# What each tokenizer eats: kind, and for pixel kinds the label layout (channels) at the 224 input size.
# Feature and global sizes come from the modality registry's array shapes.
_KIND = {
    "rgb": "pixels",
    "depth": "pixels",
    "normal": "pixels",
    "canny_edge": "pixels",
    "sam_edge": "pixels",
    "semseg_coco": "segmentation",
    "clip": "features",
    "dinov2": "features",
    "imagebind": "features",
    "dinov2_global": "global",
    "imagebind_global": "global",
    "sam_mask": "mask",
}
_PIXEL_CHANNELS = {"rgb": 3, "normal": 3, "depth": 1, "canny_edge": 1, "sam_edge": 1}
_PIXEL_DTYPE = {"rgb": np.uint8, "normal": np.uint8, "depth": np.uint16, "canny_edge": np.uint8, "sam_edge": np.uint8}
_PIXEL_SIZE = 224
_PATCH = 16

TOKENIZER_NAMES: tuple[str, ...] = tuple(_KIND)

# dead-code threshold as 4M computes it: (tokens per batch / codebook size) / coefficient
_TINY_DEAD_CODE_THRESHOLD = 2.0
_DEAD_CODE_COEF = 32.0
_REFERENCE_BATCH = {"tiny": 8, "base": 64}


@dataclass(kw_only=True)
class TokenizerConfig:
    """Everything needed to rebuild a tokenizer; JSON-serializable through to_dict()/from_dict().

    For the ViT kinds `dim`/`depth`/`heads` size both the encoder and the decoder transformer; for "global"
    `dim` is the MLP width and `depth` its number of residual blocks (`heads` is unused, 0).
    """

    name: str  # a label modality ("depth", "clip", "dinov2_global", ...) or "sam_mask"
    kind: str  # one of KINDS
    in_channels: int  # input channels; segmentation: number of classes; global: vector length
    image_size: int  # input side (224, 64, 14 or 16); 0 for global
    patch_size: int  # 16 for 224 and 64 inputs, 1 for feature maps, 0 for global
    codebook_size: int  # token vocabulary
    latent_dim: int = 32  # width of one code vector
    dim: int
    depth: int
    heads: int
    num_tokens: int  # tokens per sample: (image_size / patch_size)^2, or the Memcodes positions for global
    mlp_ratio: float = 4.0  # transformer MLP expansion
    class_emb_dim: int = 32  # segmentation: per-pixel class embedding width
    ema_decay: float = 0.99  # VectorQuantize EMA decay of the codebook
    threshold_ema_dead_code: float = 0.0  # codes whose EMA usage falls below this are restarted (VQ kinds: > 0)
    commitment_weight: float = 1.0  # VectorQuantize commitment loss weight
    memcodes_temperature: float = 1.0  # global: Gumbel-softmax temperature during training

    def __post_init__(self):
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"tokenizer config {self.name!r}: {field}={getattr(self, field)!r} {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"is not one of {', '.join(KINDS)}")
        for field in ("in_channels", "codebook_size", "latent_dim", "dim", "depth", "num_tokens"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                raise bad(field, "must be a positive integer")
        if not 0.0 < self.ema_decay < 1.0:
            raise bad("ema_decay", "must lie in (0, 1)")
        if self.kind == "global":
            if self.image_size != 0 or self.patch_size != 0:
                raise bad("image_size", "and patch_size must be 0 for a global tokenizer")
            return
        if self.heads <= 0 or self.dim % self.heads != 0:
            raise bad("heads", f"must be positive and divide dim={self.dim}")
        if self.dim % 4 != 0:
            raise bad("dim", "must be divisible by 4 (2-D sin-cos position embeddings)")
        if self.patch_size <= 0 or self.image_size <= 0 or self.image_size % self.patch_size != 0:
            raise bad("patch_size", f"must be positive and divide image_size={self.image_size}")
        grid_tokens = (self.image_size // self.patch_size) ** 2
        if grid_tokens != self.num_tokens:
            raise bad("num_tokens", f"must be (image_size / patch_size)^2 = {grid_tokens}")
        if self.threshold_ema_dead_code <= 0:
            raise bad("threshold_ema_dead_code", "must be > 0 (dead-code restarts)")
        if self.kind == "segmentation" and self.class_emb_dim <= 0:
            raise bad("class_emb_dim", "must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown tokenizer config fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:  # a missing required field
            raise ConfigError(f"incomplete tokenizer config: {e}") from None


def default_config(name: str, size: str = "tiny") -> TokenizerConfig:
    """The tokenizer config for `name` at `size` ("tiny": fast CPU tests; "base": the 4M-21 scale)."""
    if name not in _KIND:
        raise ConfigError(f"no tokenizer named {name!r}; known tokenizers: {', '.join(TOKENIZER_NAMES)}")
    if size not in SIZES:
        raise ConfigError(f"unknown tokenizer size {size!r}; choose one of {', '.join(SIZES)}")
    kind = _KIND[name]
    tiny = size == "tiny"
    if kind == "global":
        (d,) = get_modality(name).shape
        num_tokens = get_modality(name).num_tokens
        return TokenizerConfig(
            name=name, kind=kind, in_channels=d, image_size=0, patch_size=0,
            codebook_size=128 if tiny else get_modality(name).vocab_size,
            latent_dim=32 if tiny else 64, dim=128 if tiny else 1024, depth=2 if tiny else 6, heads=0,
            num_tokens=num_tokens,
        )
    if kind == "features":
        h, w, c = get_modality(name).shape
        in_channels, image_size, patch_size = c, h, 1
    elif kind == "mask":
        in_channels, image_size, patch_size = 1, SAM_MASK_SIZE, _PATCH
    elif kind == "segmentation":
        in_channels, image_size, patch_size = SEMSEG_NUM_CLASSES, _PIXEL_SIZE, _PATCH
    else:
        in_channels, image_size, patch_size = _PIXEL_CHANNELS[name], _PIXEL_SIZE, _PATCH
    num_tokens = (image_size // patch_size) ** 2
    base_codebook = SAM_MASK_CODEBOOK if kind == "mask" else get_modality(name).vocab_size
    if kind != "mask" and get_modality(name).num_tokens != num_tokens:  # the registry is the contract
        raise ConfigError(f"tokenizer {name!r} would make {num_tokens} tokens, the registry says "
                          f"{get_modality(name).num_tokens}")
    codebook_size = 128 if tiny else base_codebook
    # ml-4m's rule for real runs (expected hits per code per batch / 32). Tiny runs are a few dozen steps:
    # at that threshold their codebook sits on a handful of codes for hundreds of steps before restarts
    # rescue it, so they restart codes that average under 2 hits per batch from the start.
    threshold = _REFERENCE_BATCH[size] * num_tokens / codebook_size / _DEAD_CODE_COEF
    if tiny:
        threshold = max(_TINY_DEAD_CODE_THRESHOLD, threshold)
    return TokenizerConfig(
        name=name, kind=kind, in_channels=in_channels, image_size=image_size, patch_size=patch_size,
        codebook_size=codebook_size, latent_dim=32,
        dim=64 if tiny else 768, depth=1 if tiny else 12, heads=2 if tiny else 12, num_tokens=num_tokens,
        class_emb_dim=8 if tiny else 32, threshold_ema_dead_code=threshold,
    )


# ---------------------------------------------------------------------------------------------- models


class Tokenizer(nn.Module):
    """Base class: a trainable discrete tokenizer for one label type. `forward(x)` is `loss(x)`."""

    config: TokenizerConfig

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Training objective on a prepared batch; the logs hold "loss", "recon" and "quant" as floats."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Prepared batch -> int64 token ids (B, num_tokens). Deterministic; never updates the codebook."""
        raise NotImplementedError

    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, num_tokens) -> reconstruction in the model space (see the module docstring)."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.loss(x)

    def _check_ids(self, ids: Tensor) -> None:
        n = self.config.num_tokens
        if ids.ndim != 2 or ids.shape[1] != n:
            raise ValueError(f"{self.config.name} tokenizer decodes (B, {n}) ids, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"{self.config.name} token ids must lie in [0, {self.config.codebook_size})")


class VQViTTokenizer(Tokenizer):
    """ViT encoder -> 32-d latent -> EMA cosine-similarity VQ -> ViT decoder, for every image-like kind."""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        from vector_quantize_pytorch import VectorQuantize

        c = config
        grid = c.image_size // c.patch_size
        if c.kind == "segmentation":
            self.class_embed = nn.Embedding(c.in_channels, c.class_emb_dim)
            embed_channels, self.out_channels = c.class_emb_dim, c.in_channels
        else:
            self.class_embed = None
            embed_channels = c.in_channels
            self.out_channels = 1 if c.kind == "mask" else c.in_channels
        self.patch_embed = nn.Conv2d(embed_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.encoder = ViTStack(grid=grid, dim=c.dim, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio)
        self.to_latent = nn.Linear(c.dim, c.latent_dim)
        self.quantizer = VectorQuantize(
            dim=c.latent_dim,
            codebook_size=c.codebook_size,
            codebook_dim=c.latent_dim,
            use_cosine_sim=True,
            decay=c.ema_decay,
            threshold_ema_dead_code=c.threshold_ema_dead_code,
            commitment_weight=c.commitment_weight,
            kmeans_init=False,
        )
        self.from_latent = nn.Linear(c.latent_dim, c.dim)
        self.decoder = ViTStack(grid=grid, dim=c.dim, depth=c.depth, heads=c.heads, mlp_ratio=c.mlp_ratio)
        self.to_patches = nn.Linear(c.dim, c.patch_size * c.patch_size * self.out_channels)

    def _latents(self, x: Tensor) -> Tensor:  # prepared batch -> (B, N, latent_dim)
        c = self.config
        if c.kind == "segmentation":
            if x.ndim != 3 or tuple(x.shape[1:]) != (c.image_size, c.image_size):
                raise ValueError(f"{c.name} tokenizer expects (B, {c.image_size}, {c.image_size}) class ids, "
                                 f"got {tuple(x.shape)}")
            x = self.class_embed(x.long()).permute(0, 3, 1, 2)  # (B, E, H, W)
        else:
            expected = (c.in_channels, c.image_size, c.image_size)
            if x.ndim != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(f"{c.name} tokenizer expects (B, {', '.join(map(str, expected))}), "
                                 f"got {tuple(x.shape)}")
        tokens = self.patch_embed(x.float()).flatten(2).transpose(1, 2)  # (B, N, D)
        return self.to_latent(self.encoder(tokens))  # (B, N, latent)

    def _decode_codes(self, codes: Tensor) -> Tensor:  # (B, N, latent) -> raw output (B, C_out, H, W)
        patches = self.to_patches(self.decoder(self.from_latent(codes)))  # (B, N, p*p*C_out)
        return unpatchify(patches, self.config.patch_size, self.out_channels)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        quantized, _, quant_loss = self.quantizer(self._latents(x))
        out = self._decode_codes(quantized)
        kind = self.config.kind
        if kind == "pixels":
            recon = F.mse_loss(out, x.float())
        elif kind == "segmentation":
            recon = F.cross_entropy(out, x.long())
        elif kind == "features":
            target = x.float()
            recon = F.smooth_l1_loss(out, target) + (1 - F.cosine_similarity(out, target, dim=1)).mean()
        else:  # mask
            recon = F.binary_cross_entropy_with_logits(out, x.float())
        quant_loss = quant_loss.sum()
        total = recon + quant_loss
        return total, {"loss": float(total.detach()), "recon": float(recon.detach()),
                       "quant": float(quant_loss.detach())}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        _, ids, _ = self.quantizer(self._latents(x), freeze_codebook=True)  # no EMA update, no restarts
        return ids.long()

    def decode(self, ids: Tensor) -> Tensor:
        self._check_ids(ids)
        out = self._decode_codes(self.quantizer.get_output_from_indices(ids.long()))
        return torch.sigmoid(out) if self.config.kind == "mask" else out


class MemcodesTokenizer(Tokenizer):
    """Bottleneck MLP -> 16 Memcodes tokens -> bottleneck MLP, for global embedding vectors."""

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        c = config
        width = c.num_tokens * c.latent_dim
        self.encoder = BottleneckMLP(dim_in=c.in_channels, dim=c.dim, dim_out=width, depth=c.depth)
        self.quantizer = Memcodes(dim=c.latent_dim, codebook_size=c.codebook_size, num_codebooks=c.num_tokens,
                                  temperature=c.memcodes_temperature)
        self.decoder = BottleneckMLP(dim_in=width, dim=c.dim, dim_out=c.in_channels, depth=c.depth)

    def _queries(self, x: Tensor) -> Tensor:  # (B, D) -> (B, num_tokens, latent)
        c = self.config
        if x.ndim != 2 or x.shape[1] != c.in_channels:
            raise ValueError(f"{c.name} tokenizer expects (B, {c.in_channels}), got {tuple(x.shape)}")
        return self.encoder(x.float()).reshape(x.shape[0], c.num_tokens, c.latent_dim)

    def _decode_codes(self, codes: Tensor) -> Tensor:  # (B, num_tokens, latent) -> (B, D)
        return self.decoder(codes.flatten(1))

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        quantized, _ = self.quantizer(self._queries(x))
        out = self._decode_codes(quantized)
        target = x.float()
        recon = (1 - F.cosine_similarity(out, target, dim=1)).mean() + F.mse_loss(out, target)
        value = float(recon.detach())
        return recon, {"loss": value, "recon": value, "quant": 0.0}

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.quantizer.indices(self._queries(x))

    def decode(self, ids: Tensor) -> Tensor:
        self._check_ids(ids)
        return self._decode_codes(self.quantizer.from_indices(ids.long()))


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """A freshly initialised tokenizer (training mode). Seeds nothing: callers seed torch themselves."""
    if cfg.kind == "global":
        return MemcodesTokenizer(cfg)
    return VQViTTokenizer(cfg)


# ------------------------------------------------------------------------------ label arrays <-> batch


def _kind_of(name: str) -> str:
    try:
        return _KIND[name]
    except KeyError:
        raise ConfigError(f"no tokenizer named {name!r}; known tokenizers: {', '.join(TOKENIZER_NAMES)}") from None


def _input_layout(name: str) -> tuple[tuple[int, ...], str]:
    """The label array shape a tokenizer eats, and a dtype description."""
    kind = _kind_of(name)
    if kind == "pixels":
        c = _PIXEL_CHANNELS[name]
        shape = (_PIXEL_SIZE, _PIXEL_SIZE, c) if c == 3 else (_PIXEL_SIZE, _PIXEL_SIZE)
        return shape, np.dtype(_PIXEL_DTYPE[name]).name
    if kind == "segmentation":
        return (_PIXEL_SIZE, _PIXEL_SIZE), "uint8"
    if kind == "mask":
        return (SAM_MASK_SIZE, SAM_MASK_SIZE), "uint8"
    return tuple(get_modality(name).shape), "float"


def prepare(name: str, arrays: list[np.ndarray]) -> Tensor:
    """Label arrays, already cropped/resized to the tokenizer's input size -> one model batch.

    Raises SampleError("bad_shape" | "bad_dtype" | "bad_value", ...) naming what was expected.
    """
    kind = _kind_of(name)
    shape, dtype_name = _input_layout(name)
    if len(arrays) == 0:
        raise ValueError(f"prepare({name!r}) needs at least one array")
    checked = []
    for arr in arrays:
        arr = np.asarray(arr)
        if arr.shape != shape:
            raise SampleError("bad_shape", f"{name} tokenizer input must have shape {shape}, got {arr.shape}")
        if dtype_name == "float":
            if not np.issubdtype(arr.dtype, np.floating):
                raise SampleError("bad_dtype", f"{name} tokenizer input must be float16/32, got {arr.dtype}")
            if not np.isfinite(arr).all():
                raise SampleError("bad_value", f"{name} tokenizer input holds NaN or infinite values")
        elif kind == "mask":
            if arr.dtype not in (np.uint8, np.bool_):
                raise SampleError("bad_dtype", f"{name} tokenizer input must be uint8 0/1, got {arr.dtype}")
        elif arr.dtype != np.dtype(dtype_name):
            raise SampleError("bad_dtype", f"{name} tokenizer input must be {dtype_name}, got {arr.dtype}")
        checked.append(arr)
    batch = np.stack(checked)
    if kind == "pixels":
        scale = float(np.iinfo(batch.dtype).max)  # 255 or 65535
        x = torch.from_numpy(batch.astype(np.float32) / scale * 2.0 - 1.0)
        return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.unsqueeze(1)  # (B, C, H, W)
    if kind == "segmentation":
        bad = (batch >= SEMSEG_NONE_CLASS) & (batch != SEMSEG_NONE_LABEL)
        if bad.any():
            raise SampleError("bad_value", f"{name} class ids must be 0..{SEMSEG_NONE_CLASS - 1} or "
                                           f"{SEMSEG_NONE_LABEL} (none), got {int(batch[bad][0])}")
        ids = batch.astype(np.int64)
        ids[ids == SEMSEG_NONE_LABEL] = SEMSEG_NONE_CLASS
        return torch.from_numpy(ids)  # (B, H, W)
    if kind == "mask":
        return torch.from_numpy((batch > 0).astype(np.float32)).unsqueeze(1)  # (B, 1, 64, 64)
    x = torch.from_numpy(batch.astype(np.float32))
    return x.permute(0, 3, 1, 2).contiguous() if kind == "features" else x  # (B, C, h, w) | (B, D)


def restore(name: str, x: Tensor) -> list[np.ndarray]:
    """Inverse of prepare for decode() outputs: back to the label dtype and layout, one array per sample."""
    kind = _kind_of(name)
    x = x.detach().float().cpu()
    if kind == "pixels":
        dtype = _PIXEL_DTYPE[name]
        batch = ((x.clamp(-1, 1) + 1) / 2 * float(np.iinfo(dtype).max)).round().numpy().astype(dtype)
        batch = batch.transpose(0, 2, 3, 1)  # (B, H, W, C)
        return [a if a.shape[-1] == 3 else a[..., 0] for a in batch]
    if kind == "segmentation":
        ids = x.argmax(dim=1).numpy().astype(np.uint8)  # (B, H, W)
        ids[ids == SEMSEG_NONE_CLASS] = SEMSEG_NONE_LABEL
        return list(ids)
    if kind == "mask":
        return list((x[:, 0] > 0.5).numpy().astype(np.uint8))
    batch = x.numpy().astype(np.float16)
    if kind == "features":
        batch = batch.transpose(0, 2, 3, 1)  # (B, h, w, C)
    return [np.ascontiguousarray(a) for a in batch]


# --------------------------------------------------------------------------------------------- metrics

_PSNR_MSE_FLOOR = 1e-10  # identical data gives a finite 106 dB instead of inf (JSON has no inf)


def quality(name: str, x: Tensor, recon: Tensor) -> dict[str, float]:
    """Reconstruction quality of a prepared batch `x` against decode() output `recon`.

    pixels: "psnr" (dB, data range 2 of [-1, 1] data, mean over images) and "mse"; segmentation: "miou"
    over the classes present in the target or the prediction ("none" included) and "pixel_acc";
    features/global: "cosine" (mean cosine similarity per position / per vector); mask: "iou".
    """
    kind = _kind_of(name)
    x, recon = x.detach().cpu(), recon.detach().cpu().float()
    if kind == "pixels":
        err = (recon.clamp(-1, 1) - x.float()) ** 2
        per_image = err.flatten(1).mean(dim=1).clamp(min=_PSNR_MSE_FLOOR)
        psnr = (10 * torch.log10(4.0 / per_image)).mean()
        return {"psnr": float(psnr), "mse": float(err.mean())}
    if kind == "segmentation":
        pred, target = recon.argmax(dim=1), x.long()
        ious = []
        for cls in torch.unique(torch.cat([pred.unique(), target.unique()])):
            p, t = pred == cls, target == cls
            ious.append(float((p & t).sum()) / float((p | t).sum()))
        return {"miou": float(np.mean(ious)), "pixel_acc": float((pred == target).float().mean())}
    if kind == "mask":
        p, t = recon > 0.5, x > 0.5
        union = float((p | t).sum())
        return {"iou": float((p & t).sum()) / union if union else 1.0}
    cos = F.cosine_similarity(recon, x.float(), dim=1)  # (B, h, w) | (B,)
    return {"cosine": float(cos.mean())}


def codebook_stats(ids: Tensor, codebook_size: int) -> dict[str, float]:
    """Code usage (fraction of codes seen) and perplexity (exp of the code histogram's entropy, nats)."""
    counts = torch.bincount(ids.detach().flatten().long().cpu(), minlength=codebook_size).double()
    if counts.numel() > codebook_size:
        raise ValueError(f"token ids exceed the codebook size {codebook_size}")
    total = counts.sum()
    if total == 0:
        return {"code_usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    entropy = -(p * p.log()).sum()
    return {"code_usage": float((counts > 0).sum() / codebook_size), "perplexity": float(entropy.exp())}


# ---------------------------------------------------------------------------------------- persistence

FORMAT = "omniforge-tokenizer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_tokenizer(model: Tokenizer, directory: str) -> None:
    """Write <directory>/config.json and <directory>/model.safetensors (weights and codebook buffers).

    Each file is written to a temporary name and renamed into place, so a crash never leaves half a file.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    meta = {"config": model.config.to_dict(), "format": FORMAT, "version": FORMAT_VERSION}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": FORMAT})
        os.replace(tmp, os.path.join(directory, WEIGHTS_FILE))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(directory, CONFIG_FILE))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokenizer(directory: str, device: str = "cpu") -> Tokenizer:
    """Rebuild a tokenizer written by save_tokenizer, in eval mode; WeightsError when it cannot."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    hint = "train one with `omniforge tokenizer train` or pass a directory written by save_tokenizer"
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"tokenizer config {config_path} not found: {hint}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"tokenizer config {config_path} is unreadable ({e}): {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise WeightsError(f"{config_path} is not an {FORMAT} v{FORMAT_VERSION} config: {hint}")
    try:
        cfg = TokenizerConfig.from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise WeightsError(f"tokenizer config {config_path} is invalid ({e}): {hint}") from None
    try:
        state = load_file(weights_path, device="cpu")
    except FileNotFoundError:
        raise WeightsError(f"tokenizer weights {weights_path} not found: {hint}") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise WeightsError(f"tokenizer weights {weights_path} are corrupt ({e}): {hint}") from None
    model = build_tokenizer(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise WeightsError(f"tokenizer weights {weights_path} do not match its config ({first}): {hint}") from None
    return model.to(device).eval()


__all__ = [
    "TOKENIZER_NAMES", "TokenizerConfig", "Tokenizer", "VQViTTokenizer", "MemcodesTokenizer", "default_config",
    "build_tokenizer", "prepare", "restore", "quality", "codebook_stats", "save_tokenizer", "load_tokenizer",
]


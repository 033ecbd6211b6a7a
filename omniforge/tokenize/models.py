"""Tokenizer models: the trainable networks behind the tokenizer kinds (`kinds.py`), and their files.

- `VQViTTokenizer`: patches are embedded, run through a pre-norm transformer with fixed 2-D sin-cos position
  embeddings, projected to a 32-d latent and quantized with an EMA, cosine-similarity codebook with dead-code
  restarts (lucidrains' `vector_quantize_pytorch.VectorQuantize`); a mirror transformer decodes the codes
  back to patches. `TokenizerConfig.kind` picks the input and loss: "pixels" (float (B, C, H, W), MSE),
  "segmentation" (int64 (B, H, W) class ids, embedded; cross-entropy over class logits), "features" (float
  (B, C, h, w); smooth-L1 plus cosine), "mask" (float (B, 1, 64, 64) in {0, 1}; BCE, decoded as
  probabilities). The position table follows the input grid (sin-cos, a pure function of it), so a
  tokenizer trained at `image_size` 224 encodes any square side that is a multiple of its patch (448 crops
  to 784 ids, as 4M-21's 224-448 tokenizers) and decodes any square count of ids back to that side.
- `MemcodesTokenizer` ("global"): a bottleneck MLP maps a (B, D) vector to `num_tokens` queries, quantized
  with Memcodes (`memcodes.py`), and a second MLP maps the codes back to the vector.

A trained tokenizer is a folder: `config.json` ({"config": TokenizerConfig fields, "format", "version"}) and
`model.safetensors` (weights and codebook buffers); see `save_tokenizer` / `load_tokenizer`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniforge.errors import ConfigError, WeightsError
from omniforge.tokenize._vit import BottleneckMLP, ViTStack, unpatchify
from omniforge.tokenize.memcodes import Memcodes

KINDS = ("pixels", "segmentation", "features", "global", "mask")  # model families (TokenizerConfig.kind)


@dataclass(kw_only=True)
class TokenizerConfig:
    """Everything needed to rebuild a tokenizer; JSON-serializable through to_dict()/from_dict().

    For the ViT kinds `dim`/`depth`/`heads` size both the encoder and the decoder transformer; for "global"
    `dim` is the MLP width and `depth` its number of residual blocks (`heads` is unused, 0).
    """

    name: str  # the tokenizer's folder under --tokenizers (a modality name, or a kind's shared folder)
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

    def _decodes(self, n: int) -> bool:
        """True when `decode` takes rows of n ids: the config's num_tokens."""
        return n == self.config.num_tokens

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.loss(x)

    def _check_ids(self, ids: Tensor) -> None:
        n = self.config.num_tokens
        if ids.ndim != 2 or not self._decodes(ids.shape[1]):
            raise ValueError(f"{self.config.name} tokenizer decodes (B, {n}) ids, got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"{self.config.name} token ids must lie in [0, {self.config.codebook_size})")


def vq_loss(kind: str, out: Tensor, x: Tensor, quant_loss: Tensor) -> tuple[Tensor, dict[str, float]]:
    """A ViT VQ-VAE's training loss: the reconstruction loss of its TokenizerConfig.kind (pixels: MSE;
    segmentation: cross-entropy of class logits; features: smooth-L1 plus cosine distance; mask: BCE of logits)
    of the raw decoder output `out` against the batch `x`, plus the quantizer's (commitment) loss."""
    if kind == "pixels":
        recon = F.mse_loss(out, x.float())
    elif kind == "segmentation":
        recon = F.cross_entropy(out, x.long())
    elif kind == "features":
        target = x.float()
        recon = F.smooth_l1_loss(out, target) + (1 - F.cosine_similarity(out, target, dim=1)).mean()
    else:  # mask
        recon = F.binary_cross_entropy_with_logits(out, x.float())
    total = recon + quant_loss
    return total, {"loss": float(total.detach()), "recon": float(recon.detach()), "quant": float(quant_loss.detach())}


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
        side = x.shape[-1] if x.ndim >= 3 else 0
        size = side if side > 0 and side % c.patch_size == 0 else c.image_size  # any square multiple of the patch
        if c.kind == "segmentation":
            if x.ndim != 3 or tuple(x.shape[1:]) != (size, size):
                raise ValueError(f"{c.name} tokenizer expects (B, {c.image_size}, {c.image_size}) class ids (or "
                                 f"another square side, a multiple of {c.patch_size}), got {tuple(x.shape)}")
            x = self.class_embed(x.long()).permute(0, 3, 1, 2)  # (B, E, H, W)
        else:
            expected = (c.in_channels, size, size)
            if x.ndim != 4 or tuple(x.shape[1:]) != expected:
                raise ValueError(f"{c.name} tokenizer expects (B, {c.in_channels}, {c.image_size}, {c.image_size}) "
                                 f"(or another square side, a multiple of {c.patch_size}), got {tuple(x.shape)}")
        tokens = self.patch_embed(x.float()).flatten(2).transpose(1, 2)  # (B, N, D)
        return self.to_latent(self.encoder(tokens))  # (B, N, latent)

    def _decodes(self, n: int) -> bool:
        """Any square grid of ids: a tokenizer trained at 224 (196 ids) decodes 448's 784 into 448 x 448."""
        return n > 0 and math.isqrt(n) ** 2 == n

    def _decode_codes(self, codes: Tensor) -> Tensor:  # (B, N, latent) -> raw output (B, C_out, H, W)
        patches = self.to_patches(self.decoder(self.from_latent(codes)))  # (B, N, p*p*C_out)
        return unpatchify(patches, self.config.patch_size, self.out_channels)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        quantized, _, quant_loss = self.quantizer(self._latents(x))
        return vq_loss(self.config.kind, self._decode_codes(quantized), x, quant_loss.sum())

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


# --------------------------------------------------------------------------------------------- metrics


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


__all__ = ["KINDS", "TokenizerConfig", "Tokenizer", "VQViTTokenizer", "MemcodesTokenizer", "build_tokenizer",
           "codebook_stats", "save_tokenizer", "load_tokenizer", "vq_loss"]


"""The networks of Apple's released 4M tokenizers (ml-4m's `fourm.vq`), written for omniforge.

Module and parameter names follow the hub checkpoints' state-dict layout where that costs nothing (the ViT
parts), so `ml4m.KEY_MAP` stays short; what differs is renamed there. Shapes in comments: B batch, D width,
N tokens, (nh, nw) the token grid, L the latent (code) width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-6  # ml-4m's ViT tokenizers build every LayerNorm with eps 1e-6 (torch's default is 1e-5)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d/h)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, h, N, N)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _grid_pos_emb(pos_emb: Tensor, nh: int, nw: int) -> Tensor:
    """The stored (1, D, h0, w0) position embedding at an (nh, nw) grid, flattened row-major to (1, N, D).

    A grid other than the trained one (224 inputs through a tokenizer trained at 448, or the reverse) gets the
    embedding resized bicubically (align_corners=False), as ml-4m's ViTs do on every forward pass; at the trained
    grid that resize is the identity."""
    grid = F.interpolate(pos_emb, size=(nh, nw), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class ViTEncoder(nn.Module):
    """Patches (or feature-map positions) -> transformer -> (B, D, nh, nw), ml-4m's ViT tokenizer encoder.

    patch_proj: a patch_size-strided conv embeds the patches; without it a 1 x 1 conv embeds every position of a
    feature map. post_mlp: a residual tanh MLP after the blocks. No final LayerNorm (ml-4m has none here).
    """

    def __init__(self, *, in_channels: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch_size: int,
                 grid: tuple[int, int], patch_proj: bool, post_mlp: bool):
        super().__init__()
        self.patch_size = patch_size if patch_proj else 1
        self.register_buffer("pos_emb", torch.zeros(1, dim, *grid))  # loaded from the checkpoint
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.has_post_mlp = post_mlp
        if post_mlp:
            self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
            self.post_mlp = _Mlp(dim, int(mlp_ratio * dim), act=nn.Tanh)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, D, nh, nw)
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input of {h} x {w} is not a whole number of {p} x {p} patches")
        nh, nw = h // p, w // p
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + _grid_pos_emb(self.pos_emb, nh, nw)
        for block in self.blocks:
            x = block(x)
        if self.has_post_mlp:
            x = x.float() + self.post_mlp(self.norm_mlp(x.float()))
        return x.transpose(1, 2).reshape(x.shape[0], -1, nh, nw)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7 x 7 conv, channels-last LayerNorm, pointwise MLP (x4, GELU), layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ViTDecoder(nn.Module):
    """(B, D, nh, nw) -> transformer -> patches (B, C, nh * p, nw * p), ml-4m's ViT tokenizer decoder.

    Each token is projected to C * p * p values, laid out channel-major (c, then the patch row, then the column).
    Without patch_proj a token is one position of a feature map (p = 1). out_conv: two ConvNeXt blocks on the
    output (the SAM mask tokenizer's).
    """

    def __init__(self, *, out_channels: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch_size: int,
                 grid: tuple[int, int], patch_proj: bool, post_mlp: bool, out_conv: bool):
        super().__init__()
        self.out_channels = out_channels
        self.patch_size = patch_size if patch_proj else 1
        self.register_buffer("pos_emb", torch.zeros(1, dim, *grid))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.has_post_mlp = post_mlp
        if post_mlp:
            self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
            self.post_mlp = _Mlp(dim, int(mlp_ratio * dim), act=nn.Tanh)
        self.out_proj = nn.Linear(dim, out_channels * self.patch_size ** 2)
        self.out_conv = nn.Sequential(ConvNeXtBlock(out_channels), ConvNeXtBlock(out_channels)) if out_conv else None

    def forward(self, x: Tensor) -> Tensor:  # (B, D, nh, nw) -> (B, C, H, W)
        b, _, nh, nw = x.shape
        x = x.flatten(2).transpose(1, 2) + _grid_pos_emb(self.pos_emb, nh, nw)  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        if self.has_post_mlp:
            x = x + self.post_mlp(self.norm_mlp(x))
        p, c = self.patch_size, self.out_channels
        x = self.out_proj(x).reshape(b, nh, nw, c, p, p)
        x = x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * p, nw * p)
        return self.out_conv(x) if self.out_conv is not None else x


class LucidCodebook(nn.Module):
    """The lucid quantizer's cosine codebook, at inference: a code is chosen by cosine similarity between the
    L2-normalised latent and the L2-normalised codebook rows, but the code vector it stands for (what decoding
    reads) is the raw, un-normalised row (EMA-trained rows are not unit length)."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.register_buffer("embed", torch.zeros(codebook_size, dim))  # (K, L), loaded from the checkpoint

    def similarities(self, latents: Tensor) -> Tensor:
        """(B, L, nh, nw) latents -> (B, N, K) cosine similarities to every code."""
        flat = F.normalize(latents.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, L)
        return flat @ F.normalize(self.embed, dim=-1).t()

    def indices(self, latents: Tensor) -> Tensor:
        return self.similarities(latents).argmax(dim=-1)  # (B, N)

    def vectors(self, ids: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N) ids -> (B, L, nh, nw) raw codebook rows."""
        rows = F.embedding(ids, self.embed)  # (B, N, L)
        return rows.transpose(1, 2).reshape(ids.shape[0], -1, *grid)


class ML4MTokenizer(nn.Module):
    """A released ml-4m tokenizer rebuilt in omniforge (`omniforge.tokenize.ml4m.load_snapshot` builds it): encode
    to token ids; decode when it has a ViT or MLP decoder. `config` is its ML4MConfig. Inference only."""

    is_ml4m = True

    def __init__(self, config, *, encoder: nn.Module, quant_proj: nn.Module, quantize: nn.Module,
                 cls_emb: nn.Module | None = None, post_quant_proj: nn.Module | None = None,
                 decoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.cls_emb = cls_emb
        self.encoder = encoder
        self.quant_proj = quant_proj
        self.quantize = quantize
        self.post_quant_proj = post_quant_proj
        self.decoder = decoder

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _latents(self, x: Tensor) -> Tensor:  # model space -> (B, L, nh, nw); (B, L, 1, 1) for MLP tokenizers
        c = self.config
        if c.mlp_encoder:
            if x.ndim == 4 and x.shape[2:] == (1, 1):
                x = x.flatten(1)  # ml-4m passes global vectors as (B, D, 1, 1)
            if x.ndim != 2 or x.shape[1] != c.n_channels:
                raise ValueError(f"this ml-4m MLP tokenizer reads (B, {c.n_channels}) vectors, got {tuple(x.shape)}")
            h = self.encoder(x.float())[:, :, None, None]
        else:
            if self.cls_emb is not None:
                if x.ndim != 3:
                    raise ValueError(f"this ml-4m class-map tokenizer reads (B, H, W) class ids, got {tuple(x.shape)}")
                x = self.cls_emb(x.long()).permute(0, 3, 1, 2)  # (B, C, H, W)
            elif x.ndim != 4 or x.shape[1] != c.n_channels:
                raise ValueError(f"this ml-4m tokenizer reads (B, {c.n_channels}, H, W), got {tuple(x.shape)}")
            h = self.encoder(x.float())
        return self.quant_proj(h)

    def scores(self, x: Tensor) -> Tensor:
        """Model-space batch -> (B, N, K): each token's score for every code (cosine similarity for lucid,
        attention logit for Memcodes, one codebook per head); the token ids are its argmax."""
        h = self._latents(x)
        if self.config.quant_type == "lucid":
            return self.quantize.similarities(h)
        return self.quantize.logits(h.flatten(1).reshape(h.shape[0], self.config.num_codebooks, -1))  # head-major

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Model-space batch -> int64 token ids (B, N): row-major over the token grid, or one per Memcodes head."""
        return self.scores(x).argmax(dim=-1)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """Token ids (B, N) -> model-space reconstruction: (B, C, H, W) from a ViT decoder (class logits for a
        class-map tokenizer, mask logits for SAM), (B, D) from an MLP decoder. NoDecoderError without one."""
        from omniforge.errors import NoDecoderError
        from omniforge.tokenize.ml4m import DIFFUSION_LINE

        c = self.config
        if self.decoder is None:
            why = DIFFUSION_LINE if c.decoder == "diffusion" else "the snapshot has no decoder"
            raise NoDecoderError(f"this ml-4m tokenizer ({c.enc_type} -> {c.dec_type}) cannot decode: {why}")
        ids = torch.as_tensor(ids).long()
        if ids.ndim != 2 or (c.mlp_encoder and ids.shape[1] != c.num_codebooks):
            raise ValueError(f"decode reads (B, {c.num_codebooks if c.mlp_encoder else 'N'}) token ids, got "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.codebook_size):
            raise ValueError(f"token ids must lie in [0, {c.codebook_size})")
        if c.quant_type == "lucid":
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise ValueError(f"{ids.shape[1]} tokens do not make a square grid")
            quant = self.quantize.vectors(ids, (side, side))  # (B, L, nh, nw): the raw rows
        else:
            quant = self.quantize.from_indices(ids).flatten(1)[:, :, None, None]  # (B, heads * d, 1, 1)
        h = self.post_quant_proj(quant)
        if c.mlp_encoder:
            return self.decoder(h.flatten(1))  # (B, D)
        return self.decoder(h)


def build(config, state: dict[str, Tensor]) -> ML4MTokenizer:
    """The (unloaded) omniforge network of an ML4MConfig; `state` (already key-mapped) gives the position
    embeddings' grids, which the config does not state."""
    from omniforge.errors import WeightsError

    def grid_of(prefix: str) -> tuple[int, int]:
        pos = state.get(f"{prefix}.pos_emb")
        if pos is None or pos.ndim != 4:
            raise WeightsError(f"the checkpoint has no {prefix}.pos_emb (1, D, h, w) for its ViT {prefix}")
        return int(pos.shape[2]), int(pos.shape[3])

    return ML4MTokenizer(config, **build_parts(config, grid_of))


def build_parts(config, grid_of) -> dict[str, nn.Module]:
    """The modules of an ML4MConfig's tokenizer (ML4MTokenizer's keyword arguments); `grid_of(prefix)` gives the
    (h, w) grid of the "encoder" / "decoder" position embedding."""
    from omniforge.tokenize._vit import BottleneckMLP
    from omniforge.tokenize.memcodes import Memcodes
    from omniforge.tokenize.ml4m import VIT_PRESETS, mlp_shape

    c = config

    def mlp(model_id: str, dim_in: int | None, dim_out: int | None) -> BottleneckMLP:
        blocks, width, expansion = mlp_shape(model_id)
        return BottleneckMLP(dim_in=dim_in or width, dim=width, dim_out=dim_out or width, depth=blocks,
                             expansion=expansion)

    parts: dict[str, nn.Module] = {}
    if c.n_labels is not None:
        parts["cls_emb"] = nn.Embedding(c.n_labels, c.n_channels)
    if c.vit_encoder:
        p = VIT_PRESETS[c.enc_type]
        parts["encoder"] = ViTEncoder(in_channels=c.n_channels, dim=p.dim, depth=p.depth, heads=p.heads,
                                      mlp_ratio=p.mlp_ratio, patch_size=c.patch_size, grid=grid_of("encoder"),
                                      patch_proj=c.patch_proj, post_mlp=c.post_mlp)
        enc_dim = p.dim
    else:
        parts["encoder"] = mlp(c.enc_type, c.n_channels, None)
        enc_dim = parts["encoder"].linear_out.out_features
    parts["quant_proj"] = nn.Conv2d(enc_dim, c.latent_dim, 1)
    if c.quant_type == "lucid":
        parts["quantize"] = LucidCodebook(c.codebook_size, c.latent_dim)
    else:
        parts["quantize"] = Memcodes(dim=c.latent_dim // c.num_codebooks, codebook_size=c.codebook_size,
                                     num_codebooks=c.num_codebooks)
    out_channels = c.n_labels if c.n_labels is not None else c.n_channels
    if c.decoder == "vit":
        p = VIT_PRESETS[c.dec_type]
        parts["decoder"] = ViTDecoder(out_channels=out_channels, dim=p.dim, depth=p.depth, heads=p.heads,
                                      mlp_ratio=p.mlp_ratio, patch_size=c.patch_size_dec or c.patch_size,
                                      grid=grid_of("decoder"), patch_proj=c.patch_proj, post_mlp=c.post_mlp,
                                      out_conv=c.out_conv)
        parts["post_quant_proj"] = nn.Conv2d(c.latent_dim, p.dim, 1)
    elif c.decoder == "mlp":
        parts["decoder"] = mlp(c.dec_type, None, out_channels)
        parts["post_quant_proj"] = nn.Conv2d(c.latent_dim, parts["decoder"].linear_in.in_features, 1)
    return parts

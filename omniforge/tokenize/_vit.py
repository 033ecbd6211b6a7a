"""Building blocks of the tokenizers: ViT encoder/decoder stacks and bottleneck MLPs."""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


def sincos_pos_embed_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (grid * grid, dim), row-major like the patch order.

    Half of the channels encode the row, half the column; each half is sin/cos at geometric frequencies.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (grid, grid) each
    parts = []
    for axis in (rows, cols):
        angles = axis.reshape(-1, 1) * freqs.reshape(1, -1)  # (grid*grid, dim/4)
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()  # (grid*grid, dim)


class ViTStack(nn.Module):
    """Tokens in, tokens out: add fixed position embeddings, pre-norm transformer blocks, final norm.

    The position table follows the input: N = g * g tokens get the sin-cos table of a g x g grid (a pure
    function of the grid), so a stack built for `grid` (224 / 16 = 14) runs on 448 inputs (28 x 28) too.
    """

    def __init__(self, *, grid: int, dim: int, depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"transformer width {dim} is not divisible by {heads} heads")
        # not persistent: a pure function of the config, recomputed on load
        self.register_buffer("pos_embed", sincos_pos_embed_2d(grid, dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def pos_table(self, n: int) -> Tensor:
        """(1, n, D) positions of a square grid of n tokens: the built grid's buffer, or that grid's table."""
        if n == self.pos_embed.shape[1]:
            return self.pos_embed
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"a ViT tokenizer reads a square grid of tokens, got {n}")
        return sincos_pos_embed_2d(grid, self.pos_embed.shape[2]).unsqueeze(0).to(self.pos_embed)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.pos_table(x.shape[1])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def unpatchify(x: Tensor, patch: int, channels: int) -> Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a square grid of N row-major patches, each (p, p, C) flattened."""
    b, n, _ = x.shape
    grid = math.isqrt(n)
    x = x.reshape(b, grid, grid, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, grid, p, grid, p)
    return x.reshape(b, channels, grid * patch, grid * patch)


class BottleneckMLP(nn.Module):
    """Linear in, `depth` pre-norm residual blocks (dim -> 4 dim -> dim, GELU), linear out.

    The MLP shape of "Scaling MLPs: A Tale of Inductive Bias" (Bachmann et al., 2023), as 4M-21 uses for
    its global-embedding tokenizers.
    """

    def __init__(self, *, dim_in: int, dim: int, dim_out: int, depth: int, expansion: int = 4):
        super().__init__()
        self.linear_in = nn.Linear(dim_in, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim * expansion), nn.GELU(), nn.Linear(dim * expansion, dim))
            for _ in range(depth)
        )
        self.linear_out = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:  # (B, dim_in) -> (B, dim_out)
        x = self.linear_in(x)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.linear_out(x)

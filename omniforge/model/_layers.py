"""Transformer building blocks of the 4M-style network: position tables, attention, MLPs, blocks.

All attention goes through ``torch.nn.functional.scaled_dot_product_attention``. Boolean masks follow its
convention: True = this query may attend to this key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(length: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 1-D sine-cosine position table, (length, dim): sines in the first half, cosines in the second."""
    if dim % 2:
        raise ValueError(f"sin-cos position embeddings need an even dim, got {dim}")
    freqs = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]  # (length, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position table for a grid x grid raster (row-major), (grid * grid, dim).

    Half of the channels encode the row, half the column, each as a 1-D sine-cosine table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got {dim}")
    axis = sincos_1d(grid, dim // 2, temperature)  # (grid, dim / 2)
    rows = axis[:, None, :].expand(grid, grid, dim // 2)
    cols = axis[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


def layer_norm(dim: int, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, bias=bias)


class Mlp(nn.Module):
    """Feed-forward layer: GELU MLP, or SwiGLU with the hidden width scaled by 2/3 (same parameter count)."""

    def __init__(self, dim: int, hidden: int, *, swiglu: bool, bias: bool, dropout: float):
        super().__init__()
        self.swiglu = swiglu
        if swiglu:
            hidden = int(2 * hidden / 3)
            self.gate = nn.Linear(dim, hidden, bias=bias)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.fc1(x)
        else:
            h = F.gelu(self.fc1(x))
        return self.drop(self.fc2(h))


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int, *, bias: bool, dropout: float, cross: bool):
        super().__init__()
        self.heads = heads
        self.cross = cross
        self.dropout = dropout
        if cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(dropout)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, D / H)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        # x: (B, N, D); context: (B, M, D) or None; mask: bool, broadcastable to (B, H, N, M)
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(
            self._split(q), self._split(k), self._split(v), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, D / H)
        out = out.transpose(1, 2).reshape(x.shape)  # (B, N, D)
        return self.proj_drop(self.proj(out))


class EncoderBlock(nn.Module):
    """Pre-norm block: self-attention, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, swiglu: bool, bias: bool, dropout: float):
        super().__init__()
        self.norm1 = layer_norm(dim, bias)
        self.attn = Attention(dim, heads, bias=bias, dropout=dropout, cross=False)
        self.norm2 = layer_norm(dim, bias)
        self.mlp = Mlp(dim, mlp_hidden, swiglu=swiglu, bias=bias, dropout=dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: masked self-attention, cross-attention to the encoder output, then MLP."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, swiglu: bool, bias: bool, dropout: float):
        super().__init__()
        self.norm1 = layer_norm(dim, bias)
        self.self_attn = Attention(dim, heads, bias=bias, dropout=dropout, cross=False)
        self.query_norm = layer_norm(dim, bias)
        self.context_norm = layer_norm(dim, bias)
        self.cross_attn = Attention(dim, heads, bias=bias, dropout=dropout, cross=True)
        self.norm2 = layer_norm(dim, bias)
        self.mlp = Mlp(dim, mlp_hidden, swiglu=swiglu, bias=bias, dropout=dropout)

    def forward(self, y: Tensor, context: Tensor, self_mask: Tensor, cross_mask: Tensor) -> Tensor:
        y = y + self.self_attn(self.norm1(y), self_mask)
        y = y + self.cross_attn(self.query_norm(y), cross_mask, self.context_norm(context))
        return y + self.mlp(self.norm2(y))

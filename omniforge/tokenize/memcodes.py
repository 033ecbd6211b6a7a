"""Memcodes: a key-value attention quantizer for the global-embedding tokenizers.

Memcodes comes from NWT (Mama et al., "NWT: Towards natural audio-to-video generation with representation
learning", 2021, arXiv:2106.04283); 4M-21 uses it, through lucidrains' NWT-pytorch, to quantize global
embeddings (DINOv2 and ImageBind CLS vectors) into a few tokens.

Every token position ("head") has its own codebook of learned code vectors. A query attends over the keys
of its codebook; the output is the value of one chosen code. During training the choice is a hard
Gumbel-softmax sample (one-hot in the forward pass, soft gradient in the backward pass); at encode time it
is the argmax, so tokens are deterministic. There is no commitment or codebook loss: the codes are
ordinary parameters trained through the straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Memcodes(nn.Module):
    """Quantize (B, H, D) queries into (B, H) code indices, one codebook per position.

    Args:
        dim: width D of one query (the latent dim of one token).
        codebook_size: codes per codebook; token ids lie in [0, codebook_size).
        num_codebooks: H, the number of token positions; position h always uses codebook h.
        temperature: Gumbel-softmax temperature during training.
    """

    def __init__(self, *, dim: int, codebook_size: int, num_codebooks: int, temperature: float = 1.0):
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.temperature = temperature
        self.scale = dim**-0.5
        self.codes = nn.Parameter(torch.randn(num_codebooks, codebook_size, dim))  # (H, K, D)
        # per-codebook key and value projections of the codes
        self.to_k = nn.Parameter(torch.randn(num_codebooks, dim, dim) * dim**-0.5)  # (H, D, D)
        self.to_v = nn.Parameter(torch.randn(num_codebooks, dim, dim) * dim**-0.5)  # (H, D, D)

    def _keys(self) -> Tensor:
        return torch.einsum("hkd,hde->hke", self.codes, self.to_k)  # (H, K, D)

    def _values(self) -> Tensor:
        return torch.einsum("hkd,hde->hke", self.codes, self.to_v)  # (H, K, D)

    def logits(self, q: Tensor) -> Tensor:
        """(B, H, D) queries -> (B, H, K) attention logits over each position's codebook."""
        if q.ndim != 3 or q.shape[1] != self.num_codebooks or q.shape[2] != self.dim:
            raise ValueError(f"Memcodes expects (B, {self.num_codebooks}, {self.dim}) queries, got {tuple(q.shape)}")
        return torch.einsum("bhd,hkd->bhk", q * self.scale, self._keys())

    def indices(self, q: Tensor) -> Tensor:
        """(B, H, D) -> (B, H) int64: the argmax code per position (deterministic, never sampled)."""
        return self.logits(q).argmax(dim=-1)

    def from_indices(self, ids: Tensor) -> Tensor:
        """(B, H) code ids -> (B, H, D) code values."""
        values = self._values()  # (H, K, D)
        heads = torch.arange(self.num_codebooks, device=ids.device)
        return values[heads.unsqueeze(0), ids]  # (B, H, D)

    def forward(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, D) -> (quantized (B, H, D), ids (B, H)); sampled with a hard Gumbel-softmax in training."""
        logits = self.logits(q)  # (B, H, K)
        if self.training:
            attn = F.gumbel_softmax(logits, tau=self.temperature, hard=True, dim=-1)
        else:
            attn = F.one_hot(logits.argmax(dim=-1), self.codebook_size).to(logits.dtype)
        ids = attn.argmax(dim=-1)
        out = torch.einsum("bhk,hkd->bhd", attn, self._values())
        return out, ids

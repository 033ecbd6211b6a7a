"""The 4M-21-style multimodal encoder-decoder (the network only; masking and training live elsewhere).

A batch is ``dict[folder, dict[str, Tensor]]`` in the shared format (see ``omniforge/model/specs.py``):
``"tensor"`` int64 (B, L) token ids, ``"input_mask"`` bool (B, L) True = not given to the encoder,
``"target_mask"`` bool (B, L) True = not a target, ``"decoder_attention_mask"`` int (B, L).

- Encoder: every modality's visible tokens (input_mask False) are embedded (per-modality token table, or
  for a pixel folder such as rgb@224 a linear patch embedding of ImageNet-normalised pixels, or for an
  embedding folder such as t5_caption a linear projection of each vector, ml-4m's
  SequenceEmbEncoderEmbedding; plus a fixed sin-cos position and a learned modality embedding), gathered per
  sample into one padded (B, N_in) sequence with a padding mask, and run through pre-norm transformer
  blocks. An embedding's position is its rank among the row's visible vectors (ml-4m's cumulative sum of
  the input mask); every other modality's is its place in the row.
- Decoder: one query per target position (target_mask False): a learned mask token (images, globals,
  and the first target of a sequence) or the previous target token of the same sequence (teacher
  forcing), plus position and modality embeddings; each sample's queries are packed to the left across
  modalities, so the decoder computes about one slot per real target, not one per modality's longest row.
  Self-attention stays inside one modality:
  bidirectional for image and global modalities, causal over a sequence modality's targets (the
  attention pattern comes from the spec's kind; ``decoder_attention_mask`` is not read). Every block
  also cross-attends to the encoder output.
- ml-4m's released layout (``ModelConfig(**RELEASED_LAYOUT)``, what :mod:`omniforge.model.ml4m` builds for a
  released 4M / 4M-21 checkpoint) differs in these switches, each off by default: separate decoder modality
  embeddings; learned positions for global folders (an encoder and a decoder table); a bias in the context
  projection and in an embedding folder's projection, none in the pixel patch embedding; and the "shifted"
  sequence decoding: a sequence's positions are ranks (among its visible inputs in the encoder, among its
  targets in the decoder), decoder query k reads target token k and predicts target token k + 1, so the
  first target token (a sentinel) is given and never predicted, and its logits are absent.
- Per-modality linear heads give logits; the loss is the cross-entropy averaged over each modality's
  target tokens, then over the modalities that have at least one target in the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniforge.errors import ConfigError
from omniforge.model._layers import DecoderBlock, EncoderBlock, layer_norm, sincos_1d, sincos_2d
from omniforge.model.specs import PIXEL_MEAN, PIXEL_STD, ModalitySpec

Batch = dict[str, dict[str, Tensor]]


@dataclass(kw_only=True)
class ModelConfig:
    dim: int  # width of every token
    encoder_depth: int
    decoder_depth: int
    heads: int  # attention heads; dim must be a multiple of heads
    mlp_ratio: float = 4.0  # MLP hidden width / dim (SwiGLU uses 2/3 of it per matrix)
    swiglu: bool = False  # gated SiLU MLP instead of GELU
    bias: bool = True  # False = the "no-bias" variant: no bias in linear layers or LayerNorms
    dropout: float = 0.0
    # ml-4m's released layout (4M / 4M-21, :mod:`omniforge.model.ml4m`); the defaults are omniforge's own.
    separate_modality_embeddings: bool = False  # the decoder has its own modality embedding per modality
    learned_global_positions: bool = False  # global folders: learned positions, an encoder and a decoder table
    sequence_decoding: str = "mask_first"  # "mask_first" | "shifted" (ml-4m's; see the module docstring)
    context_bias: bool | None = None  # bias of the context projection; None = `bias` (ml-4m: always one)
    patch_bias: bool | None = None  # bias of the pixel patch embedding; None = `bias` (ml-4m: never one)
    vector_bias: bool | None = None  # bias of an embedding folder's projection; None = `bias` (ml-4m: always one)

    def __post_init__(self) -> None:
        for name in ("dim", "encoder_depth", "decoder_depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        if self.dim % self.heads:
            raise ConfigError(f"ModelConfig.dim={self.dim} is not a multiple of heads={self.heads}: "
                              "pick heads that divide dim")
        if (self.dim // self.heads) % 2 or self.dim % 4:
            raise ConfigError(f"ModelConfig.dim={self.dim}: must be a multiple of 4 (2-D sin-cos positions) "
                              "with an even width per head")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"ModelConfig.mlp_ratio={self.mlp_ratio!r}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout={self.dropout!r}: must be in [0, 1)")
        for name in ("swiglu", "bias", "separate_modality_embeddings", "learned_global_positions"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: must be true or false")
        for name in ("context_bias", "patch_bias", "vector_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: must be true, false or null "
                                  "(null: the same as `bias`)")
        if self.sequence_decoding not in SEQUENCE_DECODINGS:
            raise ConfigError(f"ModelConfig.sequence_decoding={self.sequence_decoding!r}: must be one of "
                              f"{', '.join(SEQUENCE_DECODINGS)}")

    def bias_of(self, part: str) -> bool:
        """The bias setting of ``part`` ("context", "patch" or "vector"): its own field, else ``bias``."""
        own = getattr(self, f"{part}_bias")
        return self.bias if own is None else own

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


SEQUENCE_DECODINGS = ("mask_first", "shifted")
# What ml-4m's FM does where omniforge's defaults differ: ModelConfig(**shape, **RELEASED_LAYOUT) is a released model.
RELEASED_LAYOUT: dict[str, Any] = dict(learned_global_positions=True, sequence_decoding="shifted", context_bias=True,
                                       patch_bias=False, vector_bias=True)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, encoder_depth=2, decoder_depth=2, heads=2),
    "B": ModelConfig(dim=768, encoder_depth=12, decoder_depth=12, heads=12),
    "L": ModelConfig(dim=1024, encoder_depth=24, decoder_depth=24, heads=16),
    "XL": ModelConfig(dim=2048, encoder_depth=24, decoder_depth=24, heads=32),
}


def model_config(name: str) -> ModelConfig:
    """A copy of the named config (edit it with ``dataclasses.replace``)."""
    try:
        return replace(MODEL_CONFIGS[name])
    except KeyError:
        raise ConfigError(f"unknown model config {name!r}; valid names: {', '.join(MODEL_CONFIGS)}") from None


class Encoded(NamedTuple):
    context: Tensor  # (B, N_in, D) encoder output as the decoder reads it
    padding: Tensor  # (B, N_in) bool, True = padding slot (no token)


class _Gathered(NamedTuple):
    index: Tensor  # (B, N) int64 positions in the modality's row, ascending; padding slots hold 0
    valid: Tensor  # (B, N) bool, False = padding slot
    ids: Tensor  # (B, N) int64 token ids at those positions (0 at padding); pixels, embeddings: (B, N, P) values


def _gather(tensor: Tensor, excluded: Tensor) -> _Gathered:
    """Positions where ``excluded`` is False, in ascending order, left-aligned and padded per sample.
    ``tensor`` is (B, L) ids or (B, L, P) pixel patches or embedding vectors."""
    counts = (~excluded).sum(dim=1)  # (B,)
    n = int(counts.max()) if counts.numel() else 0
    order = torch.sort(excluded.to(torch.uint8), dim=1, stable=True).indices[:, :n]  # (B, N)
    valid = torch.arange(n, device=tensor.device)[None, :] < counts[:, None]  # (B, N)
    index = order.masked_fill(~valid, 0)
    if tensor.ndim == 3:
        ids = torch.gather(tensor, 1, index[..., None].expand(-1, -1, tensor.shape[-1]))
        return _Gathered(index, valid, ids.masked_fill(~valid[..., None], 0))
    ids = torch.gather(tensor, 1, index).masked_fill(~valid, 0)
    return _Gathered(index, valid, ids)


class PatchEmbedding(nn.Module):
    """Linear embedding of flattened uint8 pixel patches, normalised with ImageNet statistics first."""

    def __init__(self, patch_dim: int, dim: int, bias: bool = True):
        super().__init__()
        if patch_dim % 3:
            raise ConfigError(f"pixel patches hold 3 channels, got patch_dim={patch_dim}")
        # Channel is the fastest axis of a flattened (row, col, channel) patch.
        mean = torch.tensor(PIXEL_MEAN).repeat(patch_dim // 3) * 255.0
        std = torch.tensor(PIXEL_STD).repeat(patch_dim // 3) * 255.0
        self.register_buffer("mean", mean, persistent=False)  # (P,)
        self.register_buffer("std", std, persistent=False)  # (P,)
        self.proj = nn.Linear(patch_dim, dim, bias=bias)

    def forward(self, patches: Tensor) -> Tensor:  # (B, N, P) uint8 -> (B, N, D)
        x = (patches.to(self.proj.weight.dtype) - self.mean) / self.std
        return self.proj(x)


class VectorEmbedding(nn.Module):
    """Linear projection of continuous input vectors (an embedding folder's, e.g. T5-XXL's 4096-d) to the model
    width, as ml-4m's SequenceEmbEncoderEmbedding without its optional bottleneck."""

    def __init__(self, width: int, dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(width, dim, bias=bias)

    def forward(self, vectors: Tensor) -> Tensor:  # (B, N, width) float16/32 -> (B, N, D)
        return self.proj(vectors.to(self.proj.weight.dtype))


def _input_embedding(spec: ModalitySpec, config: ModelConfig) -> nn.Module:
    if spec.kind == "pixels":
        return PatchEmbedding(spec.patch_dim, config.dim, config.bias_of("patch"))
    if spec.kind == "embedding":
        return VectorEmbedding(spec.width, config.dim, config.bias_of("vector"))
    return nn.Embedding(spec.vocab_size, config.dim)


class FourM(nn.Module):
    """4M-style any-to-any model over the token folders in ``specs``."""

    def __init__(self, config: ModelConfig, specs: dict[str, ModalitySpec]):
        super().__init__()
        if not specs:
            raise ConfigError("FourM needs at least one modality spec")
        for name, spec in specs.items():
            if name != spec.name:
                raise ConfigError(f"specs key {name!r} differs from its spec name {spec.name!r}")
            if "." in name:
                raise ConfigError(f"modality folder {name!r} contains '.', which cannot name a submodule")
        self.config = config
        self.specs = dict(specs)
        dim = config.dim
        hidden = int(dim * config.mlp_ratio)
        block = dict(swiglu=config.swiglu, bias=config.bias, dropout=config.dropout)

        self.encoder_tokens = nn.ModuleDict({m: _input_embedding(s, config) for m, s in specs.items()})
        # Image and global decoder queries are mask tokens; only sequences embed (previous) target tokens.
        self.decoder_tokens = nn.ModuleDict(
            {m: nn.Embedding(s.vocab_size, dim) for m, s in specs.items() if s.kind == "sequence"})
        self.modality_embeddings = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in specs})
        decoded = [m for m, s in specs.items() if not s.input_only]
        if config.separate_modality_embeddings:  # ml-4m's unshared encoder and decoder modality embeddings
            self.decoder_modality_embeddings = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in decoded})
        self.mask_token = nn.Parameter(torch.zeros(dim))
        learned = [m for m, s in specs.items() if s.kind == "global" and config.learned_global_positions]
        if learned:  # ml-4m's global tokens: learned (L, D) positions, separately in the encoder and the decoder
            self.encoder_positions = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(specs[m].seq_len, dim)) for m in learned})
            self.decoder_positions = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(specs[m].seq_len, dim)) for m in learned if m in decoded})
        for m, s in specs.items():
            if m in learned:
                continue
            table = sincos_2d(s.grid, dim) if s.kind in ("image", "pixels") else sincos_1d(s.seq_len, dim)
            self.register_buffer(self._pos_name(m), table, persistent=False)  # (L, D)

        self.encoder = nn.ModuleList(EncoderBlock(dim, config.heads, hidden, **block)
                                     for _ in range(config.encoder_depth))
        self.encoder_norm = layer_norm(dim, config.bias)
        self.context_proj = nn.Linear(dim, dim, bias=config.bias_of("context"))
        self.decoder = nn.ModuleList(DecoderBlock(dim, config.heads, hidden, **block)
                                     for _ in range(config.decoder_depth))
        self.decoder_norm = layer_norm(dim, config.bias)
        self.heads = nn.ModuleDict({m: nn.Linear(dim, s.vocab_size, bias=False) for m, s in specs.items()
                                    if not s.input_only})
        self._init_weights()

    @staticmethod
    def _pos_name(modality: str) -> str:
        return "pos_" + modality.replace("@", "_at_")

    def _pos(self, modality: str, *, decoder: bool = False) -> Tensor:
        """The (L, D) position table of a modality: the fixed sin-cos buffer, or the encoder's or decoder's
        learned table of a global modality (learned_global_positions)."""
        tables = getattr(self, "decoder_positions" if decoder else "encoder_positions", None)
        if tables is not None and modality in tables:
            return tables[modality]
        return getattr(self, self._pos_name(modality))

    def _modality_embedding(self, modality: str, *, decoder: bool = False) -> Tensor:
        if decoder and self.config.separate_modality_embeddings:
            return self.decoder_modality_embeddings[modality]
        return self.modality_embeddings[modality]

    def _ranked(self, kind: str) -> bool:
        """Positions are ranks among the row's visible vectors or tokens (ml-4m's cumulative sum of the
        mask), not places in the row: embeddings always, sequences under the "shifted" decoding."""
        return kind == "embedding" or (kind == "sequence" and self.config.sequence_decoding == "shifted")

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name in ("modality_embeddings", "decoder_modality_embeddings", "encoder_positions", "decoder_positions"):
            for p in getattr(self, name, {}).values():
                nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- input checks -------------------------------------------------------------------------------

    def _modalities(self, batch: Batch) -> list[str]:
        if not batch:
            raise ValueError("empty batch: it needs at least one modality")
        unknown = [m for m in batch if m not in self.specs]
        if unknown:
            raise ValueError(f"batch has modalities {unknown} that the model was not built with; "
                             f"known: {list(self.specs)}")
        for m, d in batch.items():
            spec = self.specs[m]
            expected = spec.seq_len
            for key in ("tensor", "input_mask", "target_mask"):
                if key not in d:
                    raise ValueError(f"batch[{m!r}] has no {key!r}")
                shape = (expected,)
                if key == "tensor" and spec.kind == "pixels":
                    shape = (expected, spec.patch_dim)
                elif key == "tensor" and spec.kind == "embedding":
                    shape = (expected, spec.width)
                if tuple(d[key].shape[1:]) != shape:
                    raise ValueError(f"batch[{m!r}][{key!r}] has shape {tuple(d[key].shape)}, "
                                     f"expected (B, {', '.join(map(str, shape))})")
            if spec.input_only and not bool(d["target_mask"].all()):
                raise ValueError(f"{m} is input-only: its target_mask must be all True")
        return list(batch)

    # ---- encoder ------------------------------------------------------------------------------------

    def encode(self, batch: Batch) -> Encoded:
        """Run the encoder on the visible tokens (input_mask False) of every modality.

        Returns ``Encoded(context (B, N_in, D), padding (B, N_in) bool)``. ``context`` is the encoder
        output as the decoder reads it: normalised, projected, and with each token's position and modality
        embedding added back (as 4M does). ``padding`` is True at slots holding no token, which attention
        skips; a sample with no visible token at all keeps one zero slot (padding False) to attend to.
        """
        tokens, embs, valids = [], [], []
        for m in self._modalities(batch):
            d, kind = batch[m], self.specs[m].kind
            tensor = d["tensor"] if kind in ("pixels", "embedding") else d["tensor"].long()
            g = _gather(tensor, d["input_mask"].bool())
            n = g.ids.shape[1]
            if n == 0:
                continue
            # An embedding's vector k among the visible ones sits at position k (padding slots come after them).
            position = torch.arange(n, device=g.index.device).expand_as(g.index) if self._ranked(kind) else g.index
            emb = self._pos(m)[position] + self._modality_embedding(m)  # (B, N_m, D)
            tokens.append(self.encoder_tokens[m](g.ids))
            embs.append(emb)
            valids.append(g.valid)
        if not tokens:  # nothing visible anywhere: one empty slot per sample keeps attention well defined
            b = next(iter(batch.values()))["tensor"].shape[0]
            zeros = self.mask_token.new_zeros(b, 1, self.config.dim)
            tokens, embs = [zeros], [zeros]
            valids = [torch.zeros(b, 1, dtype=torch.bool, device=zeros.device)]
        x = torch.cat(tokens, dim=1)  # (B, sum N_m, D)
        emb = torch.cat(embs, dim=1)
        valid = torch.cat(valids, dim=1)  # (B, sum N_m)
        if len(tokens) > 1:  # left-align each sample's tokens across modalities, drop all-padding columns
            n = max(int(valid.sum(dim=1).max()), 1)
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # (B, N_in)
            x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
            emb = torch.gather(emb, 1, order[..., None].expand(-1, -1, emb.shape[-1]))
            valid = torch.gather(valid, 1, order)
        valid_f = valid[..., None].to(x.dtype)
        x = (x + emb) * valid_f  # (B, N_in, D)
        # A sample with no visible token attends to its first (empty) slot instead of to nothing.
        keys = valid.clone()
        keys[:, 0] |= ~valid.any(dim=1)
        key_mask = keys[:, None, None, :]  # (B, 1, 1, N_in)
        for blk in self.encoder:
            x = blk(x, key_mask)
        context = (self.context_proj(self.encoder_norm(x)) + emb) * valid_f  # (B, N_in, D)
        return Encoded(context, ~keys)

    # ---- decoder ------------------------------------------------------------------------------------

    def _decode(self, batch: Batch, encoded: Encoded | None) -> dict[str, tuple[Tensor, _Gathered, Tensor]]:
        """For each modality with targets: decoder outputs (B, N_m, D), its gathered target positions, and
        the flat indices (T_m,) of its real targets in (B * N_m).

        Every index that depends on the masks (and so needs the host to read a device value) is computed
        before the first transformer block runs: on a GPU the blocks of encoder and decoder are then queued
        back to back instead of the host waiting for the encoder to finish before it can plan the decoder.
        """
        queries, targets, mod_ids, causal = [], {}, [], []
        for i, m in enumerate(self._modalities(batch)):
            d = batch[m]
            spec = self.specs[m]
            if spec.input_only:
                continue
            g = _gather(d["tensor"].long(), d["target_mask"].bool())
            n = g.ids.shape[1]
            if n == 0:
                continue
            if spec.kind == "sequence" and self.config.sequence_decoding == "shifted":
                if n < 2:  # one target token: it is the given first one, nothing is predicted
                    continue
                # ml-4m: query k reads target token k at position k (its rank among the targets, 0 from the
                # modality's max length on) and predicts target token k + 1; the first is given, never predicted.
                rank = torch.arange(n - 1, device=g.ids.device)
                rank = rank.masked_fill(rank >= spec.num_tokens, 0)
                q = self.decoder_tokens[m](g.ids[:, :-1]) + self._pos(m, decoder=True)[rank]
                g = _Gathered(g.index[:, 1:], g.valid[:, 1:], g.ids[:, 1:])
                n -= 1
            else:
                q = self.mask_token.expand(*g.ids.shape, -1)  # (B, N_m, D)
                if spec.kind == "sequence":  # teacher forcing: position t reads the target token before it
                    prev = self.decoder_tokens[m](F.pad(g.ids[:, :-1], (1, 0)))  # (B, N_m, D)
                    first = torch.arange(n, device=prev.device)[None, :, None] == 0
                    q = torch.where(first, q, prev)
                q = q + self._pos(m, decoder=True)[g.index]
            q = q + self._modality_embedding(m, decoder=True)
            queries.append(q)
            targets[m] = g
            mod_ids.append(torch.where(g.valid, i, -1))  # (B, N_m); padding slots form their own group
            causal.append(torch.full((n,), spec.kind == "sequence", device=q.device))
        if not queries:
            return {}
        y = torch.cat(queries, dim=1)  # (B, M_all, D): one block per modality, each padded to its longest row
        mod = torch.cat(mod_ids, dim=1)  # (B, M_all)
        is_causal = torch.cat(causal)[None].expand_as(mod)  # (B, M_all)
        order = None
        if len(queries) > 1:  # pack each sample's targets to the left (modalities keep their inner order)
            valid = mod >= 0
            m = max(int(valid.sum(dim=1).max()), 1)
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :m]  # (B, M)
            y = torch.gather(y, 1, order[..., None].expand(-1, -1, y.shape[-1]))
            mod = torch.gather(mod, 1, order)
            is_causal = torch.gather(is_causal, 1, order)
        m_total = y.shape[1]
        ar = torch.arange(m_total, device=y.device)
        later = (ar[None, :] > ar[:, None])[None]  # (1, M, M): key after query
        same = mod[:, :, None] == mod[:, None, :]  # (B, M, M)
        self_mask = same & ~(later & is_causal[:, :, None])
        self_mask = (self_mask | torch.eye(m_total, dtype=torch.bool, device=y.device))[:, None]  # (B, 1, M, M)
        flat = {m: g.valid.flatten().nonzero().squeeze(1) for m, g in targets.items()}
        if encoded is None:
            encoded = self.encode(batch)
        cross_mask = (~encoded.padding)[:, None, None, :]  # (B, 1, 1, N_in)
        for blk in self.decoder:
            y = blk(y, encoded.context, self_mask, cross_mask)
        y = self.decoder_norm(y)
        if order is not None:  # back to one block per modality (padding slots get zeros)
            full = y.new_zeros(y.shape[0], sum(q.shape[1] for q in queries), y.shape[-1])
            y = full.scatter(1, order[..., None].expand(-1, -1, y.shape[-1]), y)
        out, start = {}, 0
        for m, g in targets.items():
            n = g.ids.shape[1]
            out[m] = (y[:, start:start + n], g, flat[m])
            start += n
        return out

    def decoder_logits(self, batch: Batch, encoded: Encoded | None = None, *,
                       scatter: bool = False) -> dict[str, Tensor]:
        """Logits at the target positions (target_mask False) of each modality that has any.

        By default each value is (B, N_m, V_m): row n is the sample's n-th target position in ascending
        order (rows past a sample's own target count are padding and meaningless). With ``scatter=True``
        it is (B, L, V_m), logits at their positions in the batch row and zeros elsewhere (under the "shifted"
        sequence decoding a sequence's first target position has none: it is given, not predicted). Pass the
        result of ``encode(batch)`` as ``encoded`` to reuse it across decoding steps.
        """
        out = {}
        for m, (y, g, _) in self._decode(batch, encoded).items():
            logits = self.heads[m](y)  # (B, N_m, V_m)
            if scatter:  # padding slots go to an extra column L, dropped afterwards
                seq_len = self.specs[m].seq_len
                index = g.index.masked_fill(~g.valid, seq_len)[..., None].expand_as(logits)
                full = logits.new_zeros(logits.shape[0], seq_len + 1, logits.shape[-1])
                logits = full.scatter(1, index, logits)[:, :seq_len]  # (B, L, V_m)
            out[m] = logits
        return out

    def forward(self, batch: Batch, *, token_losses: bool = False):
        """(total loss, per-modality losses): cross-entropy averaged over each modality's target tokens,
        then the plain mean over modalities with at least one target in the batch.

        With ``token_losses=True`` a third value maps each modality to ``(ce, sample)``: the detached
        cross-entropy of every real target token (T_m,) and the batch row it belongs to (T_m,), for
        breaking the loss down by sample groups (the corpus each sample came from)."""
        losses, per_token = {}, {}
        for m, (y, g, flat) in self._decode(batch, None).items():
            logits = self.heads[m](y.flatten(0, 1)[flat])  # (T_m, V_m), only real targets
            ce = F.cross_entropy(logits.float(), g.ids.flatten()[flat], reduction="none")
            losses[m] = ce.mean()
            if token_losses:
                per_token[m] = (ce.detach(), torch.div(flat, g.ids.shape[1], rounding_mode="floor"))
        if not losses:  # no targets at all: a zero that still backpropagates
            total = self.mask_token.sum() * 0.0
        else:
            total = torch.stack(list(losses.values())).mean()
        return (total, losses, per_token) if token_losses else (total, losses)

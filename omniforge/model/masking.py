"""4M-21 masking: which tokens of a sample the encoder sees and which the decoder predicts.

Per sample (ml-4m's ``UnifiedMasking``, rewritten on numpy with an explicit generator):

1. pick a mixture component by ``weights``; draw modality weights from that component's Dirichlet over the
   modalities the sample has (a missing modality takes no budget and is entirely masked);
2. split ``input_tokens`` by those weights, each share capped by the tokens the modality has; then split
   ``target_tokens`` the same way with the target alphas, each share capped by the tokens not already
   given as input (images, globals) or by the most a span-masked target can hold (sequences);
3. images and globals: a random subset of positions is input, a disjoint random subset is target;
4. sequences: T5 span masking. Each masked span becomes one sentinel in the input; the target is every
   span's sentinel followed by its tokens, then one final sentinel. The keep probability comes from the
   modality's keep scheme and is lowered (x0.9) until the input fits its budget; an over-long target is
   cut at a sentinel to fit its budget (ml-4m's rule). A sequence whose registry entry has ``chunks`` is
   masked by chunks (metadata: "v1=<field> v0=<bin>" pairs; a palette: the "v1=<n>" count then RGB triples),
   so no span cuts a chunk, and ``shuffle_chunks`` shuffles them per sample first (4M-21's metadata);
5. embeddings (t5_caption), input-only: ml-4m's ``sequence_emb_mask_span``, span masking over the vectors with
   the same keep schemes and keep-probability decay, each masked span replaced by one all-zero vector (ml-4m's
   sentinel), so the input budget counts kept vectors plus one per span, and never more than the sample's
   valid vectors.

Sequences keep their [EOS]: the stored row ``ids.. [EOS] [PAD]..`` is cut after its [EOS], and the [EOS] is
an ordinary token of the masked sequence, as ml-4m's loader appends it (the decoder learns to end).

The output of one sample is the shared batch format of one row: folder -> {"tensor": int64 (L,),
"input_mask": bool (L,) (True = not an input), "target_mask": bool (L,) (True = not a target),
"decoder_attention_mask": int32 (L,) (1 on a sequence's target positions, 0 elsewhere)}, with L the
spec's ``seq_len``. A sequence row holds the span-masked input at [0, len) and the target from position
``input_budget`` on; :func:`collate` stacks rows into (B, L) batches. A pixel folder's "tensor" is uint8
(L, patch_dim) patches instead of ids, an embedding's float16 (L, width) vectors (the span-masked input at
[0, len), zeros after it); both are input-only (never a target, whatever the target alphas say).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from omniforge.errors import ConfigError
from omniforge.modalities import KEEPS, all_modalities, by_embedding_folder, by_pixel_folder, by_token_folder
from omniforge.model.specs import ModalitySpec

KEEP_SCHEMES = KEEPS
KEEP_PROB_DECAY = 0.9  # ml-4m's factor: the keep probability is lowered by it while the input is too long


def _input_only(folder: str) -> bool:
    """Raw-pixel and embedding folders, and token folders whose registry role is "input", are never targets."""
    info = by_token_folder(folder)
    raw = by_pixel_folder(folder) is not None or by_embedding_folder(folder) is not None
    return raw or (info is not None and info.role == "input")


def _target_only(folder: str) -> bool:
    info = by_token_folder(folder)
    return info is not None and info.role == "target"


def _folder_name(name: str) -> str:
    """An ml-4m modality name ("caption", "det") -> its omniforge token folder; folders pass unchanged."""
    info = next((m for m in all_modalities() if m.name == name and m.tokenized), None)
    return info.token_modality if info is not None else name


@dataclass(kw_only=True)
class MaskingConfig:
    """Token budgets and the Dirichlet mixture, in ml-4m's ``alphas_mixture`` structure.

    ``alphas[i]`` / ``target_alphas[i]`` are component i's Dirichlet parameters (folder -> alpha; a folder
    absent from a component has alpha 0 there: never chosen), ``weights[i]`` its mixture weight (None: all
    equal). ``keep_scheme`` maps a sequence folder to "random" | "all" | "binary", or to a list with one
    scheme per component; unnamed folders use their registry entry's ``keep`` (4M-21 keeps a palette whole or
    fully masked: "binary").
    """

    alphas: list[dict[str, float]]
    target_alphas: list[dict[str, float]]
    weights: list[float] | None = None
    input_tokens: int = 128
    target_tokens: int = 128
    input_only: tuple[str, ...] = ()  # folders never used as targets
    keep_scheme: dict[str, str | list[str]] = field(default_factory=dict)
    shuffle_chunks: bool = True  # shuffle the chunks of folders whose registry entry says so, as 4M-21

    def __post_init__(self) -> None:
        n = len(self.alphas)
        if n == 0:
            raise ConfigError("MaskingConfig.alphas is empty: give at least one mixture component")
        if len(self.target_alphas) != n:
            raise ConfigError(f"MaskingConfig: {n} input alpha components but {len(self.target_alphas)} "
                              "target_alphas components; give one target dict per input dict")
        if self.weights is not None:
            if len(self.weights) != n:
                raise ConfigError(f"MaskingConfig.weights has {len(self.weights)} entries for {n} components")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ConfigError(f"MaskingConfig.weights must be >= 0 with a positive sum, got {self.weights}")
        for label, comps in (("alphas", self.alphas), ("target_alphas", self.target_alphas)):
            for i, comp in enumerate(comps):
                bad = {k: v for k, v in comp.items() if not (float(v) >= 0)}
                if bad:
                    raise ConfigError(f"MaskingConfig.{label}[{i}]: alphas must be >= 0, got {bad}")
        if self.input_tokens < 0 or self.target_tokens < 0:
            raise ConfigError(f"MaskingConfig: token budgets must be >= 0 (input_tokens={self.input_tokens}, "
                              f"target_tokens={self.target_tokens})")
        self.input_only = tuple(self.input_only)
        for folder, scheme in self.keep_scheme.items():
            schemes = [scheme] if isinstance(scheme, str) else list(scheme)
            if not isinstance(scheme, str) and len(schemes) != n:
                raise ConfigError(f"MaskingConfig.keep_scheme[{folder!r}] lists {len(schemes)} schemes for {n} "
                                  "components: give one per component, or a single string")
            wrong = [s for s in schemes if s not in KEEP_SCHEMES]
            if wrong:
                raise ConfigError(f"MaskingConfig.keep_scheme[{folder!r}]: {wrong} not in {KEEP_SCHEMES}")

    @property
    def num_components(self) -> int:
        return len(self.alphas)

    @property
    def folders(self) -> set[str]:
        """Every folder named with an alpha in some component."""
        return {f for comp in (*self.alphas, *self.target_alphas) for f in comp}

    def keep_for(self, folder: str, component: int, default: str = "random") -> str:
        scheme = self.keep_scheme.get(folder, default)
        return scheme if isinstance(scheme, str) else scheme[component]

    @classmethod
    def uniform(cls, folders: Sequence[str], *, alpha: float = 0.5, input_tokens: int = 128,
                target_tokens: int = 128, input_only: Sequence[str] = ()) -> MaskingConfig:
        """One component with the same alpha for every folder (input_only folders, pixel folders such as
        rgb@224 and folders whose registry role is "input" are never targets; role "target" folders are never
        inputs)."""
        input_only = (*input_only, *(f for f in folders if _input_only(f) and f not in input_only))
        return cls(alphas=[{f: 0.0 if _target_only(f) else alpha for f in folders}],
                   target_alphas=[{f: 0.0 if f in input_only else alpha for f in folders}],
                   weights=[1.0], input_tokens=input_tokens, target_tokens=target_tokens,
                   input_only=tuple(input_only))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaskingConfig:
        """From this class's fields, or from an ml-4m alphas-mixture YAML (``sampling_weights`` and
        ``alphas_mixture: {modality: {input_alphas: [...], target_alphas: [...], keep: [...]}}``).
        ml-4m modality names ("caption", "metadata") are mapped to token folders ("tok_caption", ...)."""
        d = dict(d)
        if "shuffle_metadata" in d:  # the field's name before it applied to every chunked folder
            d["shuffle_chunks"] = d.pop("shuffle_metadata")
        if "alphas_mixture" not in d:
            unknown = set(d) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"MaskingConfig: unknown fields {sorted(unknown)}; "
                                  f"valid: {sorted(cls.__dataclass_fields__)}")
            d["alphas"] = [{_folder_name(k): float(v) for k, v in c.items()} for c in d.get("alphas", [])]
            d["target_alphas"] = [{_folder_name(k): float(v) for k, v in c.items()}
                                  for c in d.get("target_alphas", [])]
            d["keep_scheme"] = {_folder_name(k): v for k, v in d.get("keep_scheme", {}).items()}
            d["input_only"] = tuple(_folder_name(k) for k in d.get("input_only", ()))
            return cls(**d)
        mixture: Mapping[str, Mapping[str, Any]] = d.pop("alphas_mixture")
        weights = d.pop("sampling_weights", None)
        lengths = {len(m["input_alphas"]) for m in mixture.values()} | {len(m["target_alphas"])
                                                                          for m in mixture.values()}
        if len(lengths) != 1:
            raise ConfigError(f"alphas_mixture: every modality needs the same number of components, got {lengths}")
        (n,) = lengths
        alphas: list[dict[str, float]] = [{} for _ in range(n)]
        target_alphas: list[dict[str, float]] = [{} for _ in range(n)]
        keep: dict[str, str | list[str]] = {}
        for name, m in mixture.items():
            folder = _folder_name(name)
            for i in range(n):
                alphas[i][folder] = float(m["input_alphas"][i])
                target_alphas[i][folder] = float(m["target_alphas"][i])
            if "keep" in m:
                keep[folder] = list(m["keep"])
        return cls(alphas=alphas, target_alphas=target_alphas, weights=weights, keep_scheme=keep,
                   **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_yaml(cls, path: str) -> MaskingConfig:
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f))


# --------------------------------------------------------------------------------------------- span masking

def span_mask(units: Sequence[Sequence[int]], masked: np.ndarray,
              sentinel_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """T5 span masking over units (single tokens, or chunks that must stay whole).

    Consecutive masked units form one span k (k = 1, 2, ...): the input gets ``sentinel_ids[k]`` in its
    place, the target gets ``sentinel_ids[k]`` then the span's tokens; the target ends with the next unused
    sentinel. Returns (input ids, target ids).
    """
    inp: list[int] = []
    tgt: list[int] = []
    k = 0
    prev = False
    for unit, m in zip(units, masked):
        if m:
            if not prev:
                k += 1
                inp.append(sentinel_ids[k])
                tgt.append(sentinel_ids[k])
            tgt.extend(unit)
        else:
            inp.extend(unit)
        prev = bool(m)
    tgt.append(sentinel_ids[k + 1])
    return inp, tgt


def merge_spans(input_ids: Sequence[int], target_ids: Sequence[int], sentinel_ids: Sequence[int]) -> list[int]:
    """Undo :func:`span_mask`: put each target span back at its sentinel in the input."""
    sentinels = set(sentinel_ids)
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for t in target_ids:
        if t in sentinels:
            current = t
            spans.setdefault(t, [])
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in input_ids:
        out.extend(spans.get(t, [])) if t in sentinels else out.append(t)
    return out


def _input_length(lengths: np.ndarray, masked: np.ndarray) -> int:
    """Length of span_mask's input without building it: kept tokens + one sentinel per span."""
    starts = masked & ~np.concatenate(([False], masked[:-1]))
    return int(lengths[~masked].sum() + starts.sum())


def _truncate_target(target: list[int], budget: int, sentinels: set[int], rng: np.random.Generator) -> list[int]:
    """ml-4m's rule for a target over budget: start at a random sentinel (never the final one when there
    are others) and keep `budget` tokens; when fewer than `budget` remain from there, start instead at the
    earliest sentinel from which the rest fits."""
    if budget <= 0:
        return []
    if len(target) <= budget:
        return target
    idx = [i for i, t in enumerate(target) if t in sentinels]
    start = idx[int(rng.integers(max(1, len(idx) - 1)))]
    if len(target) - start >= budget:
        return target[start:start + budget]
    for i in idx:
        if len(target) - i <= budget:
            return target[i:]
    return target[start:start + budget]  # unreachable: the final sentinel always fits a positive budget


# ----------------------------------------------------------------------------------------------- the masker

def _dirichlet_split(total: int, alphas: np.ndarray, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split `total` tokens by a Dirichlet draw (alpha 0: nothing), each share capped by `caps`.

    As ml-4m: floor of weight * total, the remainder handed out one token at a time to the argmax of fresh
    draws (so near-zero alphas get nothing), then capped; capped-off tokens are not moved elsewhere.
    """
    out = np.zeros(len(alphas), dtype=np.int64)
    active = np.flatnonzero(alphas > 0)
    if total <= 0 or len(active) == 0:
        return out
    a = alphas[active]
    w = rng.dirichlet(a) if len(a) > 1 else np.ones(1)
    share = np.floor(w * total).astype(np.int64)
    rest = int(total - share.sum())
    if rest > 0:
        extra = rng.dirichlet(a, size=rest).argmax(axis=1) if len(a) > 1 else np.zeros(rest, dtype=np.int64)
        share += np.bincount(extra, minlength=len(a))
    out[active] = np.minimum(share, caps[active])
    return out


class Masker:
    """Masks one sample (one crop of every folder) into the shared batch format.

    ``sample``: folder -> token ids (image/global: (num_tokens,); sequence: a stored row, ids then [EOS]
    then [PAD]), pixel patches, an embedding's valid vectors (n, width), or None when the sample lacks the
    folder. Every spec folder is in the output; a missing one is entirely masked (no input, no target). All
    randomness comes from ``rng``.
    """

    def __init__(self, cfg: MaskingConfig, specs: Mapping[str, ModalitySpec], *, sentinel_ids: Sequence[int],
                 pad_id: int = 0, eos_id: int):
        self.cfg = cfg
        self.specs = dict(specs)
        self.folders = list(self.specs)
        self.sentinel_ids = [int(s) for s in sentinel_ids]
        self.sentinel_set = set(self.sentinel_ids)
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)
        unused = [f for f in self.folders if f not in cfg.folders]
        if unused:
            raise ConfigError(f"MaskingConfig gives no alpha to {unused}: add them to alphas/target_alphas "
                              "(alpha 0 where they should never be chosen)")
        unknown = [f for f in cfg.input_only if f not in self.specs]
        if unknown:
            raise ConfigError(f"MaskingConfig.input_only names {unknown}, not among the folders {self.folders}")
        input_only = set(cfg.input_only) | {f for f, s in self.specs.items() if s.input_only}
        for spec in self.specs.values():
            if spec.kind == "sequence":
                # At most ceil(n / 2) spans, sentinels 1..spans + 1 (sentinel 0 is left unused, as ml-4m).
                needed = (spec.num_tokens + 1) // 2 + 2
                if len(self.sentinel_ids) < needed:
                    raise ConfigError(f"{spec.name}: span masking {spec.num_tokens} tokens needs {needed} "
                                      f"sentinels, got {len(self.sentinel_ids)}")
        target_only = {f for f, s in self.specs.items() if s.target_only}
        self._in_alpha = np.array([[0.0 if f in target_only else c.get(f, 0.0) for f in self.folders]
                                   for c in cfg.alphas], dtype=np.float64)
        target = [[0.0 if f in input_only else c.get(f, 0.0) for f in self.folders] for c in cfg.target_alphas]
        self._tgt_alpha = np.array(target, dtype=np.float64)
        w = np.ones(cfg.num_components) if cfg.weights is None else np.asarray(cfg.weights, dtype=np.float64)
        self._weights = w / w.sum()

    # ---- per-modality preparation

    def _sequence_ids(self, spec: ModalitySpec, row: np.ndarray) -> list[int]:
        """A stored row -> the ids to mask: everything up to and including the first [EOS]."""
        ids = [int(t) for t in np.asarray(row).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id) + 1]
        else:  # no [EOS] (a hand-made row): strip the [PAD] tail and close it
            while ids and ids[-1] == self.pad_id:
                ids.pop()
            ids = ids[: spec.num_tokens - 1] + [self.eos_id]
        return ids[: spec.num_tokens]

    def _units(self, spec: ModalitySpec, ids: list[int], rng: np.random.Generator) -> list[list[int]]:
        chunking = spec.chunks
        if chunking is None:
            return [[t] for t in ids]
        body, tail = (ids[:-1], [ids[-1]]) if ids and ids[-1] == self.eos_id else (ids, [])
        head, size = chunking
        units = [body[:head]] if body[:head] else []
        units += [body[i:i + size] for i in range(head, len(body), size)]
        if spec.shuffle_chunks and self.cfg.shuffle_chunks and len(units) > 1:
            units = [units[i] for i in rng.permutation(len(units))]
        return units + ([tail] if tail else [])

    # ---- masking

    def _empty(self, spec: ModalitySpec) -> dict[str, torch.Tensor]:
        n = spec.seq_len
        if spec.kind == "pixels":
            tensor = torch.zeros((n, spec.patch_dim), dtype=torch.uint8)
        elif spec.kind == "embedding":
            tensor = torch.zeros((n, spec.width), dtype=torch.float16)
        else:
            tensor = torch.full((n,), self.pad_id, dtype=torch.int64)
        return {"tensor": tensor,
                "input_mask": torch.ones(n, dtype=torch.bool), "target_mask": torch.ones(n, dtype=torch.bool),
                "decoder_attention_mask": torch.zeros(n, dtype=torch.int32)}

    def _mask_positions(self, tokens: np.ndarray, n_in: int, n_tgt: int,
                        rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = len(tokens)
        order = rng.permutation(n)
        input_mask = np.ones(n, dtype=bool)
        input_mask[order[:n_in]] = False
        target_mask = np.ones(n, dtype=bool)
        target_mask[order[n_in:n_in + n_tgt]] = False
        tensor = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.uint8 if tokens.ndim == 2 else np.int64))
        return {"tensor": tensor, "input_mask": torch.from_numpy(input_mask),
                "target_mask": torch.from_numpy(target_mask),
                "decoder_attention_mask": torch.zeros(n, dtype=torch.int32)}

    @staticmethod
    def _draw_spans(lengths: np.ndarray, n_in: int, keep: str, rng: np.random.Generator) -> np.ndarray:
        """Which units span masking hides (bool per unit): a keep probability from the keep scheme, lowered
        (x KEEP_PROB_DECAY) until the input (kept tokens + one sentinel per span) fits ``n_in``; all of them
        for an input budget of 0."""
        if n_in == 0:
            return np.ones(len(lengths), dtype=bool)
        keep_prob = {"random": lambda: float(rng.uniform()), "all": lambda: 1.0,
                     "binary": lambda: float(rng.integers(2))}[keep]()
        masked = rng.random(len(lengths)) >= keep_prob
        while _input_length(lengths, masked) > n_in:
            keep_prob *= KEEP_PROB_DECAY
            masked = rng.random(len(lengths)) >= keep_prob
        return masked

    def _mask_sequence(self, spec: ModalitySpec, units: list[list[int]], n_in: int, n_tgt: int, keep: str,
                       rng: np.random.Generator) -> dict[str, torch.Tensor]:
        lengths = np.array([len(u) for u in units], dtype=np.int64)
        masked = self._draw_spans(lengths, n_in, keep, rng)
        if n_in == 0:
            inp, tgt = [], span_mask(units, masked, self.sentinel_ids)[1]
        else:
            inp, tgt = span_mask(units, masked, self.sentinel_ids)
        tgt = _truncate_target(tgt, n_tgt, self.sentinel_set, rng)
        out = self._empty(spec)
        out["tensor"][: len(inp)] = torch.tensor(inp, dtype=torch.int64)
        out["input_mask"][: len(inp)] = False
        span = slice(n_in, n_in + len(tgt))
        out["tensor"][span] = torch.tensor(tgt, dtype=torch.int64)
        out["target_mask"][span] = False
        out["decoder_attention_mask"][span] = 1
        return out

    def _mask_embedding(self, spec: ModalitySpec, vectors: np.ndarray, n_in: int, keep: str,
                        rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """ml-4m's input masking of a sequence embedding: span-masked vectors, one zero vector per masked span,
        packed at [0, len); never a target."""
        masked = self._draw_spans(np.ones(len(vectors), dtype=np.int64), n_in, keep, rng)
        starts = masked & ~np.concatenate(([False], masked[:-1]))
        shown = ~masked | starts  # the kept vectors, and each span's first vector: the place of its sentinel
        rows = np.where(masked[shown, None], 0.0, vectors[shown]).astype(np.float16)  # (len, width)
        out = self._empty(spec)
        out["tensor"][: len(rows)] = torch.from_numpy(rows)
        out["input_mask"][: len(rows)] = False
        return out

    def _embedding_vectors(self, folder: str, spec: ModalitySpec, value: np.ndarray) -> np.ndarray:
        """An embedding's valid vectors (n, width), at most num_tokens of them (ml-4m truncates the same way)."""
        arr = np.asarray(value)
        if arr.ndim != 2 or arr.shape[1] != spec.width or arr.shape[0] < 1 or arr.dtype.kind != "f":
            raise ValueError(f"{folder}: expected float vectors (n >= 1, {spec.width}), got {arr.dtype} {arr.shape}")
        return arr[: spec.num_tokens]

    def __call__(self, sample: Mapping[str, np.ndarray | None],
                 rng: np.random.Generator) -> dict[str, dict[str, torch.Tensor]]:
        unknown = [f for f in sample if f not in self.specs]
        if unknown:
            raise ValueError(f"sample has folders {unknown} that the masker has no spec for ({self.folders})")
        comp = int(rng.choice(len(self._weights), p=self._weights)) if len(self._weights) > 1 else 0

        present = np.zeros(len(self.folders), dtype=bool)
        in_cap = np.zeros(len(self.folders), dtype=np.int64)
        seq_units: dict[str, list[list[int]]] = {}
        vectors: dict[str, np.ndarray] = {}
        for i, folder in enumerate(self.folders):
            row = sample.get(folder)
            if row is None:
                continue
            spec = self.specs[folder]
            present[i] = True
            if spec.kind == "sequence":
                units = self._units(spec, self._sequence_ids(spec, row), rng)
                seq_units[folder] = units
                in_cap[i] = sum(len(u) for u in units)
            elif spec.kind == "embedding":
                vectors[folder] = self._embedding_vectors(folder, spec, row)
                in_cap[i] = len(vectors[folder])
            else:
                shape = (spec.num_tokens, spec.patch_dim) if spec.kind == "pixels" else (spec.num_tokens,)
                if np.shape(row) != shape:
                    what = "uint8 patches" if spec.kind == "pixels" else "token ids"
                    raise ValueError(f"{folder}: expected {shape} {what}, got shape {np.shape(row)}")
                in_cap[i] = spec.num_tokens

        n_in = _dirichlet_split(self.cfg.input_tokens, np.where(present, self._in_alpha[comp], 0.0), in_cap, rng)
        # A span-masked target holds at most len + 2 tokens (all masked: sentinel, sequence, sentinel); with
        # the input budget <= len <= num_tokens, the row's 2 * (num_tokens + 1) always has room for both.
        tgt_cap = np.where([self.specs[f].kind == "sequence" for f in self.folders], in_cap + 2, in_cap - n_in)
        n_tgt = _dirichlet_split(self.cfg.target_tokens, np.where(present, self._tgt_alpha[comp], 0.0),
                                 tgt_cap, rng)

        out: dict[str, dict[str, torch.Tensor]] = {}
        for i, folder in enumerate(self.folders):
            spec = self.specs[folder]
            if not present[i]:
                out[folder] = self._empty(spec)
            elif spec.kind == "sequence":
                out[folder] = self._mask_sequence(spec, seq_units[folder], int(n_in[i]), int(n_tgt[i]),
                                                  self.cfg.keep_for(folder, comp, spec.keep), rng)
            elif spec.kind == "embedding":
                out[folder] = self._mask_embedding(spec, vectors[folder], int(n_in[i]),
                                                   self.cfg.keep_for(folder, comp, spec.keep), rng)
            else:
                out[folder] = self._mask_positions(np.asarray(sample[folder]), int(n_in[i]), int(n_tgt[i]), rng)
        return out


def collate(samples: Sequence[Mapping[str, Mapping[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Stack masked samples into a batch: folder -> field -> (B, L)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return {folder: {name: torch.stack([s[folder][name] for s in samples]) for name in fields}
            for folder, fields in samples[0].items()}

"""Any-to-any generation from a trained FourM, and `omniforge sample`, with ml-4m's generation conventions
(``fourm/models/generate.py``, ``fourm/utils/generation.py``; tests/fixtures/ml4m_generate holds its outputs).

Generation is chained, as 4M's: the targets are produced one after the other and every finished target joins
the inputs of the next one. Each step builds one row of the shared batch format (see ``masking.py``):

- image and global targets are decoded in rounds; :func:`token_schedule` says how many tokens each round
  reveals (ml-4m's cosine or linear schedule). ``order="maskgit"``: every still-unknown position is a decoder
  query, a token is drawn at each, and the most confident ones (the probability of the drawn token under the
  distribution it was drawn from) are kept, as many as the schedule says; the rest are masked again.
  ``order="random"`` (ROAR): a random order is fixed up front and each round queries, draws and keeps exactly
  the next scheduled positions. Kept tokens become encoder inputs of the following rounds. Each round has its
  temperature from :func:`temperature_schedule` (ml-4m's constant, linear and ``onex`` decays).
- sequence targets are decoded autoregressively (``sequence_sampling``; by default "ml4m" for a released model,
  whose FM decodes sequences "shifted" as ml-4m's, else "omniforge"). "ml4m" (ml-4m's convention): the row is
  ml-4m's empty sequence, its input the first span sentinel [S_1] at position 0 and its target [S_1] then the
  drawn tokens; nothing is banned and decoding stops at the first sentinel drawn (the model closes the span with
  [S_2] after [EOS]); the output is the tokens before it (ml-4m's ``merge_span_masking``).
  ``"omniforge"``: no input, the target row starts at position 0 with [S_1], [PAD] and the sentinels are never
  drawn, and decoding stops at [EOS]. Either way the decoder reads the previous target token (teacher forcing),
  one new token per step, at most the modality's ``num_tokens``; sequences use the target's ``temperature``
  (ml-4m schedules temperatures of image-like targets only).

Draws (ml-4m's ``sample_tokens``): top-k then top-p (:func:`filter_logits`) on the logits, then the softmax of
the filtered logits divided by the temperature; a temperature <= 1e-10 is greedy (argmax). Classifier-free
guidance (ml-4m's): with ``guidance_scale`` s != 1 the logits are ``uncond + s * (cond - uncond)`` (before
filtering), ``uncond`` from a second pass in which the conditions are dropped (:func:`drop_condition`): the
sample's inputs, and with ``guidance_grow`` (ml-4m's ``cfg_grow_conditioning``) every finished target too;
``guidance_weights`` is ml-4m's multi-condition variant, ``uncond + sum_i w_i * (cond_i - uncond)``, cond_i the
pass that keeps only condition i of the weighted ones. A ``torch.Generator`` seeded with ``seed`` makes the
same call give the same output.
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omniforge.errors import ConfigError, NoDecoderError
from omniforge.model.checkpoint import load_model
from omniforge.model.fm import FourM
from omniforge.model._cli import ORDERS, SCHEDULES, SEQUENCE_SAMPLINGS, TARGET_ALIASES, parse_top_k
from omniforge.model._cli import add_sample_cli as add_cli
from omniforge.model.specs import ModalitySpec, patchify, resolve_folder, unpatchify

Row = dict[str, Tensor]

GREEDY_BELOW = 1e-10  # ml-4m: np.isclose(temperature, 0, atol=1e-10) decodes greedily
MIN_TEMPERATURE = 1e-9  # ml-4m clips its decaying temperature schedules here
TEMPERATURE_SCHEDULES = ("constant", "linear", "onex:MIN_T:POWER")


def _onex(schedule: str) -> tuple[float, float] | None:
    """(min_t, power) of an ``onex:{min_t}:{power}`` schedule name, None for another name."""
    if not schedule.startswith("onex"):
        return None
    parts = schedule.split(":")
    try:
        min_t, power = (float(v) for v in parts[1:])
    except ValueError:
        raise ConfigError(f"temperature schedule {schedule!r}: write onex:MIN_T:POWER, e.g. onex:0.5:0.5") from None
    if not (math.isfinite(min_t) and math.isfinite(power) and power > 0):
        raise ConfigError(f"temperature schedule {schedule!r}: MIN_T must be finite and POWER positive")
    return min_t, power


def _number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


@dataclass(kw_only=True)
class SampleConfig:
    """How to generate. ml-4m's names in brackets; its defaults are in the `omniforge sample` help.

    ``targets`` holds per-target overrides: folder (or modality name) -> {field: value} for the fields in
    :data:`PER_TARGET` (ml-4m's per-target lists); :meth:`for_target` applies them.
    """

    temperature: float = 1.0  # [temps] starting temperature; <= 1e-10: greedy (argmax)
    temperature_schedule: str = "constant"  # [temp_schedules] constant | linear | onex:MIN_T:POWER
    top_k: int | float = 0  # int: keep the k most likely tokens; float in (0, 1]: that fraction of the vocab; 0: off
    top_p: float = 0.0  # nucleus: keep the most likely tokens until their probability exceeds top_p; 0: off
    steps: int = 8  # [decoding_steps] rounds for image and global targets
    schedule: str | None = None  # [token_decoding_schedules] cosine | linear; None: cosine for maskgit, linear
    # for random (ml-4m's ROAR always uses linear)
    order: str = "maskgit"  # [autoregression_schemes] maskgit | random (ROAR)
    guidance_scale: float = 1.0  # [cfg_scales] 1: no guidance, 0: unconditional, > 1: stronger conditioning
    guidance_weights: dict[str, float] = field(default_factory=dict)  # multi-condition guidance: folder -> w
    guidance_grow: bool = True  # [cfg_grow_conditioning] finished targets are dropped in the unconditional pass
    sequence_sampling: str | None = None  # ml4m | omniforge (module docstring); None: ml4m for a released
    # model's FM (its "shifted" sequence decoding), omniforge for omniforge's own
    seed: int = 0
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_drawing()
        self._check_rounds()
        self._check_guidance()
        if self.sequence_sampling is not None and self.sequence_sampling not in SEQUENCE_SAMPLINGS:
            raise ConfigError(f"SampleConfig.sequence_sampling={self.sequence_sampling!r}: must be one of "
                              f"{SEQUENCE_SAMPLINGS} (or None: by the model)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"SampleConfig.seed={self.seed!r}: must be an integer")
        for target, settings in self.targets.items():
            bad = sorted(set(settings) - set(PER_TARGET))
            if bad:
                raise ConfigError(f"SampleConfig.targets[{target!r}]: {bad} cannot be set per target; valid: "
                                  f"{', '.join(PER_TARGET)}")
            try:
                replace(self, **settings, targets={})
            except ConfigError as e:
                raise ConfigError(f"target {target}: {e}") from None

    def _check_drawing(self) -> None:
        if not _number(self.temperature):
            raise ConfigError(f"SampleConfig.temperature={self.temperature!r}: must be finite (<= 0 for greedy)")
        if self.temperature_schedule not in ("constant", "linear") and _onex(self.temperature_schedule) is None:
            raise ConfigError(f"SampleConfig.temperature_schedule={self.temperature_schedule!r}: must be one of "
                              f"{TEMPERATURE_SCHEDULES}")
        k = self.top_k
        if not _number(k) or k < 0 or (not isinstance(k, numbers.Integral) and k > 1):
            raise ConfigError(f"SampleConfig.top_k={k!r}: an integer >= 0 (a count) or a float in [0, 1] (a "
                              "fraction of the vocabulary); 0 = off")
        if not _number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"SampleConfig.top_p={self.top_p!r}: must be in [0, 1] (0 = off)")

    def _check_rounds(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"SampleConfig.steps={self.steps!r}: must be a positive integer")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"SampleConfig.schedule={self.schedule!r}: must be one of {SCHEDULES} (or None)")
        if self.order not in ORDERS:
            raise ConfigError(f"SampleConfig.order={self.order!r}: must be one of {ORDERS}")

    def _check_guidance(self) -> None:
        if not _number(self.guidance_scale):
            raise ConfigError(f"SampleConfig.guidance_scale={self.guidance_scale!r}: must be a finite number "
                              "(1 = no guidance)")
        for m, w in self.guidance_weights.items():
            if not _number(w):
                raise ConfigError(f"SampleConfig.guidance_weights[{m!r}]={w!r}: must be a finite number")
        if self.guidance_weights and self.guidance_scale != 1.0:
            raise ConfigError(f"SampleConfig: guidance_scale={self.guidance_scale} and guidance_weights both set; "
                              "give one (weights are the multi-condition form of the scale)")
        if not isinstance(self.guidance_grow, bool):
            raise ConfigError(f"SampleConfig.guidance_grow={self.guidance_grow!r}: must be true or false")

    @property
    def token_order_schedule(self) -> str:
        """The token schedule in use: ``schedule``, else ml-4m's for the order (cosine MaskGIT, linear ROAR)."""
        return self.schedule or ("cosine" if self.order == "maskgit" else "linear")

    def for_target(self, folder: str) -> SampleConfig:
        """This config with ``folder``'s overrides applied (and no overrides left)."""
        return replace(self, **self.targets.get(folder, {}), targets={})


PER_TARGET = ("temperature", "temperature_schedule", "top_k", "top_p", "steps", "schedule", "order",
              "guidance_scale", "sequence_sampling")


def parse_target(text: str) -> tuple[str, dict[str, Any]]:
    """``FOLDER:key=value,key=value`` (a `--target` flag) -> (FOLDER, {field: value}); keys are the
    :data:`PER_TARGET` fields or their short names (temp, temp_schedule, cfg). Values are parsed by field."""
    name, sep, rest = text.partition(":")
    if not name or not sep or not rest:
        raise ConfigError(f"--target {text!r}: write FOLDER:key=value[,key=value...], e.g. tok_rgb@224:steps=8,temp=3")
    out: dict[str, Any] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = TARGET_ALIASES.get(key.strip(), key.strip())
        if not eq or key not in PER_TARGET:
            raise ConfigError(f"--target {text!r}: {item!r} is not key=value with a key among "
                              f"{', '.join([*PER_TARGET, *TARGET_ALIASES])}")
        if key in out:
            raise ConfigError(f"--target {text!r}: {key} is given twice")
        out[key] = _parse_value(key, value.strip(), text)
    return name, out


def _parse_value(key: str, value: str, text: str) -> Any:
    try:
        if key == "steps":
            return int(value)
        if key == "top_k":
            return parse_top_k(value)
        if key in ("temperature", "top_p", "guidance_scale"):
            return float(value)
    except ValueError:
        raise ConfigError(f"--target {text!r}: {key}={value!r} is not a number") from None
    if key == "schedule" and value in ("none", "None", ""):
        return None
    return value


# --------------------------------------------------------------------------------------- ml-4m's schedules

def token_schedule(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens revealed in each round, as ml-4m's ``cosine_schedule`` / ``linear_schedule`` compute them.

    "cosine": with c_i = (1 + cos(pi * i / steps)) / 2 (i = 0 .. steps - 1), round i < steps - 1 reveals
    ``round(num_tokens * (c_i - c_{i+1}))`` (halves to even) and the last round the rest: few tokens first and
    last, many in the middle; ``steps`` counts, some 0 when there are more rounds than the rounding can fill.
    "linear": the differences of ``int(linspace(0, num_tokens, steps + 1))``, largest first, trailing zeros
    dropped (so at most ``num_tokens`` rounds). Where the cosine rounding over-fills the rounds before the last
    (ml-4m's last round comes out negative and its ``torch.topk`` fails: 8 rounds of 16 tokens, for one), the
    excess is taken off the latest rounds and the last reveals nothing: the only departure from ml-4m, on splits
    ml-4m cannot run.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {SCHEDULES}")
    if num_tokens < 1 or steps < 1:
        raise ValueError(f"token_schedule needs num_tokens >= 1 and steps >= 1, got {num_tokens}, {steps}")
    if schedule == "linear":
        edges = np.linspace(0, num_tokens, steps + 1).astype(np.int64)
        counts = sorted((int(c) for c in np.diff(edges)), reverse=True)
        while counts and counts[-1] == 0:
            counts.pop()
        return counts
    share = [0 + 0.5 * 1 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]
    counts = [round(num_tokens * (a - b)) for a, b in zip(share[:-1], share[1:])]
    counts.append(num_tokens - sum(counts))
    excess, counts[-1] = max(-counts[-1], 0), max(counts[-1], 0)
    for i in range(len(counts) - 2, -1, -1):
        if not excess:
            break
        take = min(counts[i], excess)
        counts[i] -= take
        excess -= take
    return counts


def temperature_schedule(temperature: float, counts: Sequence[int], schedule: str = "constant") -> list[float]:
    """The temperature of each round of ``counts`` (a :func:`token_schedule`), as ml-4m's schedules give it.

    "constant": ``temperature`` every round. "linear" (ml-4m's ``linear_temp_schedule``): round i gets
    ``temperature * (tokens not yet revealed before round i) / total``. "onex:MIN_T:POWER" (``onex_temp_schedule``):
    y = x^-POWER over x = linspace(1, 100, total), rescaled to [0, 1]; round i gets
    ``MIN_T + (temperature - MIN_T) * (1 - revealed after round i / total) * y[i]``. The decaying schedules are
    clipped below at 1e-9 (so they never turn greedy).
    """
    if schedule == "constant":
        return [float(temperature)] * len(counts)
    counts_arr = np.asarray(counts, dtype=np.int64)
    total = counts_arr.sum()
    if schedule == "linear":
        rest = (temperature * (total - counts_arr.cumsum()) / total)[:-1]
        temps = np.concatenate([np.array([temperature * 1.0]), rest])
    else:
        onex = _onex(schedule)
        if onex is None:
            raise ConfigError(f"unknown temperature schedule {schedule!r}; valid: {TEMPERATURE_SCHEDULES}")
        min_t, power = onex
        y = 1 / (np.linspace(1, 100, num=int(total)) ** power)
        y = y - min(y)
        y = y / max(y)
        done = np.cumsum(counts_arr) / np.sum(counts_arr)
        temps = np.array([min_t + (temperature - min_t) * ((1 - d) * u) for u, d in zip(y, done)])
    return [float(t) for t in temps.clip(min=MIN_TEMPERATURE)]


# ------------------------------------------------------------------------------------------------- drawing

def filter_logits(logits: Tensor, *, top_k: int | float = 0, top_p: float = 0.0) -> Tensor:
    """``logits`` (..., V) with everything outside the top-k, then the nucleus, set to -inf (ml-4m's rules).

    top-k: an int k keeps the logits >= the k-th largest (ties kept); a float keeps ``int(top_k * V)`` of them.
    top-p (> 0): in descending order, a token is dropped when the probability of the tokens before it already
    exceeds ``top_p``; the most likely token always stays.
    """
    out = logits.float().clone()
    vocab = out.shape[-1]
    if top_k > 0:
        k = min(top_k if isinstance(top_k, numbers.Integral) else int(top_k * vocab), vocab)
        if k < 1:
            raise ConfigError(f"top_k={top_k} keeps no token of a {vocab}-token vocabulary: use a larger fraction")
        kth = torch.topk(out, int(k), dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p > 0.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        over = sorted_logits.softmax(dim=-1).cumsum(dim=-1) > top_p
        drop_sorted = torch.zeros_like(over)
        drop_sorted[..., 1:] = over[..., :-1]  # keep the first token past the threshold too
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def token_distribution(logits: Tensor, temperature: float, *, top_k: int | float = 0, top_p: float = 0.0) -> Tensor:
    """The distribution ml-4m draws from at ``temperature`` > 0: softmax(filter_logits(logits) / temperature)."""
    return (filter_logits(logits, top_k=top_k, top_p=top_p) / temperature).softmax(dim=-1)


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + (cond - uncond) * scale`` (scale 1: ``cond``, 0: ``uncond``)."""
    return uncond + (cond - uncond) * scale


def multi_guided_logits(uncond: Tensor, conds: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Guidance by several conditions: ``uncond + sum_i weights[i] * (conds[i] - uncond)``."""
    return uncond + torch.stack([w * (c - uncond) for w, c in zip(weights, conds)]).sum(dim=0)


def _draw(logits: Tensor, temperature: float, cfg: SampleConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids, confidence) for logits (N, V): drawn ids (N,) and the probability of each under the distribution it
    was drawn from (greedy: under the model's softmax; ml-4m gives every greedy draw probability 1)."""
    logits = logits.float()
    if temperature <= GREEDY_BELOW:
        ids = logits.argmax(dim=-1)
        return ids, logits.softmax(dim=-1).gather(-1, ids[:, None])[:, 0]
    probs = token_distribution(logits, temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    ids = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return ids, probs.gather(-1, ids[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------- batch rows

def _row(spec: ModalitySpec, device: torch.device) -> Row:
    """An all-masked row of one modality (B = 1): no input, no target."""
    n = spec.seq_len
    if spec.kind == "pixels":
        tensor = torch.zeros(1, n, spec.patch_dim, dtype=torch.uint8, device=device)
    elif spec.kind == "embedding":
        tensor = torch.zeros(1, n, spec.width, dtype=torch.float16, device=device)
    else:
        tensor = torch.zeros(1, n, dtype=torch.int64, device=device)
    return {"tensor": tensor,
            "input_mask": torch.ones(1, n, dtype=torch.bool, device=device),
            "target_mask": torch.ones(1, n, dtype=torch.bool, device=device),
            "decoder_attention_mask": torch.zeros(1, n, dtype=torch.int32, device=device)}


def _input_row(spec: ModalitySpec, ids: np.ndarray, device: torch.device) -> Row:
    """A fully visible input: image/global ids (N,), pixel patches (N, P), or a sequence's ids or an embedding's
    vectors (n, width) at [0, len)."""
    row = _row(spec, device)
    n = len(ids)
    row["tensor"][0, :n] = torch.as_tensor(ids, dtype=row["tensor"].dtype, device=device)
    row["input_mask"][0, :n] = False
    return row


def drop_condition(spec: ModalitySpec, device: torch.device, *, first_sentinel: int) -> Row:
    """A condition as the unconditional pass of guidance sees it (ml-4m's ``empty_*_modality``): nothing of an
    image, global or pixel input; a sequence's empty input, the sentinel [S_1] at position 0; an embedding's
    one all-zero vector at position 0 (the sentinel of a fully masked span). Never a target."""
    row = _row(spec, device)
    if spec.kind == "sequence":
        row["tensor"][0, 0] = first_sentinel
        row["input_mask"][0, 0] = False
    elif spec.kind == "embedding":
        row["input_mask"][0, 0] = False
    return row


def _sequence_input(spec: ModalitySpec, ids: np.ndarray, *, eos_id: int, pad_id: int) -> np.ndarray:
    """A sequence input as training sees it: up to and including the first [EOS] (one is appended when there is
    none, after stripping a [PAD] tail), at most ``num_tokens`` ids."""
    seq = [int(t) for t in np.asarray(ids).reshape(-1)]
    if eos_id in seq:
        seq = seq[: seq.index(eos_id) + 1]
    else:
        while seq and seq[-1] == pad_id:
            seq.pop()
        seq = seq[: spec.num_tokens - 1] + [eos_id]
    return np.asarray(seq[: spec.num_tokens], dtype=np.int64)


def _check_inputs(specs: Mapping[str, ModalitySpec], inputs: Mapping[str, np.ndarray],
                  targets: Sequence[str], cfg: SampleConfig) -> None:
    unknown = [m for m in [*inputs, *targets] if m not in specs]
    if unknown:
        raise ConfigError(f"modalities {unknown} are not among the model's: {list(specs)}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"targets {list(targets)} name a modality twice")
    given = [m for m in targets if m in inputs]
    if given:
        raise ConfigError(f"targets {given} are also given as inputs: drop them from one of the two")
    stray = [m for m in cfg.targets if m not in targets]
    if stray:
        raise ConfigError(f"per-target settings for {stray}, which are not targets ({list(targets)})")
    unweighted = [m for m in cfg.guidance_weights if m not in specs]
    if unweighted:
        raise ConfigError(f"guidance weights for {unweighted}, which are not among the model's modalities")
    input_only = [m for m in targets if specs[m].input_only]
    if input_only:
        raise ConfigError(f"{input_only} are input-only (raw pixels, embeddings, or role 'input') and cannot be "
                          f"generated: generate their token folders instead")
    for m, ids in inputs.items():
        spec = specs[m]
        arr = np.asarray(ids)
        if spec.kind == "pixels":
            if arr.shape != (spec.num_tokens, spec.patch_dim) or arr.dtype != np.uint8:
                raise ConfigError(f"input {m}: expected uint8 patches ({spec.num_tokens}, {spec.patch_dim}), "
                                  f"got {arr.dtype} {arr.shape}")
            continue
        if spec.kind == "embedding":
            if arr.ndim != 2 or not 1 <= arr.shape[0] <= spec.num_tokens or arr.shape[1] != spec.width \
                    or arr.dtype.kind != "f":
                raise ConfigError(f"input {m}: expected float vectors (1..{spec.num_tokens}, {spec.width}), got "
                                  f"{arr.dtype} {arr.shape}")
            continue
        if spec.kind != "sequence" and arr.shape != (spec.num_tokens,):
            raise ConfigError(f"input {m}: expected ({spec.num_tokens},) token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= spec.vocab_size):
            raise ConfigError(f"input {m}: token ids must be in [0, {spec.vocab_size}), got "
                              f"[{arr.min()}, {arr.max()}]")


# ---------------------------------------------------------------------------------------------- guidance

def guidance_drops(context: Sequence[str], inputs: Sequence[str], *, grow: bool) -> list[str]:
    """The conditions the unconditional pass drops (ml-4m's ``cfg_cond_domains``): the sample's ``inputs``, and
    with ``grow`` (``cfg_grow_conditioning``) every finished target of ``context`` too, in context order."""
    return list(context) if grow else [m for m in context if m in inputs]


Combine = Callable[[Tensor], Tensor]  # logits of every pass (P, ..., V) -> the logits to draw from (..., V)


@dataclass
class _Chain:
    """What a target's generation reads: the model, its specs, the input rows and the guidance bookkeeping."""

    model: FourM
    specs: Mapping[str, ModalitySpec]
    context: dict[str, Row]  # folder -> input row: the sample's inputs, then every finished target
    inputs: list[str]  # the sample's own inputs (ml-4m's cond_domains)
    first_sentinel: int
    device: torch.device

    def passes(self, cfg: SampleConfig) -> tuple[list[dict[str, Row]], Combine]:
        """The contexts of the forward passes of one step and how their logits combine (ml-4m's guidance)."""
        if cfg.guidance_weights:
            weighted = [m for m in cfg.guidance_weights if m in self.context]
            if not weighted:
                return [self.context], lambda logits: logits[0]
            uncond = self._without(weighted)
            conds = [{**uncond, m: self.context[m]} for m in weighted]
            weights = [float(cfg.guidance_weights[m]) for m in weighted]
            return [*conds, uncond], lambda logits: multi_guided_logits(logits[-1], list(logits[:-1]), weights)
        dropped = guidance_drops(list(self.context), self.inputs, grow=cfg.guidance_grow)
        if cfg.guidance_scale == 1.0 or not dropped:  # ml-4m: no guidance, one pass
            return [self.context], lambda logits: logits[0]
        scale = float(cfg.guidance_scale)
        return [self.context, self._without(dropped)], lambda logits: guided_logits(logits[0], logits[1], scale)

    def _without(self, dropped: Sequence[str]) -> dict[str, Row]:
        return {m: drop_condition(self.specs[m], self.device, first_sentinel=self.first_sentinel)
                if m in dropped else row for m, row in self.context.items()}


def _stack(contexts: Sequence[dict[str, Row]], target: str, row: Row) -> dict[str, Row]:
    """One batch (B = len(contexts)): pass i holds contexts[i] and the target's row."""
    if len(contexts) == 1:
        return {**contexts[0], target: row}
    batch = {m: {k: torch.cat([c[m][k] for c in contexts]) for k in row_} for m, row_ in contexts[0].items()}
    batch[target] = {k: v.expand(len(contexts), *v.shape[1:]) for k, v in row.items()}
    return batch


# ---------------------------------------------------------------------------------------------- generation

def _generate_tokens(chain: _Chain, spec: ModalitySpec, cfg: SampleConfig, gen: torch.Generator) -> np.ndarray:
    """MaskGIT or ROAR decoding of one image/global target."""
    device, n = chain.device, spec.num_tokens
    counts = token_schedule(n, cfg.steps, cfg.token_order_schedule)
    temps = temperature_schedule(cfg.temperature, counts, cfg.temperature_schedule)
    contexts, combine = chain.passes(cfg)
    tokens = torch.zeros(n, dtype=torch.int64, device=device)
    known = torch.zeros(n, dtype=torch.bool, device=device)
    order = torch.randperm(n, generator=gen, device=device) if cfg.order == "random" else None
    start = 0
    for count, temperature in zip(counts, temps):
        if count == 0:  # ml-4m's cosine rounding can leave a round empty: it changes nothing
            continue
        if order is not None:  # ROAR: query exactly the next positions of the random order
            query = torch.zeros(n, dtype=torch.bool, device=device)
            query[order[start:start + count]] = True
            start += count
        else:  # MaskGIT: query every unknown position
            query = ~known
        row = _row(spec, device)
        row["tensor"][0] = tokens
        row["input_mask"][0] = ~known
        row["target_mask"][0] = ~query
        positions = torch.nonzero(query).flatten()  # ascending, as the logits rows
        logits = chain.model.decoder_logits(_stack(contexts, spec.name, row))[spec.name][:, : len(positions)]
        ids, confidence = _draw(combine(logits.float()), temperature, cfg, gen)
        keep = torch.topk(confidence, count).indices if order is None else torch.arange(count, device=device)
        tokens[positions[keep]] = ids[keep]
        known[positions[keep]] = True
    return tokens.cpu().numpy()


def _generate_sequence(chain: _Chain, spec: ModalitySpec, cfg: SampleConfig, gen: torch.Generator, *,
                       sentinel_ids: Sequence[int], eos_id: int, pad_id: int) -> np.ndarray:
    """Autoregressive decoding of one sequence target (see ``sequence_sampling`` in the module docstring).

    The model's logits at a sequence target: row k is the distribution of target token k given the tokens before
    it (omniforge's "mask_first" decoding), or of token k + 1 (ml-4m's "shifted" decoding of a released model,
    ``ModelConfig.sequence_decoding``: the first target token is given and has no logits)."""
    if len(sentinel_ids) < 2:
        raise ConfigError(f"{spec.name}: sequence targets need the span sentinels (at least [S_0] and [S_1])")
    ml4m = _sequence_sampling(chain.model, cfg) == "ml4m"
    device = chain.device
    sentinels = {int(s) for s in sentinel_ids}
    banned = torch.tensor(sorted({int(pad_id), *sentinels} - {int(eos_id)}), device=device)
    banned = banned[banned < spec.vocab_size]
    first = 1 if ml4m else 0  # row position of the target's [S_1]
    shift = 1 if _shifted(chain.model) else 0
    row = drop_condition(spec, device, first_sentinel=int(sentinel_ids[1])) if ml4m else _row(spec, device)
    row["tensor"][0, first] = int(sentinel_ids[1])  # span masking numbers spans from 1
    contexts, combine = chain.passes(cfg)
    encoded = chain.model.encode(_stack(contexts, spec.name, row))  # the target's input is fixed: encode once
    out: list[int] = []
    for t in range(1, spec.num_tokens + 1):
        row["target_mask"][0, first: first + t + 1] = False  # target ranks 0..t; rank t reads rank t - 1
        row["decoder_attention_mask"][0, first: first + t + 1] = 1
        batch = _stack(contexts, spec.name, row)
        logits = chain.model.decoder_logits(batch, encoded)[spec.name][:, t - shift]  # (P, V): target token t
        logits = combine(logits.float())[None]
        if not ml4m:
            logits = logits.index_fill(1, banned, float("-inf"))
        ids, _ = _draw(logits, cfg.temperature, cfg, gen)
        token = int(ids[0])
        if ml4m and token in sentinels:  # the span is closed: ml-4m's merge keeps what came before
            break
        out.append(token)
        row["tensor"][0, first + t] = token
        if not ml4m and token == eos_id:
            break
    return np.asarray(out, dtype=np.int64)


def _shifted(model: FourM) -> bool:
    """Whether the model decodes sequences as ml-4m's released FM does (``ModelConfig.sequence_decoding``
    "shifted": no logits for the given first target token)."""
    return getattr(model.config, "sequence_decoding", "mask_first") == "shifted"


def _sequence_sampling(model: FourM, cfg: SampleConfig) -> str:
    """``cfg.sequence_sampling``, else ml-4m's for a released model (shifted decoding) and omniforge's otherwise."""
    return cfg.sequence_sampling or ("ml4m" if _shifted(model) else "omniforge")


@torch.inference_mode()
def generate(model: FourM, specs: Mapping[str, ModalitySpec], inputs: Mapping[str, np.ndarray],
             targets: Sequence[str], cfg: SampleConfig, *, sentinel_ids: Sequence[int], eos_id: int,
             pad_id: int = 0) -> dict[str, np.ndarray]:
    """Generate ``targets`` (in order, chained) for ONE sample from ``inputs``.

    ``inputs``: folder -> token ids (image/global: (num_tokens,); sequence: ids without padding, with or
    without a final [EOS]; pixels: uint8 (num_tokens, patch_dim) patches; embedding: its valid vectors
    (n, width)). ``cfg.targets`` keys must be folders among ``targets``. Returns folder -> int64 ids:
    image/global (num_tokens,) in [0, vocab_size); sequence: the generated ids (at most ``num_tokens``; with
    ``sequence_sampling="omniforge"`` up to and including [EOS]). Each generated target is an input of the
    following ones.
    """
    _check_inputs(specs, inputs, targets, cfg)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    context: dict[str, Row] = {}
    for m, ids in inputs.items():
        spec = specs[m]
        if spec.kind == "sequence":
            ids = _sequence_input(spec, ids, eos_id=eos_id, pad_id=pad_id)
        dtype = {"pixels": np.uint8, "embedding": np.float16}.get(spec.kind, np.int64)
        context[m] = _input_row(spec, np.asarray(ids, dtype=dtype), device)
    first_sentinel = int(sentinel_ids[1]) if len(sentinel_ids) > 1 else 0
    chain = _Chain(model, specs, context, list(inputs), first_sentinel, device)
    out: dict[str, np.ndarray] = {}
    try:
        for m in targets:
            spec, target_cfg = specs[m], cfg.for_target(m)
            if spec.kind == "sequence":
                ids = _generate_sequence(chain, spec, target_cfg, gen, sentinel_ids=sentinel_ids, eos_id=eos_id,
                                         pad_id=pad_id)
                as_input = ids if _sequence_sampling(model, target_cfg) == "ml4m" else \
                    _sequence_input(spec, ids, eos_id=eos_id, pad_id=pad_id)
            else:
                ids = as_input = _generate_tokens(chain, spec, target_cfg, gen)
            out[m] = ids
            context[m] = _input_row(spec, as_input, device)
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------------ CLI

def _shard_of(root: str, key: str) -> int:
    import pyarrow.compute as pc

    from omniforge.shards import load_manifest

    manifest = load_manifest(root)
    rows = manifest.filter(pc.equal(manifest["key"], key))
    if rows.num_rows == 0:
        raise ConfigError(f"key {key!r} is not in {root}'s manifest; keys look like "
                          f"{manifest.column('key').slice(0, 5).to_pylist()}")
    return int(rows.column("shard")[0].as_py())


def _read_member(root: str, folder: str, shard: int, key: str, hint: str) -> bytes:
    from omniforge import shards, storage

    uri = shards.tar_uri(root, folder, shard)
    if not storage.exists(uri):
        raise ConfigError(f"{uri} does not exist: {hint}")
    for name, data in shards.iter_tar(uri):
        if shards.member_key(name) == key:
            return data
    raise ConfigError(f"{key!r} has no {folder} member in {uri} (its labeling or tokenization failed or is missing)")


def read_input(root: str, spec: ModalitySpec, key: str, tokenizers: str | None = None) -> np.ndarray:
    """Crop 0 of ``key`` as the trainer sees it: token ids (N,) from the token shard; for a raw sequence folder
    its label serialized for crop 0 with the tokenize job's frozen draw (needs ``tokenizers``); for a pixel
    folder the label image cropped with crop 0 of its crop settings, as uint8 patches (N, patch_dim); for an
    embedding the valid vectors (n, width) of its label."""
    from omniforge import codecs, shards
    from omniforge.model.data import labels_root
    from omniforge.tokenize.crops import crop_image

    shard = _shard_of(root, key)
    if spec.kind == "embedding":
        value = codecs.decode("npz", _read_member(labels_root(root, spec.name), spec.source, shard, key,
                                                  f"label {spec.source} first (`omniforge label`)"))
        problem = codecs.embedding_problem(value, (spec.num_tokens, spec.width))
        if problem:
            raise ConfigError(f"{spec.source} label of {key!r} {problem}: relabel it with `omniforge label`")
        return value["emb"][0][value["mask_valid"][0]]
    if spec.raw and spec.kind == "sequence":
        from omniforge.model.data import serialize_raw
        from omniforge.modalities import IMAGE_MODALITY
        from omniforge.tokenize.store import TokenizerStore

        if not tokenizers:
            raise ConfigError(f"{spec.name} is a raw label folder: pass --tokenizers to serialize it")
        labels = labels_root(root, spec.name)
        crops = np.load(io.BytesIO(_read_member(root, shards.CROP_SETTINGS, shard, key,
                                                "run `omniforge tokenize` first (it writes the crop settings)")),
                        allow_pickle=False)
        label = _read_member(labels, spec.source, shard, key, f"label {spec.source} first (`omniforge label`)")
        jpg = _read_member(labels, IMAGE_MODALITY, shard, key, "label rgb first (`omniforge label`)")
        ids, _ = serialize_raw(spec, label, jpg, crops[0], key=key, index=0, rng=None,
                               store=TokenizerStore(tokenizers), where=shards.tar_uri(labels, spec.source, shard))
        return ids.astype(np.int64)
    if spec.kind != "pixels":
        data = _read_member(root, spec.name, shard, key, f"tokenize {spec.name} first (`omniforge tokenize`)")
        return np.load(io.BytesIO(data), allow_pickle=False)[0].astype(np.int64)
    crops = np.load(io.BytesIO(_read_member(root, shards.CROP_SETTINGS, shard, key,
                                            "run `omniforge tokenize` first (it writes the crop settings)")),
                    allow_pickle=False)
    image = np.asarray(codecs.decode("jpg", _read_member(labels_root(root, spec.name), spec.source, shard, key,
                                                         f"label {spec.source} first (`omniforge label`)")))
    return patchify(crop_image(image, crops[0], spec.grid * spec.patch), spec.patch)


def _text_ids(text_tok: Any) -> tuple[list[int], int, int]:
    """(sentinel ids, eos id, pad id): from the text tokenizer, else the fixed layout every omniforge
    vocabulary starts with ([PAD] [UNK] [SOS] [EOS] then [S_0]..[S_199])."""
    from omniforge.tokenize import text

    if text_tok is not None:
        return list(text_tok.sentinel_ids), text_tok.eos_id, text_tok.pad_id
    return list(range(4, 4 + text.NUM_SENTINELS)), 3, 0


def _modality_of(folder: str) -> str | None:
    from omniforge.modalities import by_embedding_folder, by_pixel_folder, by_token_folder

    info = by_token_folder(folder) or by_pixel_folder(folder) or by_embedding_folder(folder)
    return info.name if info is not None else None


def decode_output(folder: str, ids: np.ndarray, spec: ModalitySpec, tokenizers: str, text_tok: Any) -> Any:
    """Generated ids decoded by the folder's tokenizer kind: a label array (images, features), text (sequences), or
    a sequence kind's label (human_poses: the people, `SmplPoseKind.decode`)."""
    from omniforge.modalities import by_token_folder
    from omniforge.model.specs import raw_sequence_info
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    if spec.kind == "sequence":
        info = by_token_folder(folder) or raw_sequence_info(folder)
        if info is None:  # a folder the registry does not know: its text
            return text_tok.decode(ids.tolist())
        return kind_for(info).decode(np.asarray(ids), TokenizerStore(tokenizers))
    info = by_token_folder(folder)
    if info is None:
        raise ConfigError(f"{folder} is not a registered token folder: no tokenizer to decode it")
    return kind_for(info).decode(np.asarray(ids), TokenizerStore(tokenizers))


def _save_decoded(folder: str, value: Any, out_dir: str) -> str:
    """Write a decoded output: text as .txt, a label structure (human_poses' people) as .decoded.json, an 8/16-bit
    image as .png, anything else as .npy."""
    if isinstance(value, str):
        path = os.path.join(out_dir, f"{folder}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(value + "\n")
        return path
    if isinstance(value, (dict, list)):
        from omniforge import codecs

        path = os.path.join(out_dir, f"{folder}.decoded.json")
        with open(path, "wb") as f:
            f.write(codecs.encode("json", value))
        return path
    if value.dtype in (np.uint8, np.uint16) and (value.ndim == 2 or (value.ndim == 3 and value.shape[-1] == 3)):
        from PIL import Image

        path = os.path.join(out_dir, f"{folder}.png")
        Image.fromarray(value).save(path)
    else:
        path = os.path.join(out_dir, f"{folder}.decoded.npy")
        np.save(path, value)
    return path


def _panel(folder: str, what: str) -> str:
    """A panel title whose first word picks the drawing (the modality name when known)."""
    name = _modality_of(folder) or folder
    return f"{name} ({what} {folder})" if name != folder else f"{folder} ({what})"


def sample_key(checkpoint: str, root: str, key: str, sources: Sequence[str], targets: Sequence[str], out: str, *,
               tokenizers: str | None = None, cfg: SampleConfig | None = None, device: str = "cpu") -> list[str]:
    """Generate ``targets`` from ``sources`` (modality names or folders) for one key of a token root; write
    OUT/<key>/<folder>.npy ((1, N) int16, like the token shards), decoded outputs with ``tokenizers``, and
    OUT/<key>/sample.png drawn by the renderer `omniforge show` uses. Returns the lines to print."""
    return sample_keys(checkpoint, root, [key], sources, targets, out, tokenizers=tokenizers, cfg=cfg, device=device)


def sample_keys(checkpoint: str, root: str, keys: Sequence[str], sources: Sequence[str], targets: Sequence[str],
                out: str, *, tokenizers: str | None = None, cfg: SampleConfig | None = None,
                device: str = "cpu") -> list[str]:
    """:func:`sample_key` for each of ``keys``, loading the checkpoint once. Every key is sampled with
    ``cfg.seed``, so a key gives the same output alone or in a list."""
    if not keys:
        raise ConfigError("no key to sample: pass --key KEY (or several, comma-separated)")
    cfg = cfg or SampleConfig()
    model, specs, _ = load_model(checkpoint, device=device)
    lines: list[str] = []
    undecodable: set[str] = set()  # folders whose NoDecoderError line was printed already
    for key in keys:
        lines += _sample_one(model, specs, root, key, sources, targets, out, tokenizers=tokenizers,
                             cfg=cfg, undecodable=undecodable)
    return lines


def _resolved(cfg: SampleConfig, specs: Mapping[str, ModalitySpec]) -> SampleConfig:
    """``cfg`` with the modality names of its per-target settings and guidance weights turned into folders."""
    targets: dict[str, dict[str, Any]] = {}
    for name, settings in cfg.targets.items():
        folder = resolve_folder(name, specs, target=True)
        if folder in targets:
            raise ConfigError(f"per-target settings name {folder} twice ({name!r} is the same target)")
        targets[folder] = settings
    weights = {resolve_folder(m, specs): w for m, w in cfg.guidance_weights.items()}
    return replace(cfg, targets=targets, guidance_weights=weights)


def _decoded(m: str, ids: np.ndarray, spec: ModalitySpec, tokenizers: str, text_tok: Any,
             undecodable: set[str], lines: list[str]) -> Any | None:
    """:func:`decode_output`, or None when the folder's tokenizer cannot decode here (NoDecoderError): its
    one-line message joins ``lines`` the first time a folder meets it."""
    try:
        return decode_output(m, ids, spec, tokenizers, text_tok)
    except NoDecoderError as e:
        if m not in undecodable:
            undecodable.add(m)
            lines.append(f"{m}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None


def _sample_one(model: Any, specs: dict[str, ModalitySpec], root: str, key: str, sources: Sequence[str],
                targets: Sequence[str], out: str, *, tokenizers: str | None, cfg: SampleConfig,
                undecodable: set[str]) -> list[str]:
    from omniforge._render import render_sample

    sources = [resolve_folder(m, specs) for m in sources]
    targets = [resolve_folder(m, specs, target=True) for m in targets]
    unknown = [m for m in [*sources, *targets] if m not in specs]
    if unknown:
        raise ConfigError(f"the checkpoint has no modalities {unknown}; it knows {list(specs)} "
                          "(modality names such as rgb or depth are accepted too)")
    cfg = _resolved(cfg, specs)
    text_tok = None
    if tokenizers and any(specs[m].kind == "sequence" for m in [*sources, *targets]):
        from omniforge.tokenize.store import TokenizerStore

        text_tok = TokenizerStore(tokenizers).text()
    sentinel_ids, eos_id, pad_id = _text_ids(text_tok)
    inputs = {m: read_input(root, specs[m], key, tokenizers) for m in sources}
    generated = generate(model, specs, inputs, targets, cfg, sentinel_ids=sentinel_ids, eos_id=eos_id,
                         pad_id=pad_id)
    out_dir = os.path.join(out, key)
    os.makedirs(out_dir, exist_ok=True)
    panels: dict[str, Any] = {}
    lines: list[str] = []
    for m, value in inputs.items():
        spec = specs[m]
        decoded = None
        if spec.kind == "pixels":
            panels[_panel(m, "input, crop 0 of")] = unpatchify(value, spec.patch)
            continue
        if spec.kind == "embedding":
            panels[_panel(m, "input")] = value
            continue
        if tokenizers:
            decoded = _decoded(m, value, spec, tokenizers, text_tok, undecodable, lines)
        if decoded is not None:
            panels[_panel(m, "input, decoded from")] = decoded
        else:
            panels[f"{m} (input)"] = np.asarray(value)[None]
    for m, ids in generated.items():
        path = os.path.join(out_dir, f"{m}.npy")
        row = np.full(specs[m].num_tokens, pad_id, dtype=np.int16)  # (N,): a sequence is [PAD]-filled
        row[: len(ids)] = ids
        np.save(path, row[None])  # (1, N) like the token shards
        line = f"{m}: {len(ids)} tokens -> {path}"
        notes: list[str] = []
        value = _decoded(m, ids, specs[m], tokenizers, text_tok, undecodable, notes) if tokenizers else None
        if value is not None:
            line += f", decoded -> {_save_decoded(m, value, out_dir)}"
            panels[_panel(m, "generated, decoded from")] = value
        else:
            panels[f"{m} (generated)"] = row[None].astype(np.int64)
        lines += [line, *notes]
    png = os.path.join(out_dir, "sample.png")
    title = f"{key}: {', '.join(sources)} -> {', '.join(targets)}"
    render_sample(key, panels, title=title).save(png)
    lines.append(f"{title}, drawn -> {png}")
    return lines


def sample_cli(args: Any) -> int:
    """`omniforge sample`: see :func:`sample_keys`."""
    targets: dict[str, dict[str, Any]] = {}
    for text in args.target_settings:
        name, settings = parse_target(text)
        if name in targets:
            raise ConfigError(f"--target {text!r}: {name} has settings already; give them in one --target")
        targets[name] = settings
    cfg = SampleConfig(temperature=args.temperature, temperature_schedule=args.temperature_schedule,
                       top_k=args.top_k, top_p=args.top_p, steps=args.steps, schedule=args.schedule,
                       order=args.order, guidance_scale=args.guidance_scale, guidance_weights=args.guidance_weights,
                       guidance_grow=args.guidance_grow, sequence_sampling=args.sequence_sampling, seed=args.seed,
                       targets=targets)
    for line in sample_keys(args.checkpoint, args.input, args.keys, args.sources, args.targets, args.out,
                            tokenizers=args.tokenizers, cfg=cfg, device=args.device):
        print(line)
    return 0


__all__ = ["SampleConfig", "PER_TARGET", "generate", "token_schedule", "temperature_schedule", "filter_logits",
           "token_distribution", "guided_logits", "multi_guided_logits", "guidance_drops", "drop_condition",
           "parse_target", "read_input", "decode_output", "sample_key", "sample_keys", "add_cli", "sample_cli"]

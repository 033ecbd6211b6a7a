"""Any-to-any generation from a trained FourM, and `omniforge sample`.

Generation is chained, as 4M's: the targets are produced one after the other and every finished target joins
the inputs of the next one. Each step builds one row of the shared batch format (see ``masking.py``):

- image and global targets are decoded in ``steps`` rounds. ``order="maskgit"``: every still-unknown
  position is a decoder query, a token is drawn at each, and the most confident ones (probability of the
  drawn token under the model) are kept, as many as the schedule says; the rest are masked again.
  ``order="random"`` (ROAR): a random order is fixed up front and each round queries, draws and keeps
  exactly the next scheduled positions. Kept tokens become encoder inputs of the following rounds.
- sequence targets are decoded autoregressively in the T5 target layout a fully masked sequence has in
  training: the target row starts (at position 0) with the first span sentinel, then the tokens; the
  decoder reads the previous target token (teacher forcing), so one new token is drawn per step until
  [EOS] or the modality's ``num_tokens``. [PAD] and the sentinels are never drawn (one span, no padding).

Draws use ``temperature`` (<= 0: greedy), ``top_k`` (0: off) and ``top_p`` (nucleus, 0: off) and a
``torch.Generator`` seeded with ``seed``, so the same call gives the same output.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omniforge.errors import ConfigError
from omniforge.model.checkpoint import load_model
from omniforge.model.fm import FourM
from omniforge.model._cli import ORDERS, SCHEDULES
from omniforge.model._cli import add_sample_cli as add_cli
from omniforge.model.specs import ModalitySpec, patchify, resolve_folder, unpatchify

Row = dict[str, Tensor]


@dataclass(kw_only=True)
class SampleConfig:
    temperature: float = 1.0  # <= 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens before drawing; 0 = all
    top_p: float = 0.0  # nucleus: keep the smallest set with this much probability; 0 (or >= 1) = all
    steps: int = 8  # MaskGIT / ROAR rounds for image and global targets (capped at their token count)
    schedule: str = "cosine"  # how many tokens each round reveals: "cosine" (few first) or "linear"
    order: str = "maskgit"  # "maskgit" (most confident first) or "random" (ROAR)
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature):
            raise ConfigError(f"SampleConfig.temperature={self.temperature!r}: must be finite (<= 0 for greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"SampleConfig.top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"SampleConfig.top_p={self.top_p!r}: must be in [0, 1] (0 = off)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"SampleConfig.steps={self.steps!r}: must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"SampleConfig.schedule={self.schedule!r}: must be one of {SCHEDULES}")
        if self.order not in ORDERS:
            raise ConfigError(f"SampleConfig.order={self.order!r}: must be one of {ORDERS}")


# ------------------------------------------------------------------------------------------------- drawing

def token_schedule(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """Tokens revealed in each round: ``min(steps, num_tokens)`` positive counts summing to ``num_tokens``.

    "linear": equal shares; "cosine": the share still masked after round s of T is cos(pi/2 * s / T)
    (MaskGIT), so early rounds reveal few tokens and late rounds many.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {SCHEDULES}")
    if num_tokens < 1 or steps < 1:
        raise ValueError(f"token_schedule needs num_tokens >= 1 and steps >= 1, got {num_tokens}, {steps}")
    t = min(steps, num_tokens)
    done = []
    for s in range(1, t + 1):
        if schedule == "linear":
            revealed = round(num_tokens * s / t)
        else:
            revealed = num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * s / t) + 1e-9)
        # every round reveals at least one token and leaves at least one for each later round
        low = (done[-1] + 1) if done else 1
        done.append(min(max(revealed, low), num_tokens - (t - s)))
    return [b - a for a, b in zip([0, *done[:-1]], done)]


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """``logits`` (..., V) with everything outside the top-k / nucleus set to -inf (the best token stays)."""
    out = logits.float().clone()
    if 0 < top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop_sorted = before >= top_p  # never drops the first (before == 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def _draw(logits: Tensor, cfg: SampleConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids, confidence) for logits (N, V): drawn ids (N,) and the model's probability of each (N,)."""
    logits = logits.float()
    if cfg.temperature <= 0:
        ids = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        ids = torch.multinomial(filtered.softmax(dim=-1), 1, generator=gen)[:, 0]
    confidence = logits.softmax(dim=-1).gather(-1, ids[:, None])[:, 0]
    return ids, confidence


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
                  targets: Sequence[str]) -> None:
    unknown = [m for m in [*inputs, *targets] if m not in specs]
    if unknown:
        raise ConfigError(f"modalities {unknown} are not among the model's: {list(specs)}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"targets {list(targets)} name a modality twice")
    given = [m for m in targets if m in inputs]
    if given:
        raise ConfigError(f"targets {given} are also given as inputs: drop them from one of the two")
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


# ---------------------------------------------------------------------------------------------- generation

def _generate_tokens(model: FourM, spec: ModalitySpec, context: dict[str, Row], cfg: SampleConfig,
                     gen: torch.Generator, device: torch.device) -> np.ndarray:
    """MaskGIT or ROAR decoding of one image/global target; ``context`` holds the input rows."""
    n = spec.num_tokens
    tokens = torch.zeros(n, dtype=torch.int64, device=device)
    known = torch.zeros(n, dtype=torch.bool, device=device)
    order = torch.randperm(n, generator=gen, device=device) if cfg.order == "random" else None
    start = 0
    for count in token_schedule(n, cfg.steps, cfg.schedule):
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
        logits = model.decoder_logits({**context, spec.name: row})[spec.name][0]  # (N_q, V)
        positions = torch.nonzero(query).flatten()  # ascending, as the logits rows
        ids, confidence = _draw(logits[: len(positions)], cfg, gen)
        keep = torch.topk(confidence, count).indices if order is None else torch.arange(count, device=device)
        tokens[positions[keep]] = ids[keep]
        known[positions[keep]] = True
    return tokens.cpu().numpy()


def _generate_sequence(model: FourM, spec: ModalitySpec, context: dict[str, Row], cfg: SampleConfig,
                       gen: torch.Generator, device: torch.device, *, sentinel_ids: Sequence[int],
                       eos_id: int, pad_id: int) -> np.ndarray:
    """Autoregressive decoding of one sequence target in the T5 target layout (first sentinel, then tokens)."""
    if len(sentinel_ids) < 2:
        raise ConfigError(f"{spec.name}: sequence targets need the span sentinels (at least [S_0] and [S_1])")
    banned = torch.tensor(sorted({int(pad_id), *map(int, sentinel_ids)} - {int(eos_id)}), device=device)
    banned = banned[banned < spec.vocab_size]
    row = _row(spec, device)
    row["tensor"][0, 0] = int(sentinel_ids[1])  # span masking numbers spans from 1
    batch = {**context, spec.name: row}
    encoded = model.encode(batch)  # the target row gives the encoder nothing: compute it once
    out: list[int] = []
    for t in range(1, spec.num_tokens + 1):
        row["target_mask"][0, : t + 1] = False  # queries 0..t; query t reads target token t - 1
        row["decoder_attention_mask"][0, : t + 1] = 1
        # scattered: the logits at position t under either sequence decoding (a "shifted" model has none at 0)
        logits = model.decoder_logits(batch, encoded, scatter=True)[spec.name][0, t]  # (V,)
        logits = logits.float().index_fill(0, banned, float("-inf"))
        ids, _ = _draw(logits[None], cfg, gen)
        token = int(ids[0])
        out.append(token)
        row["tensor"][0, t] = token
        if token == eos_id:
            break
    return np.asarray(out, dtype=np.int64)


@torch.inference_mode()
def generate(model: FourM, specs: Mapping[str, ModalitySpec], inputs: Mapping[str, np.ndarray],
             targets: Sequence[str], cfg: SampleConfig, *, sentinel_ids: Sequence[int], eos_id: int,
             pad_id: int = 0) -> dict[str, np.ndarray]:
    """Generate ``targets`` (in order, chained) for ONE sample from ``inputs``.

    ``inputs``: folder -> token ids (image/global: (num_tokens,); sequence: ids without padding, with or
    without a final [EOS]; pixels: uint8 (num_tokens, patch_dim) patches; embedding: its valid vectors
    (n, width)). Returns folder -> int64 ids:
    image/global (num_tokens,) in [0, vocab_size);
    sequence: the generated ids up to and including [EOS] (at most ``num_tokens``; no [EOS] when that many
    were drawn without one). Each generated target is an input of the following ones.
    """
    _check_inputs(specs, inputs, targets)
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
    out: dict[str, np.ndarray] = {}
    try:
        for m in targets:
            spec = specs[m]
            if spec.kind == "sequence":
                ids = _generate_sequence(model, spec, context, cfg, gen, device, sentinel_ids=sentinel_ids,
                                         eos_id=eos_id, pad_id=pad_id)
                as_input = _sequence_input(spec, ids, eos_id=eos_id, pad_id=pad_id)
            else:
                ids = as_input = _generate_tokens(model, spec, context, cfg, gen, device)
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
    """Generated ids decoded by the folder's tokenizer kind: a label array (images, features) or text (sequences)."""
    from omniforge.modalities import by_token_folder
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    if spec.kind == "sequence":
        return text_tok.decode(ids.tolist())
    info = by_token_folder(folder)
    if info is None:
        raise ConfigError(f"{folder} is not a registered token folder: no tokenizer to decode it")
    return kind_for(info).decode(np.asarray(ids), TokenizerStore(tokenizers))


def _save_decoded(folder: str, value: Any, out_dir: str) -> str:
    """Write a decoded output: text as .txt, an 8/16-bit image as .png, anything else as .npy."""
    if isinstance(value, str):
        path = os.path.join(out_dir, f"{folder}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(value + "\n")
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
    for key in keys:
        lines += _sample_one(model, specs, root, key, sources, targets, out, tokenizers=tokenizers,
                             cfg=cfg)
    return lines


def _sample_one(model: Any, specs: dict[str, ModalitySpec], root: str, key: str, sources: Sequence[str],
                targets: Sequence[str], out: str, *, tokenizers: str | None, cfg: SampleConfig) -> list[str]:
    from omniforge._render import render_sample

    sources = [resolve_folder(m, specs) for m in sources]
    targets = [resolve_folder(m, specs, target=True) for m in targets]
    unknown = [m for m in [*sources, *targets] if m not in specs]
    if unknown:
        raise ConfigError(f"the checkpoint has no modalities {unknown}; it knows {list(specs)} "
                          "(modality names such as rgb or depth are accepted too)")
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
    for m, value in inputs.items():
        spec = specs[m]
        if spec.kind == "pixels":
            panels[_panel(m, "input, crop 0 of")] = unpatchify(value, spec.patch)
        elif spec.kind == "embedding":
            panels[_panel(m, "input")] = value
        elif tokenizers:
            panels[_panel(m, "input, decoded from")] = decode_output(m, value, spec, tokenizers, text_tok)
        else:
            panels[f"{m} (input)"] = np.asarray(value)[None]
    lines = []
    for m, ids in generated.items():
        path = os.path.join(out_dir, f"{m}.npy")
        row = np.full(specs[m].num_tokens, pad_id, dtype=np.int16)  # (N,): a sequence is [PAD]-filled
        row[: len(ids)] = ids
        np.save(path, row[None])  # (1, N) like the token shards
        line = f"{m}: {len(ids)} tokens -> {path}"
        if tokenizers:
            value = decode_output(m, ids, specs[m], tokenizers, text_tok)
            line += f", decoded -> {_save_decoded(m, value, out_dir)}"
            panels[_panel(m, "generated, decoded from")] = value
        else:
            panels[f"{m} (generated)"] = row[None].astype(np.int64)
        lines.append(line)
    png = os.path.join(out_dir, "sample.png")
    title = f"{key}: {', '.join(sources)} -> {', '.join(targets)}"
    render_sample(key, panels, title=title).save(png)
    lines.append(f"{title}, drawn -> {png}")
    return lines


def sample_cli(args: Any) -> int:
    """`omniforge sample`: see :func:`sample_keys`."""
    cfg = SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, steps=args.steps,
                       schedule=args.schedule, order=args.order, seed=args.seed)
    for line in sample_keys(args.checkpoint, args.input, args.keys, args.sources, args.targets, args.out,
                            tokenizers=args.tokenizers, cfg=cfg, device=args.device):
        print(line)
    return 0


__all__ = ["SampleConfig", "generate", "token_schedule", "filter_logits", "read_input", "decode_output", "sample_key",
           "sample_keys", "add_cli", "sample_cli"]

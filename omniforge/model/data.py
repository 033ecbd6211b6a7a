"""The trainer's loader: token shards -> masked, collated batches, with an exact resume.

Reads ``ROOT/<folder>/shard-NNNNNN.tar`` (members ``<key>.npy``, int16 (n_crops, N), sorted by key) for
every requested token folder. Raw inputs are read from label tars (in the token root, or in the label root
its tokenize run read, :func:`labels_root`), one small reader per kind:

- a raw-pixel folder (``rgb@224``): the ``rgb`` label tar joined by key with ``crop_settings``; the JPEG is
  cropped with the sample's crop (the crop its tokens were made from) to 224 x 224 and cut into uint8
  patches (:func:`_joined`, :func:`_pixels`); ``rgb@448`` to 448 x 448, never upsampled (a crop under 448
  stored pixels is a CorpusError: a tokenize job with a @448 target leaves such samples out);
- an embedding folder (``t5_caption``): its own label tar, ``<key>.npz`` as ml-4m reads it; the sample gets
  the valid vectors of its first sequence, ``emb[0][mask_valid[0]]``, whatever the crop
  (:func:`_embedding`). An embedding joins the samples of the other folders: a key only it has is no training
  sample (it was not tokenized), and shards only it has are not read;
- a raw sequence folder (``det``, ``metadata``, ``color_palette``, ``caption``, ``sam_instance``: the label
  folder itself, as ml-4m reads them): joined with ``crop_settings`` and ``rgb`` (for the frame the crop is
  in) and serialized per sample by its tokenizer kind (the registry's serializer; SAM's instances cropped and
  tokenized by the SAM-mask tokenizer) with the sample's crop and generator (palette k, metadata order, SAM
  query points and orders: new draws every epoch, the same draws after a resume), then tokenized with the
  text tokenizer of ``DataConfig.tokenizers`` (:func:`serialize_raw`); what a token budget cuts is counted in
  ``batch["__cut__"]`` (folder -> int64 (B,) units cut).

A shard counts for a folder once its ``_status`` table exists (the commit marker; for pixels, both tables;
for raw sequences, the label's, rgb's and crop_settings'); the shards read are the union over folders
(embeddings aside). One stream of samples per (rank, DataLoader worker):

- epoch e permutes the shard list with ``(seed, e)`` (the same on every rank); stream g of G = world_size x
  workers takes every G-th shard of that order (so at least G shards are needed);
- within a shard the folders are merged by key, streaming: a key missing from a folder gives None for that
  folder (the masker masks it entirely); the sample is kept;
- samples are shuffled in blocks of ``shuffle_buffer`` (read a block, permute it, yield it), blocks running
  across shard boundaries within an epoch;
- each sample gets its own generator, seeded by (seed, epoch, shard, index in shard): it picks the crop
  index (one for all folders of the sample) and drives the masker, so a sample's masking does not depend
  on the rank or worker layout;
- a stream cuts its samples into batches of ``batch_size``; endless (``epochs=None``) streams run into the
  next epoch, finite ones end with a last, possibly smaller, batch.

Exact resume: a stream's position is (epoch, start of the current block as shard index + offset, samples
of the block already yielded); nothing else is random. ``state_dict()`` gives every stream's position after
the last batch handed out; a loader built with the same config, rank and world size and given that state
re-reads the current block (and the start of the shard it begins in) and yields exactly the batches the
uninterrupted loader would have. With several workers the DataLoader takes batches from the workers in turn,
so the state also holds how many batches were handed out, and the resumed loader starts at the worker whose
turn it was: exact for endless loaders; a finite loader whose workers run out at different times is exact
with one worker.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omniforge import codecs, storage
from omniforge import shards as _shards
from omniforge.errors import ConfigError, CorpusError, SampleError
from omniforge.modalities import IMAGE_MODALITY, get_modality
from omniforge.model.masking import Masker, collate
from omniforge.model.specs import PIXEL_SIZE, ModalitySpec, label_source, patchify, pixel_source, raw_sequence_info

STATE_VERSION = 2
_BRACES_RE = re.compile(r"^\{(\d+)\.\.(\d+)\}$")
# Seed-sequence domains, so the draws of different purposes never coincide.
_SHARD_ORDER, _BLOCK, _SAMPLE, _MIX = 0, 1, 2, 3


@dataclass(kw_only=True)
class DataConfig:
    root: str | tuple[str, ...]  # corpus root (local path or s3://), or several roots mixed by ``weights``
    folders: tuple[str, ...]  # token folders, e.g. ("tok_rgb@224", "tok_caption")
    batch_size: int
    shards: str | None = None  # "{000000..000099}", "3", "0,2,5"; None: every shard committed in some folder
    shuffle_buffer: int = 1000  # samples per shuffled block; 1: no shuffling within shards
    seed: int = 0
    num_workers: int = 0  # DataLoader worker processes per rank
    epochs: int | None = None  # None: endless; n: stop after n passes
    keys: bool = False  # add "__key__" (list of keys) and "__crop__" (int64 (B,)) to every batch
    # (with several roots every batch has "__source__": int64 (B,), the index of each sample's root)
    pin_memory: bool = False  # page-locked batches, so that host-to-GPU copies can overlap compute
    weights: tuple[float, ...] | None = None  # with several roots: the share of samples drawn from each
    tokenizers: str | None = None  # tokenizers directory (text/tokenizer.json): needed by raw sequence folders

    def __post_init__(self) -> None:
        self.root = self.root if isinstance(self.root, str) else tuple(self.root)
        if not self.roots or len(set(self.roots)) != len(self.roots):
            raise ConfigError(f"DataConfig.root must name one or more distinct roots, got {self.root!r}")
        if self.weights is not None:
            self.weights = tuple(float(w) for w in self.weights)
            if len(self.weights) != len(self.roots):
                raise ConfigError(f"DataConfig.weights has {len(self.weights)} entries for {len(self.roots)} roots")
            if any(not w > 0 for w in self.weights):
                raise ConfigError(f"DataConfig.weights must all be > 0, got {self.weights}")
        if len(self.roots) > 1 and self.epochs is not None:
            raise ConfigError("several roots are mixed endlessly: leave DataConfig.epochs at None")
        if len(self.roots) > 1 and self.shards is not None:
            raise ConfigError("DataConfig.shards selects shards of one root: leave it at None with several roots")
        self.folders = tuple(self.folders)
        if not self.folders:
            raise ConfigError("DataConfig.folders is empty: name the token folders to train on, e.g. tok_rgb@224")
        if len(set(self.folders)) != len(self.folders):
            raise ConfigError(f"DataConfig.folders repeats a folder: {self.folders}")
        if self.batch_size < 1:
            raise ConfigError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"DataConfig.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ConfigError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"DataConfig.epochs must be >= 1 or None (endless), got {self.epochs}")
        if self.seed < 0:
            raise ConfigError(f"DataConfig.seed must be >= 0, got {self.seed}")


    @property
    def roots(self) -> tuple[str, ...]:
        return (self.root,) if isinstance(self.root, str) else self.root

    @property
    def mix(self) -> np.ndarray:
        """Probability of drawing the next sample from each root (equal without weights)."""
        w = np.ones(len(self.roots)) if self.weights is None else np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()


def parse_shards(spec: str) -> list[int]:
    """"{000000..000099}" | "7" | "0,2,5" -> shard numbers."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = _BRACES_RE.match(part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ConfigError(f"shards {spec!r}: range {part} ends before it starts")
            out.extend(range(lo, hi + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ConfigError(f"shards {spec!r}: write a range like {{000000..000099}} or numbers like 0,2,5")
    return sorted(set(out))


def committed_shards(root: str, folder: str) -> set[int]:
    """Shards of a folder whose status table exists (the commit marker of the tar); for a raw-pixel folder,
    the shards committed in both its label folder (see :func:`labels_root`) and crop_settings; for a raw
    sequence, also in rgb; for an embedding, in its label folder."""
    source = label_source(folder)
    if source is None:
        return _shards.status_shards(root, folder)
    labels = labels_root(root, folder)
    found = _shards.status_shards(labels, source)
    if pixel_source(folder) is not None or raw_sequence_info(folder) is not None:
        found &= _shards.status_shards(root, _shards.CROP_SETTINGS)
    if raw_sequence_info(folder) is not None:  # a raw sequence is cropped in the rgb label's frame
        found &= _shards.status_shards(labels, IMAGE_MODALITY)
    return found


@functools.lru_cache(maxsize=256)
def labels_root(root: str, folder: str) -> str:
    """The root holding the labels a raw folder is read from (rgb@224's rgb, t5_caption's or det's own):
    ``root`` itself when it has them (the default layout: tokens beside their labels), else the label root
    that ``omniforge tokenize --output root`` read, as named by the tokenize run records in ``root``. Token
    folders: ``root``."""
    source = label_source(folder)
    if source is None or _shards.status_shards(root, source):
        return root
    inputs: list[str] = []
    for uri, _size in storage.list_files(storage.join(root, _shards.RUNS_DIR), (".json",)):
        if not os.path.basename(uri).startswith("tokenize-"):
            continue
        try:
            label_root = str(json.loads(storage.read_bytes(uri))["config"]["input"])
        except (ValueError, KeyError, TypeError):
            continue  # not a tokenize run record
        if label_root != root and label_root not in inputs and _shards.status_shards(label_root, source):
            inputs.append(label_root)
    if len(inputs) > 1:
        raise ConfigError(f"{root} was tokenized from several label roots with {source} labels ({inputs}): "
                          f"{folder} cannot tell which one to crop; train on one of them, tokenized in place")
    return inputs[0] if inputs else root



@dataclass(frozen=True)
class _Record:
    root: str
    shard: int
    index: int  # position of the key in the shard's merged key order
    key: str
    # folder -> npy bytes (pixels: (jpg bytes, crop_settings npy bytes); embeddings: npz bytes), None when the
    # folder lacks the key
    members: dict[str, Any]


def _stream_state(epoch: int = 0, shard_pos: int = 0, offset: int = 0, yielded: int = 0) -> dict[str, int]:
    return {"epoch": epoch, "shard_pos": shard_pos, "offset": offset, "yielded": yielded}


def _worker_state(n_roots: int) -> dict[str, Any]:
    """A stream's position: one per root, and how many samples the mix has drawn."""
    return {"drawn": 0, "roots": [_stream_state() for _ in range(n_roots)]}


@dataclass(frozen=True)
class _Source:
    root: str
    shards: list[int]  # committed shards read from this root
    committed: dict[str, set[int]]  # folder -> its committed shards


class TokenShardDataset(IterableDataset):
    """Masked, collated batches from token shards (see the module docstring for order and resume).

    Iterated directly (or by a DataLoader with ``num_workers=0``) it keeps its own position:
    ``state_dict()`` / ``load_state_dict()``. With worker processes use :func:`make_loader`, whose loader
    keeps the position of every worker.
    """

    def __init__(self, cfg: DataConfig, masker: Masker, *, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.masker = masker
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None:
            initialized = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        missing = [f for f in cfg.folders if f not in masker.specs]
        extra = [f for f in masker.specs if f not in cfg.folders]
        if missing or extra:
            raise ConfigError(f"the masker's folders {list(masker.specs)} differ from DataConfig.folders "
                              f"{list(cfg.folders)}: build the masker with specs_for(cfg.folders, ...)")
        self.sources = [self._find_shards(root) for root in cfg.roots]
        self.num_streams = world_size * max(1, cfg.num_workers)
        for src in self.sources:
            if len(src.shards) < self.num_streams:
                raise ConfigError(f"{len(src.shards)} shards of {src.root} cannot feed {world_size} ranks x "
                                  f"{max(1, cfg.num_workers)} workers: use fewer workers, or more (smaller) shards")
        # Position of each local stream (worker), and the worker whose turn comes first (see make_loader).
        self._states: dict[int, dict[str, Any]] = {w: _worker_state(len(self.sources))
                                                   for w in range(max(1, cfg.num_workers))}
        self._first_worker = 0
        self._tokenizers: Any = None  # a TokenizerStore, loaded on first use in the process that reads
        raw = [spec.source for spec in masker.specs.values() if spec.raw and spec.kind == "sequence"]
        if raw and not cfg.tokenizers:
            raise ConfigError(f"{', '.join(raw)} are raw label folders the loader serializes: pass the tokenizers "
                              "directory holding text/tokenizer.json (--tokenizers)")
        if raw:
            from omniforge.pipeline.formats import check_formats

            for src in self.sources:
                check_formats(labels_root(src.root, raw[0]), raw, src.shards)

    @property
    def shards(self) -> list[int]:
        """The shards read (of the first root)."""
        return self.sources[0].shards

    # ---- discovery and reading

    def _anchors(self) -> list[str]:
        """The folders whose keys are the samples: all but embeddings, which join them (all, when every folder
        is an embedding)."""
        specs = self.masker.specs
        return [f for f in self.cfg.folders if specs[f].kind != "embedding"] or list(self.cfg.folders)

    def _find_shards(self, root: str) -> _Source:
        committed = {f: committed_shards(root, f) for f in self.cfg.folders}
        found = set().union(*(committed[f] for f in self._anchors()))
        if self.cfg.shards is None:
            if not found:
                raise CorpusError(f"no committed token shards under {root} for {list(self.cfg.folders)}: "
                                  "run `omniforge tokenize` first (a shard counts once its _status table exists)")
            return _Source(root, sorted(found), committed)
        wanted = parse_shards(self.cfg.shards)
        absent = [s for s in wanted if s not in found]
        if absent:
            raise CorpusError(f"shards {absent[:10]}{' ...' if len(absent) > 10 else ''} are committed in none of "
                              f"{list(self.cfg.folders)} under {root}: tokenize them or narrow --shards")
        return _Source(root, wanted, committed)

    def _read_shard(self, src: _Source, shard: int) -> Iterator[_Record]:
        """The samples of one shard: its folders merged by key (every tar is sorted by key)."""
        folders = [f for f in self.cfg.folders if shard in src.committed[f]]
        anchors = set(self._anchors())
        iters = {f: self._folder_members(src.root, f, shard) for f in folders}
        heads: dict[str, tuple[str, Any] | None] = {f: next(it, None) for f, it in iters.items()}
        index = 0
        while True:
            live = [h[0] for f, h in heads.items() if h is not None and f in anchors]
            if not live:
                return
            key = min(live)
            members: dict[str, bytes | None] = dict.fromkeys(self.cfg.folders)
            for f, head in heads.items():
                while head is not None and head[0] < key:  # a joining folder's key that no anchor has
                    head = heads[f] = next(iters[f], None)
                if head is not None and head[0] == key:
                    members[f] = head[1]
                    heads[f] = next(iters[f], None)
            yield _Record(src.root, shard, index, key, members)
            index += 1

    def _folder_members(self, root: str, folder: str, shard: int) -> Iterator[tuple[str, Any]]:
        spec = self.masker.specs[folder]
        if spec.kind == "pixels":
            return _joined(_keyed(_shards.tar_uri(labels_root(root, folder), spec.source, shard)),
                           _keyed(_shards.tar_uri(root, _shards.CROP_SETTINGS, shard)))
        if spec.kind == "embedding":
            return _keyed(_shards.tar_uri(labels_root(root, folder), spec.source, shard))
        if spec.raw:  # a raw sequence: its label, the crop settings, the rgb label (for the crop's frame)
            labels = labels_root(root, folder)
            return _joined(_keyed(_shards.tar_uri(labels, spec.source, shard)),
                           _keyed(_shards.tar_uri(root, _shards.CROP_SETTINGS, shard)),
                           _keyed(_shards.tar_uri(labels, IMAGE_MODALITY, shard)))
        return _keyed(_shards.tar_uri(root, folder, shard))

    def _epoch_shards(self, src: int, epoch: int, stream: int) -> list[int]:
        shards = self.sources[src].shards
        seq = [self.cfg.seed, _SHARD_ORDER, epoch] + ([src] if src else [])
        order = np.random.default_rng(seq).permutation(len(shards))
        return [shards[i] for i in order[stream::self.num_streams]]

    def _read_from(self, src: _Source, shard_list: list[int], shard_pos: int,
                   offset: int) -> Iterator[tuple[int, int, _Record]]:
        """Records from (shard_pos, offset) on, each with the position right after it."""
        for pos in range(shard_pos, len(shard_list)):
            skip = offset if pos == shard_pos else 0
            for i, rec in enumerate(self._read_shard(src, shard_list[pos])):
                if i >= skip:
                    yield pos, i + 1, rec

    # ---- samples

    def _sample(self, src: int, rec: _Record, epoch: int) -> dict[str, Any]:
        seq = [self.cfg.seed, _SAMPLE, epoch, rec.shard, rec.index] + ([src] if src else [])
        rng = np.random.default_rng(seq)
        specs = self.masker.specs
        present = {f: b for f, b in rec.members.items() if b is not None and specs[f].kind != "embedding"}
        arrays = {f: _decode(b[1] if specs[f].raw else b, rec.root,
                             _shards.CROP_SETTINGS if specs[f].raw else f, rec)
                  for f, b in present.items()}
        n_crops = min((a.shape[0] for a in arrays.values()), default=1)
        for f, a in arrays.items():
            if specs[f].raw:
                continue
            expected = specs[f].num_tokens
            if a.shape[1] != expected:
                raise CorpusError(f"{_shards.tar_uri(rec.root, f, rec.shard)}: {rec.key}.npy has "
                                  f"{a.shape[1]} tokens per crop, the {f} spec expects {expected}: "
                                  "re-tokenize the shard or fix the spec")
        crop = int(rng.integers(n_crops))
        sample = {f: (arrays[f][crop] if f in arrays else None) for f in self.cfg.folders}
        cut: dict[str, int] = {}
        for f, members in ((f, b) for f, b in present.items() if specs[f].raw):
            if specs[f].kind == "pixels":
                sample[f] = _pixels(members[0], arrays[f][crop], specs[f], rec.root, rec)
            else:
                sample[f], cut[f] = self._serialize(f, members, arrays[f], crop, rec, rng)
        for f, npz in rec.members.items():
            if npz is not None and specs[f].kind == "embedding":
                sample[f] = _embedding(npz, specs[f], rec.root, rec)
        return {"key": rec.key, "crop": crop, "source": src, "cut": cut, "masked": self.masker(sample, rng)}

    def _serialize(self, folder: str, members: tuple[bytes, bytes, bytes], crops: np.ndarray, crop: int,
                   rec: _Record, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(token ids (num_tokens,), units cut) of a raw sequence label, serialized for this sample's crop."""
        spec = self.masker.specs[folder]
        uri = _shards.tar_uri(labels_root(rec.root, folder), spec.source, rec.shard)
        return serialize_raw(spec, members[0], members[2], crops[crop], key=rec.key, index=crop, rng=rng,
                             store=self._store(), where=uri)

    def _store(self) -> Any:
        """The tokenizers of the raw sequence folders (the text vocabulary; SAM's mask tokenizer)."""
        if self._tokenizers is None:
            from omniforge.tokenize.store import TokenizerStore

            self._tokenizers = TokenizerStore(self.cfg.tokenizers)
        return self._tokenizers

    def _stream(self, stream: int, state: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(sample, stream position after it): one root's samples, or several roots mixed by cfg.weights (each
        draw seeded by (seed, stream, draw count), so the mix resumes exactly)."""
        positions = [dict(p) for p in state["roots"]]
        drawn = int(state["drawn"])
        if len(self.sources) == 1:
            for sample, after in self._root_stream(0, stream, positions[0]):
                drawn += 1
                yield sample, {"drawn": drawn, "roots": [after]}
            return
        streams = [self._root_stream(i, stream, p) for i, p in enumerate(positions)]
        mix = self.cfg.mix
        while True:
            src = int(np.random.default_rng([self.cfg.seed, _MIX, stream, drawn]).choice(len(mix), p=mix))
            sample, positions[src] = next(streams[src])
            drawn += 1
            yield sample, {"drawn": drawn, "roots": [dict(p) for p in positions]}

    def _root_stream(self, src_index: int, stream: int,
                     state: Mapping[str, int]) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
        """(sample, position after it) of one root, forever or for cfg.epochs epochs."""
        src = self.sources[src_index]
        epoch, shard_pos, offset, yielded = (int(state[k]) for k in ("epoch", "shard_pos", "offset", "yielded"))
        while self.cfg.epochs is None or epoch < self.cfg.epochs:
            shard_list = self._epoch_shards(src_index, epoch, stream)
            reader = self._read_from(src, shard_list, shard_pos, offset)
            produced = False
            while True:
                block = [r for _, r in zip(range(self.cfg.shuffle_buffer), reader)]
                if not block:
                    break
                produced = True
                end_pos, end_off = block[-1][0], block[-1][1]
                seq = [self.cfg.seed, _BLOCK, epoch, stream, self.num_streams, shard_pos, offset]
                rng = np.random.default_rng(seq + ([src_index] if src_index else []))
                order = rng.permutation(len(block)) if self.cfg.shuffle_buffer > 1 else np.arange(len(block))
                for j in range(yielded, len(block)):
                    sample = self._sample(src_index, block[order[j]][2], epoch)
                    if j + 1 < len(block):
                        after = _stream_state(epoch, shard_pos, offset, j + 1)
                    else:
                        after = _stream_state(epoch, end_pos, end_off, 0)
                    yield sample, after
                shard_pos, offset, yielded = end_pos, end_off, 0
            if not produced and shard_pos == 0 and offset == 0:
                raise CorpusError(f"shards {shard_list} of {src.root} hold no samples for "
                                  f"{list(self.cfg.folders)}: check the tokenize run")
            epoch, shard_pos, offset, yielded = epoch + 1, 0, 0, 0

    def _batches(self, worker: int, num_workers: int) -> Iterator[tuple[dict[str, Any], int, dict[str, Any]]]:
        """(batch, worker, worker position after the batch) of one local worker."""
        stream = self.rank * num_workers + worker
        rows: list[dict[str, Any]] = []
        state = self._states[worker]
        for sample, after in self._stream(stream, state):
            rows.append(sample)
            state = after
            if len(rows) == self.cfg.batch_size:
                yield self._collate(rows), worker, state
                rows = []
        if rows:
            yield self._collate(rows), worker, state

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = collate([r["masked"] for r in rows])
        raw = [f for f, spec in self.masker.specs.items() if spec.raw and spec.kind == "sequence"]
        if raw:
            batch["__cut__"] = {f: torch.tensor([r["cut"].get(f, 0) for r in rows], dtype=torch.int64) for f in raw}
        if self.cfg.keys:
            batch["__key__"] = [r["key"] for r in rows]
            batch["__crop__"] = torch.tensor([r["crop"] for r in rows], dtype=torch.int64)
        if len(self.sources) > 1:
            batch["__source__"] = torch.tensor([r["source"] for r in rows], dtype=torch.int64)
        return batch

    def _local_worker(self) -> tuple[int, int]:
        info = get_worker_info()
        num_workers = max(1, self.cfg.num_workers)
        if info is None:
            if self.cfg.num_workers > 1:
                raise ConfigError("this dataset was configured for worker processes: iterate it through "
                                  "make_loader(...), or set DataConfig.num_workers to 0")
            return 0, num_workers
        if info.num_workers != num_workers:
            raise ConfigError(f"DataLoader has {info.num_workers} workers but DataConfig.num_workers is "
                              f"{self.cfg.num_workers}: use make_loader(...)")
        return (info.id + self._first_worker) % num_workers, num_workers

    def iter_with_state(self) -> Iterator[tuple[dict[str, Any], int, dict[str, int]]]:
        """(batch, local worker, its position after the batch): what make_loader's workers send."""
        worker, num_workers = self._local_worker()
        yield from self._batches(worker, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch, worker, state in self.iter_with_state():
            self._states[worker] = state
            yield batch

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "folders": list(self.cfg.folders),
                "roots": list(self.cfg.roots), "weights": [float(w) for w in self.cfg.mix],
                "shards": [list(src.shards) for src in self.sources], "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.cfg.num_workers, "first_worker": self._first_worker,
                "workers": {str(w): {"drawn": int(s["drawn"]), "roots": [dict(p) for p in s["roots"]]}
                            for w, s in self._states.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") == 1:  # one root, one position per worker: the same stream, written before mixing
            state = {**state, "version": STATE_VERSION, "roots": [self.cfg.roots[0]], "weights": [1.0],
                     "shards": [state["shards"]],
                     "workers": {w: {"drawn": 0, "roots": [p]} for w, p in state["workers"].items()}}
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self.state_dict()
        for field_ in ("seed", "folders", "roots", "weights", "shards", "rank", "world_size", "num_workers"):
            if state[field_] != mine[field_]:
                raise ConfigError(f"cannot resume: the saved data state has {field_}={state[field_]!r}, this "
                                  f"loader has {mine[field_]!r}; resume with the same data config and layout")
        self._states = {int(w): {"drawn": int(s["drawn"]), "roots": [_stream_state(**p) for p in s["roots"]]}
                        for w, s in state["workers"].items()}
        self._first_worker = int(state["first_worker"])


def serialize_raw(spec: ModalitySpec, label_bytes: bytes, jpg: bytes, crop: np.ndarray, *, key: str, index: int,
                  rng: np.random.Generator | None, store: Any, where: str) -> tuple[np.ndarray, int]:
    """A raw sequence label (its member's bytes) -> (token ids (num_tokens,), units the budget cut): serialized
    by its tokenizer kind for `crop` (a crop_settings row in the frame of the rgb label `jpg`), drawing from
    `rng` (None: the frozen draw of (key, index), as the tokenize job makes it). `where` names the label in
    errors."""
    from PIL import Image

    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.text import Crop

    info = get_modality(spec.source)
    try:
        label = codecs.decode(info.ext, label_bytes)
        width, height = Image.open(io.BytesIO(jpg)).size
        units = kind_for(info).units(label, Crop(row=crop, height=height, width=width, size=PIXEL_SIZE, key=key,
                                                 index=index, rng=rng), store)
    except SampleError as e:
        raise CorpusError(f"{where}: {key}: {e.message} (`omniforge verify` lists every such label)") from None
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise CorpusError(f"{where}: {key}.{info.ext} cannot be serialized ({type(e).__name__}: {e}): "
                          "`omniforge verify` lists every such label") from None
    return store.text().pack(units, spec.num_tokens)


def _keyed(uri: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of a token tar, checking the key order the merge relies on."""
    prev: str | None = None
    for name, data in _shards.iter_tar(uri):  # a truncated tar raises CorruptShardError, a one-line message
        key = _shards.member_key(name)
        if prev is not None and key <= prev:
            raise CorpusError(f"{uri}: member {name!r} comes after key {prev!r} (keys must be unique and sorted): "
                              "re-run `omniforge tokenize` for this shard; `omniforge verify` checks the order")
        prev = key
        yield key, data


def _decode(data: bytes, root: str, folder: str, rec: _Record) -> np.ndarray:
    try:
        arr = codecs.decode("npy", data)
    except ValueError as e:
        raise CorpusError(f"{_shards.tar_uri(root, folder, rec.shard)}: {rec.key}.npy is not a readable .npy "
                          f"({e}): re-run `omniforge tokenize` for this shard") from None
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise CorpusError(f"{_shards.tar_uri(root, folder, rec.shard)}: {rec.key}.npy is {arr.dtype} {arr.shape}, "
                          "expected integer token ids (n_crops, N)")
    return arr


def _joined(labels: Iterator[tuple[str, bytes]], *others: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, Any]]:
    """(key, (label bytes, bytes of each other stream)) for the keys in every key-sorted stream: a label
    without crop settings was not tokenized (its tokenize status says why) and is not a training sample."""
    heads = [next(it, None) for it in others]
    for key, data in labels:
        for i, it in enumerate(others):
            while heads[i] is not None and heads[i][0] < key:
                heads[i] = next(it, None)
        if any(h is None for h in heads):
            return
        if all(h[0] == key for h in heads):
            yield key, (data, *(h[1] for h in heads))


def _pixels(jpg: bytes, crop: np.ndarray, spec: ModalitySpec, root: str, rec: _Record) -> np.ndarray:
    """(num_tokens, patch_dim) uint8 patches of the label image cropped as the sample's tokens were."""
    from omniforge.tokenize.crops import crop_image

    uri = _shards.tar_uri(labels_root(root, spec.name), spec.source, rec.shard)
    try:
        image = np.asarray(codecs.decode("jpg", jpg))
    except (OSError, ValueError) as e:
        raise CorpusError(f"{uri}: {rec.key}.jpg cannot be decoded ({e}): re-run `omniforge label` for it") from None
    if image.ndim != 3 or image.shape[2] != 3:
        raise CorpusError(f"{uri}: {rec.key}.jpg is {image.shape}, expected an (H, W, 3) RGB image")
    size = spec.grid * spec.patch
    if size > PIXEL_SIZE and min(int(crop[2]), int(crop[3])) < size:  # rgb@448: never upsampled
        raise CorpusError(f"{uri}: {rec.key}: its crop covers {int(crop[2])} x {int(crop[3])} stored pixels, under "
                          f"the {size} of {spec.name}: tokenize the corpus with a @{size} target (e.g. --modalities "
                          f"{spec.source},{spec.source}@{size}), which leaves out samples stored too small")
    try:
        cropped = crop_image(image, crop, size)
    except SampleError as e:
        raise CorpusError(f"{uri}: {rec.key}: {e} (re-run `omniforge tokenize` for this shard)") from None
    return patchify(cropped, spec.patch)


def _embedding(npz: bytes, spec: ModalitySpec, root: str, rec: _Record) -> np.ndarray:
    """The valid vectors (n, width) of an embedding label's first sequence, ``emb[0][mask_valid[0]]`` (ml-4m's
    CaptionEmbTransform with one sequence per sample)."""
    uri = _shards.tar_uri(labels_root(root, spec.name), spec.source, rec.shard)
    try:
        value = codecs.decode("npz", npz)
    except (OSError, ValueError) as e:
        raise CorpusError(f"{uri}: {rec.key}.npz cannot be decoded ({e}): re-run `omniforge label` for it") from None
    problem = codecs.embedding_problem(value, (spec.num_tokens, spec.width))
    if problem:
        raise CorpusError(f"{uri}: {rec.key}.npz {problem}: relabel it with `omniforge label --modalities "
                          f"{spec.source}`; `omniforge verify` lists every such label")
    return value["emb"][0][value["mask_valid"][0]]


def _identity(x: Any) -> Any:
    return x


class TokenLoader:
    """Batches of a rank, through a DataLoader, with the position of every worker (make_loader's result).

    Iterating continues from the current position (the start, or a loaded state); ``state_dict()`` is the
    position after the last batch handed out. Save it per rank.
    """

    def __init__(self, dataset: TokenShardDataset):
        self.dataset = dataset
        self._batches = 0  # batches handed out since the start of the stream (across resumes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        num_workers = max(1, ds.cfg.num_workers)
        ds._first_worker = self._batches % num_workers
        loader = DataLoader(_WithState(ds), batch_size=None, collate_fn=_identity,
                            num_workers=ds.cfg.num_workers, pin_memory=ds.cfg.pin_memory)
        for batch, worker, state in loader:
            ds._states[worker] = state
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state = self.dataset.state_dict()
        state["first_worker"] = self._batches % max(1, self.dataset.cfg.num_workers)
        state["batches"] = self._batches
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._batches = int(state["batches"])


class _WithState(IterableDataset):
    def __init__(self, dataset: TokenShardDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int, dict[str, int]]]:
        return self.dataset.iter_with_state()


def make_loader(cfg: DataConfig, masker: Masker, *, rank: int | None = None,
                world_size: int | None = None) -> TokenLoader:
    """The batches of one rank (rank/world_size: explicit, or from torch.distributed when both are None)."""
    return TokenLoader(TokenShardDataset(cfg, masker, rank=rank, world_size=world_size))


__all__ = ["DataConfig", "TokenLoader", "TokenShardDataset", "committed_shards", "labels_root", "make_loader",
           "parse_shards", "serialize_raw"]

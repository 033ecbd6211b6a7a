"""Reading label shards for `omniforge tokenizer train`: committed shards, decoded labels, and the shuffled
stream of model inputs (a fresh random crop per sample and pass, made by the modality's tokenizer kind)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from omniforge import codecs, shards, storage
from omniforge.errors import ConfigError, CorpusError
from omniforge.tokenize.crops import CropConfig
from omniforge.tokenize.kinds import TokenizerKind
from omniforge.tokenize.train_config import TokenizerTrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelShard:
    uri: str
    keys: frozenset[str]  # ok keys of this shard that this run uses


def no_data(cfg: TokenizerTrainConfig) -> ConfigError:
    return ConfigError(f"no {cfg.modality} labels under {cfg.data}: run "
                       f"`omniforge label --modalities {cfg.modality}` first")


def scan(cfg: TokenizerTrainConfig) -> list[tuple[LabelShard, list[str]]]:
    """Committed shards of the modality with their ok keys (sorted), honouring max_samples."""
    tars = storage.list_files(storage.join(cfg.data, cfg.modality), (".tar",))
    out: list[tuple[LabelShard, list[str]]] = []
    uncommitted = 0
    remaining = cfg.max_samples
    for uri, _size in tars:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if not (name.startswith("shard-") and name[6:-4].isdigit()):
            continue
        status = shards.status_uri(cfg.data, cfg.modality, int(name[6:-4]))
        if not storage.exists(status):
            uncommitted += 1  # the tar of a job still running (or killed): its status is the commit marker
            continue
        table = shards.read_status(status)
        keys = sorted(k for k, ok in zip(table.column("key").to_pylist(), table.column("ok").to_pylist()) if ok)
        if remaining is not None:
            keys = keys[:remaining]
            remaining -= len(keys)
        if keys:
            out.append((LabelShard(uri, frozenset(keys)), keys))
        if remaining == 0:
            break
    if uncommitted:
        log.warning("skipped %d %s shard(s) without a _status file (unfinished label job)", uncommitted, cfg.modality)
    if not out:
        raise no_data(cfg)
    return out


def iter_values(shard: LabelShard, ext: str, wanted: frozenset[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Decoded (key, label) of a shard's members, restricted to its ok keys (and to `wanted`)."""
    for member, data in shards.iter_tar(shard.uri):
        key = shards.member_key(member)
        if key not in shard.keys or (wanted is not None and key not in wanted):
            continue
        try:
            yield key, codecs.decode(ext, data)
        except Exception as e:
            raise CorpusError(f"cannot decode {shard.uri} member {member}: {e}; run `omniforge verify` on the "
                              f"label root and re-label the failing shard") from e


@dataclass(frozen=True)
class Inputs:
    """How labels become model inputs (picklable: DataLoader workers get a copy)."""

    kind: TokenizerKind
    crop: CropConfig

    @property
    def ext(self) -> str:
        return self.kind.info.ext

    def arrays(self, key: str, value: Any, crop_index: int, crop_seed: int) -> list[np.ndarray]:
        """The model input arrays of crop `crop_index` of one label (several for SAM: one per instance)."""
        from omniforge.tokenize.crops import crop_settings

        size = self.kind.label_size(value)
        if size is None:  # nothing to crop: the stored label is crop 0
            return self.kind.crop_inputs(value, None, self.crop.size)
        cfg = replace(self.crop, n_crops=max(self.crop.n_crops, crop_index + 1), seed=crop_seed)
        row = crop_settings(key, size[0], size[1], cfg)[crop_index]
        return self.kind.crop_inputs(value, row, self.crop.size)


class LabelStream(IterableDataset):
    """An endless, shuffled stream of model input arrays from label shards.

    Shards are split across DDP ranks and DataLoader workers; when there are fewer shards than readers,
    every reader scans every shard and keeps every n-th sample instead. Each pass over the data (the
    stream cycles, so that every rank can take the same number of batches) draws new random crops from
    a seed derived from (crop seed, epoch, pass); call :meth:`set_epoch` before iterating.
    """

    def __init__(self, shard_list: list[LabelShard], inputs: Inputs, *, exclude: frozenset[str], rank: int,
                 world_size: int, shuffle_buffer: int, seed: int):
        self.shards = shard_list
        self.inputs = inputs
        self.exclude = exclude
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, n_readers = self.rank * n_workers + worker, self.world_size * n_workers
        rng = np.random.default_rng([self.seed, self.epoch, reader])  # this reader's shuffle buffer
        by_shard = len(self.shards) >= n_readers
        mine = self.shards[reader::n_readers] if by_shard else self.shards
        buffer: list[np.ndarray] = []
        capacity = self.shuffle_buffer
        for cycle in range(1 << 62):
            crop_seed = self.inputs.crop.seed + 100_003 * self.epoch + cycle
            # every reader walks the shards in the same order, so that "every n-th sample" partitions them
            order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(mine))
            produced = index = 0
            for i in order:
                for key, value in iter_values(mine[i], self.inputs.ext):
                    if key in self.exclude:
                        continue
                    index += 1
                    if not by_shard and (index - 1) % n_readers != reader:
                        continue
                    for arr in self.inputs.arrays(key, value, 1, crop_seed):
                        produced += 1
                        if len(buffer) < capacity:
                            buffer.append(arr)
                            continue
                        j = int(rng.integers(len(buffer)))
                        buffer[j], arr = arr, buffer[j]
                        yield arr
            if produced == 0:  # nothing for this reader at all: end instead of spinning
                break
            # a corpus smaller than the buffer: one pass fills it with every sample, so start emitting
            # rather than decoding the same labels again and again to fill it
            capacity = min(capacity, max(1, len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def collate(kind: TokenizerKind, arrays: list[np.ndarray]) -> torch.Tensor:
    return kind.prepare(arrays)

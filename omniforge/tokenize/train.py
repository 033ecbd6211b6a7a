"""`omniforge tokenizer train`: train one tokenizer on label shards and report its reconstruction quality.

One function, :func:`train_tokenizer`, serves every tokenizer:

- image-like labels (rgb, depth, normal, semseg_coco, edges) are read from `<data>/<modality>/shard-*.tar`,
  cut with a fresh random resized crop (and flip) per sample and epoch through `crops.crop_settings`, and
  resized to the tokenizer's input size with the interpolation that suits the label;
- feature maps and global embeddings are used as stored (they are the features of crop 0);
- `sam_instance` trains the `sam_mask` tokenizer on every instance mask of every sample (random crops);
- `caption` trains the WordPiece text tokenizer shared by every sequence modality.

Training runs on one device, or on several under `torchrun` (DDP; rank 0 evaluates, logs and writes).
After every epoch the servable tokenizer (`config.json` + `model.safetensors`) and the training state
(`train_state.safetensors` + `train_state.json`, no pickles) are written to `<out>/<name>/`, so a re-run
continues from the next epoch. Per-epoch metrics are in `<out>/<name>/history.jsonl`; `loss.png` and, for
image-like tokenizers, `reconstruction.png` are drawn at the end.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from omniforge import codecs
from omniforge._torch_run import all_reduce_sum, barrier, resolve_device, setup_distributed, warmup_cosine, write_text
from omniforge.errors import ConfigError, CorpusError
from omniforge.modalities import get_modality
from omniforge import shards, storage
from omniforge._progress import Progress
from omniforge.tokenize.crops import CropConfig

log = logging.getLogger(__name__)

TEXT_NAME = "text"  # the WordPiece tokenizer trained from captions
SAM_MODALITY, SAM_NAME = "sam_instance", "sam_mask"
CAPTION_MODALITY = "caption"

# Interpolation of each image-like label when a crop is resized to the tokenizer's input size.
CROP_MODES = {
    "rgb": "bicubic",
    "depth": "bilinear",
    "normal": "normal",
    "semseg_coco": "nearest",
    "canny_edge": "bilinear",
    "sam_edge": "bilinear",
}
_DENSE_KINDS = ("pixels", "segmentation")
_STORED_KINDS = ("features", "global")
_MASK_KIND = "mask"
_IMAGE_KINDS = ("pixels", "segmentation", "features", "mask")  # drawn in reconstruction.png

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
HISTORY = "history.jsonl"
_STATE_FORMAT = 1
_MAX_HOLDOUT_MASKS = 64
_PLOT_SAMPLES = 4


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how. `data` is a label root (local or s3://); `out` is a local directory."""

    data: str  # label root holding <modality>/shard-*.tar and _status/<modality>/shard-*.parquet
    modality: str  # a label modality, "sam_instance" (sam_mask tokenizer) or "caption" (text tokenizer)
    out: str  # tokenizers directory: the tokenizer lands in <out>/<tokenizer name>/
    size: str = "tiny"  # model config size: "tiny" | "base"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3  # peak learning rate, reached after the warm-up, then cosine decay
    final_lr_ratio: float = 0.1  # learning rate at the last step, as a fraction of lr
    warmup_steps: int | None = None  # None: 5% of all steps (at least 1)
    weight_decay: float = 0.05  # AdamW, on weight matrices only
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    num_workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 256  # samples held by each loader for shuffling
    holdout: int = 16  # held-out samples for the per-epoch quality (at most a quarter of the data)
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_samples: int | None = None  # use only the first N samples (in shard and key order)
    vocab_size: int = 30000  # text tokenizer only
    restart: bool = False  # ignore a saved training state and start from scratch
    crop: CropConfig = field(default_factory=CropConfig)  # random crops of image-like labels

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: pass the label root (--data ROOT)")
        if not self.out:
            raise ConfigError("out: pass the tokenizers directory (--out DIR)")
        if storage.is_s3(self.out):
            raise ConfigError(f"out: tokenizers are written to a local directory, got {self.out!r}")
        try:
            get_modality(self.modality)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if self.modality != CAPTION_MODALITY:
            from omniforge.tokenize.models import TOKENIZER_NAMES

            if self.name not in TOKENIZER_NAMES:
                raise ConfigError(f"modality: no tokenizer for {self.modality!r}; trainable modalities: "
                                  f"{', '.join(sorted(_modality_of(n) for n in TOKENIZER_NAMES))}, caption")
        if self.size not in ("tiny", "base"):
            raise ConfigError(f"size: must be 'tiny' or 'base', got {self.size!r}")
        for name in ("epochs", "batch_size", "shuffle_buffer", "holdout", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"final_lr_ratio: must be in 0..1, got {self.final_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be >= 0")
        if self.max_samples is not None and self.max_samples < 2:
            raise ConfigError(f"max_samples: need at least 2 (one to train on, one held out), got {self.max_samples}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def name(self) -> str:
        """The tokenizer's name, and its folder under `out`."""
        return {SAM_MODALITY: SAM_NAME, CAPTION_MODALITY: TEXT_NAME}.get(self.modality, self.modality)

    @property
    def directory(self) -> str:
        return os.path.join(storage.normalize(self.out), self.name)


@dataclass
class TrainResult:
    directory: str  # where the tokenizer is (<out>/<name>)
    epochs: int  # epochs trained in total (including those of an earlier, resumed run)
    steps: int  # optimizer steps in total
    history: list[dict[str, Any]]  # per-epoch metrics; entry 0 is the untrained model's held-out quality
    seconds: float  # wall time of this call


def train_tokenizer(cfg: TrainConfig, *, progress: bool = True, verbose: bool = True) -> TrainResult:
    """Train the tokenizer `cfg` names on the label shards under `cfg.data`; see the module docstring.

    `verbose=False` leaves out the per-epoch lines (they still go to history.jsonl)."""
    if cfg.modality == CAPTION_MODALITY:
        return _train_text(cfg, verbose=verbose)
    return _Trainer(cfg, progress=progress, verbose=verbose).run()


# --------------------------------------------------------------------------------------------------
# Reading label shards


@dataclass(frozen=True)
class _Shard:
    uri: str
    keys: frozenset[str]  # ok keys of this shard that this run uses


def _modality_of(name: str) -> str:
    return {SAM_NAME: SAM_MODALITY, TEXT_NAME: CAPTION_MODALITY}.get(name, name)


def _no_data(cfg: TrainConfig) -> ConfigError:
    return ConfigError(f"no {cfg.modality} labels under {cfg.data}: run "
                       f"`omniforge label --modalities {cfg.modality}` first")


def _scan(cfg: TrainConfig) -> list[tuple[_Shard, list[str]]]:
    """Committed shards of the modality with their ok keys (sorted), honouring max_samples."""
    tars = storage.list_files(storage.join(cfg.data, cfg.modality), (".tar",))
    out: list[tuple[_Shard, list[str]]] = []
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
            out.append((_Shard(uri, frozenset(keys)), keys))
        if remaining == 0:
            break
    if uncommitted:
        log.warning("skipped %d %s shard(s) without a _status file (unfinished label job)", uncommitted, cfg.modality)
    if not out:
        raise _no_data(cfg)
    return out


def _iter_values(shard: _Shard, ext: str, wanted: frozenset[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Decoded (key, label) of a shard's members, restricted to its ok keys (and to `wanted`)."""
    for member, data in shards.iter_tar(shard.uri):
        key = shards.member_key(member)
        if key not in shard.keys or (wanted is not None and key not in wanted):
            continue
        try:
            yield key, codecs.decode(ext, data)
        except Exception as e:  # noqa: BLE001 - a corrupt committed label is a corpus problem: stop and say where
            raise CorpusError(f"cannot decode {shard.uri} member {member}: {e}; run `omniforge verify` on the "
                              f"label root and re-label the failing shard") from e


@dataclass(frozen=True)
class _Inputs:
    """How labels become model inputs (picklable: DataLoader workers get a copy)."""

    name: str
    kind: str
    ext: str
    image_size: int
    crop: CropConfig

    def arrays(self, key: str, value: Any, crop_index: int, crop_seed: int) -> list[np.ndarray]:
        """The model input arrays of one label: one, except for sam_instance (one per instance mask)."""
        from omniforge.tokenize import crops

        if self.kind in _STORED_KINDS:
            return [np.asarray(value)]
        if self.kind == _MASK_KIND:
            height, width = (int(v) for v in value["image_size"])
            row = self._crop_row(key, height, width, crop_index, crop_seed)
            instances = crops.crop_sam(value, row, height, width, size=self.crop.size, mask_size=self.image_size)
            return [inst.mask for inst in instances if np.any(inst.mask)]
        arr = np.asarray(value)  # P-mode semseg -> class ids
        row = self._crop_row(key, arr.shape[0], arr.shape[1], crop_index, crop_seed)
        return [crops.crop_dense(arr, row, self.image_size, mode=CROP_MODES.get(self.name, "bilinear"))]

    def _crop_row(self, key: str, height: int, width: int, crop_index: int, crop_seed: int) -> np.ndarray:
        from omniforge.tokenize import crops

        cfg = replace(self.crop, n_crops=max(self.crop.n_crops, crop_index + 1), seed=crop_seed)
        return crops.crop_settings(key, height, width, cfg)[crop_index]


class LabelStream(IterableDataset):
    """An endless, shuffled stream of model input arrays from label shards.

    Shards are split across DDP ranks and DataLoader workers; when there are fewer shards than readers,
    every reader scans every shard and keeps every n-th sample instead. Each pass over the data (the
    stream cycles, so that every rank can take the same number of batches) draws new random crops from
    a seed derived from (crop seed, epoch, pass); call :meth:`set_epoch` before iterating.
    """

    def __init__(self, shard_list: list[_Shard], inputs: _Inputs, *, exclude: frozenset[str], rank: int,
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
                for key, value in _iter_values(mine[i], self.inputs.ext):
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


def _collate(name: str, arrays: list[np.ndarray]) -> torch.Tensor:
    from omniforge.tokenize.models import prepare

    return prepare(name, arrays)


# --------------------------------------------------------------------------------------------------
# Distributed set-up


# --------------------------------------------------------------------------------------------------
# Training


class _LossModule(torch.nn.Module):
    """Makes `tokenizer.loss` the forward pass, so DDP sees it (and syncs gradients)."""

    def __init__(self, tokenizer: torch.nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.tokenizer.loss(x)


def lr_at(step: int, *, total: int, warmup: int, peak: float, final_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to final_ratio * peak."""
    return warmup_cosine(step, total=total, warmup=warmup, peak=peak, final=peak * final_ratio)


class _Trainer:
    def __init__(self, cfg: TrainConfig, *, progress: bool, verbose: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.verbose = verbose

    def run(self) -> TrainResult:
        from omniforge.tokenize import models

        cfg = self.cfg
        t_start = time.perf_counter()
        # the device first: NCCL wants each process bound to its GPU before the process group starts
        self.device = device = resolve_device(cfg.device)
        self.dist = dist_info = setup_distributed(device.type)
        try:
            self.amp = device.type == "cuda"
            mcfg = models.default_config(cfg.name, size=cfg.size)
            self.inputs = _Inputs(name=cfg.name, kind=mcfg.kind, ext=get_modality(cfg.modality).ext,
                                  image_size=mcfg.image_size, crop=cfg.crop)

            scanned = _scan(cfg)
            train_shards, holdout_keys, n_train = self._split(scanned)
            holdout_arrays = self._holdout_arrays([s for s, _ in scanned], holdout_keys)
            holdout = models.prepare(cfg.name, holdout_arrays).to(device)
            if n_train < dist_info.world_size:
                raise ConfigError(f"only {n_train} training samples for {dist_info.world_size} processes: "
                                  "label more data or use fewer processes")
            steps_per_epoch = max(1, math.ceil(n_train / (dist_info.world_size * cfg.batch_size)))
            total_steps = steps_per_epoch * cfg.epochs
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))

            torch.manual_seed(cfg.seed)
            model = models.build_tokenizer(mcfg)
            optimizer = _optimizer(model, cfg)
            directory = cfg.directory
            start_epoch, step, history = 0, 0, []
            if not cfg.restart and os.path.exists(os.path.join(directory, STATE_JSON)):
                model, optimizer, start_epoch, step, history = self._resume(directory, mcfg)
            model.to(device).train()
            _optimizer_to(optimizer, device)

            if dist_info.main:
                os.makedirs(directory, exist_ok=True)
                log.info("training %s (%s, %d parameters) on %d samples (%d held out), %d steps per epoch",
                         cfg.name, cfg.size, sum(p.numel() for p in model.parameters()), n_train,
                         len(holdout_keys), steps_per_epoch)
                if not history:
                    history.append({"epoch": 0, "step": 0, **self._evaluate(model, holdout, mcfg)})
                    if self.verbose:
                        _print_epoch(history[-1], cfg.epochs)

            stream = LabelStream(train_shards, self.inputs, exclude=holdout_keys, rank=dist_info.rank,
                                 world_size=dist_info.world_size, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
            loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                collate_fn=functools.partial(_collate, cfg.name), pin_memory=device.type == "cuda")
            wrapped: torch.nn.Module = _LossModule(model)
            if dist_info.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)

            bar = Progress(total=steps_per_epoch * (cfg.epochs - start_epoch), unit="step", desc=f"train {cfg.name}",
                           enabled=self.progress and dist_info.main)
            try:
                for epoch in range(start_epoch, cfg.epochs):
                    stream.set_epoch(epoch)
                    t0 = time.perf_counter()
                    loss_sum, n_seen, metric_sums = 0.0, 0, {}
                    batches = iter(loader)
                    for _ in range(steps_per_epoch):
                        x = next(batches).to(device, non_blocking=True)
                        lr = lr_at(step, total=total_steps, warmup=warmup, peak=cfg.lr, final_ratio=cfg.final_lr_ratio)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        with _autocast(device, self.amp):
                            loss, metrics = wrapped(x)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()
                        step += 1
                        loss_sum += float(loss.detach())
                        n_seen += x.shape[0]
                        for k, v in metrics.items():
                            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                        bar.update(1)
                    del batches
                    seconds = time.perf_counter() - t0
                    loss_total, seen_total = all_reduce_sum([loss_sum, float(n_seen)], device, dist_info)
                    if dist_info.main:
                        entry = {"epoch": epoch + 1, "step": step,
                                 "loss": loss_total / (steps_per_epoch * dist_info.world_size),
                                 **{f"train_{k}": v / steps_per_epoch for k, v in metric_sums.items() if k != "loss"},
                                 "lr": lr, "samples_per_s": seen_total / max(seconds, 1e-9),
                                 **self._evaluate(model, holdout, mcfg)}
                        history.append(entry)
                        _save_checkpoint(directory, model, optimizer, epoch=epoch + 1, step=step, history=history,
                                         cfg=cfg)
                        if self.verbose:
                            _print_epoch(entry, cfg.epochs)
                    barrier(dist_info)
            finally:
                bar.close()

            if dist_info.main:
                _plot_loss(os.path.join(directory, "loss.png"), history, cfg.name)
                if mcfg.kind in _IMAGE_KINDS:
                    _plot_reconstruction(os.path.join(directory, "reconstruction.png"), model, holdout,
                                         holdout_arrays, mcfg, self.amp, device)
            barrier(dist_info)
            epochs_done = history[-1]["epoch"] if history else cfg.epochs
            return TrainResult(directory=directory, epochs=epochs_done, steps=step, history=history,
                               seconds=time.perf_counter() - t_start)
        finally:
            if dist_info.initialized_here:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _split(self, scanned: list[tuple[_Shard, list[str]]]) -> tuple[list[_Shard], frozenset[str], int]:
        """Training shards, held-out keys (the last keys of the last shards) and the training item count."""
        all_keys = [k for _, keys in scanned for k in keys]
        if len(all_keys) < 2:
            raise ConfigError(f"only {len(all_keys)} {self.cfg.modality} label(s) under {self.cfg.data}: need at "
                              "least 2 (one to train on, one held out)")
        n_holdout = min(self.cfg.holdout, max(1, len(all_keys) // 4))
        holdout = frozenset(all_keys[-n_holdout:])
        train_shards = [s for s, keys in scanned if any(k not in holdout for k in keys)]
        n_train = len(all_keys) - n_holdout
        if self.inputs.kind == _MASK_KIND:  # an epoch is one pass over every instance mask
            n_train = sum(len(v.get("instances", [])) for s in train_shards
                          for k, v in _iter_values(s, self.inputs.ext) if k not in holdout)
            if n_train == 0:
                raise ConfigError(f"no SAM instances in the sam_instance labels under {self.cfg.data}: nothing to "
                                  "train the sam_mask tokenizer on")
        return train_shards, holdout, n_train

    def _holdout_arrays(self, shard_list: list[_Shard], keys: frozenset[str]) -> list[np.ndarray]:
        """The fixed held-out batch as label arrays: centre crop (crop 0) of the held-out samples."""
        arrays: dict[str, list[np.ndarray]] = {}
        for shard in shard_list:
            if not shard.keys & keys:
                continue
            for key, value in _iter_values(shard, self.inputs.ext, keys):
                arrays[key] = self.inputs.arrays(key, value, 0, self.cfg.crop.seed)
        flat = [a for k in sorted(arrays) for a in arrays[k]][:_MAX_HOLDOUT_MASKS]
        if not flat:
            raise ConfigError(f"the held-out {self.cfg.modality} samples have nothing to evaluate on (no instances)")
        return flat

    def _evaluate(self, model: torch.nn.Module, x: torch.Tensor, mcfg: Any) -> dict[str, float]:
        from omniforge.tokenize.models import codebook_stats, quality

        model.eval()
        try:
            with torch.no_grad(), _autocast(self.device, self.amp):
                loss, _ = model.loss(x)
                recon = model.reconstruct(x)
                ids = model.encode(x)
            out = {"heldout_loss": float(loss)}
            out.update({k: float(v) for k, v in quality(self.cfg.name, x, _float(recon)).items()})
            out.update({k: float(v) for k, v in codebook_stats(ids, mcfg.codebook_size).items()})
            return out
        finally:
            model.train()

    def _resume(self, directory: str, mcfg: Any):
        from omniforge.tokenize.models import load_tokenizer

        with open(os.path.join(directory, STATE_JSON), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != _STATE_FORMAT:
            raise ConfigError(f"{directory}/{STATE_JSON} has an unknown format: pass --restart to start over")
        model = load_tokenizer(directory, device="cpu")
        if model.config.to_dict() != mcfg.to_dict():
            raise ConfigError(f"the tokenizer in {directory} was trained with a different config "
                              f"(size {meta.get('size')!r}): pass --restart to start over, or --config "
                              f"{meta.get('size')}")
        optimizer = _optimizer(model, self.cfg)
        _load_optimizer(optimizer, meta, os.path.join(directory, STATE_TENSORS))
        if self.dist.main:
            log.info("resuming %s from epoch %d (step %d)", self.cfg.name, meta["epoch"], meta["step"])
        return model, optimizer, int(meta["epoch"]), int(meta["step"]), list(meta["history"])


def _autocast(device: torch.device, enabled: bool):
    if enabled:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)


def _print_epoch(entry: dict[str, Any], epochs: int) -> None:
    parts = [f"epoch {entry['epoch']}/{epochs}"]
    if "loss" in entry:
        parts.append(f"loss {entry['loss']:.4g}")
    parts.append(f"held-out loss {entry['heldout_loss']:.4g}")
    for k in ("psnr", "mse", "miou", "cosine", "iou"):
        if k in entry:
            parts.append(f"{k} {entry[k]:.4g}")
    parts.append(f"code usage {entry.get('code_usage', float('nan')):.1%}")
    parts.append(f"perplexity {entry.get('perplexity', float('nan')):.1f}")
    if "samples_per_s" in entry:
        parts.append(f"{entry['samples_per_s']:.1f} samples/s")
    print(" | ".join(parts), flush=True)


# --------------------------------------------------------------------------------------------------
# Checkpoints (no pickles: safetensors for tensors, JSON for the rest)


def _save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                     step: int, history: list[dict[str, Any]], cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    from omniforge.tokenize.models import save_tokenizer

    save_tokenizer(model, directory)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = os.path.join(directory, STATE_TENSORS + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, STATE_TENSORS))
    meta = {"format": _STATE_FORMAT, "name": cfg.name, "size": cfg.size, "epoch": epoch, "step": step,
            "param_groups": sd["param_groups"], "scalar_state": scalars, "history": history,
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("crop",)} | {"crop": asdict(cfg.crop)}}
    write_text(os.path.join(directory, HISTORY), "".join(json.dumps(h) + "\n" for h in history))
    write_text(os.path.join(directory, STATE_JSON), json.dumps(meta, indent=1))  # last: the commit marker


def _load_optimizer(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors_path: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(tensors_path)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = value
    for idx, scalars in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ConfigError("the saved optimizer state does not match the model: pass --restart to start over")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


# --------------------------------------------------------------------------------------------------
# Pictures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _plot_loss(path: str, history: list[dict[str, Any]], name: str) -> None:
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    trained = [h for h in history if "loss" in h]
    ax.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-", label="train loss")
    ax.plot([h["epoch"] for h in history], [h["heldout_loss"] for h in history], "s--", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if all(h["heldout_loss"] > 0 for h in history) and all(h["loss"] > 0 for h in trained):
        ax.set_yscale("log")
    ax.set_title(f"{name} tokenizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _plot_reconstruction(path: str, model: torch.nn.Module, x: torch.Tensor, label_arrays: list[np.ndarray],
                         mcfg: Any, amp: bool, device: torch.device) -> None:
    from omniforge._render import pca_rgb
    from omniforge.tokenize.models import restore

    x = x[:_PLOT_SAMPLES]
    model.eval()
    with torch.no_grad(), _autocast(device, amp):
        recon = model.reconstruct(x)
    model.train()
    labels, recons = label_arrays[: len(x)], restore(mcfg.name, _float(recon).cpu())
    n = len(labels)
    fig = _figure(max(2.6 * n, 5.2), 5.4)
    axes = fig.subplots(2, n, squeeze=False)
    for i, (a, b) in enumerate(zip(labels, recons)):
        a, b = np.asarray(a), np.asarray(b)
        if mcfg.kind == "features":  # one projection for both, so colours compare
            both = pca_rgb(np.concatenate([a.astype(np.float32), b.astype(np.float32)], axis=0))
            a, b = both[: a.shape[0]], both[a.shape[0]:]
        for row, arr in ((0, a), (1, b)):
            ax = axes[row][i]
            _show(ax, arr, mcfg, reference=a)
            ax.set_axis_off()
            ax.set_title(("label" if row == 0 else "reconstruction") + f" {i}", fontsize=9)
    fig.suptitle(f"{mcfg.name}: held-out labels vs reconstructions")
    fig.tight_layout()
    fig.savefig(path)


def _show(ax: Any, arr: np.ndarray, mcfg: Any, reference: np.ndarray) -> None:
    if mcfg.kind == "segmentation":
        ax.imshow(np.asarray(arr) % 20, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        img = arr if arr.dtype == np.uint8 else np.clip(arr.astype(np.float32), 0, None)
        if img.dtype != np.uint8 and img.max() > 1:
            img = img / max(float(np.asarray(reference, dtype=np.float32).max()), 1e-6)
        ax.imshow(np.clip(img, 0, 1) if img.dtype != np.uint8 else img)
    else:
        arr = np.squeeze(arr).astype(np.float32)
        ref = np.asarray(reference, dtype=np.float32)
        cmap = "turbo" if mcfg.name == "depth" else "gray"
        ax.imshow(arr, cmap=cmap, vmin=float(ref.min()), vmax=float(ref.max()) if ref.max() > ref.min() else None)


# --------------------------------------------------------------------------------------------------
# Text


def _train_text(cfg: TrainConfig, *, verbose: bool = True) -> TrainResult:
    from tokenizers import Tokenizer

    from omniforge.tokenize.text import train_wordpiece

    t0 = time.perf_counter()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one process trains, the others have nothing to do
        return TrainResult(directory=cfg.directory, epochs=0, steps=0, history=[], seconds=0.0)
    texts = [value for shard, _ in _scan(cfg) for _, value in _iter_values(shard, get_modality(cfg.modality).ext)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"every caption under {cfg.data} is empty: nothing to train the text tokenizer on")
    directory = cfg.directory
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    train_wordpiece(texts, vocab_size=cfg.vocab_size).save(path)

    hf = Tokenizer.from_file(path)  # measured through the saved file: what every later job loads
    unk = hf.token_to_id("[UNK]")
    encodings = hf.encode_batch(texts, add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in encodings)
    n_unk = sum(sum(1 for i in e.ids if i == unk) for e in encodings)
    entry = {"vocab_size": hf.get_vocab_size(), "captions": len(texts), "mean_tokens": n_tokens / len(texts),
             "unk_rate": n_unk / max(1, n_tokens)}
    write_text(os.path.join(directory, HISTORY), json.dumps(entry) + "\n")
    if verbose:
        print(f"text tokenizer: vocab {entry['vocab_size']}, {entry['captions']} captions, "
              f"{entry['mean_tokens']:.1f} tokens per caption, [UNK] rate {entry['unk_rate']:.2%}", flush=True)
    return TrainResult(directory=directory, epochs=0, steps=0, history=[entry], seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Command line


def cmd_tokenizer_train(args: Any) -> int:
    cfg = TrainConfig(data=args.data, modality=args.modality, out=args.out, size=args.config, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, max_samples=args.max_samples,
                      num_workers=args.num_workers, vocab_size=args.vocab_size, seed=args.seed, device=args.device,
                      restart=args.restart)
    result = train_tokenizer(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(summary(cfg, result))
    return 0


def summary(cfg: TrainConfig, result: TrainResult) -> str:
    """One line saying where the tokenizer is and how well it reconstructs held-out labels."""
    last = result.history[-1] if result.history else {}
    if cfg.modality == CAPTION_MODALITY:
        return (f"text tokenizer -> {os.path.join(result.directory, 'tokenizer.json')}: vocab {last['vocab_size']}, "
                f"{last['mean_tokens']:.1f} tokens per caption, [UNK] rate {last['unk_rate']:.2%}")
    scores = ", ".join(f"{k} {last[k]:.4g}" for k in ("psnr", "mse", "miou", "cosine", "iou") if k in last)
    return (f"{cfg.name} tokenizer -> {result.directory} ({result.epochs} epochs, {result.steps} steps, "
            f"{result.seconds:.0f} s); held-out {scores}, code usage {last.get('code_usage', float('nan')):.1%}, "
            f"perplexity {last.get('perplexity', float('nan')):.1f}")


def main(argv: list[str] | None = None) -> int:
    """`python -m omniforge.tokenize.train ARGS` = `omniforge tokenizer train ARGS` (handy under torchrun)."""
    import argparse
    import sys

    from omniforge.errors import OmniforgeError

    parser = argparse.ArgumentParser(prog="omniforge")
    from omniforge.tokenize._cli import add_cli

    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", "train", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except OmniforgeError as e:
        print(f"omniforge tokenizer train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`omniforge train`: train the 4M-21-style model (:class:`omniforge.model.fm.FourM`) on token shards.

One loop for one device and for several under ``torchrun`` (DDP, or FSDP2 ``fully_shard``; rank 0 logs and
writes). Each optimizer step takes ``grad_accum`` batches from the token loader (masking happens there, per
sample, from seeded generators), averages their losses, clips the gradient norm and applies AdamW with a
linear warm-up then a cosine decay from ``lr`` to ``final_lr``.

Run directory ``<out>/``:

- ``log.jsonl``: one line per step (step, loss, per-modality losses, lr, tokens/s, grad norm);
- ``checkpoint-<step>/``: ``model.safetensors`` (full state dict), ``optimizer.safetensors`` +
  ``trainer_state.json`` (optimizer scalars and param groups, step, schedule, data position of every rank,
  python/numpy RNG), ``rng.safetensors`` (torch CPU/CUDA RNG of every rank) and ``config.json`` (the train
  config, the model config and the modality specs: what ``omniforge sample`` needs to rebuild the model,
  see :func:`load_model`). No pickles anywhere;
- ``latest``: JSON ``{"step": k, "path": "checkpoint-k"}``, written after the checkpoint is complete;
- ``loss.png`` at the end, and TensorBoard scalars under ``tb/`` when TensorBoard is installed.

A call on a run directory with a ``latest`` pointer resumes from that checkpoint exactly: model, optimizer,
schedule, data position and RNG, so the losses of the remaining steps equal those of an uninterrupted run
(bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from omniforge._torch_run import (Dist, all_reduce_sum, barrier, resolve_device, setup_distributed, warmup_cosine,
                                  write_text)
from omniforge.errors import ConfigError
from omniforge.model.data import DataConfig, TokenShardDataset, committed_shards, make_loader
from omniforge.model.fm import FourM, ModelConfig, model_config
from omniforge.model.masking import Masker, MaskingConfig
from omniforge.model._cli import DTYPES, STRATEGIES
from omniforge.model._cli import TRAIN_FLAGS as _FLAGS
from omniforge.model._cli import add_train_cli as add_cli  # noqa: F401 - `python -m` entry point and tests
from omniforge.model.specs import ModalitySpec, pixel_source, specs_for

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest"
EVAL_LOG = "eval.jsonl"
LOG = "log.jsonl"
CONFIG = "config.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
TEXT_TOKENIZER = "text/tokenizer.json"  # inside --tokenizers DIR (omniforge.tokenize.kinds.text_artifact)
_SEP = "::"  # parameter names hold dots; optimizer tensor names are "<param fqn>::<state key>"


@dataclass(kw_only=True)
class TrainConfig:
    """What to train and how. ``data`` is a token root (local or s3://); ``out`` is a local run directory."""

    data: str | tuple[str, ...]  # token root holding tok_* folders and their _status tables, or several roots
    modalities: tuple[str, ...]  # token folders, e.g. ("tok_rgb@224", "tok_depth@224", "tok_caption")
    out: str  # run directory: checkpoints, logs
    tokenizers: str | None = None  # directory with text/tokenizer.json (needed for sequence modalities)
    model: str = "tiny"  # tiny | B | L | XL (fm.MODEL_CONFIGS)
    masking: str | None = None  # YAML (ml-4m alphas mixture or MaskingConfig fields); None: uniform mixture
    input_tokens: int = 128  # encoder token budget per sample (overrides the masking YAML's)
    target_tokens: int = 128  # decoder token budget per sample (overrides the masking YAML's)
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this step)
    batch_size: int = 32  # samples per batch per rank
    grad_accum: int = 1  # batches per optimizer step
    lr: float = 1e-4  # peak learning rate, after a linear warm-up; then cosine to final_lr
    warmup_steps: int = 100
    final_lr: float = 1e-6
    weight_decay: float = 0.05  # AdamW, on matrices and embeddings only
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile each transformer block (shapes dynamic); packing stays eager
    strategy: str = "ddp"  # ddp | fsdp, used under torchrun with WORLD_SIZE > 1
    log_every: int = 10  # progress-bar / TensorBoard / log-line period (log.jsonl gets every step)
    save_every: int = 200  # checkpoint period in steps (the last step is always saved)
    num_workers: int = 0  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples per shuffled block of the loader
    tensorboard: bool = True  # write TensorBoard scalars when torch.utils.tensorboard is importable
    data_weights: tuple[float, ...] | None = None  # several roots: share of the samples drawn from each
    eval_data: str | None = None  # held-out token root: its loss is measured every eval_every steps
    eval_every: int | None = None  # steps between held-out evaluations (None: every save_every steps)
    eval_batches: int = 8  # batches per rank per evaluation (the same samples and masks every time)

    def __post_init__(self) -> None:
        if not isinstance(self.data, str):
            self.data = tuple(self.data)
            if len(self.data) == 1:
                self.data = self.data[0]
        if self.data_weights is not None:
            self.data_weights = tuple(float(w) for w in self.data_weights)
            if len(self.data_weights) != len(self.roots) or any(not w > 0 for w in self.data_weights):
                raise ConfigError(f"TrainConfig.data_weights={list(self.data_weights)}: give one positive weight per "
                                  f"data root ({len(self.roots)})")
        self.modalities = tuple(self.modalities)
        if not self.modalities:
            raise ConfigError("TrainConfig.modalities is empty: name token folders, e.g. tok_rgb@224,tok_caption")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"TrainConfig.modalities repeats a folder: {self.modalities}")
        positive = ("input_tokens", "target_tokens", "steps", "batch_size", "grad_accum", "log_every",
                    "save_every", "shuffle_buffer", "eval_batches")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise ConfigError(f"TrainConfig.eval_every={self.eval_every!r}: must be a positive integer")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TrainConfig.{name}={value!r}: must be a positive integer")
        for name in ("warmup_steps", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TrainConfig.{name}={value!r}: must be a non-negative integer")
        if not self.lr > 0 or not 0 <= self.final_lr <= self.lr:
            raise ConfigError(f"TrainConfig: need lr > 0 and 0 <= final_lr <= lr, got lr={self.lr}, "
                              f"final_lr={self.final_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("TrainConfig.weight_decay and grad_clip must be >= 0")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"TrainConfig.device={self.device!r}: must be auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise ConfigError(f"TrainConfig.dtype={self.dtype!r}: must be one of {DTYPES}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"TrainConfig.strategy={self.strategy!r}: must be one of {STRATEGIES}")
        model_config(self.model)  # raises ConfigError listing the valid names

    @property
    def roots(self) -> tuple[str, ...]:
        return (self.data,) if isinstance(self.data, str) else self.data

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["data"] = self.data if isinstance(self.data, str) else list(self.data)
        d["data_weights"] = None if self.data_weights is None else list(self.data_weights)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


@dataclass
class TrainResult:
    out: str  # the run directory
    steps: int  # the step reached (== cfg.steps)
    losses: list[dict[str, Any]] = field(default_factory=list)  # the log.jsonl entries of the steps run here
    evals: list[dict[str, Any]] = field(default_factory=list)  # the eval.jsonl entries of the steps run here
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Small helpers: schedule, distributed set-up, devices


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _gather_objects(obj: Any, d: Dist) -> list[Any]:
    if d.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------------
# Building blocks: tokenizer, specs, masker, loader, model, optimizer


def _text_tokenizer(cfg: TrainConfig, sequence_folders: list[str]):
    if not sequence_folders:
        return None
    if cfg.tokenizers is None:
        raise ConfigError(f"{', '.join(sequence_folders)} are text sequences: pass --tokenizers DIR (the directory "
                          f"holding {TEXT_TOKENIZER}, as for `omniforge tokenize`)")
    from omniforge.tokenize.store import TokenizerStore

    return TokenizerStore(cfg.tokenizers).text()


def _is_sequence(folder: str) -> bool:
    from omniforge.modalities import by_token_folder

    info = by_token_folder(folder)
    return info is not None and info.crop == "sequence"


def build_specs(cfg: TrainConfig) -> tuple[dict[str, ModalitySpec], Any]:
    """The modality specs of ``cfg.modalities`` and the text tokenizer (None without sequence folders)."""
    try:
        sequences = [f for f in cfg.modalities if _is_sequence(f)]
        tok = _text_tokenizer(cfg, sequences)
        specs = specs_for(list(cfg.modalities), tok.vocab_size if tok is not None else 1)
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    return _tokenizer_vocabularies(cfg, specs), tok


def _tokenizer_vocabularies(cfg: TrainConfig, specs: dict[str, ModalitySpec]) -> dict[str, ModalitySpec]:
    """Image and global heads sized by the trained tokenizers' codebooks when --tokenizers has them (a tiny
    tokenizer's 128 codes, not the registry's 8192), so that sampling can only produce decodable ids."""
    if not cfg.tokenizers:
        return specs
    from dataclasses import replace

    from omniforge.modalities import by_token_folder
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    store = TokenizerStore(cfg.tokenizers)
    out = dict(specs)
    for folder, spec in specs.items():
        if spec.kind in ("sequence", "pixels"):
            continue
        codebook = store.codebook_size(kind_for(by_token_folder(folder)))
        if codebook is not None:
            out[folder] = replace(spec, vocab_size=codebook)
    return out


def _check_shards(cfg: TrainConfig) -> None:
    # A folder must exist somewhere; a root without it gives samples with that modality masked.
    missing = [f for f in cfg.modalities if not any(committed_shards(root, f) for root in cfg.roots)]
    pixels = [f for f in missing if pixel_source(f)]
    if pixels:
        raise ConfigError(f"{', '.join(pixels)} crops the {pixel_source(pixels[0])} labels (in the token root, or in "
                          "the label root its tokenize run read) with the root's crop_settings, and "
                          f"{', '.join(cfg.roots)} has no shard with both: tokenize the labels with crops first, "
                          f"or drop {', '.join(pixels)}")
    if missing:
        raise ConfigError(f"no token shards for {', '.join(missing)} under {', '.join(cfg.roots)}: "
                          f"run `omniforge tokenize` for them first")
    if cfg.eval_data is not None and not any(committed_shards(cfg.eval_data, f) for f in cfg.modalities):
        raise ConfigError(f"--eval-data {cfg.eval_data} has no token shards of {', '.join(cfg.modalities)}: "
                          "tokenize the held-out images into it first")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError for what would stop a run at its start (shards, tokenizers, masking), without
    building the model: launchers call it before they start workers."""
    _check_shards(cfg)
    build_specs(cfg)
    build_masking(cfg)


def build_masking(cfg: TrainConfig) -> MaskingConfig:
    if cfg.masking is None:
        return MaskingConfig.uniform(list(cfg.modalities), input_tokens=cfg.input_tokens,
                                     target_tokens=cfg.target_tokens)
    if not os.path.exists(cfg.masking):
        raise ConfigError(f"masking config {cfg.masking} not found: pass a YAML file to --masking")
    m = MaskingConfig.from_yaml(cfg.masking)
    m.input_tokens, m.target_tokens = cfg.input_tokens, cfg.target_tokens
    return m


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _wrap(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP or FSDP2 under torchrun. ``model`` stays the plain module whose
    (FSDP: sharded) parameters the optimizer holds.

    ``cfg.compile`` compiles each encoder and decoder block in place (regional compilation): the blocks
    hold nearly all the FLOPs, and their inputs are plain tensors whose lengths vary from batch to batch
    (dynamic shapes, one graph per block kind). The data-dependent gathering and packing around them
    stays eager; compiling the whole model would break its graph at every packing step. In place, the
    parameter names and checkpoints are those of the eager model.
    """
    if cfg.compile:
        for blk in (*model.encoder, *model.decoder):
            blk.compile(dynamic=True)
    runner: nn.Module = model
    if d.world_size > 1 and cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in (*model.encoder, *model.decoder):
            fully_shard(blk)
        fully_shard(model)
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A modality without targets in a batch leaves its head unused.
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=True)
    return runner


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _json_rng(python_state: tuple, numpy_state: tuple) -> dict[str, Any]:
    version, internal, gauss = python_state
    kind, keys, pos, has_gauss, cached = numpy_state
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int, device: torch.device) -> None:
    if f"torch.{rank}" in tensors:
        torch.set_rng_state(tensors[f"torch.{rank}"])
    if device.type == "cuda" and f"cuda.{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda.{rank}"], device)
    rng = meta["rng"][rank] if rank < len(meta["rng"]) else None
    if rng is not None:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _save_checkpoint(run: _Run, step: int) -> None:
    """Write checkpoint-<step>/ (rank 0), then the latest pointer. Every rank must call it (collectives)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = run.dist
    model_sd = get_model_state_dict(run.model, options=_state_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(run.model, run.optimizer, options=_state_options(cpu_offload=True))
    rng = _rng_state(run.device)
    rng_all = _gather_objects({"torch": rng["torch"], "cuda": rng.get("cuda"),
                               "json": _json_rng(rng["python"], rng["numpy"])}, d)
    data_all = _gather_objects(run.loader.state_dict(), d)
    if not d.main:
        barrier(d)
        return
    name = f"checkpoint-{step}"
    directory = os.path.join(run.cfg.out, name)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model_sd.items()}, os.path.join(directory, MODEL_FILE))
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, state in optim_sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{fqn}{_SEP}{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(fqn, {})[k] = v
    save_file(tensors, os.path.join(directory, OPTIM_FILE))
    rng_tensors = {f"torch.{r}": s["torch"] for r, s in enumerate(rng_all)}
    rng_tensors.update({f"cuda.{r}": s["cuda"] for r, s in enumerate(rng_all) if s["cuda"] is not None})
    save_file(rng_tensors, os.path.join(directory, RNG_FILE))
    meta = {"format": FORMAT, "step": step, "world_size": d.world_size,
            "schedule": {"kind": "warmup_cosine", "total": run.cfg.steps, "warmup": run.cfg.warmup_steps,
                         "peak": run.cfg.lr, "final": run.cfg.final_lr, "last_lr": run.last_lr},
            "optimizer": {"param_groups": optim_sd["param_groups"], "scalar_state": scalars},
            "data": data_all, "rng": [s["json"] for s in rng_all]}
    write_text(os.path.join(directory, STATE_FILE), json.dumps(meta))
    write_text(os.path.join(directory, CONFIG), json.dumps(run.config_json(), indent=1))
    write_text(os.path.join(run.cfg.out, LATEST), json.dumps({"step": step, "path": name}) + "\n")
    barrier(d)


def latest_checkpoint(out: str) -> str | None:
    """The checkpoint directory named by ``<out>/latest``, or None when the run has none yet."""
    path = os.path.join(out, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        pointer = json.load(f)
    directory = os.path.join(out, pointer["path"])
    if not os.path.exists(os.path.join(directory, STATE_FILE)):
        raise ConfigError(f"{path} points to {directory}, which is incomplete: delete {path} to start over")
    return directory


def _load_checkpoint(run: _Run, directory: str) -> int:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    if meta["world_size"] != run.dist.world_size:
        raise ConfigError(f"{directory} was saved by {meta['world_size']} ranks, this run has "
                          f"{run.dist.world_size}: resume with the same number of processes")
    set_model_state_dict(run.model, load_file(os.path.join(directory, MODEL_FILE)), options=_state_options())
    state: dict[str, dict[str, Any]] = {}
    for name, value in load_file(os.path.join(directory, OPTIM_FILE)).items():
        fqn, k = name.rsplit(_SEP, 1)
        state.setdefault(fqn, {})[k] = value
    for fqn, scalars in meta["optimizer"]["scalar_state"].items():
        state.setdefault(fqn, {}).update(scalars)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in meta["optimizer"]["param_groups"]]
    set_optimizer_state_dict(run.model, run.optimizer, {"state": state, "param_groups": groups},
                             options=_state_options())
    run.loader.load_state_dict(meta["data"][run.dist.rank])
    _set_rng(load_file(os.path.join(directory, RNG_FILE)), meta, run.dist.rank, run.device)
    return int(meta["step"])


def load_model(checkpoint: str, *, device: str | torch.device = "cpu") -> tuple[FourM, dict[str, Any]]:
    """Rebuild the model of a checkpoint directory (or of a run directory's latest checkpoint).

    Returns ``(model in eval mode, config.json)``; config.json holds "train" (the TrainConfig), "model" (the
    ModelConfig), "specs" (folder -> ModalitySpec fields) and "text_tokenizer" (path or None).
    """
    from safetensors.torch import load_file

    if os.path.exists(os.path.join(checkpoint, LATEST)):
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    path = os.path.join(checkpoint, CONFIG)
    if not os.path.exists(path):
        raise ConfigError(f"{checkpoint} has no {CONFIG}: pass a checkpoint-<step> directory "
                          "written by `omniforge train`")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    specs = {name: ModalitySpec(**s) for name, s in config["specs"].items()}
    model = FourM(ModelConfig.from_dict(config["model"]), specs)
    model.load_state_dict(load_file(os.path.join(checkpoint, MODEL_FILE)))
    return model.to(device).eval(), config


# --------------------------------------------------------------------------------------------------
# The loop


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {k: v.to(device, non_blocking=True) for k, v in d.items()}
            for m, d in batch.items() if not m.startswith("__")}


def _batch_tokens(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Tokens the step processed: encoder inputs plus decoder targets."""
    return int(sum(int((~d["input_mask"]).sum()) + int((~d["target_mask"]).sum())
                   for m, d in batch.items() if not m.startswith("__")))


def _mean_loss(ce_sums: Any, token_counts: Any) -> float:
    """The loss as training defines it: per modality, the mean cross-entropy over its target tokens; then the
    plain mean over the modalities that have any."""
    present = [s / c for s, c in zip(ce_sums, token_counts) if c > 0]
    return float(sum(present) / len(present)) if present else float("nan")


class _TensorBoard:
    def __init__(self, directory: str, enabled: bool):
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed: no TensorBoard scalars (pip install tensorboard)", file=sys.stderr)
            return
        self._writer = SummaryWriter(directory)

    def write(self, entry: dict[str, Any], group: str = "train") -> None:
        if self._writer is None:
            return
        for k, v in entry.items():
            if k == "losses":
                for m, value in v.items():
                    self._writer.add_scalar(f"loss/{m}" if group == "train" else f"{group}_loss/{m}", value,
                                            entry["step"])
            elif k == "dataset_losses":  # keyed by root: local path or s3:// URI
                for root, value in v.items():
                    self._writer.add_scalar(f"dataset_loss/{root.rstrip('/').replace('://', '/')}", value,
                                            entry["step"])
            elif k != "step":
                self._writer.add_scalar(f"{group}/{k}", v, entry["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _Run:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, device: torch.device, d: Dist):
        self.cfg, self.device, self.dist = cfg, device, d
        _check_shards(cfg)
        self.specs, self.text = build_specs(cfg)
        self.masking = build_masking(cfg)
        text = self.text
        masker = Masker(self.masking, self.specs, sentinel_ids=text.sentinel_ids if text else [],
                        pad_id=text.pad_id if text else 0, eos_id=text.eos_id if text else 3)
        data_cfg = DataConfig(root=cfg.data, weights=cfg.data_weights, folders=cfg.modalities,
                              batch_size=cfg.batch_size, seed=cfg.seed,
                              num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                              pin_memory=device.type == "cuda")
        self.loader = make_loader(data_cfg, masker, rank=d.rank, world_size=d.world_size)
        self.eval_data = None
        if cfg.eval_data is not None:  # read in order, unshuffled, endless: every rank runs eval_batches batches
            eval_cfg = DataConfig(root=cfg.eval_data, folders=cfg.modalities, batch_size=cfg.batch_size,
                                  seed=cfg.seed, num_workers=0, shuffle_buffer=1)
            self.eval_data = TokenShardDataset(eval_cfg, masker, rank=d.rank, world_size=d.world_size)
            self._eval_start = self.eval_data.state_dict()
        self.model_config = model_config(cfg.model)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
        self.model = FourM(self.model_config, self.specs).to(device)
        self.num_parameters = self.model.num_parameters()
        self.runner = _wrap(self.model, cfg, d, device)
        self.optimizer = _optimizer(self.model, cfg)
        self.last_lr = 0.0

    def config_json(self) -> dict[str, Any]:
        tok = os.path.join(self.cfg.tokenizers, TEXT_TOKENIZER) if self.text is not None else None
        return {"format": FORMAT, "train": self.cfg.to_dict(), "model": self.model_config.to_dict(),
                "specs": {m: asdict(s) for m, s in self.specs.items()}, "masking": asdict(self.masking),
                "text_tokenizer": tok, "parameters": self.num_parameters}

    def lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, total=c.steps, warmup=c.warmup_steps, peak=c.lr, final=c.final_lr)

    def step(self, step: int, batches) -> dict[str, Any]:
        """One optimizer step (0-based ``step``) over ``grad_accum`` batches; the log entry of step + 1."""
        cfg, d = self.cfg, self.dist
        t0 = time.perf_counter()
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        # Losses stay on the device until the step is over: one host sync per step, not one per micro-batch.
        names, roots = list(self.specs), cfg.roots
        mixed = len(roots) > 1
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        per = torch.zeros(len(names), dtype=torch.float64, device=self.device)  # summed over micro-batches
        # With several roots: per root and modality, the summed target-token cross-entropy and the token count.
        by_root = torch.zeros(2, len(roots) if mixed else 0, len(names), dtype=torch.float64, device=self.device)
        counts, tokens = [0.0] * len(names), 0
        for micro in range(cfg.grad_accum):
            host_batch = next(batches)
            tokens += _batch_tokens(host_batch)  # counted on the host copy: no device sync
            batch = _to_device(host_batch, self.device)
            sync = micro == cfg.grad_accum - 1 or d.world_size == 1 or cfg.strategy == "fsdp"
            ctx = contextlib.nullcontext() if sync else self.runner.no_sync()
            with ctx:
                with _autocast(self.device, cfg.dtype):
                    loss, losses, *token_losses = self.runner(batch, token_losses=mixed)
                (loss / cfg.grad_accum).backward()
            total += loss.detach()
            for m, v in losses.items():
                i = names.index(m)
                per[i] += v.detach()
                counts[i] += 1
            if mixed:
                source = host_batch["__source__"].to(self.device, non_blocking=True)
                for m, (ce, sample) in token_losses[0].items():
                    i, rows = names.index(m), source[sample]
                    by_root[0, :, i].index_add_(0, rows, ce.double())
                    by_root[1, :, i].index_add_(0, rows, torch.ones_like(ce, dtype=torch.float64))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Average over micro-batches and ranks.
        n = len(names)
        host = torch.cat([norm.detach().double()[None], (total / cfg.grad_accum)[None], per,
                          by_root.flatten()]).tolist()  # the step's one device-to-host copy
        norm, loss_sum, per_sums, root_sums = host[0], host[1], host[2:2 + n], host[2 + n:]
        sums = all_reduce_sum([loss_sum, float(tokens), *per_sums, *counts, *root_sums], self.device, d)
        seconds = time.perf_counter() - t0
        losses_out = {m: sums[2 + i] / sums[2 + n + i] for i, m in enumerate(names) if sums[2 + n + i] > 0}
        entry = {"step": step + 1, "loss": sums[0] / d.world_size, "losses": losses_out, "lr": lr,
                 "tokens_per_s": sums[1] / max(seconds, 1e-9), "grad_norm": norm}
        if mixed:
            ce_tokens = np.asarray(sums[2 + 2 * n:]).reshape(2, len(roots), n)
            entry["dataset_losses"] = {root: _mean_loss(ce_tokens[0, r], ce_tokens[1, r])
                                       for r, root in enumerate(roots) if ce_tokens[1, r].any()}
        return entry

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out loss after ``step`` steps: the first eval_batches batches of the eval root on every rank,
        with the same samples and masks at every evaluation. Each modality's loss is averaged over its target
        tokens (not over batches), then the loss over the modalities, as in training. Iterated without a
        DataLoader, so no global RNG is drawn and the training run stays exactly resumable."""
        cfg, d = self.cfg, self.dist
        names = list(self.specs)
        sums = torch.zeros(2 * len(names), dtype=torch.float64, device=self.device)  # per modality: CE sum, count
        samples = 0
        self.eval_data.load_state_dict(self._eval_start)
        batches = iter(self.eval_data)
        self.model.eval()
        try:
            for _ in range(cfg.eval_batches):
                batch = _to_device(next(batches), self.device)
                samples += next(iter(batch.values()))["input_mask"].shape[0]
                with _autocast(self.device, cfg.dtype):
                    _, losses = self.model(batch)
                for m, v in losses.items():
                    i = names.index(m)
                    count = (~batch[m]["target_mask"]).sum()
                    sums[i] += v.double() * count
                    sums[len(names) + i] += count
        finally:
            self.model.train()
        totals = all_reduce_sum(sums.tolist() + [float(samples)], self.device, d)
        n = len(names)
        losses_out = {m: totals[i] / totals[n + i] for i, m in enumerate(names) if totals[n + i] > 0}
        return {"step": step, "loss": _mean_loss(totals[:n], totals[n:2 * n]), "losses": losses_out,
                "samples": int(totals[-1])}


def read_log(path: str, upto: int) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["step"] <= upto]


def _plot_loss(path: str, entries: list[dict[str, Any]], evals: list[dict[str, Any]] = ()) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [e["step"] for e in entries]
    ax.plot(steps, [e["loss"] for e in entries], label="loss", linewidth=1.5)
    for m in sorted({m for e in entries for m in e["losses"]}):
        pts = [(e["step"], e["losses"][m]) for e in entries if m in e["losses"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, linewidth=0.8, alpha=0.7)
    for root in sorted({r for e in entries for r in e.get("dataset_losses", {})}):
        pts = [(e["step"], e["dataset_losses"][root]) for e in entries if root in e.get("dataset_losses", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", label=f"loss on {root}", linewidth=0.8)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="black", markersize=3,
                linewidth=1.2, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or resume, when ``<out>/latest`` exists) up to ``cfg.steps`` optimizer steps."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    d = setup_distributed(device.type)
    try:
        if d.main:
            os.makedirs(cfg.out, exist_ok=True)
        barrier(d)
        run = _Run(cfg, device, d)
        start = 0
        resume_from = latest_checkpoint(cfg.out)
        if resume_from is not None:
            start = _load_checkpoint(run, resume_from)
        if d.main:
            what = f"resuming from {resume_from} (step {start})" if resume_from else "starting"
            print(f"omniforge train: {cfg.model} model, {run.num_parameters:,} parameters, "
                  f"{len(run.specs)} modalities; {what}", file=sys.stderr, flush=True)
        entries, evals = _run_loop(run, start, progress)
        return TrainResult(out=cfg.out, steps=max(start, cfg.steps), losses=entries, evals=evals,
                           seconds=time.perf_counter() - t_start)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_loop(run: _Run, start: int, progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cfg, d = run.cfg, run.dist
    log_path, eval_path = os.path.join(cfg.out, LOG), os.path.join(cfg.out, EVAL_LOG)
    eval_every = cfg.eval_every or cfg.save_every
    log_file = eval_file = tb = bar = None
    if d.main:
        logs = [log_path] + ([eval_path] if run.eval_data is not None or os.path.exists(eval_path) else [])
        for path in logs:  # drop lines of steps after the checkpoint
            write_text(path, "".join(json.dumps(e) + "\n" for e in read_log(path, start)))
        log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
        eval_file = open(eval_path, "a", encoding="utf-8") if run.eval_data is not None else None  # noqa: SIM115
        tb = _TensorBoard(os.path.join(cfg.out, "tb"), cfg.tensorboard)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train", file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
    entries: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    try:
        run.runner.train()
        batches = iter(run.loader)
        for step in range(start, cfg.steps):
            entry = run.step(step, batches)
            entries.append(entry)
            done = step + 1
            if d.main:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                if done % cfg.log_every == 0 or done == cfg.steps:
                    tb.write(entry)
                    if bar is not None:
                        bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                    else:
                        log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", done, cfg.steps, entry["loss"],
                                 entry["lr"], entry["tokens_per_s"])
                if bar is not None:
                    bar.update(1)
            if run.eval_data is not None and (done % eval_every == 0 or done == cfg.steps):
                result = run.evaluate(done)
                evals.append(result)
                if d.main:
                    eval_file.write(json.dumps(result) + "\n")
                    eval_file.flush()
                    tb.write(result, group="eval")
                    line = (f"step {done}: held-out loss {result['loss']:.4f} over {result['samples']} samples ("
                            + ", ".join(f"{m} {v:.3f}" for m, v in result["losses"].items()) + ")")
                    if bar is not None:
                        bar.write(line, file=sys.stderr)
                    else:
                        log.info(line)
            if done % cfg.save_every == 0 or done == cfg.steps:
                _save_checkpoint(run, done)
    finally:
        if bar is not None:
            bar.close()
        for f in (log_file, eval_file):
            if f is not None:
                f.close()
        if tb is not None:
            tb.close()
    if d.main:
        history = read_log(log_path, cfg.steps)
        if history:
            _plot_loss(os.path.join(cfg.out, "loss.png"), history, read_log(eval_path, cfg.steps))
    return entries, evals


# --------------------------------------------------------------------------------------------------
# Command line

def config_from_args(args: Any) -> TrainConfig:
    settings: dict[str, Any] = {}
    if args.config is not None:
        if args.config.endswith((".yaml", ".yml")) or os.path.exists(args.config):
            import yaml

            if not os.path.exists(args.config):
                raise ConfigError(f"--config {args.config}: file not found")
            with open(args.config, encoding="utf-8") as f:
                settings = dict(yaml.safe_load(f) or {})
        else:
            settings["model"] = args.config
    for name in (*_FLAGS, "compile", "tensorboard"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if "datasets" in settings:  # named datasets: {name: {data: ROOT, weight: W}}, as ml-4m's data configs
        datasets = settings.pop("datasets")
        if not isinstance(datasets, dict) or not datasets or any(
                not isinstance(d, dict) or "data" not in d for d in datasets.values()):
            raise ConfigError("--config: `datasets` maps names to {data: ROOT, weight: W}, e.g. "
                              "{cc12m: {data: s3://tokens/cc12m, weight: 0.8}, coco: {data: /data/coco}}")
        if "data" not in settings:  # --data (or a `data:` key) replaces the named datasets, weights included
            settings["data"] = [d["data"] for d in datasets.values()]
            settings.setdefault("data_weights", [float(d.get("weight", 1.0)) for d in datasets.values()])
    for name in ("modalities", "data", "data_weights"):
        if isinstance(settings.get(name), str):
            settings[name] = tuple(m.strip() for m in settings[name].split(",") if m.strip())
    if settings.get("data_weights") is not None:
        try:
            settings["data_weights"] = tuple(float(w) for w in settings["data_weights"])
        except ValueError:
            raise ConfigError(f"--data-weights {settings['data_weights']!r}: give numbers, e.g. 0.7,0.3") from None
    missing = [k for k in ("data", "modalities", "out") if k not in settings]
    if missing:
        raise ConfigError(f"omniforge train needs {', '.join('--' + k for k in missing)} (or those keys in --config)")
    return TrainConfig.from_dict(settings)


def summary(cfg: TrainConfig, result: TrainResult) -> str:
    """One line: steps, time, loss from first to last step run here, throughput, and where the outputs are."""
    if not result.losses:
        return f"{cfg.out} is already at step {result.steps} (nothing to train; raise --steps to continue)"
    first, last = result.losses[0], result.losses[-1]
    window = result.losses[-min(10, len(result.losses)):]
    tokens_s = sum(e["tokens_per_s"] for e in window) / len(window)
    held_out = ""
    if result.evals:
        held_out = f", held-out {result.evals[0]['loss']:.3f} -> {result.evals[-1]['loss']:.3f}"
        if len(result.evals) == 1:
            held_out = f", held-out {result.evals[0]['loss']:.3f}"
    return (f"trained {cfg.model} steps {first['step']}..{last['step']} in {result.seconds:.0f} s: loss "
            f"{first['loss']:.3f} -> {last['loss']:.3f}{held_out}, {tokens_s:,.0f} tokens/s; checkpoint "
            f"{latest_checkpoint(cfg.out)}, curve {os.path.join(cfg.out, 'loss.png')}")


def cmd_train(args: Any) -> int:
    cfg = config_from_args(args)
    result = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(cfg, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m omniforge.model.train ARGS`` = ``omniforge train ARGS`` (handy under torchrun)."""
    import argparse

    from omniforge.errors import OmniforgeError

    parser = argparse.ArgumentParser(prog="omniforge")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except OmniforgeError as e:
        print(f"omniforge train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

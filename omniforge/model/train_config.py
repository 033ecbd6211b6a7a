"""The 4M trainer's config: :class:`TrainConfig` (what to train and how, validated on construction) and
:func:`config_from_args` (``omniforge train`` flags over an optional ``--config`` model name or YAML file)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from omniforge.errors import ConfigError
from omniforge.model._cli import DTYPES, STRATEGIES
from omniforge.model._cli import TRAIN_FLAGS as _FLAGS
from omniforge.model.fm import model_config


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
    init_from: str | None = None  # released 4M checkpoint (hub layout) or omniforge checkpoint to start from

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
    def model_label(self) -> str:
        """What the logs call the model: the size name, or where --init-from took it from."""
        if self.init_from is None:
            return self.model
        return f"the model of {os.path.basename(os.path.normpath(self.init_from))}"

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

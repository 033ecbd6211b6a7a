"""What `omniforge tokenizer train` trains and how: `TokenizerTrainConfig`, and what a run returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniforge import storage
from omniforge.errors import ConfigError
from omniforge.modalities import all_modalities, get_modality
from omniforge.tokenize.crops import CropConfig
from omniforge.tokenize.kinds import SIZES

if TYPE_CHECKING:
    from omniforge.tokenize.kinds import TokenizerKind


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    """What to train and how. `data` is a label root (local or s3://); `out` is a local directory."""

    data: str  # label root holding <modality>/shard-*.tar and _status/<modality>/shard-*.parquet
    modality: str  # the label modality to train on; its tokenizer kind decides what is trained
    out: str  # tokenizers directory: the tokenizer lands in <out>/<tokenizer folder>/
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
    architecture: str = "omniforge"  # ViT VQ-VAE kinds: "omniforge" (its own) or "ml4m" (ml-4m's, exportable)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: pass the label root (--data ROOT)")
        if not self.out:
            raise ConfigError("out: pass the tokenizers directory (--out DIR)")
        if storage.is_s3(self.out):
            raise ConfigError(f"out: tokenizers are written to a local directory, got {self.out!r}")
        info = get_modality(self.modality)
        if not info.tokenized:
            trainable = ", ".join(m.name for m in all_modalities() if m.tokenized)
            raise ConfigError(f"modality: {self.modality!r} is label-only (no tokenizer); trainable modalities: "
                              f"{trainable}")
        artifact = self.kind.artifact
        if artifact.trained_by != self.modality:
            raise ConfigError(f"modality: {self.modality} is tokenized with the shared {artifact.folder} tokenizer, "
                              f"trained with --modality {artifact.trained_by}")
        from omniforge.tokenize.ml4m_train import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture: must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "ml4m":
            self.kind  # noqa: B018 - ConfigError now for a kind ml-4m's architecture does not train
        if self.size not in SIZES:
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
    def kind(self) -> TokenizerKind:
        """The tokenizer kind of the modality, bound to it."""
        from omniforge.tokenize.kinds import kind_for

        kind = kind_for(self.modality)
        if self.architecture == "ml4m":
            from omniforge.tokenize.ml4m_train import ML4MArchitecture

            return ML4MArchitecture(kind)
        return kind

    @property
    def name(self) -> str:
        """The tokenizer's name, and its folder under `out`."""
        return self.kind.artifact.folder

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

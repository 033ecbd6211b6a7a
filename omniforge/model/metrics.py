"""What the 4M trainer measures: the named metrics of a training step (:class:`StepMetrics`) and of a held-out
evaluation (:class:`EvalMetrics`), the loss over modalities (:func:`mean_loss`), and :class:`Layout`, which
packs a step's named tensors into one flat buffer so that they cross to the host (and between ranks) in one
transfer and are read back by name."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class Layout:
    """Named slots of one flat float64 buffer: ``Layout(loss=(), ce=(n,))`` holds a scalar then n values.

    :meth:`pack` concatenates tensors given by name (all on one device) in the layout's order;
    :meth:`unpack` reads a flat sequence back into ``{name: float | np.ndarray of the slot's shape}``.
    """

    def __init__(self, **shapes: tuple[int, ...]):
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.size = sum(math.prod(shape) for shape in self.shapes.values())

    def pack(self, **values: Any) -> torch.Tensor:
        """One (size,) float64 tensor of ``values`` (tensors, arrays or numbers of the slots' shapes)."""
        if set(values) != set(self.shapes):
            raise ValueError(f"Layout.pack: got {sorted(values)}, the layout holds {list(self.shapes)}")
        parts = []
        for name, shape in self.shapes.items():
            value = torch.as_tensor(values[name], dtype=torch.float64)
            if tuple(value.shape) != shape:
                raise ValueError(f"Layout.pack: {name} has shape {tuple(value.shape)}, the layout says {shape}")
            parts.append(value.reshape(-1))
        return torch.cat(parts)

    def unpack(self, flat: Sequence[float] | np.ndarray) -> dict[str, Any]:
        """``flat`` (size,) as ``{name: value}``: a float for a scalar slot, else an array of its shape."""
        flat = np.asarray(flat, dtype=np.float64)
        if flat.shape != (self.size,):
            raise ValueError(f"Layout.unpack: got {flat.shape[0] if flat.ndim == 1 else flat.shape} values, "
                             f"the layout holds {self.size}")
        out: dict[str, Any] = {}
        start = 0
        for name, shape in self.shapes.items():
            count = math.prod(shape)
            chunk = flat[start:start + count]
            out[name] = float(chunk[0]) if shape == () else chunk.reshape(shape)
            start += count
        return out


def mean_loss(ce_sums: Any, token_counts: Any) -> float:
    """The loss as training defines it: per modality, the mean cross-entropy over its target tokens; then the
    plain mean over the modalities that have any."""
    present = [s / c for s, c in zip(ce_sums, token_counts) if c > 0]
    return float(sum(present) / len(present)) if present else float("nan")


def per_modality(names: Sequence[str], sums: Sequence[float], counts: Sequence[float]) -> dict[str, float]:
    """``{modality: sum / count}`` for the modalities with a positive count, in ``names`` order."""
    return {m: float(sums[i] / counts[i]) for i, m in enumerate(names) if counts[i] > 0}


@dataclass
class StepMetrics:
    """One optimizer step, averaged over its micro-batches and all ranks: a line of log.jsonl."""

    step: int  # 1-based: the number of optimizer steps taken
    loss: float  # the mean of the micro-batch losses, averaged over ranks
    losses: dict[str, float]  # per modality: its loss averaged over the micro-batches that had its targets
    lr: float
    tokens_per_s: float  # encoder inputs + decoder targets of every rank, over the step's wall time
    grad_norm: float  # the global gradient norm before clipping
    dataset_losses: dict[str, float] | None = None  # with several data roots: the loss of each root's samples
    # with raw sequence folders: per folder, the units (boxes, metadata fields) its token budget cut this step
    budget_cuts: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The log.jsonl entry (``dataset_losses`` only when mixing roots, ``budget_cuts`` only with raw
        sequence folders)."""
        entry = {"step": self.step, "loss": self.loss, "losses": self.losses, "lr": self.lr,
                 "tokens_per_s": self.tokens_per_s, "grad_norm": self.grad_norm}
        if self.dataset_losses is not None:
            entry["dataset_losses"] = self.dataset_losses
        if self.budget_cuts is not None:
            entry["budget_cuts"] = self.budget_cuts
        return entry


@dataclass
class EvalMetrics:
    """One held-out evaluation: a line of eval.jsonl."""

    step: int  # the optimizer steps taken before it
    loss: float  # :func:`mean_loss` over the modalities
    losses: dict[str, float]  # per modality: the mean cross-entropy over its target tokens
    samples: int  # samples evaluated, over all ranks

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "losses": self.losses, "samples": self.samples}

    def line(self) -> str:
        """The progress line of this evaluation."""
        return (f"step {self.step}: held-out loss {self.loss:.4f} over {self.samples} samples ("
                + ", ".join(f"{m} {v:.3f}" for m, v in self.losses.items()) + ")")

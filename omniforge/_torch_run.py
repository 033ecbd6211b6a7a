"""What every omniforge training loop shares: torchrun set-up, device choice, the LR schedule, small
collectives and atomic text writes. Used by the tokenizer trainer and the 4M trainer alike."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from omniforge.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False  # this process called init_process_group (and must destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """The process group of a torchrun launch (WORLD_SIZE > 1): nccl on CUDA, gloo otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return Dist()
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def resolve_device(spec: str) -> torch.device:
    """`auto`, `cpu`, `cuda` (this rank's GPU under torchrun) or `cuda:N`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec} requested but CUDA is not available; pass --device cpu")
        if spec == "cuda":
            spec = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
        device = torch.device(spec)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def warmup_cosine(step: int, *, total: int, warmup: int, peak: float, final: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `peak`, then cosine to `final`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def all_reduce_sum(values: list[float], device: torch.device, d: Dist) -> list[float]:
    if d.world_size <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def write_text(path: str, text: str) -> None:
    """Write a local text file atomically (a temporary name, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def split_optimizer_state(state: dict, tensor_name: Callable[[Any, str], str]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """An optimizer state ({param key: {name: value}}) as safetensors tensors and JSON scalars (no pickles):
    tensors named `tensor_name(param key, name)`, on the CPU; scalars grouped by str(param key)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for key, param_state in state.items():
        for k, v in param_state.items():
            if torch.is_tensor(v):
                tensors[tensor_name(key, k)] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(key), {})[k] = v
    return tensors, scalars

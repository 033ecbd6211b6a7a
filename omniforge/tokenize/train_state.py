"""The tokenizer trainer's checkpoints: the servable tokenizer plus its training state, no pickles
(safetensors for tensors, JSON for the rest), so that a re-run continues from the next epoch.

    <out>/<name>/config.json, model.safetensors      the servable tokenizer (the kind's save)
    <out>/<name>/train_state.safetensors             optimizer tensors and the torch RNG
    <out>/<name>/train_state.json                    epoch, step, optimizer scalars, history, train config
    <out>/<name>/history.jsonl                       one line per epoch (entry 0: the untrained model)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import torch

from omniforge._torch_run import split_optimizer_state, write_text
from omniforge.errors import ConfigError
from omniforge.tokenize.kinds import TokenizerKind
from omniforge.tokenize.train_config import TokenizerTrainConfig

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
HISTORY = "history.jsonl"
STATE_FORMAT = 1


def has_state(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, STATE_JSON))


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epoch: int,
                    step: int, history: list[dict[str, Any]], cfg: TokenizerTrainConfig, kind: TokenizerKind) -> None:
    """The servable tokenizer, then the training state; train_state.json (written last) is the commit marker."""
    from safetensors.torch import save_file

    kind.save(model, directory)
    sd = optimizer.state_dict()
    tensors, scalars = split_optimizer_state(sd["state"], lambda idx, k: f"optimizer.{idx}.{k}")
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = os.path.join(directory, STATE_TENSORS + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(directory, STATE_TENSORS))
    meta = {"format": STATE_FORMAT, "name": cfg.name, "size": cfg.size, "epoch": epoch, "step": step,
            "param_groups": sd["param_groups"], "scalar_state": scalars, "history": history,
            "train_config": {k: v for k, v in asdict(cfg).items() if k not in ("crop",)} | {"crop": asdict(cfg.crop)}}
    write_text(os.path.join(directory, HISTORY), "".join(json.dumps(h) + "\n" for h in history))
    write_text(os.path.join(directory, STATE_JSON), json.dumps(meta, indent=1))  # last: the commit marker


def load_optimizer(optimizer: torch.optim.Optimizer, meta: dict[str, Any], tensors_path: str) -> None:
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


def resume(directory: str, expected_config: dict[str, Any], optimizer_for: Any, *, load: Any = None,
           architecture: str = "omniforge") -> tuple[torch.nn.Module, torch.optim.Optimizer, int, int,
                                                      list[dict[str, Any]]]:
    """(model, optimizer, epoch, step, history) of a saved run; ConfigError when it cannot continue it. `load`
    (directory -> model) rebuilds the saved model of `architecture` (TokenizerTrainConfig.architecture): an
    omniforge tokenizer by default."""
    from omniforge.tokenize.models import load_tokenizer

    with open(os.path.join(directory, STATE_JSON), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT:
        raise ConfigError(f"{directory}/{STATE_JSON} has an unknown format: pass --restart to start over")
    if meta.get("train_config", {}).get("architecture", "omniforge") != architecture:
        raise ConfigError(f"the tokenizer in {directory} was trained in another architecture: pass --restart to "
                          "start over, or the same --architecture")
    model = load(directory) if load is not None else load_tokenizer(directory, device="cpu")
    if getattr(model, "tokenizer_config", model.config).to_dict() != expected_config:
        raise ConfigError(f"the tokenizer in {directory} was trained with a different config "
                          f"(size {meta.get('size')!r}): pass --restart to start over, or --config "
                          f"{meta.get('size')}")
    optimizer = optimizer_for(model)
    load_optimizer(optimizer, meta, os.path.join(directory, STATE_TENSORS))
    return model, optimizer, int(meta["epoch"]), int(meta["step"]), list(meta["history"])

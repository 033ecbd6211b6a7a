"""Checkpoints of the 4M trainer: the one module that saves, resolves and loads them (train, resume,
``omniforge sample``, the Ray launcher, the demo and the tests all go through it).

Run directory ``<out>/`` (``TrainConfig.out``; on-disk format 1):

- ``checkpoint-<step>/``, written by :func:`save_checkpoint`:

  - ``model.safetensors``: the full (unsharded) model state dict;
  - ``optimizer.safetensors``: the optimizer's tensor state, named ``"<param fqn>::<state key>"``;
  - ``trainer_state.json``: ``format``, ``step``, ``world_size``, ``schedule`` (kind, total, warmup, peak,
    final, last_lr), ``optimizer`` (``param_groups`` and the non-tensor ``scalar_state``), ``data`` (the data
    position of every rank) and ``rng`` (python and numpy RNG of every rank);
  - ``rng.safetensors``: the torch CPU (``torch.<rank>``) and CUDA (``cuda.<rank>``) RNG of every rank;
  - ``config.json`` (:func:`run_config`): ``format``, ``train`` (the TrainConfig), ``model`` (the
    ModelConfig), ``specs`` (folder -> ModalitySpec fields), ``masking``, ``text_tokenizer`` (path or None)
    and ``parameters``: what :func:`load_model` needs to rebuild the model;
- ``latest``: JSON ``{"step": k, "path": "checkpoint-k"}``, written after the checkpoint is complete;
- ``log.jsonl`` (one line per step), ``eval.jsonl`` (one line per held-out evaluation), ``loss.png`` at the
  end and TensorBoard scalars under ``tb/``: see :mod:`omniforge.model.train_log`.

No pickles anywhere. Resuming from a checkpoint (:func:`load_training_state`) restores model, optimizer, data
position and RNG, so the losses of the remaining steps equal those of an uninterrupted run (bit for bit on
CPU).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from omniforge._torch_run import Dist, barrier, split_optimizer_state, write_text
from omniforge.errors import ConfigError, WeightsError
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.specs import ModalitySpec

if TYPE_CHECKING:
    from omniforge.model.masking import MaskingConfig
    from omniforge.model.train_config import TrainConfig

FORMAT = 1
LATEST = "latest"
CONFIG = "config.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
_SEP = "::"  # parameter names hold dots; optimizer tensor names are "<param fqn>::<state key>"
_HINT = "pass a training run directory (with `latest`) or one of its checkpoint-<step> directories"


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores, on one rank."""

    model: nn.Module  # the plain module whose (FSDP: sharded) parameters the optimizer holds, not a DDP wrapper
    optimizer: torch.optim.Optimizer
    loader: Any  # the data loader: state_dict() / load_state_dict() give and take this rank's data position
    dist: Dist
    device: torch.device


class LoadedModel(NamedTuple):
    """A checkpoint rebuilt for inference."""

    model: FourM  # in eval mode, on the requested device
    specs: dict[str, ModalitySpec]  # folder -> spec, in the model's order
    config: dict[str, Any]  # config.json (see the module docstring)


def run_config(cfg: TrainConfig, model_cfg: ModelConfig, specs: dict[str, ModalitySpec], masking: MaskingConfig,
               text_tokenizer: str | None, parameters: int) -> dict[str, Any]:
    """The content of every checkpoint's config.json."""
    return {"format": FORMAT, "train": cfg.to_dict(), "model": model_cfg.to_dict(),
            "specs": {m: asdict(s) for m, s in specs.items()}, "masking": asdict(masking),
            "text_tokenizer": text_tokenizer, "parameters": parameters}


# --------------------------------------------------------------------------------------------------
# Saving


def _state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _gather_objects(obj: Any, d: Dist) -> list[Any]:
    if d.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


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


def save_checkpoint(out: str, step: int, state: TrainState, *, schedule: dict[str, Any],
                    config: dict[str, Any]) -> str:
    """Write ``<out>/checkpoint-<step>/`` (rank 0), then the ``latest`` pointer; returns the directory.

    ``schedule`` is recorded in trainer_state.json, ``config`` (:func:`run_config`) becomes config.json.
    Every rank must call it (it gathers state from all of them).
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    d = state.dist
    name = f"checkpoint-{step}"
    directory = os.path.join(out, name)
    model_sd = get_model_state_dict(state.model, options=_state_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(state.model, state.optimizer, options=_state_options(cpu_offload=True))
    rng = _rng_state(state.device)
    rng_all = _gather_objects({"torch": rng["torch"], "cuda": rng.get("cuda"),
                               "json": _json_rng(rng["python"], rng["numpy"])}, d)
    data_all = _gather_objects(state.loader.state_dict(), d)
    if not d.main:
        barrier(d)
        return directory
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model_sd.items()}, os.path.join(directory, MODEL_FILE))
    tensors, scalars = split_optimizer_state(optim_sd["state"], lambda fqn, k: f"{fqn}{_SEP}{k}")
    save_file(tensors, os.path.join(directory, OPTIM_FILE))
    rng_tensors = {f"torch.{r}": s["torch"] for r, s in enumerate(rng_all)}
    rng_tensors.update({f"cuda.{r}": s["cuda"] for r, s in enumerate(rng_all) if s["cuda"] is not None})
    save_file(rng_tensors, os.path.join(directory, RNG_FILE))
    meta = {"format": FORMAT, "step": step, "world_size": d.world_size, "schedule": schedule,
            "optimizer": {"param_groups": optim_sd["param_groups"], "scalar_state": scalars},
            "data": data_all, "rng": [s["json"] for s in rng_all]}
    write_text(os.path.join(directory, STATE_FILE), json.dumps(meta))
    write_text(os.path.join(directory, CONFIG), json.dumps(config, indent=1))
    write_text(os.path.join(out, LATEST), json.dumps({"step": step, "path": name}) + "\n")
    barrier(d)
    return directory


# --------------------------------------------------------------------------------------------------
# Resolving


def _pointer(out: str, error: type[Exception], hint: str) -> str | None:
    """The directory ``<out>/latest`` names; None without a pointer; ``error`` when it is unreadable."""
    path = os.path.join(out, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            target = json.load(f)["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path} is not a checkpoint pointer ({type(e).__name__}: {e}): {hint}") from None
    return os.path.join(out, str(target))


def latest_checkpoint(out: str) -> str | None:
    """The checkpoint a run in ``out`` resumes from: the complete directory ``<out>/latest`` names, or None
    when the run has none yet. ConfigError when the pointer is unreadable or names an incomplete directory."""
    path = os.path.join(out, LATEST)
    directory = _pointer(out, ConfigError, f"delete {path} to start over")
    if directory is not None and not os.path.exists(os.path.join(directory, STATE_FILE)):
        raise ConfigError(f"{path} points to {directory}, which is incomplete: delete {path} to start over")
    return directory


def checkpoint_step(directory: str | None) -> int:
    """The step a checkpoint directory (from :func:`latest_checkpoint`) was saved at; 0 for None (no checkpoint)."""
    if directory is None:
        return 0
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
        return int(json.load(f)["step"])


def resolve_checkpoint(path: str) -> str:
    """The checkpoint directory of ``path`` for inference: ``path`` itself when it holds model.safetensors (a
    ``checkpoint-<step>`` directory), else the one its ``latest`` pointer names (a run directory).
    WeightsError saying what to pass otherwise."""
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    if not os.path.isdir(path):
        raise WeightsError(f"checkpoint {path} does not exist: {_HINT}")
    directory = _pointer(path, WeightsError, _HINT)
    if directory is None:
        raise WeightsError(f"{path} holds neither {MODEL_FILE} nor a `{LATEST}` pointer: {_HINT}")
    if not os.path.isfile(os.path.join(directory, MODEL_FILE)):
        raise WeightsError(f"{os.path.join(path, LATEST)} points to {directory}, which has no {MODEL_FILE}: {_HINT}")
    return directory


# --------------------------------------------------------------------------------------------------
# Loading


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


def load_training_state(directory: str, state: TrainState) -> int:
    """Restore a checkpoint directory (see :func:`latest_checkpoint`) into ``state``: model, optimizer, this
    rank's data position and RNG. Returns the step it was saved at. Every rank calls it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    d = state.dist
    with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    if meta["world_size"] != d.world_size:
        raise ConfigError(f"{directory} was saved by {meta['world_size']} ranks, this run has "
                          f"{d.world_size}: resume with the same number of processes")
    set_model_state_dict(state.model, load_file(os.path.join(directory, MODEL_FILE)), options=_state_options())
    optim: dict[str, dict[str, Any]] = {}
    for name, value in load_file(os.path.join(directory, OPTIM_FILE)).items():
        fqn, k = name.rsplit(_SEP, 1)
        optim.setdefault(fqn, {})[k] = value
    for fqn, scalars in meta["optimizer"]["scalar_state"].items():
        optim.setdefault(fqn, {}).update(scalars)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g)
              for g in meta["optimizer"]["param_groups"]]
    set_optimizer_state_dict(state.model, state.optimizer, {"state": optim, "param_groups": groups},
                             options=_state_options())
    state.loader.load_state_dict(meta["data"][d.rank])
    _set_rng(load_file(os.path.join(directory, RNG_FILE)), meta, d.rank, state.device)
    return int(meta["step"])


def load_model(path: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint for inference (``omniforge sample``, tests): ``path`` is a released 4M checkpoint
    in ml-4m's hub layout (:mod:`omniforge.model.ml4m`; config gets ``"released": path``), a run directory (its
    latest checkpoint) or a ``checkpoint-<step>`` directory holding model.safetensors and config.json
    ({"model": ModelConfig fields, "specs": {folder: ModalitySpec fields}, ...}). WeightsError naming the file
    and the fix when either is missing, unreadable or the two disagree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from omniforge.model.ml4m import is_released, load_released

    if is_released(path):  # a released 4M / 4M-21 checkpoint in ml-4m's hub layout
        released = load_released(path, device=device)
        config = {"format": FORMAT, "model": released.model.config.to_dict(),
                  "specs": {m: asdict(s) for m, s in released.released.specs.items()}, "text_tokenizer": None,
                  "released": path}
        return LoadedModel(released.model, dict(released.released.specs), config)
    directory = resolve_checkpoint(path)
    config_path = os.path.join(directory, CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        model_cfg = ModelConfig.from_dict(config["model"])
        specs = {folder: ModalitySpec(**{"name": folder, **fields}) for folder, fields in config["specs"].items()}
    except FileNotFoundError:
        raise WeightsError(f"checkpoint {directory} has no {CONFIG}: it was not written by `omniforge train`; "
                           f"{_HINT}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"checkpoint config {config_path} is invalid ({type(e).__name__}: {e}); "
                           "it should hold {\"model\": ModelConfig fields, \"specs\": {folder: ModalitySpec fields}}"
                           ) from None
    weights_path = os.path.join(directory, MODEL_FILE)
    try:
        weights = load_file(weights_path, device="cpu")
    except (OSError, SafetensorError, ValueError) as e:
        raise WeightsError(f"checkpoint weights {weights_path} cannot be read ({e})") from None
    model = FourM(model_cfg, specs)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise WeightsError(f"checkpoint weights {weights_path} do not match its config.json ({first})") from None
    return LoadedModel(model.to(device).eval(), specs, config)

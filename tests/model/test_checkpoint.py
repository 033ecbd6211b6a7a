"""The checkpoint module on its own: a save restores model, optimizer, data position and every RNG exactly;
a run directory and a checkpoint directory resolve to the same checkpoint; bad paths and pointers fail with
the error type and the fix."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from omniforge._torch_run import Dist
from omniforge.errors import ConfigError, WeightsError
from omniforge.model.checkpoint import (TrainState, checkpoint_step, latest_checkpoint, load_model,
                                        load_training_state, resolve_checkpoint, run_config, save_checkpoint)
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.masking import MaskingConfig
from omniforge.model.specs import ModalitySpec
from omniforge.model.train_config import TrainConfig

IMG, SEQ = "tok_depth@224", "tok_caption"
SPECS = {IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=32, grid=4),
         SEQ: ModalitySpec(name=SEQ, kind="sequence", num_tokens=7, vocab_size=100)}
MODEL = ModelConfig(dim=32, encoder_depth=1, decoder_depth=1, heads=2)


class _Position:
    """A data position as the token loader gives it: state_dict() / load_state_dict()."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {"epoch": 0, "shards": [], "offset": 0})

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = FourM(MODEL, SPECS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    return TrainState(model=model, optimizer=optimizer, loader=_Position(), dist=Dist(), device=torch.device("cpu"))


def _step(state: TrainState) -> None:
    """A deterministic optimizer step that gives every parameter a gradient (and Adam moments)."""
    loss = sum(((p - 0.1) ** 2).sum() for p in state.model.parameters())
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


def _config(out: str, model: FourM) -> dict:
    cfg = TrainConfig(data="/tokens", modalities=tuple(SPECS), out=out)
    return run_config(cfg, MODEL, SPECS, MaskingConfig.uniform(list(SPECS)), None, model.num_parameters())


def _save(out: str, state: TrainState, step: int) -> str:
    return save_checkpoint(out, step, state, schedule={"kind": "warmup_cosine", "last_lr": 1e-2},
                           config=_config(out, state.model))


def test_resume_restores_model_optimizer_data_and_rng(tmp_path):
    out = str(tmp_path / "run")
    saved = _state(0)
    for _ in range(2):
        _step(saved)
    saved.loader.state = {"epoch": 1, "shards": [2, 0, 1], "offset": 17}
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    directory = _save(out, saved, 2)
    draws = (random.random(), float(np.random.rand()), torch.rand(3))  # what the saved RNG gives next

    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                             "rng.safetensors", "trainer_state.json"]
    assert json.loads((tmp_path / "run" / "latest").read_text()) == {"step": 2, "path": "checkpoint-2"}
    assert latest_checkpoint(out) == directory and checkpoint_step(directory) == 2

    resumed = _state(1)  # other initial weights, no optimizer state, another data position and RNG
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert load_training_state(directory, resumed) == 2
    assert (random.random(), float(np.random.rand())) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert resumed.loader.state == {"epoch": 1, "shards": [2, 0, 1], "offset": 17}
    for (ka, a), (kb, b) in zip(saved.model.state_dict().items(), resumed.model.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    a_opt, b_opt = saved.optimizer.state_dict(), resumed.optimizer.state_dict()
    # (torch's full-state-dict loading hands betas back as a list: the same numbers)
    assert a_opt["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in b_opt["param_groups"]]
    assert a_opt["state"].keys() == b_opt["state"].keys()
    for i, param_state in a_opt["state"].items():
        for k, v in param_state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b_opt["state"][i][k])), (i, k)
    # so the next step is the same on both
    _step(saved), _step(resumed)
    for a, b in zip(saved.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_run_and_checkpoint_directories_load_the_same_model(tmp_path):
    out = str(tmp_path / "run")
    state = _state(0)
    _step(state)
    first = _save(out, state, 1)
    _step(state)
    second = _save(out, state, 2)
    assert resolve_checkpoint(out) == second and resolve_checkpoint(first) == first
    for path in (out, second):
        model, specs, config = load_model(path)
        assert not model.training and specs == SPECS and config["train"]["modalities"] == [IMG, SEQ]
        for k, v in state.model.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    older = load_model(first).model
    assert not all(torch.equal(older.state_dict()[k], v) for k, v in state.model.state_dict().items())


def test_resume_refuses_another_format_or_world_size(tmp_path):
    out = str(tmp_path / "run")
    directory = _save(out, _state(0), 1)
    path = os.path.join(directory, "trainer_state.json")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump({**meta, "world_size": 2}, f)
    with pytest.raises(ConfigError, match="saved by 2 ranks.*same number of processes"):
        load_training_state(directory, _state(0))
    with open(path, "w") as f:
        json.dump({**meta, "format": 9}, f)
    with pytest.raises(ConfigError, match="format 9 is not 1"):
        load_training_state(directory, _state(0))


def test_bad_paths_and_pointers_say_what_to_pass(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert latest_checkpoint(str(run)) is None and checkpoint_step(None) == 0  # a fresh run starts at 0
    with pytest.raises(WeightsError, match="does not exist: pass a training run directory"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="neither model.safetensors nor a `latest` pointer"):
        resolve_checkpoint(str(run))

    (run / "latest").write_text("{not json")
    with pytest.raises(ConfigError, match="not a checkpoint pointer.*delete .*latest to start over"):
        latest_checkpoint(str(run))
    with pytest.raises(WeightsError, match="not a checkpoint pointer.*checkpoint-<step>"):
        resolve_checkpoint(str(run))

    (run / "latest").write_text(json.dumps({"step": 4, "path": "checkpoint-4"}))
    (run / "checkpoint-4").mkdir()  # a save that died before its files
    with pytest.raises(ConfigError, match="incomplete: delete"):
        latest_checkpoint(str(run))
    with pytest.raises(WeightsError, match="which has no model.safetensors"):
        load_model(str(run))

"""The trainer's named metrics: a Layout packs named tensors into one buffer and reads them back by name;
step and evaluation metrics become the log lines."""

import json

import numpy as np
import pytest
import torch

from omniforge.model.metrics import EvalMetrics, Layout, StepMetrics, mean_loss, per_modality


def test_layout_round_trips_by_name():
    layout = Layout(norm=(), ce=(3,), roots=(2, 3), empty=(0, 3))
    assert layout.size == 1 + 3 + 6
    ce, roots = torch.tensor([1.5, 2.5, 3.5]), torch.arange(6, dtype=torch.float32).reshape(2, 3)
    flat = layout.pack(norm=torch.tensor(0.25), ce=ce, roots=roots, empty=torch.zeros(0, 3))
    assert flat.dtype == torch.float64 and flat.shape == (10,)
    out = layout.unpack(flat.tolist())
    assert out["norm"] == 0.25 and isinstance(out["norm"], float)
    assert np.array_equal(out["ce"], ce.numpy()) and np.array_equal(out["roots"], roots.numpy())
    assert out["empty"].shape == (0, 3)
    # host values pack the same way, in the layout's order whatever the keyword order
    again = layout.pack(empty=np.zeros((0, 3)), roots=roots.numpy(), ce=[1.5, 2.5, 3.5], norm=0.25)
    assert torch.equal(again, flat)


def test_layout_refuses_other_names_and_shapes():
    layout = Layout(loss=(), ce=(2,))
    with pytest.raises(ValueError, match="holds"):
        layout.pack(loss=1.0)
    with pytest.raises(ValueError, match="ce has shape"):
        layout.pack(loss=1.0, ce=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="holds 3"):
        layout.unpack([1.0, 2.0])


def test_losses_over_modalities():
    # per modality the mean over its target tokens, then the plain mean over modalities that have tokens
    assert mean_loss([6.0, 3.0, 0.0], [3.0, 1.0, 0.0]) == pytest.approx((2.0 + 3.0) / 2)
    assert np.isnan(mean_loss([0.0], [0.0]))
    assert per_modality(["a", "b", "c"], np.array([6.0, 0.0, 3.0]), np.array([3.0, 0.0, 1.0])) == {"a": 2.0, "c": 3.0}


def test_metrics_become_the_log_lines():
    step = StepMetrics(step=3, loss=2.5, losses={"tok_depth@224": 2.0}, lr=1e-3, tokens_per_s=100.0, grad_norm=0.5)
    assert list(step.to_dict()) == ["step", "loss", "losses", "lr", "tokens_per_s", "grad_norm"]
    step.dataset_losses = {"/a": 2.0, "/b": 3.0}
    assert step.to_dict()["dataset_losses"] == {"/a": 2.0, "/b": 3.0}
    assert json.loads(json.dumps(step.to_dict())) == step.to_dict()
    held_out = EvalMetrics(step=4, loss=1.25, losses={"tok_depth@224": 1.0, "tok_caption": 1.5}, samples=8)
    assert held_out.to_dict() == {"step": 4, "loss": 1.25, "losses": {"tok_depth@224": 1.0, "tok_caption": 1.5},
                                  "samples": 8}
    assert held_out.line() == "step 4: held-out loss 1.2500 over 8 samples (tok_depth@224 1.000, tok_caption 1.500)"

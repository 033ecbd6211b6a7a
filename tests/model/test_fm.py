"""FourM on hand-built batches in the shared format: shapes, what each part can see, and that it learns."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from omniforge.errors import ConfigError
from omniforge.model.fm import MODEL_CONFIGS, FourM, ModelConfig, model_config
from omniforge.model.specs import ModalitySpec, specs_for

IMG, SEQ, GLB = "tok_rgb@224", "tok_caption", "tok_dinov2_global"
SPECS = {
    IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=32, grid=4),
    SEQ: ModalitySpec(name=SEQ, kind="sequence", num_tokens=7, vocab_size=40),  # rows of 2 * (7 + 1) = 16
    GLB: ModalitySpec(name=GLB, kind="global", num_tokens=16, vocab_size=24),
}
SEQ_BUDGET = SPECS[SEQ].num_tokens + 1  # targets of a sequence start at this position


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _subset(spec: ModalitySpec, n_in: int, n_tgt: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample of an image/global modality: a random n_in positions as input, n_tgt others as targets."""
    perm = torch.randperm(spec.num_tokens, generator=gen)
    input_mask = torch.ones(spec.num_tokens, dtype=torch.bool)
    target_mask = torch.ones(spec.num_tokens, dtype=torch.bool)
    input_mask[perm[:n_in]] = False
    target_mask[perm[n_in:n_in + n_tgt]] = False
    return {"tensor": torch.randint(0, spec.vocab_size, (spec.num_tokens,), generator=gen),
            "input_mask": input_mask, "target_mask": target_mask,
            "decoder_attention_mask": torch.zeros(spec.num_tokens, dtype=torch.int)}


def _span(spec: ModalitySpec, n_in: int, n_tgt: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample of a sequence modality: input at [0, n_in), targets at [budget, budget + n_tgt)."""
    length = spec.seq_len
    tensor = torch.zeros(length, dtype=torch.long)
    tensor[:n_in] = torch.randint(4, spec.vocab_size, (n_in,), generator=gen)
    tensor[SEQ_BUDGET:SEQ_BUDGET + n_tgt] = torch.randint(4, spec.vocab_size, (n_tgt,), generator=gen)
    input_mask = torch.ones(length, dtype=torch.bool)
    target_mask = torch.ones(length, dtype=torch.bool)
    input_mask[:n_in] = False
    target_mask[SEQ_BUDGET:SEQ_BUDGET + n_tgt] = False
    attention = (~target_mask).int()
    return {"tensor": tensor, "input_mask": input_mask, "target_mask": target_mask,
            "decoder_attention_mask": attention}


def _stack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def make_batch(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """3 samples with different input/target counts; sample 2 has no caption at all (all masked)."""
    gen = torch.Generator().manual_seed(seed)
    img = [_subset(SPECS[IMG], n_in, n_tgt, gen) for n_in, n_tgt in [(5, 6), (2, 9), (8, 3)]]
    seq = [_span(SPECS[SEQ], n_in, n_tgt, gen) for n_in, n_tgt in [(4, 5), (6, 3), (0, 0)]]
    glb = [_subset(SPECS[GLB], n_in, n_tgt, gen) for n_in, n_tgt in [(3, 4), (0, 7), (1, 2)]]
    return {IMG: _stack(img), SEQ: _stack(seq), GLB: _stack(glb)}


def clone(batch):
    return {m: {k: v.clone() for k, v in d.items()} for m, d in batch.items()}


def tiny_model(**overrides) -> FourM:
    torch.manual_seed(0)
    return FourM(replace(model_config("tiny"), **overrides), SPECS).eval()


def targets(d: dict[str, torch.Tensor], sample: int) -> torch.Tensor:
    return (~d["target_mask"][sample]).nonzero().flatten()


# ---- config ------------------------------------------------------------------------------------------

def test_configs():
    assert set(MODEL_CONFIGS) >= {"tiny", "B", "L", "XL"}
    b = model_config("B")
    assert (b.dim, b.encoder_depth, b.decoder_depth, b.heads) == (768, 12, 12, 12)
    assert ModelConfig.from_dict(b.to_dict()) == b
    b.dim = 1  # a copy: the registry is untouched
    assert MODEL_CONFIGS["B"].dim == 768
    with pytest.raises(ConfigError, match="valid names"):
        model_config("huge")
    with pytest.raises(ConfigError, match="heads"):
        ModelConfig(dim=64, encoder_depth=1, decoder_depth=1, heads=3)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**b.to_dict(), "depth": 3})


def test_base_parameter_count():
    specs = specs_for([IMG, SEQ], text_vocab_size=30_000)
    with torch.device("meta"):
        model = FourM(model_config("B"), specs)
    d, v_img, v_txt = 768, specs[IMG].vocab_size, 30_000
    blocks = 12 * 12 * d * d + 12 * 16 * d * d  # encoder: attn 4d^2 + mlp 8d^2; decoder adds cross-attn 4d^2
    embeddings = 2 * v_img * d + 3 * v_txt * d  # rgb: input + head; caption: input, decoder input, head
    expected = blocks + embeddings
    assert 0.95 * expected < model.num_parameters() < 1.05 * expected


# ---- shapes ------------------------------------------------------------------------------------------

def test_forward_shapes_and_losses():
    model = tiny_model()
    batch = make_batch()
    loss, losses = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(losses) == {IMG, SEQ, GLB}
    assert torch.allclose(loss, torch.stack(list(losses.values())).mean())
    # untrained, each loss is near the uniform guess
    for m, value in losses.items():
        assert abs(value.item() - math.log(SPECS[m].vocab_size)) < 1.5
    loss.backward()

    # a modality without any target in the batch has no loss and does not count in the mean
    batch[GLB]["target_mask"][:] = True
    _, losses = model(batch)
    assert set(losses) == {IMG, SEQ}

    logits = model.decoder_logits(make_batch())
    assert logits[IMG].shape == (3, 9, 32)  # max target count over the batch
    assert logits[SEQ].shape == (3, 5, 40)
    full = model.decoder_logits(make_batch(), scatter=True)
    assert full[SEQ].shape == (3, 16, 40)
    b = make_batch()
    pos = targets(b[IMG], 1)
    torch.testing.assert_close(full[IMG][1, pos], logits[IMG][1, :len(pos)])
    others = b[IMG]["target_mask"][1]
    assert (full[IMG][1, others] == 0).all()


def test_swiglu_no_bias_variant():
    model = tiny_model(swiglu=True, bias=False)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    loss, _ = model(make_batch())
    assert torch.isfinite(loss)


def test_batch_padding_does_not_leak():
    """Each sample's logits are the same alone as inside a batch with different token counts."""
    model = tiny_model()
    batch = make_batch()
    together = model.decoder_logits(batch, scatter=True)
    for i in range(3):
        alone = model.decoder_logits({m: {k: v[i:i + 1] for k, v in d.items()} for m, d in batch.items()},
                                     scatter=True)
        for m in alone:
            torch.testing.assert_close(alone[m][0], together[m][i], atol=1e-5, rtol=1e-4)


def test_no_visible_input_is_finite():
    model = tiny_model()
    batch = make_batch()
    for d in batch.values():
        d["input_mask"][0] = True
    loss, _ = model(batch)
    assert torch.isfinite(loss)


# ---- what the encoder sees ---------------------------------------------------------------------------

@torch.no_grad()
def test_encoder_sees_only_inputs():
    model = tiny_model()
    batch = make_batch()
    ref = model.encode(batch)
    changed = clone(batch)
    for m, d in changed.items():  # every non-input position: targets and positions that are neither
        hidden = d["input_mask"]
        d["tensor"][hidden] = (d["tensor"][hidden] + 1) % SPECS[m].vocab_size
    out = model.encode(changed)
    torch.testing.assert_close(out.context, ref.context)
    assert torch.equal(out.padding, ref.padding)

    changed = clone(batch)
    pos = (~batch[IMG]["input_mask"][0]).nonzero()[0, 0]
    changed[IMG]["tensor"][0, pos] = (changed[IMG]["tensor"][0, pos] + 1) % SPECS[IMG].vocab_size
    out = model.encode(changed)
    assert not torch.allclose(out.context[0], ref.context[0])
    torch.testing.assert_close(out.context[1:], ref.context[1:])


# ---- what the decoder sees ---------------------------------------------------------------------------

@torch.no_grad()
def test_sequence_targets_are_causal():
    model = tiny_model()
    batch = make_batch()
    ref = model.decoder_logits(batch)[SEQ]
    pos = targets(batch[SEQ], 0)  # 5 targets
    t = 2
    changed = clone(batch)
    changed[SEQ]["tensor"][0, pos[t + 1:]] = 5  # tokens after t
    out = model.decoder_logits(changed)[SEQ]
    torch.testing.assert_close(out[0, :t + 1], ref[0, :t + 1])
    assert not torch.allclose(out[0, t + 2:], ref[0, t + 2:])  # teacher forcing: later logits read them

    changed = clone(batch)
    changed[SEQ]["tensor"][0, pos[t]] = 6  # the token at t itself is not visible at t
    out = model.decoder_logits(changed)[SEQ]
    torch.testing.assert_close(out[0, :t + 1], ref[0, :t + 1])
    assert not torch.allclose(out[0, t + 1], ref[0, t + 1])


@torch.no_grad()
def test_image_targets_do_not_read_target_ids():
    model = tiny_model()
    batch = make_batch()
    ref = model.decoder_logits(batch)
    changed = clone(batch)
    for m, d in changed.items():  # change every target id of every modality
        tgt = ~d["target_mask"]
        d["tensor"][tgt] = (d["tensor"][tgt] + 7) % SPECS[m].vocab_size
    out = model.decoder_logits(changed)
    torch.testing.assert_close(out[IMG], ref[IMG])
    torch.testing.assert_close(out[GLB], ref[GLB])
    assert not torch.allclose(out[SEQ], ref[SEQ])


@torch.no_grad()
def test_decoder_self_attention_is_per_modality():
    """Which positions another modality predicts does not change this modality's logits; the positions
    this modality predicts do (bidirectional attention among its own targets)."""
    model = tiny_model()
    batch = make_batch()
    ref = model.decoder_logits(batch, scatter=True)  # (B, L, V): zeros off the targets, no padding rows
    changed = clone(batch)
    changed[GLB]["target_mask"] = ~changed[GLB]["input_mask"]  # a different target set: every non-input
    changed[SEQ]["target_mask"][0] = True  # sample 0 loses its caption targets
    out = model.decoder_logits(changed, scatter=True)
    torch.testing.assert_close(out[IMG], ref[IMG])

    changed = clone(batch)
    drop = targets(batch[IMG], 0)[-1]
    changed[IMG]["target_mask"][0, drop] = True  # one fewer image target in sample 0
    out = model.decoder_logits(changed, scatter=True)[IMG]
    kept = targets(changed[IMG], 0)
    assert not torch.allclose(out[0, kept], ref[IMG][0, kept])
    torch.testing.assert_close(out[1:], ref[IMG][1:])


# ---- learning ----------------------------------------------------------------------------------------

def test_learns_a_deterministic_mapping():
    """Depth tokens are a fixed permutation of the rgb tokens, shifted in value: the model, seeing all of
    rgb, must learn to predict every depth token through cross-attention."""
    src, dst = "tok_rgb@224", "tok_depth@224"
    vocab, n = 8, 16
    specs = {m: ModalitySpec(name=m, kind="image", num_tokens=16, vocab_size=vocab, grid=4) for m in (src, dst)}
    torch.manual_seed(0)
    model = FourM(model_config("tiny"), specs)
    # 4M's 0.02 token init sits far below the unit-scale sin-cos positions; a tiny model then needs
    # thousands of steps before tokens matter. Unit-scale input tokens keep this test at a few seconds.
    for table in model.encoder_tokens.values():
        torch.nn.init.normal_(table.weight, std=1.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n, 16), generator=gen)
    perm = torch.randperm(16, generator=gen)
    y = (x[:, perm] + 3) % vocab
    given = torch.zeros(n, 16, dtype=torch.bool)
    hidden = torch.ones(n, 16, dtype=torch.bool)
    zeros = torch.zeros(n, 16, dtype=torch.int)
    batch = {src: {"tensor": x, "input_mask": given, "target_mask": hidden, "decoder_attention_mask": zeros},
             dst: {"tensor": y, "input_mask": hidden, "target_mask": given, "decoder_attention_mask": zeros}}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(200):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0]


def test_no_host_sync_once_the_blocks_run():
    """Every op that makes the host wait for the device (reading a value, nonzero, boolean indexing) runs
    before the first attention: on a GPU the encoder, decoder and loss are then queued without a stall."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "item"}
    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if "scaled_dot_product" in name:
                ops.append("attention")
            elif name in syncing or (name == "index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
                ops.append(name)
            return out

    model = tiny_model().train()
    with Record():
        loss, _ = model(make_batch())
    assert "attention" in ops and any(op != "attention" for op in ops), ops
    first = ops.index("attention")
    assert all(op == "attention" for op in ops[first:]), ops

"""omniforge's sampler against ml-4m's own generation functions (tests/fixtures/ml4m_generate/expected.json, made
by make_fixtures.py in that folder): token and temperature schedules, top-k / top-p, the distribution drawn
from, classifier-free guidance and the conditions it drops, and ml-4m's sequence convention; then the same
conventions inside `generate` on a tiny random FourM."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.sample import (SampleConfig, drop_condition, filter_logits, generate, guidance_drops,
                                    guided_logits, multi_guided_logits, temperature_schedule, token_distribution,
                                    token_schedule)
from omniforge.model.specs import ModalitySpec
from _helpers import random_ids, tiny_fourm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ml4m_generate", "expected.json")


@pytest.fixture(scope="module")
def expected() -> dict:
    with open(FIXTURES) as f:
        return json.load(f)


def _tensor(rows) -> torch.Tensor:
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float32)


# ------------------------------------------------------------------------------------------ schedules

def test_token_schedules_are_ml4ms(expected):
    for case in expected["token_schedules"]:
        n, steps = case["tokens"], case["steps"]
        assert token_schedule(n, steps, "linear") == case["linear"], case
        ours, theirs = token_schedule(n, steps, "cosine"), case["cosine"]
        if min(theirs) >= 0:
            assert ours == theirs, case
            continue
        # ml-4m over-fills the rounds before a negative last one (its topk then fails): omniforge takes the excess
        # off the latest rounds, and nothing else changes
        assert sum(ours) == n and ours[-1] == 0 and len(ours) == steps
        j = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)  # the first round changed
        assert 0 <= ours[j] < theirs[j] and not any(ours[j + 1:])  # emptied from the end back to round j


def _ml4m_config(args: dict, i: int) -> SampleConfig:
    scheme = args["autoregression_schemes"][i]
    return SampleConfig(temperature=args["temps"][i], temperature_schedule=args["temp_schedules"][i],
                        steps=args["decoding_steps"][i] or 1, guidance_scale=args["cfg_scales"][i],
                        order="random" if scheme == "roar" else "maskgit",
                        # ml-4m's ROAR ignores the token schedule it is given (always linear): None says the same
                        schedule=None if scheme == "roar" else args["token_decoding_schedules"][i])


def test_chained_schedules_are_ml4ms(expected):
    """Per step of ml-4m's build_chained_generation_schedules: the tokens, the temperature (with its zip
    truncation), the guidance scale, and the conditions the unconditional pass drops."""
    checked = 0
    for case in expected["chains"]:
        args = case["args"]
        targets = args["target_domains"]
        for i in range(len(targets)):
            steps = [s for s in case["steps"] if s[0] == i]
            cfg = _ml4m_config(args, i)
            assert guidance_drops([*args["cond_domains"], *targets[:i]], args["cond_domains"],
                                  grow=args["cfg_grow_conditioning"]) == case["drops"][i]
            if args["autoregression_schemes"][i] == "autoregressive":  # one entry: the constant temperature
                assert [(s[2], s[3], s[4]) for s in steps] == [(None, cfg.temperature, cfg.guidance_scale)]
                continue
            ml4m_counts = [s[2] for s in steps]
            n = args["tokens_per_target"][i]
            if min(ml4m_counts) < 0:  # a split ml-4m cannot run (test_token_schedules_are_ml4ms)
                continue
            counts = token_schedule(n, cfg.steps, cfg.token_order_schedule)
            assert counts == ml4m_counts, (args, i)
            temps = temperature_schedule(cfg.temperature, counts, cfg.temperature_schedule)
            assert temps == pytest.approx([s[3] for s in steps], rel=1e-12, abs=0), (args, i)
            assert all(s[4] == cfg.guidance_scale for s in steps)
            checked += 1
    assert checked > 200


def test_roar_defaults_to_the_linear_schedule():
    assert SampleConfig(order="random").token_order_schedule == "linear"
    assert SampleConfig().token_order_schedule == "cosine"
    assert SampleConfig(order="random", schedule="cosine").token_order_schedule == "cosine"  # asked for


# ------------------------------------------------------------------------------------------- filtering

def _same_filter(ours: torch.Tensor, theirs: list) -> None:
    theirs_t = torch.tensor([[-math.inf if v == "-inf" else v for v in r] for r in theirs], dtype=torch.float32)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs_t))
    assert torch.equal(ours[~torch.isinf(ours)], theirs_t[~torch.isinf(theirs_t)])


def test_top_k_top_p_filtering_is_ml4ms(expected):
    n = 0
    for group in expected["filtering"]:
        logits = _tensor(group["logits"])
        for case in group["cases"]:
            _same_filter(filter_logits(logits, top_k=case["top_k"], top_p=case["top_p"]), case["filtered"])
            n += 1
    assert n == 44


def test_top_k_fraction_that_keeps_nothing_is_refused():
    with pytest.raises(ConfigError, match="keeps no token"):
        filter_logits(torch.zeros(1, 12), top_k=0.05)


def test_drawn_distribution_is_ml4ms(expected):
    """ml-4m's sample_tokens: the probability it reports for each drawn id (what MaskGIT ranks by) is that id's
    probability under omniforge's token_distribution; a temperature ml-4m calls zero draws the argmax."""
    logits = _tensor(expected["sampling"]["logits"])
    for case in expected["sampling"]["cases"]:
        ids = torch.tensor(case["ids"])
        if case["temperature"] <= 1e-10:
            assert torch.equal(ids, logits.argmax(dim=-1))
            cfg = SampleConfig(temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"])
            from omniforge.model.sample import _draw

            ours, _ = _draw(logits, case["temperature"], cfg, torch.Generator().manual_seed(0))
            assert torch.equal(ours, ids)
            continue
        probs = token_distribution(logits, case["temperature"], top_k=case["top_k"], top_p=case["top_p"])
        got = probs.gather(-1, ids[:, None])[:, 0]
        assert torch.allclose(got, torch.tensor(case["probs"]), rtol=1e-5, atol=1e-7), case


# -------------------------------------------------------------------------------------------- guidance

def test_guided_logits_are_ml4ms(expected):
    for case in expected["guidance"]:
        cond, uncond, guided = _tensor(case["cond"]), _tensor(case["uncond"]), _tensor(case["guided"])
        if case["weights"] is None:
            ours = guided_logits(cond, uncond, case["scale"])
        else:
            ours = multi_guided_logits(uncond, [cond, _tensor(case["cond2"])], case["weights"])
        assert torch.allclose(ours, guided, rtol=1e-6, atol=1e-6), case["scheme"]
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)  # 0: unconditional
    assert torch.allclose(guided_logits(cond, uncond, 1.0), cond)  # 1 (which generate never guides with): cond


def test_dropped_conditions_are_ml4ms(expected):
    """What ml-4m's unconditional pass keeps visible of an image-like condition, a sequence and a sequence
    embedding: omniforge's drop_condition keeps the same (values at the visible positions included)."""
    specs = {"tok_depth@224": ModalitySpec(name="tok_depth@224", kind="image", num_tokens=4, vocab_size=32, grid=2),
             "caption": ModalitySpec(name="caption", kind="sequence", num_tokens=3, vocab_size=400),
             "t5_caption": ModalitySpec(name="t5_caption", kind="embedding", num_tokens=5, vocab_size=0, width=4,
                                        source="t5_caption")}
    case = next(c for c in expected["guidance"] if c["scheme"] == "maskgit")
    first_sentinel = expected["sequences"]["empty"]["tensor"][0][0]
    for m, spec in specs.items():
        theirs = case["unconditional_pass"][m]
        visible = [i for i, masked in enumerate(theirs["input_mask"][0]) if not masked]
        row = drop_condition(spec, torch.device("cpu"), first_sentinel=first_sentinel)
        ours = torch.nonzero(~row["input_mask"][0]).flatten().tolist()
        assert ours == visible, m
        values = row["tensor"][0][ours].float().tolist()
        assert values == [theirs["tensor"][0][i] for i in visible], m
        assert row["target_mask"].all()  # never a target of the pass
    # the target's own progress stays in ml-4m's unconditional pass
    assert case["unconditional_pass"]["tok_rgb@224"] == case["before"]["tok_rgb@224"]


# -------------------------------------------------------------------------- the conventions in generate

IMG, SEQ, GLB = "tok_rgb@224", "tok_caption", "tok_dinov2_global"
SPECS = {
    IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=32, grid=4),
    SEQ: ModalitySpec(name=SEQ, kind="sequence", num_tokens=8, vocab_size=400),
    GLB: ModalitySpec(name=GLB, kind="global", num_tokens=16, vocab_size=24),
}
TEXT = dict(sentinel_ids=list(range(4, 204)), eos_id=3, pad_id=0)  # ml-4m's vocabulary layout


@pytest.fixture(scope="module")
def model() -> FourM:
    return tiny_fourm(SPECS)


class _Calls:
    """Wraps model.decoder_logits: records each call's batch and logits; ``edit`` may change the logits."""

    def __init__(self, model: FourM, monkeypatch, edit=None):
        self.calls: list[tuple[dict, dict]] = []
        original = model.decoder_logits

        def spy(batch, encoded=None, **kw):
            out = original(batch, encoded, **kw)
            if edit is not None:
                out = edit(len(self.calls), out)
            self.calls.append(({k: {f: t.clone() for f, t in r.items()} for k, r in batch.items()},
                               {k: v.clone() for k, v in out.items()}))
            return out

        monkeypatch.setattr(model, "decoder_logits", spy)


def test_ml4m_sequence_merge(expected, monkeypatch):
    """Forcing the draws to ml-4m's decoded sequences gives what its merge_span_masking made of them (a sentinel
    closes the span; [PAD] and tokens after [EOS] are kept; without a sentinel the budget ends it); the row is
    ml-4m's empty sequence: input [S_1] at position 0, the target [S_1] ... from position 1."""
    sentinels = set(range(4, 204))
    for merge in expected["sequences"]["merges"]:
        forced = merge["decoded"][1:]  # decoded[0] is the given [S_1]
        if not forced:
            continue
        budget = 8 if forced[-1] in sentinels else len(forced)  # no closing sentinel: the budget ran out
        specs = {IMG: SPECS[IMG], SEQ: ModalitySpec(name=SEQ, kind="sequence", num_tokens=budget, vocab_size=400)}
        torch.manual_seed(0)
        model = FourM(ModelConfig(dim=32, encoder_depth=1, decoder_depth=1, heads=2), specs).eval()

        def force(step, out, forced=forced):
            logits = out[SEQ].clone()
            logits[:, step + 1, forced[step]] += 1e4  # rank step + 1 is the token drawn at this step
            return {SEQ: logits}

        calls = _Calls(model, monkeypatch, force)
        cfg = SampleConfig(temperature=0.0, sequence_sampling="ml4m")
        out = generate(model, specs, {IMG: random_ids(SPECS[IMG])}, [SEQ], cfg, **TEXT)[SEQ]
        assert out.tolist() == merge["merged"], merge
        closing = next((i for i, t in enumerate(forced) if t in sentinels), len(forced) - 1)
        assert len(calls.calls) == closing + 1  # no draw after the first sentinel (it ends ml-4m's merged span)
        row = calls.calls[0][0][SEQ]
        assert torch.nonzero(~row["input_mask"][0]).flatten().tolist() == [0] and int(row["tensor"][0, 0]) == 5
        assert torch.nonzero(~row["target_mask"][0]).flatten().tolist() == [1, 2] and int(row["tensor"][0, 1]) == 5
        monkeypatch.undo()


def test_guidance_scale_one_is_the_conditional_result(model, monkeypatch):
    inputs = {GLB: random_ids(SPECS[GLB]), SEQ: np.array([300, 301, 3])}
    for order in ("maskgit", "random"):
        plain = SampleConfig(steps=3, order=order, seed=4, top_p=0.9)
        one = SampleConfig(steps=3, order=order, seed=4, top_p=0.9, guidance_scale=1.0, guidance_grow=False)
        calls = _Calls(model, monkeypatch)
        a = generate(model, SPECS, inputs, [IMG], plain, **TEXT)[IMG]
        b = generate(model, SPECS, inputs, [IMG], one, **TEXT)[IMG]
        assert np.array_equal(a, b)
        assert all(batch[IMG]["tensor"].shape[0] == 1 for batch, _ in calls.calls)  # one pass, as ml-4m
        monkeypatch.undo()
        guided = generate(model, SPECS, inputs, [IMG], SampleConfig(steps=3, order=order, seed=4, top_p=0.9,
                                                                   guidance_scale=3.0), **TEXT)[IMG]
        assert not np.array_equal(a, guided)  # guidance changes the draws


@pytest.mark.parametrize("scale", [0.0, 2.5, -1.0])
def test_guided_generation_draws_from_ml4ms_guided_logits(model, monkeypatch, scale):
    """Two passes per step: the sample as given, and every condition dropped (ml-4m's empty_*_modality); the
    greedy draw is the argmax of uncond + scale * (cond - uncond)."""
    inputs = {GLB: random_ids(SPECS[GLB]), SEQ: np.array([300, 301, 3])}
    calls = _Calls(model, monkeypatch)
    out = generate(model, SPECS, inputs, [IMG], SampleConfig(steps=1, temperature=0.0, guidance_scale=scale),
                   **TEXT)[IMG]
    (batch, logits), = calls.calls
    assert batch[IMG]["tensor"].shape[0] == 2
    cond, uncond = logits[IMG][0].float(), logits[IMG][1].float()
    assert np.array_equal(out, guided_logits(cond, uncond, scale).argmax(dim=-1).numpy())
    assert not batch[GLB]["input_mask"][0].any() and batch[GLB]["input_mask"][1].all()
    assert torch.nonzero(~batch[SEQ]["input_mask"][1]).flatten().tolist() == [0]
    assert int(batch[SEQ]["tensor"][1, 0]) == 5  # the empty caption: [S_1]


def test_guidance_grow_drops_finished_targets(model, monkeypatch):
    inputs = {SEQ: np.array([300, 301, 3])}
    for grow in (True, False):
        calls = _Calls(model, monkeypatch)
        generate(model, SPECS, inputs, [GLB, IMG], SampleConfig(steps=1, temperature=0.0, guidance_scale=2.0,
                                                               guidance_grow=grow), **TEXT)
        batch, _ = next(c for c in calls.calls if IMG in c[0] and not c[0][IMG]["target_mask"].all())
        assert not batch[GLB]["input_mask"][0].any()  # the conditional pass sees the generated global
        assert bool(batch[GLB]["input_mask"][1].all()) is grow  # dropped in the unconditional one with grow
        monkeypatch.undo()


def test_multi_condition_guidance(model, monkeypatch):
    """ml-4m's generate_multi_guided: one pass per weighted condition (only it kept), one with all dropped."""
    inputs = {GLB: random_ids(SPECS[GLB]), SEQ: np.array([300, 301, 3])}
    weights = {GLB: 2.0, SEQ: 0.5}
    calls = _Calls(model, monkeypatch)
    out = generate(model, SPECS, inputs, [IMG], SampleConfig(steps=1, temperature=0.0, guidance_weights=weights),
                   **TEXT)[IMG]
    (batch, logits), = calls.calls
    assert batch[IMG]["tensor"].shape[0] == 3
    assert not batch[GLB]["input_mask"][0].any() and batch[GLB]["input_mask"][1:].all()  # pass 0: the global
    assert (~batch[SEQ]["input_mask"][1]).sum() == 3 and (~batch[SEQ]["input_mask"][2]).sum() == 1  # 1: caption
    per_pass = logits[IMG].float()
    expected = multi_guided_logits(per_pass[2], [per_pass[0], per_pass[1]], [2.0, 0.5]).argmax(dim=-1)
    assert np.array_equal(out, expected.numpy())
    with pytest.raises(ConfigError, match="both set"):
        SampleConfig(guidance_scale=2.0, guidance_weights=weights)


def test_temperature_schedule_per_round(model, monkeypatch):
    """Each round of an image-like target draws at its temperature_schedule temperature; a sequence at the
    constant starting temperature (ml-4m schedules image-like targets only)."""
    seen = []
    import omniforge.model.sample as sample

    original = sample._draw

    def spy(logits, temperature, cfg, gen):
        seen.append(temperature)
        return original(logits, temperature, cfg, gen)

    monkeypatch.setattr(sample, "_draw", spy)
    cfg = SampleConfig(steps=4, order="random", temperature=3.0, temperature_schedule="onex:0.5:0.5")
    generate(model, SPECS, {GLB: random_ids(SPECS[GLB])}, [IMG], cfg, **TEXT)
    assert seen == temperature_schedule(3.0, token_schedule(16, 4, "linear"), "onex:0.5:0.5")
    seen.clear()
    generate(model, SPECS, {GLB: random_ids(SPECS[GLB])}, [SEQ], cfg, **TEXT)
    assert seen and set(seen) == {3.0}  # sequences: the constant starting temperature, as ml-4m


def test_same_seed_same_output_with_every_setting(model):
    inputs = {GLB: random_ids(SPECS[GLB])}
    cfg = SampleConfig(steps=5, order="random", temperature=2.0, temperature_schedule="linear", top_k=0.5,
                       top_p=0.9, guidance_scale=1.5, seed=11)
    a = generate(model, SPECS, inputs, [IMG, SEQ], cfg, **TEXT)
    b = generate(model, SPECS, inputs, [IMG, SEQ], cfg, **TEXT)
    assert all(np.array_equal(a[m], b[m]) for m in a)
    c = generate(model, SPECS, inputs, [IMG, SEQ], replace(cfg, seed=12), **TEXT)
    assert not np.array_equal(a[IMG], c[IMG])


def test_sequences_from_a_shifted_decoder(model, monkeypatch):
    """A released model's FM (ModelConfig.sequence_decoding "shifted") gives no logits for the given first target
    token, so its row k is target token k + 1: the sampler reads one row earlier and draws the same tokens."""
    import omniforge.model.sample as sample

    inputs = {IMG: random_ids(SPECS[IMG])}
    for sampling in ("ml4m", "omniforge"):
        cfg = SampleConfig(temperature=0.0, sequence_sampling=sampling)
        plain = generate(model, SPECS, inputs, [SEQ], cfg, **TEXT)[SEQ]
        _Calls(model, monkeypatch, lambda step, out: {m: v[:, 1:] if m == SEQ else v for m, v in out.items()})
        monkeypatch.setattr(sample, "_shifted", lambda model: True)
        assert np.array_equal(generate(model, SPECS, inputs, [SEQ], cfg, **TEXT)[SEQ], plain)
        monkeypatch.undo()


def test_sequence_sampling_defaults_to_the_models_convention(model, monkeypatch):
    """No sequence_sampling: ml-4m's for a released model (shifted decoding), omniforge's for omniforge's own."""
    import omniforge.model.sample as sample

    inputs = {IMG: random_ids(SPECS[IMG])}
    default = SampleConfig(temperature=0.0)
    outputs = [generate(model, SPECS, inputs, [SEQ], replace(default, sequence_sampling=s), **TEXT)[SEQ].tolist()
               for s in ("omniforge", "ml4m")]
    assert outputs[0] != outputs[1]  # the two conventions draw differently here, so the default is visible
    for shifted, sampling in ((False, "omniforge"), (True, "ml4m")):
        explicit = generate(model, SPECS, inputs, [SEQ], replace(default, sequence_sampling=sampling), **TEXT)[SEQ]
        if shifted:
            _Calls(model, monkeypatch, lambda step, out: {m: v[:, 1:] if m == SEQ else v for m, v in out.items()})
            monkeypatch.setattr(sample, "_shifted", lambda model: True)
        assert sample._sequence_sampling(model, default) == sampling
        assert np.array_equal(generate(model, SPECS, inputs, [SEQ], default, **TEXT)[SEQ], explicit)
        monkeypatch.undo()

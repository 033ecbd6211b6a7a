"""Any-to-any generation on a tiny random FourM: valid ids, greedy = argmax, EOS, chaining, schedules,
and checkpoint loading (omniforge.model.checkpoint.load_model) from a directory the test writes in the
trainer's layout."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from omniforge.errors import ConfigError, WeightsError
from omniforge.model.checkpoint import load_model
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.sample import SampleConfig, add_cli, filter_logits, generate, token_schedule
from omniforge.model.specs import ModalitySpec
from omniforge import shards
from _helpers import npy_bytes, random_ids, tiny_fourm

IMG, SEQ, GLB = "tok_rgb@224", "tok_caption", "tok_dinov2_global"
SPECS = {
    IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=32, grid=4),
    SEQ: ModalitySpec(name=SEQ, kind="sequence", num_tokens=7, vocab_size=100),
    GLB: ModalitySpec(name=GLB, kind="global", num_tokens=16, vocab_size=24),
}
PAD, EOS = 0, 3
SENTINELS = list(range(4, 14))
TEXT = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD)
GREEDY = SampleConfig(temperature=0.0, steps=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> FourM:
    return tiny_fourm(SPECS)


CAPTION = np.array([20, 21, 22, 23, EOS])


class _Spy:
    """Wraps model.decoder_logits and records the target row of every call (optionally edits logits)."""

    def __init__(self, model: FourM, monkeypatch, edit=None):
        self.calls: list[tuple[str, dict, dict]] = []
        original = model.decoder_logits

        def spy(batch, encoded=None, **kw):
            out = original(batch, encoded, **kw)
            (m,) = out
            self.calls.append((m, {k: {f: t.clone() for f, t in r.items()} for k, r in batch.items()}, out))
            return edit(m, out) if edit is not None else out

        monkeypatch.setattr(model, "decoder_logits", spy)


OMNI = dict(sequence_sampling="omniforge")


def _check_sequence(ids: np.ndarray, decoding: str = "omniforge") -> None:
    assert ids.dtype == np.int64 and len(ids) <= SPECS[SEQ].num_tokens
    if decoding == "ml4m":  # nothing banned; the first sentinel drawn ends the span and is not part of it
        assert not set(ids.tolist()) & set(SENTINELS)
        return
    assert 1 <= len(ids) and ids.min() >= 0 and ids.max() < SPECS[SEQ].vocab_size
    assert EOS not in ids[:-1].tolist()
    assert len(ids) == SPECS[SEQ].num_tokens or ids[-1] == EOS
    assert not set(ids.tolist()) & {PAD, *SENTINELS}


@pytest.mark.parametrize("decoding", ["ml4m", "omniforge"])
@pytest.mark.parametrize("order", ["maskgit", "random"])
def test_generate_returns_valid_ids_for_every_target(model, order, decoding):
    cfg = SampleConfig(steps=4, order=order, top_k=10, top_p=0.9, seed=3, sequence_sampling=decoding)
    out = generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, [GLB, SEQ], cfg, **TEXT)
    assert list(out) == [GLB, SEQ]
    glb = out[GLB]
    assert glb.shape == (16,) and glb.dtype == np.int64 and glb.min() >= 0 and glb.max() < 24
    _check_sequence(out[SEQ], decoding)
    out2 = generate(model, SPECS, {SEQ: CAPTION[:-1]}, [IMG], cfg, **TEXT)  # a caption without its EOS
    assert out2[IMG].shape == (16,) and 0 <= out2[IMG].min() and out2[IMG].max() < 32
    again = generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, [GLB, SEQ], cfg, **TEXT)
    assert all(np.array_equal(out[m], again[m]) for m in out)  # same seed, same output


def _input_row(spec: ModalitySpec, ids) -> dict[str, torch.Tensor]:
    row = {"tensor": torch.zeros(1, spec.seq_len, dtype=torch.int64),
           "input_mask": torch.ones(1, spec.seq_len, dtype=torch.bool),
           "target_mask": torch.ones(1, spec.seq_len, dtype=torch.bool),
           "decoder_attention_mask": torch.zeros(1, spec.seq_len, dtype=torch.int32)}
    row["tensor"][0, :len(ids)] = torch.as_tensor(np.asarray(ids))
    row["input_mask"][0, :len(ids)] = False
    return row


def test_greedy_single_step_is_argmax(model):
    inputs = {SEQ: CAPTION}
    target = _input_row(SPECS[IMG], [])
    target["target_mask"][:] = False
    with torch.no_grad():
        logits = model.decoder_logits({SEQ: _input_row(SPECS[SEQ], CAPTION), IMG: target})[IMG][0]
    expected = logits.argmax(dim=-1).numpy()
    assert np.array_equal(generate(model, SPECS, inputs, [IMG], GREEDY, **TEXT)[IMG], expected)
    top1 = SampleConfig(temperature=1.0, top_k=1, steps=1, seed=5)
    assert np.array_equal(generate(model, SPECS, inputs, [IMG], top1, **TEXT)[IMG], expected)


def test_greedy_sequence_is_argmax_decoding(model):
    image = random_ids(SPECS[IMG])
    out = generate(model, SPECS, {IMG: image}, [SEQ], SampleConfig(temperature=0.0, steps=1, **OMNI), **TEXT)[SEQ]
    # independent greedy decoding: target row [S_1, t1, t2, ...] at position 0, banned [PAD] and sentinels
    spec = SPECS[SEQ]
    row = _input_row(spec, [])
    row["tensor"][0, 0] = SENTINELS[1]
    expected = []
    with torch.no_grad():
        for t in range(1, spec.num_tokens + 1):
            row["target_mask"][0, :t + 1] = False
            logits = model.decoder_logits({IMG: _input_row(SPECS[IMG], image), SEQ: row})[SEQ][0, t].clone()
            logits[[PAD, *SENTINELS]] = float("-inf")
            token = int(logits.argmax())
            expected.append(token)
            row["tensor"][0, t] = token
            if token == EOS:
                break
    assert out.tolist() == expected
    _check_sequence(out)


def test_greedy_ml4m_sequence_is_argmax_decoding(model):
    """ml-4m's convention: the row is its empty sequence (input [S_1] at 0, target [S_1] from position 1), nothing
    is banned, and the first sentinel drawn ends the sequence (it is not part of it)."""
    image = random_ids(SPECS[IMG])
    out = generate(model, SPECS, {IMG: image}, [SEQ], SampleConfig(temperature=0.0, sequence_sampling="ml4m"),
                   **TEXT)[SEQ]
    spec = SPECS[SEQ]
    row = _input_row(spec, [SENTINELS[1]])
    row["tensor"][0, 1] = SENTINELS[1]
    expected = []
    with torch.no_grad():
        for t in range(1, spec.num_tokens + 1):
            row["target_mask"][0, 1:t + 2] = False
            logits = model.decoder_logits({IMG: _input_row(SPECS[IMG], image), SEQ: row})[SEQ][0, t]
            token = int(logits.argmax())
            if token in SENTINELS:
                break
            expected.append(token)
            row["tensor"][0, 1 + t] = token
    assert out.tolist() == expected
    _check_sequence(out, "ml4m")


def test_ml4m_sequence_stops_at_a_sentinel_not_at_eos(model, monkeypatch):
    def eos_then_close(m, out):  # rank 2 draws [EOS], rank 3 a token, rank 4 the closing [S_2]
        logits = out[m].clone()
        if logits.shape[1] > 2:
            logits[:, 2, EOS] += 1e4
        if logits.shape[1] > 3:
            logits[:, 3, 50] += 1e4
        if logits.shape[1] > 4:
            logits[:, 4, SENTINELS[2]] += 1e4
        return {m: logits}

    spy = _Spy(model, monkeypatch, eos_then_close)
    out = generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, [SEQ], SampleConfig(seed=1, sequence_sampling="ml4m"),
                   **TEXT)[SEQ]
    assert len(out) == 3 and out[1:].tolist() == [EOS, 50] and len(spy.calls) == 4


def test_sequence_stops_at_eos(model, monkeypatch):
    def eos_from_third(m, out):  # query t predicts token t; make token 3 an EOS
        logits = out[m].clone()
        logits[:, 3:, EOS] += 1e4
        return {m: logits}

    spy = _Spy(model, monkeypatch, eos_from_third)
    out = generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, [SEQ], SampleConfig(seed=1, **OMNI), **TEXT)[SEQ]
    assert len(out) == 3 and out[-1] == EOS and EOS not in out[:-1]
    assert len(spy.calls) == 3  # no decoding after EOS


def test_chained_generation_feeds_earlier_targets(model, monkeypatch):
    inputs = {SEQ: CAPTION}
    chained = generate(model, SPECS, inputs, [GLB, IMG], GREEDY, **TEXT)
    direct = generate(model, SPECS, {**inputs, GLB: chained[GLB]}, [IMG], GREEDY, **TEXT)
    assert np.array_equal(chained[IMG], direct[IMG])

    spy = _Spy(model, monkeypatch)
    generate(model, SPECS, inputs, [GLB, IMG], GREEDY, **TEXT)
    img_calls = [batch for m, batch, _ in spy.calls if m == IMG]
    assert img_calls
    for batch in img_calls:  # the generated global code is a full input of the image's decoding
        assert not batch[GLB]["input_mask"].any()
        assert np.array_equal(batch[GLB]["tensor"][0].numpy(), chained[GLB])
        assert batch[GLB]["target_mask"].all()

    for decoding in ("omniforge", "ml4m"):  # a generated sequence is a fully visible input of the next target
        spy.calls.clear()
        cfg = SampleConfig(temperature=0.0, steps=1, sequence_sampling=decoding)
        out = generate(model, SPECS, {IMG: chained[IMG]}, [SEQ, GLB], cfg, **TEXT)
        glb_batch = next(batch for m, batch, _ in spy.calls if m == GLB)
        visible = glb_batch[SEQ]["tensor"][0][~glb_batch[SEQ]["input_mask"][0]].tolist()
        if decoding == "omniforge":  # as training's input: up to its [EOS]
            expected = out[SEQ].tolist() if out[SEQ][-1] == EOS else out[SEQ].tolist()[:-1] + [EOS]
        else:  # ml-4m: the merged ids as they are
            expected = out[SEQ].tolist()
        assert visible == expected and glb_batch[SEQ]["target_mask"].all()


def test_chained_target_already_given_is_an_error(model):
    with pytest.raises(ConfigError, match="also given as inputs"):
        generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, [IMG], GREEDY, **TEXT)
    with pytest.raises(ConfigError, match="not among"):
        generate(model, SPECS, {IMG: random_ids(SPECS[IMG])}, ["tok_nope"], GREEDY, **TEXT)


def test_maskgit_one_step_reveals_everything(model, monkeypatch):
    spy = _Spy(model, monkeypatch)
    out = generate(model, SPECS, {GLB: random_ids(SPECS[GLB])}, [IMG], SampleConfig(steps=1), **TEXT)[IMG]
    assert out.shape == (16,)
    assert len(spy.calls) == 1
    _, batch, logits = spy.calls[0]
    assert not batch[IMG]["target_mask"].any() and batch[IMG]["input_mask"].all()
    assert logits[IMG].shape == (1, 16, 32)


def test_token_schedule():
    """Properties of ml-4m's schedules (tests/model/test_sample_ml4m.py compares them with ml-4m's output)."""
    assert token_schedule(16, 4, "linear") == [4, 4, 4, 4]
    cosine = token_schedule(16, 4, "cosine")
    assert cosine == [2, 6, 6, 2]  # few first and last, many in the middle
    assert token_schedule(3, 8, "linear") == [1, 1, 1]  # linear: at most one round per token
    assert token_schedule(16, 1, "cosine") == [16]
    assert token_schedule(10, 4, "linear") == [3, 3, 2, 2]  # larger shares first
    assert token_schedule(3, 8, "cosine") == [0, 0, 0, 1, 1, 0, 0, 1]  # ml-4m's rounding: empty rounds
    assert token_schedule(3, 6, "cosine") == [0, 1, 1, 1, 0, 0]  # ml-4m's: [0, 1, 1, 1, 1, -1], which it cannot run
    assert token_schedule(16, 8, "cosine") == [1, 2, 3, 3, 3, 3, 1, 0]  # the default steps on 16 tokens, likewise
    for n in (1, 5, 16, 196):
        for steps in (1, 2, 7, 12):
            counts = token_schedule(n, steps, "linear")
            assert sum(counts) == n and min(counts) >= 1 and len(counts) == min(n, steps)
            counts = token_schedule(n, steps, "cosine")
            assert sum(counts) == n and min(counts) >= 0 and len(counts) == steps


@pytest.mark.parametrize("order", ["maskgit", "random"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_revealed_tokens_follow_the_schedule(model, monkeypatch, order, schedule):
    spy = _Spy(model, monkeypatch)
    cfg = SampleConfig(steps=5, schedule=schedule, order=order, seed=2)
    out = generate(model, SPECS, {SEQ: CAPTION}, [IMG], cfg, **TEXT)[IMG]
    counts = [c for c in token_schedule(16, 5, schedule) if c]  # a round of 0 tokens makes no call
    assert len(spy.calls) == len(counts)
    revealed = 0
    for (_, batch, _), count in zip(spy.calls, counts):
        row = batch[IMG]
        known = ~row["input_mask"][0]
        assert int(known.sum()) == revealed  # earlier rounds' tokens are inputs
        assert not (known & ~row["target_mask"][0]).any()  # inputs and queries are disjoint
        queries = int((~row["target_mask"][0]).sum())
        assert queries == (16 - revealed if order == "maskgit" else count)
        assert np.array_equal(row["tensor"][0][known].numpy(), out[known.numpy()])  # kept tokens stay
        revealed += count
    assert revealed == 16


def test_filter_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = torch.tensor([[0.05, 0.6, 0.3, 0.05]]).log()
    assert torch.isinf(filter_logits(probs, top_p=0.8)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_logits(probs, top_p=0.5)).tolist() == [[True, False, True, True]]
    assert not torch.isinf(filter_logits(probs)).any()


def test_sample_config_validation():
    with pytest.raises(ConfigError, match="schedule"):
        SampleConfig(schedule="exp")
    with pytest.raises(ConfigError, match="order"):
        SampleConfig(order="left")
    with pytest.raises(ConfigError, match="steps"):
        SampleConfig(steps=0)
    with pytest.raises(ConfigError, match="top_p"):
        SampleConfig(top_p=1.5)


def _write_checkpoint(run: str, model: FourM, step: int) -> str:
    from safetensors.torch import save_file

    ckpt = os.path.join(run, f"checkpoint-{step}")
    os.makedirs(ckpt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(ckpt, "model.safetensors"))
    config = {"model": model.config.to_dict(),
              "specs": {m: {"name": s.name, "kind": s.kind, "num_tokens": s.num_tokens,
                            "vocab_size": s.vocab_size, "grid": s.grid} for m, s in model.specs.items()},
              "step": step}
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run, "latest"), "w") as f:
        json.dump({"step": step, "path": f"checkpoint-{step}"}, f)
    return ckpt


def test_load_model(model, tmp_path):
    run = str(tmp_path / "run")
    ckpt = _write_checkpoint(run, model, 7)
    for path in (run, ckpt):
        loaded, specs, config = load_model(path)
        assert specs == SPECS and config["step"] == 7 and not loaded.training
        assert loaded.config == model.config
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    inputs = {SEQ: CAPTION}
    assert np.array_equal(generate(loaded, specs, inputs, [IMG], GREEDY, **TEXT)[IMG],
                          generate(model, SPECS, inputs, [IMG], GREEDY, **TEXT)[IMG])

    with pytest.raises(WeightsError, match="latest"):
        load_model(str(tmp_path))
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(WeightsError, match="config.json"):
        load_model(run)
    other = FourM(ModelConfig(dim=32, encoder_depth=2, decoder_depth=1, heads=2), SPECS)
    run2 = str(tmp_path / "run2")
    ckpt2 = _write_checkpoint(run2, other, 1)
    with open(os.path.join(ckpt2, "config.json")) as f:
        config = json.load(f)
    config["model"]["encoder_depth"] = 1
    with open(os.path.join(ckpt2, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightsError, match="do not match"):
        load_model(run2)


def test_sample_cli_writes_token_rows(model, tmp_path, capsys):
    root = str(tmp_path / "corpus")
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": ["a", "b"], "shard": [0, 0]}))
    rows = {k: np.stack([random_ids(SPECS[IMG], seed), random_ids(SPECS[IMG], seed + 9)]).astype(np.int16)
            for k, seed in (("a", 1), ("b", 2))}
    shards.write_tar(shards.tar_uri(root, IMG, 0), [(f"{k}.npy", npy_bytes(v)) for k, v in rows.items()])
    run = str(tmp_path / "run")
    _write_checkpoint(run, model, 2)

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "out")
    args = parser.parse_args(["sample", "--checkpoint", run, "--input", root, "--key", "b", "--from", IMG,
                              "--to", f"{GLB},{SEQ}", "--out", out, "--temperature", "0", "--steps", "2"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and printed[0].startswith(GLB) and printed[1].startswith(SEQ)
    assert printed[2].endswith("sample.png") and os.path.getsize(os.path.join(out, "b", "sample.png")) > 0
    glb = np.load(os.path.join(out, "b", f"{GLB}.npy"))
    seq = np.load(os.path.join(out, "b", f"{SEQ}.npy"))
    assert glb.shape == (1, 16) and glb.dtype == np.int16 and seq.shape == (1, 7) and seq.dtype == np.int16
    expected = generate(model, SPECS, {IMG: rows["b"][0].astype(np.int64)}, [GLB, SEQ],
                        SampleConfig(temperature=0.0, steps=2), sentinel_ids=list(range(4, 204)), eos_id=3)
    assert np.array_equal(glb[0], expected[GLB])
    assert seq[0, :len(expected[SEQ])].tolist() == expected[SEQ].tolist() and not seq[0, len(expected[SEQ]):].any()

    # several keys, one checkpoint load: each key's output is what it gets alone (same seed, temperature 1)
    alone = str(tmp_path / "alone")
    for keys, where in (("a", alone), ("b,a", str(tmp_path / "both"))):
        args = parser.parse_args(["sample", "--checkpoint", run, "--input", root, "--key", keys, "--from", IMG,
                                  "--to", GLB, "--out", where, "--steps", "2", "--seed", "3"])
        assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("sample.png") == 1 + 2 and os.path.exists(os.path.join(tmp_path, "both", "b", f"{GLB}.npy"))
    assert np.array_equal(np.load(os.path.join(alone, "a", f"{GLB}.npy")),
                          np.load(os.path.join(tmp_path, "both", "a", f"{GLB}.npy")))

    args = parser.parse_args(["sample", "--checkpoint", run, "--input", root, "--key", "zz", "--from", IMG,
                              "--to", GLB, "--out", out])
    with pytest.raises(ConfigError, match="not in"):
        args.fn(args)


def test_per_target_settings_apply_to_their_target_only(model, monkeypatch):
    spy = _Spy(model, monkeypatch)
    cfg = SampleConfig(steps=5, seed=6, targets={GLB: {"temperature": 0.0, "steps": 2}})
    out = generate(model, SPECS, {SEQ: CAPTION}, [GLB, IMG], cfg, **TEXT)
    rounds = {m: sum(1 for c in spy.calls if c[0] == m) for m in (GLB, IMG)}
    assert rounds == {GLB: 2, IMG: len([c for c in token_schedule(16, 5, "cosine") if c])}
    monkeypatch.undo()
    # the global alone with its settings; then the image with the run's own settings (a greedy target draws no
    # random number, so the image's draws start from the seed as they would alone)
    assert np.array_equal(out[GLB], generate(model, SPECS, {SEQ: CAPTION}, [GLB],
                                             SampleConfig(steps=2, temperature=0.0), **TEXT)[GLB])
    assert np.array_equal(out[IMG], generate(model, SPECS, {SEQ: CAPTION, GLB: out[GLB]}, [IMG],
                                             SampleConfig(steps=5, seed=6), **TEXT)[IMG])
    with pytest.raises(ConfigError, match="not targets"):
        generate(model, SPECS, {SEQ: CAPTION}, [IMG], cfg, **TEXT)
    with pytest.raises(ConfigError, match="cannot be set per target"):
        SampleConfig(targets={IMG: {"seed": 3}})
    with pytest.raises(ConfigError, match=f"target {IMG}: SampleConfig.steps"):
        SampleConfig(targets={IMG: {"steps": 0}})


def test_parse_target():
    from omniforge.model.sample import parse_target

    assert parse_target("tok_rgb@224:steps=8,temp=3,cfg=2,top_k=0.1,order=random,temp_schedule=onex:0.5:0.5") == (
        "tok_rgb@224", {"steps": 8, "temperature": 3.0, "guidance_scale": 2.0, "top_k": 0.1, "order": "random",
                        "temperature_schedule": "onex:0.5:0.5"})
    assert parse_target("caption:top_k=5")[1] == {"top_k": 5}
    for bad, match in (("tok_rgb@224", "FOLDER:key=value"), ("tok_rgb@224:stepz=8", "not key=value"),
                       ("tok_rgb@224:steps=eight", "not a number"), ("tok_rgb@224:steps=2,steps=3", "twice")):
        with pytest.raises(ConfigError, match=match) as e:
            parse_target(bad)
        assert "\n" not in str(e.value)


class _Text:
    """A stand-in for the text tokenizer (only what sampling reads)."""

    sentinel_ids = list(range(4, 204))
    eos_id, pad_id = 3, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_sample_cli_per_target_settings_and_undecodable_targets(model, tmp_path, capsys, monkeypatch):
    """--target settings reach their target; a target whose tokenizer cannot decode (NoDecoderError) is said so in
    one line, once per modality over all keys, its tokens are still written and the other targets carry on."""
    import omniforge.model.sample as sample
    from omniforge.errors import NoDecoderError
    from omniforge.tokenize.store import TokenizerStore

    root = str(tmp_path / "corpus")
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": ["a", "b"], "shard": [0, 0]}))
    rows = {k: random_ids(SPECS[GLB], seed)[None].astype(np.int16) for k, seed in (("a", 1), ("b", 2))}
    shards.write_tar(shards.tar_uri(root, GLB, 0), [(f"{k}.npy", npy_bytes(v)) for k, v in rows.items()])
    run = str(tmp_path / "run")
    _write_checkpoint(run, model, 2)
    real_decode = sample.decode_output

    def decode(folder, ids, spec, tokenizers, text_tok):
        if folder == IMG:
            raise NoDecoderError(f"{folder}: its released tokenizer decodes with a diffusion model; tokens kept")
        if folder == GLB:
            return np.zeros((4, 4), dtype=np.uint8)
        return real_decode(folder, ids, spec, tokenizers, text_tok)

    monkeypatch.setattr(sample, "decode_output", decode)
    monkeypatch.setattr(TokenizerStore, "text", lambda self: _Text())
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "out")
    args = parser.parse_args(["sample", "--checkpoint", run, "--input", root, "--key", "a,b", "--from", GLB,
                              "--to", f"{IMG},caption", "--tokenizers", str(tmp_path), "--out", out,
                              "--steps", "4", "--target", f"{IMG}:temp=0,steps=2", "--target", "caption:temp=0"])
    calls = []
    original = model.decoder_logits
    monkeypatch.setattr(sample, "load_model", lambda path, device: (model, SPECS, {}))
    monkeypatch.setattr(model, "decoder_logits", lambda batch, encoded=None, **kw: calls.append(
        {m: r["target_mask"].clone() for m, r in batch.items()}) or original(batch, encoded, **kw))
    assert args.fn(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    notes = [line for line in printed if "diffusion" in line]
    assert notes == [f"{IMG}: {IMG}: its released tokenizer decodes with a diffusion model; tokens kept"]
    img_rounds = [c for c in calls if IMG in c and not c[IMG].all()]
    assert len(img_rounds) == 2 * 2  # two rounds (its --target steps) per key
    for key in ("a", "b"):
        img = np.load(os.path.join(out, key, f"{IMG}.npy"))
        assert img.shape == (1, 16) and img.dtype == np.int16
        assert os.path.exists(os.path.join(out, key, f"{SEQ}.npy"))
        assert os.path.exists(os.path.join(out, key, f"{SEQ}.txt"))  # the next target carried on, decoded
        assert not os.path.exists(os.path.join(out, key, f"{IMG}.png"))
        assert os.path.getsize(os.path.join(out, key, "sample.png")) > 0
    greedy = generate(model, SPECS, {GLB: rows["a"][0].astype(np.int64)}, [IMG],
                      SampleConfig(temperature=0.0, steps=2), **TEXT)[IMG]
    assert np.array_equal(np.load(os.path.join(out, "a", f"{IMG}.npy"))[0], greedy)

    bad = parser.parse_args(["sample", "--checkpoint", run, "--input", root, "--key", "a", "--from", GLB,
                             "--to", IMG, "--out", out, "--target", "depth:steps=2"])
    with pytest.raises(ConfigError, match="not targets"):
        bad.fn(bad)

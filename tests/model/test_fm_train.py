"""The trainer: learning, exact resume, checkpoints that reload, config errors, torchrun DDP."""

import argparse
import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError
from omniforge.model._cli import add_train_cli
from omniforge.model.checkpoint import latest_checkpoint, load_model
from omniforge.model.train import TrainConfig, config_from_args, main, train
from omniforge import shards
from omniforge.tokenize.text import train_wordpiece
from _helpers import npy_bytes, torchrun_train

DEPTH, CAP = "tok_depth@224", "tok_caption"
N_SHARDS, N_KEYS, N_CROPS = 3, 8, 2
CAPTIONS = ["a dog on a red sofa", "two cats under a table", "a man riding a bike", "a bowl of green apples"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(token root, tokenizers dir): every sample has the same depth tokens (position % 16) and one of a few
    captions, so the targets are predictable."""
    base = tmp_path_factory.mktemp("train")
    root, toks = str(base / "tokens"), str(base / "tokenizers")
    tok = train_wordpiece(CAPTIONS * 5, vocab_size=5000)
    os.makedirs(os.path.join(toks, "text"))
    tok.save(os.path.join(toks, "text", "tokenizer.json"))
    depth = np.tile(np.arange(196) % 16, (N_CROPS, 1)).astype(np.int16)
    for s in range(N_SHARDS):
        keys = [f"s{s:03d}-k{k:03d}" for k in range(N_KEYS)]
        for folder in (DEPTH, CAP):
            members = []
            for k, key in enumerate(keys):
                if folder == DEPTH:
                    arr = depth
                else:
                    arr = np.stack([tok.encode_units([CAPTIONS[k % 2]], 256)] * N_CROPS)
                members.append((f"{key}.npy", npy_bytes(arr)))
            shards.write_tar(shards.tar_uri(root, folder, s), members)
            shards.write_status(shards.status_uri(root, folder, s), [{"key": k, "ok": True} for k in keys])
    return root, toks


def _cfg(corpus, out, **kw):
    root, toks = corpus
    base = dict(data=root, modalities=(DEPTH, CAP), out=str(out), tokenizers=toks, input_tokens=24,
                target_tokens=24, batch_size=4, lr=2e-3, warmup_steps=5, final_lr=1e-4, steps=6, save_every=3,
                shuffle_buffer=8, tensorboard=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_loss_falls(corpus, tmp_path):
    root, _ = corpus
    result = train(_cfg(corpus, tmp_path / "run", steps=150, save_every=1000, eval_data=root, eval_every=50,
                        eval_batches=2), progress=False)
    losses = [e["loss"] for e in result.losses]
    assert len(losses) == 150 and result.steps == 150
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert end < 0.35 * start, (start, end)
    # held-out loss at steps 50, 100, 150 (the last step always), falling as well
    assert [e["step"] for e in result.evals] == [50, 100, 150]
    held_out = [e["loss"] for e in result.evals]
    assert held_out[-1] < held_out[0] and held_out[-1] < 0.5 * start, held_out
    assert all(e["samples"] == 2 * 4 and set(e["losses"]) == {DEPTH, CAP} for e in result.evals)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    entry = json.loads(lines[-1])
    assert entry["step"] == 150 and set(entry) >= {"loss", "losses", "lr", "tokens_per_s", "grad_norm"}
    assert set(entry["losses"]) <= {DEPTH, CAP} and entry["losses"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-150")


def test_exact_resume(corpus, tmp_path):
    held_out = dict(eval_data=corpus[0], eval_every=2, eval_batches=1)  # evaluations leave training as it was
    full = train(_cfg(corpus, tmp_path / "full", **held_out), progress=False)
    assert [e["step"] for e in full.losses] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in full.evals] == [2, 4, 6]

    first = train(_cfg(corpus, tmp_path / "split", steps=3, **held_out), progress=False)
    # steps 1..3 are warm-up steps, whose learning rate does not depend on the total
    assert [e["loss"] for e in first.losses] == [e["loss"] for e in full.losses[:3]]
    resumed = train(_cfg(corpus, tmp_path / "split", **held_out), progress=False)
    assert [e["step"] for e in resumed.losses] == [4, 5, 6]
    split_evals = [json.loads(x) for x in (tmp_path / "split" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in split_evals] == [2, 3, 4, 6]  # the first run ended at 3 (its last step)
    for a, b in zip([split_evals[0], *split_evals[2:]], full.evals):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for a, b in zip(resumed.losses, full.losses[3:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["losses"].keys() == b["losses"].keys()
        for m in a["losses"]:
            assert a["losses"][m] == pytest.approx(b["losses"][m], abs=1e-6)
    # the whole log of the resumed run is the uninterrupted one
    split_log = [json.loads(x)["loss"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert split_log == pytest.approx([e["loss"] for e in full.losses], abs=1e-6)
    # so are the final weights
    a, b = load_model(str(tmp_path / "full")).model, load_model(str(tmp_path / "split")).model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)

    # a run killed after step 5 (checkpoint-3 is the latest) redoes steps 4..6 identically
    (tmp_path / "full" / "latest").write_text(json.dumps({"step": 3, "path": "checkpoint-3"}))
    again = train(_cfg(corpus, tmp_path / "full", **held_out), progress=False)
    assert [json.loads(x)["step"] for x in (tmp_path / "full" / "eval.jsonl").read_text().splitlines()] == [2, 4, 6]
    assert [e["loss"] for e in again.losses] == pytest.approx([e["loss"] for e in full.losses[3:]], abs=1e-6)
    assert len((tmp_path / "full" / "log.jsonl").read_text().splitlines()) == 6


def test_checkpoint_reloads(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "run", steps=2, save_every=2, tensorboard=True, log_every=1)
    train(cfg, progress=True)
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:  # the trainer notes it and goes on
        assert not (tmp_path / "run" / "tb").exists()
    else:
        assert os.listdir(tmp_path / "run" / "tb")
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert sorted(os.listdir(ckpt)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                        "rng.safetensors", "trainer_state.json"]
    assert json.loads((tmp_path / "run" / "latest").read_text()) == {"step": 2, "path": "checkpoint-2"}
    model, _, config = load_model(str(ckpt))
    assert set(config["specs"]) == {DEPTH, CAP}
    assert config["specs"][DEPTH]["kind"] == "image" and config["specs"][CAP]["kind"] == "sequence"
    assert config["model"]["dim"] == 64 and config["train"]["modalities"] == [DEPTH, CAP]
    assert config["text_tokenizer"].endswith(os.path.join("text", "tokenizer.json"))

    from safetensors.torch import load_file

    from omniforge.model.fm import FourM, ModelConfig
    from omniforge.model.specs import ModalitySpec

    rebuilt = FourM(ModelConfig.from_dict(config["model"]),
                    {m: ModalitySpec(**s) for m, s in config["specs"].items()}).eval()
    rebuilt.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    L = config["specs"][DEPTH]["num_tokens"]
    g = torch.Generator().manual_seed(0)
    tensor = torch.randint(0, 16, (2, L), generator=g)
    inp = torch.rand(2, L, generator=g) < 0.5
    batch = {DEPTH: {"tensor": tensor, "input_mask": inp, "target_mask": ~inp,
                     "decoder_attention_mask": torch.zeros(2, L, dtype=torch.int32)}}
    with torch.no_grad():
        la, lb = model.decoder_logits(batch)[DEPTH], rebuilt.decoder_logits(batch)[DEPTH]
        assert torch.equal(la, lb)
        assert float(model(batch)[0]) == float(rebuilt(batch)[0])


def test_config_errors(corpus, tmp_path):
    root, toks = corpus
    with pytest.raises(ConfigError, match="omniforge tokenize"):
        train(_cfg(corpus, tmp_path / "a", modalities=(DEPTH, "tok_normal@224")), progress=False)
    with pytest.raises(ConfigError, match="--tokenizers"):
        train(_cfg(corpus, tmp_path / "b", tokenizers=None), progress=False)
    with pytest.raises(ConfigError, match="unknown model config"):
        _cfg(corpus, tmp_path / "c", model="huge")
    with pytest.raises(ConfigError, match="--eval-data"):
        train(_cfg(corpus, tmp_path / "e", eval_data=str(tmp_path / "no-such-root")), progress=False)
    with pytest.raises(ConfigError, match="eval_every"):
        _cfg(corpus, tmp_path / "f", eval_every=0)
    # the CLI turns them into one line and exit code 2
    assert main(["--data", root, "--modalities", f"{DEPTH},tok_normal@224", "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 2


def test_cli_runs(corpus, tmp_path, capsys):
    root, toks = corpus
    rc = main(["--config", "tiny", "--data", root, "--modalities", DEPTH, "--out", str(tmp_path / "cli"),
               "--steps", "2", "--grad-accum", "2", "--batch-size", "2",
               "--input-tokens", "16", "--target-tokens", "16",
               "--device", "cpu", "--no-tensorboard", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "trained tiny steps 1..2" in printed and str(tmp_path / "cli" / "checkpoint-2") in printed
    assert (tmp_path / "cli" / "checkpoint-2" / "model.safetensors").exists()
    rc = main(["--config", "tiny", "--data", root, "--modalities", DEPTH, "--out", str(tmp_path / "cli"),
               "--steps", "2", "--device", "cpu", "--no-tensorboard", "--no-progress"])
    assert rc == 0 and "already at step 2" in capsys.readouterr().out


def test_held_out_loss_repeats_and_follows_the_weights(corpus, tmp_path):
    """Two evaluations of the same weights give the same loss (same samples, same masks); training in
    between changes it; evaluating draws nothing from the training RNG."""
    from omniforge._torch_run import Dist
    from omniforge.model.train import _Run

    run = _Run(_cfg(corpus, tmp_path / "run", eval_data=corpus[0], eval_batches=2), torch.device("cpu"), Dist())
    rng = torch.get_rng_state()
    a, b = run.evaluate(0), run.evaluate(0)
    assert torch.equal(rng, torch.get_rng_state())
    assert a == b and a.samples == 8 and set(a.losses) == {DEPTH, CAP}
    assert a.loss == pytest.approx(np.mean(list(a.losses.values())))
    batches = iter(run.loader)
    for step in range(3):
        run.step(step, batches)
    c = run.evaluate(3)
    assert c.loss != a.loss and c.samples == a.samples


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_blocks_train_like_eager(corpus, tmp_path):
    """--compile compiles the blocks in place: same losses as eager, one graph per block kind (no
    recompiles although every batch packs to other lengths), and checkpoints an eager model loads."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = train(_cfg(corpus, tmp_path / "eager", steps=4), progress=False)
    compiled = train(_cfg(corpus, tmp_path / "compiled", steps=4, compile=True), progress=False)
    assert [e["loss"] for e in compiled.losses] == pytest.approx([e["loss"] for e in eager.losses], rel=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # one encoder-block graph, one decoder-block graph
    assert not counters["recompiles"] and not counters["graph_break"], (dict(counters["recompiles"]),
                                                                        dict(counters["graph_break"]))
    a, b = load_model(str(tmp_path / "eager")).model, load_model(str(tmp_path / "compiled")).model
    assert a.state_dict().keys() == b.state_dict().keys()
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun(ddp_corpus, tmp_path, strategy, request):
    """Two processes under torchrun: checkpoints, the resumable state of both ranks, held-out loss over both.
    DDP: the session's run (tests/conftest.py's torchrun_ddp, which test_train_job compares Ray Train with)."""
    if strategy == "ddp":
        out = request.getfixturevalue("torchrun_ddp")
    else:
        out = tmp_path / strategy
        torchrun_train(ddp_corpus, out, strategy)
    assert latest_checkpoint(str(out)).endswith("checkpoint-3")
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert set(json.loads((out / "log.jsonl").read_text().splitlines()[0])["losses"]) == {DEPTH, CAP}
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 3]
    assert all(e["samples"] == 2 * 2 * 2 and np.isfinite(e["loss"]) for e in evals)  # ranks x batches x batch size


def test_named_datasets_from_a_yaml_config(corpus, tmp_path, capsys):
    """`datasets: {name: {data, weight}}` in a --config YAML trains on several roots, mixed by weight."""
    root, toks = corpus
    second = str(tmp_path / "second")
    shutil.copytree(root, second)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\nmodalities: [{DEPTH}, {CAP}]\ntokenizers: {toks}\n"
                      f"datasets:\n  first: {{data: {root}, weight: 3}}\n  second: {{data: {second}}}\n"
                      "steps: 2\nbatch_size: 2\ninput_tokens: 16\ntarget_tokens: 16\ndevice: cpu\n")
    parser = argparse.ArgumentParser()
    add_train_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-tensorboard"])
    cfg = config_from_args(args)
    assert cfg.data == (root, second) and cfg.data_weights == (3.0, 1.0)
    args = parser.parse_args(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--data", second])
    cfg = config_from_args(args)  # a command-line --data replaces the named datasets, weights included
    assert cfg.data == second and cfg.data_weights is None
    assert main(["--config", str(config), "--out", str(tmp_path / "run"), "--no-tensorboard", "--no-progress"]) == 0
    with open(tmp_path / "run" / "checkpoint-2" / "config.json", encoding="utf-8") as f:
        saved = json.load(f)["train"]
    assert saved["data"] == [root, second] and saved["data_weights"] == [3.0, 1.0]
    with pytest.raises(ConfigError, match="one positive weight per data root"):
        TrainConfig(data=(root, second), data_weights=(1.0,), modalities=(DEPTH,), out=str(tmp_path / "x"))


def test_loss_per_corpus_when_mixing(corpus, tmp_path):
    """Mixed corpora get a loss each in log.jsonl: the corpus whose depth tokens are noise stays far above
    the one whose tokens are all alike, while the per-modality loss mixes both."""
    clean, noisy = str(tmp_path / "clean"), str(tmp_path / "noisy")
    rng = np.random.default_rng(0)
    for root, make in ((clean, lambda: np.full((N_CROPS, 196), 5, np.int16)),
                       (noisy, lambda: rng.integers(0, 16, (N_CROPS, 196)).astype(np.int16))):
        for s in range(N_SHARDS):
            keys = [f"s{s:03d}-k{k:03d}" for k in range(N_KEYS)]
            shards.write_tar(shards.tar_uri(root, DEPTH, s), [(f"{key}.npy", npy_bytes(make())) for key in keys])
            shards.write_status(shards.status_uri(root, DEPTH, s), [{"key": k, "ok": True} for k in keys])
    result = train(_cfg(corpus, tmp_path / "run", data=(clean, noisy), modalities=(DEPTH,), steps=120,
                        save_every=1000), progress=False)
    assert all(set(e["dataset_losses"]) <= {clean, noisy} for e in result.losses)
    both = [e for e in result.losses[-20:] if len(e["dataset_losses"]) == 2]
    assert len(both) >= 10
    low = np.mean([e["dataset_losses"][clean] for e in both])
    high = np.mean([e["dataset_losses"][noisy] for e in both])
    mixed = np.mean([e["losses"][DEPTH] for e in both])
    assert low < 0.5 * high and low < mixed < high, (low, mixed, high)
    # one root: no breakdown
    single = train(_cfg(corpus, tmp_path / "one", modalities=(DEPTH,), steps=1), progress=False)
    assert "dataset_losses" not in single.losses[0]

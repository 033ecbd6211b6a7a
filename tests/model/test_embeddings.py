"""Embedding inputs (t5_caption, ml-4m's seq_emb): input-only masking, the loader's join by key, the model's
projection and positions, checkpoints, and learning from the vectors."""

import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from omniforge import codecs, shards
from omniforge.errors import ConfigError
from omniforge.model._cli import add_sample_cli
from omniforge.model.checkpoint import load_model
from omniforge.model.data import DataConfig, committed_shards, labels_root, make_loader
from omniforge.model.fm import FourM, model_config
from omniforge.model.masking import Masker, MaskingConfig
from omniforge.model.specs import specs_for
from omniforge.model.train import TrainConfig, main, train
from _helpers import npy_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T5, DEPTH = "t5_caption", "tok_depth@224"
L, D = 77, 4096
N_SHARDS, N_KEYS, N_CLASSES = 2, 6, 4
PROTOTYPES = np.random.default_rng(7).normal(size=(N_CLASSES, D)).astype(np.float16)


def _vectors(s, k):
    """The valid vectors of key k of shard s: 3 + k of them, vector j = its class prototype * (1 + j) + noise, so
    every vector carries the class and each is different."""
    n = 3 + k
    noise = np.random.default_rng(100 * s + k).normal(scale=0.1, size=(n, D))
    return (PROTOTYPES[(s + k) % N_CLASSES] * (1 + np.arange(n))[:, None] / n + noise).astype(np.float16)


def _npz(vectors):
    emb = np.zeros((1, L, D), np.float16)
    emb[0, :len(vectors)] = vectors
    return codecs.encode("npz", {"emb": emb, "mask_valid": (np.arange(L) < len(vectors))[None]})


def _status(root, folder, s, keys):
    shards.write_status(shards.status_uri(root, folder, s), [{"key": k, "ok": True} for k in keys])


def _write_corpus(root, gaps=True):
    """Depth "tokens" = the key's class at every position (one crop), and t5_caption labels. With ``gaps``, key
    k5 of every shard has no t5_caption (its caption failed), key "x-extra" has a t5_caption but no tokens (it
    was not tokenized), and shard 2 has t5_caption labels only."""
    manifest = {"key": [], "shard": []}
    for s in range(N_SHARDS + 1):
        keys = [f"s{s}-k{k}" for k in range(N_KEYS)]
        manifest["key"] += keys
        manifest["shard"] += [s] * len(keys)
        if s == N_SHARDS and not gaps:
            break
        t5 = [(f"{key}.npz", _npz(_vectors(s, k))) for k, key in enumerate(keys) if k != N_KEYS - 1 or not gaps]
        if s == 0 and gaps:
            t5.append(("x-extra.npz", _npz(_vectors(9, 1))))
        shards.write_tar(shards.tar_uri(root, T5, s), t5)
        _status(root, T5, s, [name.split(".")[0] for name, _ in t5])
        if s == N_SHARDS:
            continue
        depth = [(f"{key}.npy", npy_bytes(np.full((1, 196), (s + k) % N_CLASSES, np.int16)))
                 for k, key in enumerate(keys)]
        shards.write_tar(shards.tar_uri(root, DEPTH, s), depth)
        _status(root, DEPTH, s, keys)
    manifest["key"].append("x-extra")
    manifest["shard"].append(0)
    shards.write_parquet(shards.manifest_uri(root), pa.table(manifest))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(str(tmp_path_factory.mktemp("t5")))


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """Every key has both folders."""
    return _write_corpus(str(tmp_path_factory.mktemp("t5-complete")), gaps=False)


def _masker(input_tokens=200, keep="all", target=DEPTH):
    specs = specs_for([T5, DEPTH], 1)
    cfg = MaskingConfig(alphas=[{T5: 1.0, DEPTH: 0.0}], target_alphas=[{T5: 5.0, DEPTH: 1.0}],
                        keep_scheme={T5: keep}, input_tokens=input_tokens, target_tokens=64)
    return Masker(cfg, specs, sentinel_ids=[], eos_id=3)


def test_spec_and_masking_follow_ml4m():
    spec = specs_for([T5], 1)[T5]
    assert (spec.kind, spec.num_tokens, spec.width, spec.source, spec.input_only) == ("embedding", L, D, T5, True)
    assert MaskingConfig.uniform([T5, DEPTH]).input_only == (T5,)
    yaml_like = {"alphas_mixture": {"t5_caption": {"input_alphas": [1.0], "target_alphas": [0.5], "keep": ["all"]},
                                    "tok_depth@224": {"input_alphas": [0.0], "target_alphas": [1.0]}}}
    assert MaskingConfig.from_dict(yaml_like).keep_scheme == {T5: ["all"]}  # ml-4m's name is the folder
    vectors = _vectors(0, 9)  # 12 vectors
    rng = np.random.default_rng(0)
    # keep "all" and room for everything: exactly the valid vectors, in order, then zeros; never a target
    out = _masker(keep="all")({T5: vectors, DEPTH: np.zeros(196, np.int64)}, rng)[T5]
    assert out["tensor"].dtype == torch.float16 and out["tensor"].shape == (L, D)
    assert out["target_mask"].all() and not out["decoder_attention_mask"].any()
    assert torch.equal(~out["input_mask"], torch.arange(L) < 12)  # the budget stops at the 12 valid vectors
    assert torch.equal(out["tensor"][:12], torch.from_numpy(vectors)) and not out["tensor"][12:].any()
    # a small budget: span masking, each hidden span one zero vector, the rest in order, within the budget
    masker = _masker(input_tokens=5, keep="random")
    for _ in range(30):
        out = masker({T5: vectors, DEPTH: np.zeros(196, np.int64)}, rng)[T5]
        n = int((~out["input_mask"]).sum())
        assert 1 <= n <= 5 and not (~out["input_mask"][n:]).any()
        rows = out["tensor"][:n].numpy()
        zero = ~rows.any(axis=1)
        kept = [int(np.flatnonzero((vectors == r).all(axis=1))[0]) for r in rows[~zero]]
        assert kept == sorted(kept)  # kept vectors keep their order
        hidden = sorted(set(range(12)) - set(kept))
        spans = sum(1 for i in hidden if i - 1 not in hidden)
        assert zero.sum() == spans  # one sentinel (a zero vector) per hidden span
        assert not any(rows[zero].any(axis=1))
    with pytest.raises(ValueError, match=f"{T5}: expected float vectors"):
        _masker()({T5: np.zeros((3, 10), np.float16), DEPTH: None}, rng)


def _batch(vectors, visible, target):
    return {T5: {"tensor": vectors, "input_mask": ~visible, "target_mask": torch.ones_like(visible)},
            DEPTH: {"tensor": torch.zeros(1, 196, dtype=torch.int64),
                    "input_mask": torch.ones(1, 196, dtype=torch.bool), "target_mask": ~target}}


def test_model_projects_visible_vectors_at_their_rank():
    specs = specs_for([T5, DEPTH], 1)
    torch.manual_seed(0)
    model = FourM(model_config("tiny"), specs).eval()
    assert T5 not in model.heads and model.encoder_tokens[T5].proj.weight.shape == (64, D)
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(1, L, D, generator=g).half()
    visible = torch.arange(L)[None] < 10
    target = torch.zeros(1, 196, dtype=torch.bool)
    target[0, :20] = True
    with torch.no_grad():
        base = model.decoder_logits(_batch(vectors, visible, target))[DEPTH]
        hidden = vectors.clone()
        hidden[0, 30] = -hidden[0, 30]  # not visible: no effect
        assert torch.equal(model.decoder_logits(_batch(hidden, visible, target))[DEPTH], base)
        shown = vectors.clone()
        shown[0, 4] = -shown[0, 4]  # visible: changes the prediction
        assert not torch.allclose(model.decoder_logits(_batch(shown, visible, target))[DEPTH], base)
        # ml-4m's positions: a vector's rank among the visible ones, wherever it sits in the row
        spread = torch.zeros_like(vectors)
        places = torch.arange(10) * 7
        spread[0, places] = vectors[0, :10]
        at = torch.zeros(1, L, dtype=torch.bool)
        at[0, places] = True
        assert torch.allclose(model.decoder_logits(_batch(spread, at, target))[DEPTH], base, atol=1e-5)
        swapped = vectors.clone()
        swapped[0, [2, 3]] = vectors[0, [3, 2]]  # the order matters (positions are embedded)
        assert not torch.allclose(model.decoder_logits(_batch(swapped, visible, target))[DEPTH], base)
    with pytest.raises(ValueError, match="input-only"):
        model(_batch(vectors, visible, target) | {T5: {"tensor": vectors, "input_mask": ~visible,
                                                       "target_mask": ~visible}})

    model.train()
    loss, _ = model(_batch(vectors, visible, target))
    loss.backward()
    assert model.encoder_tokens[T5].proj.weight.grad.abs().sum() > 0  # the loss reaches the projection
    with torch.no_grad():
        assert float(model(_batch(shown, visible, target))[0]) != float(loss)


def test_loader_joins_the_embeddings_by_key(corpus):
    assert committed_shards(corpus, T5) == {0, 1, 2} and committed_shards(corpus, DEPTH) == {0, 1}
    loader = make_loader(DataConfig(root=corpus, folders=(T5, DEPTH), batch_size=4, epochs=1, keys=True),
                         _masker())
    assert loader.dataset.shards == [0, 1]  # shard 2 has embeddings only: no samples
    seen = []
    for batch in loader:
        for i, key in enumerate(batch["__key__"]):
            seen.append(key)
            s, k = (int(part[1:]) for part in key.split("-"))
            assert int(batch[DEPTH]["tensor"][i, 0]) == (s + k) % N_CLASSES
            visible = ~batch[T5]["input_mask"][i]
            if k == N_KEYS - 1:  # no t5_caption: entirely masked, the sample kept
                assert not visible.any()
                continue
            expected = torch.from_numpy(_vectors(s, k))
            assert int(visible.sum()) == len(expected) and torch.equal(batch[T5]["tensor"][i][visible], expected)
    assert sorted(seen) == sorted(f"s{s}-k{k}" for s in range(N_SHARDS) for k in range(N_KEYS))


def test_loader_resumes_exactly_with_embeddings(corpus):
    cfg = DataConfig(root=corpus, folders=(T5, DEPTH), batch_size=3, shuffle_buffer=4, keys=True)
    masker = _masker(input_tokens=6, keep="random")
    it = iter(make_loader(cfg, masker))
    expected = [next(it) for _ in range(7)]  # crosses blocks, shards and an epoch (12 samples / 3)
    first = make_loader(cfg, masker)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = make_loader(cfg, masker)
    resumed.load_state_dict(first.state_dict())
    for want, got in zip(expected[3:], resumed):
        assert got["__key__"] == want["__key__"]
        assert all(torch.equal(got[f][n], want[f][n]) for f in (T5, DEPTH) for n in want[f])


def test_tokens_written_elsewhere_read_the_embeddings_from_their_label_root(corpus, tmp_path):
    tokens = str(tmp_path / "tokens")
    shutil.copytree(os.path.join(corpus, DEPTH), os.path.join(tokens, DEPTH))
    shutil.copytree(os.path.join(corpus, shards.STATUS_DIR, DEPTH), os.path.join(tokens, shards.STATUS_DIR, DEPTH))
    os.makedirs(os.path.join(tokens, shards.RUNS_DIR))
    with open(os.path.join(tokens, shards.RUNS_DIR, "tokenize-1.json"), "w") as f:
        json.dump({"config": {"input": corpus, "output": tokens}}, f)
    labels_root.cache_clear()
    assert labels_root(tokens, T5) == corpus and committed_shards(tokens, T5) == {0, 1, 2}
    batches = [list(make_loader(DataConfig(root=r, folders=(T5, DEPTH), batch_size=4, epochs=1, keys=True),
                                _masker())) for r in (corpus, tokens)]
    for a, b in zip(*batches, strict=True):
        assert a["__key__"] == b["__key__"] and torch.equal(a[T5]["tensor"], b[T5]["tensor"])


def test_trains_on_embeddings_saves_them_and_samples_from_them(complete, tmp_path, capsys):
    """The depth "tokens" are the class each sample's vectors carry: with the embeddings as the only input,
    the loss can fall below log(4) (the best guess without them) only by reading them; the checkpoint keeps the
    trained projection, and sampling from t5_caption gives the tokens back."""
    masking = tmp_path / "masking.yaml"
    masking.write_text(f"alphas: [{{'{T5}': 1.0, '{DEPTH}': 0.0}}]\ntarget_alphas: [{{'{T5}': 0.0, '{DEPTH}': 1.0}}]\n"
                       f"keep_scheme: {{'{T5}': all}}\n")  # "random" may hide every vector of a sample
    out, corpus = str(tmp_path / "run"), complete
    cfg = TrainConfig(data=corpus, modalities=(T5, DEPTH), out=out, masking=str(masking), input_tokens=8,
                      target_tokens=32, batch_size=6, steps=100, lr=3e-3, warmup_steps=10, final_lr=1e-4,
                      shuffle_buffer=12, tensorboard=False, device="cpu", save_every=100)
    result = train(cfg, progress=False)
    last = np.mean([e["losses"][DEPTH] for e in result.losses[-10:]])
    assert last < 0.25 * np.log(N_CLASSES), last

    from safetensors.torch import load_file

    model, specs, config = load_model(out)
    assert config["specs"][T5]["kind"] == "embedding" and specs[T5].width == D
    saved = load_file(os.path.join(out, "checkpoint-100", "model.safetensors"))["encoder_tokens.t5_caption.proj.weight"]
    torch.manual_seed(cfg.seed)
    initial = FourM(model_config("tiny"), specs).encoder_tokens[T5].proj.weight
    assert torch.equal(model.encoder_tokens[T5].proj.weight, saved) and not torch.allclose(saved, initial)

    parser = argparse.ArgumentParser()
    add_sample_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "--checkpoint", out, "--input", corpus, "--key", "s1-k2", "--from", T5,
                              "--to", "depth", "--out", str(tmp_path / "samples"), "--temperature", "0",
                              "--steps", "1"])
    assert args.fn(args) == 0
    generated = np.load(tmp_path / "samples" / "s1-k2" / f"{DEPTH}.npy")[0]
    assert (generated == (1 + 2) % N_CLASSES).mean() > 0.9
    assert os.path.getsize(tmp_path / "samples" / "s1-k2" / "sample.png") > 0
    assert f"{T5} -> {DEPTH}" in capsys.readouterr().out
    args = parser.parse_args(["sample", "--checkpoint", out, "--input", corpus, "--key", "s1-k2", "--from", "depth",
                              "--to", T5, "--out", str(tmp_path / "samples")])
    with pytest.raises(ConfigError, match="input-only"):
        args.fn(args)


def test_train_cli_takes_the_embedding_folder(corpus, tmp_path, capsys):
    rc = main(["--config", "tiny", "--data", corpus, "--modalities", f"{T5},{DEPTH}", "--out", str(tmp_path / "cli"),
               "--steps", "2", "--batch-size", "2", "--input-tokens", "8", "--target-tokens", "8", "--device", "cpu",
               "--no-tensorboard", "--no-progress"])
    assert rc == 0 and "trained tiny steps 1..2" in capsys.readouterr().out
    assert (tmp_path / "cli" / "checkpoint-2" / "model.safetensors").exists()
    empty = tmp_path / "no-labels"
    shutil.copytree(os.path.join(corpus, DEPTH), empty / DEPTH)
    shutil.copytree(os.path.join(corpus, shards.STATUS_DIR, DEPTH), empty / shards.STATUS_DIR / DEPTH)
    rc = main(["--data", str(empty), "--modalities", f"{T5},{DEPTH}", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "omniforge label --modalities t5_caption" in capsys.readouterr().err

"""`omniforge tokenizer train` on label shards the tests write themselves (tiny models, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge import shards
from omniforge.tokenize.crops import CropConfig
from omniforge.tokenize.models import load_tokenizer
from omniforge.tokenize._cli import add_cli
from omniforge.tokenize.train import TokenizerTrainConfig as TrainConfig, lr_at, train_tokenizer
from _helpers import blob_depth_labels, write_label_shards
from _helpers import tokenizer_train_config as _cfg


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory) -> str:
    return blob_depth_labels(str(tmp_path_factory.mktemp("labels")))


def test_depth_tokenizer_learns_and_is_servable(depth_root, tmp_path):
    out = str(tmp_path / "tok")
    result = train_tokenizer(_cfg(depth_root, out), progress=False)

    directory = os.path.join(out, "depth")
    assert result.directory == directory
    assert result.epochs == 3
    # 12 ok samples, a quarter (3) held out -> 9 training samples -> ceil(9 / 4) = 3 steps per epoch
    assert result.steps == 3 * 3
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert result.history[-1]["loss"] < 0.8 * result.history[1]["loss"]
    assert last["heldout_loss"] < 0.8 * first["heldout_loss"]
    assert last["mse"] < 0.8 * first["mse"]
    assert last["psnr"] > first["psnr"] + 1.0
    assert 0 < last["code_usage"] <= 1 and last["perplexity"] >= 1
    assert all(h["samples_per_s"] > 0 for h in result.history[1:])

    for name in ("config.json", "model.safetensors", "train_state.json", "train_state.safetensors",
                 "history.jsonl", "loss.png", "reconstruction.png"):
        assert os.path.getsize(os.path.join(directory, name)) > 0, name
    with open(os.path.join(directory, "history.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2, 3]

    # the servable tokenizer reproduces the held-out quality the history reports
    from omniforge.tokenize.crops import crop_dense, crop_settings
    from omniforge.tokenize.kinds import kind_for

    model = load_tokenizer(directory)
    held_out = []
    for name, data in shards.iter_tar(shards.tar_uri(depth_root, "depth", 1)):
        key = shards.member_key(name)
        if key in ("img009", "img010", "img011"):  # the last quarter of the keys
            arr = codecs.decode("png", data)
            held_out.append(crop_dense(arr, crop_settings(key, *arr.shape, CropConfig())[0], 224, mode="bilinear"))
    kind = kind_for("depth")
    x = kind.prepare(held_out)
    with torch.no_grad():
        ids = model.encode(x)
        q = kind.quality(x, model.decode(ids))
    assert ids.shape == (3, 196)
    assert q["psnr"] == pytest.approx(last["psnr"], abs=1e-3)


def test_resume_continues_from_the_saved_epoch(depth_root, tmp_path):
    out = str(tmp_path / "tok")
    first = train_tokenizer(_cfg(depth_root, out, epochs=1, max_samples=4, batch_size=2), progress=False)
    assert first.epochs == 1 and [h["epoch"] for h in first.history] == [0, 1]
    saved_step = first.steps

    second = train_tokenizer(_cfg(depth_root, out, epochs=2, max_samples=4, batch_size=2), progress=False)
    assert second.epochs == 2
    assert [h["epoch"] for h in second.history] == [0, 1, 2]
    assert second.history[:2] == first.history  # the first epoch was not trained again
    assert second.steps == 2 * saved_step
    with open(os.path.join(out, "depth", "train_state.json"), encoding="utf-8") as f:
        assert json.load(f)["epoch"] == 2

    done = train_tokenizer(_cfg(depth_root, out, epochs=2, max_samples=4, batch_size=2), progress=False)
    assert done.steps == second.steps and done.history == second.history  # nothing left to do

    restarted = train_tokenizer(_cfg(depth_root, out, epochs=1, max_samples=4, batch_size=2, restart=True),
                                progress=False)
    assert [h["epoch"] for h in restarted.history] == [0, 1] and restarted.steps == saved_step


def test_resume_refuses_a_different_model_config(depth_root, tmp_path, monkeypatch):
    from omniforge.tokenize.kinds import VQVAEKind

    out = str(tmp_path / "tok")
    train_tokenizer(_cfg(depth_root, out, epochs=1, max_samples=4, batch_size=2), progress=False)
    original = VQVAEKind.config

    def wider(self, size="tiny"):
        cfg = original(self, size)
        cfg.dim = 128
        return cfg

    monkeypatch.setattr(VQVAEKind, "config", wider)
    with pytest.raises(ConfigError, match="--restart"):
        train_tokenizer(_cfg(depth_root, out, epochs=2, max_samples=4, batch_size=2), progress=False)


def test_text_tokenizer_from_caption_shards(tmp_path):
    from tokenizers import Tokenizer

    root = str(tmp_path / "labels")
    captions = {
        "a": "a dog runs on the beach",
        "b": "two cats sleep on a red sofa",
        "c": "a man rides a bike in the city",
        "d": "the dog and the cat",
    }
    write_label_shards(root, "caption", "txt", captions, failed=("e",))
    out = str(tmp_path / "tok")
    result = train_tokenizer(TrainConfig(data=root, modality="caption", out=out), progress=False)

    path = os.path.join(out, "text", "tokenizer.json")
    assert result.directory == os.path.join(out, "text")
    tok = Tokenizer.from_file(path)
    for special in ("[PAD]", "[UNK]", "[SOS]", "[EOS]", "[S_0]", "[S_199]"):
        assert tok.token_to_id(special) is not None, special
    (entry,) = result.history
    assert entry["vocab_size"] == tok.get_vocab_size()
    assert entry["captions"] == 4
    # the vocabulary (30k) is far larger than this corpus: every training word is a whole token, no [UNK]
    words = [len(c.split()) for c in captions.values()]
    assert entry["mean_tokens"] == pytest.approx(sum(words) / len(words))
    assert entry["unk_rate"] == 0.0


def test_sam_mask_tokenizer_trains_on_instances(tmp_path):
    from pycocotools import mask as mask_utils

    root = str(tmp_path / "labels")
    h, w = 48, 64
    labels = {}
    for i in range(4):
        instances = []
        for j in range(3):
            m = np.zeros((h, w), np.uint8, order="F")
            m[4 + 3 * j:30 + 4 * i, 5 + 6 * j:40 + 3 * i] = 1
            rle = mask_utils.encode(m)
            rle["counts"] = rle["counts"].decode("ascii")
            ys, xs = np.nonzero(m)
            instances.append({"segmentation": rle, "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                            int(ys.max()) + 1],
                              "score": 0.9, "stability_score": 0.9, "area": int(m.sum())})
        labels[f"s{i}"] = {"instances": instances, "image_size": [h, w]}
    write_label_shards(root, "sam_instance", "json", labels)
    out = str(tmp_path / "tok")
    result = train_tokenizer(TrainConfig(data=root, modality="sam_instance", out=out, epochs=1, batch_size=4),
                             progress=False)
    assert result.directory == os.path.join(out, "sam_mask")
    # 3 training samples x 3 instances = 9 masks -> ceil(9 / 4) = 3 steps
    assert result.steps == 3
    assert "iou" in result.history[-1] and 0 <= result.history[-1]["iou"] <= 1
    assert load_tokenizer(result.directory).config.name == "sam_mask"
    assert os.path.exists(os.path.join(result.directory, "reconstruction.png"))


def test_missing_data_is_a_config_error(tmp_path, depth_root):
    with pytest.raises(ConfigError, match=r"no normal labels under .*omniforge label --modalities normal"):
        train_tokenizer(TrainConfig(data=str(tmp_path), modality="normal", out=str(tmp_path / "o")), progress=False)
    with pytest.raises(ConfigError, match="no caption labels"):
        train_tokenizer(TrainConfig(data=depth_root, modality="caption", out=str(tmp_path / "o")), progress=False)


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="unknown modality"):
        TrainConfig(data=str(tmp_path), modality="nope", out=str(tmp_path))
    with pytest.raises(ConfigError, match="det is tokenized with the shared text tokenizer, trained with --modality "
                                          "caption"):
        TrainConfig(data=str(tmp_path), modality="det", out=str(tmp_path))
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(data=str(tmp_path), modality="depth", out=str(tmp_path), epochs=0)
    with pytest.raises(ConfigError, match="size"):
        TrainConfig(data=str(tmp_path), modality="depth", out=str(tmp_path), size="huge")


def test_lr_schedule_warms_up_then_decays():
    kw = dict(total=100, warmup=10, peak=1e-3, final_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(55, **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way through the cosine
    assert lr_at(100, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cli_parses_into_the_handler(depth_root, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="omniforge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    out = str(tmp_path / "tok")
    args = parser.parse_args(["tokenizer", "train", "--data", depth_root, "--modality", "depth", "--out", out,
                              "--epochs", "1", "--batch-size", "4", "--max-samples", "4", "--device", "cpu",
                              "--no-progress"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"depth tokenizer -> {os.path.join(out, 'depth')}") and "psnr" in printed


@pytest.mark.slow
def test_torchrun_two_processes_gloo(depth_root, tmp_path):
    out = str(tmp_path / "tok")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "omniforge.tokenize.train", "--data", depth_root, "--modality", "depth", "--out", out, "--epochs", "1",
           "--batch-size", "2", "--max-samples", "8", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "depth", "train_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    # 8 samples, 2 held out -> 6 training samples over 2 ranks x batch 2 -> 2 steps per epoch
    assert state["epoch"] == 1 and state["step"] == 2
    assert proc.stdout.count("depth tokenizer ->") == 1  # only rank 0 reports

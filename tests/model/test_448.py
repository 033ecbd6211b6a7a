"""The trainer at 448: tok_rgb@448 (784 tokens on a 28 x 28 grid) and rgb@448 pixels, trained, sampled, decoded."""

import argparse

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from omniforge import shards
from omniforge.model._cli import add_sample_cli
from omniforge.model._layers import sincos_2d
from omniforge.model.fm import FourM, model_config
from omniforge.model.specs import specs_for
from omniforge.model.train import TrainConfig, train
from omniforge.tokenize.kinds import kind_for
from _helpers import jpg_bytes, npy_bytes

TOK448, PIX448, TOK224 = "tok_rgb@448", "rgb@448", "tok_rgb@224"
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 240, 240]], dtype=np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two shards of 448 x 448 rgb labels, each 16 x 16 patch a solid colour, with their crop settings (the
    whole image) and tok_rgb@448 "tokens" equal to each patch's colour index."""
    root = str(tmp_path_factory.mktemp("res448"))
    manifest = {"key": [], "shard": []}
    for s in range(2):
        rgb, crops, toks = [], [], []
        for k in range(4):
            key = f"s{s}-k{k}"
            classes = np.random.default_rng(10 * s + k).integers(len(COLOURS), size=(28, 28))
            rgb.append((f"{key}.jpg", jpg_bytes(np.kron(COLOURS[classes], np.ones((16, 16, 1), np.uint8)))))
            crops.append((f"{key}.npy", npy_bytes(np.array([[0, 0, 448, 448, 0]], dtype=np.int32))))
            toks.append((f"{key}.npy", npy_bytes(classes.reshape(1, 784).astype(np.int16))))
            manifest["key"].append(key)
            manifest["shard"].append(s)
        for folder, members in (("rgb", rgb), (shards.CROP_SETTINGS, crops), (TOK448, toks)):
            shards.write_tar(shards.tar_uri(root, folder, s), members)
            shards.write_status(shards.status_uri(root, folder, s),
                                [{"key": name.split(".")[0], "ok": True} for name, _ in members])
    shards.write_parquet(shards.manifest_uri(root), pa.table(manifest))
    return root


def test_448_folders_are_28_by_28_images():
    specs = specs_for([TOK448, PIX448, TOK224], 1)
    assert (specs[TOK448].kind, specs[TOK448].num_tokens, specs[TOK448].grid, specs[TOK448].vocab_size) == (
        "image", 784, 28, 16384)
    assert (specs[PIX448].kind, specs[PIX448].num_tokens, specs[PIX448].grid, specs[PIX448].source) == (
        "pixels", 784, 28, "rgb")
    assert specs[TOK224].grid == 14
    model = FourM(model_config("tiny"), specs)
    dim = model.config.dim
    assert torch.equal(getattr(model, model._pos_name(TOK448)), sincos_2d(28, dim))
    assert torch.equal(getattr(model, model._pos_name(TOK224)), sincos_2d(14, dim))


def test_trains_and_samples_tok_rgb_448(corpus, tmp_path):
    tokenizers = tmp_path / "tokenizers"  # a tiny rgb tokenizer trained at 224 (128 codes: the head's size)
    torch.manual_seed(0)
    kind = kind_for("rgb")
    kind.save(kind.build(kind.config("tiny")), str(tokenizers / kind.artifact.folder))
    out = str(tmp_path / "run")
    cfg = TrainConfig(data=corpus, modalities=(PIX448, TOK448), out=out, input_tokens=128, target_tokens=128,
                      batch_size=4, steps=2, lr=1e-3, warmup_steps=1, shuffle_buffer=4, tensorboard=False,
                      device="cpu", save_every=2, tokenizers=str(tokenizers))
    result = train(cfg, progress=False)
    assert len(result.losses) == 2 and all(np.isfinite(e["losses"][TOK448]) for e in result.losses)
    parser = argparse.ArgumentParser()
    add_sample_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "--checkpoint", out, "--input", corpus, "--key", "s1-k2", "--from", PIX448,
                              "--to", TOK448, "--out", str(tmp_path / "samples"), "--steps", "2",
                              "--tokenizers", str(tokenizers)])
    assert args.fn(args) == 0
    generated = np.load(tmp_path / "samples" / "s1-k2" / f"{TOK448}.npy")
    assert generated.shape == (1, 784)
    with Image.open(next((tmp_path / "samples" / "s1-k2").glob("*rgb*.png"))) as img:
        assert img.size == (448, 448)  # decoded by the 224 tokenizer at the 448 grid


def test_rgb_448_pixels_are_never_upsampled(corpus, tmp_path):
    """A crop under 448 stored pixels (a corpus tokenized without a @448 target) stops the loader with the fix."""
    import shutil

    from omniforge.errors import CorpusError
    from omniforge.model.data import DataConfig, make_loader
    from omniforge.model.masking import Masker, MaskingConfig

    root = str(tmp_path / "small")
    shutil.copytree(corpus, root)
    for s in range(2):
        members = [(f"s{s}-k{k}.npy", npy_bytes(np.array([[0, 0, 300, 300, 0]], dtype=np.int32))) for k in range(4)]
        shards.write_tar(shards.tar_uri(root, shards.CROP_SETTINGS, s), members)
    specs = specs_for([PIX448, TOK448], 1)
    masker = Masker(MaskingConfig.uniform([PIX448, TOK448]), specs, sentinel_ids=[], eos_id=3)
    with pytest.raises(CorpusError, match=r"covers 300 x 300 stored pixels, under the 448 of rgb@448: .*rgb,rgb@448"):
        next(iter(make_loader(DataConfig(root=root, folders=(PIX448, TOK448), batch_size=2, epochs=1), masker)))

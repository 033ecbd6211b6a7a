"""Raw-pixel input (rgb@224): patches, input-only masking, the loader's crops, and learning from pixels."""

import argparse
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from omniforge import shards
from omniforge.errors import ConfigError
from omniforge.model._cli import add_sample_cli
from omniforge.model.data import DataConfig, committed_shards, make_loader
from omniforge.model.fm import FourM, model_config
from omniforge.model.masking import Masker, MaskingConfig
from omniforge.model.specs import patchify, resolve_folder, specs_for, unpatchify
from omniforge.model.train import TrainConfig, train
from _helpers import jpg_bytes, npy_bytes

RGB, DEPTH = "rgb@224", "tok_depth@224"
COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 240, 240]], dtype=np.uint8)
N_SHARDS, N_KEYS = 2, 6


def _classes(seed):
    """A random colour class per patch."""
    return np.random.default_rng(seed).integers(len(COLOURS), size=(14, 14))


def _solid(seed):
    """One colour class for the whole image."""
    return np.full((14, 14), seed % len(COLOURS))


def _image(classes):
    """224 x 224: every 16 x 16 patch one solid colour from ``classes``."""
    return np.kron(COLOURS[classes], np.ones((16, 16, 1), dtype=np.uint8)).astype(np.uint8)


def _write_corpus(root, class_fn):
    """rgb label shards (224 x 224 JPEGs of coloured patches) and crop settings, with depth "tokens" equal to
    each patch's colour index under that crop: crop 0 is the whole image, crop 1 the whole image mirrored.
    One key per shard has an image but no crop settings (its tokenization failed): it is no sample."""
    manifest = {"key": [], "shard": []}
    for s in range(N_SHARDS):
        keys = [f"s{s}-k{k}" for k in range(N_KEYS)]
        rgb, crops, depth = [], [], []
        for k, key in enumerate(keys):
            classes = class_fn(100 * s + k)
            rgb.append((f"{key}.jpg", jpg_bytes(_image(classes))))
            manifest["key"].append(key)
            manifest["shard"].append(s)
            if k == N_KEYS - 1:
                continue
            crop = np.array([[0, 0, 224, 224, 0], [0, 0, 224, 224, 1]], dtype=np.int32)
            crops.append((f"{key}.npy", npy_bytes(crop)))
            tokens = np.stack([classes.ravel(), classes[:, ::-1].ravel()]).astype(np.int16)
            depth.append((f"{key}.npy", npy_bytes(tokens)))
        for folder, members in (("rgb", rgb), (shards.CROP_SETTINGS, crops), (DEPTH, depth)):
            shards.write_tar(shards.tar_uri(root, folder, s), members)
            shards.write_status(shards.status_uri(root, folder, s),
                                [{"key": name.split(".")[0], "ok": True} for name, _ in members])
    shards.write_parquet(shards.manifest_uri(root), pa.table(manifest))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(str(tmp_path_factory.mktemp("pixels")), _classes)


@pytest.fixture(scope="module")
def solid(tmp_path_factory):
    return _write_corpus(str(tmp_path_factory.mktemp("solid")), _solid)


def test_patchify_layout_and_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    patches = patchify(image, 16)
    assert patches.shape == (196, 768) and patches.dtype == np.uint8
    assert np.array_equal(patches[14 * 3 + 5].reshape(16, 16, 3), image[48:64, 80:96])  # row 3, column 5
    assert np.array_equal(unpatchify(patches, 16), image)


def test_pixels_are_input_only_whatever_the_alphas():
    specs = specs_for([RGB, DEPTH], 1)
    assert specs[RGB].kind == "pixels" and specs[RGB].num_tokens == 196 and specs[RGB].patch_dim == 768
    cfg = MaskingConfig(alphas=[{RGB: 1.0, DEPTH: 1.0}], target_alphas=[{RGB: 5.0, DEPTH: 0.1}],
                        input_tokens=100, target_tokens=150)
    masker = Masker(cfg, specs, sentinel_ids=[], eos_id=3)
    patches = patchify(_image(_classes(1)), 16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = masker({RGB: patches, DEPTH: _classes(1).ravel()}, rng)
        assert out[RGB]["tensor"].dtype == torch.uint8 and out[RGB]["tensor"].shape == (196, 768)
        assert out[RGB]["target_mask"].all()
        visible = ~out[RGB]["input_mask"]
        assert torch.equal(out[RGB]["tensor"][visible], torch.from_numpy(patches)[visible])
    assert MaskingConfig.uniform([RGB, DEPTH]).input_only == (RGB,)
    both = specs_for([RGB, "tok_rgb@224", DEPTH], 1)
    assert resolve_folder("rgb", both) == RGB and resolve_folder("rgb", both, target=True) == "tok_rgb@224"
    assert resolve_folder("depth", both) == DEPTH


def test_loader_crops_pixels_like_the_tokens(corpus):
    specs = specs_for([RGB, DEPTH], 1)
    assert committed_shards(corpus, RGB) == {0, 1}
    masking = MaskingConfig(alphas=[{RGB: 1.0, DEPTH: 0.0}], target_alphas=[{RGB: 0.0, DEPTH: 1.0}],
                            input_tokens=196, target_tokens=196)
    masker = Masker(masking, specs, sentinel_ids=[], eos_id=3)
    loader = make_loader(DataConfig(root=corpus, folders=(RGB, DEPTH), batch_size=4, epochs=1, keys=True), masker)
    keys, crops_seen = [], set()
    for batch in loader:
        for i, key in enumerate(batch["__key__"]):
            keys.append(key)
            crop = int(batch["__crop__"][i])
            crops_seen.add(crop)
            assert batch[RGB]["input_mask"][i].sum() == 0  # all 196 patches visible
            image = unpatchify(batch[RGB]["tensor"][i].numpy(), 16)
            # The mean colour of each patch names its class, which must be the depth "token" of that crop.
            means = image.reshape(14, 16, 14, 16, 3).mean(axis=(1, 3))
            nearest = np.abs(means[:, :, None, :] - COLOURS[None, None].astype(float)).sum(-1).argmin(-1)
            assert np.array_equal(nearest.ravel(), batch[DEPTH]["tensor"][i].numpy())
    assert sorted(keys) == sorted(f"s{s}-k{k}" for s in range(N_SHARDS) for k in range(N_KEYS - 1))
    assert crops_seen == {0, 1}


def test_tokens_written_elsewhere_crop_the_labels_they_came_from(corpus, tmp_path):
    """`omniforge tokenize --output TOKENS`: the rgb labels stay in the label root, which the token root's
    tokenize run record names; the loader and `omniforge sample` read the pixels from there."""
    import json
    import shutil

    from omniforge.model.data import labels_root
    from omniforge.model.sample import read_input

    tokens = str(tmp_path / "tokens")
    for folder in (shards.CROP_SETTINGS, DEPTH):
        shutil.copytree(os.path.join(corpus, folder), os.path.join(tokens, folder))
        status = os.path.join(shards.STATUS_DIR, folder)
        shutil.copytree(os.path.join(corpus, status), os.path.join(tokens, status))
    os.makedirs(os.path.dirname(shards.manifest_uri(tokens)))
    shutil.copy(shards.manifest_uri(corpus), shards.manifest_uri(tokens))  # as tokenize --output copies it
    assert committed_shards(tokens, RGB) == set() and labels_root(tokens, RGB) == tokens  # no record yet
    labels_root.cache_clear()
    record = {"job": "tokenize", "config": {"input": os.path.abspath(corpus), "output": tokens}}
    os.makedirs(os.path.join(tokens, shards.RUNS_DIR), exist_ok=True)
    with open(os.path.join(tokens, shards.RUNS_DIR, "tokenize-1.json"), "w") as f:
        json.dump(record, f)
    assert labels_root(tokens, RGB) == os.path.abspath(corpus) and labels_root(tokens, DEPTH) == tokens
    assert committed_shards(tokens, RGB) == {0, 1}

    specs = specs_for([RGB, DEPTH], 1)
    masker = Masker(MaskingConfig.uniform([RGB, DEPTH], input_tokens=64, target_tokens=64), specs,
                    sentinel_ids=[], eos_id=3)

    def batches(root):
        loader = make_loader(DataConfig(root=root, folders=(RGB, DEPTH), batch_size=4, epochs=1, keys=True), masker)
        return list(loader)

    for a, b in zip(batches(corpus), batches(tokens), strict=True):
        assert a["__key__"] == b["__key__"] and torch.equal(a[RGB]["tensor"], b[RGB]["tensor"])
    assert np.array_equal(read_input(tokens, specs[RGB], "s1-k2"), read_input(corpus, specs[RGB], "s1-k2"))


def test_model_embeds_visible_patches_only():
    specs = specs_for([RGB, DEPTH], 1)
    torch.manual_seed(0)
    model = FourM(model_config("tiny"), specs).eval()
    assert RGB not in model.heads and DEPTH in model.heads
    patches = torch.from_numpy(patchify(_image(_classes(3)), 16))[None]
    input_mask = torch.ones(1, 196, dtype=torch.bool)
    input_mask[0, :98] = False
    target = torch.ones(1, 196, dtype=torch.bool)
    target[0, 150:] = False

    def batch(pixels, pixel_targets=None):
        return {RGB: {"tensor": pixels, "input_mask": input_mask,
                      "target_mask": pixel_targets if pixel_targets is not None else torch.ones_like(input_mask)},
                DEPTH: {"tensor": torch.zeros(1, 196, dtype=torch.int64),
                        "input_mask": torch.ones_like(input_mask), "target_mask": target}}

    with torch.no_grad():
        base = model.decoder_logits(batch(patches))[DEPTH]
        hidden = patches.clone()
        hidden[0, 120] = 255 - hidden[0, 120]  # a masked patch: no effect
        assert torch.equal(model.decoder_logits(batch(hidden))[DEPTH], base)
        shown = patches.clone()
        shown[0, 10] = 255 - shown[0, 10]  # a visible patch: changes the prediction
        assert not torch.allclose(model.decoder_logits(batch(shown))[DEPTH], base)
    with pytest.raises(ValueError, match="input-only"):
        model(batch(patches, pixel_targets=~input_mask))


def test_learns_tokens_from_pixels_and_samples_them(solid, tmp_path, capsys):
    """Each image is one of 4 colours and its depth "tokens" are that colour's index: with the pixels as the
    only input, the loss can only fall below log(4) (the best guess without them) by reading the pixels, and
    sampling from rgb must give the tokens back."""
    corpus = solid
    masking = tmp_path / "masking.yaml"
    masking.write_text(f"alphas: [{{'{RGB}': 1.0, '{DEPTH}': 0.0}}]\n"
                       f"target_alphas: [{{'{RGB}': 0.0, '{DEPTH}': 1.0}}]\n")
    out = str(tmp_path / "run")
    cfg = TrainConfig(data=corpus, modalities=(RGB, DEPTH), out=out, masking=str(masking), input_tokens=196,
                      target_tokens=64, batch_size=5, steps=60, lr=3e-3, warmup_steps=10, final_lr=1e-4,
                      shuffle_buffer=16, tensorboard=False, device="cpu", save_every=120)
    result = train(cfg, progress=False)
    last = np.mean([e["losses"][DEPTH] for e in result.losses[-5:]])
    assert last < 0.25 * np.log(len(COLOURS)), last

    parser = argparse.ArgumentParser()
    add_sample_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "--checkpoint", out, "--input", corpus, "--key", "s1-k2", "--from", "rgb",
                              "--to", "depth", "--out", str(tmp_path / "samples"), "--temperature", "0",
                              "--steps", "1"])  # one round: depth never was an input in this training
    assert args.fn(args) == 0
    generated = np.load(tmp_path / "samples" / "s1-k2" / f"{DEPTH}.npy")[0]
    accuracy = (generated == _solid(102).ravel()).mean()
    assert accuracy > 0.9, accuracy
    assert os.path.getsize(tmp_path / "samples" / "s1-k2" / "sample.png") > 0
    # `omniforge show` draws a sample output directory too
    from omniforge.pipeline.show import load_generated, show

    values = load_generated(str(tmp_path / "samples" / "s1-k2"))
    assert list(values) == [DEPTH] and np.array_equal(values[DEPTH][0], generated)
    drawn = show(str(tmp_path / "samples"), "s1-k2", str(tmp_path / "drawn.png"))
    with Image.open(drawn) as img:
        assert img.width > 200
    assert "rgb@224" in capsys.readouterr().out

    args = parser.parse_args(["sample", "--checkpoint", out, "--input", corpus, "--key", "s1-k2", "--from", "depth",
                              "--to", RGB, "--out", str(tmp_path / "samples")])
    with pytest.raises(ConfigError, match="input-only"):
        args.fn(args)

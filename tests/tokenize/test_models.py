"""Tokenizer models: the contract every tokenizer meets, the array conversions, metrics, persistence, learning."""

import json
import math
import os

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.tokenize.memcodes import Memcodes
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.models import TokenizerConfig, build_tokenizer, codebook_stats, load_tokenizer, save_tokenizer

# The label layout each tokenizer eats, written out from the label formats (not read from the code under test).
LABELS = {
    "rgb": ((224, 224, 3), np.uint8),
    "normal": ((224, 224, 3), np.uint8),
    "depth": ((224, 224), np.uint16),
    "canny_edge": ((224, 224), np.uint8),
    "sam_edge": ((224, 224), np.uint8),
    "semseg_coco": ((224, 224), np.uint8),
    "clip": ((14, 14, 512), np.float16),
    "dinov2": ((16, 16, 768), np.float16),
    "imagebind": ((16, 16, 1280), np.float16),
    "dinov2_global": ((768,), np.float16),
    "imagebind_global": ((1280,), np.float16),
    "sam_mask": ((64, 64), np.uint8),
}
# (prepared batch shape without B, dtype, tokens, decode() output shape without B)
MODEL_SPACE = {
    "rgb": ((3, 224, 224), torch.float32, 196, (3, 224, 224)),
    "normal": ((3, 224, 224), torch.float32, 196, (3, 224, 224)),
    "depth": ((1, 224, 224), torch.float32, 196, (1, 224, 224)),
    "canny_edge": ((1, 224, 224), torch.float32, 196, (1, 224, 224)),
    "sam_edge": ((1, 224, 224), torch.float32, 196, (1, 224, 224)),
    "semseg_coco": ((224, 224), torch.int64, 196, (134, 224, 224)),
    "clip": ((512, 14, 14), torch.float32, 196, (512, 14, 14)),
    "dinov2": ((768, 16, 16), torch.float32, 256, (768, 16, 16)),
    "imagebind": ((1280, 16, 16), torch.float32, 256, (1280, 16, 16)),
    "dinov2_global": ((768,), torch.float32, 16, (768,)),
    "imagebind_global": ((1280,), torch.float32, 16, (1280,)),
    "sam_mask": ((1, 64, 64), torch.float32, 16, (1, 64, 64)),
}


TOKENIZER_NAMES = tuple(LABELS)


def _kind(name):
    """The tokenizer kind behind a tokenizer folder name (sam_mask is sam_instance's mask tokenizer)."""
    return kind_for("sam_instance" if name == "sam_mask" else name)


def default_config(name, size="tiny"):
    return _kind(name).config(size)


def prepare(name, arrays):
    return _kind(name).prepare(arrays)


def restore(name, x):
    return _kind(name).restore(x)


def quality(name, x, recon):
    return _kind(name).quality(x, recon)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(name, n, seed=0):
    shape, dtype = LABELS[name]
    rng = np.random.default_rng(seed)
    if name == "semseg_coco":
        a = rng.integers(0, 133, size=(n, *shape)).astype(np.uint8)
        a[:, :20] = 255  # a band of "none"
        return list(a)
    if name == "sam_mask":
        return list(rng.integers(0, 2, size=(n, *shape)).astype(np.uint8))
    if np.issubdtype(dtype, np.floating):
        return list(rng.normal(size=(n, *shape)).astype(dtype))
    return list(rng.integers(0, np.iinfo(dtype).max, size=(n, *shape), endpoint=True).astype(dtype))


def test_names_and_configs():
    from omniforge.modalities import all_modalities

    trained = {kind_for(m).artifact.folder for m in all_modalities() if m.tokenized and kind_for(m).model_kind}
    assert trained == {
        "rgb", "depth", "normal", "semseg_coco", "canny_edge", "sam_edge", "clip", "dinov2", "imagebind",
        "dinov2_global", "imagebind_global", "sam_mask", "human_poses"}
    poses = kind_for("human_poses").config("base")  # ml-4m's human-poses tokenizer: 8 tokens of 1024 codes
    assert (poses.kind, poses.in_channels, poses.num_tokens, poses.codebook_size) == ("global", 207, 8, 1024)
    assert (poses.dim, poses.depth, poses.num_tokens * poses.latent_dim) == (1024, 6, 1024)
    base_codebooks = {"rgb": 16384, "semseg_coco": 4096, "sam_mask": 1024, "depth": 8192, "normal": 8192,
                      "canny_edge": 8192, "sam_edge": 8192, "clip": 8192, "dinov2": 8192, "imagebind": 8192,
                      "dinov2_global": 8192, "imagebind_global": 8192}
    for name in TOKENIZER_NAMES:
        base = default_config(name, "base")
        assert base.codebook_size == base_codebooks[name], name
        assert base.num_tokens == MODEL_SPACE[name][2], name
        if base.kind != "global":
            assert base.latent_dim == 32
            assert (base.dim, base.depth, base.heads) == (768, 12, 12)
            assert base.threshold_ema_dead_code > 0
        tiny = default_config(name)
        assert tiny.num_tokens == base.num_tokens and tiny.codebook_size <= 256
        assert TokenizerConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
    with pytest.raises(ConfigError, match="has no model config"):
        default_config("caption")
    with pytest.raises(ConfigError, match="size"):
        default_config("depth", "huge")
    with pytest.raises(ConfigError, match="num_tokens"):
        TokenizerConfig(**{**default_config("depth").to_dict(), "num_tokens": 100})
    with pytest.raises(ConfigError, match="unknown tokenizer config fields"):
        TokenizerConfig.from_dict({**default_config("depth").to_dict(), "bogus": 1})


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_tokenizer_contract(name, tmp_path):
    torch.manual_seed(0)
    cfg = default_config(name)
    model = build_tokenizer(cfg)
    arrays = synthetic(name, 2)
    x = prepare(name, arrays)
    in_shape, in_dtype, n_tokens, out_shape = MODEL_SPACE[name]
    assert tuple(x.shape) == (2, *in_shape) and x.dtype == in_dtype

    loss, logs = model.loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert {"loss", "recon", "quant"} <= set(logs) and all(isinstance(v, float) for v in logs.values())
    loss.backward()

    model.eval()
    ids = model.encode(x)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, n_tokens)
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg.codebook_size
    assert torch.equal(model.encode(x), ids)  # deterministic

    out = model.decode(ids)
    assert tuple(out.shape) == (2, *out_shape) and torch.isfinite(out).all()
    assert torch.equal(model.reconstruct(x), out)
    restored = restore(name, out)
    shape, dtype = LABELS[name]
    assert len(restored) == 2
    assert all(a.shape == shape and a.dtype == dtype for a in restored)

    save_tokenizer(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == "omniforge-tokenizer" and meta["version"] == 1 and meta["config"]["name"] == name
    loaded = load_tokenizer(str(tmp_path))
    assert not loaded.training and loaded.config == cfg
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), out)

    wrong = np.zeros(tuple(s + 1 for s in shape), dtype=dtype)
    with pytest.raises(SampleError) as err:
        prepare(name, [arrays[0], wrong])
    assert err.value.error_type == "bad_shape" and str(shape) in err.value.message


def test_prepare_scaling_and_restore_inverse():
    depth = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    depth = np.pad(depth, ((0, 222), (0, 222)))
    x = prepare("depth", [depth])
    assert x[0, 0, 0, 0] == -1.0 and x[0, 0, 0, 1] == 1.0 and abs(float(x[0, 0, 1, 0]) - 1 / 65535) < 1e-6
    assert np.array_equal(restore("depth", x)[0], depth)

    rgb = synthetic("rgb", 2)
    x = prepare("rgb", rgb)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(restore("rgb", x), rgb))
    # out-of-range reconstructions are clamped, not wrapped around
    assert restore("canny_edge", torch.full((1, 1, 224, 224), 3.0))[0].min() == 255

    seg = synthetic("semseg_coco", 2)
    ids = prepare("semseg_coco", seg)
    assert int(ids[0, 0, 0]) == 133 and int(ids.max()) == 133 and int(ids.min()) >= 0
    logits = torch.nn.functional.one_hot(ids, 134).permute(0, 3, 1, 2).float()
    assert all(np.array_equal(a, b) for a, b in zip(restore("semseg_coco", logits), seg))

    mask = synthetic("sam_mask", 1)
    assert np.array_equal(restore("sam_mask", prepare("sam_mask", mask))[0], mask[0])

    feats = synthetic("clip", 1)
    x = prepare("clip", feats)
    assert float(x[0, 5, 2, 3]) == float(feats[0][2, 3, 5])  # (h, w, c) -> (c, h, w)
    assert np.array_equal(restore("clip", x)[0], feats[0])


def test_prepare_rejects_bad_samples():
    with pytest.raises(SampleError) as err:
        prepare("depth", [np.zeros((224, 224), np.uint8)])  # 8-bit depth would be mis-scaled
    assert err.value.error_type == "bad_dtype"
    seg = np.zeros((224, 224), np.uint8)
    seg[3, 3] = 140
    with pytest.raises(SampleError) as err:
        prepare("semseg_coco", [seg])
    assert err.value.error_type == "bad_value"
    feats = np.zeros((768,), np.float16)
    feats[7] = np.nan
    with pytest.raises(SampleError) as err:
        prepare("dinov2_global", [feats])
    assert err.value.error_type == "bad_value"
    with pytest.raises(ConfigError):
        prepare("caption", [np.zeros(3)])


def _codebook_buffers(model):
    return {k: v.clone() for k, v in model.quantizer.named_buffers()}


def test_vq_codebook_settings_and_eval_encode_is_frozen():
    torch.manual_seed(0)
    cfg = default_config("depth")
    model = build_tokenizer(cfg)
    codebook = model.quantizer._codebook
    assert codebook.use_cosine_sim
    assert codebook.threshold_ema_dead_code == cfg.threshold_ema_dead_code > 0
    assert codebook.decay == cfg.ema_decay
    assert model.quantizer.codebook.shape == (cfg.codebook_size, 32)
    x = prepare("depth", synthetic("depth", 2))

    model.eval()
    before = _codebook_buffers(model)
    model.encode(x)
    model.loss(x)  # an eval-mode forward does not update the EMA either
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.named_buffers())

    model.train()
    model.encode(x)  # encode never updates the codebook, even in training mode
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.named_buffers())
    model.loss(x)  # a training step does: the check above can fail
    assert not torch.equal(before["_codebook.embed"], codebook.embed)


def test_decode_matches_the_quantized_training_path():
    torch.manual_seed(0)
    model = build_tokenizer(default_config("sam_edge")).eval()
    x = prepare("sam_edge", synthetic("sam_edge", 2))
    with torch.no_grad():
        quantized, ids, _ = model.quantizer(model._latents(x))
        assert torch.allclose(model._decode_codes(quantized), model.decode(ids), atol=1e-5)


def test_memcodes_sampling_and_lookup():
    torch.manual_seed(0)
    mc = Memcodes(dim=8, codebook_size=32, num_codebooks=4)
    q = torch.randn(5, 4, 8)
    mc.eval()
    out, ids = mc(q)
    assert torch.equal(ids, mc.indices(q)) and tuple(ids.shape) == (5, 4)
    assert torch.allclose(out, mc.from_indices(ids), atol=1e-6)
    mc.train()
    sampled = torch.stack([mc(q)[1] for _ in range(20)])
    assert (sampled != ids).any()  # Gumbel sampling in training
    out, _ = mc(q)
    out.sum().backward()
    assert mc.codes.grad is not None and mc.to_v.grad.abs().sum() > 0


def _depth_images(n, rng):
    yy, xx = np.mgrid[0:224, 0:224] / 223.0
    images = []
    for _ in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        d = np.cos(angle) * xx + np.sin(angle) * yy
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        d = d + ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * rng.uniform(-0.6, 0.6)
        d = (d - d.min()) / (d.max() - d.min())
        images.append((d * 65535).round().astype(np.uint16))
    return images


def _train(model, data, batch, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        i = (step * batch) % len(data)
        loss, logs = model.loss(data[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["recon"])
    return losses


def test_depth_vqvae_learns():
    torch.manual_seed(0)
    cfg = default_config("depth")
    model = build_tokenizer(cfg)
    data = prepare("depth", _depth_images(32, np.random.default_rng(0)))
    losses = _train(model, data, batch=8, steps=60, lr=2e-3)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])
    model.eval()
    ids = model.encode(data)
    stats = codebook_stats(ids, cfg.codebook_size)
    assert stats["code_usage"] * cfg.codebook_size > 1 and stats["perplexity"] > 1
    # the tokens carry image content: far better than predicting the mean depth everywhere
    constant = quality("depth", data, torch.full_like(data, float(data.mean())))["psnr"]
    assert quality("depth", data, model.decode(ids))["psnr"] > constant + 5


def test_global_memcodes_learns():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(16, 768))
    vectors = [(prototypes[i % 16] + 0.1 * rng.normal(size=768)).astype(np.float16) for i in range(64)]
    cfg = default_config("dinov2_global")
    model = build_tokenizer(cfg)
    data = prepare("dinov2_global", vectors)
    losses = _train(model, data, batch=16, steps=100, lr=1e-3)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:2])
    model.eval()
    ids = model.encode(data)
    assert codebook_stats(ids, cfg.codebook_size)["code_usage"] * cfg.codebook_size > 1
    assert quality("dinov2_global", data, model.decode(ids))["cosine"] > 0.9


def test_quality_metrics():
    x = torch.zeros(2, 3, 8, 8)
    same = quality("rgb", x, x)
    assert math.isfinite(same["psnr"]) and same["psnr"] > 100 and same["mse"] == 0
    off = quality("rgb", x, torch.full_like(x, 0.1))  # mse 0.01 on data range 2: 10 log10(4 / 0.01)
    assert off["psnr"] == pytest.approx(10 * math.log10(400), rel=1e-4) and off["mse"] == pytest.approx(0.01)

    target = torch.tensor([[[0, 0, 1, 1]]])  # (1, 1, 4)
    pred = torch.tensor([[[0, 1, 1, 1]]])
    logits = torch.nn.functional.one_hot(pred, 134).permute(0, 3, 1, 2).float()
    seg = quality("semseg_coco", target, logits)
    assert seg["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and seg["pixel_acc"] == pytest.approx(0.75)
    same_logits = torch.nn.functional.one_hot(target, 134).permute(0, 3, 1, 2).float()
    assert quality("semseg_coco", target, same_logits)["miou"] == 1.0

    feats = torch.randn(2, 512, 14, 14)
    assert quality("clip", feats, feats)["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert quality("clip", feats, -feats)["cosine"] == pytest.approx(-1.0, abs=1e-5)
    vec = torch.randn(3, 768)
    assert quality("dinov2_global", vec, 2 * vec)["cosine"] == pytest.approx(1.0, abs=1e-5)

    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1  # 8 pixels
    recon = torch.zeros(1, 1, 4, 4)
    recon[..., :1, :] = 0.9  # 4 pixels, inside the mask
    assert quality("sam_mask", mask, recon)["iou"] == pytest.approx(0.5)


def test_codebook_stats_hand_computed():
    stats = codebook_stats(torch.tensor([[0, 0, 1, 2]]), 8)
    assert stats["code_usage"] == pytest.approx(3 / 8)
    # p = (1/2, 1/4, 1/4): entropy = 1.5 ln 2, perplexity = 2 ** 1.5
    assert stats["perplexity"] == pytest.approx(2**1.5)
    uniform = codebook_stats(torch.arange(16), 16)
    assert uniform["code_usage"] == 1.0 and uniform["perplexity"] == pytest.approx(16)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(WeightsError, match="not found") as err:
        load_tokenizer(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(err.value)

    torch.manual_seed(0)
    save_tokenizer(build_tokenizer(default_config("sam_mask")), str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(WeightsError, match="corrupt") as err:
        load_tokenizer(str(tmp_path))
    assert str(weights) in str(err.value) and "\n" not in str(err.value)

    save_tokenizer(build_tokenizer(default_config("sam_mask")), str(tmp_path))
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["dim"] = 128  # weights no longer match the config
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="do not match"):
        load_tokenizer(str(tmp_path))

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="unreadable"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["rgb", "depth", "semseg_coco"])
def test_a_224_tokenizer_encodes_and_decodes_448_crops(name, tmp_path):
    """A tokenizer trained at 224 (saved, reloaded) reads 448 crops through its kind bound at 448: 784 ids, the
    ids a model built for a 28 x 28 grid with the same weights gives (the position table is the 28 x 28 sin-cos
    grid, not the 14 x 14 one), decoded back to 448 x 448 labels."""
    from omniforge.modalities import get_modality

    torch.manual_seed(0)
    kind224, kind448 = kind_for(name), kind_for(get_modality(name).at(448))
    cfg = kind224.config("tiny")
    save_tokenizer(build_tokenizer(cfg), str(tmp_path))
    model = load_tokenizer(str(tmp_path))
    assert model.config.image_size == 224 and kind448.input_layout()[0][:2] == (448, 448)
    arrays = kind448.example_inputs(2, np.random.default_rng(0))
    x = kind448.prepare(arrays)
    ids = model.encode(x)
    assert tuple(ids.shape) == (2, 784) and int(ids.max()) < cfg.codebook_size
    native = build_tokenizer(TokenizerConfig.from_dict({**cfg.to_dict(), "image_size": 448, "num_tokens": 784}))
    native.load_state_dict(model.state_dict())  # the same keys: the position table is no weight
    native.eval()
    assert torch.equal(native.encode(x), ids)
    out = model.decode(ids)
    assert torch.equal(out, native.decode(ids))
    restored = kind448.restore(out)
    assert restored[0].shape == arrays[0].shape and restored[0].dtype == arrays[0].dtype
    # the 224 path is untouched: 196 ids from 224 crops
    assert tuple(model.encode(kind224.prepare(kind224.example_inputs(1, np.random.default_rng(1)))).shape) == (1, 196)
    with pytest.raises(ValueError, match="decodes"):
        model.decode(ids[:, :700])

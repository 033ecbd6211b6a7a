"""imagebind teacher: an open_clip ViT-H/14-family checkpoint must give open_clip's own tokens and embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers.imagebind import ImageBindLabeler  # noqa: E402

# ViT-H-14 at random init is ~630M parameters: the test builds the same ViT-H/14 family (width 1280, 16 heads
# of 80, patch 14, image 224, embedding 1024) with two blocks, registered as an open_clip model config.
SMALL_ARCH = "ViT-H-14-omniforge-test"
SMALL_CFG = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): the centre crop matters for the second
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The small ViT-H/14-family open_clip model at random init, saved as open_clip ships checkpoints, and
    open_clip's own reference outputs for the photos."""
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{SMALL_ARCH}.json").write_text(json.dumps(SMALL_CFG))
    open_clip.add_model_config(cfg_dir / f"{SMALL_ARCH}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model, _, preprocess = open_clip.create_model_and_transforms(SMALL_ARCH)
    model.eval()
    path = tmp_path_factory.mktemp("imagebind") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)

    from PIL import Image

    x = torch.stack([preprocess(Image.fromarray(s.image)) for s in photos()])
    with torch.inference_mode():
        image_features = model.encode_image(x)  # pooled @ proj, not normalized
        visual = model.visual
        visual.output_tokens = True
        _, tokens = visual(x)  # (B, 256, 1280) after ln_post
    return str(path), tokens.reshape(len(x), 16, 16, 1280).numpy(), image_features.numpy()


def test_local_checkpoint_matches_open_clip(official):
    path, ref_tokens, ref_global = official
    labeler = create_labeler("imagebind", weights=path, model_name=SMALL_ARCH, pretrained_tag=None)
    out = labeler.label(photos())
    assert [sorted(o) for o in out] == [["imagebind", "imagebind_global"]] * 2
    for o, rt, rg in zip(out, ref_tokens, ref_global):
        assert o["imagebind"].shape == (16, 16, 1280) and o["imagebind"].dtype == np.float16
        assert o["imagebind_global"].shape == (1024,) and o["imagebind_global"].dtype == np.float16
        assert np.abs(rt).mean() > 0.1 and np.abs(rg).mean() > 0.1  # not two near-zero maps
        np.testing.assert_allclose(o["imagebind"].astype(np.float32), rt, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(o["imagebind_global"].astype(np.float32), rg, rtol=1e-2, atol=1e-2)
    assert not np.allclose(out[0]["imagebind"], out[1]["imagebind"], atol=1e-2)  # features depend on the image

    # only the wanted modalities, same values
    only = ImageBindLabeler(weights=path, model_name=SMALL_ARCH, pretrained_tag=None,
                            modalities=("imagebind_global",)).label(photos()[1:])
    assert list(only[0]) == ["imagebind_global"]
    np.testing.assert_allclose(only[0]["imagebind_global"], out[1]["imagebind_global"], atol=1e-3)  # batch of 1


def test_tag_must_belong_to_the_architecture(official):
    path, _, _ = official
    with pytest.raises(ConfigError, match="unknown pretrained_tag"):
        ImageBindLabeler(weights=path, model_name=SMALL_ARCH)  # laion2b_s32b_b79k is a ViT-H-14 release only


def test_wrong_checkpoint_is_a_weights_error(official, tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="cannot load"):
        ImageBindLabeler(weights=str(path), model_name=SMALL_ARCH, pretrained_tag=None)


def test_tiny_contract_and_determinism():
    a = create_labeler("imagebind", weights="tiny").label(photos())
    b = ImageBindLabeler(weights="tiny").label(photos())
    for x, y in zip(a, b):
        assert x["imagebind"].shape == (16, 16, 1280) and x["imagebind_global"].shape == (1024,)
        for m in ("imagebind", "imagebind_global"):
            assert x[m].dtype == np.float16 and np.isfinite(x[m]).all() and np.abs(x[m]).mean() > 0.05
            np.testing.assert_array_equal(x[m], y[m])
    assert not np.array_equal(a[0]["imagebind"], a[1]["imagebind"])
    assert not np.array_equal(a[0]["imagebind_global"], a[1]["imagebind_global"])
    assert get_labeler_class("imagebind").learned


def test_bad_image_is_a_sample_error():
    out = ImageBindLabeler(weights="tiny", modalities=("imagebind",)).label(
        [Sample("gray", skimage_data.camera()), photos()[1]])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"
    assert list(out[1]) == ["imagebind"] and out[1]["imagebind"].shape == (16, 16, 1280)


def test_missing_checkpoint_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="--weights imagebind="):
        ImageBindLabeler(weights=str(tmp_path / "nope.bin"))


def test_pretrained_download_failure_is_a_weights_error(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsError, match="--weights imagebind=/path/to/open_clip_pytorch_model.bin.*--weights tiny"):
        ImageBindLabeler(weights="pretrained")
    (args, kwargs), = calls
    assert args == ("ViT-H-14",) and kwargs["pretrained"] == "laion2b_s32b_b79k"


def test_options_are_validated():
    with pytest.raises(ConfigError, match="unknown pretrained_tag"):
        ImageBindLabeler(weights="tiny", pretrained_tag="not-a-tag")
    with pytest.raises(ConfigError, match="unknown model_name"):
        ImageBindLabeler(weights="tiny", model_name="ViT-Q-99")
    with pytest.raises(ConfigError, match="needs a pretrained_tag"):
        ImageBindLabeler(weights="pretrained", pretrained_tag=None)
    with pytest.raises(ConfigError, match="unknown option batch_size; its options are"):
        ImageBindLabeler(weights="tiny", batch_size=4)
    with pytest.raises(ConfigError):
        ImageBindLabeler(weights="tiny", modalities=("clip",))


def test_fingerprints(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    fa, fb, ft = (ImageBindLabeler.fingerprint(weights=w) for w in (str(a), str(b), "tiny"))
    assert len({fa, fb, ft}) == 3
    assert ImageBindLabeler.identity(weights="tiny")["options"] == {"model_name": "ViT-H-14",
                                                                     "pretrained_tag": "laion2b_s32b_b79k"}
    assert ImageBindLabeler.fingerprint(weights="tiny", pretrained_tag="laion2b_s32b_b79k") == ft
    assert ImageBindLabeler.fingerprint(weights="tiny", pretrained_tag="dfn5b") != ft
    assert ImageBindLabeler.fingerprint(weights=str(a), model_name=SMALL_ARCH, pretrained_tag=None) != fa
    with pytest.raises(WeightsError):
        ImageBindLabeler.fingerprint(weights=str(tmp_path / "missing.bin"))

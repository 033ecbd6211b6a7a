"""dinov2 teacher: a checkpoint written in timm's publisher format must give timm's own features at 224."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers.dinov2 import DinoV2Labeler  # noqa: E402

ARCH = "vit_base_patch14_dinov2"


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): the centre crop matters for the second
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official timm DINOv2 ViT-B/14 at its native 518 (37 x 37 position grid), random init, saved as
    on the timm hub (model.safetensors); the reference is timm's own 224 model loaded from that file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model(ARCH, pretrained=False)
        for name, p in model.named_parameters():  # LayerScale starts at 1e-5: make the blocks matter
            if name.endswith(".gamma"):
                p.data.uniform_(0.5, 1.0)
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 768)
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))

    from PIL import Image
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref_model = timm.create_model(ARCH, pretrained=False, img_size=224).eval()
    timm.models.load_checkpoint(ref_model, str(path), filter_fn=checkpoint_filter_fn)  # resamples pos_embed
    cfg = timm.data.resolve_data_config({"img_size": 224}, model=ref_model)
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(Image.fromarray(s.image)) for s in photos()])
    with torch.inference_mode():
        tokens = ref_model.forward_features(x)  # (B, 257, 768)
    return str(path), tokens[:, 1:].reshape(len(x), 16, 16, 768).numpy(), tokens[:, 0].numpy()


def test_local_checkpoint_matches_timm(official):
    path, ref_patches, ref_cls = official
    labeler = create_labeler("dinov2", weights=path)
    out = labeler.label(photos())
    for o, rp, rc in zip(out, ref_patches, ref_cls):
        assert sorted(o) == ["dinov2", "dinov2_global"]
        assert o["dinov2"].shape == (16, 16, 768) and o["dinov2"].dtype == np.float16
        assert o["dinov2_global"].shape == (768,) and o["dinov2_global"].dtype == np.float16
        assert np.abs(rp).mean() > 0.1 and np.abs(rc).mean() > 0.1  # a meaningful comparison
        np.testing.assert_allclose(o["dinov2"].astype(np.float32), rp, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(o["dinov2_global"].astype(np.float32), rc, rtol=1e-2, atol=1e-2)
    assert not np.allclose(out[0]["dinov2"], out[1]["dinov2"], atol=1e-2)
    assert not np.allclose(out[0]["dinov2_global"], out[1]["dinov2_global"], atol=1e-2)


def test_transform_is_centre_crop_224():
    from torchvision import transforms as T

    steps = DinoV2Labeler(weights="tiny").transform.transforms
    resize, crop = steps[0], steps[1]
    assert isinstance(resize, T.Resize) and resize.size == 224  # shorter side
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (224, 224)


def test_only_wanted_modalities():
    out = DinoV2Labeler(weights="tiny", modalities=("dinov2_global",)).label(photos())
    assert [list(o) for o in out] == [["dinov2_global"], ["dinov2_global"]]
    with pytest.raises(ConfigError, match="cannot write"):
        DinoV2Labeler(weights="tiny", modalities=("clip",))


def test_tiny_contract_and_determinism():
    a = create_labeler("dinov2", weights="tiny").label(photos())
    b = DinoV2Labeler(weights="tiny").label(photos())
    for x, y in zip(a, b):
        assert x["dinov2"].shape == (16, 16, 768) and x["dinov2"].dtype == np.float16
        assert x["dinov2_global"].shape == (768,) and x["dinov2_global"].dtype == np.float16
        for m in ("dinov2", "dinov2_global"):
            assert np.isfinite(x[m]).all() and np.abs(x[m]).mean() > 0.1
            np.testing.assert_array_equal(x[m], y[m])
    assert not np.array_equal(a[0]["dinov2_global"], a[1]["dinov2_global"])
    assert get_labeler_class("dinov2").learned


def test_bad_image_is_a_sample_error():
    out = DinoV2Labeler(weights="tiny").label([photos()[0], Sample("gray", skimage_data.camera())])
    assert out[0]["dinov2"].shape == (16, 16, 768)
    assert isinstance(out[1], SampleError) and out[1].error_type == "bad_image"


def test_missing_checkpoint_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="--weights dinov2="):
        DinoV2Labeler(weights=str(tmp_path / "nope.safetensors"))


def test_wrong_checkpoint_is_a_weights_error(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors_torch.save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(WeightsError, match="cannot load"):
        DinoV2Labeler(weights=str(path))


def test_pretrained_download_failure_is_a_weights_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="--weights dinov2=/path/to/model.safetensors.*--weights tiny"):
        DinoV2Labeler(weights="pretrained")


def test_fingerprints(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    fingerprints = {DinoV2Labeler.fingerprint(weights=w) for w in (str(a), str(b), "tiny", "pretrained")}
    assert len(fingerprints) == 4

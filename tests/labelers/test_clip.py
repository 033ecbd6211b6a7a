"""clip teacher: a checkpoint written in open_clip's publisher format must give open_clip's own features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers.clip import ClipLabeler  # noqa: E402


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): the centre crop matters for the second
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official OpenAI ViT-B/16 architecture (open_clip's ViT-B-16-quickgelu) at random init, saved the
    way the publisher ships it, plus open_clip's own reference features for the photos."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16-quickgelu")
    model.eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)

    from PIL import Image

    visual = model.visual
    visual.output_tokens = True
    x = torch.stack([preprocess(Image.fromarray(s.image)) for s in photos()])
    with torch.inference_mode():
        _, tokens = visual(x)  # (B, 196, 768) after ln_post
        ref = (tokens @ visual.proj).reshape(len(x), 14, 14, 512).numpy()
    return str(path), ref


def test_local_checkpoint_matches_open_clip(official):
    path, ref = official
    labeler = create_labeler("clip", weights=path)
    out = labeler.label(photos())
    assert [list(o) for o in out] == [["clip"], ["clip"]]
    for o, r in zip(out, ref):
        assert o["clip"].shape == (14, 14, 512) and o["clip"].dtype == np.float16
        assert np.abs(r).mean() > 0.1  # the comparison is not between two near-zero maps
        np.testing.assert_allclose(o["clip"].astype(np.float32), r, rtol=1e-2, atol=1e-2)
    assert not np.allclose(out[0]["clip"], out[1]["clip"], atol=1e-2)  # the features depend on the image


def test_training_checkpoint_with_module_prefix(official, tmp_path):
    # open_clip training checkpoints: {"epoch", "state_dict": {"module.<key>": ...}} (DDP)
    path, ref = official
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    out = ClipLabeler(weights=str(wrapped)).label(photos()[1:])
    np.testing.assert_allclose(out[0]["clip"].astype(np.float32), ref[1], rtol=1e-2, atol=1e-2)


def test_wrong_checkpoint_is_a_weights_error(tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="cannot load"):
        ClipLabeler(weights=str(path))


def test_tiny_contract_and_determinism():
    a = create_labeler("clip", weights="tiny").label(photos())
    b = ClipLabeler(weights="tiny").label(photos())
    for x, y in zip(a, b):
        assert x["clip"].shape == (14, 14, 512) and x["clip"].dtype == np.float16
        assert np.isfinite(x["clip"]).all() and np.abs(x["clip"]).mean() > 0.1
        np.testing.assert_array_equal(x["clip"], y["clip"])
    assert not np.array_equal(a[0]["clip"], a[1]["clip"])
    assert get_labeler_class("clip").learned


def test_pretrained_tag_sets_the_activation():
    # open_clip 3.x does not switch to QuickGELU for the OpenAI release by itself, and a state dict cannot say
    # which activation it was trained with: the tag decides, for every weights kind
    from open_clip.transformer import QuickGELU

    assert isinstance(ClipLabeler(weights="tiny").model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    laion = ClipLabeler(weights="tiny", pretrained_tag="laion2b_s34b_b88k")
    assert isinstance(laion.model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_bad_image_is_a_sample_error():
    out = ClipLabeler(weights="tiny").label([Sample("gray", skimage_data.camera()), photos()[1]])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"
    assert out[1]["clip"].shape == (14, 14, 512)


def test_missing_checkpoint_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="--weights clip="):
        ClipLabeler(weights=str(tmp_path / "nope.bin"))


def test_pretrained_download_failure_is_a_weights_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsError, match="--weights clip=/path/to/open_clip_pytorch_model.bin.*--weights tiny"):
        ClipLabeler(weights="pretrained")


def test_options_are_validated():
    with pytest.raises(ConfigError, match="unknown pretrained_tag"):
        ClipLabeler(weights="tiny", pretrained_tag="not-a-tag")
    with pytest.raises(ConfigError, match="unknown option batch_size; its options are"):
        ClipLabeler(weights="tiny", batch_size=4)
    with pytest.raises(ConfigError):
        ClipLabeler(weights="tiny", modalities=("dinov2",))


def test_fingerprints(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    fa, fb, ft = (ClipLabeler.fingerprint(weights=w) for w in (str(a), str(b), "tiny"))
    assert len({fa, fb, ft}) == 3
    assert ClipLabeler.identity(weights="tiny")["options"] == {"pretrained_tag": "openai"}
    assert ClipLabeler.fingerprint(weights="tiny", pretrained_tag="openai") == ft
    assert ClipLabeler.fingerprint(weights="tiny", pretrained_tag="laion2b_s34b_b88k") != ft
    with pytest.raises(WeightsError):
        ClipLabeler.fingerprint(weights=str(tmp_path / "missing.bin"))

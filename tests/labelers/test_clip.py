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


# -- at 448 (tok_clip@448): ml-4m runs its CLIP-B16 teacher on 448 inputs, its position table resized bicubically
# with the DINO convention (scale factor (28 + 0.1) / 14, class position kept), a 28 x 28 map


def ml4m_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """The position table resized as ml-4m's CLIP `interpolate_pos_encoding` (fourm/utils/clip/model.py) does:
    bicubic with scale_factor (grid + 0.1) / side, align_corners False, no antialias, class position kept."""
    side = int((table.shape[0] - 1) ** 0.5)
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, scale_factor=((grid + 0.1) / side,) * 2, mode="bicubic")
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def test_positions_are_resized_as_ml4m_not_as_open_clip():
    from omniforge.labelers._open_clip import resize_positions

    table = torch.randn(1 + 14 * 14, 8, generator=torch.Generator().manual_seed(0))
    out = resize_positions(table, 28)
    assert out.shape == (1 + 28 * 28, 8) and torch.equal(out[0], table[0])
    torch.testing.assert_close(out, ml4m_positions(table, 28), rtol=0, atol=1e-6)
    # open_clip's own resize_pos_embed (exact size, antialiased bicubic) gives other values
    state = {"visual.positional_embedding": table.clone()}

    class Tower:
        grid_size = (28, 28)

    class Model:
        visual = Tower()

    open_clip.model.resize_pos_embed(state, Model())
    assert (state["visual.positional_embedding"] - out).abs().max() > 1e-3
    assert resize_positions(table, 14) is table  # at its own size: unchanged


def test_448_matches_open_clip_at_448_with_ml4m_positions(official):
    from PIL import Image

    path, ref224 = official
    labeler = create_labeler("clip", weights=path)
    out = labeler.label_at(photos(), 448)
    # the reference: open_clip's own ViT-B/16 built for 448 inputs, the checkpoint's positions resized as ml-4m,
    # open_clip's eval preprocess at 448
    model = open_clip.create_model("ViT-B-16-quickgelu", force_image_size=448)
    state = torch.load(path, weights_only=True)
    state["visual.positional_embedding"] = ml4m_positions(state["visual.positional_embedding"], 28)
    model.load_state_dict(state)
    visual = model.eval().visual
    visual.output_tokens = True
    preprocess = open_clip.image_transform(448, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    x = torch.stack([preprocess(Image.fromarray(s.image)) for s in photos()])
    with torch.inference_mode():
        _, tokens = visual(x)  # (B, 784, 768)
        ref = (tokens @ visual.proj).reshape(len(x), 28, 28, 512).numpy()
    for o, r in zip(out, ref):
        assert o["clip"].shape == (28, 28, 512) and o["clip"].dtype == np.float16
        assert np.abs(r).mean() > 0.1
        np.testing.assert_allclose(o["clip"].astype(np.float32), r, rtol=1e-2, atol=1e-2)
    # the 224 output is unchanged by running at 448: still open_clip's own 224 features
    again = labeler.label(photos())
    for o, r in zip(again, ref224):
        np.testing.assert_allclose(o["clip"].astype(np.float32), r, rtol=1e-2, atol=1e-2)
    assert tuple(labeler.model.positional_embedding.shape) == (197, 768)


def test_tiny_at_448_and_at_224():
    labeler = ClipLabeler(weights="tiny")
    before = labeler.label(photos())
    big = labeler.label_at(photos(), 448)
    for b in big:
        assert b["clip"].shape == (28, 28, 512) and b["clip"].dtype == np.float16 and np.isfinite(b["clip"]).all()
    assert not np.array_equal(big[0]["clip"], big[1]["clip"])
    for x, y, z in zip(before, labeler.label(photos()), labeler.label_at(photos(), 224)):
        np.testing.assert_array_equal(x["clip"], y["clip"])
        np.testing.assert_array_equal(x["clip"], z["clip"])
    bad = labeler.label_at([Sample("gray", skimage_data.camera())], 448)
    assert isinstance(bad[0], SampleError) and bad[0].error_type == "bad_image"
    with pytest.raises(ConfigError, match="cannot run at 450"):
        labeler.label_at(photos(), 450)

"""imagebind teacher: ImageBind's own checkpoint must give ImageBind's own features, and an open_clip ViT-H/14-family
checkpoint open_clip's own tokens and class token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers._imagebind import convert_imagebind_state_dict, load_state_dict  # noqa: E402
from omniforge.labelers._torch_utils import to_pil  # noqa: E402
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
    final_ln = []
    with torch.inference_mode():
        model.visual.ln_post.register_forward_hook(lambda m, i, o: final_ln.append(o))
        image_features = model.encode_image(x)  # class token after ln_post @ proj, not normalized
    ln_out = final_ln[0]  # (B, 257, 1280): class token, then the patches
    return (str(path), ln_out[:, 1:].reshape(len(x), 16, 16, 1280).numpy(), ln_out[:, 0].numpy(),
            image_features.numpy(), model.visual.proj.detach().numpy())


def test_local_checkpoint_matches_open_clip(official):
    path, ref_tokens, ref_global, ref_projected, proj = official
    labeler = create_labeler("imagebind", weights=path, model_name=SMALL_ARCH, pretrained_tag=None)
    out = labeler.label(photos())
    assert [sorted(o) for o in out] == [["imagebind", "imagebind_global"]] * 2
    for o, rt, rg, rp in zip(out, ref_tokens, ref_global, ref_projected):
        assert o["imagebind"].shape == (16, 16, 1280) and o["imagebind"].dtype == np.float16
        assert o["imagebind_global"].shape == (1280,) and o["imagebind_global"].dtype == np.float16
        assert np.abs(rt).mean() > 0.1 and np.abs(rg).mean() > 0.1  # not two near-zero maps
        np.testing.assert_allclose(o["imagebind"].astype(np.float32), rt, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(o["imagebind_global"].astype(np.float32), rg, rtol=1e-2, atol=1e-2)
        # the global is what open_clip projects into its 1024-d embedding, not that embedding
        np.testing.assert_allclose(o["imagebind_global"].astype(np.float32) @ proj, rp, rtol=2e-2, atol=2e-2)
    assert not np.allclose(out[0]["imagebind"], out[1]["imagebind"], atol=1e-2)  # features depend on the image

    # only the wanted modalities, same values
    only = ImageBindLabeler(weights=path, model_name=SMALL_ARCH, pretrained_tag=None,
                            modalities=("imagebind_global",)).label(photos()[1:])
    assert list(only[0]) == ["imagebind_global"]
    np.testing.assert_allclose(only[0]["imagebind_global"], out[1]["imagebind_global"], atol=1e-3)  # batch of 1


def test_tag_must_belong_to_the_architecture(official):
    path = official[0]
    with pytest.raises(ConfigError, match="unknown pretrained_tag"):
        ImageBindLabeler(weights=path, model_name=SMALL_ARCH)  # laion2b_s32b_b79k is a ViT-H-14 release only


def test_wrong_checkpoint_is_a_weights_error(official, tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="neither an ImageBind checkpoint .* nor an open_clip one") as e:
        ImageBindLabeler(weights=str(path), model_name=SMALL_ARCH, pretrained_tag=None)
    assert "\n" not in str(e.value)


def test_tiny_contract_and_determinism():
    a = create_labeler("imagebind", weights="tiny").label(photos())
    b = ImageBindLabeler(weights="tiny").label(photos())
    for x, y in zip(a, b):
        assert x["imagebind"].shape == (16, 16, 1280) and x["imagebind_global"].shape == (1280,)
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
    with pytest.raises(WeightsError, match="--weights imagebind=/path/to/imagebind_huge.pth or "
                                           "open_clip_pytorch_model.bin, or --weights tiny"):
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


# -- ImageBind's own checkpoint format ------------------------------------------------------------------------------
# tests/fixtures/imagebind/ holds what ImageBind's own code (facebookresearch/ImageBind, run outside the project by
# make_fixtures.py there) wrote: an ImageBindModel state dict at random init, saved as imagebind_huge.pth is (vision
# width 64, its 16 heads, 2 blocks, the (2, 14, 14) Conv3d stem, image 224, head to 1024), and its outputs on the
# astronaut and chelsea photos. At width 64 the features are (16, 16, 64) and (64,): not the (16, 16, 1280) contract
# that `label` checks, so these tests run the labeler's own transform and forward, the two halves of `label`; the
# open_clip test above covers `label` itself at full width.

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "imagebind"
CHECKPOINT = FIXTURES / "imagebind_small.pth"
STEM = "modality_preprocessors.vision.rgbt_stem.proj.1.weight"
# Both sides compute in float32 with the same operations in another order (a Conv2d with the time-summed kernel for
# ImageBind's Conv3d on 2 repeated frames, batch-first attention for ImageBind's sequence-first): measured max abs
# differences ~1e-5 on LayerNorm outputs of magnitude ~1 (patch tokens 8e-6, class token 2e-6, projection 1e-6).
# 1e-4 leaves margin for other BLAS builds; a wrong LayerNorm eps or head count moves them by more than 0.1 (below).
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "reference.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def imagebind_photos(reference) -> list[Sample]:
    assert list(reference["keys"]) == ["astronaut", "chelsea"]
    return photos()


def run(labeler, samples) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """The labeler's own preprocessing and forward on the photos (what `label` runs, without the shape contract)."""
    x = torch.stack([labeler.transform(to_pil(s.image)) for s in samples])
    with torch.inference_mode():
        feats = labeler.forward(x)
    return x, {m: v.float().numpy() for m, v in feats.items()}


def test_imagebind_checkpoint_matches_imagebind(reference):
    labeler = create_labeler("imagebind", weights=str(CHECKPOINT))
    x, out = run(labeler, imagebind_photos(reference))
    # omniforge's preprocessing is ImageBind's load_and_transform_vision_data, pixel for pixel
    np.testing.assert_allclose(x.numpy(), reference["pixels"], rtol=0, atol=1e-6)
    ref_tokens, ref_cls = reference["tokens"][:, 1:], reference["tokens"][:, 0]  # after the head's LayerNorm
    assert out["imagebind"].shape == (2, 16, 16, 64) and out["imagebind_global"].shape == (2, 64)
    assert ref_tokens.std() > 0.5 and ref_cls.std() > 0.5 and np.abs(ref_cls[0] - ref_cls[1]).max() > 0.1
    # patches row-major: ImageBind flattens the Conv3d output (B, W, 1, 16, 16) to T * H * W positions
    np.testing.assert_allclose(out["imagebind"].reshape(2, 256, 64), ref_tokens, rtol=0, atol=ATOL)
    np.testing.assert_allclose(out["imagebind_global"], ref_cls, rtol=0, atol=ATOL)
    # the global is the token ImageBind's head projects: projected and normalized, it is ImageBind's embedding
    proj = convert_imagebind_state_dict(load_state_dict(str(CHECKPOINT)))["proj"].numpy()  # (64, 1024)
    embedding = out["imagebind_global"] @ proj
    np.testing.assert_allclose(embedding, reference["embedding"], rtol=0, atol=ATOL)
    normalized = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
    np.testing.assert_allclose(normalized, reference["normalized"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("break_it", ["layer_norm_eps_1e-5", "8_heads"])
def test_the_fixture_catches_a_wrong_tower(reference, monkeypatch, break_it):
    """The comparison above has teeth: open_clip's default LayerNorm eps (1e-5, not ImageBind's 1e-6) or another
    head count gives features far outside its tolerance."""
    if break_it == "8_heads":
        monkeypatch.setattr("omniforge.labelers._imagebind.VISION_HEADS", 8)
    labeler = create_labeler("imagebind", weights=str(CHECKPOINT))
    if break_it == "layer_norm_eps_1e-5":
        for m in labeler.model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.eps = 1e-5
    _, out = run(labeler, imagebind_photos(reference))
    assert np.abs(out["imagebind"].reshape(2, 256, 64) - reference["tokens"][:, 1:]).max() > 0.1


def test_two_frame_stem_is_a_conv2d_with_the_time_summed_kernel(reference):
    w = load_state_dict(str(CHECKPOINT))[STEM]  # (64, 3, 2, 14, 14): ImageBind's Conv3d kernel
    assert tuple(w.shape) == (64, 3, 2, 14, 14) and not torch.allclose(w[:, :, 0], w[:, :, 1])
    x = torch.from_numpy(reference["pixels"])  # (2, 3, 224, 224)
    folded = F.conv2d(x, w.sum(dim=2), stride=14)  # (2, 64, 16, 16)
    # against ImageBind's own stem (PadIm2Video repeat to 2 frames + Conv3d), hooked by make_fixtures.py. The
    # fixture's stem is scaled down (std ~1e-3), so tolerances are relative to its spread: float32 summation
    # order differs by ~1e-5 of it (measured 7e-9 absolute)
    scale = float(reference["stem"].std())
    assert scale > 0
    np.testing.assert_allclose(folded.flatten(2).transpose(1, 2).numpy(), reference["stem"], rtol=0,
                               atol=1e-4 * scale)
    # the identity itself, on other inputs: conv3d over frames (x, x) with kernel (w0, w1) = conv2d(x, w0 + w1)
    y = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    video = y.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # (3, 3, 2, 224, 224)
    conv3d = F.conv3d(video, w, stride=(2, 14, 14))  # (3, 64, 1, 16, 16): one output frame
    assert conv3d.shape == (3, 64, 1, 16, 16)
    torch.testing.assert_close(conv3d[:, :, 0], F.conv2d(y, w.sum(dim=2), stride=14), rtol=0, atol=1e-4 * scale)
    one_frame = F.conv2d(y, w[:, :, 0], stride=14)  # one time slice's kernel is not it
    assert (conv3d[:, :, 0] - one_frame).abs().max() > 0.5 * scale
    # and omniforge's tower holds exactly that kernel
    labeler = create_labeler("imagebind", weights=str(CHECKPOINT), modalities=("imagebind_global",))
    torch.testing.assert_close(labeler.model.conv1.weight, w.sum(dim=2), rtol=0, atol=0)


class NotATensor:
    pass


def _bad_checkpoints(tmp_path) -> dict[str, Path]:
    state = dict(torch.load(CHECKPOINT, weights_only=True))
    missing = {k: v for k, v in state.items() if k != "modality_trunks.vision.blocks.1.norm_2.weight"}
    extra = {**state, "modality_trunks.vision.blocks.0.ls_1.gamma": torch.ones(64)}
    bad_stem = {**state, STEM: state[STEM][:, :, :1]}  # a one-frame kernel is no ImageBind stem
    files = {"missing key": missing, "unknown vision key": extra, "one-frame stem": bad_stem,
             "pickled object": {"model": NotATensor()}}
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(obj, paths[name])
    paths["not a torch file"] = tmp_path / "garbage.pth"
    paths["not a torch file"].write_bytes(b"this is no checkpoint\n" * 10)
    return paths


@pytest.mark.parametrize("case,message", [
    ("missing key", "Missing key.*blocks.1.ln_2.weight"),
    ("unknown vision key", "not part of ImageBind's vision tower.*ls_1.gamma"),
    ("one-frame stem", r"expected \(width, 3, 2, p, p\)"),
    ("pickled object", "cannot load"),  # weights_only=True refuses it
    ("not a torch file", "cannot load"),
])
def test_bad_imagebind_checkpoint_is_a_one_line_weights_error(tmp_path, case, message):
    path = _bad_checkpoints(tmp_path)[case]
    with pytest.raises(WeightsError, match=message) as e:
        ImageBindLabeler(weights=str(path))
    assert "\n" not in str(e.value) and "--weights tiny" in str(e.value)


def test_imagebind_checkpoint_takes_no_open_clip_options():
    with pytest.raises(ConfigError, match="is an ImageBind checkpoint.*drop the options"):
        ImageBindLabeler(weights=str(CHECKPOINT), model_name="ViT-L-14")
    with pytest.raises(ConfigError, match="is an ImageBind checkpoint"):
        ImageBindLabeler(weights=str(CHECKPOINT), pretrained_tag="dfn5b")
    # the defaults, or no tag, are fine
    assert ImageBindLabeler(weights=str(CHECKPOINT), pretrained_tag=None).model.conv1.weight.shape == (64, 3, 14, 14)

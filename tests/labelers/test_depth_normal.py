"""depth and normal teachers: checkpoints written in the publishers' formats must give the publishers' own
predictions (Depth Anything V2 through transformers; Omnidata DPT-Hybrid v2 Lightning checkpoints)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import (Sample, create_labeler, get_labeler_class, labeler_for_modality,  # noqa: E402
                                labelers_for_modality)
from omniforge.labelers import _dpt  # noqa: E402
from omniforge.labelers.depth_normal import DepthAnythingLabeler, NormalLabeler, OmnidataDepthLabeler  # noqa: E402


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451)
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


# -- Depth Anything V2 (transformers) ------------------------------------------------------------------------

def documented_depth(disparity: np.ndarray) -> np.ndarray:
    """The conversion DepthAnythingLabeler's docstring documents, written out independently."""
    d = np.maximum(disparity.astype(np.float64), 0)
    depth = 1.0 / (d + 0.01 * d.max())
    return (depth - depth.min()) / (depth.max() - depth.min()) * 65535.0


@pytest.fixture(scope="module")
def depth_anything_folder(tmp_path_factory):
    """A random-init DepthAnythingForDepthEstimation (tiny DINOv2 backbone) and its processor, saved with
    save_pretrained as on the hub; the reference is transformers' own processor + model + post-processing."""
    backbone = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                                         intermediate_size=96, patch_size=14, image_size=140,
                                         out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=48,
                                              neck_hidden_sizes=[12, 24, 48, 48], fusion_hidden_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.DepthAnythingForDepthEstimation(config).eval()
    processor = transformers.DPTImageProcessor(size={"height": 140, "width": 140}, keep_aspect_ratio=True,
                                               ensure_multiple_of=14, resample=3, image_mean=[0.485, 0.456, 0.406],
                                               image_std=[0.229, 0.224, 0.225])
    folder = tmp_path_factory.mktemp("depth_anything") / "Depth-Anything-V2-tiny-hf"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    from PIL import Image

    refs = []
    for s in photos():
        inputs = processor(images=Image.fromarray(s.image), return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        post = processor.post_process_depth_estimation(outputs, target_sizes=[s.image.shape[:2]])
        refs.append(post[0]["predicted_depth"].numpy())
    return str(folder), refs


def test_depth_anything_folder_matches_transformers(depth_anything_folder):
    folder, refs = depth_anything_folder
    out = create_labeler("depth", weights=folder).label(photos())
    for o, s, ref in zip(out, photos(), refs):
        assert list(o) == ["depth"]
        depth = o["depth"]
        assert depth.dtype == np.uint16 and depth.shape == s.image.shape[:2]
        assert ref.shape == s.image.shape[:2] and ref.std() > 1e-3 * np.abs(ref).mean()  # a meaningful comparison
        assert depth.min() == 0 and depth.max() == 65535 and len(np.unique(depth)) > 100
        np.testing.assert_allclose(depth.astype(np.float64), documented_depth(ref), atol=0.01 * 65535)
        # larger = farther: the pixel with the largest disparity (nearest) is among the smallest depths
        near = np.unravel_index(np.argmax(ref), ref.shape)
        assert depth[near] <= np.quantile(depth, 0.01)


def test_depth_anything_tiny_contract_and_determinism():
    a = create_labeler("depth", weights="tiny").label(photos())
    b = DepthAnythingLabeler(weights="tiny").label(photos())
    for x, y, s in zip(a, b, photos()):
        assert x["depth"].shape == s.image.shape[:2] and x["depth"].dtype == np.uint16
        assert x["depth"].max() == 65535
        np.testing.assert_array_equal(x["depth"], y["depth"])
    assert get_labeler_class("depth").learned and get_labeler_class("normal").learned


LARGE_HUB_ID = "depth-anything/Depth-Anything-V2-Large-hf"


def test_depth_has_two_teachers_and_depth_anything_is_the_default():
    assert [cls.name for cls in labelers_for_modality("depth")] == ["depth", "omnidata"]
    assert labeler_for_modality("depth") is DepthAnythingLabeler
    assert labeler_for_modality("depth", teacher="omnidata") is OmnidataDepthLabeler
    with pytest.raises(ConfigError, match="teachers of depth: depth, omnidata"):
        labeler_for_modality("depth", teacher="normal")


def test_depth_options_are_validated_and_fingerprinted(tmp_path):
    with pytest.raises(ConfigError, match="model was removed.*--teacher depth=omnidata"):
        DepthAnythingLabeler(weights="tiny", model="omnidata_dpt_hybrid")
    with pytest.raises(ConfigError, match="omnidata takes no options"):
        OmnidataDepthLabeler(weights="tiny", hub_id="depth-anything/Depth-Anything-V2-Small-hf")
    with pytest.raises(ConfigError, match="hub_id"):
        DepthAnythingLabeler(weights="tiny", hub_id="")
    prints = {DepthAnythingLabeler.fingerprint(weights="pretrained"),
              DepthAnythingLabeler.fingerprint(weights="pretrained", hub_id=LARGE_HUB_ID),
              OmnidataDepthLabeler.fingerprint(weights="pretrained"),
              DepthAnythingLabeler.fingerprint(weights="tiny"),
              OmnidataDepthLabeler.fingerprint(weights="tiny")}
    assert len(prints) == 5
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = DepthAnythingLabeler.fingerprint(weights=str(folder))
    (folder / "model.safetensors").write_bytes(b"weights")  # file hashes are cached per path: add a file
    assert DepthAnythingLabeler.fingerprint(weights=str(folder)) != first
    with pytest.raises(WeightsError, match="not a folder"):  # Depth Anything loads a folder, Omnidata one file
        DepthAnythingLabeler.fingerprint(weights=str(folder / "model.safetensors"))
    file_identity = OmnidataDepthLabeler.identity(weights=str(folder / "model.safetensors"))
    assert file_identity["weights"].startswith("file-sha256:")


def test_depth_missing_or_broken_weights(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="--weights depth="):
        DepthAnythingLabeler(weights=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="cannot load"):
        DepthAnythingLabeler(weights=str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", offline)
    with pytest.raises(WeightsError, match="--weights depth=.*--weights tiny"):
        DepthAnythingLabeler(weights="pretrained")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="--weights omnidata=/path/to/omnidata_dpt_depth_v2.ckpt"):
        OmnidataDepthLabeler(weights="pretrained")
    with pytest.raises(WeightsError, match="--weights normal=/path/to/omnidata_dpt_normal_v2.ckpt"):
        NormalLabeler(weights="pretrained")


def test_bad_image_is_a_sample_error():
    for cls in (DepthAnythingLabeler, OmnidataDepthLabeler, NormalLabeler):
        labeler = cls(weights="tiny")
        out = labeler.label([photos()[1], Sample("gray", skimage_data.camera())])
        assert set(out[0]) == set(labeler.modalities)
        assert isinstance(out[1], SampleError) and out[1].error_type == "bad_image"


# -- Omnidata DPT-Hybrid v2 -------------------------------------------------------------------------------

# omniforge module prefix -> the publisher's key prefix inside its Lightning checkpoint, from Omnidata's
# modules/midas (DPTDepthModel: pretrained = timm ViT + act_postprocess1..4, scratch = layerN_rn,
# refinenetN.{resConfUnit1,resConfUnit2,out_conv}, output_conv = Sequential(conv, interp, conv, relu, conv, relu))
PUBLISHER_NAMES = [
    (r"^vit\.", "pretrained.model."),
    (r"^reassemble([34])\.readout\.", r"pretrained.act_postprocess\1.0.project.0."),
    (r"^reassemble([34])\.proj\.", r"pretrained.act_postprocess\1.3."),
    (r"^reassemble4\.resample\.", "pretrained.act_postprocess4.4."),
    (r"^project([1-4])\.", r"scratch.layer\1_rn."),
    (r"^fusion([1-4])\.unit([12])\.", r"scratch.refinenet\1.resConfUnit\2."),
    (r"^fusion([1-4])\.out_conv\.", r"scratch.refinenet\1.out_conv."),
    (r"^head\.conv1\.", "scratch.output_conv.0."),
    (r"^head\.conv2\.", "scratch.output_conv.2."),
    (r"^head\.conv3\.", "scratch.output_conv.4."),
]


def publisher_checkpoint(model: torch.nn.Module) -> dict:
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in PUBLISHER_NAMES:
            if re.match(pattern, key):
                state["model." + re.sub(pattern, repl, key)] = value.clone()
                break
        else:
            raise AssertionError(f"no publisher name for {key}")
    dim = model.vit.embed_dim  # the timm ViT's unused ImageNet classifier is part of the publisher's checkpoint
    state["model.pretrained.model.head.weight"] = torch.zeros(1000, dim)
    state["model.pretrained.model.head.bias"] = torch.zeros(1000)
    return {"epoch": 10, "global_step": 1000, "state_dict": state}


@pytest.fixture
def tiny_architecture(monkeypatch):
    """Loading a .ckpt builds Omnidata's full DPT-Hybrid (123M parameters); build the same classes at the
    tiny size instead, so the checkpoint conversion and strict load run for real on a small file."""
    build = _dpt.build_dpt
    monkeypatch.setattr(_dpt, "build_dpt", lambda *, channels, tiny: build(channels=channels, tiny=True))


def random_tiny_dpt(channels: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = _dpt.build_dpt(channels=channels, tiny=True).eval()
        with torch.no_grad():  # make the random head produce values spread over [0, 1]
            model.head.conv3.weight.mul_(20)
            model.head.conv3.bias.fill_(0.5)
    return model


def reference(model: torch.nn.Module, image: np.ndarray, *, normalize: bool, mode: str) -> np.ndarray:
    """Omnidata's demo preprocessing on the whole image (resized to 384 x 384), then back to H x W."""
    from PIL import Image

    x = torch.from_numpy(np.array(Image.fromarray(image).resize((384, 384), Image.Resampling.BILINEAR)))
    x = x.permute(2, 0, 1).float()[None] / 255.0
    if normalize:
        x = (x - 0.5) / 0.5
    with torch.inference_mode():
        y = model(x).clamp(0, 1)
        y = torch.nn.functional.interpolate(y, size=image.shape[:2], mode=mode, align_corners=False).clamp(0, 1)
    return y[0].numpy()  # (C, H, W)


def test_omnidata_normal_checkpoint_matches_model(tiny_architecture, tmp_path):
    model = random_tiny_dpt(3)
    path = tmp_path / "omnidata_dpt_normal_v2.ckpt"
    torch.save(publisher_checkpoint(model), path)
    out = create_labeler("normal", weights=str(path)).label(photos())
    for o, s in zip(out, photos()):
        normal = o["normal"]
        assert normal.dtype == np.uint8 and normal.shape == (*s.image.shape[:2], 3)
        ref = np.round(reference(model, s.image, normalize=False, mode="bilinear").transpose(1, 2, 0) * 255)
        assert ref.std() > 10  # a meaningful comparison
        np.testing.assert_allclose(normal.astype(np.float64), ref, atol=1.01)
        assert np.mean(np.abs(normal.astype(np.float64) - ref)) < 0.05


def test_omnidata_depth_checkpoint_matches_model(tiny_architecture, tmp_path):
    model = random_tiny_dpt(1)
    path = tmp_path / "omnidata_dpt_depth_v2.ckpt"
    torch.save(publisher_checkpoint(model), path)
    out = create_labeler("omnidata", weights=str(path)).label(photos()[1:])
    for o, s in zip(out, photos()[1:]):
        ref = reference(model, s.image, normalize=True, mode="bicubic")[0]
        assert ref.std() > 0.01
        ref = (ref - ref.min()) / (ref.max() - ref.min()) * 65535
        assert o["depth"].dtype == np.uint16 and o["depth"].shape == s.image.shape[:2]
        np.testing.assert_allclose(o["depth"].astype(np.float64), ref, atol=0.002 * 65535)


def test_omnidata_checkpoint_with_missing_or_unknown_key(tiny_architecture, tmp_path):
    ckpt = publisher_checkpoint(random_tiny_dpt(3))
    missing = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items()
                                     if k != "model.scratch.refinenet4.resConfUnit1.conv1.weight"})
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(WeightsError, match="missing"):
        NormalLabeler(weights=str(tmp_path / "missing.ckpt"))
    extra = dict(ckpt, state_dict={**ckpt["state_dict"], "model.scratch.output_conv.6.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(WeightsError, match="not an Omnidata"):
        NormalLabeler(weights=str(tmp_path / "extra.ckpt"))
    with pytest.raises(WeightsError, match="size mismatch"):  # a depth checkpoint (1 channel) for normals
        torch.save(publisher_checkpoint(random_tiny_dpt(1)), tmp_path / "depth.ckpt")
        NormalLabeler(weights=str(tmp_path / "depth.ckpt"))


def test_normal_tiny_contract_and_determinism():
    a = create_labeler("normal", weights="tiny").label(photos())
    b = NormalLabeler(weights="tiny").label(photos())
    for x, y, s in zip(a, b, photos()):
        assert x["normal"].shape == (*s.image.shape[:2], 3) and x["normal"].dtype == np.uint8
        assert x["normal"].std() > 0
        np.testing.assert_array_equal(x["normal"], y["normal"])

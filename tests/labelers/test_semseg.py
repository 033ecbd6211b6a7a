"""semseg_coco teacher: a Mask2Former save_pretrained folder must give transformers' own class maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.codecs import decode, encode  # noqa: E402
from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers._coco_panoptic import COCO_PANOPTIC_CLASSES, COCO_PANOPTIC_STUFF_IDS  # noqa: E402
from omniforge.labelers.semseg import SemsegCocoLabeler, palette  # noqa: E402

# a random model's class scores are ~1/134 and its masks are weighted by them: with these thresholds every
# query that wins pixels makes a segment, so the compared maps are not all "none"
OPEN = dict(threshold=0.0, mask_threshold=0.0, overlap_mask_area_threshold=0.0)
# with these, some queries are dropped and about half of the pixels are in no segment (255)
MIXED = dict(threshold=0.0, mask_threshold=0.004, overlap_mask_area_threshold=0.5)


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): processed at different sizes
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


def small_mask2former(num_labels: int = 133, seed: int = 1):
    """The official transformers Mask2Former (Swin backbone) at a small size, random init, COCO panoptic labels."""
    names = list(COCO_PANOPTIC_CLASSES) if num_labels == 133 else [f"class{i}" for i in range(num_labels)]
    swin = transformers.SwinConfig(image_size=224, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                   window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=1, decoder_layers=3, num_attention_heads=2, dim_feedforward=64, num_queries=12,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():  # sharper random masks, so that different queries win different regions
        for layer in model.model.transformer_module.decoder.mask_predictor.mask_embedder.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(10)
    processor = transformers.Mask2FormerImageProcessor(size={"shortest_edge": 224, "longest_edge": 448},
                                                       size_divisor=32, ignore_index=255)
    return model, processor


def reference_maps(model, processor, images, inference="panoptic", thresholds=OPEN):
    """transformers' own model + processor + post-processing, run directly; segments -> class ids."""
    from PIL import Image

    maps = []
    for image in images:
        inputs = processor(images=Image.fromarray(image), return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        if inference == "semantic":
            maps.append(processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
                        .numpy().astype(np.uint8))
            continue
        result = processor.post_process_panoptic_segmentation(
            outputs, **thresholds, label_ids_to_fuse=set(range(80, 133)), target_sizes=[image.shape[:2]])[0]
        seg = result["segmentation"].numpy().astype(np.int64)
        class_map = np.full(seg.shape, 255, np.uint8)
        for s in result["segments_info"]:
            class_map[seg == s["id"]] = s["label_id"]
        maps.append(class_map)
    return maps


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    model, processor = small_mask2former()
    folder = tmp_path_factory.mktemp("mask2former") / "mask2former-small-coco-panoptic"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = [s.image for s in photos()]
    return str(folder), {"open": reference_maps(model, processor, images),
                         "mixed": reference_maps(model, processor, images, thresholds=MIXED),
                         "semantic": reference_maps(model, processor, images, "semantic")}


@pytest.mark.parametrize("setting", ["open", "mixed"])
def test_local_folder_matches_transformers(official, setting):
    folder, refs = official
    ref = refs[setting]
    labeler = create_labeler("semseg_coco", weights=folder, **(OPEN if setting == "open" else MIXED))
    out = labeler.label(photos())
    for sample, o, r in zip(photos(), out, ref):
        assert list(o) == ["semseg_coco"]
        image = o["semseg_coco"]
        assert image.mode == "P" and image.size == (sample.image.shape[1], sample.image.shape[0])
        class_map = np.asarray(image)
        assert class_map.dtype == np.uint8 and class_map.shape == sample.image.shape[:2]
        assert (r != 255).any() and len(np.unique(r)) >= 2  # the compared maps hold classes
        np.testing.assert_array_equal(class_map, r)
        assert set(np.unique(class_map)) <= set(range(133)) | {255}
        if setting == "mixed":
            assert 0.2 < (r == 255).mean() < 0.8  # the pixels in no segment are 255
    assert not np.array_equal(np.asarray(out[0]["semseg_coco"])[:300, :451], ref[1])  # depends on the image


def test_semantic_inference_matches_transformers(official):
    folder, refs = official
    ref = refs["semantic"]
    out = SemsegCocoLabeler(weights=folder, inference="semantic").label(photos())
    for o, r in zip(out, ref):
        assert (r != 255).all()
        np.testing.assert_array_equal(np.asarray(o["semseg_coco"]), r)


def test_png_roundtrip_keeps_ids_and_palette(official):
    folder, refs = official
    ref = refs["open"]
    image = SemsegCocoLabeler(weights=folder, **OPEN).label(photos()[:1])[0]["semseg_coco"]
    back = decode("png", encode("png", image))
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), ref[0])
    assert back.getpalette()[:6] == [220, 20, 60, 119, 11, 32]  # person, bicycle: COCO panoptic colours
    assert palette()[3 * 255:] == [0, 0, 0] and len(palette()) == 768


def test_wrong_class_count_is_a_weights_error(tmp_path):
    model, processor = small_mask2former(num_labels=10)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="133 COCO panoptic classes"):
        SemsegCocoLabeler(weights=str(tmp_path))


def test_not_a_checkpoint_folder_is_a_weights_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="cannot load"):
        SemsegCocoLabeler(weights=str(tmp_path))
    with pytest.raises(WeightsError, match="--weights semseg_coco="):
        SemsegCocoLabeler(weights=str(tmp_path / "missing"))


def test_pretrained_download_failure_is_a_weights_error(monkeypatch):
    calls = []

    def offline(source, *args, **kwargs):
        calls.append(source)
        raise OSError("no network")

    monkeypatch.setattr(transformers.Mask2FormerForUniversalSegmentation, "from_pretrained", offline)
    with pytest.raises(WeightsError, match="could not load the pretrained weights.*--weights tiny"):
        SemsegCocoLabeler(weights="pretrained")
    assert calls == ["facebook/mask2former-swin-base-coco-panoptic"]


def test_tiny_contract_and_determinism():
    samples = photos() + [Sample("strip", np.ascontiguousarray(skimage_data.chelsea()[:, :40])),
                          Sample("dot", np.full((1, 1, 3), 200, np.uint8))]
    a = create_labeler("semseg_coco", weights="tiny", **OPEN).label(samples)
    b = SemsegCocoLabeler(weights="tiny", **OPEN).label(samples)
    for s, x, y in zip(samples, a, b):
        mx, my = np.asarray(x["semseg_coco"]), np.asarray(y["semseg_coco"])
        assert mx.shape == s.image.shape[:2] and (mx != 255).any()
        np.testing.assert_array_equal(mx, my)
    # default (Mask2Former) thresholds: a random model finds no segment, which is a valid all-"none" map
    default = SemsegCocoLabeler(weights="tiny").label(photos()[:1])[0]["semseg_coco"]
    assert (np.asarray(default) == 255).all()
    assert get_labeler_class("semseg_coco").learned


def test_bad_image_is_a_sample_error():
    out = SemsegCocoLabeler(weights="tiny").label([Sample("gray", skimage_data.camera()), photos()[1]])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"
    assert np.asarray(out[1]["semseg_coco"]).shape == (300, 451)


def test_options_are_validated():
    for bad in (dict(threshold=1.5), dict(mask_threshold=-0.1), dict(overlap_mask_area_threshold="high"),
                dict(inference="instance"), dict(hub_id="")):
        with pytest.raises(ConfigError):
            SemsegCocoLabeler(weights="tiny", **bad)
        with pytest.raises(ConfigError):
            SemsegCocoLabeler.fingerprint(weights="tiny", **bad)
    with pytest.raises(ConfigError, match="unknown option batch_size; its options are"):
        SemsegCocoLabeler(weights="tiny", batch_size=4)


def test_fingerprints(official, tmp_path):
    folder, _ = official
    ft = SemsegCocoLabeler.fingerprint(weights="tiny")
    assert SemsegCocoLabeler.identity(weights="tiny")["options"] == {
        "hub_id": "facebook/mask2former-swin-base-coco-panoptic", "inference": "panoptic", "mask_threshold": 0.5,
        "overlap_mask_area_threshold": 0.8, "threshold": 0.8}
    assert SemsegCocoLabeler.fingerprint(weights="tiny", threshold=0.8) == ft
    assert SemsegCocoLabeler.fingerprint(weights="tiny", threshold=0.5) != ft
    fd = SemsegCocoLabeler.fingerprint(weights=folder)
    assert fd not in (ft, SemsegCocoLabeler.fingerprint(weights="pretrained"))
    assert SemsegCocoLabeler.identity(weights=folder)["weights"].startswith("dir-sha256:")
    assert len(COCO_PANOPTIC_STUFF_IDS) == 53


def test_resize_options_set_the_model_input_size_and_enter_the_fingerprint_only_when_set():
    """shortest_edge / longest_edge replace the processor's size (Mask2Former's own 800 / 1333 evaluation size in
    the 4m21 profile); the class map still comes back at the image's size."""
    chelsea = photos()[1]  # 300 x 451
    labeler = SemsegCocoLabeler(weights="tiny", shortest_edge=64, longest_edge=80, **OPEN)
    seen = []
    forward = labeler.model.forward
    labeler.model.forward = lambda pixel_values: (seen.append(tuple(pixel_values.shape[-2:])),
                                                  forward(pixel_values=pixel_values))[1]
    out = labeler.label([chelsea])[0]["semseg_coco"]
    # the shorter side 64, the longer capped at 80 (the aspect kept: 64 x 96 -> 53 x 80), each rounded up to 32
    assert seen == [(64, 96)] and np.asarray(out).shape == (300, 451)
    plain = SemsegCocoLabeler(weights="tiny", **OPEN)
    seen_plain = []
    forward_plain = plain.model.forward
    plain.model.forward = lambda pixel_values: (seen_plain.append(tuple(pixel_values.shape[-2:])),
                                                forward_plain(pixel_values=pixel_values))[1]
    plain.label([chelsea])
    assert seen_plain == [(256, 384)]  # the tiny processor's own shortest edge 256: 451 * 256 / 300 = 384.9 -> 384
    for bad in (dict(shortest_edge=800), dict(shortest_edge=800, longest_edge=600), dict(longest_edge=16)):
        with pytest.raises(ConfigError, match="shortest_edge|longest_edge"):
            SemsegCocoLabeler.fingerprint(weights="tiny", **bad)
    assert "shortest_edge" not in SemsegCocoLabeler.identity(weights="tiny")["options"]
    resized = SemsegCocoLabeler.identity(weights="tiny", shortest_edge=800, longest_edge=1333)["options"]
    assert resized["shortest_edge"] == 800 and resized["longest_edge"] == 1333
    assert SemsegCocoLabeler.fingerprint(weights="tiny", shortest_edge=800, longest_edge=1333) != \
        SemsegCocoLabeler.fingerprint(weights="tiny")

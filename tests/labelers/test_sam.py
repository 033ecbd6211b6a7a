"""sam_instance and sam_edge: a checkpoint in SAM's publisher format must give segment_anything's own masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

segment_anything = pytest.importorskip("segment_anything")
mask_utils = pytest.importorskip("pycocotools.mask")
skimage_data = pytest.importorskip("skimage.data")

from segment_anything import SamAutomaticMaskGenerator, sam_model_registry  # noqa: E402
from segment_anything.build_sam import _build_sam  # noqa: E402

from omniforge import codecs  # noqa: E402
from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers.sam import (  # noqa: E402
    OFFICIAL_ARCHS,
    SamEdgeLabeler,
    SamInstanceLabeler,
    arch_from_state_dict,
)

# the official builder at a small size: a ViT-B checkpoint takes ~10 s per image on a 2-core CPU
SMALL = dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))
PARAMS = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def assert_same_mask(a: dict, b: dict, max_pixels: int = 16) -> None:
    """The same COCO RLE, but for the odd pixel whose logit is ~0 and whose sign a float rounding difference
    between two CPU runs may flip (seen once, under heavy load)."""
    assert isinstance(a["counts"], str) and a["size"] == b["size"]
    if a != b:
        differ = int((mask_utils.decode(a) != mask_utils.decode(b)).sum())
        assert differ <= max_pixels, f"{differ} pixels differ"


def photo() -> np.ndarray:
    return np.ascontiguousarray(skimage_data.astronaut())  # 512 x 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """segment_anything's own `_build_sam` at random init, saved as SAM's `.pth` state dict. The patch-embedding
    and transposed-conv kernels are made constant over their positions, so the random masks are blobs rather
    than salt-and-pepper noise (whose RLEs take seconds to build)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        sam = _build_sam(**SMALL, checkpoint=None)
    with torch.no_grad():
        for conv in (sam.image_encoder.patch_embed.proj, sam.mask_decoder.output_upscaling[0],
                     sam.mask_decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight.mean(dim=(2, 3), keepdim=True).expand_as(conv.weight) * 4)
    path = tmp_path_factory.mktemp("sam") / "sam_small.pth"
    torch.save(sam.state_dict(), path)
    return str(path)


def test_local_checkpoint_matches_segment_anything(checkpoint):
    reference = _build_sam(**SMALL, checkpoint=checkpoint)  # the official loader, from the same file
    ref = SamAutomaticMaskGenerator(reference, output_mode="coco_rle", **PARAMS).generate(photo())
    ref.sort(key=lambda r: -r["predicted_iou"])
    assert len(ref) > 0  # two empty outputs that agree prove nothing

    labeler = create_labeler("sam_instance", weights=checkpoint, **PARAMS)
    out = labeler.label([Sample("astronaut", photo())])[0]["sam_instance"]
    assert out["image_size"] == [512, 512]
    got = out["instances"]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["segmentation"]["size"] == [512, 512]
        assert_same_mask(g["segmentation"], r["segmentation"])
        x, y, w, h = r["bbox"]
        assert g["bbox"] == pytest.approx([x, y, x + w, y + h], abs=1)
        assert g["score"] == pytest.approx(r["predicted_iou"], abs=1e-5)
        assert g["stability_score"] == pytest.approx(r["stability_score"], abs=1e-5)
        assert abs(g["area"] - r["area"]) <= 16
    json.loads(codecs.encode("json", out))  # strict JSON (no NaN, no bytes)


def test_official_sizes_are_recognized():
    for model_type, arch in OFFICIAL_ARCHS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            state = sam_model_registry[model_type]().state_dict()
        assert arch_from_state_dict(state) == arch


def test_checkpoint_of_another_size_names_its_model_type(tmp_path, monkeypatch):
    with torch.device("meta"):
        state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"stand-in")
    monkeypatch.setattr(torch, "load", lambda *a, **k: state)
    with pytest.raises(WeightsError, match="vit_b checkpoint but model_type is 'vit_h'"):
        SamInstanceLabeler(weights=str(path))


def test_wrong_or_missing_checkpoint_is_a_weights_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="not a segment_anything SAM state dict"):
        SamInstanceLabeler(weights=str(path))
    with pytest.raises(WeightsError, match="--weights sam_instance="):
        SamInstanceLabeler(weights=str(tmp_path / "nope.pth"))


def test_pretrained_download_failure_is_a_weights_error(monkeypatch):
    urls = []

    def offline(url, **kwargs):
        urls.append(url)
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="--weights sam_instance=/path/to/sam_vit_h_4b8939.pth.*--weights tiny"):
        SamInstanceLabeler(weights="pretrained", model_type="vit_l")
    assert urls == ["https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"]


@pytest.fixture(scope="module")
def tiny_out():
    labeler = create_labeler("sam_instance", weights="tiny")
    samples = [Sample("astronaut", photo()), Sample("chelsea", np.ascontiguousarray(skimage_data.chelsea()))]
    return samples, labeler.label(samples)


def test_tiny_contract_and_determinism(tiny_out):
    samples, out = tiny_out
    again = SamInstanceLabeler(weights="tiny").label(samples[:1])
    a, b = again[0]["sam_instance"], out[0]["sam_instance"]
    assert len(a["instances"]) == len(b["instances"])
    for x, y in zip(a["instances"], b["instances"]):
        assert_same_mask(x["segmentation"], y["segmentation"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-6)
    for sample, o in zip(samples, out):
        res = o["sam_instance"]
        h, w = sample.image.shape[:2]
        assert res["image_size"] == [h, w]
        inst = res["instances"]
        assert inst and [i["score"] for i in inst] == sorted((i["score"] for i in inst), reverse=True)
        for i in inst:
            assert isinstance(i["segmentation"]["counts"], str) and i["segmentation"]["size"] == [h, w]
            m = mask_utils.decode(i["segmentation"])
            ys, xs = np.nonzero(m)
            assert i["area"] == int(m.sum()) > 0
            assert i["bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]  # XYXY, inclusive last pixel
        codecs.encode("json", res)
    assert get_labeler_class("sam_instance").learned


def test_bad_image_is_a_sample_error():
    out = SamInstanceLabeler(weights="tiny").label([Sample("gray", skimage_data.camera())])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"


def test_options_are_validated_and_fingerprinted(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        SamInstanceLabeler(weights="tiny", model_type="vit_x")
    with pytest.raises(ConfigError, match="pred_iou_thresh"):
        SamInstanceLabeler(weights="tiny", pred_iou_thresh=1.5)
    with pytest.raises(ConfigError, match="points_per_side"):
        SamInstanceLabeler.fingerprint(weights="tiny", points_per_side=0)
    with pytest.raises(ConfigError, match="unknown option batch_size; its options are"):
        SamInstanceLabeler(weights="tiny", batch_size=4)
    tiny = SamInstanceLabeler.identity(weights="tiny")["options"]
    assert tiny["points_per_side"] == 4 and tiny["pred_iou_thresh"] == 0.0 and tiny["model_type"] == "vit_h"
    official = SamInstanceLabeler.identity(weights="pretrained")["options"]
    assert official == dict(model_type="vit_h", points_per_side=32, pred_iou_thresh=0.88, stability_score_thresh=0.95,
                            crop_n_layers=0, min_mask_region_area=0, points_per_batch=64)
    ft = SamInstanceLabeler.fingerprint(weights="tiny")
    assert SamInstanceLabeler.fingerprint(weights="tiny", points_per_side=4) == ft  # the default, spelled out
    assert SamInstanceLabeler.fingerprint(weights="tiny", points_per_side=8) != ft
    assert SamInstanceLabeler.fingerprint(weights="pretrained") != SamInstanceLabeler.fingerprint(
        weights="pretrained", model_type="vit_b")
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"weights")
    assert SamInstanceLabeler.fingerprint(weights=str(ckpt)) != ft


# -- sam_edge ------------------------------------------------------------------------------------------------

def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ring(shape, top, left, bottom, right) -> np.ndarray:
    """The outermost pixels of the square rows top..bottom, columns left..right (inclusive)."""
    ring = np.zeros(shape, bool)
    ring[top, left:right + 1] = ring[bottom, left:right + 1] = True
    ring[top:bottom + 1, left] = ring[top:bottom + 1, right] = True
    return ring


def test_edges_lie_on_the_square_borders():
    h, w = 60, 80
    a, b = np.zeros((h, w), bool), np.zeros((h, w), bool)
    a[10:30, 10:30] = True  # rows/cols 10..29
    b[20:40, 25:45] = True  # rows 20..39, cols 25..44: overlaps a
    instances = [{"segmentation": _rle(a), "bbox": [10, 10, 29, 29], "score": 0.9, "stability_score": 0.9, "area": 400},
                 {"segmentation": _rle(b), "bbox": [25, 20, 44, 39], "score": 0.8, "stability_score": 0.9, "area": 400}]
    data = json.loads(codecs.encode("json", {"instances": instances, "image_size": [h, w]}))
    out = create_labeler("sam_edge").label([Sample("squares", np.zeros((h, w, 3), np.uint8),
                                                   inputs={"sam_instance": data})])[0]
    edge = out["sam_edge"]
    assert edge.dtype == np.uint8 and edge.shape == (h, w) and set(np.unique(edge)) == {0, 255}
    expected = _ring((h, w), 10, 10, 29, 29) | _ring((h, w), 20, 25, 39, 44)
    np.testing.assert_array_equal(edge == 255, expected)
    codecs.encode("png", edge)


def test_edges_touching_the_image_border_and_empty_instances():
    h, w = 20, 30
    m = np.zeros((h, w), bool)
    m[:, :10] = True  # touches the left, top and bottom borders: only its right side is an edge
    inst = [{"segmentation": _rle(m)}]
    edge = SamEdgeLabeler().label([Sample("k", np.zeros((h, w, 3), np.uint8),
                                          inputs={"sam_instance": {"instances": inst}})])[0]["sam_edge"]
    expected = np.zeros((h, w), bool)
    expected[:, 9] = True
    np.testing.assert_array_equal(edge == 255, expected)
    empty = SamEdgeLabeler().label([Sample("k", np.zeros((h, w, 3), np.uint8),
                                           inputs={"sam_instance": {"instances": [], "image_size": [h, w]}})])[0]
    assert empty["sam_edge"].shape == (h, w) and not empty["sam_edge"].any()


def test_edge_input_of_the_wrong_size_is_a_sample_error():
    inst = [{"segmentation": _rle(np.ones((10, 10), bool))}]
    image = np.zeros((20, 30, 3), np.uint8)
    out = SamEdgeLabeler().label([Sample("k", image, inputs={"sam_instance": {"instances": inst}}),
                                  Sample("k2", image, inputs={"sam_instance": {"foo": 1}})])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_input"
    assert isinstance(out[1], SampleError)
    cls = get_labeler_class("sam_edge")
    assert cls.requires == ("sam_instance",) and not cls.learned


def test_round_trip_from_tiny_sam_instance(tiny_out):
    samples, out = tiny_out
    for sample, o in zip(samples, out):
        decoded = codecs.decode("json", codecs.encode("json", o["sam_instance"]))  # as the pipeline hands it over
        edge = SamEdgeLabeler().label([Sample(sample.key, sample.image,
                                              inputs={"sam_instance": decoded})])[0]["sam_edge"]
        assert edge.shape == sample.image.shape[:2] and edge.dtype == np.uint8
        union = np.zeros(edge.shape, bool)
        for inst in decoded["instances"]:
            union |= mask_utils.decode(inst["segmentation"]).astype(bool)
        assert edge.any() and not (edge.astype(bool) & ~union).any()  # edges are mask pixels
        assert 0 < (edge > 0).mean() < 0.5

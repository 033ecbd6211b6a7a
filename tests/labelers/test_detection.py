"""det and human_keypoints: checkpoints written as transformers `save_pretrained` folders must give transformers'
own predictions (RT-DETR detections, ViTPose keypoints), normalized to 0..1 image coordinates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.coco import COCO_DETECTION_CLASSES, COCO_KEYPOINTS  # noqa: E402
from omniforge.labelers.detection import DetLabeler, HumanKeypointsLabeler  # noqa: E402
from omniforge.modalities import MODALITIES  # noqa: E402
from omniforge.pipeline.label import _encode_checked  # noqa: E402


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): normalization by W and H differs
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


def pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def encodes(modality: str, value) -> None:
    assert _encode_checked(MODALITIES[modality], value)
    json.dumps(value, allow_nan=False)


# -- det ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rtdetr_folder(tmp_path_factory):
    """A small RT-DETR (transformers' RTDetrForObjectDetection, COCO classes) at random init, saved the way the
    publisher ships it: model and image processor in one `save_pretrained` folder."""
    backbone = transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 24, 48, 64], depths=[1, 1, 1, 1],
                                               out_features=["stage2", "stage3", "stage4"])
    config = transformers.RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[24, 48, 64], encoder_hidden_dim=32, encoder_ffn_dim=32,
        encoder_attention_heads=2, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=32, decoder_layers=1,
        decoder_attention_heads=2, num_queries=60, num_denoising=0, id2label=dict(enumerate(COCO_DETECTION_CLASSES)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = transformers.RTDetrForObjectDetection(config).eval()
    processor = transformers.RTDetrImageProcessor(size={"height": 256, "width": 256})
    folder = tmp_path_factory.mktemp("rtdetr") / "rtdetr-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), model, processor


def reference_detections(model, processor, image: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' own predictor: processor, model, post_process_object_detection, in pixels."""
    inputs = processor(images=[pil(image)], return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    res = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.shape[:2]])[0]
    return {k: v.numpy() for k, v in res.items()}


def test_det_local_folder_matches_transformers(rtdetr_folder):
    folder, model, processor = rtdetr_folder
    labeler = create_labeler("det", weights=folder, threshold=0.0, max_detections=1000)
    for sample in photos():
        h, w = sample.image.shape[:2]
        (out,) = labeler.label([sample])
        encodes("det", out["det"])
        instances = out["det"]["instances"]
        ref = reference_detections(model, processor, sample.image)
        assert len(instances) == len(ref["scores"]) == 60  # non-empty: every query at threshold 0
        scores = np.array([i["score"] for i in instances])
        assert (np.diff(scores) <= 0).all() and scores.max() > 0.01
        np.testing.assert_allclose(scores, ref["scores"], atol=1e-5)
        assert [i["class_name"] for i in instances] == [COCO_DETECTION_CLASSES[int(c)] for c in ref["labels"]]
        boxes = np.array([i["boxes"] for i in instances])
        ref_boxes = np.clip(ref["boxes"] / np.array([w, h, w, h]), 0, 1)
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-4)
        assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[:, 2:] >= boxes[:, :2]).all()


def test_det_matches_the_transformers_pipeline(rtdetr_folder):
    # transformers' object-detection pipeline on the same folder: same labels and scores, boxes to the pixel
    # (the pipeline rounds boxes to integers and does not clip them)
    folder = rtdetr_folder[0]
    image = skimage_data.chelsea()
    h, w = image.shape[:2]
    pipe = transformers.pipeline("object-detection", model=folder, threshold=0.0)
    ref = pipe(pil(image))
    (out,) = DetLabeler(weights=folder, threshold=0.0).label([Sample("chelsea", image)])
    got = out["det"]["instances"]
    assert len(got) == len(ref) > 0
    for g, r in zip(got, ref):
        assert g["class_name"] == r["label"] and g["score"] == pytest.approx(r["score"], abs=1e-5)
        b = r["box"]
        ref_box = np.clip([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], [0, 0, 0, 0], [w, h, w, h])
        np.testing.assert_allclose(np.array(g["boxes"]) * [w, h, w, h], ref_box, atol=1.01)


def test_det_threshold_max_detections_and_batching(rtdetr_folder):
    folder = rtdetr_folder[0]
    single = [DetLabeler(weights=folder, threshold=0.0).label([s])[0] for s in photos()]
    batched = DetLabeler(weights=folder, threshold=0.0).label(photos())
    for a, b in zip(single, batched):  # a batch gives what one image at a time gives
        sa = np.array([i["score"] for i in a["det"]["instances"]])
        sb = np.array([i["score"] for i in b["det"]["instances"]])
        np.testing.assert_allclose(sa, sb, atol=1e-4)
    cut = float(np.median([i["score"] for i in single[0]["det"]["instances"]]))
    (kept,) = DetLabeler(weights=folder, threshold=cut, max_detections=5).label(photos()[:1])
    assert 0 < len(kept["det"]["instances"]) <= 5
    assert all(i["score"] >= cut - 1e-5 for i in kept["det"]["instances"])
    assert kept["det"]["instances"] == single[0]["det"]["instances"][: len(kept["det"]["instances"])]
    (none,) = DetLabeler(weights=folder, threshold=1.0).label(photos()[:1])
    assert none == {"det": {"instances": []}}  # nothing above the threshold: a valid empty result


def test_det_tiny_contract_and_determinism():
    samples = photos() + [Sample("gray", skimage_data.camera()), Sample("dot", np.full((1, 1, 3), 9, np.uint8))]
    a = create_labeler("det", weights="tiny", threshold=0.0).label(samples)
    b = DetLabeler(weights="tiny", threshold=0.0).label(samples)
    assert a[:2] == b[:2] and a[3] == b[3]
    assert isinstance(a[2], SampleError) and a[2].error_type == "bad_image"  # grayscale is not the contract
    for out in (a[0], a[1], a[3]):
        encodes("det", out["det"])
        instances = out["det"]["instances"]
        assert 0 < len(instances) <= 100
        assert all(i["class_name"] in COCO_DETECTION_CLASSES for i in instances)
    assert a[0] != a[1]
    # the random tiny model's scores stay well below the default threshold: an empty, valid result
    assert DetLabeler(weights="tiny").label(photos()[:1]) == [{"det": {"instances": []}}]
    assert get_labeler_class("det").learned


def test_det_weights_errors(tmp_path, rtdetr_folder, monkeypatch):
    with pytest.raises(WeightsError, match="--weights det=/path/to/save_pretrained folder"):
        DetLabeler(weights=str(tmp_path / "missing"))
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(WeightsError, match="not found"):  # a folder is the format, not a single file
        DetLabeler(weights=str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="cannot load"):
        DetLabeler(weights=str(empty))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForObjectDetection, "from_pretrained", offline)
    with pytest.raises(WeightsError, match="could not load the pretrained.*--weights det=.*--weights tiny"):
        DetLabeler(weights="pretrained")


def test_det_options_and_fingerprints(tmp_path, rtdetr_folder):
    for bad in (dict(threshold=1.5), dict(threshold="high"), dict(max_detections=0), dict(hub_id="")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DetLabeler(weights="tiny", **bad)
    with pytest.raises(ConfigError, match="unknown option nms; its options are hub_id, threshold, max_detections"):
        DetLabeler(weights="tiny", nms=0.5)
    ft = DetLabeler.fingerprint(weights="tiny")
    assert DetLabeler.fingerprint(weights="tiny", threshold=0.3, max_detections=100) == ft  # defaults are explicit
    assert DetLabeler.fingerprint(weights="tiny", threshold=0) != ft
    assert DetLabeler.identity(weights="tiny")["options"] == {
        "hub_id": "PekingU/rtdetr_r50vd", "max_detections": 100, "threshold": 0.3}
    # a save_pretrained folder is identified by its content
    folder = tmp_path / "copy"
    model = transformers.AutoModelForObjectDetection.from_pretrained(rtdetr_folder[0])
    model.save_pretrained(folder)
    f1 = DetLabeler.fingerprint(weights=str(folder))
    assert DetLabeler.identity(weights=str(folder))["weights"].startswith("dir-sha256:")
    assert f1 != ft and f1 != DetLabeler.fingerprint(weights=rtdetr_folder[0])  # no processor file in the copy
    (folder / "preprocessor_config.json").write_text("{}")
    assert DetLabeler.fingerprint(weights=str(folder)) != f1


# -- human_keypoints -------------------------------------------------------------------------------------------

ASTRONAUT_PERSON = [0.2, 0.04, 0.86, 1.0]  # around the astronaut in skimage's astronaut photo (XYXY, 0..1)


@pytest.fixture(scope="module")
def vitpose_folder(tmp_path_factory):
    """A small ViTPose (transformers' VitPoseForPoseEstimation, 17 COCO keypoints) at random init, saved with
    its image processor in one `save_pretrained` folder."""
    backbone = transformers.VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                                  out_indices=[1])
    config = transformers.VitPoseConfig(backbone_config=backbone, num_labels=17)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = transformers.VitPoseForPoseEstimation(config).eval()
    processor = transformers.VitPoseImageProcessor(size={"height": 64, "width": 48})
    folder = tmp_path_factory.mktemp("vitpose") / "vitpose-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder), model, processor


def reference_keypoints(model, processor, image: np.ndarray, box_xyxy: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own ViTPose predictor on one COCO xywh pixel box: keypoints in pixels and their scores."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = np.array(box_xyxy) * [w, h, w, h]
    boxes = [np.array([[x0, y0, x1 - x0, y1 - y0]], dtype=np.float32)]
    inputs = processor(images=[pil(image)], boxes=boxes, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    pose = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    return pose["keypoints"].numpy(), pose["scores"].numpy()


def det_json(*instances: tuple[list[float], str, float]) -> dict:
    return {"instances": [{"boxes": b, "class_name": c, "score": s} for b, c, s in instances]}


def test_human_keypoints_local_folder_matches_transformers(vitpose_folder):
    folder, model, processor = vitpose_folder
    image = skimage_data.astronaut()
    det = det_json((ASTRONAUT_PERSON, "person", 0.9), ([0.0, 0.0, 0.3, 0.3], "cat", 0.95),
                   ([0.5, 0.5, 0.6, 0.6], "person", 0.1))  # a cat and a person below person_threshold: ignored
    labeler = create_labeler("human_keypoints", weights=folder)
    (out,) = labeler.label([Sample("astronaut", image, inputs={"det": det})])
    encodes("human_keypoints", out["human_keypoints"])
    poses = out["human_keypoints"]
    assert poses["keypoint_names"] == list(COCO_KEYPOINTS)
    assert len(poses["instances"]) == 1
    inst = poses["instances"][0]
    assert inst["bbox"] == ASTRONAUT_PERSON and inst["score"] == 0.9
    kps = np.array(inst["keypoints"])
    assert kps.shape == (17, 3)
    ref_xy, ref_scores = reference_keypoints(model, processor, image, ASTRONAUT_PERSON)
    assert np.abs(ref_scores).max() > 1e-3  # not a comparison between two all-zero heatmaps
    assert len(np.unique(ref_xy.round(1), axis=0)) > 3  # the keypoints are spread out, not all in one place
    np.testing.assert_allclose(kps[:, :2] * 512, np.clip(ref_xy, 0, 512), atol=0.02)
    np.testing.assert_allclose(kps[:, 2], ref_scores, atol=1e-4)


def test_human_keypoints_batches_several_people_and_images(vitpose_folder):
    folder, model, processor = vitpose_folder
    astronaut, chelsea = skimage_data.astronaut(), skimage_data.chelsea()
    second = [0.05, 0.1, 0.5, 0.9]
    samples = [
        Sample("astronaut", astronaut, inputs={"det": det_json((second, "person", 0.5),
                                                               (ASTRONAUT_PERSON, "person", 0.9))}),
        Sample("nobody", astronaut, inputs={"det": det_json(([0.1, 0.1, 0.5, 0.5], "dog", 0.9))}),
        Sample("chelsea", chelsea, inputs={"det": det_json((second, "person", 0.7))}),
    ]
    out = HumanKeypointsLabeler(weights=folder).label(samples)
    a, nobody, c = (o["human_keypoints"] for o in out)
    assert [i["score"] for i in a["instances"]] == [0.9, 0.5]  # highest det score first
    assert nobody == {"keypoint_names": list(COCO_KEYPOINTS), "instances": []}  # no person: a valid empty result
    for inst, image in ((a["instances"][0], astronaut), (a["instances"][1], astronaut), (c["instances"][0], chelsea)):
        h, w = image.shape[:2]
        ref_xy, ref_scores = reference_keypoints(model, processor, image, inst["bbox"])
        kps = np.array(inst["keypoints"])
        np.testing.assert_allclose(kps[:, :2] * [w, h], np.clip(ref_xy, 0, [w, h]), atol=0.02)
        np.testing.assert_allclose(kps[:, 2], ref_scores, atol=1e-4)
    one = HumanKeypointsLabeler(weights=folder, max_persons=1, person_threshold=0.6).label(samples)
    assert [len(o["human_keypoints"]["instances"]) for o in one] == [1, 0, 1]
    assert one[0]["human_keypoints"]["instances"][0] == a["instances"][0]


def test_human_keypoints_inputs_and_edge_cases():
    labeler = create_labeler("human_keypoints", weights="tiny")
    image = skimage_data.astronaut()
    person = det_json((ASTRONAUT_PERSON, "person", 0.8))
    out = labeler.label([
        Sample("ok", image, inputs={"det": person}),
        Sample("missing", image),
        Sample("bad", image, inputs={"det": {"instances": [{"boxes": [0, 0, 1], "class_name": "person", "score": 1}]}}),
        Sample("not_a_dict", image, inputs={"det": [1, 2]}),
        Sample("gray", skimage_data.camera(), inputs={"det": person}),
        Sample("dot", np.full((1, 1, 3), 9, np.uint8), inputs={"det": det_json(([0, 0, 1, 1], "person", 0.9))}),
        Sample("sliver", image, inputs={"det": det_json(([0.5, 0.5, 0.5, 0.9], "person", 0.9))}),
    ])
    assert len(out[0]["human_keypoints"]["instances"]) == 1
    encodes("human_keypoints", out[0]["human_keypoints"])
    assert [o.error_type for o in out[1:5]] == ["missing_input", "bad_input", "bad_input", "bad_image"]
    assert len(out[5]["human_keypoints"]["instances"]) == 1  # a 1x1 image with a whole-image person box
    assert out[6]["human_keypoints"]["instances"] == []  # a zero-width box is skipped
    again = HumanKeypointsLabeler(weights="tiny").label([Sample("ok", image, inputs={"det": person})])
    assert again[0] == out[0]  # the tiny weights are seeded
    cls = get_labeler_class("human_keypoints")
    assert cls.learned and cls.requires == ("det",)


def test_human_keypoints_weights_and_options(tmp_path, monkeypatch):
    config = transformers.VitPoseConfig(backbone_config=transformers.VitPoseBackboneConfig(
        image_size=[32, 32], hidden_size=16, num_hidden_layers=1, num_attention_heads=1, out_indices=[1]),
        num_labels=5)
    transformers.VitPoseForPoseEstimation(config).save_pretrained(tmp_path / "five")
    transformers.VitPoseImageProcessor().save_pretrained(tmp_path / "five")
    with pytest.raises(WeightsError, match="predicts 5 keypoints"):
        HumanKeypointsLabeler(weights=str(tmp_path / "five"))
    with pytest.raises(WeightsError, match="--weights human_keypoints="):
        HumanKeypointsLabeler(weights=str(tmp_path / "missing"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(transformers.VitPoseForPoseEstimation, "from_pretrained", offline)
    with pytest.raises(WeightsError, match="could not load the pretrained"):
        HumanKeypointsLabeler(weights="pretrained")
    with pytest.raises(ConfigError, match="person_threshold"):
        HumanKeypointsLabeler(weights="tiny", person_threshold=-0.1)
    with pytest.raises(ConfigError, match="max_persons"):
        HumanKeypointsLabeler(weights="tiny", max_persons=2.5)
    ft = HumanKeypointsLabeler.fingerprint(weights="tiny")
    assert HumanKeypointsLabeler.fingerprint(weights="tiny", person_threshold=0.3, max_persons=20) == ft
    assert HumanKeypointsLabeler.fingerprint(weights="tiny", person_threshold=0.5) != ft
    assert HumanKeypointsLabeler.fingerprint(weights=str(tmp_path / "five")) != ft

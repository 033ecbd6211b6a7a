import numpy as np
import pytest
from skimage import data

from omniforge.labelers import Sample, create_labeler
from omniforge.labelers.metadata import (caption_statistics, geometric_complexity, image_statistics, occlusion_edges,
                                         occlusion_score, semseg_statistics)


def test_image_statistics_on_known_images():
    gray = np.full((8, 8, 3), 128, np.uint8)
    s = image_statistics(gray)
    assert s["colorfulness"] == 0 and s["saturation"] == 0 and s["contrast"] == 0 and s["entropy"] == 0
    assert s["brightness"] == 128  # ml-4m's units: 0..255
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, 4:] = 255
    s = image_statistics(half)
    assert s["entropy"] == 1.0 and abs(s["contrast"] - 127.5) < 1e-3
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    gray = data.camera()[:8, :8, None].repeat(3, 2)
    assert image_statistics(red)["colorfulness"] > image_statistics(gray)["colorfulness"]


def test_caption_semseg_and_normal_statistics():
    assert caption_statistics("Two cats. On a mat!") == {"caption_n_chars": len("Two cats. On a mat!"),
                                                        "caption_n_words": 5, "caption_n_sentences": 2}
    from omniforge.labelers._coco_panoptic import COCO_PANOPTIC_CLASSES

    classes = np.full((4, 4), 255, np.uint8)
    classes[:2] = COCO_PANOPTIC_CLASSES.index("person")  # a thing
    classes[2] = COCO_PANOPTIC_CLASSES.index("road")  # walkable stuff
    stats = semseg_statistics(classes)
    assert stats == {"objectness": round(8 / 12, 4), "semantic_diversity": 2, "walkability": round(4 / 12, 4)}
    flat = np.zeros((4, 4, 3), np.uint8)
    flat[..., 2] = 255  # every normal (0, 0, 1) -> one plane
    flat[..., :2] = 128
    assert geometric_complexity(flat) < 0.01
    rng = np.random.default_rng(0)
    assert geometric_complexity(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) > 0.5


def test_metadata_uses_only_the_inputs_it_gets():
    labeler = create_labeler("metadata")
    image = np.ascontiguousarray(data.astronaut())
    plain = labeler.label([Sample(key="a", image=image)])[0]["metadata"]
    assert "n_coco_instances" not in plain and "caption_n_words" not in plain
    det = {"instances": [{"boxes": [0, 0, 1, 1], "class_name": "person", "score": 0.9},
                         {"boxes": [0, 0, .5, .5], "class_name": "person", "score": 0.8},
                         {"boxes": [0, 0, .2, .2], "class_name": "dog", "score": 0.7}]}
    full = labeler.label([Sample(key="a", image=image, caption="An astronaut.", inputs={"det": det},
                                 meta={"orig_width": 1024, "orig_height": 1024})])[0]["metadata"]
    assert full["n_coco_instances"] == 3 and full["coco_instance_diversity"] == 2
    assert full["original_width"] == 1024 and full["caption_n_words"] == 2


def test_n_humans_comes_from_the_smpl_teacher_when_it_ran():
    labeler = create_labeler("metadata")
    image = np.zeros((8, 8, 3), np.uint8)
    smpl = {"bbox_xyxy": [[0, 0, 4, 4], [2, 2, 8, 8]]}  # HMR2.0's people (only their count matters here)
    keypoints = {"instances": [{"bbox": [0, 0, 1, 1], "keypoints": []}]}  # ViTPose's, on other boxes
    n = {name: labeler.label([Sample(key="a", image=image, inputs=inputs)])[0]["metadata"].get("n_humans")
         for name, inputs in [("both", {"human_poses": smpl, "human_keypoints": keypoints}),
                              ("nobody", {"human_poses": {}, "human_keypoints": keypoints}),
                              ("keypoints", {"human_keypoints": keypoints}), ("none", {})]}
    assert n == {"both": 2, "nobody": 0, "keypoints": 1, "none": None}


def _step(h: int, w: int, at: int, low: int = 0, high: int = 65535) -> np.ndarray:
    """An (h, w) uint16 depth map: `low` left of column `at`, `high` from it on (one vertical depth step)."""
    depth = np.full((h, w), low, np.uint16)
    depth[:, at:] = high
    return depth


def test_occlusion_score_is_the_fraction_of_pixels_on_depth_steps():
    # a full-range step between two columns makes the two columns beside it occlusion edges
    assert occlusion_score(_step(256, 256, 128)) == round(2 * 256 / (256 * 256), 4)
    assert occlusion_score(_step(256, 512, 256)) == round(2 * 256 / (256 * 512), 4)
    # the same scene stored at twice the size gives the same score (maps are shrunk to a shorter side of 256)
    assert occlusion_score(_step(512, 512, 256)) == occlusion_score(_step(256, 256, 128))
    # a near box on a far background (an L-shaped contour): edges along both steps and nowhere else
    two = _step(256, 256, 128)
    two[200:] = 65535
    edges = occlusion_edges(two)
    assert edges[:198, 127:129].all() and edges[199:201, :126].all()
    assert not edges[:196, :126].any() and not edges[203:].any() and not edges[:, 131:].any()
    assert occlusion_score(two) == round(edges.mean(), 4) and 2 / 256 < occlusion_score(two) < 4 / 256


def test_occlusion_score_is_zero_without_depth_discontinuities():
    assert occlusion_score(np.zeros((64, 80), np.uint16)) == 0.0  # flat (to_uint16 of a constant map)
    assert occlusion_score(np.full((300, 200), 40000, np.uint16)) == 0.0
    ramp = np.tile(np.linspace(0, 65535, 256), (256, 1)).astype(np.uint16)  # a plane slanting over the whole range
    assert occlusion_score(ramp) == 0.0
    small = _step(256, 256, 128, low=30000, high=30000 + int(0.04 * 65535))  # 4% of the range: below the threshold
    assert occlusion_score(small) == 0.0
    assert occlusion_score(_step(256, 256, 128, low=30000, high=30000 + int(0.08 * 65535))) > 0  # 8%: an edge
    with pytest.raises(ValueError, match="uint16"):
        occlusion_score(np.zeros((8, 8, 3), np.uint8))


def test_metadata_writes_the_scores_only_when_their_source_ran():
    labeler = create_labeler("metadata")
    image = np.ascontiguousarray(data.astronaut())
    plain = labeler.label([Sample(key="a", image=image)])[0]["metadata"]
    assert not {"occlusion_score", "aesthetic_score", "watermark_score"} & set(plain)
    inputs = {"depth": _step(512, 512, 256), "aesthetic_score": 5.678912, "watermark_score": 0.25}
    full = labeler.label([Sample(key="a", image=image, inputs=inputs)])[0]["metadata"]
    assert full["occlusion_score"] == round(2 / 256, 4)
    assert full["aesthetic_score"] == 5.6789 and full["watermark_score"] == 0.25
    only = labeler.label([Sample(key="a", image=image, inputs={"watermark_score": 0.9})])[0]["metadata"]
    assert only["watermark_score"] == 0.9 and "aesthetic_score" not in only and "occlusion_score" not in only
    assert {"depth", "aesthetic_score", "watermark_score"} <= set(labeler.optional_inputs)
    with pytest.raises(ValueError, match="aesthetic_score label .* is not a finite number"):
        labeler.label([Sample(key="a", image=image, inputs={"aesthetic_score": {"score": 5}})])


def test_metadata_scores_serialize_as_4m21_reads_them():
    # ml-4m's MetadataTransform bins: watermark_score at 0.5, aesthetic_score at 4.5 and 5.5, occlusion_score
    # 50 bins over 0..0.25 (field ids 18, 19, 20)
    from omniforge.tokenize.text import metadata_units, parse_metadata

    units = metadata_units({"occlusion_score": 0.1, "watermark_score": 0.7, "aesthetic_score": 5.0})
    assert units == ["v1=18 v0=19", "v1=19 v0=1", "v1=20 v0=1"]
    assert parse_metadata(" ".join(units)) == {"occlusion_score": 19, "watermark_score": 1, "aesthetic_score": 1}

import numpy as np
from skimage import data

from omniforge.labelers import Sample, create_labeler
from omniforge.labelers.metadata import caption_statistics, geometric_complexity, image_statistics, semseg_statistics


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

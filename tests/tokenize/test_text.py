"""The WordPiece tokenizer and the 4M-21 text forms. Expected strings are written by hand from 4M-21's rules
(fourm/data/modality_transforms.py), never copied from the code under test."""

import numpy as np
import pytest

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.coco import COCO_DETECTION_CLASSES, COCO_KEYPOINTS
from omniforge.modalities import all_modalities, get_modality
from omniforge.tokenize.text import (
    EOS, NUM_SENTINELS, NUM_SPECIAL_TOKENS, PAD, SOS, UNK, TextTokenizer, det_units, metadata_units,
    palette_units, parse_det, parse_metadata, parse_palette, parse_keypoints, parse_sam, keypoint_units,
    sam_contours, sam_draw_units, sam_query_points, sam_units, train_wordpiece, SMPL_TOKENS_PER_PERSON,
    parse_smpl_poses, smpl_units,
)

DOG = {"boxes": [0.1, 0.2, 0.5, 1.0], "class_name": "dog", "score": 0.9}
LIGHT = {"boxes": [0.05, 0.05, 0.3, 0.4], "class_name": "traffic light", "score": 0.5}
CAT = {"boxes": [0.6, 0.0, 0.7, 0.1], "class_name": "cat", "score": 0.95}
# round(c * 999) by hand: 0.1 -> 99.9 -> 100, 0.2 -> 200, 0.5 -> 499.5 -> 500 (half to even), 1.0 -> 999,
# 0.05 -> 49.95 -> 50, 0.3 -> 299.7 -> 300, 0.4 -> 399.6 -> 400, 0.6 -> 599.4 -> 599, 0.7 -> 699.3 -> 699
DOG_S = "v0=100 v1=200 v2=500 v3=999 dog"
LIGHT_S = "v0=50 v1=50 v2=300 v3=400 traffic light"
CAT_S = "v0=599 v1=0 v2=699 v3=100 cat"


# ---------------------------------------------------------------------------------------------- det


def test_det_exact_string_and_orders():
    boxes = [DOG, LIGHT, CAT]
    # xmin^2 + ymin^2: light 0.005, dog 0.05, cat 0.36
    assert det_units(boxes) == [LIGHT_S, DOG_S, CAT_S]
    assert " ".join(det_units([DOG])) == "v0=100 v1=200 v2=500 v3=999 dog"
    # areas: dog 0.32, light 0.0875, cat 0.01
    assert det_units(boxes, order="area") == [DOG_S, LIGHT_S, CAT_S]
    assert det_units(boxes, order="score") == [CAT_S, DOG_S, LIGHT_S]
    assert det_units(boxes, min_score=0.6) == [DOG_S, CAT_S]
    assert det_units([]) == []


def test_det_ties_keep_input_order_and_coordinates_are_clipped():
    a = {"boxes": [0.0, 0.0, 0.5, 0.5], "class_name": "cat", "score": 0.5}
    b = {"boxes": [0.0, 0.0, 0.5, 0.5], "class_name": "dog", "score": 0.5}
    assert [u.split()[-1] for u in det_units([a, b], order="score")] == ["cat", "dog"]
    assert [u.split()[-1] for u in det_units([b, a], order="area")] == ["dog", "cat"]
    out = det_units([{"boxes": [-0.1, 0.0, 1.2, 1.0], "class_name": "cat", "score": 1.0}])
    assert out == ["v0=0 v1=0 v2=999 v3=999 cat"]


def test_det_bad_input():
    with pytest.raises(ConfigError, match="order"):
        det_units([DOG], order="random")
    with pytest.raises(SampleError):
        det_units([{"boxes": [0.1, 0.2], "class_name": "dog", "score": 1.0}])


def test_det_round_trip():
    parsed = parse_det(" ".join(det_units([DOG, LIGHT, CAT])))
    assert [p["class_name"] for p in parsed] == ["traffic light", "dog", "cat"]
    for p, src in zip(parsed, [LIGHT, DOG, CAT]):
        assert np.allclose(p["boxes"], src["boxes"], atol=0.5 / 999 + 1e-9)
    # a sequence cut mid-box keeps only the complete boxes
    assert [p["class_name"] for p in parse_det(LIGHT_S + " v0=100 v1=200")] == ["traffic light"]


# ---------------------------------------------------------------------------------------------- palette


def test_palette_exact_and_round_trip():
    colors = [[255, 0, 10], [1, 2, 3]]
    units = palette_units(colors)
    assert units == ["v1=2 v0=255 v0=0 v0=10 v0=1 v0=2 v0=3"]
    assert parse_palette(units[0]) == colors
    seven = [[i, 2 * i, 3 * i] for i in range(7)]
    assert len(palette_units(seven)[0].split()) == 22 == get_modality("color_palette").num_tokens - 1
    assert parse_palette(palette_units(seven)[0]) == seven
    with pytest.raises(SampleError):
        palette_units([])
    with pytest.raises(SampleError):
        palette_units([[256, 0, 0]])


# ---------------------------------------------------------------------------------------------- metadata


def test_metadata_bins_by_hand():
    meta = {
        "original_width": 1000,  # 1000 // 32 = 31
        "original_height": 40000,  # 1250 -> clamped 999
        "caption_n_words": 12,
        "n_sam_instances": 1500,  # clamped 999
        "coco_instance_diversity": 3,
        "colorfulness": 30.0,  # 30 / 150 * 49 = 9.8 -> 9
        "brightness": 127.5,  # 127.5 / 255 * 49 = 24.5 -> 24
        "contrast": 51,  # 51 / 127 * 49 = 19.68 -> 19
        "saturation": 255.0,  # 49
        "entropy": 7.5,  # 0.75 * 49 = 36.75 -> 36
        "walkability": -0.1,  # clipped to 0 -> 0
        "geometric_complexity": 0.3,  # 0.4 * 49 = 19.6 -> 19
        "watermark_score": 0.7,  # >= 0.5 -> 1
        "aesthetic_score": 5.0,  # in [4.5, 5.5) -> 1
    }
    assert metadata_units(meta) == [
        "v1=0 v0=31", "v1=1 v0=999", "v1=3 v0=12", "v1=6 v0=999", "v1=8 v0=3", "v1=9 v0=9", "v1=10 v0=24",
        "v1=11 v0=19", "v1=12 v0=49", "v1=13 v0=36", "v1=14 v0=0", "v1=17 v0=19", "v1=19 v0=1", "v1=20 v0=1",
    ]
    # an order is honoured as given and must name exactly the label's fields
    assert metadata_units({"brightness": 0, "original_width": 64}, ["brightness", "original_width"]) == [
        "v1=10 v0=0", "v1=0 v0=2"]
    with pytest.raises(ValueError):
        metadata_units({"brightness": 0}, ["brightness", "entropy"])


@pytest.mark.parametrize("label,why", [
    ({"n_sam_masks": 3}, "omniforge 0.1"),  # the old field names name the command that rewrites them
    ({"unknown_field": 3}, "4M-21's fields are"),
    ({"n_humans": None}, "not a finite number"),
    ({"objectness": float("nan")}, "not a finite number"),
    ({"n_humans": True}, "not a finite number"),
    ([1, 2], "JSON object"),
])
def test_metadata_refuses_what_ml4m_cannot_read(label, why):
    with pytest.raises(SampleError, match=why):
        metadata_units(label)


@pytest.mark.parametrize("field,value,expected", [
    ("watermark_score", 0.49, 0), ("watermark_score", 0.5, 1),
    ("aesthetic_score", 4.4, 0), ("aesthetic_score", 4.5, 1), ("aesthetic_score", 5.49, 1),
    ("aesthetic_score", 5.5, 2), ("aesthetic_score", 9.0, 2),
    ("colorfulness", 200.0, 49), ("colorfulness", 0.0, 0), ("occlusion_score", 0.125, 24),  # 0.5 * 49 = 24.5
    ("original_width", 31, 0), ("original_width", 32, 1), ("caption_n_chars", -4, 0),
])
def test_metadata_rule_kinds(field, value, expected):
    assert metadata_units({field: value}) == [f"v1={_4M_IDS[field]} v0={expected}"]


_4M_IDS = {"original_width": 0, "caption_n_chars": 2, "colorfulness": 9, "occlusion_score": 18,
           "watermark_score": 19, "aesthetic_score": 20}


def test_metadata_parse():
    text = " ".join(metadata_units({"coco_instance_diversity": 4, "brightness": 255.0, "original_height": 64}))
    assert text == "v1=1 v0=2 v1=8 v0=4 v1=10 v0=49"
    assert parse_metadata(text) == {"original_height": 2, "coco_instance_diversity": 4, "brightness": 49}
    assert parse_metadata("v1=8 v0=4 v1=10") == {"coco_instance_diversity": 4}


# ---------------------------------------------------------------------------------------------- poses


def _person(kps):
    return {"bbox": [0.1, 0.2, 0.5, 1.0], "score": 0.9, "keypoints": kps}


def test_pose_exact_string():
    kps = [[0.0, 0.0, 0.0] for _ in range(17)]
    kps[0] = [0.25, 0.5, 0.9]  # nose: 249.75 -> 250, 499.5 -> 500
    kps[16] = [1.0, 0.0, 0.3]  # right ankle
    kps[1] = [0.3, 0.3, 0.0]  # left eye, score 0: not visible
    label = {"keypoint_names": list(COCO_KEYPOINTS), "instances": [_person(kps)]}
    expected = "human v0=100 v1=200 v2=500 v3=999 v0=250 v1=500" + " v2=0 v3=0" * 15 + " v0=999 v1=0"
    assert keypoint_units(label) == [expected]
    assert len(expected.split()) == 39
    # keypoint_names say where each keypoint is: a reversed layout gives the same string
    rev = {"keypoint_names": list(reversed(COCO_KEYPOINTS)), "instances": [_person(list(reversed(kps)))]}
    assert keypoint_units(rev) == [expected]
    assert keypoint_units({"keypoint_names": list(COCO_KEYPOINTS), "instances": []}) == ["none"]


def test_pose_round_trip():
    rng = np.random.default_rng(0)
    people = []
    for _ in range(3):
        kps = np.c_[rng.random((17, 2)), (rng.random(17) > 0.3) * rng.random(17)].tolist()
        people.append({"bbox": sorted(rng.random(2).tolist()) * 2, "score": 1.0, "keypoints": kps})
    units = keypoint_units({"keypoint_names": list(COCO_KEYPOINTS), "instances": people})
    parsed = parse_keypoints(" ".join(units))
    assert len(parsed) == 3
    for p, src in zip(parsed, people):
        assert np.allclose(p["bbox"], src["bbox"], atol=0.5 / 999 + 1e-9)
        for (x, y, vis), (sx, sy, ss) in zip(p["keypoints"], src["keypoints"]):
            assert vis == (1 if ss > 0 else 0)
            if vis:
                assert abs(x - sx) <= 0.5 / 999 + 1e-9 and abs(y - sy) <= 0.5 / 999 + 1e-9
    assert parse_keypoints("none") == []


# ------------------------------------------------------------------------------------ smpl (human_poses)

# A person, and its 4M-21 text worked out by hand (ml-4m's HumanPoseTransform rules): box round(c * 999); pose
# tokens t < 512 -> v0=t, else v1=t-512; global round(499.5 g + 499.5): 1 -> 999, 0 -> 499.5 -> 500 (half to even),
# -1 -> 0; camera clipped to [-1, 19], round(49.95 c + 49.95): 1 -> 99.9 -> 100, -0.5 -> 24.975 -> 25, 25 -> 19 ->
# 999; shape round(166.5 b + 499.5): 0 -> 500, 1 -> 666, 3.5 (clipped to 3) -> 999.
SMPL_PERSON = {"box": [0.1, 0.2, 0.5, 1.0], "pose_tokens": [0, 511, 512, 1023, 5, 600, 700, 100],
               "global_orient": [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]],
               "betas": [0.0] * 8 + [1.0, 3.5], "pred_cam": [1.0, -0.5, 25.0]}
SMPL_GROUPS_S = {"pose": "pose v0=0 v0=511 v1=0 v1=511 v0=5 v1=88 v1=188 v0=100",
                 "global": "global v0=999 v0=500 v0=500 v0=500 v0=500 v0=0 v0=500 v0=999 v0=500",
                 "camera": "camera v0=100 v0=25 v0=999",
                 "shape": "shape" + " v0=500" * 8 + " v0=666 v0=999"}


def test_smpl_exact_string_in_any_group_order():
    head = "human v0=100 v1=200 v2=500 v3=999"
    assert smpl_units([SMPL_PERSON]) == [" ".join([head, *SMPL_GROUPS_S.values()])]  # pose, global, camera, shape
    (unit,) = smpl_units([SMPL_PERSON], [[3, 1, 0, 2]])  # ml-4m's order indices into (pose, global, camera, shape)
    assert unit == " ".join([head, SMPL_GROUPS_S["shape"], SMPL_GROUPS_S["global"], SMPL_GROUPS_S["pose"],
                             SMPL_GROUPS_S["camera"]])
    assert len(unit.split()) == SMPL_TOKENS_PER_PERSON == 39
    assert smpl_units([]) == ["none"]


def test_smpl_round_trip_and_what_the_parser_skips():
    rng = np.random.default_rng(2)
    people = [{"box": sorted(rng.random(2).tolist()) * 2, "pose_tokens": rng.integers(0, 1024, 8).tolist(),
               "global_orient": rng.uniform(-1, 1, (3, 3)), "betas": rng.uniform(-3, 3, 10),
               "pred_cam": [rng.uniform(-1, 19), rng.uniform(-1, 1), rng.uniform(-1, 1)]} for _ in range(3)]
    orders = [rng.permutation(4).tolist() for _ in people]
    units = smpl_units(people, orders)
    parsed = parse_smpl_poses(" ".join(units))
    assert len(parsed) == 3
    for p, src, order in zip(parsed, people, orders):
        assert p["order"] == order and p["pose_tokens"] == src["pose_tokens"]
        np.testing.assert_allclose(p["bbox"], src["box"], atol=0.5 / 999 + 1e-9)
        np.testing.assert_allclose(p["global_orient"], src["global_orient"], atol=0.5 / 499.5 + 1e-9)
        np.testing.assert_allclose(p["betas"], src["betas"], atol=0.5 / 166.5 + 1e-9)
        np.testing.assert_allclose(p["pred_cam"], src["pred_cam"], atol=0.5 / 49.95 + 1e-9)
    text = " ".join(units)
    assert parse_smpl_poses("none") == [] and len(parse_smpl_poses(text.rsplit(" ", 3)[0])) == 2  # cut short
    first = units[0].split()
    broken = [" ".join(w for w in first if w != "camera"),  # a group word missing
              units[0].replace("pose", "global", 1),  # a group twice
              " ".join(first[:-1])]  # its last group one value short
    assert len(parse_smpl_poses(units[0])) == 1 and all(parse_smpl_poses(b) == [] for b in broken)
    assert parse_smpl_poses(text.upper().lower()) == parsed  # the tokenizer's decoded, lower-cased text


def test_smpl_bad_people_are_sample_errors():
    for bad, why in [({**SMPL_PERSON, "pose_tokens": [1024] * 8}, "pose tokens"),
                     ({**SMPL_PERSON, "pose_tokens": [0] * 7}, "pose tokens"),
                     ({**SMPL_PERSON, "betas": [float("nan")] * 10}, "betas"),
                     ({**SMPL_PERSON, "pred_cam": [1.0, 2.0]}, "camera"),
                     ({k: v for k, v in SMPL_PERSON.items() if k != "betas"}, "needs box")]:
        with pytest.raises(SampleError, match=why) as err:
            smpl_units([bad])
        assert err.value.error_type == "bad_label"
    with pytest.raises(ValueError, match="permutation"):
        smpl_units([SMPL_PERSON], [[0, 1, 2, 2]])


# ---------------------------------------------------------------------------------------------- sam


def _mask(y0, y1, x0, x1):
    m = np.zeros((224, 224), bool)
    m[y0:y1, x0:x1] = True
    return m


def _polygon(y0, y1, x0, x1):
    return sam_contours(_mask(y0, y1, x0, x1))[0]


def test_sam_exact_string():
    a = (_polygon(0, 50, 0, 50), [1, 511, 512, 1023] + [7] * 12)
    b = (_polygon(10, 130, 5, 120), [600] * 16)
    c = (_polygon(0, 10, 150, 224), [3] * 16)  # a thin strip at the top right
    points = [(10, 20), (100, 100), (10, 20), (5, 200), (200, 5), (49, 49)]
    units = sam_units(points, [b, a, c])
    poly_a = "polygon v0=0 v1=0 v2=49 v3=49 v0=1 v0=511 v1=0 v1=511" + " v0=7" * 12  # the box is inclusive
    poly_b = "polygon v0=5 v1=10 v2=119 v3=129" + " v1=88" * 16  # 600 - 512
    poly_c = "polygon v0=150 v1=0 v2=223 v3=9" + " v0=3" * 16
    assert units == [
        "point v0=20 v1=10 " + poly_b + " " + poly_a,  # 4M writes y first; instances in the order given
        "point v0=100 v1=100 " + poly_b,
        "point v0=200 v1=5 none",  # the repeated (10, 20) is written once
        "point v0=5 v1=200 " + poly_c,  # (x=200, y=5) is in the strip; (x=5, y=200) is not
        "point v0=49 v1=49 " + poly_b + " " + poly_a,  # a point on a polygon's border is in it
    ]
    assert len(units[1].split()) == 3 + 21
    reordered = sam_units(points, [b, a, c], orders=[[1, 0], [0], [], [0], [0, 1]])
    assert reordered[0] == "point v0=20 v1=10 " + poly_a + " " + poly_b and reordered[1:4] == units[1:4]
    with pytest.raises(ValueError):
        sam_units(points, [b, a, c], orders=[[0, 0], [0], [], [0], [0, 1]])


def test_sam_draws_are_ml4ms_kind_of_draw():
    inst = [(_polygon(0, 224, 0, 112), [1] * 16), (_polygon(0, 224, 56, 224), [2] * 16)]
    seen_orders, seen_points = set(), set()
    for seed in range(40):
        units = sam_draw_units(inst, np.random.default_rng(seed))
        assert 1 <= len(units) <= 7
        parsed = parse_sam(" ".join(units))
        seen_points.add(tuple(p["point"] for p in parsed))
        for p in parsed:
            x = p["point"][0]
            expected = ({1} if x <= 111 else set()) | ({2} if x >= 56 else set())
            assert {i["tokens"][0] for i in p["instances"]} == expected
            if len(p["instances"]) == 2:
                seen_orders.add(tuple(i["tokens"][0] for i in p["instances"]))
    assert seen_orders == {(1, 2), (2, 1)} and len(seen_points) == 40  # both orders, new points every draw


def test_sam_round_trip_and_query_points():
    rng = np.random.default_rng(3)
    points = sam_query_points(rng)
    ref = np.random.default_rng(3)
    ys, xs = ref.integers(0, 224, 7), ref.integers(0, 224, 7)  # 4M draws y then x, returns (x, y)
    assert points == list(zip(xs.tolist(), ys.tolist()))
    assert all(0 <= x < 224 and 0 <= y < 224 for x, y in points)

    inst = (_polygon(10, 130, 5, 120), list(range(500, 516)))
    parsed = parse_sam(" ".join(sam_units([(10, 20), (200, 200)], [inst])))
    assert parsed == [
        {"point": (10, 20), "instances": [{"bbox": (5, 10, 119, 129), "tokens": list(range(500, 516))}]},
        {"point": (200, 200), "instances": []},
    ]
    with pytest.raises(SampleError):
        sam_units([(0, 0)], [(_polygon(0, 1, 0, 1), [1024] * 16)])


# ---------------------------------------------------------------------------------------------- tokenizer

_WORDS = ["a", "red", "dog", "runs", "on", "the", "grass", "two", "cats", "sleep", "near", "window", "big",
          "blue", "car", "parked", "by", "street", "at", "night"]


@pytest.fixture(scope="module")
def tok():
    captions = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(3 + i % 5)).capitalize() + "."
                for i in range(50)]
    captions.append("A red dog runs on the grass.")
    return train_wordpiece(captions)


def test_special_tokens_and_vocabulary(tok):
    assert [tok.token_to_id(t) for t in (PAD, UNK, SOS, EOS)] == [0, 1, 2, 3]
    assert (tok.pad_id, tok.unk_id, tok.sos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(tok.sentinel_ids) == NUM_SENTINELS == 200
    assert tok.sentinel_ids == [tok.token_to_id(f"[S_{i}]") for i in range(200)]
    value_ids = {tok.token_to_id(f"v{k}={v}") for k in range(4) for v in range(1000)}
    assert None not in value_ids and len(value_ids) == 4000
    for name in COCO_DETECTION_CLASSES:
        assert tok.encode(name) == [tok.token_to_id(name)], name
        assert tok.encode(name.upper()) == [tok.token_to_id(name)]  # class names are normalized (lower-cased)
    for word in ("human", "point", "polygon", "none", "pose", "global", "camera", "shape"):
        assert len(tok.encode(word)) == 1, word
    assert NUM_SPECIAL_TOKENS < tok.vocab_size <= 30_000


def test_det_string_encodes_one_id_per_value_token(tok):
    text = DOG_S + " " + LIGHT_S
    ids = tok.encode(text)
    assert len(ids) == 10
    assert ids[:4] == [tok.token_to_id(w) for w in ["v0=100", "v1=200", "v2=500", "v3=999"]]
    assert ids[4] == tok.token_to_id("dog") and ids[9] == tok.token_to_id("traffic light")
    assert tok.decode(ids) == text


def test_encode_units_packs_whole_units(tok):
    boxes = [{"boxes": [i / 10, 0.1, i / 10 + 0.05, 0.2], "class_name": "dog", "score": 1.0} for i in range(6)]
    units = det_units(boxes)
    out = tok.encode_units(units, 23)  # budget 22: four 5-token boxes fit, the fifth does not
    assert out.dtype == np.int16 and out.shape == (23,)
    assert out[:20].tolist() == tok.encode(" ".join(units[:4]))
    assert out[20] == tok.eos_id and (out[21:] == 0).all()
    # packing stops at the first unit that does not fit, even when a later, shorter one would
    short, long_ = "v0=1 v1=2", " ".join(["v0=3"] * 12)  # budget 13: 2 + 12 > 13
    out = tok.encode_units([short, long_, short], 14)
    assert out.tolist() == tok.encode(short) + [tok.eos_id] + [0] * 11
    assert tok.encode_units([], 5).tolist() == [tok.eos_id, 0, 0, 0, 0]
    for n in (1, 2, 7, 40):
        out = tok.encode_units(units, n)
        assert len(out) == n and tok.eos_id in out.tolist()


def test_encode_units_cuts_a_long_caption(tok):
    caption = " ".join(_WORDS * 20)  # 400 words
    ids = tok.encode(caption)
    assert len(ids) > 256
    out = tok.encode_units([caption], get_modality("caption").num_tokens)
    assert out.tolist() == ids[:255] + [tok.eos_id]


def test_decode_round_trip(tok):
    caption = "A Red Dog runs on the Grass."
    out = tok.encode_units([caption], 32)
    assert tok.decode(out) == caption.lower()
    ids = tok.encode("two cats") + [tok.eos_id] + tok.encode("red")
    assert tok.decode(ids) == "two cats"
    assert tok.decode([tok.sos_id] + tok.encode("[S_5] red")) == "[S_5] red"
    units = keypoint_units({"instances": []}) + sam_units([(1, 2)], [])
    assert tok.decode(tok.encode_units(units, 10)) == "none point v0=2 v1=1 none"


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = TextTokenizer.from_file(str(path))
    assert loaded.vocab_size == tok.vocab_size
    text = "A red dog " + DOG_S + " [S_3]"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.sentinel_ids == tok.sentinel_ids


def test_load_errors(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    for path in (garbage, tmp_path / "missing.json"):
        with pytest.raises(WeightsError) as e:
            TextTokenizer.from_file(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    other = tmp_path / "other.json"
    Tokenizer(WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(other))
    with pytest.raises(WeightsError, match=r"\[PAD\]"):
        TextTokenizer.from_file(str(other))


def test_train_vocab_size_bounds():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_wordpiece(["a dog"], vocab_size=100)
    bound = NUM_SPECIAL_TOKENS + 120
    small = train_wordpiece([" ".join(_WORDS)] * 5, vocab_size=bound)
    assert small.vocab_size <= bound
    assert all(len(small.encode(w)) == 1 for w in ("human", "point", "polygon", "none", "pose", "global", "camera",
                                                   "shape"))


def test_sequence_budgets_are_4m21s():
    budgets = {m.name: m.num_tokens for m in all_modalities() if m.crop == "sequence"}
    assert budgets == {"caption": 256, "det": 256, "human_poses": 275, "human_keypoints": 275, "sam_instance": 290,
                       "color_palette": 23, "metadata": 40}

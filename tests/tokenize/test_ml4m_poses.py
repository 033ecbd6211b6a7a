"""human_poses: omniforge's 4M-21 serialization of SMPL people equals ml-4m's own, and ml-4m reads what omniforge
exports.

The fixtures (tests/fixtures/ml4m_poses, made by its make_fixtures.py) hold labels in the HMR2.0 teacher's format,
their crops, each label as omniforge's export writes it (with "pose_tokenized" from the stand-in of Apple's pose
tokenizer), and what ml-4m's HumanPoseTransform made of those files: its strings and token ids for every crop and
seed, the group order its torch.randperm drew for every person, its `only_pose` tensors, and the pose tokens its
own VQVAE gives every person. Expected values come only from those files.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from omniforge import codecs
from omniforge.tokenize import text
from omniforge.tokenize.crops import crop_smpl
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.store import TokenizerStore
from omniforge.tokenize.text import Crop, TextTokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures"
LABELS = json.loads((FIXTURES / "ml4m_poses" / "labels.json").read_text())
EXPECTED = json.loads((FIXTURES / "ml4m_poses" / "expected.json").read_text())
SNAPSHOT = FIXTURES / "ml4m_tokenizers" / "snapshots" / "4M_tokenizers_human-poses_1k_8"
NEAR_TIE = 1e-5
WIDE = "wide"  # the sample whose betas and camera lie outside ml-4m's ranges
CASES = [(key, c, d) for key in sorted(EXPECTED) for c, row in enumerate(EXPECTED[key]["crops"])
         for d in range(len(row["draws"]))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ml4m_vocab(tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("vocab") / "tokenizer.json"
    path.write_bytes(gzip.decompress((FIXTURES / "ml4m" / "text_tokenizer_4m_wordpiece_30k.json.gz").read_bytes()))
    return TextTokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def store(tmp_path_factory, ml4m_vocab) -> TokenizerStore:
    """A --tokenizers folder holding the stand-in of Apple's pose tokenizer and ml-4m's vocabulary."""
    out = tmp_path_factory.mktemp("tokenizers")
    shutil.copytree(SNAPSHOT, out / "human_poses")
    (out / "text").mkdir()
    ml4m_vocab.save(str(out / "text" / "tokenizer.json"))
    return TokenizerStore(str(out))


def _export(key: str) -> dict:
    return json.loads(LABELS[key]["export_json"])


def _crop(key: str, c: int) -> tuple[np.ndarray, int, int]:
    h, w = LABELS[key]["size"]
    return np.asarray(EXPECTED[key]["crops"][c]["crop"], np.int32), h, w


def _people(key: str, c: int) -> list[dict]:
    """omniforge's people of one crop, with the pose tokens the exported file holds (by the person's index)."""
    row, h, w = _crop(key, c)
    tokens = _export(key).get("pose_tokenized", [])
    return [{"box": p.box, "pose_tokens": tokens[p.index], "global_orient": p.global_orient, "betas": p.betas,
             "pred_cam": p.cam} for p in crop_smpl(LABELS[key]["label"], row, h, w)]


def _flipped(key: str, c: int) -> bool:
    return bool(EXPECTED[key]["crops"][c]["crop"][4])


def _ml4m_string(units: list[str]) -> str:
    """ml-4m's string of these units: each person followed by a space (its transform appends one), or "none"."""
    return "none" if units == ["none"] else "".join(u + " " for u in units)


def test_fixtures_exercise_what_they_should():
    texts = [d["text"] for e in EXPECTED.values() for row in e["crops"] for d in row["draws"]]
    assert "none" in texts and sum(t != "none" for t in texts) >= 20
    flips = [row["crop"][4] for e in EXPECTED.values() for row in e["crops"]]
    assert 0 < sum(flips) < len(flips)
    words = " ".join(texts).split()
    assert any(w.startswith("v1=") for w in words[words.index("pose"):])  # pose tokens >= 512
    boxes = [t.split()[i + 1:i + 5] for t in texts for i, w in enumerate(t.split()) if w == "human"]
    assert any(b[0][3:] == b[2][3:] for b in boxes)  # a box only touching the crop: no area, kept (as ml-4m)
    crowd = EXPECTED["crowd"]["crops"]
    people = [row["draws"][0]["text"].split().count("human") for row in crowd]
    assert min(people) < len(LABELS["crowd"]["label"]["bbox_xyxy"])  # some crop drops someone wholly outside it
    assert any(len(d["orders"]) > 1 and len({tuple(o) for o in d["orders"]}) > 1
               for e in EXPECTED.values() for row in e["crops"] for d in row["draws"])  # an order per person
    # written by omniforge's HMR2.0 teacher itself: its keys, box_center and box_size beside ml-4m's
    assert set(LABELS["teacher"]["label"]) == {"bbox_xyxy", "pred_smpl_params", "pred_cam", "box_center", "box_size",
                                               "score"}
    assert LABELS["nobody"]["label"] == {}


@pytest.mark.parametrize("key, c, d", [case for case in CASES if case[0] != WIDE and not _flipped(*case[:2])])
def test_the_serialization_is_ml4ms_string_and_ids(key, c, d, ml4m_vocab):
    """The people of an unflipped crop (ml-4m's box crop, in omniforge's code) with the exported pose tokens,
    serialized in the group orders ml-4m drew: ml-4m's string, and ml-4m's token ids through its vocabulary.
    (Flipped crops: test_a_flipped_crop_mirrors_the_people.)"""
    draw = EXPECTED[key]["crops"][c]["draws"][d]
    units = text.smpl_units(_people(key, c), draw["orders"])
    assert _ml4m_string(units) == draw["text"]
    assert ml4m_vocab.encode(" ".join(units)) == draw["ids"]
    assert len(draw["ids"]) == (1 if units == ["none"] else text.SMPL_TOKENS_PER_PERSON * len(units))


def test_values_outside_ml4ms_ranges_are_clipped_to_value_tokens(ml4m_vocab):
    """ml-4m clips only the camera: betas beyond +-3 become "v0=1221", "v0=-637", which its vocabulary splits into
    several tokens. omniforge clips them to the ends of the value tokens; every other word is ml-4m's."""
    for c, row in enumerate(EXPECTED[WIDE]["crops"]):
        if row["crop"][4]:
            continue
        for draw in row["draws"]:
            ours = " ".join(text.smpl_units(_people(WIDE, c), draw["orders"])).split()
            theirs = draw["text"].split()
            assert len(ours) == len(theirs) == text.SMPL_TOKENS_PER_PERSON
            outside = 0
            for a, b in zip(ours, theirs):
                if a == b:
                    continue
                value = int(b.split("=")[1])
                assert not 0 <= value <= 999 and a == f"v0={min(max(value, 0), 999)}"
                outside += 1
            assert outside >= 2 and len(draw["ids"]) > text.SMPL_TOKENS_PER_PERSON  # ml-4m's string is longer
            assert len(ml4m_vocab.encode(" ".join(ours))) == text.SMPL_TOKENS_PER_PERSON


def test_the_kind_tokenizes_with_ml4ms_pose_tokenizer_and_serializes_as_ml4m(store):
    """End to end through the kind: ml-4m's pose tokenizer (the snapshot in --tokenizers) gives ml-4m's own pose
    tokens, and the kind's people of every unflipped crop, in ml-4m's group orders, give ml-4m's strings."""
    kind = kind_for("human_poses")
    for key, entry in EXPECTED.items():
        if "pose_ids" not in entry or key == "ids":  # "ids" holds drawn tokens, not the tokenizer's
            continue
        ours = store.encode(kind, kind.crop_inputs(LABELS[key]["label"], None, 224))
        margin = np.asarray(entry["pose_margins"])
        assert ((ours == np.asarray(entry["pose_ids"])) | (margin < NEAR_TIE)).all()
        if key == WIDE:
            continue
        h, w = LABELS[key]["size"]
        for c, row in enumerate(entry["crops"]):
            if row["crop"][4]:
                continue
            crop = Crop(row=np.asarray(row["crop"], np.int32), height=h, width=w, key=key, index=c)
            for draw in row["draws"]:
                units = text.smpl_units(kind.crop_people(LABELS[key]["label"], crop, store), draw["orders"])
                assert _ml4m_string(units) == draw["text"]


def test_ml4m_read_the_json_omniforge_exports(store):
    """The files ml-4m's transform read are what `SmplPoseKind.ml4m_form` writes today (value for value, through the
    shard codec), the teacher's label plus pose_tokenized; nobody stays {} (ml-4m's "none")."""
    kind = kind_for("human_poses")
    for key, lab in LABELS.items():
        if key == "ids":
            continue
        exported = kind.ml4m_form(lab["label"], np.asarray(lab["crops"], np.int32), store)
        assert codecs.decode("json", codecs.encode("json", exported)) == json.loads(lab["export_json"])
        if lab["label"]:
            assert set(exported) == set(lab["label"]) | {"pose_tokenized"}
            assert np.asarray(exported["pose_tokenized"]).shape == (len(lab["label"]["bbox_xyxy"]), 8)
        else:
            assert exported == {} and all(d["text"] == "none" for r in EXPECTED[key]["crops"] for d in r["draws"])


def test_only_pose_is_what_the_pose_tokenizer_is_fed():
    """ml-4m's tokenizer-training input (only_pose: person 0's body pose, flattened, float32) is the first of the
    inputs omniforge trains its pose tokenizer on (it trains on every person). For an image of nobody ml-4m feeds
    207 zeros, which are no pose; omniforge feeds nothing."""
    kind = kind_for("human_poses")
    for key, entry in EXPECTED.items():
        inputs = kind.crop_inputs(LABELS[key]["label"], None, 224)
        want = np.asarray(entry["only_pose"], np.float32)
        if not LABELS[key]["label"]:
            assert inputs == [] and want.shape == (207,) and not want.any()
            continue
        assert len(inputs) == len(LABELS[key]["label"]["bbox_xyxy"])
        assert inputs[0].dtype == np.float32 and np.array_equal(inputs[0], want)


# The SMPL body joints (SMPL's joints 1..23) and their mirror twins, written out here from SMPL's joint list.
_JOINTS = ["left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle", "right_ankle",
           "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head", "left_shoulder",
           "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand"]


def test_a_flipped_crop_mirrors_the_people():
    """ml-4m gives a flipped crop the people of the unflipped one (its image_augment ignores the flip: the image is
    mirrored, the poses not). omniforge mirrors the box, exchanges left and right joints, reflects every rotation
    (R -> M R M, M = diag(-1, 1, 1)) and negates the camera's tx; betas stay."""
    m = np.diag([-1.0, 1.0, 1.0])
    twin = [_JOINTS.index(n.replace("left_", "@").replace("right_", "left_").replace("@", "right_")) for n in _JOINTS]
    checked = pairs = 0
    for key in ("crowd", "teacher"):
        h, w = LABELS[key]["size"]
        rows = EXPECTED[key]["crops"]
        for f in (r for r in rows if r["crop"][4]):
            for u in (r for r in rows if r["crop"][:4] == f["crop"][:4] and not r["crop"][4]):
                assert [d["text"] for d in f["draws"]] == [d["text"] for d in u["draws"]]  # ml-4m: unmirrored
                pairs += 1
        for row in (np.asarray(r["crop"], np.int32) for r in rows if r["crop"][4]):
            plain = crop_smpl(LABELS[key]["label"], np.array([*row[:4], 0], np.int32), h, w)
            flipped = crop_smpl(LABELS[key]["label"], row, h, w)
            assert [p.index for p in plain] == [p.index for p in flipped] and plain
            for a, b in zip(plain, flipped):
                np.testing.assert_allclose(b.box, (1 - a.box[2], a.box[1], 1 - a.box[0], a.box[3]), atol=1e-12)
                np.testing.assert_allclose(b.global_orient, m @ a.global_orient @ m, atol=1e-12)
                np.testing.assert_allclose(b.body_pose, (m @ a.body_pose @ m)[twin], atol=1e-12)
                np.testing.assert_allclose(b.betas, a.betas)
                np.testing.assert_allclose(b.cam, a.cam * [1, -1, 1])
                checked += 1
    assert checked >= 4 and pairs == 2

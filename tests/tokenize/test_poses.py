"""human_poses' tokens: the SMPL pose tokenizer learns (`omniforge tokenizer train --modality human_poses`), people
go to text and tokens and come back as a human_poses label, draws are per sample, and bad labels are errors with
a reason. (ml-4m equivalence: test_ml4m_poses.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smpl_labels import prototypes, random_boxes, smpl_label, write_label_shard

from omniforge import codecs
from omniforge.errors import CorpusError, SampleError, WeightsError
from omniforge.jobs.cli import main as cli_main
from omniforge.schemas import check_human_poses
from omniforge._smpl import nearest_rotation, rotation_angle_deg
from omniforge.tokenize import text
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.store import TokenizerStore
from omniforge.tokenize.text import Crop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, W = 240, 320


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenizerStore:
    """A tiny WordPiece vocabulary and a tiny, untrained pose tokenizer."""
    out = tmp_path_factory.mktemp("tokenizers")
    (out / "text").mkdir()
    text.train_wordpiece(["a person on a bike", "two people"] * 4, vocab_size=5000).save(
        str(out / "text" / "tokenizer.json"))
    kind = kind_for("human_poses")
    torch.manual_seed(0)
    kind.save(kind.build(kind.config("tiny")), str(out / kind.artifact.folder))
    return TokenizerStore(str(out))


def _crop(row=(0, 40, 240, 240, 0), **kw) -> Crop:
    return Crop(row=np.asarray(row, np.int32), height=H, width=W, **kw)


def test_the_pose_tokenizer_learns_through_the_cli(tmp_path, capsys):
    """`omniforge tokenizer train --modality human_poses` on every person of synthetic labels (0 to 3 people each,
    some images of nobody): the held-out mean joint rotation error falls well below the untrained one."""
    rng = np.random.default_rng(0)
    protos = prototypes(rng)
    root = str(tmp_path / "labels")
    labels = {f"img{i:03d}": smpl_label(rng, random_boxes(rng, i % 4, H, W), protos) for i in range(24)}
    keys = sorted(labels)
    for shard in range(2):
        write_label_shard(root, shard, {k: labels[k] for k in keys[shard * 12:(shard + 1) * 12]})
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "train", "--data", root, "--modality", "human_poses", "--out", str(out),
                     "--epochs", "8", "--batch-size", "8", "--lr", "3e-3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    history = [json.loads(line) for line in (out / "human_poses" / "history.jsonl").read_text().splitlines()]
    start, end = history[0]["rotation_error_deg"], history[-1]["rotation_error_deg"]
    assert end < 0.5 * start, (start, end)
    assert "rotation_error_deg" in printed.splitlines()[-1] and f"{end:.4g}" in printed.splitlines()[-1]
    # an epoch is one pass over every person of the training labels (the last quarter of the keys is held out)
    people = sum(len(labels[k].get("bbox_xyxy", [])) for k in keys[:18])
    assert history[-1]["step"] == 8 * -(-people // 8) and people > 18
    # the folder is human_poses/ and the kind loads it; a memcodes modality refuses it
    kind = kind_for("human_poses")
    model = TokenizerStore(str(out)).model(kind)
    assert model.config.in_channels == 207 and model.config.num_tokens == 8
    with pytest.raises(WeightsError, match="does not fit modality 'dinov2_global'"):
        kind_for("dinov2_global").load(str(out / "human_poses"))
    nobody = str(tmp_path / "nobody")
    write_label_shard(nobody, 0, {k: {} for k in keys})
    assert cli_main(["tokenizer", "train", "--data", nobody, "--modality", "human_poses", "--out", str(out),
                     "--no-progress", "--restart"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to train" in err[0] and "every label is empty" in err[0]


def test_tokens_decode_back_to_a_human_poses_label(store):
    """serialize -> WordPiece ids -> decode -> parse -> pose tokenizer decode -> a label in human_poses' form: the
    crop's people, boxes in pixels of the 224 crop, rotations, betas and camera as serialized."""
    rng = np.random.default_rng(1)
    label = smpl_label(rng, [[60.0, 20.0, 200.0, 230.0], [150.5, 0.0, 270.0, 120.0], [0.0, 0.0, 30.0, 50.0]])
    kind, tok = kind_for("human_poses"), store.text()
    crop = _crop()
    people = kind.crop_people(label, crop, store)
    assert len(people) == 2  # the third box lies left of the crop
    ids = tok.encode_units(kind.units(label, crop, store), 275)
    decoded = kind.decode(ids, store)
    check_human_poses(decoded)
    assert len(decoded["bbox_xyxy"]) == 2
    for i, p in enumerate(people):
        np.testing.assert_allclose(decoded["bbox_xyxy"][i], np.asarray(p["box"]) * 224, atol=224 * 0.5 / 999)
        np.testing.assert_allclose(decoded["pred_smpl_params"]["betas"][i], p["betas"], atol=0.5 / 166.5 + 1e-6)
        np.testing.assert_allclose(decoded["pred_cam"][i], p["pred_cam"], atol=0.5 / 49.95 + 1e-6)
        orient = np.asarray(decoded["pred_smpl_params"]["global_orient"][i][0])
        assert rotation_angle_deg(orient, p["global_orient"]) < 0.5
        pose = np.asarray(decoded["pred_smpl_params"]["body_pose"][i])
        np.testing.assert_allclose(pose @ np.swapaxes(pose, -1, -2), np.broadcast_to(np.eye(3), pose.shape),
                                   atol=1e-6)  # rotations
        with torch.no_grad():  # the pose tokenizer's reconstruction of the person's tokens, as rotations
            flat = store.model(kind).decode(torch.tensor([p["pose_tokens"]])).numpy().reshape(23, 3, 3)
        np.testing.assert_allclose(pose, nearest_rotation(flat), atol=1e-5)
    assert kind.decode(tok.encode_units(["none"], 275), store) == {}


def test_group_orders_are_frozen_per_crop_and_drawn_again_per_training_sample(store):
    rng = np.random.default_rng(2)
    label = smpl_label(rng, random_boxes(rng, 3, H, W))
    kind = kind_for("human_poses")

    def orders(crop):
        return [p["order"] for p in text.parse_smpl_poses(" ".join(kind.units(label, crop, store)))]

    frozen = orders(_crop(key="k", index=1, seed=3))
    assert len(frozen) >= 1 and frozen == orders(_crop(key="k", index=1, seed=3))  # the tokenize job's draw
    assert len({str(orders(_crop(key="k", index=i, seed=3))) for i in range(8)}) > 1  # another crop, another draw
    gen = np.random.default_rng(0)
    drawn = {str(orders(_crop(key="k", index=1, rng=gen))) for _ in range(8)}  # the trainer: per sample
    assert len(drawn) > 1


def test_a_flipped_crop_serializes_mirrored_people(store):
    rng = np.random.default_rng(3)
    label = smpl_label(rng, [[100.0, 30.0, 180.0, 220.0]])
    kind = kind_for("human_poses")
    plain, flipped = (text.parse_smpl_poses(" ".join(kind.units(label, _crop((0, 40, 240, 240, f)), store)))[0]
                      for f in (0, 1))
    assert plain["bbox"][0] == pytest.approx(1 - flipped["bbox"][2], abs=1 / 999)
    m = np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(flipped["global_orient"], m @ np.asarray(plain["global_orient"]) @ m, atol=2 / 499.5)
    assert flipped["pred_cam"][1] == pytest.approx(-plain["pred_cam"][1], abs=2 / 49.95)
    assert flipped["betas"] == plain["betas"]


def test_bad_labels_are_sample_errors_with_a_reason_and_edge_boxes_are_kept(store, tmp_path):
    kind = kind_for("human_poses")
    rng = np.random.default_rng(4)
    good = smpl_label(rng, [[50.0, 20.0, 150.0, 200.0]])
    nan = json.loads(json.dumps(good))
    nan["pred_smpl_params"]["betas"][0][3] = float("nan")
    for bad, why in [({"bbox_xyxy": [[0, 0, 1, 1]]}, "pred_smpl_params"), ([], "JSON object"),
                     ({**good, "pred_cam": [[1.0, 0.0]]}, "pred_cam must be"), (nan, "betas must be finite")]:
        with pytest.raises(SampleError, match=why) as err:
            kind.units(bad, _crop(), store)
        assert err.value.error_type == "bad_label"
    # a box that only touches the crop (its right edge on the crop's left edge) is kept, with no area, as ml-4m
    edge = smpl_label(rng, [[10.0, 20.0, 40.0, 200.0]])
    (unit,) = kind.units(edge, _crop(), store)
    words = unit.split()
    assert words[0] == "human" and (words[1], words[3]) == ("v0=0", "v2=0")
    # the trainer's raw folder: a bad label stops with the key and the reason, as for every raw sequence
    from omniforge.model.specs import specs_for
    from omniforge.model.data import serialize_raw

    spec = specs_for(["human_poses"], store.text().vocab_size)["human_poses"]
    jpg = codecs.encode("jpg", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(CorpusError, match="k1: human_poses: pred_cam must be"):
        serialize_raw(spec, codecs.encode("json", {**good, "pred_cam": [[1.0]]}), jpg, np.array([0, 40, 240, 240, 0]),
                      key="k1", index=0, rng=None, store=store, where="human_poses/shard-000000.tar")
    ids, cut = serialize_raw(spec, codecs.encode("json", good), jpg, np.array([0, 40, 240, 240, 0], np.int32),
                             key="k1", index=0, rng=None, store=store, where="human_poses/shard-000000.tar")
    assert cut == 0 and len(text.parse_smpl_poses(store.text().decode(ids.tolist()))) == 1


def test_seven_people_fill_the_275_token_budget_and_an_eighth_is_cut(store):
    rng = np.random.default_rng(5)
    label = smpl_label(rng, [[10.0 + 30 * i, 10.0, 40.0 + 30 * i, 200.0] for i in range(8)])
    kind, tok = kind_for("human_poses"), store.text()
    units = kind.units(label, Crop(row=np.array([0, 0, H, W, 0], np.int32), height=H, width=W), store)
    assert len(units) == 8
    ids, cut = tok.pack(units, 275)
    assert cut == 1 and int(np.count_nonzero(ids)) == 7 * 39 + 1  # 7 people and [EOS]


def test_decoded_people_go_back_into_the_image_for_show(store):
    """`in_image` undoes the crop (and a flip) of decoded people, so that `show --tokenizers` draws them where the
    teacher's are: boxes in the rgb label's pixels, the global orientation and camera as labeled (to quantization)."""
    from omniforge.pipeline.show import decode_tokens

    rng = np.random.default_rng(6)
    label = smpl_label(rng, [[100.0, 30.0, 180.0, 220.0], [200.0, 60.0, 260.0, 200.0]])
    kind, tok = kind_for("human_poses"), store.text()
    for row in ((0, 40, 240, 240, 0), (5, 50, 230, 250, 1)):  # both hold the people whole
        crop = _crop(row)
        ids = tok.encode_units(kind.units(label, crop, store), 275)
        values = {"rgb": np.zeros((H, W, 3), np.uint8), "crop_settings": np.asarray([row], np.int32),
                  "tok_human_poses": ids[None]}
        (placed,) = decode_tokens(values, store.directory).values()
        assert placed == kind.in_image(kind.decode(ids, store), crop)
        check_human_poses(placed)
        scale = max(row[2], row[3]) / 999
        np.testing.assert_allclose(placed["bbox_xyxy"], label["bbox_xyxy"], atol=scale)
        np.testing.assert_allclose(placed["pred_cam"], label["pred_cam"], atol=1 / 49.95)
        for got, want in zip(placed["pred_smpl_params"]["global_orient"], label["pred_smpl_params"]["global_orient"]):
            assert rotation_angle_deg(np.asarray(got[0]), np.asarray(want[0])) < 0.5
    assert kind.in_image({}, _crop()) == {}

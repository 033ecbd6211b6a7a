"""`omniforge show` on SMPL people (human_poses): boxes and a one-line note without the SMPL body model, 3D joints
with it (`--option human_poses.smpl_model=PATH`), one-line errors for a bad path or an option show does not take.

The corpus is written by hand (manifest, rgb and human_poses shards with their status); the body model is a small
random one in SMPL's format (tests/smpl_models.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from images import sample_photo
from PIL import Image
from smpl_models import write_smpl_model

from omniforge import codecs, shards
from omniforge.jobs.cli import main

EYE = np.eye(3).tolist()
PERSON = {"bbox_xyxy": [[60.0, 20.0, 140.0, 190.0]],
          "pred_smpl_params": {"global_orient": [[EYE]], "body_pose": [[EYE] * 23], "betas": [[0.0] * 10]},
          "pred_cam": [[0.9, 0.0, 0.05]], "score": [0.97]}
LABELS = {"astronaut": PERSON, "empty_room": {}}


def _write(root: str, folder: str, ext: str, members: dict[str, bytes]) -> None:
    keys = sorted(members)
    shards.write_tar(shards.tar_uri(root, folder, 0), [(f"{k}.{ext}", members[k]) for k in keys])
    shards.write_status(shards.status_uri(root, folder, 0), [
        {"key": k, "ok": True, "error_type": None, "error_message": None, "fingerprint": "fp", "seconds": 0.0}
        for k in keys])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("people"))
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": sorted(LABELS), "shard": [0] * len(LABELS)}))
    photo = sample_photo("astronaut", 200)
    _write(root, "rgb", "jpg", {k: codecs.encode("jpg", photo) for k in LABELS})
    _write(root, "human_poses", "json", {k: codecs.encode("json", v) for k, v in LABELS.items()})
    return root


def _show(capsys, root: str, key: str, out, *options: str) -> tuple[int, list[str], list[str]]:
    argv = ["show", root, "--key", key, "--out", str(out)]
    for option in options:
        argv += ["--option", option]
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


def test_without_the_model_show_draws_boxes_and_says_what_is_missing(corpus, tmp_path, capsys) -> None:
    rc, out, err = _show(capsys, corpus, "astronaut", tmp_path / "boxes.png")
    assert rc == 0 and not err
    missing = [line for line in out if "SMPL body model file is missing" in line]
    assert len(missing) == 1 and "--option human_poses.smpl_model=" in missing[0]
    assert out[-1] == f"wrote {tmp_path / 'boxes.png'}"
    rc, out, _ = _show(capsys, corpus, "empty_room", tmp_path / "nobody.png")
    assert rc == 0 and out == [f"wrote {tmp_path / 'nobody.png'}"]  # nobody to draw: nothing is missing


def test_with_the_model_show_draws_the_joints(corpus, tmp_path, capsys) -> None:
    model = tmp_path / "SMPL_NEUTRAL.pkl"
    write_smpl_model(model)
    rc, out, err = _show(capsys, corpus, "astronaut", tmp_path / "joints.png", f"human_poses.smpl_model={model}")
    assert rc == 0 and not err and out == [f"wrote {tmp_path / 'joints.png'}"]
    _show(capsys, corpus, "astronaut", tmp_path / "boxes.png")
    with Image.open(tmp_path / "joints.png") as a, Image.open(tmp_path / "boxes.png") as b:
        joints, boxes = np.asarray(a.convert("RGB")).astype(int), np.asarray(b.convert("RGB")).astype(int)
    assert joints.shape == boxes.shape and (np.abs(joints - boxes).max(axis=-1) > 60).sum() > 30


def test_a_bad_model_path_is_a_one_line_error_naming_the_option(corpus, tmp_path, capsys) -> None:
    rc, out, err = _show(capsys, corpus, "astronaut", tmp_path / "x.png", f"human_poses.smpl_model={tmp_path}/no.pkl")
    assert rc == 2 and not out and len(err) == 1
    # the human_poses teacher's options class checks the path (show's own check serves unregistered teachers)
    assert err[0].startswith("omniforge show: error: human_poses: option smpl_model=") and "no such file" in err[0]
    (tmp_path / "fake.pkl").write_bytes(b"\x00not a model")
    rc, _, err = _show(capsys, corpus, "astronaut", tmp_path / "x.png", f"human_poses.smpl_model={tmp_path}/fake.pkl")
    assert rc == 2 and len(err) == 1 and "not an SMPL body model" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_options_show_does_not_read_are_refused(corpus, tmp_path, capsys) -> None:
    for option in ("clip.pretrained_tag=laion2b_s34b_b88k", "human_poses.score_threshold=0.5"):
        rc, _, err = _show(capsys, corpus, "astronaut", tmp_path / "x.png", option)
        assert rc == 2 and len(err) == 1 and "show takes only --option human_poses.smpl_model=PATH" in err[0]
    rc, _, err = _show(capsys, corpus, "astronaut", tmp_path / "x.png", "human_poses.smpl_model=3")
    assert rc == 2 and len(err) == 1 and "smpl_model=3 is not valid: expected a non-empty string" in err[0]

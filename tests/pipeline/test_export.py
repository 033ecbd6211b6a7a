"""`omniforge export --dialect ml4m`: ml-4m's files, the same keys in every folder of a shard, nothing lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from sam_labels import rectangles, sam_label
from smpl_labels import random_boxes, smpl_label

from omniforge import codecs, shards, storage
from omniforge.jobs.cli import main as cli_main
from omniforge.tokenize.kinds import kind_for

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ml4m"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
EXT = {"rgb": "jpg", "crop_settings": "npy", "det": "json", "metadata": "json", "color_palette": "json",
       "caption": "txt", "sam_instance": "json", "human_keypoints": "json", "human_poses": "json"}
UNTOKENIZED = "coffee"  # labeled, but crop_settings lacks it (as when its tokenize failed)


def _write(root: str, folder: str, members: dict[str, bytes]) -> None:
    shards.write_tar(shards.tar_uri(root, folder, 0), [(f"{k}.{EXT[folder]}", members[k]) for k in sorted(members)])
    shards.write_status(shards.status_uri(root, folder, 0), [
        {"key": k, "ok": True, "error_type": None, "error_message": None, "fingerprint": "fp", "seconds": 0.0}
        for k in sorted(members)])


def _sam_label(image: np.ndarray) -> dict:
    h, w = image.shape[:2]
    return sam_label(rectangles(h, w, [(0, h // 2, 0, w // 2), (h // 4, h, w // 4, w), (0, h, 0, w)]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("corpus"))
    images = {k: np.ascontiguousarray(getattr(data, k)()) for k in LABELS}
    _write(root, "rgb", {k: codecs.encode("jpg", v) for k, v in images.items()})
    for m in ("det", "metadata", "color_palette", "caption"):
        _write(root, m, {k: codecs.encode(EXT[m], v[m]) for k, v in LABELS.items()})
    _write(root, "sam_instance", {k: codecs.encode("json", _sam_label(v)) for k, v in images.items()})
    _write(root, "human_keypoints", {k: codecs.encode("json", {"instances": []}) for k in LABELS})
    rng = np.random.default_rng(0)
    people = {k: smpl_label(rng, random_boxes(rng, i, *images[k].shape[:2])) for i, k in enumerate(sorted(LABELS))}
    _write(root, "human_poses", {k: codecs.encode("json", v) for k, v in people.items()})
    _write(root, "crop_settings", {k: codecs.encode("npy", np.asarray(v["crops"], np.int32))
                                   for k, v in LABELS.items() if k != UNTOKENIZED})
    tokenizers = str(tmp_path_factory.mktemp("tokenizers"))
    torch.manual_seed(0)
    for m in ("sam_instance", "human_poses"):
        kind = kind_for(m)
        kind.save(kind.build(kind.config("tiny")), os.path.join(tokenizers, kind.artifact.folder))
    return root, tokenizers


def _keys(uri: str) -> list[str]:
    return [shards.member_key(n) for n, _ in shards.iter_tar(uri)]


def test_export_writes_ml4ms_files_with_aligned_keys(corpus, tmp_path, capsys):
    root, tokenizers = corpus
    out = str(tmp_path / "ml4m")
    assert cli_main(["export", root, out, "--dialect", "ml4m", "--tokenizers", tokenizers, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 samples in every folder, 1 left out" in printed and "missing in crop_settings" in printed
    assert "human_keypoints" in printed and "not a 4M-21 modality" in printed  # not exported, and why
    assert not os.path.exists(shards.tar_uri(out, "human_keypoints", 0))
    tokenized = sorted(k for k in LABELS if k != UNTOKENIZED)
    for folder in ("rgb", "det", "metadata", "color_palette", "caption", "crop_settings", "sam_instance",
                   "human_poses"):
        assert _keys(shards.tar_uri(out, folder, 0)) == tokenized, folder  # ml-4m needs identical keys
    assert os.path.islink(shards.tar_uri(out, "crop_settings", 0))  # already aligned: linked, not copied
    assert not os.path.islink(shards.tar_uri(out, "det", 0))  # held the untokenized key: rewritten
    record = json.loads(storage.read_bytes(storage.join(out, "export.json")))
    assert record["samples"] == 2 and record["skipped"]["human_keypoints"]

    members = dict(shards.iter_tar(shards.tar_uri(out, "sam_instance", 0)))
    import io

    for key in tokenized:
        crops = np.load(io.BytesIO(members[f"{key}.npy"]), allow_pickle=True)  # ml-4m's own loading call
        assert crops.dtype == object and len(crops) == len(LABELS[key]["crops"])
        for crop in crops:
            assert set(crop) == {"points", "token_ids", "bbox"}
            n = len(crop["points"])
            assert n >= 1 and crop["token_ids"].shape == (n, 16) and crop["bbox"].shape == (n, 4)
            tokens = crop["token_ids"]
            assert tokens.dtype == np.int32 and 0 <= tokens.min() <= tokens.max() < 1024
            for polygons, (ymin, xmin, ymax, xmax) in zip(crop["points"], crop["bbox"]):
                xy = polygons[0].reshape(-1, 2)
                assert polygons[0].shape[1:] == (1, 2) and xy.min() >= 0 and xy.max() <= 223
                assert (xmin, ymin, xmax, ymax) == (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())


def test_export_writes_human_poses_with_their_pose_tokens(corpus, tmp_path):
    """human_poses as ml-4m's HumanPoseTransform reads it: `<key>.json`, the label plus "pose_tokenized" (N x 8) from
    the pose tokenizer in --tokenizers; nobody stays {}."""
    from omniforge.tokenize.store import TokenizerStore

    root, tokenizers = corpus
    out = str(tmp_path / "ml4m")
    assert cli_main(["export", root, out, "--dialect", "ml4m", "--tokenizers", tokenizers, "--modalities",
                     "rgb,crop_settings,human_poses", "--no-progress"]) == 0
    labels = {shards.member_key(n): codecs.decode("json", d) for n, d in
              shards.iter_tar(shards.tar_uri(root, "human_poses", 0))}
    store, kind = TokenizerStore(tokenizers), kind_for("human_poses")
    people = 0
    for name, member in shards.iter_tar(shards.tar_uri(out, "human_poses", 0)):
        key = shards.member_key(name)
        assert name == f"{key}.json"
        exported, label = codecs.decode("json", member), labels[key]
        if not label:
            assert exported == {}
            continue
        assert {k: v for k, v in exported.items() if k != "pose_tokenized"} == label
        poses = np.asarray(label["pred_smpl_params"]["body_pose"], np.float32).reshape(-1, 207)
        np.testing.assert_array_equal(exported["pose_tokenized"], store.encode(kind, list(poses)))
        people += len(poses)
    assert people >= 1


def test_export_refuses_what_it_cannot_do_in_one_line(corpus, tmp_path, capsys):
    root, _ = corpus
    assert cli_main(["export", root, str(tmp_path / "a"), "--dialect", "ml4m", "--no-progress"]) == 2
    assert "--tokenizers" in capsys.readouterr().err
    assert cli_main(["export", root, root, "--dialect", "ml4m", "--no-progress"]) == 2
    assert "other than ROOT" in capsys.readouterr().err
    assert cli_main(["export", root, str(tmp_path / "b"), "--dialect", "ml4m", "--modalities", "depth",
                     "--no-progress"]) == 2
    assert "no committed shards" in capsys.readouterr().err
    # without sam_instance no tokenizer is needed, and nothing is left out
    assert cli_main(["export", root, str(tmp_path / "c"), "--dialect", "ml4m", "--modalities", "rgb,det,caption",
                     "--no-progress"]) == 0
    assert "3 samples in every folder, 0 left out" in capsys.readouterr().out
    assert os.path.islink(shards.tar_uri(str(tmp_path / "c"), "det", 0))

"""Label schemas (omniforge.schemas) and the refusal of labels in an older raw format (pipeline.formats)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data

from omniforge import shards, storage
from omniforge.errors import SampleError
from omniforge.labelers import Sample, create_labeler
from omniforge.modalities import get_modality
from omniforge.pipeline import formats
from omniforge.schemas import check_label


def _photo() -> Sample:
    return Sample(key="chelsea", image=np.ascontiguousarray(data.chelsea()), caption="A cat.")


@pytest.mark.parametrize("teacher", ["color_palette", "metadata", "canny_edge", "rgb", "caption"])
def test_what_the_labelers_write_matches_its_schema(teacher):
    out = create_labeler(teacher).label([_photo()])[0]
    for m, label in out.items():
        check_label(get_modality(m), label)


def _person(**smpl) -> dict:
    """One HMR2.0 person in ml-4m's form: identity rotations, mean shape."""
    eye = np.eye(3).tolist()
    params = {"global_orient": [[eye]], "body_pose": [[eye] * 23], "betas": [[0.0] * 10], **smpl}
    return {"bbox_xyxy": [[10.0, 20.0, 50.0, 120.0]], "pred_smpl_params": params, "pred_cam": [[0.9, 0.0, 0.1]],
            "score": [0.9]}


def test_human_poses_in_ml4ms_form_pass_and_nobody_is_an_empty_object():
    check_label(get_modality("human_poses"), {})
    check_label(get_modality("human_poses"), _person())


@pytest.mark.parametrize("modality,label,why", [
    ("color_palette", [[1, 2, 3]], "omniforge 0.1"),  # the bare list of omniforge 0.1
    ("color_palette", [{str(k): [[0, 0, 0]] for k in range(1, 7)}], "k = 1, 2"),  # k=7 missing
    ("color_palette", [{**{str(k): [[0, 0, 0]] for k in range(1, 8)}, "2": [[0, 0, 0]] * 3}], "k=2 has 3"),
    ("metadata", {"n_coco_classes": 2}, "omniforge 0.1"),
    ("det", {"instances": [{"boxes": [0.5, 0, 0.4, 1], "class_name": "dog", "score": 0.9}]}, "min <= max"),
    ("det", {"instances": [{"boxes": [0, 0, 1, 1], "class_name": "", "score": 0.9}]}, "class_name"),
    ("det", {"boxes": []}, "instances"),
    ("caption", "   ", "non-empty"),
    ("sam_instance", {"instances": [], "image_size": [0, 4]}, "image_size"),
    ("canny_edge", np.zeros((4, 4, 3), np.uint8), "channel"),
    ("dinov2", np.zeros((16, 16, 4), np.float16), "shape"),
    ("dinov2_global", np.full((768,), np.nan, np.float16), "NaN"),
    ("watermark_score", 1.5, "in 0..1"),
    ("aesthetic_score", "5", "JSON number"),
    ("human_poses", [], "JSON object"),
    ("human_poses", {"bbox_xyxy": [], "pred_smpl_params": {}}, "one box per person"),
    ("human_poses", {**_person(), "pred_cam": [[1.0, 0.0]]}, r"pred_cam must be finite numbers of shape \(1, 3\)"),
    ("human_poses", {**_person(), "bbox_xyxy": [[0, 0, 1, 1], [0, 0, 2, 2]]}, r"shape \(2, 3\)"),  # N differs
    ("human_poses", _person(body_pose=[[[[float("nan")] * 3] * 3] * 23]), "body_pose must be finite"),
    ("human_keypoints", {"instances": [{"bbox": [0, 0, 1, 1], "keypoints": [[0.5, 0.5]]}]}, "triples"),
])
def test_bad_labels_are_named(modality, label, why):
    with pytest.raises(SampleError, match=why):
        check_label(get_modality(modality), label)


def _run(root: str, name: str, fingerprint: str, formats_: dict | None) -> None:
    teacher = {"fingerprint": fingerprint, "modalities": ["metadata"]}
    if formats_ is not None:
        teacher["formats"] = formats_
    storage.write_bytes(storage.join(root, "manifest/runs", f"{name}.json"),
                        json.dumps({"job": "label", "teachers": {"metadata": teacher}}).encode())


def _status(root: str, shard: int, fingerprint: str) -> None:
    shards.write_status(shards.status_uri(root, "metadata", shard), [
        {"key": "a", "ok": True, "error_type": None, "error_message": None, "fingerprint": fingerprint,
         "seconds": 0.0}])


def test_shards_of_an_older_format_are_refused_with_the_command_that_rewrites_them(tmp_path):
    root = str(tmp_path)
    _run(root, "old", "f-old", None)  # omniforge 0.1 recorded no formats: format 1
    _run(root, "new", "f-new", {"metadata": 2})
    _status(root, 0, "f-new")
    formats.check_formats(root, ["metadata"])  # current shards pass
    _status(root, 1, "f-old")
    assert formats.stale_shards(root, ["metadata", "caption"]) == {"metadata": {1: 1}}
    with pytest.raises(formats.LegacyFormatError, match=r"1 shard in format 1.*reads format 2.*"
                                                        rf"omniforge label --output {root} --modalities metadata"):
        formats.check_formats(root, ["metadata"])
    formats.check_formats(root, ["metadata"], [0])  # only the shards asked about count
    _status(root, 1, "f-unknown")  # no run records the fingerprint: nothing proves it old
    formats.check_formats(root, ["metadata"])


def test_verify_names_a_label_that_breaks_its_schema(tmp_path):
    import pyarrow as pa

    from omniforge import codecs
    from omniforge.pipeline import verify

    root = str(tmp_path)
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": ["a", "b"], "shard": [0, 0]}))
    good = {"instances": [{"boxes": [0.1, 0.1, 0.5, 0.5], "class_name": "dog", "score": 0.9}]}
    bad = {"instances": [{"boxes": [0.5, 0.1, 0.4, 0.5], "class_name": "dog", "score": 0.9}]}
    shards.write_tar(shards.tar_uri(root, "det", 0), [("a.json", codecs.encode("json", good)),
                                                       ("b.json", codecs.encode("json", bad))])
    shards.write_status(shards.status_uri(root, "det", 0), [
        {"key": k, "ok": True, "error_type": None, "error_message": None, "fingerprint": "fp", "seconds": 0.0}
        for k in ("a", "b")])
    report = verify(root)
    assert not report.ok
    assert [p for p in report.problems if "schema" in p] == [
        "det/shard-000000: b.json does not match the det schema: det instance 0: \"boxes\" must be [xmin, ymin, "
        "xmax, ymax] in 0..1 with min <= max"]

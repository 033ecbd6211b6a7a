"""`omniforge tokenize` end to end on labels written by a real label job, read back and re-derived.

The expected tokens are recomputed here, sample by sample, from the label shards with the public building
blocks (crop settings, crops, tokenizers, serializers): the job must have applied crop i of a sample to
every modality of that sample, and written exactly the keys for which every modality succeeded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.jobs.cli import main as cli_main
from omniforge.labelers import Sample, create_labeler
from omniforge import shards
from omniforge.pipeline import parse_weights, verify
from omniforge.tokenize import crops as C
from omniforge.tokenize import models, text
from omniforge.tokenize.kinds import kind_for
from omniforge.pipeline.tokenize_job import TokenizeConfig, tokenize
from tiny_labels import OPTIONS, copy_labels

TOKENIZED = ("depth", "semseg_coco", "det", "sam_instance", "clip", "dinov2_global", "caption", "color_palette",
             "metadata", "human_poses")
CROPS = C.CropConfig(n_crops=3, seed=7)


@pytest.fixture(scope="module")
def labels(tmp_path_factory, tiny_labels) -> str:
    """A copy of the session's labels (tests/tiny_labels.py: 6 photos and the truncated JPEG, every modality of
    TOKENIZED but human_poses labeled with tiny teachers; human_poses written by _write_people), tokenized in
    place by this module."""
    root = copy_labels(tiny_labels, tmp_path_factory.mktemp("tokjob") / "labels")
    assert verify(root).modalities["det"].labeled >= 5
    _spread_det_scores(root)
    _write_people(root)
    return root


def _write_people(root: str) -> None:
    """human_poses labels in the teacher's format for every sample rgb holds (0 to 3 people each, boxes in the rgb
    label's pixels), committed as the label job commits them; the sample whose rgb failed fails here too."""
    from smpl_labels import random_boxes, smpl_label, write_label_shard

    rng = np.random.default_rng(5)
    for s in range(3):
        status = shards.read_status(shards.status_uri(root, "rgb", s)).to_pylist()
        rgb = _members(root, "rgb", s)
        people = {r["key"]: smpl_label(rng, random_boxes(rng, i % 4, *rgb[r["key"]].shape[:2]))
                  for i, r in enumerate(status) if r["ok"]}
        write_label_shard(root, s, people, {r["key"]: "the image did not decode" for r in status if not r["ok"]})


def _spread_det_scores(root: str) -> None:
    """A random-init detector scores every box near 0.1, below the 0.6 that det's serializer keeps (ml-4m's
    threshold): give each sample's boxes scores from 0.95 down to 0.3 (the teacher's order kept), rewriting the
    det tars in place, so that the tokens hold boxes."""
    for s in range(3):
        uri = shards.tar_uri(root, "det", s)
        members = []
        for name, data in shards.iter_tar(uri):
            label = codecs.decode("json", data)
            n = len(label["instances"])
            for i, inst in enumerate(label["instances"]):
                inst["score"] = round(0.95 - 0.65 * i / max(n - 1, 1), 4)
            members.append((name, codecs.encode("json", label)))
        shards.write_tar(uri, members)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, labels) -> str:
    out = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    for name in ("depth", "semseg_coco", "clip", "dinov2_global", "sam_instance", "human_poses"):
        kind = kind_for(name)
        kind.save(kind.build(kind.config("tiny")), str(out / kind.artifact.folder))
    captions = [codecs.decode("txt", data) for s in range(3)
                for _, data in shards.iter_tar(shards.tar_uri(labels, "caption", s))]
    (out / "text").mkdir()
    text.train_wordpiece(captions, vocab_size=6000).save(str(out / "text" / "tokenizer.json"))
    return str(out)


# The feature teachers' flags of the module's tokenize run, as a user passes them (the label job's teachers).
TEACHER_FLAGS = {"weights": "tiny", "teachers": {"clip": "clip"}, "options": {"clip": {"pretrained_tag": "openai"}}}


@pytest.fixture(scope="module")
def tokenized(labels, tokenizer_dir, ray_address):
    """The module's tokenize run, through `omniforge tokenize` as a user runs it (a subprocess on the session's
    cluster, progress bar on): (the same run as a TokenizeConfig, its stdout, its stderr, its run record)."""
    import json
    import subprocess
    import sys

    options = {**OPTIONS, **TEACHER_FLAGS["options"]}
    flags = [f"--option={t}.{k}={v}" for t, kv in options.items() for k, v in kv.items()]
    flags += [f"--teacher={m}={t}" for m, t in TEACHER_FLAGS["teachers"].items()]
    proc = subprocess.run([sys.executable, "-m", "omniforge.jobs.cli", "tokenize", "--input", labels, "--tokenizers",
                           tokenizer_dir, "--modalities", ",".join(TOKENIZED), "--crops", str(CROPS.n_crops),
                           "--seed", str(CROPS.seed), "--weights", TEACHER_FLAGS["weights"], *flags,
                           "--ray-address", ray_address], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (Path(labels) / shards.RUNS_DIR).glob("tokenize-*.json")]
    cfg = TokenizeConfig(input=labels, tokenizers=tokenizer_dir, modalities=TOKENIZED, crops=CROPS, options=options,
                         weights=parse_weights(TEACHER_FLAGS["weights"]), teachers=TEACHER_FLAGS["teachers"],
                         progress=False)
    return cfg, proc.stdout, proc.stderr, record


def _members(root: str, folder: str, shard: int) -> dict[str, object]:
    return {shards.member_key(n): codecs.decode(n.split(".", 1)[1], d)
            for n, d in shards.iter_tar(shards.tar_uri(root, folder, shard))}


def test_token_shards_verify_and_hold_the_same_keys(labels, tokenized):
    _, stdout, _, record = tokenized
    assert "6 tokenized with every modality, 1 left out" in stdout
    assert record["counts"]["written"] == 6 and record["counts"]["left_out"] == {"label_failed": 1}  # truncated JPEG
    report = verify(labels)
    assert report.ok, report.lines()
    folders = ["crop_settings", "tok_depth@224", "tok_semseg@224", "tok_det", "tok_sam_instance", "tok_clip@224",
               "tok_dinov2_global", "tok_caption", "tok_color_palette", "tok_metadata", "tok_human_poses"]
    assert set(folders) <= set(report.modalities)
    for s in range(3):
        key_lists = {f: list(_members(labels, f, s)) for f in folders}
        assert len({tuple(v) for v in key_lists.values()}) == 1, key_lists  # same keys, same order
    failed = [r for s in range(3) for r in shards.read_status(shards.status_uri(labels, "tok_depth@224", s)).to_pylist()
              if not r["ok"]]
    assert len(failed) == 1 and failed[0]["error_type"] == "label_failed" and "rgb" in failed[0]["error_message"]


def test_every_modality_gets_the_same_crop(labels, tokenizer_dir, tokenized):
    tok = text.TextTokenizer.from_file(str(Path(tokenizer_dir) / "text" / "tokenizer.json"))
    depth_tok = models.load_tokenizer(str(Path(tokenizer_dir) / "depth"))
    clip_tok = models.load_tokenizer(str(Path(tokenizer_dir) / "clip"))
    clip_teacher = create_labeler("clip", weights="tiny")
    checked_boxes = 0
    for s in range(2):
        rgb, depth, det = (_members(labels, m, s) for m in ("rgb", "depth", "det"))
        clip = _members(labels, "clip", s)
        crops = _members(labels, "crop_settings", s)
        tok_depth, tok_det, tok_clip = (_members(labels, f, s) for f in ("tok_depth@224", "tok_det", "tok_clip@224"))
        for key, cs in crops.items():
            h, w = rgb[key].shape[:2]
            assert cs.dtype == np.int32 and cs.shape == (3, 5)
            np.testing.assert_array_equal(cs, C.crop_settings(key, h, w, CROPS))
            assert tok_depth[key].dtype == np.int16 and tok_depth[key].shape == (3, 196)
            for i, crop in enumerate(cs):
                x = kind_for("depth").prepare([C.crop_dense(depth[key], crop, 224, mode="bilinear")])
                np.testing.assert_array_equal(tok_depth[key][i], depth_tok.encode(x)[0].numpy())
                boxes = text.det_units(C.crop_det(det[key], crop, h, w), min_score=text.DET_MIN_SCORE)
                assert tok.decode(tok_det[key][i].tolist()) == tok.decode(tok.encode_units(boxes, 256).tolist())
                checked_boxes += len(boxes)
            # crop 0 reuses the label job's features; crops 1.. run the same teacher on the cropped image
            feats = [clip[key]] + [
                clip_teacher.label([Sample(key=key, image=C.crop_image(rgb[key], c, 224))])[0]["clip"] for c in cs[1:]]
            expected = clip_tok.encode(kind_for("clip").prepare(feats)).numpy()
            np.testing.assert_array_equal(tok_clip[key], expected)
    assert checked_boxes > 0  # the det comparison saw real boxes


def test_human_poses_tokens_are_each_crops_people(labels, tokenizer_dir, tokenized):
    """tok_human_poses: per crop, the people inside it (mirrored on flipped crops) with the tiny pose tokenizer's
    tokens, in the group orders frozen for (crop seed, key, crop index): what the kind makes of the label here."""
    from omniforge.tokenize.store import TokenizerStore

    store = TokenizerStore(tokenizer_dir)
    kind, tok = kind_for("human_poses"), store.text()
    people = flipped = 0
    for s in range(3):
        rgb, poses, crops = (_members(labels, m, s) for m in ("rgb", "human_poses", "crop_settings"))
        tokens = _members(labels, "tok_human_poses", s)
        for key, cs in crops.items():
            h, w = rgb[key].shape[:2]
            assert tokens[key].shape == (3, 275) and tokens[key].dtype == np.int16
            for i, row in enumerate(cs):
                crop = text.Crop(row=row, height=h, width=w, key=key, index=i, seed=CROPS.seed)
                units = kind.units(poses[key], crop, store)
                np.testing.assert_array_equal(tokens[key][i], tok.encode_units(units, 275))
                parsed = text.parse_smpl_poses(tok.decode(tokens[key][i].tolist()))
                assert len(parsed) == (0 if units == ["none"] else len(units))
                people += len(parsed)
                flipped += int(row[4]) * len(parsed)
    assert people >= 10 and flipped >= 1


def test_rerun_skips_and_a_new_tokenizer_redoes(labels, tokenizer_dir, tokenized, ray_address, tmp_path):
    cfg = tokenized[0]  # the CLI run's flags as a TokenizeConfig: what the CLI wrote counts as done
    again = tokenize(cfg, ray_address=ray_address)
    assert again.skipped == 7 and again.written == 0
    # a retrained (different) depth tokenizer makes every shard stale
    other = tmp_path / "tokenizers"
    for p in Path(tokenizer_dir).iterdir():
        (other / p.name).mkdir(parents=True)
        for f in p.iterdir():
            (other / p.name / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(1)
    kind = kind_for("depth")
    kind.save(kind.build(kind.config("tiny")), str(other / "depth"))
    out = tmp_path / "tokens"
    cfg2 = TokenizeConfig(input=labels, output=str(out), tokenizers=str(other), modalities=("depth", "caption"),
                          crops=C.CropConfig(n_crops=1), progress=False)
    summary = tokenize(cfg2, ray_address=ray_address)
    assert summary.written == 6 and summary.skipped == 0
    assert verify(str(out)).ok  # a separate token root gets the manifest and verifies on its own
    digest = hashlib.sha256((out / "tok_depth@224" / "shard-000000.tar").read_bytes()).hexdigest()
    assert tokenize(cfg2, ray_address=ray_address).skipped == 7
    assert hashlib.sha256((out / "tok_depth@224" / "shard-000000.tar").read_bytes()).hexdigest() == digest


def test_the_cli_prints_only_its_progress_and_records_the_teacher_flags(tokenized):
    """`omniforge tokenize` with feature teachers on crops 1.. (actor pools): stderr holds the progress bar only,
    and the run record keeps the --weights, --option and --teacher the teachers were chosen by."""
    from progress_lines import assert_only_progress_on_stderr

    _, _, stderr, record = tokenized
    assert_only_progress_on_stderr(stderr)
    assert record["job"] == "tokenize" and record["end"]
    assert record["config"]["options"] == {**OPTIONS, "clip": {"pretrained_tag": "openai"}}
    assert record["config"]["teachers"] == {"clip": "clip"} and record["config"]["weights"] == {"*": "tiny"}
    assert set(record["feature_teachers"]) == {"clip", "dinov2"}


def test_missing_tokenizer_or_labels_fail_with_one_line(labels, tmp_path, capsys):
    with pytest.raises(ConfigError, match="tokenizer train"):
        tokenize(TokenizeConfig(input=labels, tokenizers=str(tmp_path), modalities=("depth",), progress=False))
    with pytest.raises(ConfigError, match="no normal labels"):
        tokenize(TokenizeConfig(input=labels, tokenizers=str(tmp_path), modalities=("normal",), progress=False))
    code = cli_main(["tokenize", "--input", labels, "--tokenizers", str(tmp_path), "--modalities", "rgbx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot tokenize rgbx" in err[0]


def test_an_embedding_is_not_tokenized_and_the_error_says_where_it_goes(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot tokenize t5_caption: .*\(t5_caption: continuous embeddings, "
                                          r"which `omniforge train` reads from their label folders"):
        TokenizeConfig(input=str(tmp_path), tokenizers=str(tmp_path), modalities=("t5_caption",))


def test_features_need_the_label_jobs_teacher(labels, tokenizer_dir):
    # crops 1.. must run the teacher that made crop 0: other options give another fingerprint
    cfg = TokenizeConfig(input=labels, tokenizers=tokenizer_dir, modalities=("clip",), crops=CROPS,
                         options={"clip": {"pretrained_tag": "laion2b_s34b_b88k"}}, progress=False)
    with pytest.raises(ConfigError, match="same teacher"):
        tokenize(cfg)


def test_crops_run_the_teacher_the_label_job_chose(monkeypatch, tmp_path):
    """With several teachers for a feature modality, crops 1.. run the one named by --teacher, and its fingerprint
    must be the label job's."""
    from omniforge.labelers import _registry
    from omniforge.labelers.clip import ClipLabeler
    from omniforge.pipeline.tokenize_job import _resolve_teachers

    monkeypatch.setattr(_registry, "_LABELERS", dict(_registry._LABELERS))
    monkeypatch.setattr(_registry, "_DEFAULTS", dict(_registry._DEFAULTS))

    class SecondClip(ClipLabeler):
        """clip: a second clip teacher (a test teacher: ClipLabeler under another name)."""

        name = "clip_b"
        default_for = ()

    _registry.register_labeler(SecondClip)
    base = dict(input=str(tmp_path), tokenizers=str(tmp_path), modalities=("clip", "depth"), crops=CROPS,
                progress=False)
    chosen = TokenizeConfig(**base, teachers={"clip": "clip_b", "depth": "omnidata"},  # depth: not re-run
                            options={"clip_b": {"pretrained_tag": "laion2b_s34b_b88k"}})
    fp_b = SecondClip.fingerprint(weights="tiny", pretrained_tag="laion2b_s34b_b88k")
    (teacher,) = _resolve_teachers(chosen, str(tmp_path), {("clip", 0): [fp_b]})
    assert teacher.cls is SecondClip and teacher.fingerprint == fp_b
    default = TokenizeConfig(**base)
    with pytest.raises(ConfigError, match="--teacher/--weights/--option of the label job"):
        _resolve_teachers(default, str(tmp_path), {("clip", 0): [fp_b]})  # labeled by clip_b, re-run by clip
    (teacher,) = _resolve_teachers(default, str(tmp_path), {("clip", 0): [ClipLabeler.fingerprint(weights="tiny")]})
    assert teacher.cls is ClipLabeler
    with pytest.raises(ConfigError, match="'midas' is not a registered labeler; teachers of clip: clip, clip_b"):
        TokenizeConfig(**base, teachers={"clip": "midas"})

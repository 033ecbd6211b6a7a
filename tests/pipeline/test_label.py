"""End-to-end label jobs on the session's local Ray cluster: outputs are read back and checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from ray import cloudpickle
import numpy as np
import pytest

import failing_labeler
from images import BAD_CORPUS_MAX_PIXELS, photo_bytes, write_bad_corpus
from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.jobs.cli import main as cli_main
from omniforge.pipeline import LabelConfig, label, load_manifest, parse_weights, show, verify
from omniforge import shards, storage

cloudpickle.register_pickle_by_value(failing_labeler)  # Ray workers cannot import tests/ modules

CLASSICAL = ("rgb", "caption", "canny_edge", "color_palette")
ALL = CLASSICAL + ("clip", "dinov2", "dinov2_global")


def _read_all(root: str, modality: str) -> tuple[dict[str, bytes], dict[str, dict]]:
    """Every member and status row of a modality, asserting no key appears twice anywhere."""
    members, statuses = {}, {}
    manifest = load_manifest(root)
    for shard in sorted(set(manifest.column("shard").to_pylist())):
        for name, data in shards.iter_tar(shards.tar_uri(root, modality, shard)):
            key = shards.member_key(name)
            assert key not in members, f"duplicate {key} in {modality}"
            members[key] = data
        for row in shards.read_status(shards.status_uri(root, modality, shard)).to_pylist():
            assert row["key"] not in statuses
            statuses[row["key"]] = row
    return members, statuses


def _key_of(manifest, suffix: str) -> str:
    for key, uri in zip(manifest.column("key").to_pylist(), manifest.column("source_uri").to_pylist()):
        if uri.endswith(suffix):
            return key
    raise AssertionError(f"no source ending with {suffix}")


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad_corpus")
    expected = write_bad_corpus(folder)
    for rel, outcome in expected.items():  # captions for the good photos, none for the rest
        if outcome == "ok":
            (folder / rel).with_suffix(".txt").write_text(f"caption of {rel}")
    return folder, expected


@pytest.fixture(scope="module")
def labeled(bad_corpus, ray_address, tmp_path_factory) -> tuple[str, dict[str, str], object]:
    folder, expected = bad_corpus
    root = str(tmp_path_factory.mktemp("labels"))
    cfg = LabelConfig(input=str(folder), output=root, modalities=ALL, shard_size=3, batch_size=4,
                      max_pixels=BAD_CORPUS_MAX_PIXELS, progress=False)
    summary = label(cfg, ray_address=ray_address)
    return root, expected, summary


def test_every_sample_is_labeled_or_failed_with_its_reason(labeled):
    root, expected, summary = labeled
    manifest = load_manifest(root)
    assert manifest.num_rows == len(expected)
    assert summary.processed == len(expected)
    for modality in ALL:
        members, statuses = _read_all(root, modality)
        assert set(statuses) == set(manifest.column("key").to_pylist())
        assert set(members) == {k for k, r in statuses.items() if r["ok"]}
        for rel, outcome in expected.items():
            row = statuses[_key_of(manifest, rel)]
            if outcome == "ok":
                if modality == "caption":
                    assert row["ok"] and members[row["key"]].decode() == f"caption of {rel}"
                else:
                    assert row["ok"], (modality, rel, row)
            else:
                assert not row["ok"] and row["error_type"] == outcome, (modality, rel, row)
    n_ok = sum(1 for o in expected.values() if o == "ok")
    assert summary.labeled == {m: n_ok for m in ALL}


def test_labels_have_the_documented_formats(labeled):
    root, expected, _ = labeled
    manifest = load_manifest(root)
    key = _key_of(manifest, next(rel for rel, o in expected.items() if o == "ok" and rel.endswith(".jpg")))
    values = {m: codecs.decode(ext, _read_all(root, m)[0][key])
              for m, ext in (("rgb", "jpg"), ("canny_edge", "png"), ("color_palette", "json"),
                             ("clip", "npy"), ("dinov2", "npy"), ("dinov2_global", "npy"))}
    rgb = values["rgb"]
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and min(rgb.shape[:2]) <= 512
    assert values["canny_edge"].shape == rgb.shape[:2] and set(np.unique(values["canny_edge"])) <= {0, 255}
    palettes = values["color_palette"][0]  # ml-4m's format: one palette for every k
    assert sorted(palettes, key=int) == [str(k) for k in range(1, 8)]
    assert all(len(colors) == int(k) for k, colors in palettes.items())  # a photo has >= 7 distinct colours
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for colors in palettes.values() for c in colors)
    assert values["clip"].shape == (14, 14, 512) and values["clip"].dtype == np.float16
    assert values["dinov2"].shape == (16, 16, 768) and values["dinov2_global"].shape == (768,)


def test_verify_passes_and_run_record_is_written(labeled):
    root, _, summary = labeled
    report = verify(root)
    assert report.ok, report.lines()
    assert set(report.modalities) == set(ALL)
    record = json.loads(storage.read_bytes(storage.join(root, shards.RUNS_DIR, f"{summary.run_id}.json")))
    assert set(record["teachers"]) == {"rgb", "caption", "canny_edge", "color_palette", "clip", "dinov2"}
    # the raw format each modality was written in: what readers check before they read (pipeline.formats)
    assert record["teachers"]["color_palette"]["formats"] == {"color_palette": 2}
    assert record["teachers"]["dinov2"]["formats"] == {"dinov2": 1, "dinov2_global": 1}
    assert record["end"] and record["counts"]["processed"] == summary.processed
    assert "torch" in record["packages"]
    assert not storage.list_files(storage.join(root, shards.TMP_DIR))


def test_rerun_skips_done_work_and_rewrites_nothing(labeled, ray_address, monkeypatch, capsys):
    root, expected, _ = labeled
    tars = sorted(Path(root).glob("*/shard-*.tar"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tars}
    monkeypatch.chdir(Path(root).parent)  # a relative --output names the same root
    relative = Path(root).name
    summary = label(LabelConfig(output=relative, modalities=ALL, progress=False), ray_address=ray_address)
    assert summary.processed == 0
    assert summary.skipped_samples == {m: len(expected) for m in ALL}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tars} == before
    assert cli_main(["verify", relative, "--no-decode"]) == 0
    assert set(verify(relative).modalities) == set(ALL)


def test_changed_options_relabel_only_that_teacher(labeled, ray_address, tmp_path):
    root, _, _ = labeled
    rgb_before = {p: p.stat().st_mtime_ns for p in Path(root).glob("rgb/shard-*.tar")}
    summary = label(LabelConfig(output=root, modalities=("rgb", "canny_edge"), options={"canny_edge": {"low": 10}},
                                progress=False), ray_address=ray_address)
    assert summary.skipped_samples["rgb"] == summary.samples and summary.skipped_samples["canny_edge"] == 0
    assert {p: p.stat().st_mtime_ns for p in Path(root).glob("rgb/shard-*.tar")} == rgb_before
    assert verify(root).ok


def test_show_draws_every_modality(labeled, tmp_path):
    root, expected, _ = labeled
    key = _key_of(load_manifest(root), next(rel for rel, o in expected.items() if o == "ok"))
    out = show(root, key, str(tmp_path / "preview.png"))
    from PIL import Image

    with Image.open(out) as img:
        assert img.width > 600 and img.height > 300


def test_verify_reports_missing_and_corrupt_members(labeled, tmp_path):
    import shutil

    root, _, _ = labeled
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    victim = next(p for p in sorted((broken / "clip").glob("shard-*.tar")) if len(list(shards.iter_tar(str(p)))) >= 2)
    members = list(shards.iter_tar(str(victim)))
    shards.write_tar(str(victim), members[1:] + [(members[0][0], b"not an npy")])  # out of order and corrupt
    (broken / "_status" / "rgb" / "shard-000001.parquet").unlink()
    assert cli_main(["verify", str(broken)]) == 1
    report = verify(str(broken))
    text = "\n".join(report.problems)
    assert f"clip/{victim.stem}: members are not sorted" in text
    assert "does not decode" in text
    assert "rgb/shard-000001: an uncommitted tar (no status)" in text


def test_a_teacher_that_raises_fails_only_its_samples(tmp_path, ray_address):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"img{i}.jpg").write_bytes(photo_bytes("chelsea", 64 + i))
    (folder / "img3.txt").write_text("poison")  # the failing teacher raises on batches holding this caption
    root = str(tmp_path / "out")
    summary = label(LabelConfig(input=str(folder), output=root, modalities=("rgb", "always_fails_on_poison"),
                                shard_size=4, batch_size=3, progress=False), ray_address=ray_address)
    _, statuses = _read_all(root, "always_fails_on_poison")
    failed = {k for k, r in statuses.items() if not r["ok"]}
    assert failed == {"img3"}
    assert statuses["img3"]["error_type"] == "teacher_error" and "poison" in statuses["img3"]["error_message"]
    assert summary.labeled["rgb"] == 6
    assert verify(root).ok


@pytest.mark.slow
def test_driver_killed_mid_job_then_rerun_completes_exactly_once(tmp_path, ray_address):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"img{i:02d}.jpg").write_bytes(photo_bytes(("chelsea", "astronaut", "coffee")[i % 3], 96 + i))
    root = tmp_path / "out"
    cmd = [sys.executable, "-m", "omniforge.jobs.cli", "label", "--input", str(folder), "--output", str(root),
           "--modalities", "rgb,canny_edge,clip", "--shard-size", "2", "--batch-size", "2", "--no-progress",
           "--ray-address", ray_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    status_dir = root / "_status" / "clip"
    while time.time() < deadline and proc.poll() is None:
        if status_dir.exists() and len(list(status_dir.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(status_dir.glob("*.parquet")))
    assert 3 <= committed < 20, committed

    # what a write killed half way leaves: the local temporary file of an atomic write
    leftover = root / "rgb" / ".shard-000000.tar.0123456789ab.tmp"
    leftover.write_bytes(b"half a tar")
    assert any("interrupted write" in p for p in verify(str(root)).problems)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skipped as done" in rerun.stdout
    for modality in ("rgb", "canny_edge", "clip"):
        members, statuses = _read_all(str(root), modality)
        assert len(members) == len(statuses) == 40
        assert all(r["ok"] for r in statuses.values())
    assert verify(str(root)).ok
    assert not leftover.exists()
    assert Counter(p.parent.name for p in root.glob("*/shard-*.tar")) == {"rgb": 20, "canny_edge": 20, "clip": 20}


def test_cli_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert cli_main(["label", "--output", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "omniforge plan" in err
    assert cli_main(["label", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--modalities", "rgb,telepathy"]) == 2
    assert "telepathy" in capsys.readouterr().err
    assert cli_main(["label", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--modalities", "canny_edge",
                     "--option", "canny_edge.low=900"]) == 2
    assert "low <= high" in capsys.readouterr().err and not (tmp_path / "o").exists()  # refused before any work
    with pytest.raises(ConfigError):
        parse_weights("clip=")


def test_an_unloadable_checkpoint_is_a_one_line_error_not_random_weights(tmp_path, ray_address, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_bytes("chelsea", 64))
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    ckpt.write_bytes(b"this is not a checkpoint")
    code = cli_main(["label", "--input", str(folder), "--output", str(tmp_path / "out"), "--modalities", "rgb,clip",
                     "--weights", f"tiny,clip={ckpt}", "--no-progress", "--ray-address", ray_address])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2, err
    assert err.startswith("omniforge label: error: ") and str(ckpt) in err and "--weights tiny" in err
    assert not (tmp_path / "out" / "clip").exists()


def test_plan_of_a_planned_root_returns_it_and_exits_cleanly(labeled, bad_corpus, tmp_path):
    folder, expected = bad_corpus
    root, _, _ = labeled
    cmd = [sys.executable, "-m", "omniforge.jobs.cli", "plan", "--input", str(folder), "--output", root]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a clean interpreter exit, not an Arrow abort
    assert f"planned {len(expected)} samples" in proc.stdout
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jpg").write_bytes(photo_bytes("coffee", 32))
    proc = subprocess.run(cmd[:5] + [str(other)] + cmd[6:], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "use a new --output" in proc.stderr


def test_verify_reports_a_truncated_tar_instead_of_crashing(labeled, tmp_path):
    import shutil

    root, _, _ = labeled
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    tar = Path(shards.tar_uri(copy, "clip", 0))
    tar.write_bytes(tar.read_bytes()[:3000])  # cut inside the first member's body
    report = verify(copy)
    assert not report.ok
    text = "\n".join(report.lines())
    assert "clip/shard-000000" in text and "is not a readable tar" in text
    assert verify(copy, ["rgb", "caption"]).ok  # the other modalities are untouched


# -- teacher options and teacher choice are checked on the driver, before any work ----------------------------

@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts Ray (every module's ensure_ray, and ray.init)."""
    import ray

    from omniforge.pipeline import _ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray work started")

    for module in list(sys.modules.values()):
        if getattr(module, "ensure_ray", None) is _ray.ensure_ray:
            monkeypatch.setattr(module, "ensure_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("args,expected", [
    (["--modalities", "rgb,clip", "--option", "clip.bogus=1"],
     "clip: unknown option bogus; its options are pretrained_tag"),
    (["--modalities", "det", "--option", "det.threshold=high"],
     "det: option threshold=\"high\" is not valid: expected a number in [0.0, 1.0]"),
    (["--modalities", "sam_instance", "--option", "sam_instance.model_type=vit_q"], 'one of "vit_h", "vit_l", "vit_b"'),
    (["--modalities", "rgb", "--option", "telepathy.level=3"], "unknown labeler 'telepathy'; registered labelers: "),
    (["--modalities", "rgb", "--option", "clip.pretrained_tag=openai"], "which this job does not run"),
    (["--modalities", "depth", "--option", "depth.model=omnidata_dpt_hybrid"],
     "depth: option model was removed: Depth Anything V2 and Omnidata are two teachers of depth now"),
    (["--modalities", "depth", "--teacher", "depth=normal"], "'normal' does not write it; teachers of depth: depth, "
                                                            "omnidata"),
    (["--modalities", "depth", "--teacher", "depth=midas"], "'midas' is not a registered labeler; teachers of depth"),
    (["--modalities", "rgb", "--teacher", "depth=omnidata"], "--teacher names depth, which this job does not label"),
    (["--modalities", "depth", "--teacher", "depth=omnidata", "--weights", "tiny,depth=/x"],
     "name teacher 'depth', which this job does not run (teachers: omnidata)"),
])
def test_a_bad_teacher_option_or_choice_is_one_line_before_any_work(args, expected, tmp_path, capsys, no_ray):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo_bytes("chelsea", 32))
    out = tmp_path / "out"
    code = cli_main(["label", "--input", str(folder), "--output", str(out), "--no-progress", *args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2 and "\n" not in err and not captured.out, err
    assert err.startswith("omniforge label: error: ") and expected in err
    assert not out.exists()  # not planned: no manifest, nothing written


def test_tokenize_checks_teacher_options_before_any_work(tmp_path, capsys, no_ray):
    base = ["tokenize", "--input", str(tmp_path / "labels"), "--tokenizers", str(tmp_path), "--modalities", "clip"]
    for args, expected in ((["--option", "clip.bogus=1"], "clip: unknown option bogus; its options are pretrained_tag"),
                           (["--option", "dinov2.size=3"], "dinov2: unknown option size; dinov2 takes no options"),
                           (["--teacher", "clip=omnidata"], "'omnidata' does not write it; teachers of clip: clip")):
        assert cli_main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("omniforge tokenize: error: ") and expected in err, err


def test_the_omnidata_depth_teacher_keeps_the_fingerprint_of_depth_model_omnidata(tmp_path, ray_address):
    """A corpus labeled with `--option depth.model=omnidata_dpt_hybrid` by release 1fda641 counts as done when
    labeled with `--teacher depth=omnidata` now: the status rows carry 1fda641's fingerprint."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        (folder / f"{name}.jpg").write_bytes(photo_bytes(name, 48))
    root = tmp_path / "out"
    assert cli_main(["label", "--input", str(folder), "--output", str(root), "--modalities", "rgb,depth", "--teacher",
                     "depth=omnidata", "--no-progress", "--ray-address", ray_address]) == 0
    status = shards.read_status(shards.status_uri(str(root), "depth", 0)).to_pylist()
    assert [r["ok"] for r in status] == [True, True]
    assert {r["fingerprint"] for r in status} == {"c8617e058f5f7e2e"}  # 1fda641, depth with model=omnidata_dpt_hybrid
    record = json.loads(next((root / "manifest" / "runs").glob("*.json")).read_text())
    assert record["teachers"]["omnidata"]["modalities"] == ["depth"] and record["config"]["teachers"] == {
        "depth": "omnidata"}
    depth = codecs.decode("png", dict(shards.iter_tar(shards.tar_uri(str(root), "depth", 0)))["chelsea.png"])
    assert depth.dtype == np.uint16 and depth.max() == 65535

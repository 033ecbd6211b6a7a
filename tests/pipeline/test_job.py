"""What the label and tokenize jobs share (omniforge.pipeline._job): quiet successful runs, resources sized
from the machine, restartable teacher actors, run records, done-checks and one-line errors out of Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray import cloudpickle

import dying_labeler
from images import photo_bytes
from progress_lines import assert_only_progress_on_stderr
from omniforge import shards, storage
from omniforge.errors import StorageError, WeightsError
from omniforge.pipeline import LabelConfig, label, load_manifest, verify
from omniforge.pipeline import _job

cloudpickle.register_pickle_by_value(dying_labeler)  # Ray workers cannot import tests/ modules


def _corpus(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"img{i:02d}.jpg").write_bytes(photo_bytes(("chelsea", "astronaut", "coffee")[i % 3], 96 + i))
    return folder


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _record(root: str, run_id: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(root, shards.RUNS_DIR, f"{run_id}.json")))


def test_a_label_job_with_a_learned_teacher_prints_only_its_progress(tmp_path):
    """The CLI as a user runs it (its own local Ray cluster, no -v): stdout has the summary, stderr only the
    progress bars; and a lone learned teacher gets the cores the decode and write tasks leave."""
    corpus = _corpus(tmp_path / "corpus", 8)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "omniforge.jobs.cli", "label", "--input", str(corpus), "--output",
                           str(out), "--modalities", "rgb,clip", "--shard-size", "4", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clip             labeled      8" in proc.stdout
    assert_only_progress_on_stderr(proc.stderr)
    records = list((out / shards.RUNS_DIR).glob("*.json"))
    assert len(records) == 1
    clip = json.loads(records[0].read_text())["actors"]["clip"]
    assert clip["actors"] == 1 and clip["device"] == "cpu"
    threads = clip["torch_threads"][0]
    assert min(2, _cores()) <= threads <= _cores()  # not the single thread of a 1-CPU actor


def test_several_learned_teachers_share_the_cores_and_the_flag_overrides(tmp_path, ray_address):
    root = str(tmp_path / "out")
    summary = label(LabelConfig(input=str(_corpus(tmp_path / "corpus", 4)), output=root,
                                modalities=("clip", "dinov2"), shard_size=4, batch_size=4, progress=False),
                    ray_address=ray_address)
    actors = _record(root, summary.run_id)["actors"]
    assert set(actors) == {"clip", "dinov2"}
    assert actors["clip"]["num_cpus"] == actors["dinov2"]["num_cpus"]
    import ray

    cluster_cpus = ray.cluster_resources()["CPU"]
    assert actors["clip"]["num_cpus"] + actors["dinov2"]["num_cpus"] <= cluster_cpus - 1  # room for the tasks
    assert sum(a["torch_threads"][0] for a in actors.values()) <= max(2, _cores())

    summary = label(LabelConfig(output=root, modalities=("clip",), cpus_per_actor=1.0, progress=False,
                                options={"clip": {"pretrained_tag": "laion2b_s34b_b88k"}}), ray_address=ray_address)
    assert _record(root, summary.run_id)["actors"]["clip"]["num_cpus"] == 1.0


def test_a_teacher_actor_killed_mid_batch_is_rebuilt_and_the_job_completes(tmp_path, ray_address):
    log = tmp_path / "constructions.txt"
    root = str(tmp_path / "out")
    summary = label(LabelConfig(input=str(_corpus(tmp_path / "corpus", 6)), output=root,
                                modalities=("rgb", "dies_once"), options={"dies_once": {"log": str(log)}},
                                shard_size=3, batch_size=2, progress=False), ray_address=ray_address)
    pids = log.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # built, killed on its first batch, rebuilt by Ray
    assert summary.labeled == {"rgb": 6, "dies_once": 6} and not summary.failed
    keys = sorted(load_manifest(root).column("key").to_pylist())
    for modality in ("rgb", "dies_once"):
        members = [shards.member_key(n) for s in (0, 1) for n, _ in shards.iter_tar(shards.tar_uri(root, modality, s))]
        assert sorted(members) == keys  # every sample once: the retried batch wrote no duplicate
    assert verify(root).ok


def test_the_label_cli_checks_its_flags_without_importing_torch(tmp_path):
    code = ("import sys; from omniforge.jobs.cli import main; "
            f"rc = main(['label', '--output', {str(tmp_path / 'o')!r}, '--modalities', 'clip', '--option', "
            "'clip.bogus=1', '--no-progress']); print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.strip() == ("omniforge label: error: clip: unknown option bogus; its options are "
                                   "pretrained_tag (omniforge list clip)")


# -- the shared pieces on their own ---------------------------------------------------------------------

def test_a_run_record_never_holds_a_url_password(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["omniforge", "label", "--input", "https://alice:s3cr3t@example.com/c.tar",
                                      "--output", str(tmp_path)])
    record = _job.RunRecord(str(tmp_path), "r1", run_id="r1", job="label", config={"output": str(tmp_path)})
    record.write()
    record.finish(seconds=1.5, counts={"samples": 3})
    text = (tmp_path / shards.RUNS_DIR / "r1.json").read_text()
    assert "s3cr3t" not in text and "https://alice:***@example.com/c.tar" in text
    data = json.loads(text)
    assert data["job"] == "label" and data["end"] and data["counts"] == {"samples": 3} and "ray" in data["packages"]


def test_committed_needs_the_status_the_tar_and_the_fingerprint(tmp_path):
    root = str(tmp_path)
    for shard, fp in ((0, "aaa"), (1, "bbb"), (2, "aaa")):
        shards.write_tar(shards.tar_uri(root, "rgb", shard), [("k.jpg", b"x")])
        shards.write_status(shards.status_uri(root, "rgb", shard), [{"key": "k", "ok": True, "fingerprint": fp}])
    os.remove(shards.tar_uri(root, "rgb", 2))  # a status without its tar is not done
    shards.write_tar(shards.tar_uri(root, "rgb", 3), [("k.jpg", b"x")])  # a tar without status is not done either
    checks = [("rgb", s, "aaa") for s in range(5)]
    assert _job.committed(root, checks) == {("rgb", 0)}


def test_partial_writes_are_swept_and_nothing_else(tmp_path):
    root = str(tmp_path)
    shards.write_tar(shards.tar_uri(root, "rgb", 0), [("k.jpg", b"x")])
    leftovers = [tmp_path / "rgb" / ".shard-000001.tar.0123456789ab.tmp",
                 tmp_path / shards.STATUS_DIR / "rgb" / ".shard-000001.parquet.0123456789ab.tmp"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    _job.delete_partial_writes(root, ["rgb", "depth"])
    assert not any(p.exists() for p in leftovers)
    assert Path(shards.tar_uri(root, "rgb", 0)).exists()


def test_the_omniforge_error_behind_a_ray_error_is_raised_alone():
    import ray.exceptions

    with pytest.raises(StorageError, match="^bucket gone$") as info:
        with _job.omniforge_errors():
            try:
                raise StorageError("bucket gone")
            except StorageError as e:
                raise ray.exceptions.RayTaskError("write", "traceback text", e) from e
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # an actor whose constructor raised: the driver gets an ActorDiedError holding only the traceback's text
    creation = ray.exceptions.RayTaskError(
        "_TeacherStage.__init__", "Traceback (most recent call last):\n  File labeler.py\n"
        "omniforge.errors.WeightsError: checkpoint /x/y.bin not found: pass an existing file", RuntimeError("lost"))
    with pytest.raises(WeightsError, match="^checkpoint /x/y.bin not found: pass an existing file$"):
        with _job.omniforge_errors():
            raise ray.exceptions.ActorDiedError(cause=creation)
    with pytest.raises(KeyError):  # anything else passes unchanged
        with _job.omniforge_errors():
            raise KeyError("internal")


def test_actor_cpus_never_add_up_to_more_than_they_were_given(monkeypatch):
    """(4 - 1) / 14 = 0.21428...: rounded up to Ray's 1e-4 unit, 14 actors would take 3.0002 CPUs and leave the
    1-CPU decode task unplaceable, stalling the job (it did, with every teacher in the demo)."""
    monkeypatch.setattr(_job, "node_cpus", lambda: [4.0])
    for n in range(1, 40):
        cpus = _job.actor_resources(n, "cpu").num_cpus
        assert 0 < cpus and n * cpus <= 3.0 + 1e-9 and cpus == round(cpus, 4), n

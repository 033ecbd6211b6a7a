"""On a Ray cluster of several nodes, a local output path that some node cannot see is refused in one line
before any work (label, tokenize, train --ray-workers); a path every node sees works.

The three nodes (a head and two workers, one CPU each) run on this machine and share its disk; one worker
runs in a mount namespace of its own where the test's "node-local" directory is an empty tmpfs, so that
node truly cannot see what the driver writes there (tests/multinode_cluster.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from images import photo_bytes
from omniforge import codecs, shards
from omniforge.pipeline import verify

CLUSTER_SCRIPT = Path(__file__).parent.parent / "multinode_cluster.py"
REFUSAL = "of the 3 nodes of the Ray cluster cannot see"


def _can_hide_a_directory(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f'mount -t tmpfs tmpfs "{probe}"'], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(Ray address, a directory every node sees, a directory one node cannot see)."""
    tmp = tmp_path_factory.mktemp("multinode")
    if not _can_hide_a_directory(tmp):
        pytest.skip("needs `unshare -m` (root, or unprivileged user namespaces) to give one node its own view of "
                    "the filesystem")
    shared, hidden = tmp / "shared", tmp / "node-local"
    shared.mkdir()
    hidden.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(CLUSTER_SCRIPT), str(hidden)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    address = proc.stdout.readline().strip()
    try:
        assert address, "the three-node cluster did not start"
        yield address, shared, hidden
    finally:
        proc.stdin.close()  # the script tears its cluster down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cli(*args: str, address: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "omniforge.jobs.cli", *args, "--ray-address", address],
                          capture_output=True, text=True, timeout=300, env=env)


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        (folder / f"img{i}.jpg").write_bytes(photo_bytes(("chelsea", "coffee")[i % 2], 64 + i))
    return folder


def _assert_refused(proc: subprocess.CompletedProcess, flag: str, path: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{flag} {path}" in lines[0] and f"1 {REFUSAL}" in lines[0] and "s3://" in lines[0], lines[0]
    assert "shared filesystem" in lines[0]


def test_a_local_output_every_node_sees_is_labeled(cluster, tmp_path):
    address, shared, _ = cluster
    out = shared / "labels"
    proc = _cli("label", "--input", str(_corpus(shared / "corpus")), "--output", str(out), "--modalities",
                "rgb,canny_edge", "--shard-size", "2", "--no-progress", address=address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "canny_edge       labeled      4" in proc.stdout
    assert verify(str(out)).ok
    assert not list(out.glob(".omniforge-probe-*"))  # the probe's marker is gone


def test_a_local_output_one_node_cannot_see_is_refused_before_any_work(cluster):
    address, shared, hidden = cluster
    out = hidden / "labels"
    proc = _cli("label", "--input", str(_corpus(shared / "corpus2")), "--output", str(out), "--modalities",
                "rgb,canny_edge", "--no-progress", address=address)
    _assert_refused(proc, "--output", out)
    assert not list(out.rglob("*")), list(out.rglob("*"))  # no manifest, no shard, no marker left


def test_tokenize_and_train_refuse_a_local_output_one_node_cannot_see(cluster):
    address, shared, hidden = cluster
    labels = shared / "labels"  # labeled by the test above, on every node's view
    if not (labels / "manifest").exists():
        pytest.skip("needs the labels of test_a_local_output_every_node_sees_is_labeled")
    import torch

    from omniforge.tokenize.kinds import kind_for

    tokenizers = shared / "tokenizers"
    torch.manual_seed(0)
    kind = kind_for("canny_edge")
    kind.save(kind.build(kind.config("tiny")), str(tokenizers / kind.artifact.folder))
    tokens = hidden / "tokens"
    proc = _cli("tokenize", "--input", str(labels), "--output", str(tokens), "--tokenizers", str(tokenizers),
                "--modalities", "canny_edge", "--no-progress", address=address)
    _assert_refused(proc, "--output", tokens)
    assert not list(tokens.rglob("*"))

    data = shared / "train_tokens"
    folder = "tok_depth@224"
    keys = [f"k{k}" for k in range(4)]
    shards.write_tar(shards.tar_uri(str(data), folder, 0),
                     [(f"{k}.npy", codecs.encode("npy", np.zeros((1, 196), np.int16))) for k in keys])
    shards.write_status(shards.status_uri(str(data), folder, 0), [{"key": k, "ok": True} for k in keys])
    run = hidden / "run"
    proc = _cli("train", "--ray-workers", "1", "--data", str(data), "--out", str(run), "--modalities", folder,
                "--steps", "1", "--batch-size", "2", "--device", "cpu", "--no-tensorboard", "--no-progress",
                address=address)
    _assert_refused(proc, "--out", run)
    assert not list(run.rglob("*"))

"""omniforge train --ray-workers: the trainer under Ray Train equals the same run under torchrun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from omniforge import codecs, shards
from omniforge.errors import ConfigError
from omniforge.model.train import TrainConfig

DEPTH = "tok_depth@224"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """4 shards x 6 keys of depth tokens that vary by key."""
    root = str(tmp_path_factory.mktemp("ray-train") / "tokens")
    for s in range(4):
        keys = [f"s{s:02d}-k{k:02d}" for k in range(6)]
        members = [(f"{key}.npy", codecs.encode("npy", np.tile((np.arange(196) + k) % 32, (2, 1)).astype(np.int16)))
                   for k, key in enumerate(keys)]
        shards.write_tar(shards.tar_uri(root, DEPTH, s), members)
        shards.write_status(shards.status_uri(root, DEPTH, s), [{"key": k, "ok": True} for k in keys])
    return root


ARGS = ["--modalities", DEPTH, "--steps", "4", "--save-every", "2", "--batch-size", "2", "--input-tokens", "16",
        "--target-tokens", "16", "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu", "--no-tensorboard",
        "--no-progress"]


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_workers_train_as_torchrun_does(ray_address, root, tmp_path, capsys):
    from omniforge.jobs.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "omniforge.model.train", "--data", root, "--out", str(tmp_path / "torchrun"), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert main(["train", "--ray-workers", "2", "--data", root, "--out", str(tmp_path / "ray"), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "trained tiny steps 1..4" in printed and str(tmp_path / "ray" / "checkpoint-4") in printed
    state = json.loads((tmp_path / "ray" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    # the same process group size, shard split and seeds: the same losses
    assert _losses(tmp_path / "ray") == pytest.approx(_losses(tmp_path / "torchrun"), abs=1e-5)

    # run to a later step: the workers resume from checkpoint-4; this time with the progress bar
    more = [a if a != "4" else "6" for a in ARGS if a != "--no-progress"]
    assert main(["train", "--ray-workers", "2", "--data", root, "--out", str(tmp_path / "ray"), *more]) == 0
    captured = capsys.readouterr()
    assert "trained tiny steps 5..6" in captured.out
    assert "train (2 Ray workers)" in captured.err and "6/6" in captured.err
    assert [json.loads(x)["step"] for x in (tmp_path / "ray" / "log.jsonl").read_text().splitlines()] == list(
        range(1, 7))


def test_ray_launch_errors_come_before_any_worker(root, tmp_path):
    from omniforge.pipeline.train_job import train_on_ray

    cfg = TrainConfig(data=root, modalities=(DEPTH, "tok_caption"), out=str(tmp_path / "a"), device="cpu")
    with pytest.raises(ConfigError, match="no token shards for tok_caption"):
        train_on_ray(cfg, workers=2)
    with pytest.raises(ConfigError, match="--ray-workers 0"):
        train_on_ray(TrainConfig(data=root, modalities=(DEPTH,), out=str(tmp_path / "b")), workers=0)
    from omniforge.jobs.cli import main

    assert main(["train", "--ray-address", "ray://nowhere:1", "--data", root, "--out", str(tmp_path / "c"),
                 *ARGS]) == 2


def test_progress_follows_the_growing_log(tmp_path):
    from omniforge.pipeline.train_job import _read_new

    log = tmp_path / "log.jsonl"
    assert _read_new(str(log), 0) == (0, [])  # not written yet
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')  # the last line is still being written
    offset, entries = _read_new(str(log), 0)
    assert [e["step"] for e in entries] == [1, 2] and offset == len('{"step": 1}\n{"step": 2}\n')
    with open(log, "a") as f:
        f.write('p": 3}\n')
    offset, entries = _read_new(str(log), offset)
    assert [e["step"] for e in entries] == [3]
    log.write_text('{"step": 1}\n')  # rewritten shorter (a resumed run): read from the start again
    assert [e["step"] for e in _read_new(str(log), offset)[1]] == [1]


@pytest.mark.slow
def test_a_failing_worker_group_is_one_line(ray_address, root, tmp_path):
    """A worker that fails on every try (a truncated shard) ends the command with the worker's own message."""
    import shutil

    from omniforge.errors import OmniforgeError
    from omniforge.pipeline.train_job import train_on_ray

    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    for s in range(4):
        tar = shards.tar_uri(broken, DEPTH, s)
        with open(tar, "rb") as f:
            data = f.read()
        with open(tar, "wb") as f:
            f.write(data[:700])
    cfg = TrainConfig(data=broken, modalities=(DEPTH,), out=str(tmp_path / "run"), steps=3, batch_size=2,
                      input_tokens=16, target_tokens=16, device="cpu", tensorboard=False)
    with pytest.raises(OmniforgeError, match=r"after 0 restart\(s\): .*is not a readable tar") as info:
        train_on_ray(cfg, workers=2, max_failures=0, progress=False)
    assert "\n" not in str(info.value)

"""omniforge train --ray-workers: the trainer under Ray Train equals the same run under torchrun."""

import json

import pytest

from _helpers import DDP_DEPTH, ddp_train_args
from omniforge import shards
from omniforge.errors import ConfigError
from omniforge.model.train import TrainConfig

DEPTH = DDP_DEPTH


@pytest.fixture(scope="module")
def root(ddp_corpus) -> str:
    """The session's token root of tests/_helpers.py's write_ddp_corpus: 4 shards x 6 keys whose tokens vary by
    key."""
    return ddp_corpus[0]


def _losses(out, log: str = "log.jsonl") -> list[float]:
    return [json.loads(line)["loss"] for line in (out / log).read_text().splitlines()]


@pytest.mark.slow
def test_ray_workers_train_as_torchrun_does(ray_address, ddp_corpus, torchrun_ddp, tmp_path, capsys):
    """The flags of the session's torchrun DDP run (tests/conftest.py's torchrun_ddp) under 2 Ray Train workers."""
    from omniforge.jobs.cli import main

    args = ddp_train_args(ddp_corpus)
    assert main(["train", "--ray-workers", "2", *args, "--out", str(tmp_path / "ray")]) == 0
    printed = capsys.readouterr().out
    assert "trained tiny steps 1..3" in printed and str(tmp_path / "ray" / "checkpoint-3") in printed
    state = json.loads((tmp_path / "ray" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    # the same process group size, shard split and seeds: the same losses
    assert _losses(tmp_path / "ray") == pytest.approx(_losses(torchrun_ddp), abs=1e-5)
    assert _losses(tmp_path / "ray", "eval.jsonl") == pytest.approx(_losses(torchrun_ddp, "eval.jsonl"), abs=1e-5)

    # run to a later step: the workers resume from checkpoint-3; this time with the progress bar
    more = [a for a in ddp_train_args(ddp_corpus, steps=5) if a != "--no-progress"]
    assert main(["train", "--ray-workers", "2", *more, "--out", str(tmp_path / "ray")]) == 0
    captured = capsys.readouterr()
    assert "trained tiny steps 4..5" in captured.out
    assert "train (2 Ray workers)" in captured.err and "5/5" in captured.err
    assert [json.loads(x)["step"] for x in (tmp_path / "ray" / "log.jsonl").read_text().splitlines()] == list(
        range(1, 6))


def test_ray_launch_errors_come_before_any_worker(root, ddp_corpus, tmp_path):
    from omniforge.pipeline.train_job import train_on_ray

    cfg = TrainConfig(data=root, modalities=(DEPTH, "tok_normal@224"), out=str(tmp_path / "a"), device="cpu")
    with pytest.raises(ConfigError, match="no token shards for tok_normal@224"):
        train_on_ray(cfg, workers=2)
    with pytest.raises(ConfigError, match="--ray-workers 0"):
        train_on_ray(TrainConfig(data=root, modalities=(DEPTH,), out=str(tmp_path / "b")), workers=0)
    from omniforge.jobs.cli import main

    assert main(["train", "--ray-address", "ray://nowhere:1", *ddp_train_args(ddp_corpus), "--out",
                 str(tmp_path / "c")]) == 2


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

"""`omniforge train --ray-workers N`: the 4M trainer on a Ray cluster through Ray Train's TorchTrainer.

Ray Train starts N workers (a GPU each when the cluster has GPUs), sets up their torch process group and
the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), and each worker runs the same
:func:`omniforge.model.train.train` a torchrun launch runs: DDP or FSDP, the same checkpoints, the same
exact resume. A worker that dies restarts the group (``max_failures``), and the trainer resumes from the
last checkpoint in ``--out``: on several nodes, ``--out`` must be s3:// or a directory every node sees (NFS);
a local ``--out`` that some node cannot see is refused before the workers start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any

from omniforge.errors import ConfigError, OmniforgeError
from omniforge.model._build import check_config
from omniforge.model.checkpoint import checkpoint_step, latest_checkpoint
from omniforge.model.train import TrainResult
from omniforge.model.train_config import TrainConfig
from omniforge.model.train_log import LOG, read_log
from omniforge.pipeline._job import check_shared_output
from omniforge.pipeline._ray import cluster_gpus, ensure_ray

_PATH_FIELDS = ("out", "tokenizers", "masking", "eval_data", "init_from")


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers do not run in the driver's directory."""
    def fix(path: str | None) -> str | None:
        return path if path is None or "://" in path else os.path.abspath(path)

    data = fix(cfg.data) if isinstance(cfg.data, str) else tuple(fix(p) for p in cfg.data)
    return dataclasses.replace(cfg, data=data, **{f: fix(getattr(cfg, f)) for f in _PATH_FIELDS})


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the trainer on this worker's device, in the process group Ray set up."""
    import ray.train
    import ray.train.torch

    from omniforge.model.train import train

    cfg = TrainConfig.from_dict(config["cfg"])
    cfg.device = str(ray.train.torch.get_device()) if config["use_gpu"] else "cpu"
    train(cfg, progress=False)
    ray.train.report({"done": 1})


def train_on_ray(cfg: TrainConfig, *, workers: int, ray_address: str | None = None, use_gpu: bool | None = None,
                 max_failures: int = 3, progress: bool = True) -> TrainResult:
    """Train ``cfg`` with ``workers`` Ray Train workers (use_gpu None: when the cluster has GPUs and
    ``cfg.device`` is not cpu); returns the steps run, read back from ``cfg.out``. ``progress`` draws a bar
    from the run's log.jsonl while the workers train (when ``cfg.out`` is visible here)."""
    if workers < 1:
        raise ConfigError(f"--ray-workers {workers}: give 1 or more workers")
    if max_failures < 0:
        raise ConfigError(f"--ray-max-failures {max_failures}: give 0 or more")
    cfg = _absolute(cfg)
    check_config(cfg)  # config and shard errors in one line here, not as a failed worker group
    t0 = time.perf_counter()
    ensure_ray(ray_address)
    check_shared_output(cfg.out, "--out")  # every worker writes checkpoints there; rank 0 resumes from them
    if use_gpu is None:
        use_gpu = cfg.device != "cpu" and cluster_gpus() > 0
    if cfg.device.startswith("cuda") and not use_gpu:
        raise ConfigError(f"--device {cfg.device} but the Ray cluster has no GPU: pass --device cpu or add GPU nodes")
    start = checkpoint_step(latest_checkpoint(cfg.out))
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": cfg.to_dict(), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name="omniforge-train", storage_path=os.path.join(cfg.out, "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)))
    try:
        _fit_showing_progress(trainer, os.path.join(cfg.out, LOG), start, cfg.steps, workers, progress)
    except TrainingFailedError as e:
        raise OmniforgeError(f"training failed on the Ray cluster after {max_failures} restart(s): "
                             f"{_last_line(e)}; the run keeps its checkpoints in {cfg.out}: re-run the same "
                             "command to resume") from None
    # The steps run here, from rank 0's log (empty when --out is on another node's disk).
    losses = [e for e in read_log(os.path.join(cfg.out, LOG), cfg.steps) if e["step"] > start]
    return TrainResult(out=cfg.out, steps=cfg.steps, losses=losses, seconds=time.perf_counter() - t0)


def _fit_showing_progress(trainer: Any, log_path: str, start: int, steps: int, workers: int, progress: bool) -> None:
    """trainer.fit() in a thread while this one follows the rank-0 log (step, loss, tokens/s) in a bar."""
    if not progress:
        trainer.fit()
        return
    from tqdm import tqdm

    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    offset, last = 0, None
    with tqdm(total=steps, initial=start, unit="step", desc=f"train ({workers} Ray workers)", file=sys.stderr,
              dynamic_ncols=True, smoothing=0.1) as bar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            offset, entries = _read_new(log_path, offset)
            for entry in entries:
                last = entry
            if last is not None and last["step"] > bar.n:
                bar.update(last["step"] - bar.n)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
    if "error" in outcome:
        raise outcome["error"]


def _read_new(path: str, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Complete lines of a growing JSONL file after byte ``offset``; the offset after them. A file shorter
    than ``offset`` was rewritten (a resumed run drops the lines after its checkpoint): read it again."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset, []
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    lines = data[:end].decode("utf-8").splitlines()
    return offset + end, [json.loads(line) for line in lines if line.strip()]


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__

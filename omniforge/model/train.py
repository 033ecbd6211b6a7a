"""`omniforge train`: train the 4M-21-style model (:class:`omniforge.model.fm.FourM`) on token shards.

One loop for one device and for several under ``torchrun`` (DDP, or FSDP2 ``fully_shard``; rank 0 logs and
writes). Each optimizer step takes ``grad_accum`` batches from the token loader (masking happens there, per
sample, from seeded generators), averages their losses, clips the gradient norm and applies AdamW with a
linear warm-up then a cosine decay from ``lr`` to ``final_lr``; it returns its named metrics
(:class:`~omniforge.model.metrics.StepMetrics`).

A trainer's parts each have one file: the config (:mod:`omniforge.model.train_config`), what the config builds
before the model (:mod:`omniforge.model._build`: specs, masking, launch checks), checkpoints and the run
directory layout (:mod:`omniforge.model.checkpoint`), the metrics (:mod:`omniforge.model.metrics`) and where
they go (:mod:`omniforge.model.train_log`); this module builds a run, steps, evaluates and loops.

A call on a run directory with a ``latest`` pointer resumes from that checkpoint exactly: model, optimizer,
schedule, data position and RNG, so the losses of the remaining steps equal those of an uninterrupted run
(bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omniforge._torch_run import Dist, all_reduce_sum, barrier, resolve_device, setup_distributed, warmup_cosine
from omniforge.model._build import TEXT_TOKENIZER, _check_shards, build_masking, build_specs
from omniforge.model._cli import add_train_cli as add_cli
from omniforge.model.checkpoint import (TrainState, latest_checkpoint, load_training_state, run_config,
                                        save_checkpoint)
from omniforge.model.data import DataConfig, TokenShardDataset, make_loader
from omniforge.model.fm import FourM, model_config
from omniforge.model.init_from import describe, init_model, plan_init
from omniforge.model.masking import Masker
from omniforge.model.metrics import EvalMetrics, Layout, StepMetrics, mean_loss, per_modality
from omniforge.model.train_config import TrainConfig, config_from_args
from omniforge.model.train_log import RunLog, summary

__all__ = ["TrainConfig", "TrainResult", "config_from_args", "train", "summary", "cmd_train", "main"]


@dataclass
class TrainResult:
    out: str  # the run directory
    steps: int  # the step reached (== cfg.steps)
    losses: list[dict[str, Any]] = field(default_factory=list)  # the log.jsonl entries of the steps run here
    evals: list[dict[str, Any]] = field(default_factory=list)  # the eval.jsonl entries of the steps run here
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------
# Building a run: autocast, optimizer, DDP/FSDP wrapping


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _wrap(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP or FSDP2 under torchrun. ``model`` stays the plain module whose
    (FSDP: sharded) parameters the optimizer holds.

    ``cfg.compile`` compiles each encoder and decoder block in place (regional compilation): the blocks
    hold nearly all the FLOPs, and their inputs are plain tensors whose lengths vary from batch to batch
    (dynamic shapes, one graph per block kind). The data-dependent gathering and packing around them
    stays eager; compiling the whole model would break its graph at every packing step. In place, the
    parameter names and checkpoints are those of the eager model.
    """
    if cfg.compile:
        for blk in (*model.encoder, *model.decoder):
            blk.compile(dynamic=True)
    runner: nn.Module = model
    if d.world_size > 1 and cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in (*model.encoder, *model.decoder):
            fully_shard(blk)
        fully_shard(model)
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A modality without targets in a batch leaves its head unused.
        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=True)
    return runner


# --------------------------------------------------------------------------------------------------
# One run: the step and the held-out evaluation


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {k: v.to(device, non_blocking=True) for k, v in d.items()}
            for m, d in batch.items() if not m.startswith("__")}


def _batch_tokens(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Tokens the step processed: encoder inputs plus decoder targets."""
    return int(sum(int((~d["input_mask"]).sum()) + int((~d["target_mask"]).sum())
                   for m, d in batch.items() if not m.startswith("__")))


def _sum_over_ranks(layout: Layout, values: dict[str, Any], device: torch.device, d: Dist) -> dict[str, Any]:
    """``values`` (host numbers and arrays) summed over the ranks, in one all-reduce, read back by name."""
    return layout.unpack(all_reduce_sum(layout.pack(**values).tolist(), device, d))


class _Run:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, device: torch.device, d: Dist):
        self.cfg, self.device, self.dist = cfg, device, d
        _check_shards(cfg)
        self.specs, self.text = build_specs(cfg)
        self.resume_from = latest_checkpoint(cfg.out)
        self.model_config = model_config(cfg.model)
        self.init = None  # --init-from: the model config and specs come from the source (init_from.py)
        if cfg.init_from is not None:
            self.init = plan_init(cfg.init_from, self.specs, resume_from=self.resume_from)
            self.model_config, self.specs = self.init.config, self.init.specs
        self.masking = build_masking(cfg)
        text = self.text
        masker = Masker(self.masking, self.specs, sentinel_ids=text.sentinel_ids if text else [],
                        pad_id=text.pad_id if text else 0, eos_id=text.eos_id if text else 3)
        data_cfg = DataConfig(root=cfg.data, weights=cfg.data_weights, folders=cfg.modalities,
                              batch_size=cfg.batch_size, seed=cfg.seed,
                              num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                              pin_memory=device.type == "cuda", tokenizers=cfg.tokenizers)
        self.loader = make_loader(data_cfg, masker, rank=d.rank, world_size=d.world_size)
        self.eval_data = None
        if cfg.eval_data is not None:  # read in order, unshuffled, endless: every rank runs eval_batches batches
            eval_cfg = DataConfig(root=cfg.eval_data, folders=cfg.modalities, batch_size=cfg.batch_size,
                                  seed=cfg.seed, num_workers=0, shuffle_buffer=1, tokenizers=cfg.tokenizers)
            self.eval_data = TokenShardDataset(eval_cfg, masker, rank=d.rank, world_size=d.world_size)
            self._eval_start = self.eval_data.state_dict()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
        self.model = FourM(self.model_config, self.specs)
        self.init_lines: list[str] = []
        if self.init is not None:
            fresh = [] if self.init.resumed else init_model(self.model, self.init)
            self.init_lines = describe(self.init, fresh)
        self.model = self.model.to(device)
        self.num_parameters = self.model.num_parameters()
        self.runner = _wrap(self.model, cfg, d, device)
        self.optimizer = _optimizer(self.model, cfg)
        self.state = TrainState(model=self.model, optimizer=self.optimizer, loader=self.loader, dist=d,
                                device=device)
        self.last_lr = 0.0

    def config_json(self) -> dict[str, Any]:
        tok = os.path.join(self.cfg.tokenizers, TEXT_TOKENIZER) if self.text is not None else None
        return run_config(self.cfg, self.model_config, self.specs, self.masking, tok, self.num_parameters)

    def schedule(self) -> dict[str, Any]:
        """The learning-rate schedule as the checkpoint records it."""
        c = self.cfg
        return {"kind": "warmup_cosine", "total": c.steps, "warmup": c.warmup_steps, "peak": c.lr,
                "final": c.final_lr, "last_lr": self.last_lr}

    def save(self, step: int) -> str:
        """Checkpoint after ``step`` steps (every rank calls it)."""
        return save_checkpoint(self.cfg.out, step, self.state, schedule=self.schedule(), config=self.config_json())

    def lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, total=c.steps, warmup=c.warmup_steps, peak=c.lr, final=c.final_lr)

    def step(self, step: int, batches) -> StepMetrics:
        """One optimizer step (0-based ``step``) over ``grad_accum`` batches; the metrics of step + 1."""
        cfg, d = self.cfg, self.dist
        t0 = time.perf_counter()
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        # Losses stay on the device until the step is over: one host sync per step, not one per micro-batch.
        names, roots = list(self.specs), cfg.roots
        n, mixed = len(names), len(roots) > 1
        r = len(roots) if mixed else 0
        zeros = dict(dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), **zeros)  # the micro-batch losses, summed
        ce = torch.zeros(n, **zeros)  # per modality: its micro-batch losses, summed
        # With several roots: per root and modality, the summed target-token cross-entropy and the token count.
        root_ce, root_tokens = torch.zeros(r, n, **zeros), torch.zeros(r, n, **zeros)
        batches_with, tokens = [0.0] * n, 0  # per modality: micro-batches with its targets; tokens processed
        raw = [m for m in names if self.specs[m].raw and self.specs[m].kind == "sequence"]
        cut = [0] * len(raw)  # per raw sequence folder: units its token budget cut (data.py: "__cut__")
        for micro in range(cfg.grad_accum):
            host_batch = next(batches)
            tokens += _batch_tokens(host_batch)  # counted on the host copy: no device sync
            for j, m in enumerate(raw):
                cut[j] += int(host_batch["__cut__"][m].sum())
            batch = _to_device(host_batch, self.device)
            sync = micro == cfg.grad_accum - 1 or d.world_size == 1 or cfg.strategy == "fsdp"
            ctx = contextlib.nullcontext() if sync else self.runner.no_sync()
            with ctx:
                with _autocast(self.device, cfg.dtype):
                    loss, losses, *token_losses = self.runner(batch, token_losses=mixed)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            for m, v in losses.items():
                i = names.index(m)
                ce[i] += v.detach()
                batches_with[i] += 1
            if mixed:
                source = host_batch["__source__"].to(self.device, non_blocking=True)
                for m, (token_ce, sample) in token_losses[0].items():
                    i, rows = names.index(m), source[sample]
                    root_ce[:, i].index_add_(0, rows, token_ce.double())
                    root_tokens[:, i].index_add_(0, rows, torch.ones_like(token_ce, dtype=torch.float64))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        on_device = Layout(grad_norm=(), loss=(), ce=(n,), root_ce=(r, n), root_tokens=(r, n))
        local = on_device.unpack(on_device.pack(  # the step's one device-to-host copy
            grad_norm=norm.detach(), loss=loss_sum / cfg.grad_accum, ce=ce, root_ce=root_ce,
            root_tokens=root_tokens).tolist())
        # Summed over ranks (the norm is already global).
        summed = Layout(loss=(), tokens=(), ce=(n,), batches_with=(n,), root_ce=(r, n), root_tokens=(r, n),
                        cut=(len(raw),))
        sums = _sum_over_ranks(summed, dict(loss=local["loss"], tokens=tokens, ce=local["ce"],
                                            batches_with=batches_with, root_ce=local["root_ce"],
                                            root_tokens=local["root_tokens"], cut=cut), self.device, d)
        seconds = time.perf_counter() - t0
        metrics = StepMetrics(step=step + 1, loss=sums["loss"] / d.world_size,
                              losses=per_modality(names, sums["ce"], sums["batches_with"]), lr=lr,
                              tokens_per_s=sums["tokens"] / max(seconds, 1e-9), grad_norm=local["grad_norm"])
        if mixed:
            metrics.dataset_losses = {root: mean_loss(sums["root_ce"][k], sums["root_tokens"][k])
                                      for k, root in enumerate(roots) if sums["root_tokens"][k].any()}
        if raw:
            metrics.budget_cuts = {m: int(c) for m, c in zip(raw, sums["cut"])}
        return metrics

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalMetrics:
        """Held-out loss after ``step`` steps: the first eval_batches batches of the eval root on every rank,
        with the same samples and masks at every evaluation. Each modality's loss is averaged over its target
        tokens (not over batches), then the loss over the modalities, as in training. Iterated without a
        DataLoader, so no global RNG is drawn and the training run stays exactly resumable."""
        cfg, d = self.cfg, self.dist
        names = list(self.specs)
        n = len(names)
        ce = torch.zeros(n, dtype=torch.float64, device=self.device)  # per modality: summed target-token CE
        targets = torch.zeros(n, dtype=torch.float64, device=self.device)  # per modality: target tokens
        samples = 0
        self.eval_data.load_state_dict(self._eval_start)
        batches = iter(self.eval_data)
        self.model.eval()
        try:
            for _ in range(cfg.eval_batches):
                batch = _to_device(next(batches), self.device)
                samples += next(iter(batch.values()))["input_mask"].shape[0]
                with _autocast(self.device, cfg.dtype):
                    _, losses = self.model(batch)
                for m, v in losses.items():
                    i = names.index(m)
                    count = (~batch[m]["target_mask"]).sum()
                    ce[i] += v.double() * count
                    targets[i] += count
        finally:
            self.model.train()
        on_device = Layout(ce=(n,), targets=(n,))
        local = on_device.unpack(on_device.pack(ce=ce, targets=targets).tolist())  # one device-to-host copy
        totals = _sum_over_ranks(Layout(ce=(n,), targets=(n,), samples=()), {**local, "samples": samples},
                                 self.device, d)
        return EvalMetrics(step=step, loss=mean_loss(totals["ce"], totals["targets"]),
                           losses=per_modality(names, totals["ce"], totals["targets"]), samples=int(totals["samples"]))


# --------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train (or resume, when ``<out>/latest`` exists) up to ``cfg.steps`` optimizer steps."""
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    d = setup_distributed(device.type)
    try:
        if d.main:
            os.makedirs(cfg.out, exist_ok=True)
        barrier(d)
        run = _Run(cfg, device, d)
        start = 0
        resume_from = run.resume_from
        if resume_from is not None:
            start = load_training_state(resume_from, run.state)
        if d.main:
            what = f"resuming from {resume_from} (step {start})" if resume_from else "starting"
            label = f"{cfg.model} model" if cfg.init_from is None else cfg.model_label
            print(f"omniforge train: {label}, {run.num_parameters:,} parameters, "
                  f"{len(run.specs)} modalities; {what}", file=sys.stderr, flush=True)
            for line in run.init_lines:
                print(f"omniforge train: {line}", file=sys.stderr, flush=True)
        entries, evals = _run_loop(run, start, progress)
        return TrainResult(out=cfg.out, steps=max(start, cfg.steps), losses=entries, evals=evals,
                           seconds=time.perf_counter() - t_start)
    finally:
        if d.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_loop(run: _Run, start: int, progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Steps ``start``..cfg.steps: log every step, evaluate every eval_every steps and checkpoint every
    save_every steps (both at the last step too). Returns the log and eval entries of these steps."""
    cfg, d = run.cfg, run.dist
    eval_every = cfg.eval_every or cfg.save_every
    run_log = RunLog(cfg, start, main=d.main, evaluating=run.eval_data is not None, progress=progress)
    entries: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    try:
        run.runner.train()
        batches = iter(run.loader)
        for step in range(start, cfg.steps):
            metrics = run.step(step, batches)
            entries.append(metrics.to_dict())
            run_log.step(metrics)
            done = step + 1
            if run.eval_data is not None and (done % eval_every == 0 or done == cfg.steps):
                result = run.evaluate(done)
                evals.append(result.to_dict())
                run_log.evaluation(result)
            if done % cfg.save_every == 0 or done == cfg.steps:
                run.save(done)
    finally:
        run_log.close()
    run_log.plot()
    return entries, evals


# --------------------------------------------------------------------------------------------------
# Command line


def cmd_train(args: Any) -> int:
    cfg = config_from_args(args)
    result = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(cfg, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m omniforge.model.train ARGS`` = ``omniforge train ARGS`` (handy under torchrun)."""
    import argparse

    from omniforge.errors import OmniforgeError

    parser = argparse.ArgumentParser(prog="omniforge")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except OmniforgeError as e:
        print(f"omniforge train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

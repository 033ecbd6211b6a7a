"""`omniforge tokenizer train`: train one tokenizer on label shards and report its reconstruction quality.

`train_tokenizer(cfg)` asks the modality's tokenizer kind (`kinds.py`) to train it:

- VQ-VAE and Memcodes kinds go through :func:`train_model`: labels are read from
  `<data>/<modality>/shard-*.tar` (`train_data.py`) and turned into model inputs by the kind, with a fresh
  random crop (and flip) per sample and pass for image-like labels; feature maps and global vectors are
  used as stored (they are the features of crop 0); SAM instances give one input per instance mask;
- the WordPiece kind trains the vocabulary every sequence modality shares from a plain-text modality
  (:func:`train_text`).

Training runs on one device, or on several under `torchrun` (DDP; rank 0 evaluates, logs and writes).
After every epoch the servable tokenizer and the training state are written to `<out>/<name>/`
(`train_state.py`), so a re-run continues from the next epoch. Per-epoch metrics are in
`<out>/<name>/history.jsonl`; `loss.png` and, for image-like tokenizers, `reconstruction.png` are drawn at the
end (`train_report.py`). The config is `train_config.TokenizerTrainConfig`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from omniforge._progress import Progress
from omniforge._torch_run import all_reduce_sum, barrier, resolve_device, setup_distributed, warmup_cosine, write_text
from omniforge.errors import ConfigError, NothingToTrain
from omniforge.tokenize import train_report, train_state
from omniforge.tokenize.kinds import TokenizerKind
from omniforge.tokenize.train_config import TokenizerTrainConfig, TrainResult
from omniforge.tokenize.train_data import Inputs, LabelShard, LabelStream, collate, iter_values, scan

log = logging.getLogger(__name__)

_MAX_HOLDOUT_INPUTS = 64

__all__ = ["TokenizerTrainConfig", "TrainResult", "cmd_tokenizer_train", "lr_at", "main", "summary",
           "train_model", "train_text", "train_tokenizer"]

summary = train_report.summary


def train_tokenizer(cfg: TokenizerTrainConfig, *, progress: bool = True, verbose: bool = True) -> TrainResult:
    """Train the tokenizer of `cfg.modality` on the label shards under `cfg.data`; see the module docstring.

    `verbose=False` leaves out the per-epoch lines (they still go to history.jsonl)."""
    return cfg.kind.train(cfg, progress=progress, verbose=verbose)


def lr_at(step: int, *, total: int, warmup: int, peak: float, final_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to final_ratio * peak."""
    return warmup_cosine(step, total=total, warmup=warmup, peak=peak, final=peak * final_ratio)


# --------------------------------------------------------------------------------------------------
# VQ-VAE and Memcodes tokenizers


class _LossModule(torch.nn.Module):
    """Makes `tokenizer.loss` the forward pass, so DDP sees it (and syncs gradients)."""

    def __init__(self, tokenizer: torch.nn.Module):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.tokenizer.loss(x)


def train_model(cfg: TokenizerTrainConfig, kind: TokenizerKind, *, progress: bool = True,
                verbose: bool = True) -> TrainResult:
    """Train the kind's model (VQ-VAE / Memcodes) on the modality's labels."""
    return _Trainer(cfg, kind, progress=progress, verbose=verbose).run()


class _Trainer:
    def __init__(self, cfg: TokenizerTrainConfig, kind: TokenizerKind, *, progress: bool, verbose: bool = True):
        self.cfg, self.kind = cfg, kind
        self.progress = progress
        self.verbose = verbose

    def autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self) -> TrainResult:
        cfg, kind = self.cfg, self.kind
        t_start = time.perf_counter()
        # the device first: NCCL wants each process bound to its GPU before the process group starts
        self.device = device = resolve_device(cfg.device)
        self.dist = dist_info = setup_distributed(device.type)
        try:
            self.amp = device.type == "cuda"
            mcfg = kind.config(cfg.size)
            self.inputs = Inputs(kind=kind, crop=cfg.crop)

            scanned = scan(cfg)
            train_shards, holdout_keys, n_train = self._split(scanned)
            holdout_arrays = self._holdout_arrays([s for s, _ in scanned], holdout_keys)
            holdout = kind.prepare(holdout_arrays).to(device)
            if n_train < dist_info.world_size:
                raise ConfigError(f"only {n_train} training samples for {dist_info.world_size} processes: "
                                  "label more data or use fewer processes")
            steps_per_epoch = max(1, math.ceil(n_train / (dist_info.world_size * cfg.batch_size)))
            total_steps = steps_per_epoch * cfg.epochs
            warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total_steps))

            torch.manual_seed(cfg.seed)
            model = kind.build(mcfg)
            optimizer = _optimizer(model, cfg)
            directory = cfg.directory
            start_epoch, step, history = 0, 0, []
            if not cfg.restart and train_state.has_state(directory):
                load = functools.partial(kind.load_trainable, config=mcfg) if cfg.architecture == "ml4m" else None
                model, optimizer, start_epoch, step, history = train_state.resume(
                    directory, mcfg.to_dict(), functools.partial(_optimizer, cfg=cfg), load=load,
                    architecture=cfg.architecture)
                if dist_info.main:
                    log.info("resuming %s from epoch %d (step %d)", cfg.name, start_epoch, step)
            model.to(device).train()
            _optimizer_to(optimizer, device)

            if dist_info.main:
                os.makedirs(directory, exist_ok=True)
                log.info("training %s (%s, %d parameters) on %d samples (%d held out), %d steps per epoch",
                         cfg.name, cfg.size, sum(p.numel() for p in model.parameters()), n_train,
                         len(holdout_keys), steps_per_epoch)
                if not history:
                    history.append({"epoch": 0, "step": 0, **self._evaluate(model, holdout, mcfg)})
                    if self.verbose:
                        train_report.print_epoch(history[-1], cfg.epochs, kind)

            stream = LabelStream(train_shards, self.inputs, exclude=holdout_keys, rank=dist_info.rank,
                                 world_size=dist_info.world_size, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed)
            loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                collate_fn=functools.partial(collate, kind), pin_memory=device.type == "cuda")
            wrapped: torch.nn.Module = _LossModule(model)
            if dist_info.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)

            bar = Progress(total=steps_per_epoch * (cfg.epochs - start_epoch), unit="step", desc=f"train {cfg.name}",
                           enabled=self.progress and dist_info.main)
            try:
                for epoch in range(start_epoch, cfg.epochs):
                    stream.set_epoch(epoch)
                    t0 = time.perf_counter()
                    loss_sum, n_seen, metric_sums = 0.0, 0, {}
                    batches = iter(loader)
                    for _ in range(steps_per_epoch):
                        x = next(batches).to(device, non_blocking=True)
                        lr = lr_at(step, total=total_steps, warmup=warmup, peak=cfg.lr, final_ratio=cfg.final_lr_ratio)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        with self.autocast():
                            loss, metrics = wrapped(x)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()
                        step += 1
                        loss_sum += float(loss.detach())
                        n_seen += x.shape[0]
                        for k, v in metrics.items():
                            metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
                        bar.update(1)
                    del batches
                    seconds = time.perf_counter() - t0
                    loss_total, seen_total = all_reduce_sum([loss_sum, float(n_seen)], device, dist_info)
                    if dist_info.main:
                        entry = {"epoch": epoch + 1, "step": step,
                                 "loss": loss_total / (steps_per_epoch * dist_info.world_size),
                                 **{f"train_{k}": v / steps_per_epoch for k, v in metric_sums.items() if k != "loss"},
                                 "lr": lr, "samples_per_s": seen_total / max(seconds, 1e-9),
                                 **self._evaluate(model, holdout, mcfg)}
                        history.append(entry)
                        train_state.save_checkpoint(directory, model, optimizer, epoch=epoch + 1, step=step,
                                                    history=history, cfg=cfg, kind=kind)
                        if self.verbose:
                            train_report.print_epoch(entry, cfg.epochs, kind)
                    barrier(dist_info)
            finally:
                bar.close()

            if dist_info.main:
                train_report.plot_loss(os.path.join(directory, "loss.png"), history, cfg.name)
                if kind.draws_reconstruction:
                    train_report.plot_reconstruction(os.path.join(directory, "reconstruction.png"), model, holdout,
                                                     holdout_arrays, kind, self.autocast)
            barrier(dist_info)
            epochs_done = history[-1]["epoch"] if history else cfg.epochs
            return TrainResult(directory=directory, epochs=epochs_done, steps=step, history=history,
                               seconds=time.perf_counter() - t_start)
        finally:
            if dist_info.initialized_here:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _split(self, scanned: list[tuple[LabelShard, list[str]]]) -> tuple[list[LabelShard], frozenset[str], int]:
        """Training shards, held-out keys (the last keys of the last shards) and the training item count."""
        all_keys = [k for _, keys in scanned for k in keys]
        if len(all_keys) < 2:
            raise ConfigError(f"only {len(all_keys)} {self.cfg.modality} label(s) under {self.cfg.data}: need at "
                              "least 2 (one to train on, one held out)")
        n_holdout = min(self.cfg.holdout, max(1, len(all_keys) // 4))
        holdout = frozenset(all_keys[-n_holdout:])
        train_shards = [s for s, keys in scanned if any(k not in holdout for k in keys)]
        n_train = len(all_keys) - n_holdout
        if not self.kind.one_input_per_label:  # an epoch is one pass over every model input
            n_train = sum(self.kind.count_inputs(v) for s in train_shards
                          for k, v in iter_values(s, self.inputs.ext) if k not in holdout)
            if n_train == 0:
                raise NothingToTrain(f"the {self.cfg.modality} labels under {self.cfg.data} give nothing to train the "
                                  f"{self.cfg.name} tokenizer on (every label is empty)")
        return train_shards, holdout, n_train

    def _holdout_arrays(self, shard_list: list[LabelShard], keys: frozenset[str]) -> list[np.ndarray]:
        """The fixed held-out batch as label arrays: centre crop (crop 0) of the held-out samples."""
        arrays: dict[str, list[np.ndarray]] = {}
        for shard in shard_list:
            if not shard.keys & keys:
                continue
            for key, value in iter_values(shard, self.inputs.ext, keys):
                arrays[key] = self.inputs.arrays(key, value, 0, self.cfg.crop.seed)
        flat = [a for k in sorted(arrays) for a in arrays[k]][:_MAX_HOLDOUT_INPUTS]
        if not flat:
            raise NothingToTrain(f"the held-out {self.cfg.modality} samples have nothing to evaluate on (empty "
                                 "labels)")
        return flat

    def _evaluate(self, model: torch.nn.Module, x: torch.Tensor, mcfg: Any) -> dict[str, float]:
        from omniforge.tokenize.models import codebook_stats

        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                loss, _ = model.loss(x)
                recon = model.reconstruct(x)
                ids = model.encode(x)
            out = {"heldout_loss": float(loss)}
            recon = recon.float() if recon.is_floating_point() else recon
            out.update({k: float(v) for k, v in self.kind.quality(x, recon).items()})
            out.update({k: float(v) for k, v in codebook_stats(ids, mcfg.codebook_size).items()})
            return out
        finally:
            model.train()


def _optimizer(model: torch.nn.Module, cfg: TokenizerTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)


# --------------------------------------------------------------------------------------------------
# The WordPiece vocabulary


def train_text(cfg: TokenizerTrainConfig, *, verbose: bool = True) -> TrainResult:
    """Train the shared WordPiece vocabulary on the texts of `cfg.modality` (the captions)."""
    from tokenizers import Tokenizer

    from omniforge.tokenize.text import train_wordpiece

    t0 = time.perf_counter()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one process trains, the others have nothing to do
        return TrainResult(directory=cfg.directory, epochs=0, steps=0, history=[], seconds=0.0)
    ext = cfg.kind.info.ext
    texts = [value for shard, _ in scan(cfg) for _, value in iter_values(shard, ext)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"every {cfg.modality} label under {cfg.data} is empty: nothing to train the text "
                          "tokenizer on")
    directory = cfg.directory
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    train_wordpiece(texts, vocab_size=cfg.vocab_size).save(path)

    hf = Tokenizer.from_file(path)  # measured through the saved file: what every later job loads
    unk = hf.token_to_id("[UNK]")
    encodings = hf.encode_batch(texts, add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in encodings)
    n_unk = sum(sum(1 for i in e.ids if i == unk) for e in encodings)
    entry = {"vocab_size": hf.get_vocab_size(), "captions": len(texts), "mean_tokens": n_tokens / len(texts),
             "unk_rate": n_unk / max(1, n_tokens)}
    write_text(os.path.join(directory, train_state.HISTORY), json.dumps(entry) + "\n")
    if verbose:
        print(train_report.text_line(entry), flush=True)
    return TrainResult(directory=directory, epochs=0, steps=0, history=[entry], seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# Command line


def cmd_tokenizer_train(args: Any) -> int:
    cfg = TokenizerTrainConfig(data=args.data, modality=args.modality, out=args.out, size=args.config,
                               epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               max_samples=args.max_samples, num_workers=args.num_workers, vocab_size=args.vocab_size,
                               seed=args.seed, device=args.device, restart=args.restart,
                               architecture=args.architecture)
    result = train_tokenizer(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(summary(cfg, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m omniforge.tokenize.train ARGS` = `omniforge tokenizer train ARGS` (handy under torchrun)."""
    import argparse
    import sys

    from omniforge.errors import OmniforgeError

    parser = argparse.ArgumentParser(prog="omniforge")
    from omniforge.tokenize._cli import add_cli

    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", "train", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except OmniforgeError as e:
        print(f"omniforge tokenizer train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

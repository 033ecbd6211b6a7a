"""Where the 4M trainer's metrics go, on rank 0 of the run directory (layout:
:mod:`omniforge.model.checkpoint`): ``log.jsonl`` (one :class:`~omniforge.model.metrics.StepMetrics` line per
step), ``eval.jsonl`` (one :class:`~omniforge.model.metrics.EvalMetrics` line per held-out evaluation),
TensorBoard scalars under ``tb/`` and the progress bar (or a log line) every ``log_every`` steps, ``loss.png``
at the end; and :func:`summary`, the line ``omniforge train`` prints."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from omniforge._torch_run import write_text
from omniforge.model.checkpoint import latest_checkpoint
from omniforge.model.metrics import EvalMetrics, StepMetrics

if TYPE_CHECKING:
    from omniforge.model.train import TrainResult
    from omniforge.model.train_config import TrainConfig

log = logging.getLogger("omniforge.model.train")  # the trainer's log lines keep the trainer's name

LOG = "log.jsonl"
EVAL_LOG = "eval.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tb"


def read_log(path: str, upto: int) -> list[dict[str, Any]]:
    """The entries of a JSONL log (log.jsonl, eval.jsonl) up to step ``upto``; [] when there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if e["step"] <= upto]


def plot_loss(path: str, entries: list[dict[str, Any]], evals: list[dict[str, Any]] = ()) -> None:
    """loss.png: the loss, each modality's, each data root's (when mixing) and the held-out loss by step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [e["step"] for e in entries]
    ax.plot(steps, [e["loss"] for e in entries], label="loss", linewidth=1.5)
    for m in sorted({m for e in entries for m in e["losses"]}):
        pts = [(e["step"], e["losses"][m]) for e in entries if m in e["losses"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, linewidth=0.8, alpha=0.7)
    for root in sorted({r for e in entries for r in e.get("dataset_losses", {})}):
        pts = [(e["step"], e["dataset_losses"][root]) for e in entries if root in e.get("dataset_losses", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", label=f"loss on {root}", linewidth=0.8)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="black", markersize=3,
                linewidth=1.2, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


class _TensorBoard:
    """Log entries as TensorBoard scalars (``train/<key>``, ``loss/<modality>``, ``dataset_loss/<root>``,
    ``eval/<key>``, ``eval_loss/<modality>``); a note and nothing else when TensorBoard is not installed."""

    def __init__(self, directory: str, enabled: bool):
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("TensorBoard is not installed: no TensorBoard scalars (pip install tensorboard)", file=sys.stderr)
            return
        self._writer = SummaryWriter(directory)

    def write(self, entry: dict[str, Any], group: str = "train") -> None:
        if self._writer is None:
            return
        for k, v in entry.items():
            if k == "losses":
                for m, value in v.items():
                    self._writer.add_scalar(f"loss/{m}" if group == "train" else f"{group}_loss/{m}", value,
                                            entry["step"])
            elif k == "dataset_losses":  # keyed by root: local path or s3:// URI
                for root, value in v.items():
                    self._writer.add_scalar(f"dataset_loss/{root.rstrip('/').replace('://', '/')}", value,
                                            entry["step"])
            elif isinstance(v, dict):  # keyed by folder, e.g. budget_cuts
                for name, value in v.items():
                    self._writer.add_scalar(f"{k}/{name}", value, entry["step"])
            elif k != "step":
                self._writer.add_scalar(f"{group}/{k}", v, entry["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class RunLog:
    """Rank 0's outputs of one training run from step ``start``; on the other ranks every method does nothing.

    Opening it drops the lines of steps after ``start`` from log.jsonl and eval.jsonl (a resumed run rewrites
    them). Call :meth:`close` when the loop ends, and :meth:`plot` after a loop that finished.
    """

    def __init__(self, cfg: TrainConfig, start: int, *, main: bool, evaluating: bool, progress: bool):
        self.cfg, self.main = cfg, main
        self.log_path, self.eval_path = os.path.join(cfg.out, LOG), os.path.join(cfg.out, EVAL_LOG)
        self._log_file = self._eval_file = self._tb = self._bar = None
        if not main:
            return
        logs = [self.log_path] + ([self.eval_path] if evaluating or os.path.exists(self.eval_path) else [])
        for path in logs:  # drop lines of steps after the checkpoint
            write_text(path, "".join(json.dumps(e) + "\n" for e in read_log(path, start)))
        self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._eval_file = open(self.eval_path, "a", encoding="utf-8") if evaluating else None  # noqa: SIM115
        self._tb = _TensorBoard(os.path.join(cfg.out, TENSORBOARD), cfg.tensorboard)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="train", file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.1, mininterval=0.5)

    def step(self, metrics: StepMetrics) -> None:
        """log.jsonl gets every step; TensorBoard and the bar (or the log) every log_every steps and the last."""
        if not self.main:
            return
        cfg, entry = self.cfg, metrics.to_dict()
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()
        if metrics.step % cfg.log_every == 0 or metrics.step == cfg.steps:
            self._tb.write(entry)
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{metrics.loss:.4f}", tok_s=f"{metrics.tokens_per_s:.0f}")
            else:
                log.info("step %d/%d loss %.4f lr %.3g %.0f tokens/s", metrics.step, cfg.steps, metrics.loss,
                         metrics.lr, metrics.tokens_per_s)
        if self._bar is not None:
            self._bar.update(1)

    def evaluation(self, metrics: EvalMetrics) -> None:
        if not self.main:
            return
        self._eval_file.write(json.dumps(metrics.to_dict()) + "\n")
        self._eval_file.flush()
        self._tb.write(metrics.to_dict(), group="eval")
        if self._bar is not None:
            self._bar.write(metrics.line(), file=sys.stderr)
        else:
            log.info(metrics.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for f in (self._log_file, self._eval_file):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()

    def plot(self) -> None:
        """loss.png from the whole log (the steps of earlier runs too) up to cfg.steps."""
        if not self.main:
            return
        history = read_log(self.log_path, self.cfg.steps)
        if history:
            plot_loss(os.path.join(self.cfg.out, LOSS_PLOT), history, read_log(self.eval_path, self.cfg.steps))


def summary(cfg: TrainConfig, result: TrainResult) -> str:
    """One line: steps, time, loss from first to last step run here, throughput, and where the outputs are."""
    if not result.losses:
        return f"{cfg.out} is already at step {result.steps} (nothing to train; raise --steps to continue)"
    first, last = result.losses[0], result.losses[-1]
    window = result.losses[-min(10, len(result.losses)):]
    tokens_s = sum(e["tokens_per_s"] for e in window) / len(window)
    held_out = ""
    if result.evals:
        held_out = f", held-out {result.evals[0]['loss']:.3f} -> {result.evals[-1]['loss']:.3f}"
        if len(result.evals) == 1:
            held_out = f", held-out {result.evals[0]['loss']:.3f}"
    return (f"trained {cfg.model_label} steps {first['step']}..{last['step']} in {result.seconds:.0f} s: loss "
            f"{first['loss']:.3f} -> {last['loss']:.3f}{held_out}, {tokens_s:,.0f} tokens/s; checkpoint "
            f"{latest_checkpoint(cfg.out)}, curve {os.path.join(cfg.out, LOSS_PLOT)}")

"""What `omniforge tokenizer train` prints and draws: the per-epoch line, the summary line, loss.png and
reconstruction.png."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from omniforge.tokenize.kinds import TokenizerKind
from omniforge.tokenize.train_config import TokenizerTrainConfig, TrainResult

_PLOT_SAMPLES = 4


def print_epoch(entry: dict[str, Any], epochs: int, kind: TokenizerKind) -> None:
    parts = [f"epoch {entry['epoch']}/{epochs}"]
    if "loss" in entry:
        parts.append(f"loss {entry['loss']:.4g}")
    parts.append(f"held-out loss {entry['heldout_loss']:.4g}")
    for k in kind.summary_metrics:
        if k in entry:
            parts.append(f"{k} {entry[k]:.4g}")
    parts.append(f"code usage {entry.get('code_usage', float('nan')):.1%}")
    parts.append(f"perplexity {entry.get('perplexity', float('nan')):.1f}")
    if "samples_per_s" in entry:
        parts.append(f"{entry['samples_per_s']:.1f} samples/s")
    print(" | ".join(parts), flush=True)


def text_line(entry: dict[str, Any]) -> str:
    return (f"text tokenizer: vocab {entry['vocab_size']}, {entry['captions']} captions, "
            f"{entry['mean_tokens']:.1f} tokens per caption, [UNK] rate {entry['unk_rate']:.2%}")


def summary(cfg: TokenizerTrainConfig, result: TrainResult) -> str:
    """One line saying where the tokenizer is and how well it reconstructs held-out labels."""
    last = result.history[-1] if result.history else {}
    kind = cfg.kind
    if kind.model_kind is None:  # the WordPiece vocabulary
        return (f"text tokenizer -> {os.path.join(result.directory, 'tokenizer.json')}: vocab {last['vocab_size']}, "
                f"{last['mean_tokens']:.1f} tokens per caption, [UNK] rate {last['unk_rate']:.2%}")
    scores = ", ".join(f"{k} {last[k]:.4g}" for k in kind.summary_metrics if k in last)
    return (f"{cfg.name} tokenizer -> {result.directory} ({result.epochs} epochs, {result.steps} steps, "
            f"{result.seconds:.0f} s); held-out {scores}, code usage {last.get('code_usage', float('nan')):.1%}, "
            f"perplexity {last.get('perplexity', float('nan')):.1f}")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def plot_loss(path: str, history: list[dict[str, Any]], name: str) -> None:
    fig = _figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    trained = [h for h in history if "loss" in h]
    ax.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], "o-", label="train loss")
    ax.plot([h["epoch"] for h in history], [h["heldout_loss"] for h in history], "s--", label="held-out loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if all(h["heldout_loss"] > 0 for h in history) and all(h["loss"] > 0 for h in trained):
        ax.set_yscale("log")
    ax.set_title(f"{name} tokenizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def plot_reconstruction(path: str, model: torch.nn.Module, x: torch.Tensor, label_arrays: list[np.ndarray],
                        kind: TokenizerKind, autocast: Any) -> None:
    """Held-out labels (top row) above what the tokenizer reconstructs from their tokens (bottom row)."""
    from omniforge._render import pca_rgb

    x = x[:_PLOT_SAMPLES]
    model.eval()
    with torch.no_grad(), autocast():
        recon = model.reconstruct(x)
    model.train()
    recon = recon.float() if recon.is_floating_point() else recon
    labels, recons = label_arrays[: len(x)], kind.restore(recon.cpu())
    n = len(labels)
    fig = _figure(max(2.6 * n, 5.2), 5.4)
    axes = fig.subplots(2, n, squeeze=False)
    for i, (a, b) in enumerate(zip(labels, recons)):
        a, b = np.asarray(a), np.asarray(b)
        if kind.info.draw == "features":  # one projection for both, so colours compare
            both = pca_rgb(np.concatenate([a.astype(np.float32), b.astype(np.float32)], axis=0))
            a, b = both[: a.shape[0]], both[a.shape[0]:]
        for row, arr in ((0, a), (1, b)):
            ax = axes[row][i]
            _show(ax, arr, kind, reference=a)
            ax.set_axis_off()
            ax.set_title(("label" if row == 0 else "reconstruction") + f" {i}", fontsize=9)
    fig.suptitle(f"{kind.artifact.folder}: held-out labels vs reconstructions")
    fig.tight_layout()
    fig.savefig(path)


def _show(ax: Any, arr: np.ndarray, kind: TokenizerKind, reference: np.ndarray) -> None:
    if kind.info.draw == "semseg":
        ax.imshow(np.asarray(arr) % 20, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    elif arr.ndim == 3 and arr.shape[-1] == 3:
        img = arr if arr.dtype == np.uint8 else np.clip(arr.astype(np.float32), 0, None)
        if img.dtype != np.uint8 and img.max() > 1:
            img = img / max(float(np.asarray(reference, dtype=np.float32).max()), 1e-6)
        ax.imshow(np.clip(img, 0, 1) if img.dtype != np.uint8 else img)
    else:
        arr = np.squeeze(arr).astype(np.float32)
        ref = np.asarray(reference, dtype=np.float32)
        cmap = "turbo" if kind.info.draw == "heat" else "gray"
        ax.imshow(arr, cmap=cmap, vmin=float(ref.min()), vmax=float(ref.max()) if ref.max() > ref.min() else None)

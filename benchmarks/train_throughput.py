"""Training throughput of the 4M-style trainer: tokens/s, samples/s, model FLOP/s (MFU on CUDA), and the
token loader's samples/s against what a training step consumes.

On a synthetic token corpus (rgb label JPEGs + crop_settings for the raw-pixel rgb@224 input, random
tok_rgb@224 / tok_depth@224 ids, WordPiece tok_caption rows) the script measures, in one run:

1. loader only: batches/s of ``make_loader`` with the trainer's DataConfig and masker, no model;
2. trainer, end to end: the trainer's own ``_Run.step`` fed by the live loader (as ``train()`` runs it),
   ``--warmup`` untimed steps, then ``--steps`` steps timed with ``time.perf_counter()`` (CUDA synchronized);
3. trainer, model only: the same ``_Run.step`` fed with batches already in (CPU) memory, so the rate is
   what the model step can consume; FLOPs per step counted with ``torch.utils.flop_counter.FlopCounterMode``
   on one forward + backward of each of those batches (optimizer not counted), cross-checked analytically.

Ratios: loader / model-only samples/s (goal on GPU >= 5), end-to-end / model-only, and on CUDA the MFU
(goal for B in bf16 >= 40%).

    python benchmarks/train_throughput.py --model tiny --steps 20 --warmup 3 --num-workers 1      # CPU
    python benchmarks/train_throughput.py --model B --batch-size 64 --steps 50 --num-workers 8    # GPU
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RGB_PIXELS, TOK_RGB, TOK_DEPTH, TOK_CAPTION = "rgb@224", "tok_rgb@224", "tok_depth@224", "tok_caption"
DEFAULT_MODALITIES = f"{RGB_PIXELS},{TOK_RGB},{TOK_DEPTH},{TOK_CAPTION}"
IMAGE_SIDE = 256  # default side of the square label images; the loader resizes each crop to 224
N_CROPS = 2
H100_BF16_DENSE_TFLOPS = 989.0
WORDS = ("a the small large red green blue white black old young happy wooden metal glass dog cat man woman "
         "child bird horse car bike boat train plane table chair sofa bed window door street road river lake "
         "mountain tree flower garden kitchen room beach sky cloud sun night morning sitting standing running "
         "riding holding looking eating near under over beside behind in on with of and two three several "
         "picture photo view close-up of-the").split()


# --------------------------------------------------------------------------------------------------
# Synthetic corpus


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _photos() -> list[np.ndarray]:
    """A few real photos (scikit-image samples) when available, else smooth random images."""
    try:
        from skimage import data

        return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except Exception:  # noqa: BLE001 - any failure: fall back to synthetic images
        from PIL import Image

        rng = np.random.default_rng(0)
        out = []
        for _ in range(4):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            out.append(np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC)))
        return out


def _jpg(photo: np.ndarray, i: int, size: int) -> bytes:
    """A size x size JPEG: a shifted crop of one photo, plus mild noise so that no two are identical."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = min(h, w) * 3 // 4
    dy, dx = (i * 13) % (h - side + 1), (i * 29) % (w - side + 1)
    img = Image.fromarray(photo[dy:dy + side, dx:dx + side]).resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.int16)
    arr = arr + np.random.default_rng(i).integers(-8, 9, arr.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _crops(rng: np.random.Generator, size: int) -> np.ndarray:
    """int32 (N_CROPS, 5) rows (top, left, h, w, hflip), square crops of 62.5% to 100% of the side."""
    rows = []
    for _ in range(N_CROPS):
        side = int(rng.integers(size * 5 // 8, size + 1))
        top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
        rows.append([top, left, side, side, int(rng.integers(2))])
    return np.array(rows, dtype=np.int32)


def _captions(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 40)))) for _ in range(n)]


def build_corpus(root: str, tokenizers: str, shards_n: int, keys_per_shard: int,
                 image_size: int = IMAGE_SIDE) -> dict[str, int]:
    """Write the label + token shards and the text tokenizer. Returns folder -> vocabulary used for ids."""
    from omniforge import shards
    from omniforge.modalities import MODALITIES
    from omniforge.tokenize.text import train_wordpiece

    captions = _captions(48)
    tok = train_wordpiece(captions * 4, vocab_size=8000)
    os.makedirs(os.path.join(tokenizers, "text"), exist_ok=True)
    tok.save(os.path.join(tokenizers, "text", "tokenizer.json"))
    vocab = {m.token_modality: m.vocab_size for m in MODALITIES.values() if m.vocab_size}
    caption_len = next(m.num_tokens for m in MODALITIES.values() if m.token_modality == TOK_CAPTION)
    photos = _photos()
    for s in range(shards_n):
        rng = np.random.default_rng([7, s])
        keys = [f"s{s:04d}-k{k:04d}" for k in range(keys_per_shard)]
        members: dict[str, list[tuple[str, bytes]]] = {
            "rgb": [], shards.CROP_SETTINGS: [], TOK_RGB: [], TOK_DEPTH: [], TOK_CAPTION: []}
        for k, key in enumerate(keys):
            i = s * keys_per_shard + k
            members["rgb"].append((f"{key}.jpg", _jpg(photos[i % len(photos)], i, image_size)))
            members[shards.CROP_SETTINGS].append((f"{key}.npy", _npy(_crops(rng, image_size))))
            for folder in (TOK_RGB, TOK_DEPTH):
                ids = rng.integers(0, vocab[folder], (N_CROPS, 196)).astype(np.int16)
                members[folder].append((f"{key}.npy", _npy(ids)))
            row = tok.encode_units([captions[i % len(captions)]], caption_len)
            members[TOK_CAPTION].append((f"{key}.npy", _npy(np.stack([row] * N_CROPS))))
        for folder, items in members.items():
            shards.write_tar(shards.tar_uri(root, folder, s), items)
            shards.write_status(shards.status_uri(root, folder, s), [{"key": k, "ok": True} for k in keys])
    return {"text_vocab": tok.vocab_size, **{f: vocab[f] for f in (TOK_RGB, TOK_DEPTH)}}


# --------------------------------------------------------------------------------------------------
# FLOPs


def _flop_mapping() -> dict:
    """FlopCounterMode formulas for the CPU SDPA kernels, which torch's registry lacks (it counts the CUDA
    flash / efficient / cudnn kernels only), so that CPU counts include attention too."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, q, k, v)

        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def counted_flops(run, batch_cpu, train_mod) -> int:
    """FLOPs of one forward + backward of the trainer's model on one batch (FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = train_mod._to_device(batch_cpu, run.device)
    model = run.model  # the plain module (a compiled runner would be traced, not counted)
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        with train_mod._autocast(run.device, run.cfg.dtype):
            loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return int(counter.get_total_flops())


def batch_shapes(batch, specs) -> dict[str, float]:
    """Real and padded token counts of one batch, as the model computes them (fm.py: the encoder pads every
    sample to the batch's longest input; the decoder packs each sample's targets across modalities and pads
    to the batch's longest target count)."""
    b = next(iter(batch.values()))["input_mask"].shape[0]
    n_in = np.zeros(b, dtype=np.int64)
    n_pix_max = pix_real = 0
    t_real: dict[str, np.ndarray] = {}
    for m, d in batch.items():
        if m.startswith("__"):
            continue
        vis = (~d["input_mask"].bool()).sum(dim=1).numpy()
        n_in += vis
        if specs[m].kind == "pixels":
            n_pix_max, pix_real = max(n_pix_max, int(vis.max())), pix_real + int(vis.sum())
        if not specs[m].input_only:
            tg = (~d["target_mask"].bool()).sum(dim=1).numpy()
            if tg.max() > 0:
                t_real[m] = tg
    m_pad = int(sum(t_real.values()).max()) if t_real else 0  # targets packed per sample across modalities
    return {"B": b, "N_in": max(int(n_in.max()), 1), "in_real": int(n_in.sum()), "n_in": n_in,
            "M": m_pad, "tgt_real": int(sum(int(t.sum()) for t in t_real.values())),
            "t_real": t_real, "n_pix": n_pix_max, "pix_real": pix_real}


def analytic_flops(shape: dict, model_cfg, specs) -> tuple[float, float]:
    """(computed, useful) FLOPs of forward + backward (x3 of forward), from layer shapes.

    computed: with the padded sizes the model actually runs (B x N_in encoder slots, B x M decoder slots,
    dense M x M and M x N_in attention); useful: only real tokens (per-sample lengths), no padding."""
    d, le, ld = model_cfg.dim, model_cfg.encoder_depth, model_cfg.decoder_depth
    hidden = int(d * model_cfg.mlp_ratio)
    mlp = 2 * (3 * d * int(2 * hidden / 3) if model_cfg.swiglu else 2 * d * hidden)  # FLOPs per token
    enc_tok = le * (2 * 4 * d * d + mlp) + 2 * d * d  # qkv + proj + mlp per layer; context_proj once
    dec_tok = ld * (2 * 6 * d * d + mlp)  # self qkv + proj, cross q + proj, mlp
    kv_tok = ld * 2 * 2 * d * d  # cross-attention k/v projection of each encoder token
    patch = 2 * 768 * d
    heads = sum(2 * d * specs[m].vocab_size * int(t.sum()) for m, t in shape["t_real"].items())
    b, n, m = shape["B"], shape["N_in"], shape["M"]
    computed = (b * n * (enc_tok + kv_tok) + b * m * dec_tok + b * shape["n_pix"] * patch
                + le * b * 4 * n * n * d + ld * b * 4 * d * (m * m + m * n) + heads)
    n_s = shape["n_in"].astype(np.float64)
    m_s = sum(t.astype(np.float64) for t in shape["t_real"].values()) if shape["t_real"] else np.zeros(b)
    useful = (float(n_s.sum()) * (enc_tok + kv_tok) + float(m_s.sum()) * dec_tok + shape["pix_real"] * patch
              + le * 4 * d * float((n_s ** 2).sum()) + ld * 4 * d * float((m_s ** 2 + m_s * n_s).sum()) + heads)
    return 3.0 * computed, 3.0 * useful


def rule_of_thumb_flops(model, shape: dict) -> float:
    """6 x (encoder params x input tokens + decoder params x target tokens), non-embedding params only."""
    enc = sum(p.numel() for p in model.encoder.parameters()) + sum(p.numel() for p in model.context_proj.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    return 6.0 * (enc * shape["in_real"] + dec * shape["tgt_real"])


# --------------------------------------------------------------------------------------------------
# Measurements


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_loader(cfg, warmup: int, batches: int) -> dict[str, float]:
    """Loader only: the trainer's DataConfig and masker (built as _Run builds them), no model."""
    from omniforge.model.data import DataConfig, make_loader
    from omniforge.model.masking import Masker
    from omniforge.model._build import build_masking, build_specs

    specs, text = build_specs(cfg)
    masker = Masker(build_masking(cfg), specs, sentinel_ids=text.sentinel_ids if text else [],
                    pad_id=text.pad_id if text else 0, eos_id=text.eos_id if text else 3)
    data_cfg = DataConfig(root=cfg.data, folders=cfg.modalities, batch_size=cfg.batch_size, seed=cfg.seed,
                          num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer)
    loader = make_loader(data_cfg, masker, rank=0, world_size=1)
    t_start = time.perf_counter()
    it = iter(loader)
    try:
        next(it)
        first = time.perf_counter() - t_start
        for _ in range(warmup - 1):
            next(it)
        samples, t0 = 0, time.perf_counter()
        for _ in range(batches):
            samples += next(it)[cfg.modalities[0]]["input_mask"].shape[0]
        seconds = time.perf_counter() - t0
    finally:
        it.close()  # shuts the DataLoader workers down
    return {"samples_per_s": samples / seconds, "batches_per_s": batches / seconds, "seconds": seconds,
            "batches": batches, "first_batch_s": first}


class _Counting:
    """Wraps the batch iterator handed to _Run.step: counts samples and trainer tokens of what it yields."""

    def __init__(self, it, train_mod):
        self.it, self.train_mod = it, train_mod
        self.samples = self.tokens = 0

    def __next__(self):
        batch = next(self.it)
        real = {m: d for m, d in batch.items() if not m.startswith("__")}
        self.samples += next(iter(real.values()))["input_mask"].shape[0]
        self.tokens += self.train_mod._batch_tokens(real)  # the trainer's definition: inputs + targets
        return batch

    def __iter__(self):
        return self


def timed_steps(run, batches: _Counting, start: int, warmup: int, steps: int) -> dict[str, float]:
    """``warmup`` untimed steps, then ``steps`` steps timed as a block."""
    step = start
    for _ in range(warmup):
        run.step(step, batches)
        step += 1
    _sync(run.device)
    s0, k0 = batches.samples, batches.tokens
    per_step, logged = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        ts = time.perf_counter()
        metrics = run.step(step, batches)  # its one host copy synchronizes with the device every step
        per_step.append(time.perf_counter() - ts)
        logged.append(metrics.tokens_per_s)
        step += 1
    _sync(run.device)
    seconds = time.perf_counter() - t0
    samples, tokens = batches.samples - s0, batches.tokens - k0
    return {"seconds": seconds, "steps": steps, "samples": samples, "tokens": tokens,
            "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds / steps,
            "step_s_median": statistics.median(per_step), "logged_tokens_per_s_median": statistics.median(logged),
            "loss": metrics.loss, "next_step": step}


# --------------------------------------------------------------------------------------------------


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP" if x < 1e12 else f"{x / 1e12:,.3f} TFLOP"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tiny | B | L | XL (default: B on CUDA, tiny on CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU (the trainer's rule)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (each of the two trainer phases)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed phase")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="loader worker processes (default: cores - 1, at most 8)")
    ap.add_argument("--shards", type=int, default=None, help="default: max(4, 2 x workers)")
    ap.add_argument("--keys-per-shard", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=IMAGE_SIDE,
                    help="side of the square rgb label JPEGs (omniforge label stores a shorter side of 512)")
    ap.add_argument("--modalities", default=DEFAULT_MODALITIES,
                    help="folders to train, among those built: rgb@224, tok_rgb@224, tok_depth@224, tok_caption")
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--target-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (TrainConfig.compile)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"peak dense TFLOP/s of the accelerator for MFU (default on CUDA: "
                         f"{H100_BF16_DENSE_TFLOPS:g}, H100/H200 bf16 dense)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--work", default=None, help="work directory (kept; its corpus is reused when it matches)")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        ap.error("need --steps >= 1, --warmup >= 0 and --batch-size >= 1")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    import torch

    from omniforge._torch_run import Dist, resolve_device
    from omniforge.model import train as train_mod
    from omniforge.model.train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model_name = args.model or ("B" if device.type == "cuda" else "tiny")
    workers = args.num_workers if args.num_workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    n_shards = args.shards or max(4, 2 * max(1, workers))
    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="omniforge-bench-train-"))
    root, toks = str(work / "tokens"), str(work / "tokenizers")
    marker = work / "corpus.json"
    wanted = {"shards": n_shards, "keys_per_shard": args.keys_per_shard, "image_size": args.image_size,
              "version": 1}
    try:
        t0 = time.perf_counter()
        if marker.exists() and json.loads(marker.read_text()).get("params") == wanted:
            vocab = json.loads(marker.read_text())["vocab"]
            print(f"corpus: reusing {root}")
        else:
            shutil.rmtree(work / "tokens", ignore_errors=True)
            vocab = build_corpus(root, toks, n_shards, args.keys_per_shard, args.image_size)
            marker.write_text(json.dumps({"params": wanted, "vocab": vocab}))
            print(f"corpus: {n_shards} shards x {args.keys_per_shard} keys, {args.image_size} px JPEGs, "
                  f"{N_CROPS} crops, "
                  f"built in {time.perf_counter() - t0:.1f} s under {work}")

        cfg = TrainConfig(data=root, modalities=modalities, out=str(work / "run"), tokenizers=toks,
                          model=model_name, input_tokens=args.input_tokens, target_tokens=args.target_tokens,
                          steps=10 ** 9, batch_size=args.batch_size, warmup_steps=100, device=str(device),
                          dtype=args.dtype, compile=args.compile, num_workers=workers, tensorboard=False)
        use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        print(f"device: {device}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores; "
              f"dtype {'bf16 autocast' if use_bf16 else 'fp32'}")

        # 1. loader only
        lw = max(1, workers)
        loader_batches = max(args.steps, 4 * lw, -(-256 // args.batch_size))  # >= 256 samples timed
        loader = measure_loader(cfg, warmup=args.warmup + 2 * lw, batches=loader_batches)
        print(f"loader only: {loader['samples_per_s']:,.1f} samples/s ({loader['batches_per_s']:.2f} batches/s of "
              f"{args.batch_size}, {workers} worker(s), {loader_batches} batches timed; first batch after "
              f"{loader['first_batch_s']:.1f} s)")

        # 2. trainer, end to end (live loader)
        torch.manual_seed(0)
        run = train_mod._Run(cfg, device, Dist())
        run.runner.train()
        print(f"model: {model_name}, {run.num_parameters:,} parameters (dim {run.model_config.dim}, "
              f"{run.model_config.encoder_depth}+{run.model_config.decoder_depth} layers); modalities "
              f"{', '.join(modalities)}; text vocab {vocab['text_vocab']}")
        live_gen = iter(run.loader)
        live = _Counting(live_gen, train_mod)
        e2e = timed_steps(run, live, 0, args.warmup, args.steps)
        print(f"trainer end to end: {e2e['tokens_per_s']:,.0f} tokens/s, {e2e['samples_per_s']:,.1f} samples/s, "
              f"{e2e['step_s'] * 1e3:,.1f} ms/step (median {e2e['step_s_median'] * 1e3:,.1f}); trainer-logged "
              f"median {e2e['logged_tokens_per_s_median']:,.0f} tokens/s; loss {e2e['loss']:.3f}")

        # 3. trainer, model only (batches in memory), and FLOPs of those very batches
        n_cached = max(1, min(args.steps, 8))
        cached = [next(live_gen) for _ in range(n_cached)]
        live_gen.close()  # stop the loader workers: nothing else runs during the model-only phase
        del live, live_gen
        specs = run.specs
        shapes = [batch_shapes(b, specs) for b in cached]
        flops = [counted_flops(run, b, train_mod) for b in cached]
        computed_useful = [analytic_flops(s, run.model_config, specs) for s in shapes]
        thumb = [rule_of_thumb_flops(run.model, s) for s in shapes]
        replay = _Counting(itertools.cycle(cached), train_mod)
        model_only = timed_steps(run, replay, e2e["next_step"], args.warmup, args.steps)
        # The timed steps cycled through the cached batches from a known offset: exact FLOPs of those steps.
        offset = args.warmup % n_cached
        order = [(offset + i) % n_cached for i in range(args.steps)]
        flops_per_step = sum(flops[i] for i in order) / args.steps
        analytic_per_step = sum(computed_useful[i][0] for i in order) / args.steps
        useful_per_step = sum(computed_useful[i][1] for i in order) / args.steps
        thumb_per_step = sum(thumb[i] for i in order) / args.steps
        tflops_model = flops_per_step / model_only["step_s"] / 1e12
        tflops_e2e = flops_per_step / e2e["step_s"] / 1e12
        enc_slots = sum(s["B"] * s["N_in"] for s in shapes)
        dec_slots = sum(s["B"] * s["M"] for s in shapes)
        in_real = sum(s["in_real"] for s in shapes)
        tgt_real = sum(s["tgt_real"] for s in shapes)
        print(f"trainer model only: {model_only['tokens_per_s']:,.0f} tokens/s, "
              f"{model_only['samples_per_s']:,.1f} samples/s, {model_only['step_s'] * 1e3:,.1f} ms/step "
              f"(median {model_only['step_s_median'] * 1e3:,.1f})")

        peak = args.peak_tflops
        if device.type == "cuda" and peak is None:
            peak = H100_BF16_DENSE_TFLOPS
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None

        print()
        print("=" * 78)
        print("summary")
        print(f"  command                  {command}")
        print(f"  device                   {device}{f' ({gpu})' if gpu else ''}, "
              f"{'bf16 autocast' if use_bf16 else 'fp32'}, {torch.get_num_threads()} torch threads"
              f"{', compiled' if args.compile else ''}")
        print(f"  model                    {model_name}, {run.num_parameters:,} params; batch {args.batch_size}; "
              f"budgets {args.input_tokens} in / {args.target_tokens} target tokens per sample")
        print(f"  timing                   perf_counter around {args.steps} steps after {args.warmup} warm-up "
              f"step(s){' (cuda synchronized)' if device.type == 'cuda' else ''}; not the logged per-step figure")
        print(f"  tokens per step          {e2e['tokens'] / args.steps:,.0f} (encoder inputs + decoder targets, "
              f"as the trainer counts)")
        print(f"  padding                  encoder slots {enc_slots / max(in_real, 1):.2f}x real inputs, decoder "
              f"slots {dec_slots / max(tgt_real, 1):.2f}x real targets (over {n_cached} batches)")
        print("  end to end (live loader)")
        print(f"    tokens/s               {e2e['tokens_per_s']:,.0f}   (trainer-logged median "
              f"{e2e['logged_tokens_per_s_median']:,.0f})")
        print(f"    samples/s              {e2e['samples_per_s']:,.1f}")
        print(f"    step time              {e2e['step_s'] * 1e3:,.1f} ms")
        print("  model only (batches in memory)")
        print(f"    tokens/s               {model_only['tokens_per_s']:,.0f}   (trainer-logged median "
              f"{model_only['logged_tokens_per_s_median']:,.0f})")
        print(f"    samples/s              {model_only['samples_per_s']:,.1f}")
        print(f"    step time              {model_only['step_s'] * 1e3:,.1f} ms")
        print(f"  loader only              {loader['samples_per_s']:,.1f} samples/s ({workers} worker(s), "
              f"{loader['batches']} batches timed)")
        print(f"  FLOPs per step           {_fmt_flops(flops_per_step)} (FlopCounterMode, fwd+bwd; "
              f"optimizer not counted)")
        print(f"    analytic, computed     {_fmt_flops(analytic_per_step)} "
              f"({analytic_per_step / flops_per_step:.2f}x the counter)")
        print(f"    analytic, no padding   {_fmt_flops(useful_per_step)} "
              f"({useful_per_step / flops_per_step:.2f}x the counter)")
        print(f"    6 x params x tokens    {_fmt_flops(thumb_per_step)} "
              f"({thumb_per_step / flops_per_step:.2f}x the counter)")
        print(f"  achieved TFLOP/s         {tflops_model:.3f} model only, {tflops_e2e:.3f} end to end")
        if device.type == "cuda":
            print(f"  peak used                {peak:g} TFLOP/s ({gpu}; --peak-tflops to change"
                  f"{'; NB: a bf16 peak with fp32 compute' if not use_bf16 and args.peak_tflops is None else ''})")
            print(f"  MFU                      {100 * tflops_model / peak:.1f}% model only, "
                  f"{100 * tflops_e2e / peak:.1f}% end to end (goal for B bf16: >= 40%)")
            print(f"  max GPU memory           {mem:.1f} GiB")
        else:
            print("  MFU                      (not reported on CPU)")
        ratio = loader["samples_per_s"] / model_only["samples_per_s"]
        print(f"  ratio loader / step      {ratio:.2f}  (loader samples/s over model-only samples/s; goal on "
              f"GPU >= 5)")
        print(f"  ratio e2e / model only   {e2e['samples_per_s'] / model_only['samples_per_s']:.2f}")
        print("=" * 78)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

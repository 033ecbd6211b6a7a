"""Small builders several test modules share (imported by tests, not collected): shard members' bytes, label
shards written as the label job commits them, depth maps to train tokenizers on, a tokenizer training config, a
tiny FourM, and the token corpus and flags of the torchrun / Ray Train runs (tests/conftest.py's torchrun_ddp)."""

from __future__ import annotations

import io

import numpy as np

# ------------------------------------------------------------------------------------------- shard members


def npy_bytes(arr: np.ndarray) -> bytes:
    """`arr` as a .npy member (np.save)."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def jpg_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as a .jpg member (quality 95)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_label_shards(root: str, modality: str, ext: str, values: dict[str, object], *,
                       failed: tuple[str, ...] = (), per_shard: int = 6) -> None:
    """Label shards as the label job commits them: sorted keys, `per_shard` a shard, members, then the _status
    table (failed rows have no member)."""
    from omniforge import codecs, shards

    keys = sorted(list(values) + list(failed))
    for shard, start in enumerate(range(0, len(keys), per_shard)):
        chunk = keys[start:start + per_shard]
        shards.write_tar(shards.tar_uri(root, modality, shard),
                         [(f"{k}.{ext}", codecs.encode(ext, values[k])) for k in chunk if k in values])
        shards.write_status(shards.status_uri(root, modality, shard), [
            {"key": k, "ok": k in values, "error_type": None if k in values else "teacher_error",
             "error_message": None if k in values else "boom", "fingerprint": "test", "seconds": 0.0}
            for k in chunk])


# ------------------------------------------------------------------------------------------ tokenizer training

DEPTH_SAMPLES = 12  # blob_depth_labels: img000 .. img011, and img900 failed


def blob_depth(rng: np.random.Generator, h: int = 64, w: int = 80) -> np.ndarray:
    """A smooth relative depth map: a few Gaussian blobs, scaled to 0..65535 like the label job's."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.zeros((h, w), np.float32)
    for _ in range(3):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 25)
        d += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    d = (d - d.min()) / (d.max() - d.min() + 1e-6)
    return (d * 65535).astype(np.uint16)


def blob_depth_labels(root: str) -> str:
    """depth label shards under `root`: DEPTH_SAMPLES blob maps (64 x 80, seed 0) in shards of 6, and one failed
    sample (img900, in the last shard)."""
    rng = np.random.default_rng(0)
    write_label_shards(root, "depth", "png", {f"img{i:03d}": blob_depth(rng) for i in range(DEPTH_SAMPLES)},
                       failed=("img900",))
    return root


def tokenizer_train_config(root: str, out: str, **overrides):
    """A TokenizerTrainConfig for a tiny depth tokenizer on `root` (3 epochs of batch 4, lr 1e-3, seed 0)."""
    from omniforge.tokenize.train import TokenizerTrainConfig

    base = dict(data=root, modality="depth", out=out, size="tiny", epochs=3, batch_size=4, lr=1e-3, seed=0)
    return TokenizerTrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------- FourM


def tiny_fourm(specs: dict):
    """A seeded (torch.manual_seed(0)) 32-wide FourM of one encoder and one decoder block over `specs`, in eval
    mode."""
    import torch

    from omniforge.model.fm import FourM, ModelConfig

    torch.manual_seed(0)
    return FourM(ModelConfig(dim=32, encoder_depth=1, decoder_depth=1, heads=2), specs).eval()


def random_ids(spec, seed: int = 1) -> np.ndarray:
    """`spec.num_tokens` random ids below `spec.vocab_size` (a ModalitySpec), from seed `seed`."""
    return np.random.default_rng(seed).integers(0, spec.vocab_size, spec.num_tokens)


# ------------------------------------------------------------------------------------------ torchrun runs

DDP_DEPTH, DDP_CAPTION = "tok_depth@224", "tok_caption"
DDP_CAPTIONS = ["a dog on a red sofa", "two cats under a table", "a man riding a bike", "a bowl of green apples"]


def write_ddp_corpus(base) -> tuple[str, str]:
    """(token root, tokenizers dir) under `base`: 4 shards x 6 keys, each key's tok_depth@224 tokens its own
    ((position + k) % 32, 2 crops) and its tok_caption one of DDP_CAPTIONS, so that runs on another shard split
    or other seeds log other losses."""
    import os

    from omniforge import codecs, shards
    from omniforge.tokenize.text import train_wordpiece

    root, toks = os.path.join(base, "tokens"), os.path.join(base, "tokenizers")
    tok = train_wordpiece(DDP_CAPTIONS * 5, vocab_size=5000)
    os.makedirs(os.path.join(toks, "text"))
    tok.save(os.path.join(toks, "text", "tokenizer.json"))
    for s in range(4):
        keys = [f"s{s:02d}-k{k:02d}" for k in range(6)]
        depth = [np.tile((np.arange(196) + k) % 32, (2, 1)).astype(np.int16) for k in range(6)]
        caption = [np.stack([tok.encode_units([DDP_CAPTIONS[(s + k) % 4]], 256)] * 2) for k in range(6)]
        for folder, arrays in ((DDP_DEPTH, depth), (DDP_CAPTION, caption)):
            shards.write_tar(shards.tar_uri(root, folder, s),
                             [(f"{key}.npy", codecs.encode("npy", a)) for key, a in zip(keys, arrays)])
            shards.write_status(shards.status_uri(root, folder, s), [{"key": k, "ok": True} for k in keys])
    return root, toks


def ddp_train_args(corpus: tuple[str, str], steps: int = 3) -> list[str]:
    """`omniforge train` flags of the torchrun / Ray Train runs on write_ddp_corpus's corpus (no --out): `steps`
    steps of batch 2, checkpoints every 2, held-out loss every 2 steps on 2 batches."""
    root, toks = corpus
    return ["--data", root, "--modalities", f"{DDP_DEPTH},{DDP_CAPTION}", "--tokenizers", toks, "--steps", str(steps),
            "--save-every", "2", "--batch-size", "2", "--input-tokens", "16", "--target-tokens", "16", "--lr", "1e-3",
            "--warmup-steps", "1", "--device", "cpu", "--no-tensorboard", "--no-progress", "--eval-data", root,
            "--eval-every", "2", "--eval-batches", "2"]


def torchrun_train(corpus: tuple[str, str], out, strategy: str) -> None:
    """ddp_train_args under `torchrun --standalone --nproc_per_node 2` (one OpenMP thread a process) into `out`."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "omniforge.model.train", *ddp_train_args(corpus), "--out", str(out), "--strategy", strategy]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

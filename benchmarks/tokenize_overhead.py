"""Tokenize-job overhead and tokenizer training speed.

1. Tokens/s of the full `omniforge tokenize` job (rgb and depth at the `base` tokenizer size, ViT-B
   encoders with random weights, plus captions) divided by tokens/s of a bare loop that encodes the same
   crops, already decoded, cropped and batched, with the same tokenizers on the same device and thread
   count. The job's time includes everything: Ray Data start, loading the tokenizers in the worker,
   reading and decoding the label shards, cropping, serializing, writing and committing the token shards.
2. Samples/s of `omniforge tokenizer train` for a tiny and a base depth tokenizer.

    python benchmarks/tokenize_overhead.py [--images 96] [--crops 2] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from label_overhead import _write_corpus


def _label(corpus: Path, root: str) -> None:
    from omniforge.pipeline import LabelConfig, label, parse_weights

    label(LabelConfig(input=str(corpus), output=root, modalities=("rgb", "caption", "depth"),
                      weights=parse_weights("tiny"), shard_size=32, batch_size=16, progress=False))


def _tokenizers(root: str, out: Path, device: str) -> None:
    import torch

    from omniforge.tokenize import text
    from omniforge.tokenize.kinds import kind_for

    torch.manual_seed(0)
    for name in ("rgb", "depth"):
        kind = kind_for(name)
        kind.save(kind.build(kind.config("base")), str(out / kind.artifact.folder))
    captions = [f"a photo number {i} of a cat, a rocket, coffee or an astronaut" for i in range(200)]
    (out / "text").mkdir(parents=True)
    text.train_wordpiece(captions, vocab_size=8000).save(str(out / "text" / "tokenizer.json"))


def _bare_rate(root: str, tokenizers: Path, crops, device: str, threads: int, batch_size: int) -> float:
    import torch

    from omniforge import codecs
    from omniforge import shards, storage
    from omniforge.tokenize import models
    from omniforge.tokenize.crops import crop_settings
    from omniforge.tokenize.kinds import kind_for

    torch.set_num_threads(threads)
    inputs = {}
    for name in ("rgb", "depth"):
        kind = kind_for(name)
        arrays = []
        for uri, _ in storage.list_files(storage.join(root, name), (".tar",)):
            for member, data in shards.iter_tar(uri):
                value = codecs.decode(member.split(".", 1)[1], data)
                key = shards.member_key(member)
                for c in crop_settings(key, value.shape[0], value.shape[1], crops):
                    arrays.extend(kind.crop_inputs(value, c, crops.size))
        inputs[name] = [kind.prepare(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    toks = {name: models.load_tokenizer(str(tokenizers / name), device=device) for name in inputs}
    with torch.inference_mode():
        for name, batches in inputs.items():  # warm-up, as the job's worker warms up on its first batch
            toks[name].encode(batches[0].to(device))
        n, t0 = 0, time.perf_counter()
        for name, batches in inputs.items():
            for b in batches:
                n += toks[name].encode(b.to(device)).numel()
        if device == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _train_rate(root: str, out: Path, size: str, device: str) -> float:
    from omniforge.tokenize.train import TokenizerTrainConfig, train_tokenizer

    result = train_tokenizer(TokenizerTrainConfig(data=root, modality="depth", out=str(out / size), size=size, epochs=2,
                                                  batch_size=8, device=device), progress=False, verbose=False)
    return result.history[-1]["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--crops", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the bare loop (the job's worker "
                    "gets the same on a 2-core machine)")
    args = ap.parse_args()

    import torch

    from omniforge.tokenize.crops import CropConfig
    from omniforge.pipeline.tokenize_job import TokenizeConfig, tokenize

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="omniforge-bench-tok-"))
    try:
        _write_corpus(tmp / "corpus", args.images)
        for i in range(args.images):
            (tmp / "corpus" / f"img_{i:05d}.txt").write_text(f"a photo number {i}")
        root = str(tmp / "labels")
        _label(tmp / "corpus", root)
        _tokenizers(root, tmp / "tokenizers", device)
        crops = CropConfig(n_crops=args.crops)
        bare = _bare_rate(root, tmp / "tokenizers", crops, device, args.threads, args.batch_size)
        t0 = time.perf_counter()
        summary = tokenize(TokenizeConfig(input=root, tokenizers=str(tmp / "tokenizers"), crops=crops,
                                          modalities=("rgb", "depth", "caption"), batch_size=args.batch_size,
                                          actors=1, device=device, progress=False))
        seconds = time.perf_counter() - t0
        image_tokens = summary.tokens["tok_rgb@224"] + summary.tokens["tok_depth@224"]
        job = image_tokens / seconds
        print(f"tokenize: {args.images} images x {args.crops} crops, rgb + depth at base size + caption, {device}")
        print(f"  bare encode loop  {bare:10.0f} image tokens/s")
        print(f"  tokenize job      {job:10.0f} image tokens/s ({seconds:.1f} s, incl. start-up; "
              f"{summary.tokens['tok_caption']} caption tokens too)")
        print(f"  ratio job / bare  {job / bare:10.2f}")
        for size in ("tiny", "base"):
            print(f"tokenizer train depth {size:<4} {_train_rate(root, tmp / 'train', size, device):8.1f} samples/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

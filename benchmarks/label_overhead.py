"""Label-job overhead: images/s of the full `label` job for clip vs a bare loop over the same model.

Both sides run open_clip ViT-B-16 at its real size with random weights, loaded from an open_clip
checkpoint file written here, on the same device with the same torch thread count, on the same images.
The bare loop gets the images already decoded and batched; the job reads, decodes, labels, encodes,
writes part tars, merges and commits shards. Goal on a GPU: job / bare >= 0.9.

    python benchmarks/label_overhead.py [--images 96] [--batch-size 16] [--device auto]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path




def _write_corpus(folder: Path, n: int) -> None:
    """n distinct JPEG photos (scikit-image samples, shifted crops) with a shorter side of 512."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        dx, dy = (i * 7) % max(1, w // 8), (i * 5) % max(1, h // 8)
        img = img.crop((dx, dy, w - w // 8 + dx, h - h // 8 + dy))
        scale = 512 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        img.save(folder / f"img_{i:05d}.jpg", quality=92)


def _bare_rate(ckpt: str, folder: Path, batch_size: int, device: str, threads: int) -> float:
    import torch

    from omniforge.labelers import Sample, create_labeler
    from omniforge.pipeline.decode import decode_image

    torch.set_num_threads(threads)
    labeler = create_labeler("clip", weights=ckpt, device=device)
    files = sorted(folder.iterdir())
    samples = [Sample(key=f.stem, image=decode_image(f.read_bytes())) for f in files]
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    labeler.label(batches[0])  # warm-up, as the job's actor warms up on its first batch
    t0 = time.perf_counter()
    for b in batches:
        labeler.label(b)
    if device == "cuda":
        torch.cuda.synchronize()
    return len(samples) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per teacher (default: all cores on CPU)")
    args = ap.parse_args()

    import os

    import open_clip
    import torch

    from omniforge.pipeline import LabelConfig, PlanConfig, label, plan
    from omniforge.pipeline._ray import ensure_ray

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    threads = args.threads or (os.cpu_count() or 1 if device == "cpu" else 4)
    work = Path(tempfile.mkdtemp(prefix="omniforge-bench-"))
    try:
        ckpt = work / "open_clip_pytorch_model.bin"
        torch.save(open_clip.create_model("ViT-B-16").state_dict(), ckpt)
        _write_corpus(work / "corpus", args.images)
        bare = _bare_rate(str(ckpt), work / "corpus", args.batch_size, device, threads)

        ensure_ray(None)
        out = str(work / "labels")
        plan(PlanConfig(input=str(work / "corpus"), output=out, shard_size=32))
        cfg = LabelConfig(output=out, modalities=("clip",), weights={"*": "tiny", "clip": str(ckpt)},
                          batch_size=args.batch_size, device=device, cpus_per_actor=float(threads), progress=False)
        t0 = time.perf_counter()
        summary = label(cfg)
        elapsed = time.perf_counter() - t0
        job = summary.processed / elapsed
        assert summary.labeled["clip"] == args.images, summary.lines()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"device {device}, {threads} torch threads, {args.images} images, batch {args.batch_size}, "
          f"ViT-B-16 random weights")
    print(f"bare model loop : {bare:8.2f} images/s")
    print(f"full label job  : {job:8.2f} images/s (read, decode, label, encode, write, commit; incl. actor start)")
    print(f"ratio job/bare  : {job / bare:8.3f}  (goal on a GPU >= 0.9)")
    print(f"first batch     : {summary.startup_seconds:8.1f} s after the pipeline started (worker start, weights load,"
          f" first batches in flight)")



if __name__ == "__main__":
    main()

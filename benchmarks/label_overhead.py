"""Label-job overhead: images/s of the full `label` job for clip vs a bare loop over the same model, and the
`omniforge label` command side by side with clip-retrieval's `inference` when clip-retrieval is installed.

Every side runs open_clip ViT-B-16 at its real size with the same random weights, written here once as an
open_clip checkpoint in the Hugging Face cache layout of the `ViT-B-16` / `openai` release (HF_HOME is a
temporary folder, HF_HUB_OFFLINE=1): omniforge loads it with `--weights clip=pretrained`, clip-retrieval with
`--clip_model open_clip:ViT-B-16/openai`, both through open_clip's own hub loader. Same device, same images.

1. Job / bare loop: the bare loop gets the images already decoded and batched and runs with the torch thread
   count the job's teacher actor chose; the job (`label()` in this process, Ray already started) reads,
   decodes, labels, encodes, writes part tars, merges and commits shards. Goal on a GPU: job / bare >= 0.9.
2. Command / command, end to end from a fresh process each (imports, Ray's start, weight loading included):
   `omniforge label --modalities clip` with its defaults (no resource flags) and clip-retrieval's
   `clip_inference.main` on the image folder (images only, its default pre-processing workers). clip-retrieval
   pins numpy<2 and open_clip<3, so it usually lives in a venv of its own: pass its interpreter with
   `--clip-retrieval-python`; the side-by-side is left out, saying why, when clip-retrieval does not import there.

    python benchmarks/label_overhead.py [--images 96] [--batch-size 16] [--device auto]
                                        [--clip-retrieval-python /tmp/crvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HUB_REPO = "timm/vit_base_patch16_clip_224.openai"  # open_clip's hub id of ViT-B-16 / openai
CLIP_RETRIEVAL = """
import sys
from clip_retrieval.clip_inference.main import main
main(input_dataset=sys.argv[1], output_folder=sys.argv[2], input_format="files", batch_size=int(sys.argv[3]),
     enable_text=False, enable_metadata=False, clip_model="open_clip:ViT-B-16/openai")
"""


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


def _write_hub_checkpoint(hf_home: Path) -> None:
    """A random-init ViT-B-16 state dict where open_clip's hub loader finds the `openai` release offline."""
    import logging

    import open_clip
    import torch

    repo = hf_home / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    torch.manual_seed(0)
    logging.disable(logging.WARNING)  # open_clip warns that this model has no pretrained weights: it is the point
    try:
        model = open_clip.create_model("ViT-B-16")
    finally:
        logging.disable(logging.NOTSET)
    torch.save(model.state_dict(), repo / "snapshots" / revision / "open_clip_pytorch_model.bin")


def _bare_rate(folder: Path, batch_size: int, device: str, threads: int) -> float:
    import torch

    from omniforge.labelers import Sample, create_labeler
    from omniforge.pipeline.decode import decode_image

    torch.set_num_threads(threads)
    labeler = create_labeler("clip", weights="pretrained", device=device)
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


def _job_in_process(work: Path, args: argparse.Namespace, device: str) -> tuple[float, float, dict]:
    """images/s of `label()` (Ray started, corpus planned beforehand), first-batch seconds, the clip actors."""
    from omniforge import shards, storage
    from omniforge.pipeline import LabelConfig, PlanConfig, label, plan
    from omniforge.pipeline._ray import ensure_ray

    ensure_ray(None)
    out = str(work / "labels")
    plan(PlanConfig(input=str(work / "corpus"), output=out, shard_size=32), progress_bar=False)
    cfg = LabelConfig(output=out, modalities=("clip",), weights={"*": "tiny", "clip": "pretrained"},
                      batch_size=args.batch_size, device=device, progress=False)
    t0 = time.perf_counter()
    summary = label(cfg)
    elapsed = time.perf_counter() - t0
    if summary.labeled["clip"] != args.images:
        raise SystemExit(f"the job labeled {summary.labeled['clip']} of {args.images} images: {summary.lines()}")
    record = json.loads(storage.read_bytes(storage.join(out, shards.RUNS_DIR, f"{summary.run_id}.json")))
    return summary.processed / elapsed, summary.startup_seconds, record["actors"]["clip"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return seconds


def _clip_retrieval_missing(python: str) -> str | None:
    """Why clip-retrieval cannot run with `python` (None when it imports)."""
    try:
        proc = subprocess.run([python, "-c", "import clip_retrieval.clip_inference.main"], capture_output=True,
                              text=True, timeout=300)
    except OSError as e:
        return f"{python}: {e}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the bare loop (default: those the job's teacher actor chose)")
    ap.add_argument("--clip-retrieval-python", default=sys.executable,
                    help="the Python that has clip-retrieval installed (default: this one)")
    args = ap.parse_args()

    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    work = Path(tempfile.mkdtemp(prefix="omniforge-bench-"))
    try:
        # every process started from here on (Ray's workers, the two commands) loads the weights offline
        os.environ.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1")
        _write_hub_checkpoint(work / "hf")
        _write_corpus(work / "corpus", args.images)

        job, startup, actors = _job_in_process(work, args, device)
        import ray

        ray.shutdown()  # the commands below start their own
        threads = args.threads or actors["torch_threads"][0]
        bare = _bare_rate(work / "corpus", args.batch_size, device, threads)
        print(f"device {device}, {args.images} images, batch {args.batch_size}, ViT-B-16 random weights; the job's "
              f"clip actor: {actors['num_cpus']:g} Ray CPUs, {actors['torch_threads'][0]} torch threads")
        print(f"bare model loop : {bare:8.2f} images/s ({threads} torch threads)")
        print(f"full label job  : {job:8.2f} images/s (read, decode, label, encode, write, commit; incl. actor start)")
        print(f"ratio job/bare  : {job / bare:8.3f}  (goal on a GPU >= 0.9)")
        print(f"first batch     : {startup:8.1f} s after the pipeline started (worker start, weights load,"
              f" first batches in flight)")

        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        omniforge = _timed([sys.executable, "-m", "omniforge.jobs.cli", "label", "--input", str(work / "corpus"),
                            "--output", str(work / "cli_labels"), "--modalities", "clip", "--weights",
                            "tiny,clip=pretrained", "--batch-size", str(args.batch_size), "--device", args.device,
                            "--no-progress"], env)
        missing = _clip_retrieval_missing(args.clip_retrieval_python)
        if missing is not None:
            print(f"omniforge label : {omniforge:8.1f} s end to end ({args.images / omniforge:.2f} images/s)")
            print(f"clip-retrieval  : left out, it does not import with {args.clip_retrieval_python} ({missing}); "
                  f"install it in a venv of its own and pass --clip-retrieval-python")
            return
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # clip-retrieval takes a GPU whenever it sees one
        reference = _timed([args.clip_retrieval_python, "-c", CLIP_RETRIEVAL, str(work / "corpus"),
                            str(work / "clip_retrieval"), str(args.batch_size)], env)
        print(f"omniforge label : {omniforge:8.1f} s end to end ({args.images / omniforge:.2f} images/s; its defaults)")
        print(f"clip-retrieval  : {reference:8.1f} s end to end ({args.images / reference:.2f} images/s; "
              f"clip_inference, images only)")
        print(f"ratio omniforge/clip-retrieval throughput: {reference / omniforge:6.3f}  (>= 1: omniforge as fast)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

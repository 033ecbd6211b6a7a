"""Trainer loader speed: raw sequence folders (serialized per sample) against their frozen token folders.

Builds one corpus (scikit-image photos repeated to --samples keys, shards of 250) with the det, metadata,
color_palette, caption and sam_instance labels of tests/fixtures/ml4m, its crop_settings, ml-4m's
WordPiece vocabulary and a tiny SAM-mask tokenizer; writes the frozen token folders (tok_det, ...) with the
same serialization the tokenize job uses (the draw of each key and crop); then times the loader over the
raw folders and over the token folders, same masking and batch size, in one run, and prints samples/s and
their ratio, folder by folder and all together. The trainer's own step time on the same machine (from
train_throughput.py) says whether the raw loader keeps up: the design asks the loader for >= 5x what one
training step consumes.

    python benchmarks/raw_sequences.py [--samples 1000] [--batch-size 32] [--workers 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent.parent / "tests" / "fixtures" / "ml4m"
FOLDERS = ("det", "metadata", "color_palette", "caption", "sam_instance")
EXT = {"rgb": "jpg", "crop_settings": "npy", "det": "json", "metadata": "json", "color_palette": "json",
       "caption": "txt", "sam_instance": "json"}
SHARD = 250
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def _sam_label(image: np.ndarray) -> dict:
    from sam_labels import sam_label  # tests/sam_labels.py
    from skimage.segmentation import slic

    segments = slic(image, n_segments=12, start_label=0)
    return sam_label([segments == i for i in range(segments.max() + 1)])


def build(root: str, tokenizers: str, n: int) -> None:
    import pyarrow as pa
    import torch
    from skimage import data

    from omniforge import codecs, shards, storage
    from omniforge.model.data import serialize_raw
    from omniforge.model.specs import specs_for
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    labels = json.loads((FIXTURES / "labels.json").read_text())
    names = sorted(labels)
    storage.write_bytes(storage.join(tokenizers, "text", "tokenizer.json"), gzip.decompress(
        (FIXTURES / "text_tokenizer_4m_wordpiece_30k.json.gz").read_bytes()))
    kind = kind_for("sam_instance")
    torch.manual_seed(0)
    kind.save(kind.build(kind.config("tiny")), storage.join(tokenizers, kind.artifact.folder))
    store = TokenizerStore(tokenizers)
    images = {k: np.ascontiguousarray(getattr(data, k)()) for k in names}
    member = {"rgb": {k: codecs.encode("jpg", v) for k, v in images.items()},
              "crop_settings": {k: codecs.encode("npy", np.asarray(labels[k]["crops"], np.int32)) for k in names},
              "sam_instance": {k: codecs.encode("json", _sam_label(v)) for k, v in images.items()}}
    for m in ("det", "metadata", "color_palette", "caption"):
        member[m] = {k: codecs.encode(EXT[m], labels[k][m]) for k in names}
    keys = [f"{i:06d}-{names[i % len(names)]}" for i in range(n)]
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": keys, "shard": [i // SHARD for i in range(n)]}))
    specs = specs_for(list(FOLDERS), store.text().vocab_size)
    for s in range((n + SHARD - 1) // SHARD):
        part = keys[s * SHARD:(s + 1) * SHARD]
        src = {k: k.split("-", 1)[1] for k in part}
        for folder in ("rgb", "crop_settings", *FOLDERS):
            _write(root, folder, s, {k: member[folder][src[k]] for k in part})
        for folder in FOLDERS:  # the frozen token folder, as the tokenize job serializes it
            rows = {}
            for k in part:
                crops = np.asarray(labels[src[k]]["crops"], np.int32)
                rows[k] = codecs.encode("npy", np.stack([
                    serialize_raw(specs[folder], member[folder][src[k]], member["rgb"][src[k]], c, key=k, index=i,
                                  rng=None, store=store, where=folder)[0] for i, c in enumerate(crops)]))
            _write(root, f"tok_{folder}", s, rows, ext="npy")


def _write(root: str, folder: str, shard: int, members: dict[str, bytes], ext: str | None = None) -> None:
    from omniforge import shards

    ext = ext or EXT[folder]
    shards.write_tar(shards.tar_uri(root, folder, shard), [(f"{k}.{ext}", members[k]) for k in sorted(members)])
    shards.write_status(shards.status_uri(root, folder, shard), [
        {"key": k, "ok": True, "error_type": None, "error_message": None, "fingerprint": "bench", "seconds": 0.0}
        for k in sorted(members)])


def rate(root: str, tokenizers: str, folders: tuple[str, ...], batch: int, workers: int) -> float:
    from omniforge.model.data import DataConfig, make_loader
    from omniforge.model.masking import Masker, MaskingConfig
    from omniforge.model.specs import specs_for
    from omniforge.tokenize.store import TokenizerStore

    tok = TokenizerStore(tokenizers).text()
    specs = specs_for(list(folders), tok.vocab_size)
    masker = Masker(MaskingConfig.uniform(list(folders), input_tokens=128, target_tokens=128), specs,
                    sentinel_ids=tok.sentinel_ids, pad_id=tok.pad_id, eos_id=tok.eos_id)
    cfg = DataConfig(root=root, folders=folders, batch_size=batch, epochs=1, num_workers=workers,
                     shuffle_buffer=256, tokenizers=tokenizers)
    t0, samples = time.perf_counter(), 0
    for b in make_loader(cfg, masker, rank=0, world_size=1):
        samples += next(iter(b.values()))["input_mask"].shape[0]
    return samples / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in the main process)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, tokenizers = f"{tmp}/corpus", f"{tmp}/tokenizers"
        build(root, tokenizers, args.samples)
        print(f"{args.samples} samples, batch {args.batch_size}, {args.workers} workers: samples/s")
        print(f"{'folder':<16} {'raw':>10} {'tokens':>10} {'raw/tokens':>11}")
        for folders in [(f,) for f in FOLDERS] + [FOLDERS]:
            raw = rate(root, tokenizers, folders, args.batch_size, args.workers)
            frozen = rate(root, tokenizers, tuple(f"tok_{f}" for f in folders), args.batch_size, args.workers)
            name = folders[0] if len(folders) == 1 else "all five"
            print(f"{name:<16} {raw:>10.1f} {frozen:>10.1f} {raw / frozen:>11.2f}")


if __name__ == "__main__":
    main()

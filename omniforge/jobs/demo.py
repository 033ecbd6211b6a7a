"""`omniforge demo`: the whole label path on real photos, offline, in a few minutes on a laptop."""

from __future__ import annotations

import time
from pathlib import Path

from omniforge.jobs.demo_corpus import build_demo_corpus


def demo(out: str, *, ray_address: str | None = None, weights: str = "tiny") -> int:
    from omniforge.labelers import get_labeler_class, labeler_for_modality, list_labelers
    from omniforge.pipeline import LabelConfig, label, parse_weights, show, verify
    from omniforge.pipeline.plan import load_manifest

    t0 = time.time()
    out_dir = Path(out).resolve()
    corpus = build_demo_corpus(out_dir / "corpus")
    root = str(out_dir / "labels")
    # every registered teacher: the classical ones for real, the learned ones at their tiny size
    modalities = tuple(m for name in list_labelers() for m in get_labeler_class(name).modalities)
    learned = sorted({labeler_for_modality(m).name for m in modalities if labeler_for_modality(m).learned})
    if weights == "tiny":
        print(f"demo: learned teachers ({', '.join(learned)}) run with RANDOM weights (--weights tiny): their "
              f"features are not meaningful. Run `omniforge demo --weights pretrained` where the model hub is "
              f"reachable for the real teachers. Classical teachers are real.")
    print(f"demo: corpus of real photos (scikit-image samples) at {corpus}")
    cfg = LabelConfig(input=str(corpus), output=root, modalities=modalities, weights=parse_weights(weights),
                      shard_size=4, batch_size=8)
    summary = label(cfg, ray_address=ray_address)
    print("\n".join(summary.lines()))
    report = verify(root)
    print("\n".join(report.lines()))
    manifest = load_manifest(root)
    keys = manifest.column("key").to_pylist()
    uris = manifest.column("source_uri").to_pylist()
    preview_key = next((k for k, u in zip(keys, uris) if u.endswith("astronaut.jpg")), keys[0])
    preview = show(root, preview_key, str(out_dir / "preview.png"))
    print(f"demo: {len(keys)} samples, preview of {preview_key!r} -> {preview}")
    print(f"demo: done in {time.time() - t0:.0f}s; labels under {root}")
    return 0 if report.ok else 1

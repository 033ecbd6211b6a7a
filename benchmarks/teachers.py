"""Images/s of every registered teacher's `label` call on decoded 512-px photos, measured in one run.

Derived teachers get their inputs from the tiny teachers that write them (prepared outside the timing).
Learned teachers run their `tiny` variant unless --weights names checkpoints (TEACHER=PATH, comma list).

    python benchmarks/teachers.py [--images 16] [--batch-size 8] [--teachers clip,dinov2] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _photos(n: int) -> list[np.ndarray]:
    from skimage import data

    from omniforge.pipeline.decode import decode_image
    import io
    from PIL import Image

    out = []
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(sources[i % len(sources)]).save(buf, format="JPEG", quality=92)
        out.append(decode_image(buf.getvalue(), storage_size=512))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--teachers", default=None, help="comma list (default: every registered labeler)")
    ap.add_argument("--weights", default="", help="TEACHER=PATH overrides, comma separated")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()

    from omniforge import codecs
    from omniforge.errors import SampleError
    from omniforge.labelers import Sample, create_labeler, get_labeler_class, labeler_for_modality, list_labelers
    from omniforge.modalities import MODALITIES
    from omniforge.pipeline.label import _encode_checked

    weights = dict(p.split("=", 1) for p in args.weights.split(",") if "=" in p)
    names = args.teachers.split(",") if args.teachers else list_labelers()
    images = _photos(args.images)
    labelable = {m for n in list_labelers() for m in get_labeler_class(n).modalities}
    print(f"{args.images} images (shorter side 512), batch {args.batch_size}, device {args.device}")
    print(f"{'teacher':<15} {'weights':<8} {'images/s':>9} {'ok':>4} {'load s':>7}")
    for name in names:
        cls = get_labeler_class(name)
        samples = [Sample(key=f"k{i}", image=im, caption="a photo") for i, im in enumerate(images)]
        for m in (*cls.requires, *[m for m in cls.optional_inputs if m in labelable]):
            producer = create_labeler(labeler_for_modality(m).name, weights="tiny", modalities=(m,))
            for s, r in zip(samples, producer.label(samples)):
                if not isinstance(r, SampleError):
                    s.inputs[m] = codecs.decode(MODALITIES[m].ext, _encode_checked(MODALITIES[m], r[m]))
        samples = [s for s in samples if all(m in s.inputs for m in cls.requires)]
        w = weights.get(name, "tiny")
        t0 = time.perf_counter()
        labeler = create_labeler(name, weights=w, device=args.device)
        load = time.perf_counter() - t0
        labeler.label(samples[:1])  # warm-up
        t0 = time.perf_counter()
        ok = 0
        for i in range(0, len(samples), args.batch_size):
            ok += sum(not isinstance(r, SampleError) for r in labeler.label(samples[i:i + args.batch_size]))
        rate = len(samples) / (time.perf_counter() - t0)
        print(f"{name:<15} {'tiny' if w == 'tiny' else 'file':<8} {rate:>9.1f} {ok:>4} {load:>7.1f}")


if __name__ == "__main__":
    main()

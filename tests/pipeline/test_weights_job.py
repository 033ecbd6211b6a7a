"""The label job with `--weights TEACHER=PATH`: checkpoints in the publishers' formats go through the job.

The checkpoints are the official model classes (transformers models saved with `save_pretrained`, a
segment-anything `Sam` saved as a `.pth` state dict), at their tiny size. The unit tests in tests/labelers/
prove that a labeler built from such a file reproduces the official package's own predictor; this test
proves that the job, on its Ray workers, writes what that labeler computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from images import photo_bytes
from omniforge import codecs
from omniforge.labelers import Sample, create_labeler
from omniforge.pipeline import LabelConfig, label, verify
from omniforge import shards
from omniforge.pipeline.decode import decode_image

OPTIONS = {
    "det": {"threshold": 0.0, "max_detections": 20},
    "sam_instance": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
}


@pytest.mark.slow
def test_label_job_with_publisher_format_checkpoints(tmp_path, ray_address):
    det = create_labeler("det", weights="tiny")
    det.model.save_pretrained(tmp_path / "det")
    det.processor.save_pretrained(tmp_path / "det")
    depth = create_labeler("depth", weights="tiny")
    depth.model.save_pretrained(tmp_path / "depth")
    depth.transform.save_pretrained(tmp_path / "depth")
    sam = create_labeler("sam_instance", weights="tiny")
    torch.save(sam.model.state_dict(), tmp_path / "sam_tiny.pth")
    weights = {"*": "tiny", "det": str(tmp_path / "det"), "depth": str(tmp_path / "depth"),
               "sam_instance": str(tmp_path / "sam_tiny.pth")}

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = {}
    for i, name in enumerate(("astronaut", "chelsea", "coffee")):
        sources[f"img{i}"] = photo_bytes(name, 96 + 16 * i)
        (corpus / f"img{i}.jpg").write_bytes(sources[f"img{i}"])
    root = str(tmp_path / "out")
    summary = label(LabelConfig(input=str(corpus), output=root, modalities=("det", "depth", "sam_instance"),
                                weights=weights, options=OPTIONS, shard_size=2, batch_size=2, progress=False),
                    ray_address=ray_address)
    assert summary.labeled == {"det": 3, "depth": 3, "sam_instance": 3}
    assert verify(root).ok

    direct = {name: create_labeler(name, weights=weights[name], **OPTIONS.get(name, {}))
              for name in ("det", "depth", "sam_instance")}
    for name, labeler in direct.items():
        written = {shards.member_key(n): d for s in range(2) for n, d in shards.iter_tar(shards.tar_uri(root, name, s))}
        assert set(written) == set(sources)
        for key, data in sources.items():
            expected = labeler.label([Sample(key=key, image=decode_image(data))])[0][name]
            got = codecs.decode("json" if name != "depth" else "png", written[key])
            if name == "depth":
                assert np.abs(got.astype(np.int64) - expected.astype(np.int64)).max() <= 64  # 0.1% of 65535
                assert got.std() > 0
            elif name == "det":
                assert len(got["instances"]) == len(expected["instances"]) > 0
                for a, b in zip(got["instances"], expected["instances"]):
                    assert a["class_name"] == b["class_name"]
                    np.testing.assert_allclose(a["boxes"] + [a["score"]], b["boxes"] + [b["score"]], atol=1e-4)
            else:
                assert len(got["instances"]) == len(expected["instances"]) > 0
                for a, b in zip(got["instances"], expected["instances"]):
                    assert abs(a["area"] - b["area"]) <= 16 and a["bbox"] == pytest.approx(b["bbox"], abs=2)

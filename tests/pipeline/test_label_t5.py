"""`omniforge label --modalities caption,t5_caption` on the session's local Ray cluster: the derived T5 teacher
writes ml-4m's npz, a caption-less sample fails with a reason, verify checks the schema, show draws it."""

from __future__ import annotations

import io
import shutil

import numpy as np

from images import photo_bytes
from omniforge import codecs, shards
from omniforge.jobs.cli import main as cli_main
from omniforge.pipeline import load_manifest, show, verify

CAPTIONS = {"img0": "A cat on a wooden floor.", "img1": "An astronaut in a white suit", "img2": None}


def _members(root, modality):
    members, status = {}, {}
    for s in sorted(set(load_manifest(root).column("shard").to_pylist())):
        members.update((shards.member_key(n), d) for n, d in shards.iter_tar(shards.tar_uri(root, modality, s)))
        status.update((r["key"], r) for r in shards.read_status(shards.status_uri(root, modality, s)).to_pylist())
    return members, status


def test_label_writes_t5_caption_npz_that_verify_and_show_accept(tmp_path, ray_address, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        (folder / f"{name}.jpg").write_bytes(photo_bytes(("chelsea", "astronaut", "coffee")[i], 64))
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption)
    root = str(tmp_path / "out")
    assert cli_main(["label", "--input", str(folder), "--output", root, "--modalities", "t5_caption,caption",
                     "--weights", "tiny", "--shard-size", "2", "--no-progress", "--ray-address", ray_address]) == 0
    members, status = _members(root, "t5_caption")
    assert set(members) == {"img0", "img1"}
    assert not status["img2"]["ok"] and status["img2"]["error_type"] == "missing_input"
    assert "caption" in status["img2"]["error_message"]
    lengths = {}
    for key, data in members.items():
        assert data[:2] == b"PK"  # a zip: ml-4m's np.load(path) reads it
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            emb, mask = npz["emb"], npz["mask_valid"]
        assert emb.dtype == np.float16 and emb.shape == (1, 77, 4096) and mask.shape == (1, 77)
        lengths[key] = int(mask.sum())
        assert np.abs(emb[0][mask[0]]).max() > 0 and not emb[0][~mask[0]].any()
    assert lengths["img0"] != lengths["img1"]  # each caption's own tokens
    report = verify(root)
    assert report.ok, report.lines()
    assert show(root, "img1", str(tmp_path / "preview.png"))

    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    victim = next(p for p in sorted((broken / "t5_caption").glob("shard-*.tar")) if list(shards.iter_tar(str(p))))
    rewritten = []
    for name, data in shards.iter_tar(str(victim)):
        value = codecs.decode("npz", data)
        value["emb"] = value["emb"][:, :, :100]
        rewritten.append((name, codecs.encode("npz", value)))
    shards.write_tar(str(victim), rewritten)
    report = verify(str(broken))
    assert not report.ok and "emb is float16 (1, 77, 100), expected float16 (n, 77, 4096)" in "\n".join(report.problems)

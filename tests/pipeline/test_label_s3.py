"""The label job from and to a real S3-compatible server (moto) on loopback, with webdataset and parquet inputs."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from images import photo_bytes
from omniforge.jobs.cli import main as cli_main
from omniforge.pipeline import LabelConfig, label, load_manifest, verify
from omniforge import shards, storage

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def _img2dataset_tar(samples: list[tuple[str, bytes, str]]) -> bytes:
    """A tar as img2dataset writes it: <key>.jpg, <key>.txt, <key>.json per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, jpg, caption in samples:
            meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_on_s3_to_s3(s3_bucket, ray_address, capsys):
    for t in range(2):
        samples = [(f"{t:05d}{i:04d}", photo_bytes(PHOTOS[i % 4], 80 + i), f"photo {t}-{i}") for i in range(5)]
        storage.write_bytes(f"{s3_bucket}/corpus/{t:05d}.tar", _img2dataset_tar(samples))
    root = f"{s3_bucket}/labels"
    summary = label(LabelConfig(input=f"{s3_bucket}/corpus/{{00000..00001}}.tar", output=root,
                                modalities=("rgb", "caption", "clip"), shard_size=4, batch_size=4,
                                progress=False), ray_address=ray_address)
    assert summary.labeled == {"rgb": 10, "caption": 10, "clip": 10}
    manifest = load_manifest(root)
    assert sorted(manifest.column("key").to_pylist()) == [f"{t:05d}{i:04d}" for t in range(2) for i in range(5)]
    for shard in range(3):
        keys = [[shards.member_key(n) for n, _ in shards.iter_tar(shards.tar_uri(root, m, shard))]
                for m in ("rgb", "caption", "clip")]
        assert keys[0] == keys[1] == keys[2] and keys[0] == sorted(keys[0])
    captions = {shards.member_key(n): d.decode() for s in range(3)
                for n, d in shards.iter_tar(shards.tar_uri(root, "caption", s))}
    assert captions["000010003"] == "photo 1-3"
    assert verify(root).ok
    assert cli_main(["verify", root]) == 0
    assert "OK" in capsys.readouterr().out
    assert not storage.list_files(storage.join(root, shards.TMP_DIR))


def test_parquet_with_bytes_column_on_s3(s3_bucket, ray_address):
    table = pa.table({
        "id": [f"row{i}" for i in range(6)],
        "image": [photo_bytes(PHOTOS[i % 4], 72) if i != 4 else b"<html>503</html>" for i in range(6)],
        "caption": [f"caption {i}" for i in range(6)],
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    storage.write_bytes(f"{s3_bucket}/corpus.parquet", buf.getvalue())
    root = f"{s3_bucket}/out"
    summary = label(LabelConfig(input=f"{s3_bucket}/corpus.parquet", output=root,
                                modalities=("rgb", "caption", "canny_edge"), shard_size=4, progress=False),
                    ray_address=ray_address)
    assert summary.labeled["rgb"] == 5 and summary.failed["rgb"] == {"decode_error": 1}
    status = {r["key"]: r for s in range(2) for r in shards.read_status(shards.status_uri(root, "rgb", s)).to_pylist()}
    assert set(status) == {f"row{i}" for i in range(6)}
    assert not status["row4"]["ok"]
    assert verify(root).ok

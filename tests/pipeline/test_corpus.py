"""Corpus readers on real images: folders, img2dataset-style tars and parquet, locally and on S3."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from images import photo_bytes
from PIL import Image

from omniforge.errors import CorpusError
from omniforge import storage
from omniforge.pipeline import corpus

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")


def _photo(i: int) -> bytes:
    return photo_bytes(PHOTOS[i % len(PHOTOS)], size=32 + i)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(seed))).save(buf, format="WEBP")
    return buf.getvalue()


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "corpus")
    return storage.join(request.getfixturevalue("s3_bucket"), "corpus")


def _put(root: str, rel: str, data: bytes) -> str:
    uri = storage.join(root, rel)
    storage.write_bytes(uri, data)
    return uri


def _scan_all(uri: str, fmt: str = "auto", **options: str) -> list[corpus.SourceRecord]:
    units = corpus.list_units(uri, fmt, **options)
    for unit in units:
        assert pickle.loads(pickle.dumps(unit)) == unit  # Ray ships units to tasks
    return [record for unit in units for record in corpus.scan_unit(unit)]


def _assert_read_back(records: list[corpus.SourceRecord], expected: dict[str, bytes]) -> None:
    """Every record found exactly once, its bytes right at scan time and through read_images."""
    names = [r.name for r in records]
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)
    for record in records:
        assert record.data == expected[record.name], record.name
        assert record.size == len(record.data)
        assert record.error is None
    fetched = corpus.read_images([r.locator() for r in records])
    assert fetched == [expected[r.name] for r in records]


# ---------------------------------------------------------------------------------------------------
# folder


def _folder_corpus(root: str) -> tuple[dict[str, bytes], dict[str, str | None]]:
    images = {
        "a.jpg": _photo(0),
        "UPPER.JPG": _photo(1),
        "nested/deeper/b c.png": _png(1),
        "nested/ünï #1%.v2.jpeg": _photo(2),
        "nested/x.webp": _webp(2),
        "nested/deeper/still/t.tiff": _png(3),
        "zero.jpg": b"",
        "not_an_image.jpg": b"this is text, not a JPEG",
    }
    captions = {"a.jpg": "a cat", "nested/ünï #1%.v2.jpeg": "ünïcode caption"}
    for rel, data in images.items():
        _put(root, rel, data)
    _put(root, "a.txt", b"a cat\n")
    _put(root, "nested/ünï #1%.v2.txt", "ünïcode caption".encode())
    _put(root, "README.md", b"# not an image")
    _put(root, "nested/meta.json", b"{}")
    return images, {name: captions.get(name) for name in images}


def test_folder_corpus(root, monkeypatch):
    monkeypatch.setattr(corpus, "FOLDER_UNIT_SIZE", 3)
    images, captions = _folder_corpus(root)
    assert corpus.detect_format(root) == "folder"
    units = corpus.list_units(root)
    assert [len(u.paths) for u in units] == [3, 3, 2]
    assert all(u.format == "folder" and u.root == storage.normalize(root) for u in units)
    records = _scan_all(root)
    _assert_read_back(records, images)
    for record in records:
        assert record.caption == captions[record.name]
        assert record.format == "file" and record.offset == 0 and record.row == -1
        assert record.uri == record.path == storage.join(storage.normalize(root), record.name)
    assert _scan_all(root + "/", "folder") == records


def test_folder_unreadable_file_is_reported_not_dropped(tmp_path):
    _put(str(tmp_path), "ok.jpg", _photo(0))
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing-target.jpg")
    records = {r.name: r for r in _scan_all(str(tmp_path))}
    assert set(records) == {"ok.jpg", "gone.jpg"}
    assert records["gone.jpg"].error and "not found" in records["gone.jpg"].error
    assert records["gone.jpg"].data == b""
    assert isinstance(corpus.read_images([records["gone.jpg"].locator()])[0], Exception)


# ---------------------------------------------------------------------------------------------------
# webdataset tars (img2dataset layout)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(
    members: list[tuple[str, bytes]], extra: tuple[tarfile.TarInfo, ...] = (), fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info in extra:
            tar.addfile(info)
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _meta(key: str, caption: str | None) -> bytes:
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "caption": caption}
    return json.dumps(meta).encode()


def _wds_corpus(root: str) -> tuple[dict[str, bytes], dict[str, str | None]]:
    long_key = "sub/" + "k" * 120  # a member name over 100 characters: needs a pax / GNU long-name header
    directory = tarfile.TarInfo("sub")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("000000009.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    shard0 = [
        ("000000000.jpg", _photo(0)),
        ("000000000.json", _meta("000000000", "from json")),
        ("000000000.txt", b"from txt"),
        ("000000001.jpg", _photo(1)),
        ("000000001.json", _meta("000000001", "json only caption")),
        ("sub/000000002.png", _png(5)),
        (f"{long_key}.jpg", _photo(2)),
        (f"{long_key}.txt", "long ünï".encode()),
        ("000000003.json", _meta("000000003", "failed download: no image")),
        ("__meta__.json", b"{}"),
    ]
    shard1 = [
        ("../escape/000000010.webp", _webp(1)),
        ("000000011.jpg", b""),
        ("000000011.txt", b"empty image"),
        ("000000012.jpg", b"not a jpeg at all"),
    ]
    _put(root, "00000.tar", _tar_bytes(shard0, (directory, link)))
    _put(root, "00001.tar", _tar_bytes(shard1, fmt=tarfile.GNU_FORMAT))
    _put(root, "00000.parquet", b"img2dataset writes per-shard metadata parquet files beside the tars")
    _put(root, "00000_stats.json", b"{}")
    images = {
        "000000000": _photo(0),
        "000000001": _photo(1),
        "sub/000000002": _png(5),
        long_key: _photo(2),
        "../escape/000000010": _webp(1),
        "000000011": b"",
        "000000012": b"not a jpeg at all",
    }
    captions = {
        "000000000": "from txt",
        "000000001": "json only caption",
        long_key: "long ünï",
        "000000011": "empty image",
    }
    return images, {name: captions.get(name) for name in images}


def test_wds_corpus(root):
    images, captions = _wds_corpus(root)
    assert corpus.detect_format(root) == "wds"
    units = corpus.list_units(root)
    assert [u.paths for u in units] == [(storage.join(storage.normalize(root), f"0000{i}.tar"),) for i in (0, 1)]
    records = _scan_all(root)
    _assert_read_back(records, images)
    for record in records:
        assert record.caption == captions[record.name]
        assert record.format == "tar" and record.row == -1
        assert record.uri.startswith(record.path + "#")
        assert storage.read_bytes(record.path, record.offset, record.size) == record.data


def test_wds_single_tar_and_brace_pattern(root):
    images, _ = _wds_corpus(root)
    single = storage.join(root, "00001.tar")
    assert corpus.detect_format(single) == "wds"
    assert {r.name for r in _scan_all(single)} == {"../escape/000000010", "000000011", "000000012"}
    pattern = storage.join(root, "0000{0..1}.tar")
    assert corpus.detect_format(pattern) == "wds"
    _assert_read_back(_scan_all(pattern), images)
    with pytest.raises(CorpusError, match=r"1 of the 3 tars .* do not exist .*00002\.tar"):
        corpus.list_units(storage.join(root, "0000{0..2}.tar"))


def test_wds_read_images_coalesces_and_reports_changes(tmp_path, monkeypatch):
    images, _ = _wds_corpus(str(tmp_path))
    records = _scan_all(str(tmp_path))
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    locators = [r.locator() for r in records]
    assert corpus.read_images(locators) == [images[r.name] for r in records]
    assert len(reads) == 2  # one request per tar: neighbouring members are coalesced

    bad = dict(locators[0], size=locators[0]["size"] + 10**9)
    unknown = dict(locators[0], format="zip")
    missing = dict(locators[0], path=str(tmp_path / "nope.tar"))
    out = corpus.read_images([bad, locators[1], unknown, missing])
    assert isinstance(out[0], Exception) and out[1] == images[records[1].name]
    assert isinstance(out[2], Exception) and isinstance(out[3], Exception)


def test_compressed_tar_is_rejected(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add(tar, "0.jpg", _photo(0))
    _put(str(tmp_path), "shard.tar", buf.getvalue())
    with pytest.raises(CorpusError, match="compressed tar"):
        _scan_all(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# parquet


def _write_parquet(root: str, rel: str, table: pa.Table, row_group_size: int = 3) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return _put(root, rel, buf.getvalue())


def test_parquet_bytes_column(root):
    images = {f"k{i:02d}": _photo(i) if i % 2 else _png(i) for i in range(11)}
    images["k_empty"] = b""
    names = sorted(images)
    half = len(names) // 2
    for part, chunk in enumerate((names[:half], names[half:])):
        table = pa.table(
            {
                "key": chunk,
                "image": pa.array([images[k] for k in chunk], pa.binary()),
                "caption": [f"caption of {k}" if k != "k03" else None for k in chunk],
                "width": list(range(len(chunk))),
            }
        )
        _write_parquet(root, f"part-{part}.parquet", table)
    assert corpus.detect_format(root) == "parquet"
    units = corpus.list_units(root)
    assert len(units) == 2 and units[0].option("image_column") == "image" and units[0].option("key_column") == "key"
    records = _scan_all(root)
    _assert_read_back(records, images)
    by_name = {r.name: r for r in records}
    assert by_name["k03"].caption is None and by_name["k04"].caption == "caption of k04"
    assert [r.row for r in records] == list(range(half)) + list(range(len(names) - half))
    for record in records:
        assert record.format == "parquet" and record.column == "image"
        assert record.uri == f"{record.path}#row={record.row}"
    # rows spread over several row groups, requested out of order, duplicates included
    shuffled = [records[i].locator() for i in (8, 0, 11, 3, 3, 6)]
    assert corpus.read_images(shuffled) == [records[i].data for i in (8, 0, 11, 3, 3, 6)]


def test_parquet_struct_column_as_hf_datasets_writes_it(root):
    images = {f"img_{i}.jpg": _photo(i) for i in range(5)}
    struct = pa.array(
        [{"bytes": data, "path": name} for name, data in images.items()],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"img": struct, "text": [f"text {n}" for n in images]})
    path = _write_parquet(root, "train-00000-of-00001.parquet", table, row_group_size=2)
    assert corpus.detect_format(path) == "parquet"
    records = _scan_all(path)  # a single parquet file as the input
    _assert_read_back(records, images)
    assert all(r.caption == f"text {r.name}" and r.column == "img" for r in records)


def test_parquet_relative_path_column(root):
    images = {"imgs/a.jpg": _photo(0), "imgs/sub/b c.png": _png(1), "imgs/ü.webp": _webp(2)}
    for rel, data in images.items():
        _put(root, f"meta/{rel}", data)
    table = pa.table({"path": list(images), "alt": ["A", None, "C"], "id": [10, 11, 12]})
    _write_parquet(root, "meta/index.parquet", table)
    records = _scan_all(storage.join(root, "meta"), "parquet")
    expected = {str(10 + i): data for i, data in enumerate(images.values())}
    _assert_read_back(records, expected)
    assert [r.caption for r in records] == ["A", None, "C"]
    for record, rel in zip(records, images, strict=True):
        assert record.format == "file" and record.path == storage.join(storage.normalize(root), "meta", rel)


def test_parquet_explicit_columns(tmp_path):
    table = pa.table({"pixels": pa.array([_photo(0), _photo(1)], pa.binary()), "desc": ["x", "y"], "uid": ["u0", "u1"]})
    _write_parquet(str(tmp_path), "d.parquet", table)
    with pytest.raises(CorpusError, match=r"no image column.*pixels \(binary\).*--image-column"):
        corpus.list_units(str(tmp_path))
    records = _scan_all(str(tmp_path), image_column="pixels", caption_column="desc", key_column="uid")
    assert [(r.name, r.caption) for r in records] == [("u0", "x"), ("u1", "y")]
    _assert_read_back(records, {"u0": _photo(0), "u1": _photo(1)})
    with pytest.raises(CorpusError, match="no column 'nope'.*--caption-column"):
        corpus.list_units(str(tmp_path), image_column="pixels", caption_column="nope")
    with pytest.raises(CorpusError, match="not image bytes.*--image-column"):
        corpus.list_units(str(tmp_path), image_column="desc")


def test_parquet_ambiguous_image_columns(tmp_path):
    table = pa.table({"image": pa.array([b"1"], pa.binary()), "jpg": pa.array([b"2"], pa.binary())})
    _write_parquet(str(tmp_path), "d.parquet", table)
    with pytest.raises(CorpusError, match=r"several image columns \(image, jpg.*--image-column") as excinfo:
        corpus.list_units(str(tmp_path))
    assert "\n" not in str(excinfo.value)
    assert [r.data for r in _scan_all(str(tmp_path), image_column="jpg")] == [b"2"]


# ---------------------------------------------------------------------------------------------------
# errors


def test_missing_inputs(root):
    for missing in (storage.join(root, "nope"), storage.join(root, "nope.tar"), storage.join(root, "nope.parquet")):
        with pytest.raises(CorpusError, match="does not exist: check the --input URI"):
            corpus.list_units(missing)
    for missing in (storage.join(root, "nope"), storage.join(root, "nope.tar")):
        with pytest.raises(CorpusError, match="does not exist"):
            corpus.detect_format(missing)


def test_missing_bucket(s3_server):
    with pytest.raises(CorpusError, match="does not exist: check the --input URI"):
        corpus.list_units("s3://omniforge-no-such-bucket/corpus")


def test_empty_and_unknown_corpora(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        corpus.list_units(str(tmp_path / "empty"))
    _put(str(tmp_path), "docs/readme.md", b"hello")
    with pytest.raises(CorpusError, match="no images, .tar or .parquet files found"):
        corpus.list_units(str(tmp_path / "docs"))
    with pytest.raises(CorpusError, match="is not a .tar, .parquet or a folder of images"):
        corpus.list_units(str(tmp_path / "docs" / "readme.md"))
    with pytest.raises(CorpusError, match="unknown corpus format 'zip'"):
        corpus.list_units(str(tmp_path / "docs"), "zip")
    with pytest.raises(CorpusError, match="no .tar files"):
        corpus.list_units(str(tmp_path / "docs"), "wds")


def test_s3_prefix_errors(s3_bucket):
    _put(s3_bucket, "other/x.jpg", _photo(0))
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.list_units(storage.join(s3_bucket, "corpus"))
    with pytest.raises(CorpusError, match="no .parquet files"):
        corpus.list_units(storage.join(s3_bucket, "other"), "parquet")
    assert [r.name for r in _scan_all(storage.join(s3_bucket, "other"))] == ["x.jpg"]

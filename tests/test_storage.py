"""omniforge.storage on the local filesystem and on a real S3-compatible server (moto)."""

from __future__ import annotations

import io
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omniforge.errors import StorageError
from omniforge import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A writable root URI on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3_bucket"), "root")


def _payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def test_uri_helpers(tmp_path, monkeypatch):
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("file:///x")
    assert storage.join("s3://b", "a", "", "/c.tar") == "s3://b/a/c.tar"
    assert storage.join("s3://b/x/", "y") == "s3://b/x/y"
    assert storage.join("/data", "rgb", "shard-000000.tar") == "/data/rgb/shard-000000.tar"
    assert storage.normalize("s3://b/x/") == "s3://b/x"
    assert storage.normalize("s3://b/") == "s3://b"
    assert storage.normalize(f"file://{tmp_path}/a/") == f"{tmp_path}/a"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("rel/x") == f"{tmp_path}/rel/x"


def test_round_trip_and_ranged_reads(root):
    data = _payload(100_000)
    uri = storage.join(root, "dir one/ünïcode #1%.bin")
    storage.write_bytes(uri, data)
    assert storage.exists(uri)
    assert storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data
    assert storage.read_bytes(uri, 1000, 5000) == data[1000:6000]
    assert storage.read_bytes(uri, 99_990) == data[99_990:]
    assert storage.read_bytes(uri, 99_990, 100) == data[99_990:]  # runs past the end: short, like a file
    assert storage.read_bytes(uri, 200_000, 10) == b""
    assert storage.read_bytes(uri, 5, 0) == b""
    storage.write_bytes(uri, b"overwritten")
    assert storage.read_bytes(uri) == b"overwritten"


def test_zero_byte_object(root):
    uri = storage.join(root, "empty.jpg")
    storage.write_bytes(uri, b"")
    assert storage.exists(uri) and storage.size(uri) == 0
    assert storage.read_bytes(uri) == b""
    assert storage.read_bytes(uri, 0, 10) == b""
    with storage.open_input(uri) as f:
        assert f.read() == b""


def test_open_input_seek_and_read(root):
    data = _payload(3 * 1024 * 1024 + 17)
    uri = storage.join(root, "blob.bin")
    storage.write_bytes(uri, data)
    with storage.open_input(uri) as f:
        assert f.seekable() and f.readable()
        assert f.read(10) == data[:10]
        assert f.tell() == 10
        f.seek(2 * 1024 * 1024)
        assert f.read(100) == data[2 * 1024 * 1024 : 2 * 1024 * 1024 + 100]
        f.seek(-17, io.SEEK_END)
        assert f.read() == data[-17:]
        assert f.read(5) == b""
        f.seek(5)
        f.seek(10, io.SEEK_CUR)
        assert f.read(3) == data[15:18]
        f.seek(0)
        assert f.read() == data


def test_open_input_feeds_parquet_and_streaming_tar(root):
    table = pa.table({"i": list(range(5000)), "s": [f"row {i}" for i in range(5000)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=700)
    uri = storage.join(root, "t.parquet")
    storage.write_bytes(uri, buf.getvalue())
    with storage.open_input(uri) as f:
        pf = pq.ParquetFile(f)
        assert pf.metadata.num_row_groups == 8
        assert pf.read_row_group(3).column("i").to_pylist() == list(range(2100, 2800))
        assert pf.read().equals(table)

    members = {f"m{i}.bin": _payload(1000 + i * 3000) for i in range(5)}
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar_uri = storage.join(root, "t.tar")
    storage.write_bytes(tar_uri, tbuf.getvalue())
    seen = {}
    with storage.open_input(tar_uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            seen[info.name] = (tar.extractfile(info).read(), info.offset_data)
    assert {k: v[0] for k, v in seen.items()} == members
    for payload, offset in seen.values():
        assert storage.read_bytes(tar_uri, offset, len(payload)) == payload


def test_list_files_sorted_with_sizes(root):
    files = {"b.tar": 3, "a/x.TAR": 5, "a/y.txt": 1, "a/deep/z.tar": 7, "c d/é.tar": 2}
    for name, n in files.items():
        storage.write_bytes(storage.join(root, name), b"x" * n)
    storage.write_bytes(root + "-sibling/other.tar", b"no")  # shares the prefix, is not under root
    listed = storage.list_files(root)
    assert listed == sorted((storage.join(root, k), v) for k, v in files.items())
    tars = storage.list_files(root + "/", (".tar",))
    assert [u for u, _ in tars] == sorted(storage.join(root, k) for k in files if k.lower().endswith(".tar"))
    assert storage.list_files(storage.join(root, "missing")) == []
    assert storage.exists(storage.join(root, "a"))  # a directory / prefix with files under it
    assert not storage.exists(storage.join(root, "missing"))


class _Boom(RuntimeError):
    pass


def test_atomic_writer_commits_only_on_clean_exit(root):
    uri = storage.join(root, "shards/shard-000000.tar")
    with pytest.raises(_Boom):
        with storage.atomic_writer(uri) as f:
            f.write(b"partial data")
            raise _Boom()
    assert not storage.exists(uri)
    assert storage.list_files(root) == []  # no temporary file left behind either

    storage.write_bytes(uri, b"v1")
    with pytest.raises(_Boom):
        with storage.atomic_writer(uri) as f:
            f.write(b"v2 partial")
            raise _Boom()
    assert storage.read_bytes(uri) == b"v1"  # the committed version is untouched

    with storage.atomic_writer(uri) as f:
        f.write(b"v2")
        assert storage.read_bytes(uri) == b"v1"  # not visible before the block ends
    assert storage.read_bytes(uri) == b"v2"
    assert [u for u, _ in storage.list_files(root)] == [uri]


def test_atomic_writer_leaves_no_temp_file_locally(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(_Boom):
        with storage.atomic_writer(str(target)) as f:
            f.write(b"abc")
            assert os.path.dirname(f.name) == str(target.parent)  # same-directory temp: rename is atomic
            raise _Boom()
    assert os.listdir(target.parent) == []


def test_delete_and_delete_tree(root):
    for name in ("t/a", "t/b/c", "t2/keep", "top"):
        storage.write_bytes(storage.join(root, name), b"1")
    storage.delete(storage.join(root, "top"))
    storage.delete(storage.join(root, "top"))  # already gone: no error
    assert not storage.exists(storage.join(root, "top"))
    storage.delete_tree(storage.join(root, "t"))
    assert [u for u, _ in storage.list_files(root)] == [storage.join(root, "t2/keep")]
    storage.delete_tree(storage.join(root, "does-not-exist"))
    storage.delete_tree(root)
    assert storage.list_files(root) == []


def test_missing_objects_raise_readable_storage_errors(root):
    missing = storage.join(root, "nope.parquet")
    for call in (
        lambda: storage.read_bytes(missing),
        lambda: storage.read_bytes(missing, 10, 10),
        lambda: storage.size(missing),
        lambda: storage.open_input(missing),
    ):
        with pytest.raises(StorageError) as excinfo:
            call()
        message = str(excinfo.value)
        assert missing in message and "not found" in message and "\n" not in message
        assert "testing" not in message  # never the credentials
        assert isinstance(excinfo.value, storage.ObjectNotFound)


def test_missing_bucket(s3_server):
    with pytest.raises(storage.ObjectNotFound, match="bucket 'omniforge-no-such-bucket' does not exist"):
        storage.read_bytes("s3://omniforge-no-such-bucket/x")
    with pytest.raises(StorageError, match="does not exist"):
        storage.list_files("s3://omniforge-no-such-bucket/x")
    assert not storage.exists("s3://omniforge-no-such-bucket")


def test_unreachable_endpoint_message(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 1)
    with pytest.raises(StorageError) as excinfo:
        storage.read_bytes("s3://bucket/key")
    message = str(excinfo.value)
    assert message.startswith("cannot reach S3 endpoint http://127.0.0.1:9 for s3://bucket/key")
    assert "AWS_ENDPOINT_URL" in message and "testing" not in message


def test_boto3_reads_endpoint_from_environment(s3_server):
    assert storage.s3_client().meta.endpoint_url == s3_server


def test_multipart_upload_arrives_whole(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = os.urandom(12 * 1024 * 1024 + 123)
    uri = storage.join(s3_bucket, "big/shard-000000.tar")
    with storage.atomic_writer(uri) as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
    bucket, key = uri[len("s3://") :].split("/", 1)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # three parts: it really was a multipart upload
    assert storage.size(uri) == len(data)
    assert storage.read_bytes(uri) == data
    assert storage.read_bytes(uri, 6 * 1024 * 1024, 10) == data[6 * 1024 * 1024 : 6 * 1024 * 1024 + 10]


def test_failed_multipart_upload_leaves_nothing(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    uri = storage.join(s3_bucket, "big/partial.tar")
    with pytest.raises(_Boom):
        with storage.atomic_writer(uri) as f:
            f.write(os.urandom(11 * 1024 * 1024))
            raise _Boom()
    assert not storage.exists(uri)
    bucket = s3_bucket[len("s3://") :]
    assert storage.s3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_body_read_is_retried_after_connection_reset(s3_bucket, monkeypatch):
    uri = storage.join(s3_bucket, "flaky.bin")
    data = _payload(50_000)
    storage.write_bytes(uri, data)
    monkeypatch.setattr(storage, "BODY_RETRY_BASE_DELAY", 0.0)
    client = storage.s3_client()
    real_get = client.get_object
    failures = {"left": 2}

    class _ResetBody:
        def read(self):
            raise ConnectionResetError("connection reset by peer")

        def close(self):
            pass

    def flaky_get_object(**kwargs):
        response = real_get(**kwargs)
        if failures["left"]:
            failures["left"] -= 1
            response["Body"].close()
            response["Body"] = _ResetBody()
        return response

    monkeypatch.setattr(client, "get_object", flaky_get_object)
    assert storage.read_bytes(uri, 100, 1000) == data[100:1100]
    assert failures["left"] == 0

    failures["left"] = storage.BODY_READ_ATTEMPTS  # more failures than attempts: a clear error
    with pytest.raises(StorageError, match="flaky.bin"):
        storage.read_bytes(uri)

import numpy as np
import pytest

from omniforge import codecs
from omniforge import shards, storage


def test_merge_orders_by_key_not_member_name(tmp_path):
    # "a" < "a-b" as keys, but "a-b.npy" < "a.npy" as names: webdataset needs key order
    p1, p2 = str(tmp_path / "p1.tar"), str(tmp_path / "p2.tar")
    shards.write_tar(p1, [("a.npy", b"1"), ("c.npy", b"3")])
    shards.write_tar(p2, [("a-b.npy", b"2")])
    out = str(tmp_path / "out.tar")
    assert shards.merge_tars([p1, p2], out) == 3
    assert [n for n, _ in shards.iter_tar(out)] == ["a.npy", "a-b.npy", "c.npy"]


def test_tars_are_byte_identical_for_identical_members(tmp_path):
    members = [("k1.json", codecs.encode("json", {"x": 1})), ("k2.npy", codecs.encode("npy", np.ones(3)))]
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    shards.write_tar(a, members)
    shards.write_tar(b, members)
    assert storage.read_bytes(a) == storage.read_bytes(b)


def test_status_roundtrip_sorted(tmp_path):
    uri = str(tmp_path / "_status" / "rgb" / "shard-000000.parquet")
    shards.write_status(uri, [
        {"key": "b", "ok": False, "error_type": "decode_error", "error_message": "bad", "fingerprint": "f",
         "seconds": 0.1},
        {"key": "a", "ok": True, "error_type": None, "error_message": None, "fingerprint": "f", "seconds": 0.2},
    ])
    rows = shards.read_status(uri).to_pylist()
    assert [r["key"] for r in rows] == ["a", "b"]
    assert rows[1]["error_type"] == "decode_error"


def test_codecs_refuse_pickles_and_wrong_types():
    with pytest.raises(TypeError):
        codecs.encode("npy", np.array([object()], dtype=object))
    with pytest.raises(TypeError):
        codecs.encode("jpg", np.zeros((4, 4), np.float32))
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    np.testing.assert_array_equal(codecs.decode("npy", codecs.encode("npy", arr)), arr)


def test_a_truncated_tar_yields_what_it_can_then_says_which_file(tmp_path):
    from omniforge.errors import CorruptShardError

    uri = str(tmp_path / "shard-000003.tar")
    members = [(f"k{i}.npy", codecs.encode("npy", np.full(300, i, np.int16))) for i in range(4)]
    shards.write_tar(uri, members)
    with open(uri, "rb") as f:
        data = f.read()
    with open(uri, "wb") as f:
        body = len(members[0][1])
        f.write(data[:2 * (512 + -(-body // 512) * 512) + 512 + 100])  # two whole members, then a cut body
    read = []
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar is not a readable tar .*after member 'k1\.npy'"):
        for name, _ in shards.iter_tar(uri):
            read.append(name)
    assert read == ["k0.npy", "k1.npy"]

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


def _embedding(n_valid=5, length=7, width=6):
    emb = np.zeros((1, length, width), np.float16)
    emb[0, :n_valid] = np.random.default_rng(0).normal(size=(n_valid, width))
    return {"emb": emb, "mask_valid": (np.arange(length) < n_valid)[None]}


def test_npz_is_what_numpy_reads_byte_identical_and_never_a_pickle():
    import io
    import zipfile

    value = _embedding()
    data = codecs.encode("npz", value)
    assert data == codecs.encode("npz", _embedding())  # fixed member times: the same arrays, the same bytes
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # how ml-4m loads it
        assert sorted(npz.files) == ["emb", "mask_valid"]
        np.testing.assert_array_equal(npz["emb"], value["emb"])
        assert npz["mask_valid"].dtype == bool
    decoded = codecs.decode("npz", data)
    assert set(decoded) == {"emb", "mask_valid"} and np.array_equal(decoded["emb"], value["emb"])
    buf = io.BytesIO()
    np.savez_compressed(buf, **value)  # a file written by numpy itself decodes too
    assert np.array_equal(codecs.decode("npz", buf.getvalue())["mask_valid"], value["mask_valid"])
    with pytest.raises(TypeError, match="object"):
        codecs.encode("npz", {"emb": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match="mapping"):
        codecs.encode("npz", value["emb"])
    pickled = io.BytesIO()
    np.savez(pickled, emb=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        codecs.decode("npz", pickled.getvalue())
    with pytest.raises(ValueError, match="not an npz"):
        codecs.decode("npz", codecs.encode("npy", np.ones(3)))
    other = io.BytesIO()
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="not an .npy"):
        codecs.decode("npz", other.getvalue())


def test_embedding_schema_names_what_is_wrong():
    shape = (7, 6)
    assert codecs.embedding_problem(_embedding(), shape) is None
    bad = [
        ({"emb": _embedding()["emb"]}, "expected the arrays emb and mask_valid"),
        ({**_embedding(), "emb": _embedding()["emb"].astype(np.float32)}, "emb is float32"),
        ({**_embedding(), "emb": np.zeros((1, 7, 5), np.float16)}, "expected float16 (n, 7, 6)"),
        ({**_embedding(), "mask_valid": np.ones((1, 7), np.uint8)}, "mask_valid is uint8"),
        ({**_embedding(), "mask_valid": np.zeros((1, 7), bool)}, "no valid position"),
        ({**_embedding(), "emb": np.full((1, 7, 6), np.inf, np.float16)}, "NaN or infinite"),
    ]
    for value, expected in bad:
        assert expected in codecs.embedding_problem(value, shape)


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

"""Shard files: the storage layout of DESIGN.md, tar members, status tables and the commit protocol.

A (modality, shard) is committed in two steps, each atomic: the tar is written to a temporary name and
moved into place, then its `_status` parquet is written. The status file is the commit marker: a tar
without a status is unfinished work and is redone.
"""

from __future__ import annotations

import heapq
import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from omniforge import storage
from omniforge.errors import ConfigError, CorruptShardError

MANIFEST = "manifest/corpus.parquet"
RUNS_DIR = "manifest/runs"
STATUS_DIR = "_status"
TMP_DIR = "_tmp"
_STATUS_NAME_RE = re.compile(r"shard-(\d+)\.parquet$")
CROP_SETTINGS = "crop_settings"  # beside tok_* folders: int32 (n_crops, 5) (top, left, h, w, hflip) per key

STATUS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("ok", pa.bool_()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("fingerprint", pa.string()),
    ("seconds", pa.float32()),
])

_TAR_MTIME = 0  # fixed metadata: the same labels give byte-identical tars


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def tar_uri(root: str, modality: str, shard: int) -> str:
    return storage.join(root, modality, f"{shard_name(shard)}.tar")


def status_uri(root: str, modality: str, shard: int) -> str:
    return storage.join(root, STATUS_DIR, modality, f"{shard_name(shard)}.parquet")


def manifest_uri(root: str) -> str:
    return storage.join(root, MANIFEST)


def member_key(name: str) -> str:
    """The key of a tar member `<key>.<ext>` (webdataset splits at the first dot)."""
    return name.split(".", 1)[0]


def write_tar(uri: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Atomically write a tar of (member name, bytes), in the order given. Returns the member count."""
    n = 0
    with storage.atomic_writer(uri) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _TAR_MTIME
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def iter_tar(uri: str) -> Iterator[tuple[str, bytes]]:
    """Stream (member name, bytes) of a tar, in file order. Member names are never used as paths.

    Raises CorruptShardError (after yielding the members before the damage) when the tar cannot be read."""
    last = None
    try:
        with storage.open_input(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                last = info.name
                yield info.name, data
    except tarfile.TarError as e:
        where = f"after member {last!r}" if last else "at its start"
        raise CorruptShardError(f"{uri} is not a readable tar ({e}, {where}): delete it and its _status table and "
                                "re-run the job that wrote it; `omniforge verify` lists every such shard") from None


def merge_tars(part_uris: list[str], out_uri: str) -> int:
    """Merge key-sorted part tars into one key-sorted tar (a streaming k-way merge). Returns the count.

    Members are ordered by key, not by member name: "a.jpg" must precede "a-b.jpg" as "a" < "a-b".
    """
    iterators = [iter_tar(u) for u in part_uris]
    return write_tar(out_uri, heapq.merge(*iterators, key=lambda m: member_key(m[0])))


def write_status(uri: str, rows: list[dict[str, Any]]) -> None:
    """Atomically write a status table (sorted by key): the commit marker of a (modality, shard)."""
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def read_status(uri: str) -> pa.Table:
    return read_parquet(uri)


def status_shards(root: str, folder: str) -> set[int]:
    """The shards of `folder` under `root` whose status table exists (their commit markers)."""
    found = set()
    for uri, _size in storage.list_files(storage.join(root, STATUS_DIR, folder), (".parquet",)):
        m = _STATUS_NAME_RE.search(uri)
        if m:
            found.add(int(m.group(1)))
    return found


def status_fingerprints(uri: str) -> set[str]:
    """The fingerprints a committed (modality, shard) was made with (one, when it is consistent)."""
    return set(read_status(uri).column("fingerprint").to_pylist())


def write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pa.Table:
    # Manifests and status tables are small: read them on this thread. Arrow's CPU pool threads, once
    # started, can abort the interpreter at exit (SIGABRT in their teardown, apache/arrow#34314), which
    # turned clean CLI exits into exit code 134 about one run in ten.
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), use_threads=False)


def load_manifest(root: str) -> pa.Table:
    """The shard plan of a corpus root (``manifest/corpus.parquet``): key, shard, source, ...."""
    uri = manifest_uri(storage.normalize(root))
    if not storage.exists(uri):
        raise ConfigError(f"{root} has no plan ({MANIFEST}): run `omniforge plan --input URI --output {root}` "
                          f"or pass --input to `omniforge label`")
    return read_parquet(uri)

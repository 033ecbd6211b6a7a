"""Corpus readers: image folders, webdataset tars and parquet files, local or on S3.

Readers do not decode images. The driver lists the corpus cheaply into :class:`ScanUnit` pieces
(:func:`list_units`); a Ray task scans one unit (:func:`scan_unit`) into :class:`SourceRecord` objects,
each carrying the image bytes once so the plan job can hash them and read the image size, plus a
locator (:meth:`SourceRecord.locator`) that the label job later hands to :func:`read_images` to fetch
the same bytes again without rescanning.

Readers never filter on content: zero-byte files and non-images with an image extension are returned
like any other sample so that the label job records them as failed with a reason.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from omniforge.errors import CorpusError, StorageError
from omniforge import storage

FORMATS = ("folder", "wds", "parquet")
FOLDER_UNIT_SIZE = 256  # image files per folder ScanUnit
FETCH_THREADS = 8  # concurrent reads of independent files / containers
PARQUET_SCAN_BATCH_ROWS = 64
PARQUET_BUFFER_SIZE = 1 << 20  # stream column chunks instead of loading whole row groups at once
MAX_CAPTION_BYTES = 1 << 20  # sidecar .txt / .json members larger than this are not read as captions

# Parquet column auto-detection, in priority order.
BYTES_COLUMNS = ("image", "jpg", "bytes")
PATH_COLUMNS = ("path", "file", "filepath", "image_path")
CAPTION_COLUMNS = ("caption", "text", "alt", "TEXT")
KEY_COLUMNS = ("key", "__key__", "id")

# Extensions Pillow registers but that are not plain image files (stub plugins without a decoder,
# video, PostScript/metafiles): files with these are not picked up as images from a folder.
_NON_IMAGE_EXTENSIONS = {".h5", ".hdf", ".bufr", ".grib", ".mpeg", ".mpg", ".ps", ".eps", ".emf", ".wmf"}
# webdataset's split of a member name into key and extension: key = up to the basename's first dot.
_WDS_NAME = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]*)$")
_WDS_META = re.compile(r"(^|/)__[^/]*__($|/)")  # "__meta__"-style members and directories: not samples
_COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


@dataclass(frozen=True)
class ScanUnit:
    """A piece of the corpus that one Ray task scans (built cheaply by the driver from listings).

    `paths`: folder: up to FOLDER_UNIT_SIZE image file uris; wds: one tar uri; parquet: one parquet uri.
    `sidecars`: folder only, parallel to `paths`: the uri of the image's ``.txt`` caption, or "".
    `options`: sorted (name, value) pairs, e.g. the resolved parquet columns; see :meth:`option`.
    """

    format: str
    root: str
    paths: tuple[str, ...]
    sidecars: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        """The value of one option, or `default`."""
        return dict(self.options).get(name, default)


@dataclass
class SourceRecord:
    """One sample found in the corpus, with its bytes (see the module docstring).

    `name`: natural key candidate (folder: path relative to the root with extension and '/'
    separators; wds: the sample's ``__key__``, with its directory; parquet: the key column, else the
    path column, else ""). `uri`: "<file uri>", "<tar uri>#<member name>" or "<parquet uri>#row=<i>".
    `format`: "file" | "tar" | "parquet". `path`: the file / tar / parquet holding the bytes.
    `offset`: tar: byte offset of the member's data; else 0. `size`: byte size of the image bytes.
    `row`: parquet: row index in the file; else -1. `column`: parquet: the image column; else None.
    `error`: why the bytes could not be read at scan time (then `data` is b"" and `size` -1, so the
    label job reads again and records the failure); None when they were read.
    """

    name: str
    uri: str
    format: str
    path: str
    offset: int
    size: int
    row: int
    caption: str | None
    data: bytes = field(repr=False)
    column: str | None = None
    error: str | None = None

    def locator(self) -> dict[str, Any]:
        """What :func:`read_images` needs to fetch these bytes again (store it in the manifest)."""
        return {
            "format": self.format,
            "path": self.path,
            "offset": self.offset,
            "size": self.size,
            "row": self.row,
            "column": self.column,
        }


# --------------------------------------------------------------------------------------------------
# Format detection and listing


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of files a folder corpus treats as images."""
    from PIL import Image

    registered = Image.registered_extensions()
    return frozenset(
        ext.lower() for ext, fmt in registered.items() if fmt in Image.OPEN and ext.lower() not in _NON_IMAGE_EXTENSIONS
    )


def _is_image_name(uri: str) -> bool:
    return os.path.splitext(uri)[1].lower() in image_extensions()


def _is_brace_pattern(uri: str) -> bool:
    return "{" in uri and "}" in uri


def detect_format(uri: str) -> str:
    """The format of a corpus: "wds" (a .tar file, a brace pattern of tars or a directory holding
    .tar files), "parquet" (a .parquet file or a directory of them) or "folder" (images).

    A directory with both .tar and .parquet files (img2dataset's webdataset output writes a metadata
    parquet beside each tar) is "wds". Raises CorpusError when the input is missing, empty or unknown.
    """
    if _is_brace_pattern(uri):
        return "wds"
    uri = storage.normalize(uri)
    single = _single_file_format(uri)
    if single and _is_file(uri):
        return single
    return _format_of_listing(uri, _list_input(uri))


def _single_file_format(uri: str) -> str | None:
    lower = uri.lower()
    if lower.endswith(".tar"):
        return "wds"
    if lower.endswith(".parquet"):
        return "parquet"
    return None


def _format_of_listing(uri: str, files: Sequence[tuple[str, int]]) -> str:
    names = [u.lower() for u, _ in files]
    if any(n.endswith(".tar") for n in names):
        return "wds"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(_is_image_name(n) for n in names):
        return "folder"
    raise CorpusError(
        f"no images, .tar or .parquet files found under {uri}: check the --input URI "
        "(a folder of images, webdataset .tar shards or .parquet files)"
    )


def _list_input(uri: str) -> list[tuple[str, int]]:
    """List a corpus directory; CorpusError when it does not exist (a plain file is not a directory)."""
    try:
        files = storage.list_files(uri)
        if not files and storage.exists(uri):
            if _is_file(uri):
                raise CorpusError(
                    f"{uri} is not a .tar, .parquet or a folder of images: pass a corpus directory, "
                    "a .tar / .parquet file, or a brace pattern of .tar shards"
                )
            raise CorpusError(f"{uri} is empty: check the --input URI")
    except storage.ObjectNotFound as exc:
        raise CorpusError(f"{uri} does not exist: check the --input URI") from exc
    if not files:
        raise CorpusError(f"{uri} does not exist: check the --input URI")
    return files


def _is_file(uri: str) -> bool:
    """True when `uri` is a file / object (not a directory or prefix)."""
    if not storage.is_s3(uri):
        return os.path.isfile(uri)
    try:
        storage.size(uri)
        return True
    except storage.ObjectNotFound:
        return False


def list_units(
    uri: str,
    fmt: str = "auto",
    *,
    path_column: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
) -> list[ScanUnit]:
    """Split a corpus into ScanUnits, in a deterministic order (sorted by uri).

    `fmt`: "auto" (see :func:`detect_format`), "folder", "wds" or "parquet". The column options apply
    to parquet corpora; unset ones are auto-detected from the first file's schema (footer only) and
    the resolved names are stored in every unit. Raises CorpusError for a missing or empty input, an
    unknown format or unusable parquet columns.
    """
    if fmt not in ("auto", *FORMATS):
        raise CorpusError(f"unknown corpus format {fmt!r}: pass --format auto, folder, wds or parquet")
    if _is_brace_pattern(uri):
        if fmt not in ("auto", "wds"):
            raise CorpusError(f"brace patterns name webdataset tars, not a {fmt} corpus: pass --format wds")
        return _wds_units(uri, _expand_braces(uri))

    root = storage.normalize(uri)
    single = _single_file_format(root)
    if single is not None and fmt in ("auto", single) and _is_file(root):
        files = [(root, 0)]
        fmt = single
    else:
        files = _list_input(root)
        if fmt == "auto":
            fmt = _format_of_listing(root, files)

    if fmt == "folder":
        return _folder_units(root, files)
    if fmt == "wds":
        return _wds_units(root, [u for u, _ in files if u.lower().endswith(".tar")])
    columns = {"path_column": path_column, "image_column": image_column}
    columns |= {"caption_column": caption_column, "key_column": key_column}
    return _parquet_units(root, [u for u, _ in files if u.lower().endswith(".parquet")], columns)


def _folder_units(root: str, files: Sequence[tuple[str, int]]) -> list[ScanUnit]:
    images = [u for u, _ in files if _is_image_name(u)]
    if not images:
        raise CorpusError(f"no image files found under {root}: check the --input URI or pass --format")
    captions = {os.path.splitext(u)[0]: u for u, _ in files if u.lower().endswith(".txt")}
    sidecars = [captions.get(os.path.splitext(u)[0], "") for u in images]
    return [
        ScanUnit(
            format="folder",
            root=root,
            paths=tuple(images[i : i + FOLDER_UNIT_SIZE]),
            sidecars=tuple(sidecars[i : i + FOLDER_UNIT_SIZE]),
        )
        for i in range(0, len(images), FOLDER_UNIT_SIZE)
    ]


def _expand_braces(pattern: str) -> list[str]:
    """Expand a brace pattern of tar shards; every named shard must exist."""
    from braceexpand import braceexpand

    uris = [storage.normalize(u) for u in braceexpand(pattern)]
    parents = sorted({u.rsplit("/", 1)[0] for u in uris})
    present: set[str] = set()
    for parent in parents:
        try:
            present |= {u for u, _ in storage.list_files(parent, (".tar",))}
        except storage.ObjectNotFound as exc:
            raise CorpusError(f"{parent} does not exist: check the --input URI") from exc
    missing = [u for u in uris if u not in present]
    if missing:
        raise CorpusError(
            f"{len(missing)} of the {len(uris)} tars named by {pattern} do not exist (first: {missing[0]}): "
            "fix the --input pattern"
        )
    return uris


def _wds_units(root: str, tars: Sequence[str]) -> list[ScanUnit]:
    if not tars:
        raise CorpusError(f"no .tar files found under {root}: check the --input URI or pass --format")
    return [ScanUnit(format="wds", root=root, paths=(tar,)) for tar in sorted(dict.fromkeys(tars))]


def _parquet_units(root: str, files: Sequence[str], columns: Mapping[str, str | None]) -> list[ScanUnit]:
    if not files:
        raise CorpusError(f"no .parquet files found under {root}: check the --input URI or pass --format")
    with storage.open_input(files[0]) as f:
        schema = pq.ParquetFile(f).schema_arrow
    resolved = _resolve_columns(files[0], schema, columns)
    options = tuple(sorted((k, v) for k, v in resolved.items() if v))
    return [ScanUnit(format="parquet", root=root, paths=(path,), options=options) for path in files]


# --------------------------------------------------------------------------------------------------
# Parquet columns


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_image_struct(t: pa.DataType) -> bool:
    """HF datasets' Image feature: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(t):
        return False
    names = [t.field(i).name for i in range(t.num_fields)]
    return "bytes" in names and _is_binary(t.field("bytes").type)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _resolve_columns(uri: str, schema: pa.Schema, requested: Mapping[str, str | None]) -> dict[str, str | None]:
    """Pick the image (bytes or struct), path, caption and key columns of a parquet schema.

    Returns {"image_column", "image_kind" ("bytes" | "struct" | "path"), "path_column",
    "caption_column", "key_column"}; raises CorpusError on a missing, mistyped or ambiguous column.
    """
    types = {f.name: f.type for f in schema}

    def explicit(option: str, flag: str) -> str | None:
        name = requested.get(option)
        if name is not None and name not in types:
            raise CorpusError(f"{uri} has no column {name!r} (columns: {_describe(schema)}): fix {flag}")
        return name

    image = explicit("image_column", "--image-column")
    path = explicit("path_column", "--path-column")
    caption = explicit("caption_column", "--caption-column")
    key = explicit("key_column", "--key-column")

    if image is not None and not (_is_binary(types[image]) or _is_image_struct(types[image])):
        raise CorpusError(
            f"{uri}: column {image!r} is {types[image]}, not image bytes or a {{bytes, path}} struct: "
            "fix --image-column"
        )
    if path is not None and not _is_string(types[path]):
        raise CorpusError(f"{uri}: column {path!r} is {types[path]}, not a string: fix --path-column")
    if image is None and path is None:
        image = _auto_image_column(uri, schema)
    if path is None:
        path = next((n for n in PATH_COLUMNS if n in types and _is_string(types[n])), None)
    if image is None and path is None:
        raise CorpusError(
            f"{uri} has no image column (columns: {_describe(schema)}): pass --image-column "
            "(a bytes or {bytes, path} struct column) or --path-column (file paths)"
        )
    caption = caption or next((n for n in CAPTION_COLUMNS if n in types), None)
    key = key or next((n for n in KEY_COLUMNS if n in types), None)
    kind = "path" if image is None else ("struct" if _is_image_struct(types[image]) else "bytes")
    return {
        "image_column": image,
        "image_kind": kind,
        "path_column": path,
        "caption_column": caption,
        "key_column": key,
    }


def _auto_image_column(uri: str, schema: pa.Schema) -> str | None:
    """The one bytes column with a conventional name, or the one {bytes, path} struct; None if neither."""
    candidates = [f.name for f in schema if _is_image_struct(f.type)]
    candidates += [n for n in BYTES_COLUMNS if n in schema.names and _is_binary(schema.field(n).type)]
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) > 1:
        raise CorpusError(
            f"{uri} has several image columns ({', '.join(candidates)}; columns: {_describe(schema)}): "
            "pass --image-column"
        )
    return candidates[0] if candidates else None


# --------------------------------------------------------------------------------------------------
# Scanning


def scan_unit(unit: ScanUnit) -> Iterator[SourceRecord]:
    """Yield every sample of one unit, with its bytes, in a deterministic order."""
    if unit.format == "folder":
        yield from _scan_folder(unit)
    elif unit.format == "wds":
        yield from _scan_tar(unit.paths[0])
    elif unit.format == "parquet":
        yield from _scan_parquet(unit)
    else:
        raise CorpusError(f"unknown ScanUnit format {unit.format!r}: expected one of {', '.join(FORMATS)}")


def _fetch_all(uris: Sequence[str]) -> list[bytes | Exception]:
    """Read several whole files concurrently; a failure is returned in place of its bytes."""

    def fetch(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri)
        except (StorageError, OSError) as exc:
            return exc

    if len(uris) <= 1:
        return [fetch(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(uris))) as pool:
        return list(pool.map(fetch, uris))


def _decode_caption(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


def _relative_name(root: str, uri: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]


def _scan_folder(unit: ScanUnit) -> Iterator[SourceRecord]:
    sidecars = unit.sidecars or ("",) * len(unit.paths)
    for start in range(0, len(unit.paths), FETCH_THREADS * 4):
        paths = unit.paths[start : start + FETCH_THREADS * 4]
        captions = sidecars[start : start + FETCH_THREADS * 4]
        images = _fetch_all(paths)
        caption_data = _fetch_all([c for c in captions if c])
        caption_by_uri = dict(zip([c for c in captions if c], caption_data, strict=True))
        for path, sidecar, data in zip(paths, captions, images, strict=True):
            caption_bytes = caption_by_uri.get(sidecar) if sidecar else None
            caption = _decode_caption(caption_bytes) if isinstance(caption_bytes, bytes) else None
            yield _file_record(_relative_name(unit.root, path), path, data, caption)


def _file_record(name: str, uri: str, data: bytes | Exception, caption: str | None) -> SourceRecord:
    error = None if isinstance(data, bytes) else str(data)
    payload = data if isinstance(data, bytes) else b""
    return SourceRecord(
        name=name,
        uri=uri,
        format="file",
        path=uri,
        offset=0,
        size=len(payload) if error is None else -1,  # -1: unknown, read_images does not check it
        row=-1,
        caption=caption,
        data=payload,
        error=error,
    )


# ---- webdataset tars


def _split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's (key, extension) of a member name, or None for names it would skip."""
    match = _WDS_NAME.match(name)
    if not match or _WDS_META.search(match.group(1)):
        return None
    return match.group(1), match.group(2)


def _check_uncompressed(uri: str, f: Any) -> None:
    head = f.peek(8)[:8]
    if head.startswith(_COMPRESSION_MAGIC):
        raise CorpusError(f"{uri} is a compressed tar: samples are read by byte offset, so decompress the shards first")


@dataclass
class _TarSample:
    key: str
    image: tuple[str, int, int, bytes] | None = None  # member name, data offset, size, bytes
    txt: str | None = None
    json_caption: str | None = None

    def record(self, tar_uri: str) -> SourceRecord | None:
        if self.image is None:
            return None
        member, offset, size, data = self.image
        return SourceRecord(
            name=self.key,
            uri=f"{tar_uri}#{member}",
            format="tar",
            path=tar_uri,
            offset=offset,
            size=size,
            row=-1,
            caption=self.txt if self.txt is not None else self.json_caption,
            data=data,
        )


def _scan_tar(uri: str) -> Iterator[SourceRecord]:
    """Stream a tar sequentially, grouping adjacent members by key (webdataset convention)."""
    image_exts = {e.lstrip(".") for e in image_extensions()}
    current: _TarSample | None = None
    with storage.open_input(uri) as f:
        if not f.peek(1):  # type: ignore[attr-defined]
            return  # a zero-byte shard holds no samples
        _check_uncompressed(uri, f)
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    parts = _split_member_name(info.name) if info.isreg() else None
                    if parts is None:
                        continue
                    key, ext = parts
                    if current is None or key != current.key:
                        if current is not None and (record := current.record(uri)) is not None:
                            yield record
                        current = _TarSample(key)
                    _add_member(current, tar, info, ext.lower(), image_exts)
        except tarfile.TarError as exc:
            raise CorpusError(f"{uri} is not a readable tar ({exc}): re-create or remove this shard") from exc
    if current is not None and (record := current.record(uri)) is not None:
        yield record


def _add_member(
    sample: _TarSample, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, image_exts: set[str]
) -> None:
    """Take an image, .txt or .json member into `sample` (the first image member of a key wins)."""
    if ext in image_exts and sample.image is None:
        data = _read_member(tar, info)
        sample.image = (info.name, info.offset_data, info.size, data)
    elif ext == "txt" and info.size <= MAX_CAPTION_BYTES:
        sample.txt = _decode_caption(_read_member(tar, info))
    elif ext == "json" and info.size <= MAX_CAPTION_BYTES:
        sample.json_caption = _json_caption(_read_member(tar, info))


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    member = tar.extractfile(info)
    return member.read() if member is not None else b""


def _json_caption(data: bytes) -> str | None:
    """The "caption" field of img2dataset's per-sample json, if it is a string."""
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption.strip() if isinstance(caption, str) else None


# ---- parquet


def _parquet_file(f: Any) -> pq.ParquetFile:
    return pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_SIZE, pre_buffer=False)


def _resolve_path(parquet_uri: str, value: str) -> str:
    """A path column value as a uri: absolute paths and URIs as is, relative ones beside the parquet."""
    if storage.is_s3(value) or value.startswith(storage.FILE_SCHEME):
        return storage.normalize(value)
    if storage.is_s3(parquet_uri):
        return storage.join(parquet_uri.rsplit("/", 1)[0], value)
    return os.path.normpath(os.path.join(os.path.dirname(parquet_uri), value))


def _scan_parquet(unit: ScanUnit) -> Iterator[SourceRecord]:
    uri = unit.paths[0]
    with storage.open_input(uri) as f:
        pf = _parquet_file(f)
        cols = _unit_columns(unit, uri, pf.schema_arrow)
        names = ("image_column", "path_column", "caption_column", "key_column")
        wanted = list(dict.fromkeys(cols[n] for n in names if cols[n]))
        row = 0
        for batch in pf.iter_batches(batch_size=PARQUET_SCAN_BATCH_ROWS, columns=wanted):
            yield from _parquet_batch_records(uri, cols, batch.to_pydict(), row, batch.num_rows)
            row += batch.num_rows


def _unit_columns(unit: ScanUnit, uri: str, schema: pa.Schema) -> dict[str, str | None]:
    """The unit's resolved columns, re-checked against this file's schema."""
    requested = {name: unit.option(name) for name in ("image_column", "path_column", "caption_column", "key_column")}
    cols = _resolve_columns(uri, schema, requested)
    if unit.option("image_kind") and cols["image_kind"] != unit.option("image_kind"):
        raise CorpusError(f"{uri}: its image column differs from the corpus' first file: pass --image-column")
    return cols


def _parquet_batch_records(
    uri: str, cols: Mapping[str, str | None], data: Mapping[str, list[Any]], first_row: int, n: int
) -> Iterator[SourceRecord]:
    image_col, path_col = cols["image_column"], cols["path_column"]
    images: list[Any] = data[image_col] if image_col else [None] * n
    paths: list[Any] = data[path_col] if path_col else [None] * n
    if cols["image_kind"] == "struct":
        paths = [(v or {}).get("path") or p for v, p in zip(images, paths, strict=True)]
        images = [(v or {}).get("bytes") for v in images]
    captions = data[cols["caption_column"]] if cols["caption_column"] else [None] * n
    keys = data[cols["key_column"]] if cols["key_column"] else [None] * n

    # Rows without inline bytes are read from the file their path names.
    external = {i: _resolve_path(uri, paths[i]) for i in range(n) if images[i] is None and paths[i]}
    fetched = dict(zip(external, _fetch_all(list(external.values())), strict=True))
    for i in range(n):
        name = str(keys[i]) if keys[i] is not None else (str(paths[i]) if paths[i] else "")
        caption = None if captions[i] is None else str(captions[i])
        if images[i] is not None:
            yield _parquet_record(uri, first_row + i, image_col, name, caption, bytes(images[i]))
        elif i in external:
            yield _file_record(name, external[i], fetched[i], caption)
        else:
            record = _parquet_record(uri, first_row + i, image_col, name, caption, b"")
            record.error, record.size = "row has neither image bytes nor a path", -1
            yield record


def _parquet_record(
    uri: str, row: int, column: str | None, name: str, caption: str | None, data: bytes
) -> SourceRecord:
    return SourceRecord(
        name=name,
        uri=f"{uri}#row={row}",
        format="parquet",
        path=uri,
        offset=0,
        size=len(data),
        row=row,
        caption=caption,
        data=data,
        column=column,
    )


# --------------------------------------------------------------------------------------------------
# Label-time reads


def read_images(records: Sequence[Mapping[str, Any]]) -> list[bytes | Exception]:
    """Fetch the image bytes of records located by :meth:`SourceRecord.locator` dicts.

    Records are grouped by container so each tar / parquet file is opened once: tar members are ranged
    reads at (offset, size), nearby ones coalesced into one request; parquet rows are read from the
    row groups that hold them, one column, streaming; files are read whole. Containers are read
    concurrently. Returns, in order, the bytes or the Exception for each record (never raises for one
    bad record; a size that differs from the recorded one is an error: the source changed).
    """
    results: list[bytes | Exception] = [ValueError("not read")] * len(records)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        fmt = rec.get("format")
        if fmt not in ("file", "tar", "parquet"):
            results[i] = ValueError(f"unknown record format {fmt!r}: expected file, tar or parquet")
            continue
        # Tars and parquets are grouped per container; files form one group (read concurrently).
        groups[(fmt, "" if fmt == "file" else str(rec["path"]))].append(i)

    def run(group: tuple[tuple[str, str], list[int]]) -> None:
        (fmt, _), indices = group
        subset = [records[i] for i in indices]
        try:
            values = _READERS[fmt](subset)
        except Exception as exc:  # noqa: BLE001 - the container failed: every record in it fails
            values = [exc] * len(subset)
        for i, value in zip(indices, values, strict=True):
            results[i] = _checked(records[i], value)

    items = list(groups.items())
    if len(items) <= 1:
        for item in items:
            run(item)
    else:
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(items))) as pool:
            list(pool.map(run, items))
    return results


def _checked(record: Mapping[str, Any], value: bytes | Exception) -> bytes | Exception:
    expected = record.get("size")
    if isinstance(value, bytes) and expected is not None and int(expected) >= 0 and len(value) != int(expected):
        return StorageError(
            f"{record.get('path')}: expected {expected} bytes, read {len(value)}: "
            "the source changed since plan; re-run plan"
        )
    return value


def _read_files(records: Sequence[Mapping[str, Any]]) -> list[bytes | Exception]:
    return _fetch_all([str(r["path"]) for r in records])


# Ranged reads of one tar are merged when the gap between them is small (fewer S3 requests).
COALESCE_MAX_GAP = 1 << 20
COALESCE_MAX_SPAN = 64 << 20


def _read_tar_members(records: Sequence[Mapping[str, Any]]) -> list[bytes | Exception]:
    path = str(records[0]["path"])
    order = sorted(range(len(records)), key=lambda i: int(records[i]["offset"]))
    out: list[bytes | Exception] = [b""] * len(records)
    for span in _coalesce([(int(records[i]["offset"]), int(records[i]["size"]), i) for i in order]):
        start = span[0][0]
        end = max(off + size for off, size, _ in span)
        try:
            blob = storage.read_bytes(path, start, end - start)
        except (StorageError, OSError) as exc:
            for _, _, i in span:
                out[i] = exc
            continue
        for off, size, i in span:
            out[i] = blob[off - start : off - start + size]
    return out


def _coalesce(ranges: Iterable[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Group (offset, size, index) ranges sorted by offset into spans read with one request each."""
    spans: list[list[tuple[int, int, int]]] = []
    end = start = 0
    for rng in ranges:
        off, size, _ = rng
        if spans and off - end <= COALESCE_MAX_GAP and off + size - start <= COALESCE_MAX_SPAN:
            spans[-1].append(rng)
            end = max(end, off + size)
        else:
            spans.append([rng])
            start, end = off, off + size
    return spans


def _read_parquet_rows(records: Sequence[Mapping[str, Any]]) -> list[bytes | Exception]:
    path = str(records[0]["path"])
    out: list[bytes | Exception] = [ValueError("not read")] * len(records)
    with storage.open_input(path) as f:
        pf = _parquet_file(f)
        column = records[0].get("column") or _resolve_columns(path, pf.schema_arrow, {})["image_column"]
        if column is None or column not in pf.schema_arrow.names:
            raise CorpusError(f"{path} has no image column {column!r}: re-run plan")
        is_struct = _is_image_struct(pf.schema_arrow.field(column).type)
        starts = _row_group_starts(pf)
        wanted: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, rec in enumerate(records):
            row = int(rec["row"])
            if not 0 <= row < starts[-1]:
                out[i] = IndexError(f"{path} has no row {row}: the source changed since plan; re-run plan")
                continue
            group = _row_group_of(starts, row)
            wanted[group][row - starts[group]].append(i)
        for group in sorted(wanted):
            for local_row, value in _read_rows(pf, group, column, is_struct, wanted[group]):
                for i in wanted[group][local_row]:
                    out[i] = value
    return out


def _row_group_starts(pf: pq.ParquetFile) -> list[int]:
    """First row index of every row group, plus the total row count at the end."""
    starts = [0]
    for g in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
    return starts


def _row_group_of(starts: Sequence[int], row: int) -> int:
    import bisect

    return bisect.bisect_right(starts, row) - 1


def _read_rows(
    pf: pq.ParquetFile, group: int, column: str, is_struct: bool, rows: Mapping[int, Any]
) -> Iterator[tuple[int, bytes | Exception]]:
    """Stream one column of one row group up to the last wanted row, yielding the wanted values."""
    last = max(rows)
    offset = 0
    for batch in pf.iter_batches(batch_size=PARQUET_SCAN_BATCH_ROWS, row_groups=[group], columns=[column]):
        array = batch.column(0)
        if is_struct:
            array = array.field("bytes")
        for r in range(offset, offset + batch.num_rows):
            if r in rows:
                value = array[r - offset].as_py()
                yield r, bytes(value) if value is not None else ValueError("the row's image bytes are null")
        offset += batch.num_rows
        if offset > last:
            return


_READERS = {"file": _read_files, "tar": _read_tar_members, "parquet": _read_parquet_rows}

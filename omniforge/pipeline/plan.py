"""`omniforge plan`: stable sample keys and the deterministic shard plan in `manifest/corpus.parquet`.

The plan is computed once per output root and reused by every later job: a modality added next month
lands in the same shard numbers with the same keys. Scanning (reading every image once to hash it and
read its size from the header) runs as Ray tasks, one per piece of the corpus.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import pyarrow as pa

from omniforge.errors import ConfigError, CorpusError
from omniforge import shards, storage
from omniforge.pipeline import corpus
from omniforge._progress import Progress
from omniforge.pipeline._job import check_shared_output
from omniforge.pipeline._ray import ensure_ray

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.int32()),
    ("source_uri", pa.string()),
    ("byte_size", pa.int64()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption", pa.string()),
    # where the label job fetches the bytes again (see corpus.read_images)
    ("format", pa.string()),
    ("path", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("row", pa.int64()),
    ("column", pa.string()),
])


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    input: str
    output: str
    shard_size: int = 1000
    format: str = "auto"
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    path_column: str | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.format not in ("auto", "folder", "wds", "parquet"):
            raise ConfigError(f"--format must be one of auto, folder, wds, parquet; got {self.format!r}")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def candidate_key(name: str, sha256: str) -> str:
    """The key a source would get on its own: a sanitized name, hashed where sanitizing lost information.

    Folder separators become "_" and an image file extension is dropped; any other character outside
    [A-Za-z0-9_-] (dots, spaces, unicode) is replaced and a short hash of the original name appended.
    Without a name, the content hash is the key.
    """
    stem = name.strip("/")
    base, dot, ext = stem.rpartition(".")
    if dot and "/" not in ext and f".{ext.lower()}" in corpus.image_extensions():
        stem = base
    if not stem:
        return f"sha256-{sha256[:20]}"
    parts = [p for p in stem.split("/") if p]
    key = "_".join(_UNSAFE.sub("_", p) for p in parts)
    if _UNSAFE.search("".join(parts)) or len(key) > MAX_KEY_LENGTH or not key.strip("_-"):
        key = f"{key[:MAX_KEY_LENGTH - 9]}-{_short_hash(name)}"
    return key


def assign_keys(names: list[str], uris: list[str], sha256s: list[str]) -> list[str]:
    """Unique keys for a whole corpus. Colliding candidates all get a short hash of their source uri."""
    keys = [candidate_key(n, s) for n, s in zip(names, sha256s)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    for k, idx in groups.items():
        if len(idx) > 1:
            for i in idx:
                keys[i] = f"{k[:MAX_KEY_LENGTH - 9]}-{_short_hash(uris[i])}"
    if len(set(keys)) != len(keys):  # identical source uris listed twice: a broken corpus listing
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise CorpusError(f"the corpus lists the same source more than once (keys {dupes}); remove the duplicates")
    return keys


def _scan(unit_dict: dict) -> list[dict]:
    """Ray task: read every image of one scan unit once, hash it and read its size from the header."""
    from PIL import Image

    unit = corpus.ScanUnit(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                              for k, v in unit_dict.items()})
    rows = []
    for rec in corpus.scan_unit(unit):
        width = height = None
        try:
            with Image.open(io.BytesIO(rec.data)) as img:
                width, height = img.size
        except Exception:  # noqa: BLE001 - unreadable images are planned too; the label job records why
            pass
        row = {k: v for k, v in asdict(rec).items() if k not in ("data", "error")}
        row.update(sha256=hashlib.sha256(rec.data).hexdigest(), width=width, height=height)
        rows.append(row)
    return rows


def plan(cfg: PlanConfig, *, ray_address: str | None = None, progress_bar: bool = True) -> pa.Table:
    """Scan the corpus and write `manifest/corpus.parquet`, or return the existing plan of this output.

    Re-planning an output root is refused when it was planned from another input: keys and shard numbers
    are a contract with every modality already written there.
    """
    uri = shards.manifest_uri(storage.normalize(cfg.output))
    if storage.exists(uri):
        table = shards.read_parquet(uri)
        meta = _plan_meta(table)
        if meta.get("input") and storage.normalize(meta["input"]) != storage.normalize(cfg.input):
            raise ConfigError(f"{cfg.output} was planned from {meta['input']}, not {cfg.input}: "
                              f"use a new --output for another corpus")
        return table

    t0 = time.time()
    units = corpus.list_units(cfg.input, cfg.format, image_column=cfg.image_column,
                              caption_column=cfg.caption_column, key_column=cfg.key_column,
                              path_column=cfg.path_column)
    ensure_ray(ray_address)
    check_shared_output(storage.normalize(cfg.output), "--output")  # the label job's workers write there
    import ray.data

    ds = ray.data.from_items([asdict(u) for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.flat_map(_scan)
    progress = Progress(total=None, unit="img", desc="plan", enabled=progress_bar)
    records = []
    for row in ds.iter_rows():
        records.append(row)
        progress.update(1)
    progress.close()
    if not records:
        raise CorpusError(f"no images found in {cfg.input}: check the --input URI and --format")
    records.sort(key=lambda r: r["uri"])
    keys = assign_keys([r["name"] for r in records], [r["uri"] for r in records], [r["sha256"] for r in records])
    order = sorted(range(len(records)), key=keys.__getitem__)
    rows = []
    for rank, i in enumerate(order):
        r = records[i]
        rows.append({
            "key": keys[i], "shard": rank // cfg.shard_size, "source_uri": r["uri"], "byte_size": r["size"],
            "sha256": r["sha256"], "width": r["width"], "height": r["height"], "caption": r["caption"],
            "format": r["format"], "path": r["path"], "offset": r["offset"], "size": r["size"], "row": r["row"],
            "column": r.get("column"),
        })
    meta = {"input": storage.normalize(cfg.input), "format": units[0].format, "shard_size": cfg.shard_size,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "num_samples": len(rows)}
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(
        {"omniforge.plan": json.dumps(meta)})
    shards.write_parquet(uri, table)
    log.info("planned %d samples in %d shards in %.1fs -> %s", len(rows), rows[-1]["shard"] + 1,
             time.time() - t0, uri)
    return table


def _plan_meta(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(b"omniforge.plan")
    return json.loads(raw) if raw else {}


def num_shards(manifest: pa.Table) -> int:
    import pyarrow.compute as pc

    return int(pc.max(manifest["shard"]).as_py()) + 1 if manifest.num_rows else 0

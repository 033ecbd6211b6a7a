"""`omniforge show`: draw every modality of one sample into a PNG."""

from __future__ import annotations

import io

import pyarrow.compute as pc

from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.modalities import MODALITIES
from omniforge.pipeline import shards, storage
from omniforge.pipeline.plan import load_manifest
from omniforge.pipeline.verify import discover_modalities


def load_sample(root: str, key: str, modalities: list[str] | None = None) -> tuple[dict, dict[str, str]]:
    """Decoded labels of one key, and failure reasons of the modalities where it failed."""
    root = storage.normalize(root)
    manifest = load_manifest(root)
    rows = manifest.filter(pc.equal(manifest["key"], key))
    if rows.num_rows == 0:
        sample_keys = manifest.column("key").slice(0, 5).to_pylist()
        raise ConfigError(f"key {key!r} is not in {root}; keys look like {sample_keys}")
    shard = rows.column("shard")[0].as_py()
    values, failures = {}, {}
    for m in modalities or discover_modalities(root):
        status_uri = shards.status_uri(root, m, shard)
        if not storage.exists(status_uri):
            failures[m] = "not labeled yet"
            continue
        status = {r["key"]: r for r in shards.read_status(status_uri).to_pylist()}
        row = status.get(key)
        if row is None:
            failures[m] = "missing from status"
        elif not row["ok"]:
            failures[m] = f"{row['error_type']}: {row['error_message']}"
        else:
            ext = MODALITIES[m].ext if m in MODALITIES else None
            for name, data in shards.iter_tar(shards.tar_uri(root, m, shard)):
                if shards.member_key(name) == key:
                    values[m] = codecs.decode(ext or name.split(".", 1)[1], data)
                    break
            else:
                failures[m] = "missing from tar"
    return values, failures


def show(root: str, key: str, out: str, modalities: list[str] | None = None) -> str:
    from omniforge.pipeline._render import render_sample

    values, failures = load_sample(root, key, modalities)
    image = render_sample(key, values, failures=failures)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
    return out

"""`omniforge show`: draw every modality of one sample into a PNG."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.compute as pc

from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.modalities import all_modalities, token_folders
from omniforge import shards, storage
from omniforge.shards import load_manifest
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
    exts = {m.name: m.ext for m in all_modalities()}
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
            ext = exts.get(m)
            for name, data in shards.iter_tar(shards.tar_uri(root, m, shard)):
                if shards.member_key(name) == key:
                    values[m] = codecs.decode(ext or name.split(".", 1)[1], data)
                    break
            else:
                failures[m] = "missing from tar"
    return values, failures


def decode_tokens(values: dict, tokenizers: str) -> dict[str, object]:
    """Crop 0 of every token modality among `values`, decoded back by its tokenizer kind: image-like and global
    modalities as label arrays (drawn like the label, to compare), sequences as their text. A tokenizer that cannot
    decode here (a released ml-4m tokenizer whose decoder is a diffusion model) gives the one line saying so."""
    from omniforge.errors import NoDecoderError
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    store = TokenizerStore(tokenizers)
    out: dict[str, object] = {}
    for info in token_folders():  # every size's folder (tok_rgb@448 decodes at 448)
        folder = info.token_modality
        if folder not in values:
            continue
        ids = np.asarray(values[folder])[0]
        try:
            out[f"{info.name} (decoded from {folder}, crop 0)"] = kind_for(info).decode(ids, store)
        except NoDecoderError as e:
            out[f"{info.name} ({folder}, crop 0, not decoded)"] = str(e)
    return out


def load_generated(directory: str, modalities: list[str] | None = None) -> dict[str, object]:
    """What `omniforge sample` wrote for one key (SAMPLES/<key>/): token rows ``<folder>.npy`` (1, N) under their
    folder names, and decoded outputs (``.png``, ``.decoded.npy``, ``.decoded.json``, ``.txt``) under their modality
    names."""
    import os

    from PIL import Image

    names = {m.token_modality: m.name for m in token_folders()}
    values: dict[str, object] = {}
    for file in sorted(os.listdir(directory)):
        path = os.path.join(directory, file)
        folder, _, ext = file.partition(".")
        if folder not in names or (modalities and folder not in modalities and names[folder] not in modalities):
            continue
        panel = f"{names[folder]} (generated, decoded from {folder})"
        if ext == "npy":
            values[folder] = np.load(path, allow_pickle=False)
        elif ext == "decoded.npy":
            values[panel] = np.load(path, allow_pickle=False)
        elif ext == "decoded.json":  # a sequence kind's label (human_poses' people)
            with open(path, "rb") as f:
                values[panel] = codecs.decode("json", f.read())
        elif ext == "png":
            with Image.open(path) as img:
                values[panel] = np.asarray(img)
        elif ext == "txt":
            with open(path, encoding="utf-8") as f:
                values[panel] = f.read().strip()
    return values


def show(root: str, key: str, out: str, modalities: list[str] | None = None, *, tokenizers: str | None = None) -> str:
    """Draw one key of a corpus root, or of an `omniforge sample` output directory (ROOT/<key>/ written by it)."""
    import os

    from omniforge._render import render_sample

    generated = os.path.join(root, key)
    if not storage.is_s3(root) and not storage.exists(shards.manifest_uri(root)) and os.path.isdir(generated):
        values = load_generated(generated, modalities)
        if not values:
            raise ConfigError(f"{generated} holds no outputs of `omniforge sample` (<folder>.npy, .png, .txt)")
        if tokenizers:  # decode the token rows again; drop the decoded files written beside them
            values = {m: v for m, v in values.items() if m.startswith("tok_")}
            values = decode_tokens(values, tokenizers)
        image = render_sample(key, values, title=f"{key}: generated by omniforge sample")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        storage.write_bytes(out, buf.getvalue())
        return out
    values, failures = load_sample(root, key, modalities)
    if tokenizers:  # labels beside what their tokens decode to, instead of raw token ids
        decoded = decode_tokens(values, tokenizers)
        values = {m: v for m, v in values.items() if not m.startswith("tok_") and m != "crop_settings"}
        values.update(decoded)
    image = render_sample(key, values, failures=failures)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
    return out

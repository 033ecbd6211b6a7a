"""`omniforge export --dialect ml4m ROOT OUT`: the corpus as ml-4m's own loader reads it.

Most of omniforge's folders are already in ml-4m's format (rgb, caption, det, metadata, color_palette,
depth, normal, semseg_coco, the tok_* folders and crop_settings: see the README's compatibility table); they
are linked (or copied, on S3 or with `copy`) under `OUT/<folder>/` with the same shard names. Two rules of
ml-4m's loader shape the rest:

- sam_instance: ml-4m reads it pre-tokenized, as a pickled `.npy` object array per key (one dict per crop:
  "points", a list per instance of its polygons, int32 (n, 1, 2) [x, y] in the 224 x 224 crop, largest first;
  "token_ids", int32 (instances, 16) from the SAM-mask tokenizer; "bbox", int32 (instances, 4) [ymin, xmin,
  ymax, xmax]), the format its SAMInstanceTokTransform loads with `allow_pickle=True`. omniforge never writes
  a pickle by default, so export makes these files from the native labels, the corpus' crop_settings and
  the SAM-mask tokenizer (`tokenizers`);
- human_poses: ml-4m's HumanPoseTransform needs each person's pose tokens in the JSON ("pose_tokenized", N x 8),
  so export writes `<key>.json` as the label plus those, from the pose tokenizer (`tokenizers`; ml-4m crops the
  boxes itself);
- every folder of a shard must hold the same keys in the same order (ml-4m silently drops samples when a
  tar ends early): export keeps, per shard, the keys present in every exported folder, links a tar that
  holds exactly those and rewrites one that holds more, and counts what it left out.

Folders ml-4m cannot read (registry `ml4m="none"`: human_keypoints, which is not a 4M-21 modality) are
left out with the reason. The registry's `ml4m` field says which folders export converts
(`ml4m="export"`, through their tokenizer kind's `ml4m_form`). Nothing under ROOT changes; a re-run rewrites OUT.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniforge import codecs, shards, storage
from omniforge._progress import Progress
from omniforge.errors import ConfigError, SampleError
from omniforge.modalities import all_modalities
from omniforge.pipeline import formats

DIALECTS = ("ml4m",)


@dataclass(kw_only=True)
class ExportConfig:
    root: str
    out: str
    dialect: str = "ml4m"
    tokenizers: str | None = None  # sam_instance's SAM-mask tokenizer (DIR/sam_mask), human_poses' (DIR/human_poses)
    folders: tuple[str, ...] | None = None  # default: every folder with committed shards
    copy: bool = False  # copy tars instead of linking them (always copied to S3)
    workers: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ConfigError(f"--dialect {self.dialect!r}: the dialects are {', '.join(DIALECTS)}")
        self.root, self.out = storage.normalize(self.root), storage.normalize(self.out)
        if self.out == self.root:
            raise ConfigError("export writes a new corpus: give an OUT other than ROOT")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: must be >= 1")


@dataclass
class ExportSummary:
    out: str
    seconds: float = 0.0
    samples: int = 0  # keys in every exported folder, over all shards
    left_out: Counter = field(default_factory=Counter)  # "missing in <folder>" -> keys
    linked: Counter = field(default_factory=Counter)  # folder -> tars linked or copied unchanged
    rewritten: Counter = field(default_factory=Counter)  # folder -> tars rewritten (keys filtered, sam_instance)
    skipped: dict[str, str] = field(default_factory=dict)  # folder -> why it is not exported

    def lines(self) -> list[str]:
        out = [f"export ml4m: {self.samples} samples in every folder, {sum(self.left_out.values())} left out, "
               f"{self.seconds:.1f}s"]
        for reason, n in self.left_out.most_common():
            out.append(f"  left out {n:>6}  {reason}")
        for folder in sorted(set(self.linked) | set(self.rewritten)):
            out.append(f"  {folder:<24} {self.linked[folder]:>4} tars linked, {self.rewritten[folder]:>4} written")
        for folder, why in sorted(self.skipped.items()):
            out.append(f"  {folder:<24} not exported: {why}")
        out.append(f"  outputs: {self.out}")
        return out


def export(cfg: ExportConfig) -> ExportSummary:
    t0 = time.time()
    summary = ExportSummary(out=cfg.out)
    folders = _folders(cfg, summary)
    formats.check_formats(cfg.root, folders)
    store, converted = None, {f: _kind(f) for f in folders if _ml4m_of(f) == "export"}
    if converted:
        names = ", ".join(converted)
        if not cfg.tokenizers:
            raise ConfigError(f"{names}: exported tokenized, as ml-4m reads them: pass --tokenizers DIR (the "
                              "directory holding their trained tokenizers)")
        if shards.CROP_SETTINGS not in folders:
            raise ConfigError(f"{names}: exported for the corpus' crops: run `omniforge tokenize` first so that "
                              f"{cfg.root} has {shards.CROP_SETTINGS}")
        from omniforge.tokenize.store import TokenizerStore

        store = TokenizerStore(cfg.tokenizers)
        for kind in converted.values():
            if kind.model_kind is not None:
                store.model(kind)  # a missing tokenizer fails now, in one line
    shard_ids = sorted({s for f in folders for s in shards.status_shards(cfg.root, f)})
    progress = Progress(total=len(shard_ids), unit="shard", desc="export", enabled=cfg.progress)
    try:
        with ThreadPoolExecutor(1 if converted else cfg.workers) as pool:  # tokenizers run on one thread
            for result in pool.map(lambda s: _export_shard(cfg, s, folders, store, converted), shard_ids):
                summary.samples += result["samples"]
                summary.left_out.update(result["left_out"])
                summary.linked.update(result["linked"])
                summary.rewritten.update(result["rewritten"])
                progress.update(1)
    finally:
        progress.close()
    summary.seconds = time.time() - t0
    record = {"job": "export", "dialect": cfg.dialect, "root": cfg.root, "folders": list(folders),
              "tokenizers": cfg.tokenizers, "samples": summary.samples, "left_out": dict(summary.left_out),
              "skipped": summary.skipped, "seconds": summary.seconds}
    storage.write_bytes(storage.join(cfg.out, "export.json"), json.dumps(record, indent=1).encode())
    return summary


def _folders(cfg: ExportConfig, summary: ExportSummary) -> list[str]:
    found = sorted(os.path.basename(u.rstrip("/")) for u in _status_dirs(cfg.root))
    if not found:
        raise ConfigError(f"no committed shards under {cfg.root}: label (and tokenize) it first")
    wanted = list(cfg.folders) if cfg.folders else found
    missing = [f for f in wanted if f not in found]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no committed shards under {cfg.root} (it has {', '.join(found)})")
    labels = {m.name: m for m in all_modalities()}
    known = set(labels) | {f for m in all_modalities() for f in m.token_folders}
    out = []
    for f in wanted:
        if f in labels and labels[f].ml4m == "none":
            summary.skipped[f] = labels[f].ml4m_note
        elif f not in known and f != shards.CROP_SETTINGS:
            summary.skipped[f] = "no registered modality has this folder (install the plugin that wrote it)"
        else:
            out.append(f)
    if not out:
        raise ConfigError("nothing to export: " + "; ".join(f"{f}: {why}" for f, why in summary.skipped.items()))
    return out


def _status_dirs(root: str) -> list[str]:
    prefix = storage.join(root, shards.STATUS_DIR)
    dirs = {uri[len(prefix):].strip("/").split("/", 1)[0] for uri, _ in storage.list_files(prefix, (".parquet",))}
    return sorted(d for d in dirs if d)



def _ok_keys(root: str, folder: str, shard: int) -> list[str]:
    uri = shards.status_uri(root, folder, shard)
    if not storage.exists(uri):
        return []
    return sorted(r["key"] for r in shards.read_status(uri).to_pylist() if r["ok"])


def _export_shard(cfg: ExportConfig, shard: int, folders: list[str], store: Any,
                  converted: dict[str, Any]) -> dict[str, Any]:
    keys = {f: _ok_keys(cfg.root, f, shard) for f in folders}
    common = sorted(set.intersection(*(set(k) for k in keys.values())))
    left_out = Counter()
    for k in set().union(*(set(v) for v in keys.values())) - set(common):
        left_out[f"missing in {next(f for f in folders if k not in keys[f])}"] += 1
    linked, rewritten = Counter(), Counter()
    if not common:  # no sample of this shard is in every folder: ml-4m gets no tar for it
        return {"samples": 0, "left_out": left_out, "linked": linked, "rewritten": rewritten}
    crops = None
    for f in folders:
        src, dst = shards.tar_uri(cfg.root, f, shard), shards.tar_uri(cfg.out, f, shard)
        if f in converted:
            if crops is None:
                crops = _members(shards.tar_uri(cfg.root, shards.CROP_SETTINGS, shard), set(common))
            labels = _members(src, set(common))
            shards.write_tar(dst, (_ml4m_member(converted[f], labels[k], crops[k], store, src, k) for k in common))
            rewritten[f] += 1
        elif keys[f] == common:
            _link(src, dst, copy=cfg.copy)
            linked[f] += 1
        else:
            kept = set(common)
            shards.write_tar(dst, ((n, d) for n, d in shards.iter_tar(src) if shards.member_key(n) in kept))
            rewritten[f] += 1
    return {"samples": len(common), "left_out": left_out, "linked": linked, "rewritten": rewritten}


def _kind(folder: str) -> Any:
    from omniforge.tokenize.kinds import kind_for

    return kind_for(next(m for m in all_modalities() if m.name == folder))


def _ml4m_of(folder: str) -> str | None:
    """The registry's `ml4m` of a label folder ("direct", "export", "none"), None for other folders."""
    return next((m.ml4m for m in all_modalities() if m.name == folder), None)


def _members(uri: str, keys: set[str]) -> dict[str, bytes]:
    return {shards.member_key(n): d for n, d in shards.iter_tar(uri) if shards.member_key(n) in keys}


def _link(src: str, dst: str, *, copy: bool) -> None:
    if copy or storage.is_s3(src) or storage.is_s3(dst):
        with storage.open_input(src) as f, storage.atomic_writer(dst) as g:
            while chunk := f.read(8 << 20):
                g.write(chunk)
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.lexists(dst):
        os.remove(dst)
    os.symlink(os.path.abspath(src), dst)


def _ml4m_member(kind: Any, label_bytes: bytes, crops: bytes, store: Any, uri: str, key: str) -> tuple[str, bytes]:
    """(member name, bytes) of one key in ml-4m's form: an array as `<key>.npy` (pickled when it is an object
    array), any other value (a JSON structure) in the modality's own extension."""
    try:
        value = kind.ml4m_form(codecs.decode(kind.info.ext, label_bytes), codecs.decode("npy", crops), store)
    except SampleError as e:
        raise ConfigError(f"{uri}: {key}: {e.message} (`omniforge verify` lists every bad label)") from None
    if not isinstance(value, np.ndarray):
        return f"{key}.{kind.info.ext}", codecs.encode(kind.info.ext, value)
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=value.dtype == object)  # ml-4m's format; omniforge never reads it back
    return f"{key}.npy", buf.getvalue()


__all__ = ["DIALECTS", "ExportConfig", "ExportSummary", "export"]

"""Raw label formats that changed: shards written in an older format are refused, never misread.

A modality's raw format has a version (`ModalityInfo.format_version`). The label job records, for every
teacher of a run, the format version of each modality it wrote (`manifest/runs/<run>.json`, "formats"; runs
of omniforge 0.1 record none: format 1). A committed (modality, shard) carries its teacher fingerprint in
`_status`; the fingerprint leads to the run that wrote it and so to its format. Readers (tokenize, the
trainer's raw label folders, export) and `verify` call `check_formats`: a shard of an older format stops
them with one line naming the command that rewrites it. That command is the label job itself: the
teacher's version changed with its format, so its fingerprint did too, and the job redoes exactly the
stale shards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from omniforge import shards, storage
from omniforge.errors import ConfigError
from omniforge.modalities import all_modalities, get_modality

RUNS_DIR = "manifest/runs"


class LegacyFormatError(ConfigError):
    """Labels written in a raw format this version no longer reads."""


def recorded_formats(root: str) -> dict[tuple[str, str], int]:
    """(modality, teacher fingerprint) -> the format version the label runs under `root` wrote it in."""
    out: dict[tuple[str, str], int] = {}
    for uri, _ in storage.list_files(storage.join(root, RUNS_DIR), (".json",)):
        try:
            record = json.loads(storage.read_bytes(uri))
        except (ValueError, OSError):
            continue  # a record cut by a killed driver: the run that rewrites it records again
        if record.get("job") != "label":
            continue
        for teacher in (record.get("teachers") or {}).values():
            formats = teacher.get("formats") or {}
            for m in teacher.get("modalities", []):
                out[(m, teacher.get("fingerprint"))] = int(formats.get(m, 1))
    return out


def stale_shards(root: str, modalities: Iterable[str], shard_ids: Iterable[int] | None = None,
                 *, known: dict[tuple[str, str], int] | None = None) -> dict[str, dict[int, int]]:
    """modality -> {shard: the older format version it is in}, for modalities whose format changed.

    A shard whose fingerprint no label run records (a record lost) counts as current: the check refuses what
    it can prove old, it does not guess."""
    infos = {info.name: info for info in all_modalities()}  # folders that are no label modality are skipped
    wanted = [m for m in modalities if m in infos and infos[m].format_version > 1]
    if not wanted:
        return {}
    formats = recorded_formats(root) if known is None else known
    out: dict[str, dict[int, int]] = {}
    for m in wanted:
        current = infos[m].format_version
        ids = sorted(shard_ids) if shard_ids is not None else sorted(shards.status_shards(root, m))
        for s in ids:
            uri = shards.status_uri(root, m, s)
            if not storage.exists(uri):
                continue
            for fp in shards.status_fingerprints(uri):
                version = formats.get((m, fp))
                if version is not None and version < current:
                    out.setdefault(m, {})[s] = version
    return out


def migrate_command(root: str, modalities: Iterable[str]) -> str:
    return f"omniforge label --output {root} --modalities {','.join(sorted(modalities))}"


def check_formats(root: str, modalities: Iterable[str], shard_ids: Iterable[int] | None = None) -> None:
    """Raise LegacyFormatError (one line) when a shard of `modalities` is in an older raw format."""
    stale = stale_shards(root, modalities, shard_ids)
    if not stale:
        return
    parts = [f"{m} ({len(s)} shard{'s' if len(s) > 1 else ''} in format {min(s.values())}, "
             f"this omniforge reads format {get_modality(m).format_version})" for m, s in sorted(stale.items())]
    raise LegacyFormatError(f"labels written in an older raw format: {'; '.join(parts)}: run "
                            f"`{migrate_command(root, stale)}` to rewrite them (only those shards are redone)")



__all__ = ["LegacyFormatError", "check_formats", "migrate_command", "recorded_formats", "stale_shards"]

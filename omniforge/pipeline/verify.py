"""`omniforge verify`: prove that every planned sample is accounted for in every modality.

Checks, per modality and shard of the plan: the status table exists (the commit marker) and lists exactly
the shard's keys, each labeled xor failed with a reason; the tar holds exactly the labeled keys, one
member `<key>.<ext>` each, sorted by key (so every key's members are adjacent and key order agrees across
modalities); every member decodes and matches its modality's schema (`omniforge.schemas`: arrays their
shape, channels and dtype; embeddings ml-4m's npz; JSON labels their format); one teacher fingerprint per
modality; no shard is in an older raw format (`pipeline.formats`). Nothing is repaired: the report says what to re-run.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from omniforge import codecs, schemas, shards, storage
from omniforge.errors import CorruptShardError, SampleError
from omniforge.modalities import ModalityInfo, all_modalities, get_modality, token_folders
from omniforge.pipeline import formats
from omniforge.shards import load_manifest

MAX_LISTED = 20


@dataclass
class ModalityReport:
    labeled: int = 0
    failed: int = 0
    missing_shards: int = 0
    fingerprints: Counter = field(default_factory=Counter)  # fingerprint -> shards


@dataclass
class VerifyReport:
    root: str
    samples: int
    shards: int
    modalities: dict[str, ModalityReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"{self.root}: {self.samples} samples in {self.shards} shards, "
               f"{len(self.modalities)} modalities: {'OK' if self.ok else f'{len(self.problems)} PROBLEMS'}"]
        for m, r in sorted(self.modalities.items()):
            fps = ", ".join(self.modalities[m].fingerprints) or "-"
            out.append(f"  {m:<16} labeled {r.labeled:>6}  failed {r.failed:>5}  missing shards {r.missing_shards:>4}"
                       f"  fingerprint {fps}")
        for p in self.problems[:MAX_LISTED]:
            out.append(f"  problem: {p}")
        if len(self.problems) > MAX_LISTED:
            out.append(f"  ... and {len(self.problems) - MAX_LISTED} more problems")
        return out


def discover_modalities(root: str) -> list[str]:
    """Modalities with at least one committed or attempted shard under `root`."""
    found = set()
    prefix = storage.join(storage.normalize(root), shards.STATUS_DIR)
    for uri, _ in storage.list_files(prefix):
        rel = uri[len(prefix):].strip("/")
        if "/" in rel:
            found.add(rel.split("/", 1)[0])
    return sorted(found)


def _token_folders() -> dict[str, tuple[int, np.dtype]]:
    """Token folders (and crop_settings) -> (values per crop, dtype) of their `(n_crops, N)` arrays."""
    out = {m.token_modality: (m.num_tokens, np.dtype(np.int16)) for m in token_folders()}  # every size's
    out[shards.CROP_SETTINGS] = (5, np.dtype(np.int32))
    return out


def _label_info(folder: str) -> ModalityInfo | None:
    return next((m for m in all_modalities() if m.name == folder), None)


def _command(modality: str) -> str:
    return "tokenize" if modality in _token_folders() else "label"


def _check_array(value: object, spec: tuple[int, np.dtype]) -> str | None:
    n, dtype = spec
    arr = np.asarray(value)
    if arr.dtype != dtype or arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] < 1:
        return f"is {arr.dtype} {arr.shape}, expected {dtype} (n_crops, {n})"
    return None


def _check_shard(root: str, modality: str, shard: int, keys: list[str],
                 decode: bool) -> tuple[int, int, str | None, list[str]]:
    """Returns (labeled, failed, fingerprint, problems) for one (modality, shard)."""
    where = f"{modality}/{shards.shard_name(shard)}"
    status_uri, tar_uri = shards.status_uri(root, modality, shard), shards.tar_uri(root, modality, shard)
    if not storage.exists(status_uri):
        state = "an uncommitted tar (no status)" if storage.exists(tar_uri) else "no status"
        return 0, 0, None, [f"{where}: {state}: re-run `omniforge {_command(modality)}` for {modality}"]
    problems = []
    status = shards.read_status(status_uri).to_pylist()
    status_keys = [r["key"] for r in status]
    dupes = [k for k, n in Counter(status_keys).items() if n > 1]
    if dupes:
        problems.append(f"{where}: status lists keys more than once: {dupes[:3]}")
    if set(status_keys) != set(keys):
        missing, extra = sorted(set(keys) - set(status_keys)), sorted(set(status_keys) - set(keys))
        problems.append(f"{where}: status keys differ from the plan (missing {missing[:3]}, extra {extra[:3]})")
    for r in status:
        if not r["ok"] and not r["error_type"]:
            problems.append(f"{where}: {r['key']} failed without a reason")
    fps = {r["fingerprint"] for r in status}
    if len(fps) > 1:
        problems.append(f"{where}: {len(fps)} fingerprints in one shard")
    ok_keys = [r["key"] for r in status if r["ok"]]
    if not storage.exists(tar_uri):
        problems.append(f"{where}: status without tar")
        return len(ok_keys), len(status) - len(ok_keys), next(iter(fps), None), problems
    token_spec = _token_folders().get(modality)
    info = None if token_spec else _label_info(modality)
    ext = "npy" if token_spec else (info.ext if info is not None else None)
    tar_keys = []
    for name, data in _readable_members(tar_uri, where, problems):
        key, _, member_ext = name.partition(".")
        tar_keys.append(key)
        if ext is not None and member_ext != ext:
            problems.append(f"{where}: member {name!r} should be {key}.{ext}")
            continue
        if decode and ext is not None:
            try:
                value = codecs.decode(ext, data)
                bad = _check_array(value, token_spec) if token_spec else None
                if bad:
                    problems.append(f"{where}: {name} {bad}")
                if info is not None:
                    schemas.check_label(info, value)
            except SampleError as e:
                problems.append(f"{where}: {name} does not match the {modality} schema: {e.message}")
            except Exception as e:  # noqa: BLE001 - any decode failure is a finding, not a crash
                problems.append(f"{where}: {name} does not decode: {type(e).__name__}: {e}")
    if any(a >= b for a, b in zip(tar_keys, tar_keys[1:])):
        problems.append(f"{where}: members are not sorted by key or a key has several members")
    if sorted(set(tar_keys)) != sorted(ok_keys):
        problems.append(f"{where}: tar members ({len(tar_keys)}) differ from the labeled keys in status "
                        f"({len(ok_keys)})")
    return len(ok_keys), len(status) - len(ok_keys), next(iter(fps), None), problems


def _readable_members(tar_uri: str, where: str, problems: list[str]) -> Iterator[tuple[str, bytes]]:
    """The members of a tar up to any damage, which becomes a finding instead of a crash."""
    try:
        yield from shards.iter_tar(tar_uri)
    except CorruptShardError as e:
        problems.append(f"{where}: {e}")


def verify(root: str, modalities: list[str] | None = None, *, decode: bool = True, workers: int = 8) -> VerifyReport:
    from omniforge.labelers import list_labelers

    list_labelers()  # registers the modalities of installed teacher plugins
    root = storage.normalize(root)
    manifest = load_manifest(root)
    keys_by_shard: dict[int, list[str]] = defaultdict(list)
    for key, shard in zip(manifest.column("key").to_pylist(), manifest.column("shard").to_pylist()):
        keys_by_shard[shard].append(key)
    report = VerifyReport(root=root, samples=manifest.num_rows, shards=len(keys_by_shard))
    all_keys = manifest.column("key").to_pylist()
    if len(set(all_keys)) != len(all_keys):
        report.problems.append("manifest: duplicate keys")
    bad_keys = [k for k in all_keys if not k or any(not (c.isascii() and (c.isalnum() or c in "_-")) for c in k)]
    if bad_keys:
        report.problems.append(f"manifest: unsafe keys {bad_keys[:3]}")
    modalities = modalities or discover_modalities(root)
    if not modalities:
        report.problems.append("no labeled modality found: run `omniforge label` first")
    jobs = [(m, s) for m in modalities for s in sorted(keys_by_shard)]
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda job: _check_shard(root, job[0], job[1], keys_by_shard[job[1]], decode), jobs)
        for (m, _), (labeled, failed, fp, problems) in zip(jobs, results):
            r = report.modalities.setdefault(m, ModalityReport())
            r.labeled += labeled
            r.failed += failed
            if fp is None and problems:
                r.missing_shards += 1
            if fp is not None:
                r.fingerprints[fp] += 1
            report.problems.extend(problems)
    for m, r in report.modalities.items():
        if len(r.fingerprints) > 1:
            report.problems.append(f"{m}: shards labeled with {len(r.fingerprints)} different teacher fingerprints "
                                   f"({dict(r.fingerprints)}): re-run `omniforge label` to relabel stale shards")
    for m, stale in sorted(formats.stale_shards(root, modalities).items()):
        report.problems.append(f"{m}: {len(stale)} shard(s) in raw format {min(stale.values())}, this omniforge "
                               f"reads format {get_modality(m).format_version}: run "
                               f"`{formats.migrate_command(root, [m])}` to rewrite them")
    _check_extra_shards(root, modalities, set(keys_by_shard), report)
    _check_token_alignment(root, modalities, sorted(keys_by_shard), report)
    return report


def _check_token_alignment(root: str, modalities: list[str], shard_ids: list[int], report: VerifyReport) -> None:
    """Token folders (and crop_settings) of a shard must hold the same keys: ml-4m's loader zips them by key."""
    folders = [m for m in modalities if m in _token_folders()]
    if len(folders) < 2:
        return
    for s in shard_ids:
        key_sets = {}
        for m in folders:
            uri = shards.status_uri(root, m, s)
            if storage.exists(uri):
                status = shards.read_status(uri)
                key_sets[m] = frozenset(k for k, ok in zip(status.column("key").to_pylist(),
                                                           status.column("ok").to_pylist()) if ok)
        if len(set(key_sets.values())) > 1:
            sizes = ", ".join(f"{m} {len(k)}" for m, k in sorted(key_sets.items()))
            report.problems.append(f"{shards.shard_name(s)}: token folders hold different keys ({sizes}): re-run "
                                   f"`omniforge tokenize` with every modality the trainer reads")


def _check_extra_shards(root: str, modalities: list[str], planned: set[int], report: VerifyReport) -> None:
    for m in modalities:
        for uri, _ in storage.list_files(storage.join(root, m)):
            name = uri.rsplit("/", 1)[-1]
            if storage.is_partial_write(uri):
                report.problems.append(f"{m}: {name} is left from an interrupted write: re-run "
                                       f"`omniforge {_command(m)}` for {m} to remove it")
            elif not name.startswith("shard-") or not name.endswith(".tar"):
                report.problems.append(f"{m}: unexpected file {name}")
            elif int(name[6:-4]) not in planned:
                report.problems.append(f"{m}: {name} is not in the plan")

"""`omniforge label`: run teachers over a planned corpus on Ray Data and commit aligned label shards.

The dataflow, one streaming Ray Data pipeline:

    pending manifest rows (only the (shard, modality) pairs not already done with these weights)
      -> decode tasks: fetch bytes, decode each image once, run the cheap classical labelers
      -> one actor pool per learned teacher (a GPU each when the cluster has them)
      -> write tasks: one key-sorted part tar per (modality, shard) per batch, under _tmp/<run-id>/
      -> driver: when every sample of a (modality, shard) is accounted for, a finalize task merges its
         parts into <modality>/shard-NNNNNN.tar (atomic) and then writes _status/<modality>/... (the
         commit marker)

Only part names and small status rows reach the driver; labels flow worker to storage. A killed driver
loses nothing committed: re-running finds the committed (modality, shard) pairs by their status files
and redoes the rest.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from omniforge import codecs, errors
from omniforge.errors import ConfigError, OmniforgeError, SampleError
from omniforge.labelers import Labeler, Sample, labeler_for_modality, get_labeler_class
from omniforge.labelers.base import TINY
from omniforge.modalities import MODALITIES, ModalityInfo
from omniforge.pipeline import corpus, shards, storage
from omniforge.pipeline._progress import Progress
from omniforge.pipeline._ray import cluster_gpus, ensure_ray
from omniforge.pipeline.decode import decode_image
from omniforge.pipeline.plan import PlanConfig, load_manifest, plan

log = logging.getLogger(__name__)

_BATCH_ROW = "__batch__"  # summary row carrying the number of samples a write task handled


# ----------------------------------------------------------------------------------------------- config

def parse_weights(spec: str) -> dict[str, str]:
    """`tiny`, `pretrained`, or a comma list mixing a default with `teacher=value` overrides, e.g.
    `tiny,clip=/ckpt/open_clip_pytorch_model.bin`. Returns {"*": default, teacher: value, ...}."""
    out = {"*": TINY}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if eq:
            if not name or not value:
                raise ConfigError(f"--weights: cannot parse {part!r}; use TEACHER=tiny|pretrained|/path/to/checkpoint")
            out[name.strip()] = value.strip()
        else:
            out["*"] = part
    for name, value in out.items():
        if name == "*" and value not in ("tiny", "pretrained"):
            raise ConfigError(f"--weights default must be tiny or pretrained, got {value!r}; "
                              f"give checkpoint files per teacher as TEACHER=/path")
    return out


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """`--option TEACHER.KEY=VALUE` items (VALUE parsed as JSON when it parses, else kept as a string)."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for item in items:
        lhs, eq, value = item.partition("=")
        teacher, dot, key = lhs.partition(".")
        if not (eq and dot and teacher and key):
            raise ConfigError(f"--option {item!r}: use TEACHER.KEY=VALUE, e.g. canny_edge.low=50")
        try:
            out[teacher][key] = json.loads(value)
        except json.JSONDecodeError:
            out[teacher][key] = value
    return dict(out)


@dataclass(frozen=True, kw_only=True)
class Teacher:
    """A labeler resolved for one job: what it writes, with which weights, and its fingerprint."""

    name: str
    cls: type[Labeler]
    modalities: tuple[str, ...]
    weights: str
    options: Mapping[str, Any]
    fingerprint: str
    identity: Mapping[str, Any]
    infos: Mapping[str, ModalityInfo]  # resolved on the driver: plugin modalities are unknown to workers

    def build(self, device: str = "cpu") -> Labeler:
        return self.cls(weights=self.weights, device=device, modalities=self.modalities, **self.options)


def resolve_teachers(modalities: tuple[str, ...], weights: Mapping[str, str],
                     options: Mapping[str, Mapping[str, Any]]) -> list[Teacher]:
    by_name: dict[str, list[str]] = {}
    for m in modalities:
        cls = labeler_for_modality(m)
        by_name.setdefault(cls.name, []).append(m)
    for name in list(weights) + list(options):
        if name != "*":
            get_labeler_class(name)  # unknown names raise, listing the valid ones
            if name not in by_name:
                raise ConfigError(f"--weights/--option name teacher {name!r}, which this job does not run "
                                  f"(teachers: {', '.join(by_name)})")
    teachers = []
    for name, mods in by_name.items():
        cls = get_labeler_class(name)
        w = weights.get(name, weights.get("*", TINY))
        opts = dict(options.get(name, {}))
        teachers.append(Teacher(name=name, cls=cls, modalities=tuple(mods), weights=w, options=opts,
                                fingerprint=cls.fingerprint(weights=w, **opts),
                                identity=cls.identity(weights=w, **opts), infos={m: MODALITIES[m] for m in mods}))
    return teachers


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    output: str
    modalities: tuple[str, ...]
    input: str | None = None
    weights: Mapping[str, str] = field(default_factory=lambda: {"*": TINY})
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    storage_size: int = 512
    max_pixels: int = 64_000_000
    batch_size: int = 16
    shard_size: int = 1000
    format: str = "auto"
    actors_per_teacher: int | None = None
    cpus_per_actor: float = 1.0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ConfigError("--modalities is empty: name at least one, e.g. rgb,caption,clip")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"--modalities lists a modality twice: {','.join(self.modalities)}")
        for name, value, low in (("storage_size", self.storage_size, 8), ("batch_size", self.batch_size, 1),
                                 ("max_pixels", self.max_pixels, 1)):
            if value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class LabelSummary:
    run_id: str
    output: str
    seconds: float
    samples: int  # samples in the plan
    processed: int  # samples that went through the pipeline in this run
    labeled: dict[str, int] = field(default_factory=dict)  # per modality
    failed: dict[str, dict[str, int]] = field(default_factory=dict)  # per modality: reason -> count
    skipped_shards: dict[str, int] = field(default_factory=dict)  # per modality, done before this run
    skipped_samples: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0  # pipeline start to the first written batch (workers start, weights load)

    def lines(self) -> list[str]:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        first = f"; first batch after {self.startup_seconds:.1f}s" if self.processed else ""
        out = [f"labeled {self.processed} samples in {self.seconds:.1f}s ({rate:.2f} samples/s{first}), "
               f"{self.samples} in the plan -> {self.output}"]
        for m in self.labeled:
            fails = self.failed.get(m, {})
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(fails.items())) or "none"
            out.append(f"  {m:<14} labeled {self.labeled[m]:>6}  failed {sum(fails.values()):>5} ({reasons})"
                       f"  skipped as done {self.skipped_samples.get(m, 0)}")
        return out


# --------------------------------------------------------------------------------------- stage functions

def _col(modality: str) -> str:
    """Column of a modality's encoded label in pipeline batches (apart from the sample's own columns)."""
    return f"label:{modality}"


def _row_modalities(todo: str) -> list[str]:
    return todo.split(",") if todo else []


def _label_columns(labeler: Labeler, samples: list[Sample], infos: Mapping[str, ModalityInfo]) -> dict[str, list]:
    """Run a labeler, isolate failures to samples, encode and validate outputs.

    Returns, per wanted modality m with column c = _col(m): c (bytes or None), c__etype, c__emsg (None
    when ok), c__sec.
    """
    n = len(samples)
    cols: dict[str, list] = {}
    for m in labeler.wanted:
        c = _col(m)
        cols[c], cols[f"{c}__etype"], cols[f"{c}__emsg"] = [None] * n, [None] * n, [None] * n
        cols[f"{c}__sec"] = [0.0] * n
    if not n:
        return cols
    t0 = time.perf_counter()
    try:
        results = labeler.label(samples)
        if len(results) != n:
            raise RuntimeError(f"{labeler.name} returned {len(results)} results for {n} samples")
        secs = [(time.perf_counter() - t0) / n] * n
    except Exception:  # noqa: BLE001 - one bad batch must not stop the job: find the culprit sample by sample
        results, secs = [], []
        for s in samples:
            t1 = time.perf_counter()
            try:
                results.append(labeler.label([s])[0])
            except Exception as e:  # noqa: BLE001
                results.append(SampleError("teacher_error", f"{type(e).__name__}: {e}"))
            secs.append(time.perf_counter() - t1)
    for i, res in enumerate(results):
        for m in labeler.wanted:
            c = _col(m)
            cols[f"{c}__sec"][i] = float(secs[i])
            try:
                if isinstance(res, SampleError):
                    raise res
                if m not in res:
                    raise SampleError("teacher_error", f"{labeler.name} returned no {m!r} output")
                cols[c][i] = _encode_checked(infos[m], res[m])
            except SampleError as e:
                cols[f"{c}__etype"][i], cols[f"{c}__emsg"][i] = e.error_type, e.message[:500]
            except Exception as e:  # noqa: BLE001 - an unencodable output fails that sample, recorded
                cols[f"{c}__etype"][i], cols[f"{c}__emsg"][i] = "bad_output", f"{type(e).__name__}: {e}"[:500]
    return cols


def _encode_checked(info: ModalityInfo, value: Any) -> bytes:
    """Encode one label, refusing arrays of the wrong shape and non-finite values."""
    if info.ext == "npy":
        arr = np.asarray(value)
        if info.shape is not None and arr.shape != info.shape:
            raise SampleError("bad_output", f"{info.name} has shape {arr.shape}, expected {info.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SampleError("bad_output", f"{info.name} has NaN or infinite values")
    return codecs.encode(info.ext, value)


def _samples_for(batch: pa.Table, wanted: tuple[str, ...]) -> tuple[list[int], list[Sample]]:
    """Rows of a decoded batch that need any of `wanted` and have an image, as Samples (zero-copy)."""
    idx, samples = [], []
    keys = batch.column("key").to_pylist()
    todos = batch.column("todo").to_pylist()
    images = batch.column("image")
    heights = batch.column("height").to_pylist()
    widths = batch.column("width").to_pylist()
    captions = batch.column("caption").to_pylist()
    for i in range(batch.num_rows):
        if not images[i].is_valid or not set(wanted) & set(_row_modalities(todos[i])):
            continue
        buf = images[i].as_buffer()
        image = np.frombuffer(buf, dtype=np.uint8).reshape(heights[i], widths[i], 3)
        idx.append(i)
        samples.append(Sample(key=keys[i], image=image, caption=captions[i]))
    return idx, samples


def _append_label_columns(batch: pa.Table, wanted: tuple[str, ...], idx: list[int], cols: dict[str, list]) -> pa.Table:
    n = batch.num_rows
    for m in wanted:
        for suffix, typ, fill in (("", pa.binary(), None), ("__etype", pa.string(), None),
                                  ("__emsg", pa.string(), None), ("__sec", pa.float32(), 0.0)):
            full = [fill] * n
            for j, i in enumerate(idx):
                full[i] = cols[_col(m) + suffix][j]
            batch = batch.append_column(_col(m) + suffix, pa.array(full, type=typ))
    return batch


_CLASSICAL_CACHE: dict[str, Labeler] = {}


def _decode_stage(batch: pa.Table, *, storage_size: int, max_pixels: int, classical: list[Teacher]) -> pa.Table:
    """Fetch and decode each image once; run the classical labelers on the decoded batch."""
    records = batch.select(["format", "path", "offset", "size", "row", "column"]).to_pylist()
    fetched = corpus.read_images(records)
    images, heights, widths, etypes, emsgs = [], [], [], [], []
    for data in fetched:
        arr, etype, emsg = None, None, None
        try:
            if isinstance(data, Exception):
                raise SampleError("read_error", f"{type(data).__name__}: {data}"[:500])
            arr = decode_image(data, storage_size=storage_size, max_pixels=max_pixels)
        except SampleError as e:
            etype, emsg = e.error_type, e.message
        images.append(arr.tobytes() if arr is not None else None)
        heights.append(arr.shape[0] if arr is not None else 0)
        widths.append(arr.shape[1] if arr is not None else 0)
        etypes.append(etype)
        emsgs.append(emsg)
    out = batch.select(["key", "shard", "todo", "caption"]).append_column("image", pa.array(images, pa.binary()))
    out = out.append_column("height", pa.array(heights, pa.int32())).append_column("width", pa.array(widths, pa.int32()))
    out = out.append_column("decode_etype", pa.array(etypes, pa.string()))
    out = out.append_column("decode_emsg", pa.array(emsgs, pa.string()))
    for teacher in classical:
        cache_key = f"{teacher.name}:{teacher.fingerprint}:{teacher.modalities}"
        labeler = _CLASSICAL_CACHE.get(cache_key)
        if labeler is None:
            labeler = _CLASSICAL_CACHE[cache_key] = teacher.build()
        idx, samples = _samples_for(out, teacher.modalities)
        out = _append_label_columns(out, teacher.modalities, idx, _label_columns(labeler, samples, teacher.infos))
    return out


class _TeacherStage:
    """Ray Data actor: holds one learned teacher (weights loaded once) and labels batches."""

    def __init__(self, teacher: Teacher, device: str, num_threads: int):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.teacher = teacher
        self.labeler = teacher.build(device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        idx, samples = _samples_for(batch, self.teacher.modalities)
        cols = _label_columns(self.labeler, samples, self.teacher.infos)
        return _append_label_columns(batch, self.teacher.modalities, idx, cols)


def _write_stage(batch: pa.Table, *, root: str, run_id: str, fingerprints: dict[str, str],
                 exts: dict[str, str]) -> pa.Table:
    """Write one key-sorted part tar per (modality, shard) in this batch; return summary rows only."""
    rows = batch.drop_columns(["image"]).to_pylist()
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        for m in _row_modalities(row["todo"]):
            groups[(m, row["shard"])].append(row)
    summary = {"modality": [_BATCH_ROW], "shard": [-1], "part": [None], "status": [None], "n": [len(rows)]}
    for (m, shard), group in sorted(groups.items()):
        group.sort(key=lambda r: r["key"])
        ext, fp = exts[m], fingerprints[m]
        members, status = [], []
        for r in group:
            if r["decode_etype"] is not None:
                etype, emsg, data, sec = r["decode_etype"], r["decode_emsg"], None, 0.0
            else:
                c = _col(m)
                data, etype, emsg, sec = r.get(c), r.get(f"{c}__etype"), r.get(f"{c}__emsg"), r.get(f"{c}__sec", 0.0)
                if data is None and etype is None:
                    etype, emsg = "internal_error", f"no output and no error recorded for {m}"
            if data is not None:
                members.append((f"{r['key']}.{ext}", data))
            status.append({"key": r["key"], "ok": data is not None, "error_type": etype, "error_message": emsg,
                           "fingerprint": fp, "seconds": float(sec or 0.0)})
        part = None
        if members:
            part = storage.join(root, shards.TMP_DIR, run_id, m, shards.shard_name(shard), f"{uuid.uuid4().hex}.tar")
            shards.write_tar(part, members)
        for col, value in (("modality", m), ("shard", shard), ("part", part), ("status", json.dumps(status)),
                           ("n", len(group))):
            summary[col].append(value)
    return pa.table(summary, schema=pa.schema([("modality", pa.string()), ("shard", pa.int64()),
                                               ("part", pa.string()), ("status", pa.string()), ("n", pa.int64())]))


def _finalize(root: str, modality: str, shard: int, parts: list[str], status: list[dict]) -> dict:
    """Commit one (modality, shard): merged tar first, status (the commit marker) last."""
    shards.merge_tars(sorted(parts), shards.tar_uri(root, modality, shard))
    shards.write_status(shards.status_uri(root, modality, shard), status)
    for p in parts:
        storage.delete(p)
    return {"modality": modality, "shard": shard}


# ------------------------------------------------------------------------------------------------ driver

def _done_pairs(root: str, teachers: list[Teacher], shard_ids: list[int]) -> dict[str, set[int]]:
    """(modality -> shards) already committed with the current fingerprint."""
    existing = {u for u, _ in storage.list_files(storage.join(root, shards.STATUS_DIR))}
    checks = [(m, s, t.fingerprint) for t in teachers for m in t.modalities for s in shard_ids
              if shards.status_uri(root, m, s) in existing]

    def is_done(check: tuple[str, int, str]) -> bool:
        m, s, fp = check
        if not storage.exists(shards.tar_uri(root, m, s)):
            return False
        fps = set(shards.read_status(shards.status_uri(root, m, s)).column("fingerprint").to_pylist())
        return fps == {fp}

    done: dict[str, set[int]] = defaultdict(set)
    with ThreadPoolExecutor(16) as pool:
        for (m, s, _), ok in zip(checks, pool.map(is_done, checks)):
            if ok:
                done[m].add(s)
    return done


def _package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("omniforge", "torch", "torchvision", "timm", "open_clip_torch", "ray", "numpy", "pillow",
                "opencv-python-headless", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def label(cfg: LabelConfig, *, ray_address: str | None = None) -> LabelSummary:
    """Label the corpus planned at `cfg.output` (planning it from `cfg.input` first when needed)."""
    t_start = time.time()
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    teachers = resolve_teachers(cfg.modalities, cfg.weights, cfg.options)  # a missing checkpoint fails here
    root = storage.normalize(cfg.output)  # listed URIs are normalized: compare like with like
    if cfg.input is not None:
        manifest = plan(PlanConfig(input=cfg.input, output=root, shard_size=cfg.shard_size, format=cfg.format),
                        ray_address=ray_address, progress_bar=cfg.progress)
    else:
        manifest = load_manifest(root)
    ensure_ray(ray_address)
    fingerprints = {m: t.fingerprint for t in teachers for m in t.modalities}
    shard_col = manifest.column("shard").to_pylist()
    shard_sizes = Counter(shard_col)
    done = _done_pairs(root, teachers, sorted(shard_sizes))
    todo_by_shard = {s: [m for m in cfg.modalities if s not in done.get(m, set())] for s in shard_sizes}
    summary = LabelSummary(run_id=run_id, output=root, seconds=0.0, samples=manifest.num_rows, processed=0)
    for m in cfg.modalities:
        summary.skipped_shards[m] = len(done.get(m, ()))
        summary.skipped_samples[m] = sum(shard_sizes[s] for s in done.get(m, ()))
        summary.labeled[m] = 0

    pending_mask = [bool(todo_by_shard[s]) for s in shard_col]
    pending = manifest.filter(pa.array(pending_mask))
    pending = pending.append_column("todo", pa.array([",".join(todo_by_shard[s]) for s in
                                                     pending.column("shard").to_pylist()], pa.string()))
    record_uri = storage.join(root, shards.RUNS_DIR, f"{run_id}.json")
    record = {"run_id": run_id, "command": sys.argv, "config": _config_for_record(cfg),
              "packages": _package_versions(), "teachers": {t.name: {"fingerprint": t.fingerprint,
                                                                      "modalities": list(t.modalities),
                                                                      "identity": t.identity} for t in teachers},
              "start": _dt.datetime.now(_dt.timezone.utc).isoformat(), "end": None}
    if pending.num_rows:
        storage.delete_tree(storage.join(root, shards.TMP_DIR))  # orphans of killed runs
        storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
        try:
            _run_pipeline(cfg, root, run_id, teachers, pending, shard_sizes, fingerprints, summary)
        except Exception as e:
            user_error = _user_error(e)
            if user_error is None:
                raise
            raise user_error from None  # one line for the CLI; Ray's worker trace is in its logs
        storage.delete_tree(storage.join(root, shards.TMP_DIR, run_id))
    summary.seconds = time.time() - t_start
    record.update(end=_dt.datetime.now(_dt.timezone.utc).isoformat(), seconds=summary.seconds,
                  counts={"samples": summary.samples, "processed": summary.processed, "labeled": summary.labeled,
                          "failed": summary.failed, "skipped_samples": summary.skipped_samples})
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    return summary


def _config_for_record(cfg: LabelConfig) -> dict:
    out = {k: v for k, v in cfg.__dict__.items() if k != "progress"}
    out["modalities"], out["weights"], out["options"] = list(cfg.modalities), dict(cfg.weights), dict(cfg.options)
    return out


def _user_error(exc: BaseException) -> OmniforgeError | None:
    """The omniforge error (a bad checkpoint, unreadable storage...) behind an exception raised in Ray."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OmniforgeError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    # An actor whose constructor raised (e.g. a teacher loading a bad checkpoint) reaches the driver as
    # an ActorDiedError that keeps only the text of the original exception.
    found = re.findall(r"omniforge\.errors\.(\w+Error): ([^\n]+)", str(exc))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, OmniforgeError):
            return cls(message)
    return None


def _run_pipeline(cfg: LabelConfig, root: str, run_id: str, teachers: list[Teacher], pending: pa.Table,
                  shard_sizes: Counter, fingerprints: dict[str, str], summary: LabelSummary) -> None:
    import ray
    import ray.data

    gpus = cluster_gpus()
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)) else "cpu"
    if device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs: use --device cpu or auto")
    learned = [t for t in teachers if t.cls.learned]
    classical = [t for t in teachers if not t.cls.learned]
    n_actors = cfg.actors_per_teacher or (max(1, int(gpus // max(1, len(learned)))) if device == "cuda" else 1)

    chunk = max(cfg.batch_size, 1)
    blocks = [pending.slice(i, chunk) for i in range(0, pending.num_rows, chunk)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(_decode_stage, batch_size=cfg.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                        fn_kwargs=dict(storage_size=cfg.storage_size, max_pixels=cfg.max_pixels, classical=classical))
    for t in learned:
        ds = ds.map_batches(_TeacherStage, batch_size=cfg.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                            fn_constructor_kwargs=dict(teacher=t, device=device,
                                                       num_threads=int(max(1, cfg.cpus_per_actor))),
                            compute=ray.data.ActorPoolStrategy(size=n_actors),
                            num_gpus=1 if device == "cuda" else 0, num_cpus=cfg.cpus_per_actor)
    ds = ds.map_batches(_write_stage, batch_size=cfg.batch_size, batch_format="pyarrow",
                        fn_kwargs=dict(root=root, run_id=run_id, fingerprints=fingerprints,
                                       exts={m: t.infos[m].ext for t in teachers for m in t.modalities}))

    finalize = ray.remote(num_cpus=0.5, max_retries=3)(_finalize)
    todo_pairs = set()
    for s, todo in zip(pending.column("shard").to_pylist(), pending.column("todo").to_pylist()):
        for m in _row_modalities(todo):
            todo_pairs.add((m, s))
    expected = {(m, s): shard_sizes[s] for (m, s) in todo_pairs}
    parts: dict[tuple[str, int], list[str]] = defaultdict(list)
    statuses: dict[tuple[str, int], list[dict]] = defaultdict(list)
    inflight: list = []
    progress = Progress(total=pending.num_rows, unit="img", enabled=cfg.progress)
    t_start = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            if row["modality"] == _BATCH_ROW:
                if not summary.processed:
                    summary.startup_seconds = time.time() - t_start
                summary.processed += row["n"]
                progress.update(row["n"])
                continue
            pair = (row["modality"], row["shard"])
            if row["part"]:
                parts[pair].append(row["part"])
            statuses[pair].extend(json.loads(row["status"]))
            if len(statuses[pair]) == expected[pair]:
                inflight.append(finalize.remote(root, pair[0], pair[1], parts.pop(pair, []), statuses[pair]))
                _count(summary, pair[0], statuses.pop(pair))
        if len(inflight) > 64:
            _, inflight = ray.wait(inflight, num_returns=len(inflight) - 32)
    ray.get(inflight)
    progress.close()
    if statuses:
        raise RuntimeError(f"internal error: {len(statuses)} (modality, shard) pairs incomplete after the job: "
                           f"{sorted(statuses)[:5]}; re-run the command to finish them")


def _count(summary: LabelSummary, modality: str, status: list[dict]) -> None:
    for r in status:
        if r["ok"]:
            summary.labeled[modality] = summary.labeled.get(modality, 0) + 1
        else:
            summary.failed.setdefault(modality, {}).setdefault(r["error_type"], 0)
            summary.failed[modality][r["error_type"]] += 1

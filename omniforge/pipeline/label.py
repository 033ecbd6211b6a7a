"""`omniforge label`: run teachers over a planned corpus on Ray and commit aligned label shards.

The dataflow, one stream of batches the driver keeps in flight (at most a window of them at a time):

    pending manifest rows (only the (shard, modality) pairs not already done with these weights)
      -> decode tasks: fetch bytes, decode each image once, run the cheap classical labelers
      -> one actor pool per learned teacher (a GPU each when the cluster has them), and task stages for
         cheap derived labelers, in run order (a derived labeler after the teachers it reads)
      -> write tasks: one key-sorted part tar per (modality, shard) per batch, under _tmp/<run-id>/
      -> driver: when every sample of a (modality, shard) is accounted for, a finalize task merges its
         parts into <modality>/shard-NNNNNN.tar (atomic) and then writes _status/<modality>/... (the
         commit marker)

Only object references, part names and small status rows reach the driver; labels flow worker to storage.
A killed driver loses nothing committed: re-running finds the committed (modality, shard) pairs by their
status files and redoes the rest. A teacher actor whose process dies is rebuilt by Ray and its batches
retried (`omniforge.pipeline._job.ActorPool`).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from omniforge import codecs, schemas
from omniforge.errors import ConfigError, SampleError
from omniforge.labelers import Labeler, Sample
from omniforge.modalities import ModalityInfo
from omniforge import shards, storage
from omniforge.pipeline import corpus
from omniforge._progress import Progress
from omniforge.pipeline import _job
from omniforge.pipeline._ray import cluster_gpus, ensure_ray
from omniforge.pipeline.decode import decode_image
from omniforge.pipeline.plan import PlanConfig, plan
from omniforge.pipeline.teachers import Teacher, check_profile, resolve_teachers
from omniforge.shards import load_manifest

log = logging.getLogger(__name__)

MAX_BATCHES_IN_FLIGHT = 256  # the most batches one job keeps in flight, whatever the cluster's size


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """What `omniforge label` runs. `weights` is `parse_weights`'s {"*": default, teacher: value}: a teacher it
    names nowhere gets tiny, or with a `profile` (e.g. "4m21") the profile's weights; `profile` chooses every
    modality's teacher, weights and options, and `teachers`, `weights` and `options` override it (see
    `omniforge.pipeline.teachers`)."""

    output: str
    modalities: tuple[str, ...]
    input: str | None = None
    weights: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    teachers: Mapping[str, str] = field(default_factory=dict)  # modality -> teacher, when not its default
    profile: str | None = None  # a teacher profile, e.g. "4m21" (`omniforge list --profile 4m21`)
    storage_size: int = 512
    max_pixels: int = 64_000_000
    batch_size: int = 16
    shard_size: int = 1000
    format: str = "auto"
    actors_per_teacher: int | None = None
    cpus_per_actor: float | None = None  # None: sized from the cluster (see _job.actor_resources)
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
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ConfigError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.actors_per_teacher is not None and self.actors_per_teacher < 1:
            raise ConfigError(f"--actors-per-teacher must be >= 1, got {self.actors_per_teacher}")
        if self.profile is not None:
            check_profile(self.profile)


@dataclass
class LabelSummary:
    run_id: str
    output: str
    seconds: float
    samples: int  # samples in the plan
    processed: int  # samples that went through the pipeline in this run
    labeled: dict[str, int] = field(default_factory=dict)  # per modality
    failed: dict[str, dict[str, int]] = field(default_factory=dict)  # per modality: reason -> count
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
            out.append(f"  {m:<16} labeled {self.labeled[m]:>6}  failed {sum(fails.values()):>5} ({reasons})"
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
    """Encode one label, refusing one off its modality's schema (`omniforge.schemas`: arrays of the wrong shape,
    channels or dtype, non-finite values, malformed JSON labels, embeddings off ml-4m's npz), so that `verify`
    never finds what the job wrote wrong."""
    try:
        schemas.check_label(info, value)
    except SampleError as e:
        raise SampleError("bad_output", f"{e.message}") from None
    if info.ext == "npy":
        arr = np.asarray(value)
        if info.shape is not None and arr.shape != info.shape:
            raise SampleError("bad_output", f"{info.name} has shape {arr.shape}, expected {info.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SampleError("bad_output", f"{info.name} has NaN or infinite values")
    return codecs.encode(info.ext, value)


def _samples_for(batch: pa.Table, teacher: Teacher,
                 root: str) -> tuple[list[int], list[Sample], dict[int, SampleError]]:
    """Rows of a decoded batch that need this teacher and have an image, as Samples (zero-copy images).

    Derived teachers get their inputs: from this batch when this job labeled them for the row, else from
    the committed shards under `root`. Rows missing a required input come back as failures instead.
    """
    idx, samples, missing = [], [], {}
    keys = batch.column("key").to_pylist()
    shard_ids = batch.column("shard").to_pylist()
    todos = batch.column("todo").to_pylist()
    images = batch.column("image")
    heights = batch.column("height").to_pylist()
    widths = batch.column("width").to_pylist()
    captions = batch.column("caption").to_pylist()
    meta_cols = [c for c in ("orig_width", "orig_height") if c in batch.column_names]
    metas = batch.select(meta_cols).to_pylist() if meta_cols else [{}] * batch.num_rows
    for i in range(batch.num_rows):
        row_todo = set(_row_modalities(todos[i]))
        if not images[i].is_valid or not row_todo & set(teacher.modalities):
            continue
        inputs = _inputs_for(batch, i, keys[i], shard_ids[i], row_todo, teacher, root)
        if isinstance(inputs, SampleError):
            missing[i] = inputs
            continue
        image = np.frombuffer(images[i].as_buffer(), dtype=np.uint8).reshape(heights[i], widths[i], 3)
        idx.append(i)
        samples.append(Sample(key=keys[i], image=image, caption=captions[i], meta=metas[i], inputs=inputs))
    return idx, samples, missing


def _inputs_for(batch: pa.Table, i: int, key: str, shard: int, row_todo: set[str], teacher: Teacher,
                root: str) -> dict[str, Any] | SampleError:
    inputs: dict[str, Any] = {}
    for m in (*teacher.requires, *teacher.optional):
        if m in row_todo:  # labeled earlier in this pipeline (run order puts its teacher first)
            data = batch.column(_col(m))[i].as_py()
            reason = batch.column(_col(m) + "__etype")[i].as_py() or batch.column("decode_etype")[i].as_py()
        else:
            data, reason = _committed_member(root, m, shard, key)
        if data is None:
            if m in teacher.requires:
                return SampleError("missing_input", f"{teacher.name} needs {m}, which failed or is missing "
                                                    f"for this sample ({reason})")
            continue
        inputs[m] = codecs.decode(teacher.input_infos[m].ext, data)
    return inputs


@functools.lru_cache(maxsize=8)
def _committed_shard(root: str, modality: str, shard: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """A committed (modality, shard): members by key, and failure reasons by key (cached per worker:
    batches arrive in key order, so a shard is read once per worker, not once per batch)."""
    if not storage.exists(shards.status_uri(root, modality, shard)):
        return {}, {}
    status = shards.read_status(shards.status_uri(root, modality, shard)).to_pylist()
    members = {shards.member_key(n): d for n, d in shards.iter_tar(shards.tar_uri(root, modality, shard))}
    return members, {r["key"]: f"{r['error_type']}: {r['error_message']}" for r in status if not r["ok"]}


def _committed_member(root: str, modality: str, shard: int, key: str) -> tuple[bytes | None, str | None]:
    members, failures = _committed_shard(root, modality, shard)
    if key in members:
        return members[key], None
    return None, failures.get(key, f"{modality} is not labeled for shard {shard}")


def _append_label_columns(batch: pa.Table, teacher: Teacher, idx: list[int], cols: dict[str, list],
                          missing: dict[int, SampleError]) -> pa.Table:
    n = batch.num_rows
    for m in teacher.modalities:
        for suffix, typ, fill in (("", pa.binary(), None), ("__etype", pa.string(), None),
                                  ("__emsg", pa.string(), None), ("__sec", pa.float32(), 0.0)):
            full = [fill] * n
            for j, i in enumerate(idx):
                full[i] = cols[_col(m) + suffix][j]
            for i, err in missing.items():
                full[i] = {"__etype": err.error_type, "__emsg": err.message}.get(suffix, fill)
            batch = batch.append_column(_col(m) + suffix, pa.array(full, type=typ))
    return batch


def _run_teacher(batch: pa.Table, teacher: Teacher, labeler: Labeler, root: str) -> pa.Table:
    idx, samples, missing = _samples_for(batch, teacher, root)
    cols = _label_columns(labeler, samples, teacher.infos)
    return _append_label_columns(batch, teacher, idx, cols, missing)


_TASK_LABELERS: dict[str, Labeler] = {}  # per worker process: built once, reused by every batch


def _task_labeler(teacher: Teacher) -> Labeler:
    key = f"{teacher.name}:{teacher.fingerprint}:{teacher.modalities}"
    if key not in _TASK_LABELERS:
        _TASK_LABELERS[key] = teacher.build()
    return _TASK_LABELERS[key]


def _decode_stage(batch: pa.Table, *, storage_size: int, max_pixels: int, teachers: list[Teacher],
                  root: str) -> pa.Table:
    """Fetch and decode each image once; run the first group of task-run (classical) labelers."""
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
    out = out.append_column("height", pa.array(heights, pa.int32()))
    out = out.append_column("width", pa.array(widths, pa.int32()))
    out = out.append_column("orig_width", batch.column("width")).append_column("orig_height", batch.column("height"))
    out = out.append_column("decode_etype", pa.array(etypes, pa.string()))
    out = out.append_column("decode_emsg", pa.array(emsgs, pa.string()))
    return _task_stage(out, teachers=teachers, root=root)


def _task_stage(batch: pa.Table, *, teachers: list[Teacher], root: str) -> pa.Table:
    """Cheap labelers (no model) in plain tasks, in run order."""
    for teacher in teachers:
        batch = _run_teacher(batch, teacher, _task_labeler(teacher), root)
    return batch


class _TeacherStage:
    """An actor holding one learned teacher (weights loaded once) that labels batches.

    Its constructor arguments are small (the Teacher record, a few scalars): they travel inline, so Ray can
    rebuild the actor from them when its process dies (see `_job.ActorPool`)."""

    def __init__(self, teacher: Teacher, device: str, num_cpus: float, root: str):
        import torch

        self.threads = _job.torch_threads(num_cpus)
        torch.set_num_threads(self.threads)
        self.teacher, self.root = teacher, root
        self.labeler = teacher.build(device=device)

    def label(self, batch: pa.Table) -> pa.Table:
        return _run_teacher(batch, self.teacher, self.labeler, self.root)

    def torch_threads(self) -> int:
        return self.threads


def _write_stage(batch: pa.Table, *, root: str, run_id: str, fingerprints: dict[str, str],
                 exts: dict[str, str]) -> dict[str, Any]:
    """Write one key-sorted part tar per (modality, shard) in this batch; return what the driver needs only:
    {"n": samples in the batch, "parts": [{"modality", "shard", "part" (None when no member), "status"}]}."""
    rows = batch.drop_columns(["image"]).to_pylist()
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        for m in _row_modalities(row["todo"]):
            groups[(m, row["shard"])].append(row)
    parts = []
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
        parts.append({"modality": m, "shard": shard, "part": part, "status": status})
    return {"n": len(rows), "parts": parts}


def _finalize(root: str, modality: str, shard: int, parts: list[str], status: list[dict]) -> dict:
    """Commit one (modality, shard): merged tar first, status (the commit marker) last."""
    shards.merge_tars(sorted(parts), shards.tar_uri(root, modality, shard))
    shards.write_status(shards.status_uri(root, modality, shard), status)
    for p in parts:
        storage.delete(p)
    return {"modality": modality, "shard": shard}


# ------------------------------------------------------------------------------------------------ driver

def label(cfg: LabelConfig, *, ray_address: str | None = None) -> LabelSummary:
    """Label the corpus planned at `cfg.output` (planning it from `cfg.input` first when needed)."""
    t_start = time.time()
    run_id = _job.new_run_id()
    root = storage.normalize(cfg.output)  # listed URIs are normalized: compare like with like
    teachers = resolve_teachers(cfg.modalities, cfg.weights, cfg.options, teachers=cfg.teachers,
                                root=root, profile=cfg.profile)  # bad options and checkpoints fail here
    if cfg.input is None:
        manifest = load_manifest(root)  # an unplanned root is a one-line error before Ray starts
    ensure_ray(ray_address)
    _job.check_shared_output(root, "--output")  # before any work: every node must see a local output
    if cfg.input is not None:
        manifest = plan(PlanConfig(input=cfg.input, output=root, shard_size=cfg.shard_size, format=cfg.format),
                        ray_address=ray_address, progress_bar=cfg.progress)
    fingerprints = {m: t.fingerprint for t in teachers for m in t.modalities}
    shard_col = manifest.column("shard").to_pylist()
    shard_sizes = Counter(shard_col)
    done = _job.committed(root, [(m, s, fingerprints[m]) for m in cfg.modalities for s in sorted(shard_sizes)])
    todo_by_shard = {s: [m for m in cfg.modalities if (m, s) not in done] for s in shard_sizes}
    summary = LabelSummary(run_id=run_id, output=root, seconds=0.0, samples=manifest.num_rows, processed=0)
    for m in cfg.modalities:
        summary.skipped_samples[m] = sum(n for s, n in shard_sizes.items() if (m, s) in done)
        summary.labeled[m] = 0

    pending_mask = [bool(todo_by_shard[s]) for s in shard_col]
    pending = manifest.filter(pa.array(pending_mask))
    pending = pending.append_column("todo", pa.array([",".join(todo_by_shard[s]) for s in
                                                     pending.column("shard").to_pylist()], pa.string()))
    record = _job.RunRecord(root, run_id, run_id=run_id, job="label", config=_config_for_record(cfg),
                            teachers={t.name: _teacher_for_record(t) for t in teachers})
    _job.delete_partial_writes(root, cfg.modalities)
    actors: dict[str, Any] = {}
    if pending.num_rows:
        storage.delete_tree(storage.join(root, shards.TMP_DIR))  # orphans of killed runs
        record.write()
        with _job.omniforge_errors():  # one line for the CLI; Ray's worker trace is in its logs
            actors = _run_pipeline(cfg, root, run_id, teachers, pending, shard_sizes, fingerprints, summary)
        storage.delete_tree(storage.join(root, shards.TMP_DIR, run_id))
        if not storage.list_files(storage.join(root, shards.TMP_DIR)):
            storage.delete_tree(storage.join(root, shards.TMP_DIR))
    summary.seconds = time.time() - t_start
    record.finish(seconds=summary.seconds, actors=actors,
                  counts={"samples": summary.samples, "processed": summary.processed, "labeled": summary.labeled,
                          "failed": summary.failed, "skipped_samples": summary.skipped_samples})
    return summary


def _teacher_for_record(t: Teacher) -> dict:
    """A teacher in the run record; with a profile, also what the profile made of it (its entry, the user's
    overrides, or that it ran outside the profile)."""
    out = {"fingerprint": t.fingerprint, "modalities": list(t.modalities),
           "formats": {m: t.infos[m].format_version for m in t.modalities}, "identity": t.identity}
    if t.profile is not None:
        out["profile"] = dict(t.profile)
    return out


def _config_for_record(cfg: LabelConfig) -> dict:
    out = {k: v for k, v in cfg.__dict__.items() if k != "progress"}
    out["modalities"], out["weights"], out["options"] = list(cfg.modalities), dict(cfg.weights), dict(cfg.options)
    out["teachers"] = dict(cfg.teachers)
    return out


@dataclass
class _Step:
    """One step of a batch's way through the job: a Ray task, or a call to an actor pool."""

    task: Any = None  # a Ray remote function, called with the batch and `kwargs`
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    pool: _job.ActorPool | None = None

    def submit(self, arg: Any) -> Any:
        return self.pool.submit("label", arg) if self.pool is not None else self.task.remote(arg, **self.kwargs)


def _steps(cfg: LabelConfig, root: str, run_id: str, teachers: list[Teacher], fingerprints: dict[str, str],
           pools: Mapping[str, _job.ActorPool]) -> list[_Step]:
    """Decode (with the first cheap labelers), then in run order: consecutive cheap labelers in one task step,
    each learned teacher its actor pool; then write."""
    import ray

    task = ray.remote(num_cpus=1)
    steps = [_Step(task=task(_decode_stage), kwargs=dict(storage_size=cfg.storage_size, max_pixels=cfg.max_pixels,
                                                         teachers=[], root=root))]
    for t in teachers:
        if t.cls.learned:
            steps.append(_Step(pool=pools[t.name]))
        elif steps[-1].pool is None:
            steps[-1].kwargs["teachers"].append(t)
        else:
            steps.append(_Step(task=task(_task_stage), kwargs=dict(teachers=[t], root=root)))
    exts = {m: t.infos[m].ext for t in teachers for m in t.modalities}
    steps.append(_Step(task=ray.remote(num_cpus=0.5)(_write_stage),
                       kwargs=dict(root=root, run_id=run_id, fingerprints=fingerprints, exts=exts)))
    return steps


def _run_pipeline(cfg: LabelConfig, root: str, run_id: str, teachers: list[Teacher], pending: pa.Table,
                  shard_sizes: Counter, fingerprints: dict[str, str], summary: LabelSummary) -> dict[str, Any]:
    """Stream the pending rows through the job in batches; returns the teacher actors' resources (for the
    run record)."""
    gpus = cluster_gpus()
    device = _job.choose_device(cfg.device, gpus)
    learned = [t for t in teachers if t.cls.learned]
    n_actors = cfg.actors_per_teacher or (max(1, int(gpus // max(1, len(learned)))) if device == "cuda" else 1)
    resources = _job.actor_resources(len(learned) * n_actors, device, cpus_per_actor=cfg.cpus_per_actor)
    pools: dict[str, _job.ActorPool] = {}
    try:
        for t in learned:
            pools[t.name] = _job.ActorPool(_TeacherStage, n_actors, resources,
                                           dict(teacher=t, device=device, num_cpus=resources.num_cpus, root=root))
        steps = _steps(cfg, root, run_id, teachers, fingerprints, pools)
        _stream(cfg, root, pending, shard_sizes, steps, summary)
        return {name: {"actors": pool.size, "device": device, "num_cpus": resources.num_cpus,
                       "num_gpus": resources.num_gpus, "torch_threads": pool.call_all("torch_threads")}
                for name, pool in pools.items()}
    finally:
        for pool in pools.values():
            pool.close()


def _stream(cfg: LabelConfig, root: str, pending: pa.Table, shard_sizes: Counter, steps: list[_Step],
            summary: LabelSummary) -> None:
    """Keep a window of batches in flight through `steps`; commit each (modality, shard) once complete.

    A batch waits (as an object reference) for a free actor of a pool; an error anywhere reaches the write
    step's result and is raised here."""
    import ray

    chunk = max(cfg.batch_size, 1)
    blocks = iter([pending.slice(i, chunk) for i in range(0, pending.num_rows, chunk)])
    slots = sum(s.pool.size * s.pool.calls_per_actor for s in steps if s.pool is not None)
    window = min(MAX_BATCHES_IN_FLIGHT, max(4, slots + int(ray.cluster_resources().get("CPU", 1))))
    commits = _Commits(root, pending, shard_sizes, summary)
    running: dict[Any, int] = {}  # object reference -> the step producing it
    waiting: dict[int, deque] = {i: deque() for i, s in enumerate(steps) if s.pool is not None}
    live = 0  # batches in flight
    progress = Progress(total=pending.num_rows, unit="img", enabled=cfg.progress)
    t_start = time.time()
    try:
        while True:
            while live < window and (block := next(blocks, None)) is not None:
                running[steps[0].submit(block)] = 0
                live += 1
            for i, queue in waiting.items():
                while queue and steps[i].pool.has_room():
                    running[steps[i].submit(queue.popleft())] = i
            if not running:
                break
            ready, rest = ray.wait(list(running), num_returns=1, fetch_local=False)
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)[0]
            for ref in ready:
                i = running.pop(ref)
                if steps[i].pool is not None:
                    steps[i].pool.done(ref)
                if i + 1 == len(steps):  # written
                    live -= 1
                    if not summary.processed:
                        summary.startup_seconds = time.time() - t_start
                    progress.update(commits.add(ray.get(ref)))
                elif steps[i + 1].pool is not None:
                    waiting[i + 1].append(ref)
                else:
                    running[steps[i + 1].submit(ref)] = i + 1
        commits.wait()
    finally:
        progress.close()


class _Commits:
    """The driver's side of the commit protocol: collects the part tars and status rows of each (modality,
    shard) from the write step's results, and once all its samples are accounted for, starts a finalize task
    (merged tar, then status) and counts the outcomes into the summary."""

    def __init__(self, root: str, pending: pa.Table, shard_sizes: Counter, summary: LabelSummary):
        import ray

        self.root, self.summary = root, summary
        self.expected = {(m, s): shard_sizes[s] for s, todo in zip(pending.column("shard").to_pylist(),
                                                                   pending.column("todo").to_pylist())
                         for m in _row_modalities(todo)}
        self.parts: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.statuses: dict[tuple[str, int], list[dict]] = defaultdict(list)
        self.finalizing: list = []
        self._finalize = ray.remote(num_cpus=0.5, max_retries=3)(_finalize)

    def add(self, written: dict[str, Any]) -> int:
        """Take one write step's result; returns the samples it covered."""
        import ray

        self.summary.processed += written["n"]
        for row in written["parts"]:
            pair = (row["modality"], row["shard"])
            if row["part"]:
                self.parts[pair].append(row["part"])
            self.statuses[pair].extend(row["status"])
            if len(self.statuses[pair]) == self.expected[pair]:
                self.finalizing.append(self._finalize.remote(self.root, *pair, self.parts.pop(pair, []),
                                                             self.statuses[pair]))
                _count(self.summary, pair[0], self.statuses.pop(pair))
        if len(self.finalizing) > 64:
            _, self.finalizing = ray.wait(self.finalizing, num_returns=len(self.finalizing) - 32)
        return written["n"]

    def wait(self) -> None:
        """Wait for every commit; a (modality, shard) still missing samples is an internal error."""
        import ray

        ray.get(self.finalizing)
        if self.statuses:
            raise RuntimeError(f"internal error: {len(self.statuses)} (modality, shard) pairs incomplete after the "
                               f"job: {sorted(self.statuses)[:5]}; re-run the command to finish them")


def _count(summary: LabelSummary, modality: str, status: list[dict]) -> None:
    for r in status:
        if r["ok"]:
            summary.labeled[modality] = summary.labeled.get(modality, 0) + 1
        else:
            summary.failed.setdefault(modality, {}).setdefault(r["error_type"], 0)
            summary.failed[modality][r["error_type"]] += 1

"""What the label and tokenize jobs share, written once.

- run ids and run records (`manifest/runs/<name>.json`: written when work starts, rewritten at the end);
- the sweep of writes a killed run left half done, and the done-check of a (folder, shard) by its
  status fingerprint;
- the device, and the resources of the actors that hold models (`actor_resources`, `torch_threads`);
- `ActorPool`: restartable actors built from constructor arguments that travel inline;
- `check_shared_output`, `check_shared_input`: on a cluster of several nodes, a local path every node
  must see;
- `omniforge_errors`: the omniforge error behind an exception raised inside Ray, for a one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from omniforge import errors, shards, storage
from omniforge.errors import ConfigError, OmniforgeError

log = logging.getLogger(__name__)

# Packages whose versions every run record carries.
RECORDED_PACKAGES = ("omniforge", "torch", "torchvision", "timm", "open_clip_torch", "ray", "numpy", "pillow",
                     "opencv-python-headless", "pyarrow")


# ------------------------------------------------------------------------------------------- run records

def new_run_id() -> str:
    """A run id: UTC start time to the second and 6 random hex digits (sortable, unique)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in RECORDED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


_USERINFO = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+@")


def redacted_command(argv: Iterable[str]) -> list[str]:
    """The command line with the password of any `scheme://user:password@host` URL replaced by `***`."""
    return [_USERINFO.sub(lambda m: m.group(0).split(":", 1)[0] + ":***@", arg) for arg in argv]


class RunRecord:
    """One run's record at `<root>/manifest/runs/<name>.json`: the command, the config, package versions and
    whatever the job adds (teachers, fingerprints), with the start time; `finish` adds the end, the seconds
    and the counts. The command is recorded with URL passwords redacted; credentials, which come from the
    environment, are never read here."""

    def __init__(self, root: str, name: str, *, run_id: str, job: str, config: Mapping[str, Any], **extra: Any):
        self.uri = storage.join(root, shards.RUNS_DIR, f"{name}.json")
        self.data: dict[str, Any] = {"run_id": run_id, "job": job, "command": redacted_command(sys.argv),
                                     "config": dict(config), "packages": package_versions(), **extra,
                                     "start": _now(), "end": None}

    def write(self) -> None:
        storage.write_bytes(self.uri, json.dumps(self.data, indent=2, default=str).encode())

    def finish(self, *, seconds: float, counts: Mapping[str, Any], **extra: Any) -> None:
        """Record the end of the run and write the record."""
        self.data.update(extra, end=_now(), seconds=seconds, counts=dict(counts))
        self.write()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


# ------------------------------------------------------------------------------------- commits on storage

def delete_partial_writes(root: str, folders: Iterable[str]) -> None:
    """Remove the temporary files of writes a killed run left half done in each folder's shards and status
    tables (they never count as committed)."""
    for folder in folders:
        for directory in (storage.join(root, folder), storage.join(root, shards.STATUS_DIR, folder)):
            for uri, _ in storage.list_files(directory):
                if storage.is_partial_write(uri):
                    storage.delete(uri)


def committed(root: str, checks: Iterable[tuple[str, int, str]]) -> set[tuple[str, int]]:
    """The (folder, shard) pairs of `checks` ((folder, shard, fingerprint) triples) that are done: the status
    table (the commit marker) exists, so does the tar, and every row of the status carries the fingerprint.

    One listing of `_status` first, then the candidates' reads in parallel (S3: one request each)."""
    listed = {u for u, _ in storage.list_files(storage.join(root, shards.STATUS_DIR))}
    candidates = [c for c in checks if shards.status_uri(root, c[0], c[1]) in listed]

    def done(check: tuple[str, int, str]) -> bool:
        folder, shard, fingerprint = check
        if not storage.exists(shards.tar_uri(root, folder, shard)):
            return False
        return shards.status_fingerprints(shards.status_uri(root, folder, shard)) == {fingerprint}

    with ThreadPoolExecutor(16) as pool:
        return {(f, s) for (f, s, _), ok in zip(candidates, pool.map(done, candidates)) if ok}


# ------------------------------------------------------------------------------------ errors out of Ray

def user_error(exc: BaseException) -> OmniforgeError | None:
    """The omniforge error (a bad checkpoint, unreadable storage...) behind an exception raised in Ray, or None."""
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
    # An actor whose constructor raised (e.g. a teacher loading a bad checkpoint) reaches the driver as an
    # ActorDiedError that keeps only the text of the original exception.
    found = re.findall(r"omniforge\.errors\.(\w+Error): ([^\n]+)", str(exc))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, OmniforgeError):
            return cls(message)
    return None


@contextlib.contextmanager
def omniforge_errors() -> Iterator[None]:
    """Re-raise an exception from Ray work as the omniforge error behind it (one line for the CLI; Ray's
    worker traceback stays in its logs); any other exception passes unchanged."""
    try:
        yield
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise found from None


# ------------------------------------------------------------------------------------ device, resources

def choose_device(requested: str, gpus: float) -> str:
    """`--device auto|cpu|cuda` against the cluster's GPUs: auto is cuda when there are any."""
    if requested == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs: use --device cpu or auto")
    return "cuda" if requested == "cuda" or (requested == "auto" and gpus > 0) else "cpu"


@dataclass(frozen=True)
class ActorResources:
    """Ray resources of each actor of a job's model-holding pools."""

    num_cpus: float
    num_gpus: float


def node_cpus() -> list[float]:
    """Ray CPUs of every alive node."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]]


def actor_resources(n_actors: int, device: str, *, cpus_per_actor: float | None = None,
                    reserve_cpus: float | None = None) -> ActorResources:
    """CPUs and GPUs per actor such that all `n_actors` actors (of every pool of the job) run at once.

    A streaming job needs every stage running: an actor that cannot be placed stalls the whole job.
    - cuda: the GPUs are shared when there are more actors than GPUs (fractional GPUs); 1 CPU each.
    - cpu: the actors share the CPUs of the largest node, less `reserve_cpus` left for the job's tasks
      (decode, write; default an eighth of the node, at least 1): one actor takes all of that, several
      share it equally.
    `cpus_per_actor` (`--cpus-per-actor`) overrides the CPUs, lowered (with a warning) when the actors would
    not fit.
    """
    import ray

    n_actors = max(1, n_actors)
    nodes = node_cpus()
    if device == "cuda":  # the actors spread over the GPU nodes
        reserve = 1.0 if reserve_cpus is None else reserve_cpus
        fit = max(0.05, (sum(nodes) - reserve) / n_actors)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        num_gpus = min(1.0, gpus / n_actors)
        num_cpus = min(cpus_per_actor or 1.0, fit)
    else:  # sized so that they all fit on one node
        largest = max(nodes, default=1.0)
        reserve = max(1.0, largest / 8) if reserve_cpus is None else reserve_cpus
        fit = max(0.05, (largest - reserve) / n_actors)
        num_gpus = 0.0
        num_cpus = fit if cpus_per_actor is None else min(cpus_per_actor, fit)
    if cpus_per_actor is not None and num_cpus < cpus_per_actor:
        log.warning("--cpus-per-actor %g: %d actors would not fit in the cluster; %.2f CPUs each", cpus_per_actor,
                    n_actors, num_cpus)
    if num_gpus and num_gpus < 1:
        log.info("%d actors share %g GPUs: %.2f GPUs each", n_actors, gpus, num_gpus)
    # Ray counts resources in units of 1e-4: round down, so that n actors never take more than they were
    # given (rounding 3/14 up to 0.2143 took 3.0002 CPUs and left the 1-CPU decode task unplaceable)
    return ActorResources(num_cpus=math.floor(num_cpus * 1e4) / 1e4, num_gpus=math.floor(num_gpus * 1e4) / 1e4)


def torch_threads(num_cpus: float) -> int:
    """Torch threads for an actor holding `num_cpus` Ray CPUs, called inside the actor: its CPUs, scaled down
    where this node declares more Ray CPUs than it has cores (the local cluster on a small machine gets
    room for tasks beside its actors), at least 1."""
    import ray

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    node_id = ray.get_runtime_context().get_node_id()
    declared = next((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id), 0.0)
    scale = min(1.0, cores / declared) if declared > 0 else 1.0
    return max(1, math.ceil(num_cpus * scale - 1e-6))


# ------------------------------------------------------------------------------------------ actor pools

class ActorPool:
    """`size` actors of `cls`, each holding its model for the whole job, with the calls spread on them.

    Ray restarts an actor whose process dies (max_restarts=-1) and retries the calls it had in flight
    (max_task_retries=-1). Each restart rebuilds the actor from its constructor arguments, which therefore
    travel inline with the creation task: keep `kwargs` small (well under Ray's 100 KiB inline limit). An
    argument that Ray puts in the object store could be gone when a restart needs it (ray-project/ray#53727,
    which Ray warns about on stderr); Ray Data's actor pools pass their functions that way, so the jobs hold
    their models in these actors instead.

    `submit` sends one call to the least loaded actor; at most `calls_per_actor` calls wait on an actor.
    """

    def __init__(self, cls: type, size: int, resources: ActorResources, kwargs: Mapping[str, Any], *,
                 calls_per_actor: int = 2):
        import ray

        remote = ray.remote(cls).options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                         max_restarts=-1, max_task_retries=-1)
        self.resources, self.calls_per_actor = resources, calls_per_actor
        self._actors = [remote.remote(**kwargs) for _ in range(max(1, size))]
        self._load = [0] * len(self._actors)
        self._owner: dict[Any, int] = {}

    @property
    def size(self) -> int:
        return len(self._actors)

    def has_room(self) -> bool:
        return min(self._load) < self.calls_per_actor

    def submit(self, method: str, *args: Any) -> Any:
        """Call `method(*args)` on the least loaded actor; returns the call's ObjectRef (pass it to `done`)."""
        i = min(range(len(self._actors)), key=self._load.__getitem__)
        ref = getattr(self._actors[i], method).remote(*args)
        self._load[i] += 1
        self._owner[ref] = i
        return ref

    def done(self, ref: Any) -> None:
        """A call's result is ready (or failed): its actor takes another."""
        self._load[self._owner.pop(ref)] -= 1

    def call_all(self, method: str) -> list[Any]:
        """`method()` on every actor (waits for each to be built)."""
        import ray

        return ray.get([getattr(a, method).remote() for a in self._actors])

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors.clear()


# -------------------------------------------------------------------------- a local path on many nodes

_SHARED_CHECKED: set[tuple[str, str]] = set()  # (cluster, path) found visible on every node
PROBE_SECONDS = 60.0  # how long a node may take to answer the probe


def check_shared_output(path: str, flag: str) -> None:
    """On a Ray cluster of several alive nodes, refuse a local output `path` that some node cannot see.

    The driver writes a marker file under `path` (in a directory of its own, so no node has cached its
    absence) and one task pinned to each alive node looks for it; the nodes that cannot see it are named
    in a one-line ConfigError saying to use s3:// or a shared filesystem. An s3:// path, a one-node cluster
    and a path already found visible on this cluster skip the check."""
    if _skip_probe(path):
        return
    probe_dir = os.path.join(storage.normalize(path), f".omniforge-probe-{uuid.uuid4().hex}")
    marker = os.path.join(probe_dir, "marker")
    try:
        os.makedirs(probe_dir)
        with open(marker, "w") as f:
            f.write("written by the omniforge driver to check that every Ray node sees this path\n")
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there: {e.strerror or e}") from None
    try:
        _require_visible(path, flag, marker)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def check_shared_input(path: str, flag: str, probe_file: str) -> None:
    """As `check_shared_output` for a local input `path` the job only reads: every alive node must see
    `probe_file`, an existing file under it (nothing is written)."""
    if not _skip_probe(path):
        _require_visible(path, flag, storage.normalize(probe_file))


def _skip_probe(path: str) -> bool:
    import ray

    if storage.is_s3(path) or ("://" in path and not path.startswith(storage.FILE_SCHEME)):
        return True  # object storage: every node reaches it
    key = (ray.get_runtime_context().gcs_address, storage.normalize(path))
    return key in _SHARED_CHECKED or sum(1 for n in ray.nodes() if n["Alive"]) < 2


def _require_visible(path: str, flag: str, probe_file: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    blind = _nodes_not_seeing(nodes, probe_file)
    if blind:
        raise ConfigError(f"{flag} {path} is a local path that {len(blind)} of the {len(nodes)} nodes of the Ray "
                          f"cluster cannot see ({', '.join(blind)}): workers there would not find the job's files; "
                          f"use an s3:// URI or a shared filesystem mounted at the same path on every node")
    _SHARED_CHECKED.add((ray.get_runtime_context().gcs_address, storage.normalize(path)))


def _nodes_not_seeing(nodes: list[dict], marker: str) -> list[str]:
    """Names of the nodes where a task cannot see `marker` (or does not answer within PROBE_SECONDS)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=1)(_sees)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_SECONDS)
    blind = []
    for node, ref in zip(nodes, refs):
        seen = False
        if ref in ready:
            with contextlib.suppress(Exception):  # a node whose task failed cannot be trusted to see it
                seen = ray.get(ref)
        if not seen:
            blind.append(f"node {node['NodeManagerAddress']} {node['NodeID'][:8]}"
                         + ("" if ref in ready else " (no answer)"))
    return blind


def _sees(path: str, seconds: float = 5.0) -> bool:
    """Whether this node sees `path` (looked for a few times over `seconds`: shared filesystems may lag)."""
    deadline = time.monotonic() + seconds
    while True:
        if os.path.exists(path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)

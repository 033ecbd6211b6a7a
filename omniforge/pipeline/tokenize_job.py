"""`omniforge tokenize`: turn label shards into 4M token shards, the same crops for every modality.

One Ray Data job over the shards of the plan. A shard is the unit of work and of commit: a worker (an
actor holding the tokenizers, and the feature teachers when there are several crops) streams the shard's
label tars in key order, crops every modality of a sample with that sample's crop settings, tokenizes,
and writes

    crop_settings/shard-NNNNNN.tar     <key>.npy int32 (n_crops, 5): top, left, h, w, hflip
    tok_<modality>@224/shard-NNNNNN.tar <key>.npy int16 (n_crops, N)   (image-like and global modalities)
    tok_<modality>@448/shard-NNNNNN.tar <key>.npy int16 (n_crops, 784) (asked for as <modality>@448)
    tok_<modality>/shard-NNNNNN.tar     <key>.npy int16 (n_crops, L)   (sequences: WordPiece ids, [EOS], [PAD])

each atomically, then their `_status` tables (the commit markers). Every output folder of a shard holds
exactly the same keys: those for which every requested modality was labeled and tokenized. Every other key
is in each status table with ok=false and the reason, so ml-4m's loader (which needs identical keys across
folders) and `omniforge verify` both hold.

Crops: crop 0 is the centred square; crops 1.. are random resized crops with flips, seeded per key, in the
pixel frame of the image label. How each modality goes through a crop is its registry entry's `crop`, and
its tokenizer kind does the rest (`omniforge.tokenize.kinds`): dense labels are cropped here; sequences are
serialized per crop (boxes, keypoints and SAM masks transformed with the same crop); feature maps and global
vectors cannot be cropped after the fact, so crop 0 reuses the label job's output (computed on that same
centred square) and crops 1.. run the same teacher, with the same weights, on the cropped image.

Sizes: a target is a modality name (its token folder at 224) or "<modality>@<size>" for another of its
registry `token_sizes` (`--modalities rgb,depth,rgb@448,depth@448`: 4M-21's tok_rgb@448 and tok_depth@448 beside
the 224 folders). Every size of a sample is cut from the same crop_settings rows, resized to that size, and
tokenized by the same tokenizer (trained at 224; 784 tokens at 448). A crop above 224 is never upsampled: a
sample whose crop covers fewer stored pixels than the size on a side fails with "too_small" and the
`omniforge label --storage-size` that fixes it (`omniforge.tokenize.crops.check_crop_sides`). The check is
per sample because the stored size is: an image smaller than the storage size is stored at its own size,
and random crops differ per sample; the others of the shard are still written. A feature map above 224
(clip@448: 4M-21's tok_clip@448) cannot reuse the stored label, crop 0's 224 map: the teacher runs at that
size (its `label_at`, the same weights) on every crop's window of the stored rgb, crop 0 included, and the
tokenizer encodes the (28, 28, C) map.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omniforge import codecs
from omniforge.errors import ConfigError, SampleError
from omniforge.modalities import (IMAGE_MODALITY, IMAGE_SIZE, ModalityInfo, all_modalities, by_embedding_folder,
                                  get_modality, parse_token_target)
from omniforge import shards, storage
from omniforge._progress import Progress
from omniforge.pipeline import _job, formats
from omniforge.pipeline._ray import cluster_gpus, ensure_ray
from omniforge.shards import load_manifest
from omniforge.tokenize.crops import CropConfig, crop_settings
from omniforge.tokenize.kinds import TokenizerKind, get_kind, kind_for
from omniforge.tokenize.ml4m import VIT_PRESETS, register_vit_preset
from omniforge.tokenize.store import TokenizerStore

log = logging.getLogger(__name__)

CROP_SETTINGS = shards.CROP_SETTINGS
VERSION = 1  # bump when the token format or the crop/serialization rules change: re-runs redo everything



def tokenizable() -> tuple[str, ...]:
    """Every target the tokenize job can write, in registry order: each tokenized modality's name (its token
    folder at 224) and "<name>@<size>" for its other token sizes (rgb@448)."""
    return tuple(m.name if v.token_size in (None, IMAGE_SIZE) else f"{m.name}@{v.token_size}"
                 for m in all_modalities() if m.tokenized for v in m.sizes())


def label_modalities(targets: tuple[str, ...]) -> tuple[str, ...]:
    """The label folders a job's targets read (depth and depth@448 both read depth), in order, each once."""
    return tuple(dict.fromkeys(parse_token_target(t).name for t in targets))


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    input: str  # label root
    tokenizers: str  # folder holding one subfolder per tokenizer (`omniforge tokenizer train --out`)
    modalities: tuple[str, ...]  # targets: modality names, or <modality>@<size> (depth@448) for other token sizes
    output: str | None = None  # token root; default: beside the labels, where ml-4m's loader expects them
    crops: CropConfig = field(default_factory=CropConfig)
    # feature teachers for crops 1.., as the label job's: {} = tiny, or with `profile` the profile's weights
    weights: dict[str, str] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    teachers: dict[str, str] = field(default_factory=dict)  # modality -> teacher for crops 1.., when not its default
    profile: str | None = None  # the label job's teacher profile, e.g. "4m21"
    batch_size: int = 32
    actors: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ConfigError("--modalities is empty: name the label modalities to tokenize, e.g. depth,normal,caption")
        object.__setattr__(self, "modalities", tuple(_canonical(m) for m in self.modalities))
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"--modalities lists a target twice: {','.join(self.modalities)}")
        sized = [m for m in self.modalities if "@" in m and m not in tokenizable()]
        for m in sized:
            parse_token_target(m)  # names the sizes the modality has
        unknown = [m for m in self.modalities if m not in tokenizable()]
        if unknown:
            embedded = [m for m in unknown if by_embedding_folder(m) is not None]
            hint = (f" ({', '.join(embedded)}: continuous embeddings, which `omniforge train` reads from their label "
                    f"folders: drop them here)") if embedded else ""
            raise ConfigError(f"cannot tokenize {', '.join(unknown)}: tokenizable modalities are "
                              f"{', '.join(tokenizable())}{hint}")
        for m in self.modalities:
            kind_for(parse_token_target(m))  # an unknown tokenizer kind, or a modality its kind cannot handle
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        from omniforge.pipeline.teachers import check_profile, check_teacher_args

        check_teacher_args(self.weights, self.options, self.teachers)  # names, option keys and values
        if self.profile is not None:
            check_profile(self.profile)


def _canonical(target: str) -> str:
    """"depth@224" -> "depth" (the registry's own size); every other target as given."""
    base, at, size = target.partition("@")
    return base if at and size == str(IMAGE_SIZE) else target


@dataclass
class TokenizeSummary:
    run_id: str
    output: str
    seconds: float
    samples: int
    written: int = 0  # samples with every requested modality, in every token shard
    left_out: Counter = field(default_factory=Counter)  # reason -> samples
    skipped: int = 0  # samples of shards already done
    tokens: Counter = field(default_factory=Counter)  # token folder -> tokens written
    cut_crops: Counter = field(default_factory=Counter)  # token folder -> crops whose units the budget cut
    cut_units: Counter = field(default_factory=Counter)  # token folder -> units (boxes, fields, ...) cut

    def lines(self) -> list[str]:
        out = [f"tokenize {self.run_id}: {self.samples} samples: {self.written} tokenized with every modality, "
               f"{sum(self.left_out.values())} left out, {self.skipped} skipped as already done, "
               f"{self.seconds:.1f}s"]
        for reason, n in self.left_out.most_common():
            out.append(f"  left out {n:>6}  {reason}")
        for folder, n in sorted(self.tokens.items()):
            out.append(f"  {folder:<24} {n:>10} tokens")
        for folder, n in sorted(self.cut_crops.items()):
            out.append(f"  {folder:<24} token budget cut {self.cut_units[folder]} units from {n} crops "
                       "(the serialization did not fit; the trainer's raw folders re-draw what is cut per sample)")
        out.append(f"  outputs: {self.output}")
        return out


# ------------------------------------------------------------------------------------------ fingerprints

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _label_fingerprints(root: str, modalities: tuple[str, ...],
                        shard_ids: list[int]) -> dict[tuple[str, int], list[str]]:
    """(modality, shard) -> the label job's fingerprints, read once for the whole job (in parallel: S3)."""
    def read(pair: tuple[str, int]) -> list[str]:
        uri = shards.status_uri(root, *pair)
        return sorted(shards.status_fingerprints(uri)) if storage.exists(uri) else []

    pairs = [(m, s) for m in modalities for s in shard_ids]
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(pairs, pool.map(read, pairs)))


# --------------------------------------------------------------------------------------------- the work

@dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """Everything a worker needs for the job, resolved on the driver (small, picklable)."""

    input: str
    output: str
    modalities: tuple[str, ...]  # the targets (depth, depth@448)
    infos: tuple[ModalityInfo, ...]  # of the image and every label read: plugin modalities are unknown to workers
    targets: tuple[ModalityInfo, ...]  # of every target, at its size (`ModalityInfo.at`), in `modalities` order
    tokenizers: str
    crops: CropConfig
    batch_size: int
    teachers: tuple = ()  # omniforge.pipeline.teachers.Teacher for feature modalities (crops 1..)
    vit_presets: tuple = ()  # (name, VitPreset) of ml-4m's ViT presets: ones registered on the driver reach workers


class _TarCursor:
    """Members of a key-sorted tar, fetched by increasing key in one streaming pass."""

    def __init__(self, uri: str):
        self._it: Iterator[tuple[str, bytes]] = shards.iter_tar(uri)
        self._head: tuple[str, bytes] | None = None

    def get(self, key: str) -> tuple[str, bytes] | None:
        while True:
            if self._head is None:
                self._head = next(self._it, None)
                if self._head is None:
                    return None
            head_key = shards.member_key(self._head[0])
            if head_key == key:
                member, self._head = self._head, None
                return member
            if head_key > key:
                return None
            self._head = None


class ShardTokenizer:
    """Tokenizes whole shards: loads the tokenizers (and feature teachers) once, then `run(shard, keys)`."""

    def __init__(self, spec: ShardSpec, device: str = "cpu", num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.spec, self.device = spec, device
        for name, preset in spec.vit_presets:
            register_vit_preset(name, dim=preset.dim, depth=preset.depth, heads=preset.heads,
                                mlp_ratio=preset.mlp_ratio)
        self.infos = {info.name: info for info in spec.infos}  # label folder -> its entry
        self.targets = dict(zip(spec.modalities, spec.targets))  # target -> its entry at its size
        self.kinds: dict[str, TokenizerKind] = {m: get_kind(t.tokenizer)(t) for m, t in self.targets.items()}
        self.store = TokenizerStore(spec.tokenizers, device=device)
        for kind in self.kinds.values():  # load everything now: a missing tokenizer fails the actor at start
            if kind.model_kind is not None:
                self.store.model(kind)
            if kind.sequence:
                self.store.text()
        self.teachers = {}
        for t in spec.teachers:
            labeler = t.build(device=device)
            for m in t.modalities:
                self.teachers[m] = labeler

    # -- per shard

    def run(self, shard: int, keys: list[str], fingerprint: str) -> dict[str, Any]:
        spec = self.spec
        keys = sorted(keys)
        inputs = tuple(dict.fromkeys((IMAGE_MODALITY, *(t.name for t in spec.targets))))
        failures: dict[str, tuple[str, str]] = {}
        for m in inputs:
            uri = shards.status_uri(spec.input, m, shard)
            status = {r["key"]: r for r in shards.read_status(uri).to_pylist()} if storage.exists(uri) else {}
            for k in keys:
                if k in failures:
                    continue
                row = status.get(k)
                if row is None:
                    failures[k] = ("not_labeled", f"{m} has no label for this sample: run `omniforge label` for {m}")
                elif not row["ok"]:
                    failures[k] = ("label_failed", f"{m}: {row['error_type']}: {row['error_message']}")
        candidates = [k for k in keys if k not in failures]
        cursors = {m: _TarCursor(shards.tar_uri(spec.input, m, shard)) for m in inputs} if candidates else {}
        tokens: dict[str, dict[str, np.ndarray]] = {m: {} for m in spec.modalities}
        crops: dict[str, np.ndarray] = {}
        self._cut: Counter = Counter()  # (modality, "crops" | "units") -> count, for this shard
        for start in range(0, len(candidates), spec.batch_size):
            batch = candidates[start:start + spec.batch_size]
            labels = self._read(batch, inputs, cursors, failures)
            for k in batch:
                if k not in failures:
                    image = labels[IMAGE_MODALITY][k]
                    crops[k] = crop_settings(k, image.shape[0], image.shape[1], spec.crops)
                    self._check_sides(k, crops[k], failures)
            for m in spec.modalities:
                live = [k for k in batch if k not in failures]
                if not live:
                    break
                for k, result in zip(live, self._tokenize(m, live, labels, crops)):
                    if isinstance(result, SampleError):
                        failures[k] = (result.error_type, f"{m}: {result}")
                    else:
                        tokens[m][k] = result
        kept = [k for k in candidates if k not in failures]
        self._commit(shard, keys, kept, failures, crops, tokens, fingerprint)
        left_out = Counter(failures[k][0] for k in keys if k in failures)
        cut = {self.targets[m].token_modality: (self._cut[m, "crops"], self._cut[m, "units"])
               for m in spec.modalities if self._cut[m, "crops"]}
        return {"shard": shard, "samples": len(keys), "written": len(kept), "left_out": dict(left_out), "cut": cut,
                "tokens": {self.targets[m].token_modality: int(sum(_count_tokens(self.kinds[m], tokens[m][k])
                                                                  for k in kept))
                           for m in spec.modalities}}

    def _check_sides(self, key: str, crops_k: np.ndarray, failures: dict[str, tuple[str, str]]) -> None:
        """Fail a sample whose crops are smaller than a target's size above 224 (never upsampled)."""
        from omniforge.tokenize.crops import check_crop_sides

        for t in self.spec.targets:
            if t.token_size is not None and t.token_size > IMAGE_SIZE:
                try:
                    check_crop_sides(crops_k, t.token_size, self.spec.crops, what=t.token_modality)
                except SampleError as e:
                    failures[key] = (e.error_type, str(e))
                    return

    def _read(self, batch: list[str], inputs: tuple[str, ...], cursors: dict[str, _TarCursor],
              failures: dict[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
        labels: dict[str, dict[str, Any]] = {m: {} for m in inputs}
        for k in batch:
            for m in inputs:
                member = cursors[m].get(k)
                if k in failures:
                    continue  # keep the cursors in step, nothing more to do for this key
                if member is None:
                    failures[k] = ("missing_member", f"{m}: status says labeled but the tar has no member for it")
                    continue
                try:
                    labels[m][k] = codecs.decode(member[0].split(".", 1)[1], member[1])
                except Exception as e:  # noqa: BLE001 - a corrupt member fails its sample, not the shard
                    failures[k] = ("corrupt_label", f"{m}: {type(e).__name__}: {e}")
        return labels

    def _tokenize(self, m: str, keys: list[str], labels: dict, crops: dict) -> list[np.ndarray | SampleError]:
        crop = self.targets[m].crop
        try:
            if crop == "dense":
                return self._dense(m, keys, labels, crops)
            if crop in ("features", "global"):
                return self._teacher_crops(m, keys, labels, crops)
            return [self._sequence(m, k, labels, crops[k]) for k in keys]
        except SampleError as e:
            if len(keys) == 1:
                return [e]
            # one bad sample in a batch: retry one by one so only the culprit fails
            return [self._tokenize(m, [k], labels, crops)[0] for k in keys]

    def _encode(self, m: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        ids = self.store.encode(self.kinds[m], arrays)
        n = self.spec.crops.n_crops
        return [ids[i:i + n] for i in range(0, len(ids), n)]

    def _dense(self, m: str, keys: list[str], labels: dict, crops: dict) -> list[np.ndarray]:
        kind, info = self.kinds[m], self.targets[m]  # the crop side is the target's size (224, 448)
        arrays = [a for k in keys for c in crops[k] for a in kind.crop_inputs(labels[info.name][k], c,
                                                                                 info.token_size)]
        return self._encode(m, arrays)

    def _teacher_crops(self, m: str, keys: list[str], labels: dict, crops: dict) -> list[np.ndarray]:
        """Feature maps and global vectors per crop: at 224, crop 0 is the stored label and the teacher runs on
        crops 1..; above 224 (tok_clip@448) the stored label is the 224 map, so the teacher runs at that size on
        every crop's window (`label_at`)."""
        from omniforge.labelers import Sample
        from omniforge.tokenize.crops import crop_image

        arrays: list[np.ndarray] = []
        info = self.targets[m]
        name, teacher = info.name, self.teachers.get(info.name)
        stored = info.token_size in (None, IMAGE_SIZE)  # the label job's size: crop 0 is the stored label
        size = self.spec.crops.size if stored else info.token_size
        for k in keys:
            rows = crops[k][1:] if stored else crops[k]
            if stored:
                arrays.append(np.asarray(labels[name][k]))
            if len(rows):
                image = labels[IMAGE_MODALITY][k]
                samples = [Sample(key=k, image=crop_image(image, c, size)) for c in rows]
                results = teacher.label(samples) if stored else teacher.label_at(samples, size)
                for r in results:
                    if isinstance(r, SampleError):
                        raise r
                    arrays.append(np.asarray(r[name]))
        return self._encode(m, arrays)

    def _sequence(self, m: str, key: str, labels: dict, crops_k: np.ndarray) -> np.ndarray | SampleError:
        from omniforge.tokenize.text import Crop

        kind, info = self.kinds[m], self.targets[m]
        value = labels[info.name][key]
        h, w = labels[IMAGE_MODALITY][key].shape[:2]
        text = self.store.text()
        rows, cuts = [], []
        try:
            for i, c in enumerate(crops_k):
                crop = Crop(row=c, height=h, width=w, size=self.spec.crops.size, key=key, index=i,
                            seed=self.spec.crops.seed)
                ids, cut = text.pack(kind.units(value, crop, self.store), info.num_tokens)
                rows.append(ids)
                cuts.append(cut)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            return SampleError("bad_label", f"{m}: cannot serialize: {type(e).__name__}: {e}")
        self._cut[m, "crops"] += sum(1 for c in cuts if c)
        self._cut[m, "units"] += sum(cuts)
        return np.stack(rows).astype(np.int16)

    def _commit(self, shard: int, keys: list[str], kept: list[str], failures: dict, crops: dict, tokens: dict,
                fingerprint: str) -> None:
        out = self.spec.output
        folders = [(CROP_SETTINGS, crops)] + [(self.targets[m].token_modality, tokens[m]) for m in self.spec.modalities]
        for folder, values in folders:
            shards.write_tar(shards.tar_uri(out, folder, shard),
                             ((f"{k}.npy", codecs.encode("npy", values[k])) for k in kept))
        kept_set = set(kept)
        for folder, _ in folders:  # status tables last: the commit markers
            rows = [{"key": k, "ok": k in kept_set, "error_type": None if k in kept_set else failures[k][0],
                     "error_message": None if k in kept_set else failures[k][1], "fingerprint": fingerprint,
                     "seconds": 0.0} for k in keys]
            shards.write_status(shards.status_uri(out, folder, shard), rows)


def _count_tokens(kind: TokenizerKind, ids: np.ndarray) -> int:
    """Tokens of one sample, all crops; sequences without their [PAD] (id 0) tail."""
    return int(np.count_nonzero(ids)) if kind.sequence else int(ids.size)


class _ShardStage:
    """An actor holding one ShardTokenizer (tokenizers and feature teachers loaded once), one shard per call.

    Its constructor arguments are small (the ShardSpec, two scalars): they travel inline, so Ray can rebuild
    the actor from them when its process dies (see `_job.ActorPool`)."""

    def __init__(self, spec: ShardSpec, device: str, num_cpus: float):
        self.worker = ShardTokenizer(spec, device=device, num_threads=_job.torch_threads(num_cpus))

    def run(self, shard: int, keys: list[str], fingerprint: str) -> dict[str, Any]:
        return self.worker.run(shard, keys, fingerprint)


# ------------------------------------------------------------------------------------------------ driver

def _resolve_teachers(cfg: TokenizeConfig, root: str, label_fps: dict[tuple[str, int], list[str]]) -> tuple:
    """Feature teachers for crops 1.. (and for every crop of a feature target above 224, tok_clip@448), checked
    against the fingerprint the label job recorded; a teacher asked to run above 224 must have `label_at`."""
    resized = {parse_token_target(t).name for t in cfg.modalities
               if parse_token_target(t).teacher_crops and parse_token_target(t).token_size not in (None, IMAGE_SIZE)}
    wanted = tuple(m for m in label_modalities(cfg.modalities)
                   if get_modality(m).teacher_crops and (cfg.crops.n_crops > 1 or m in resized))
    if not wanted:
        return ()
    from omniforge.labelers import labeler_for_modality
    from omniforge.pipeline.teachers import profile_teachers, resolve_teachers

    # the label job's --weights/--option/--teacher may name other teachers too: keep those of the feature teachers
    chosen = {m: t for m, t in cfg.teachers.items() if m in wanted}
    choices = profile_teachers(cfg.profile, wanted, chosen) if cfg.profile is not None else chosen
    names = {labeler_for_modality(m, teacher=choices.get(m)).name for m in wanted}
    weights = {k: v for k, v in cfg.weights.items() if k == "*" or k in names}
    options = {k: v for k, v in cfg.options.items() if k in names}
    teachers = resolve_teachers(wanted, weights, options, teachers=chosen, root=root, profile=cfg.profile)
    for t in teachers:
        for m in t.modalities:
            if m in resized and not callable(getattr(t.cls, "label_at", None)):
                raise ConfigError(f"teacher {t.name} cannot run at another input size (it has no label_at): tokenize "
                                  f"{m} at 224 only, or pick a teacher for {m} that can")
            recorded = {fp for (mod, _), fps in label_fps.items() if mod == m for fp in fps}
            if recorded and recorded != {t.fingerprint}:
                raise ConfigError(f"{m} labels were made with another teacher, other weights or other options than "
                                  f"{t.name} with --weights {t.weights} gives "
                                  f"(fingerprint {t.fingerprint} vs {', '.join(sorted(recorded))}): pass the "
                                  f"--profile/--teacher/--weights/--option of the label job so crops 1.. use the same "
                                  f"teacher as crop 0")
    return tuple(teachers)


def _shard_fingerprint(cfg: TokenizeConfig, shard: int, label_fps: dict[tuple[str, int], list[str]],
                       tok_fps: dict[str, str], teachers: tuple) -> str:
    return _hash({
        "version": VERSION,
        "modalities": sorted(cfg.modalities),
        "tokenizers": tok_fps,
        "crops": cfg.crops.to_dict(),
        "labels": {m: label_fps[(m, shard)] for m in (IMAGE_MODALITY, *label_modalities(cfg.modalities))},
        "teachers": sorted(t.fingerprint for t in teachers),
    })


def tokenize(cfg: TokenizeConfig, *, ray_address: str | None = None) -> TokenizeSummary:
    """Tokenize the label shards under `cfg.input` into token shards under `cfg.output` (default: the same root)."""
    t_start = time.time()
    run_id = _job.new_run_id()
    root = storage.normalize(cfg.input)
    out = storage.normalize(cfg.output or cfg.input)
    manifest = load_manifest(root)
    labels = label_modalities(cfg.modalities)
    for m in dict.fromkeys((IMAGE_MODALITY, *labels)):
        if not storage.list_files(storage.join(root, shards.STATUS_DIR, m)):
            raise ConfigError(f"no {m} labels under {root}: run `omniforge label --output {root} --modalities {m}` "
                              f"first")
    keys_by_shard: dict[int, list[str]] = defaultdict(list)
    for k, s in zip(manifest.column("key").to_pylist(), manifest.column("shard").to_pylist()):
        keys_by_shard[s].append(k)
    shard_ids = sorted(keys_by_shard)
    formats.check_formats(root, labels, shard_ids)
    tokenizers_dir = storage.normalize(cfg.tokenizers)
    store = TokenizerStore(tokenizers_dir)
    tok_fps = {art.folder: store.fingerprint(art) for m in labels for art in kind_for(m).artifacts}
    label_fps = _label_fingerprints(root, tuple(dict.fromkeys((IMAGE_MODALITY, *labels))), shard_ids)
    teachers = _resolve_teachers(cfg, root, label_fps)  # config errors so far: one line, before Ray starts
    targets = tuple(parse_token_target(m) for m in cfg.modalities)
    folders = [CROP_SETTINGS] + [t.token_modality for t in targets]
    fps = {s: _shard_fingerprint(cfg, s, label_fps, tok_fps, teachers) for s in shard_ids}
    done = _job.committed(out, [(f, s, fps[s]) for s in shard_ids for f in folders])
    pending = [s for s in shard_ids if not all((f, s) in done for f in folders)]
    if pending:
        ensure_ray(ray_address)
        # before any work: every node's workers read the labels and write the tokens
        if out == root:
            _job.check_shared_output(root, "--input")  # the tokens go beside the labels
        else:
            _job.check_shared_input(root, "--input", shards.manifest_uri(root))
            _job.check_shared_output(out, "--output")
    if out != root and not storage.exists(shards.manifest_uri(out)):
        storage.write_bytes(shards.manifest_uri(out), storage.read_bytes(shards.manifest_uri(root)))
    summary = TokenizeSummary(run_id=run_id, output=out, seconds=0.0, samples=manifest.num_rows)
    summary.skipped = sum(len(keys_by_shard[s]) for s in shard_ids if s not in pending)
    _job.delete_partial_writes(out, folders)
    record = _job.RunRecord(out, f"tokenize-{run_id}", run_id=run_id, job="tokenize",
                            config={"input": root, "output": out, "modalities": list(cfg.modalities),
                                    "tokenizers": tokenizers_dir, "crops": cfg.crops.to_dict(),
                                    "weights": dict(cfg.weights), "options": dict(cfg.options),
                                    "teachers": dict(cfg.teachers), "batch_size": cfg.batch_size,
                                    "actors": cfg.actors, "device": cfg.device},
                            tokenizer_fingerprints=tok_fps,
                            feature_teachers={t.name: {"fingerprint": t.fingerprint, "modalities": list(t.modalities),
                                                       "identity": t.identity} for t in teachers})
    actors: dict[str, Any] = {}
    if pending:
        record.write()
        infos = tuple(get_modality(m) for m in dict.fromkeys((IMAGE_MODALITY, *labels)))
        spec = ShardSpec(input=root, output=out, modalities=tuple(cfg.modalities), infos=infos, targets=targets,
                         tokenizers=tokenizers_dir, crops=cfg.crops, batch_size=cfg.batch_size, teachers=teachers,
                         vit_presets=tuple(VIT_PRESETS.items()))
        with _job.omniforge_errors():  # one line for the CLI; Ray's worker trace is in its logs
            actors = _run(cfg, spec, pending, keys_by_shard, fps, summary)
    summary.seconds = time.time() - t_start
    if pending:
        record.finish(seconds=summary.seconds, actors=actors,
                      counts={"samples": summary.samples, "written": summary.written,
                              "left_out": dict(summary.left_out), "skipped": summary.skipped,
                              "tokens": dict(summary.tokens), "cut_crops": dict(summary.cut_crops),
                              "cut_units": dict(summary.cut_units)})
    return summary


def _run(cfg: TokenizeConfig, spec: ShardSpec, pending: list[int], keys_by_shard: dict[int, list[str]],
         fps: dict[int, str], summary: TokenizeSummary) -> dict[str, Any]:
    """One shard per call on a pool of shard workers; returns the workers' resources (for the run record)."""
    import ray

    gpus = cluster_gpus()
    device = _job.choose_device(cfg.device, gpus)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    n_actors = cfg.actors or (int(gpus) if device == "cuda" else max(1, int(cpus) // 2))
    n_actors = max(1, min(n_actors, len(pending)))
    # the workers do all the work (read, crop, tokenize, write): they leave half a CPU for the driver's tasks
    resources = _job.actor_resources(n_actors, device, reserve_cpus=0.5)
    pool = _job.ActorPool(_ShardStage, n_actors, resources,
                          dict(spec=spec, device=device, num_cpus=resources.num_cpus), calls_per_actor=1)
    progress = Progress(total=sum(len(keys_by_shard[s]) for s in pending), unit="img", desc="tokenize",
                        enabled=cfg.progress)
    try:
        todo = deque(pending)
        running: list = []
        while todo or running:
            while todo and pool.has_room():
                s = todo.popleft()
                running.append(pool.submit("run", s, keys_by_shard[s], fps[s]))
            ready, running = ray.wait(running, num_returns=1)
            for ref in ready:
                pool.done(ref)
                r = ray.get(ref)
                summary.written += r["written"]
                summary.left_out.update(r["left_out"])
                summary.tokens.update(r["tokens"])
                for folder, (n_crops, n_units) in r["cut"].items():
                    summary.cut_crops[folder] += n_crops
                    summary.cut_units[folder] += n_units
                progress.update(r["samples"])
        return {"shard_workers": {"actors": pool.size, "device": device, "num_cpus": resources.num_cpus,
                                  "num_gpus": resources.num_gpus}}
    finally:
        progress.close()
        pool.close()


def parse_crops(n: int, *, seed: int = 0, size: int = 224) -> CropConfig:
    try:
        return CropConfig(n_crops=n, seed=seed, size=size)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--crops: {e}") from None


__all__ = ["TokenizeConfig", "TokenizeSummary", "ShardTokenizer", "tokenize", "tokenizable", "label_modalities",
           "CROP_SETTINGS"]

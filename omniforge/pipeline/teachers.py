"""The teachers of a job, resolved on the driver: `--profile`, `--weights`, `--option` and `--teacher` parsed and
checked, each modality's teacher chosen, run order (a derived labeler after what it reads) and fingerprints. Shared
by the label job and the tokenize job (which re-runs feature teachers on crops 1..); nothing here loads a model.

A teacher profile (`--profile 4m21`) chooses, for every modality of the job, the teacher that declares an entry
for that profile (`Labeler.profiles`), with the entry's weights and options. What the user gives explicitly wins
over the profile, one fact at a time:
  --teacher MODALITY=NAME   replaces the profile's teacher of that modality (NAME then runs outside the profile);
  --weights NAME=VALUE      replaces the profile's weights of NAME; a default kind in --weights (`tiny`,
                            `pretrained`) replaces them for every teacher (`--profile 4m21 --weights tiny`: the
                            profile's teachers and options with random weights, offline);
  --option NAME.KEY=VALUE   replaces that one option; the profile's other options for NAME stay.
A modality the profile has no teacher for is an error naming it (drop it, or choose its teacher with --teacher),
and a learned teacher outside the profile needs its weights given (the profile cannot say them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from omniforge import shards, storage
from omniforge.errors import ConfigError
from omniforge.labelers import (Labeler, get_labeler_class, labeler_for_modality, labelers_for_modality, list_profiles,
                                 profile_teacher)
from omniforge.labelers.base import TINY, Profile
from omniforge.modalities import ModalityInfo, all_modalities, get_modality

def parse_weights(spec: str) -> dict[str, str]:
    """`tiny`, `pretrained`, or a comma list mixing a default with `teacher=value` overrides, e.g.
    `tiny,clip=/ckpt/open_clip_pytorch_model.bin`. Returns {"*": default, teacher: value, ...}, "*" only when the
    spec names a default: a teacher named nowhere gets tiny, or with a profile the profile's weights."""
    out: dict[str, str] = {}
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


def parse_teachers(items: list[str]) -> dict[str, str]:
    """`--teacher MODALITY=TEACHER` items, each possibly a comma list, e.g. `depth=omnidata`: which of a
    modality's teachers writes it (default: the modality's default teacher). Returns {modality: teacher}."""
    out: dict[str, str] = {}
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        modality, eq, teacher = (x.strip() for x in part.partition("="))
        if not (eq and modality and teacher):
            raise ConfigError(f"--teacher {part!r}: use MODALITY=TEACHER, e.g. depth=omnidata")
        if out.get(modality, teacher) != teacher:
            raise ConfigError(f"--teacher names two teachers for {modality}: {out[modality]} and {teacher}")
        out[modality] = teacher
    return out


def check_teacher_args(weights: Mapping[str, str], options: Mapping[str, Mapping[str, Any]],
                       teachers: Mapping[str, str]) -> None:
    """Validate --weights, --option and --teacher on their own, whatever the job: every teacher they name
    exists, every option is one of its teacher's with a valid value, every chosen teacher writes its modality.
    Cheap (no model, no checkpoint read): a one-line ConfigError before any work starts."""
    for name in {*weights, *options} - {"*"}:
        get_labeler_class(name)  # unknown names raise, listing the valid ones
    for name, opts in options.items():
        cls = get_labeler_class(name)
        if cls.options_type() is not None:
            cls.make_options(**opts)
    for modality, name in teachers.items():
        labeler_for_modality(modality, teacher=name)


def check_profile(name: str) -> str:
    """`name` if it is a known teacher profile, else a one-line ConfigError listing the known ones."""
    known = list_profiles()
    if name not in known:
        raise ConfigError(f"unknown teacher profile {name!r}; known profiles: {', '.join(known) or '(none)'} "
                          f"(omniforge list --profile NAME shows one)")
    return name


@dataclass(frozen=True)
class ProfileRow:
    """What a profile says for one modality: its teacher and that teacher's entry, or None for both when the
    profile has no teacher for the modality."""

    modality: str
    teacher: type[Labeler] | None
    entry: Profile | None


def profile_rows(profile: str) -> list[ProfileRow]:
    """Every modality some registered teacher writes, in registry order, with what `profile` says for it."""
    check_profile(profile)
    rows = []
    for m in all_modalities():
        if not labelers_for_modality(m.name):
            continue
        cls = profile_teacher(profile, m.name)
        rows.append(ProfileRow(m.name, cls, cls.profile_entries()[profile] if cls is not None else None))
    return rows


def profile_teachers(profile: str, modalities: tuple[str, ...], teachers: Mapping[str, str]) -> dict[str, str]:
    """{modality: teacher name} for a job run with `profile`: the user's `teachers` (--teacher) as given, every
    other modality the profile's teacher of it. A modality the profile has no teacher for is a ConfigError saying
    what to do; one no teacher writes at all is left to the usual error of `labeler_for_modality`."""
    check_profile(profile)
    chosen = dict(teachers)
    for m in modalities:
        if m in chosen or not labelers_for_modality(m):
            continue
        cls = profile_teacher(profile, m)
        if cls is None:
            names = ", ".join(c.name for c in labelers_for_modality(m))
            raise ConfigError(f"profile {profile} has no teacher for {m}: drop {m} from --modalities, or label it "
                              f"outside the profile with --teacher {m}=NAME (teachers of {m}: {names})")
        chosen[m] = cls.name
    return chosen


def apply_profile(profile: str, modalities: tuple[str, ...], weights: Mapping[str, str],
                  options: Mapping[str, Mapping[str, Any]], teachers: Mapping[str, str]
                  ) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The job's --teacher, --weights and --option with `profile` filled in where the user gave nothing (the
    precedence in this module's docstring), and, per teacher the job runs, what the profile made of it for the
    run record: its entry (reference, stand_in, weights, options) and what the user's flags overrode, or
    {"outside": true} for a teacher chosen with --teacher that has no entry in the profile."""
    chosen = profile_teachers(profile, modalities, teachers)
    names = dict.fromkeys(labeler_for_modality(m, teacher=chosen.get(m)).name for m in modalities)
    merged_weights, merged_options = dict(weights), {k: dict(v) for k, v in options.items()}
    notes: dict[str, dict[str, Any]] = {}
    for name in names:
        cls = get_labeler_class(name)
        given_weights = weights.get(name, weights.get("*"))
        entry = cls.profile_entries().get(profile)
        if entry is None:
            if cls.learned and given_weights is None:
                raise ConfigError(f"{name} runs outside profile {profile} (chosen with --teacher), so the profile "
                                  f"does not say its weights: pass --weights {name}=pretrained (or a checkpoint "
                                  f"path, or tiny)")
            notes[name] = {"profile": profile, "outside": True}
            continue
        if given_weights is None:
            merged_weights[name] = entry.weights
        given_options = dict(options.get(name, {}))
        merged_options[name] = {**entry.options, **given_options}
        overrides: dict[str, Any] = {}
        if given_weights is not None and cls.identify_weights(given_weights) != cls.identify_weights(entry.weights):
            overrides["weights"] = given_weights
        changed = {k: v for k, v in given_options.items() if k not in entry.options or entry.options[k] != v}
        if changed:
            overrides["options"] = changed
        notes[name] = {"profile": profile, "reference": entry.reference, "stand_in": entry.stand_in,
                       "weights": entry.weights, "options": dict(entry.options), "overrides": overrides}
    return chosen, merged_weights, merged_options, notes


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
    requires: tuple[str, ...] = ()  # derived labelers: inputs that must exist for a sample
    optional: tuple[str, ...] = ()  # inputs used when they exist
    input_infos: Mapping[str, ModalityInfo] = field(default_factory=dict)
    profile: Mapping[str, Any] | None = None  # with --profile: what the profile made of it (`apply_profile`)

    def build(self, device: str = "cpu") -> Labeler:
        return self.cls(weights=self.weights, device=device, modalities=self.modalities, **self.options)


def resolve_teachers(modalities: tuple[str, ...], weights: Mapping[str, str],
                     options: Mapping[str, Mapping[str, Any]], *, teachers: Mapping[str, str] | None = None,
                     root: str | None = None, profile: str | None = None) -> list[Teacher]:
    """The job's teachers in run order (a derived labeler after what it reads), with fingerprints.

    Each modality is written by its default teacher, or by the one `teachers` names for it
    ({modality: teacher name}, `--teacher`); with a `profile`, by the profile's teacher of it, with the profile's
    weights and options where `teachers`, `weights` and `options` say nothing (`apply_profile`). Every teacher's
    options and weights are validated here, on the driver, without loading a model: a bad name, option, value or
    checkpoint path is a one-line error before the plan or Ray starts.

    A derived labeler's fingerprint covers the fingerprints of its inputs: relabeling sam_instance with
    other weights makes sam_edge stale too. Inputs not produced by this job are read from `root`, where
    they must have been labeled before.
    """
    teachers = dict(teachers or {})
    notes: dict[str, dict[str, Any]] = {}
    if profile is not None:
        check_teacher_args(weights, options, teachers)  # the user's own flags first: errors name what they gave
        teachers, weights, options, notes = apply_profile(profile, modalities, weights, options, teachers)
    check_teacher_args(weights, options, teachers)
    extra = [m for m in teachers if m not in modalities]
    if extra:
        raise ConfigError(f"--teacher names {', '.join(extra)}, which this job does not label "
                          f"(--modalities {','.join(modalities)})")
    by_name: dict[str, list[str]] = {}
    for m in modalities:
        cls = labeler_for_modality(m, teacher=teachers.get(m))
        by_name.setdefault(cls.name, []).append(m)
    for name in list(weights) + list(options):
        if name != "*" and name not in by_name:
            raise ConfigError(f"--weights/--option name teacher {name!r}, which this job does not run "
                              f"(teachers: {', '.join(by_name)})")
    produced: dict[str, str] = {}  # modality -> fingerprint of the job's teacher writing it
    resolved = []
    for name in _run_order(by_name, set(modalities)):
        cls, mods = get_labeler_class(name), by_name[name]
        w = weights.get(name, weights.get("*", TINY))
        opts = dict(options.get(name, {}))
        if not cls.learned:
            cls(weights=w, modalities=tuple(mods), **opts)  # cheap: bad options fail here, before any work
        identity = dict(cls.identity(weights=w, **opts))  # validates options and weights without loading a model
        input_fps = {}
        for m in (*cls.requires, *cls.optional_inputs):
            fps = {produced[m]} if m in produced else (_committed_fingerprints(root, m) if root else set())
            if fps:
                input_fps[m] = ",".join(sorted(fps))
            elif m in cls.requires and root is not None:
                raise ConfigError(f"{name} derives from {m}, which is neither in --modalities nor labeled in {root}: "
                                  f"add {m} to --modalities")
        if input_fps:
            identity["inputs"] = input_fps
        fingerprint = Labeler.fingerprint_of(identity)
        produced.update({m: fingerprint for m in mods})
        resolved.append(Teacher(name=name, cls=cls, modalities=tuple(mods), weights=w, options=opts,
                                fingerprint=fingerprint, identity=identity, infos={m: get_modality(m) for m in mods},
                                requires=tuple(cls.requires), optional=tuple(cls.optional_inputs),
                                input_infos={m: get_modality(m) for m in (*cls.requires, *cls.optional_inputs)},
                                profile=notes.get(name)))
    return resolved


def _run_order(by_name: Mapping[str, list[str]], job_modalities: set[str]) -> list[str]:
    """Teacher names in an order where every derived labeler runs after the job's teachers it reads."""
    producer = {m: name for name, mods in by_name.items() for m in mods}
    deps = {name: {producer[m] for m in (*get_labeler_class(name).requires, *get_labeler_class(name).optional_inputs)
                   if m in job_modalities and producer[m] != name} for name in by_name}
    order: list[str] = []
    while deps:
        ready = [n for n in by_name if n in deps and not deps[n] - set(order)]
        if not ready:
            raise ConfigError(f"labelers depend on each other in a cycle: {sorted(deps)}")
        for n in ready:
            order.append(n)
            del deps[n]
    return order


def _committed_fingerprints(root: str, modality: str) -> set[str]:
    """Fingerprints of the committed shards of a modality under root (empty when none)."""
    uris = [u for u, _ in storage.list_files(storage.join(root, shards.STATUS_DIR, modality), (".parquet",))]
    with ThreadPoolExecutor(16) as pool:
        return set().union(*pool.map(shards.status_fingerprints, uris))


__all__ = ["ProfileRow", "Teacher", "apply_profile", "check_profile", "check_teacher_args", "parse_options",
           "parse_teachers", "parse_weights", "profile_rows", "profile_teachers", "resolve_teachers"]

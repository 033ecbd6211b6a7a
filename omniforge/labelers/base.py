"""The labeler contract.

A labeler is a thin class: class attributes declare what it writes, a frozen options dataclass declares its
options (`LabelerOptions`, fields made by `option`), the constructor loads weights once, and `label` turns a
batch of decoded samples into one result per sample. Resources (GPUs, batch size, concurrency) are decided
by the pipeline, never here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np

from omniforge.errors import ConfigError, SampleError, WeightsError

TINY = "tiny"
PRETRAINED = "pretrained"
PROFILE_4M21 = "4m21"  # the built-in teacher profile: what 4M-21 pseudo-labeled CC12M with
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass
class Sample:
    """One decoded corpus sample, as every labeler receives it.

    image: (H, W, 3) uint8 RGB, EXIF orientation applied, shorter side at most the storage size.
    caption: the corpus alt-text, or None when the corpus has none for this sample.
    inputs: for derived labelers, the decoded labels of this sample named in the labeler's `requires`
        (always present: a sample whose required input failed never reaches the labeler) and in its
        `optional_inputs` (present only when that modality was labeled for this sample), decoded as
        `omniforge.codecs.decode` does: JSON as dicts/lists, PNG/JPEG as numpy arrays (P-mode PNG as
        a PIL image), npy as arrays, text as str.
    """

    key: str
    image: np.ndarray
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)


def option(default: Any, meaning: str, *, choices: tuple[Any, ...] | None = None, ge: float | None = None,
           le: float | None = None) -> Any:
    """Declare one teacher option: a dataclass field with its default, what it means (`omniforge list TEACHER`
    prints it) and its valid values, which `LabelerOptions.__post_init__` checks with the field's type."""
    return field(default=default, metadata={"help": meaning, "choices": choices, "ge": ge, "le": le})


@dataclass(frozen=True)
class OptionDoc:
    """One option as `omniforge list TEACHER` prints it."""

    name: str
    type: str  # "int", "float", "str", "bool", or one of them followed by " | None"
    default: Any
    help: str
    valid: str  # the valid values in words, e.g. "a number in [0, 1]"


@dataclass(frozen=True, kw_only=True)
class LabelerOptions:
    """Base of every teacher's options: a frozen, keyword-only dataclass whose fields are the options.

    Declare each option once, as a field made by `option(default, meaning, choices=..., ge=..., le=...)` and
    annotated `int`, `float`, `str` or `bool` (optionally `| None`). `__post_init__` checks every field against
    its type (a `str` must be non-empty; a `float` takes an int and stores it as a float; `bool` is never an
    int) and its choices and bounds; subclasses add checks between fields in their own `__post_init__`
    (calling this one first) and raise ConfigError naming the option and its valid values. The teacher's
    constructor, its fingerprint identity and `omniforge list TEACHER` are all derived from this class.

    `removed` maps options that no longer exist to what to use instead; the error for such an option says so.
    """

    removed: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_option(f.name, hints[f.name], f.metadata, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, teacher: str, options: Mapping[str, Any]) -> Self:
        """Build and validate the options of `teacher` from {option: value}; every error is a one-line
        ConfigError naming the teacher, the option and the valid options or values."""
        unknown = sorted(set(options) - set(cls.names()))
        for key in unknown:
            if key in cls.removed:
                raise ConfigError(f"{teacher}: option {key} was removed: {cls.removed[key]}")
        if unknown:
            valid = (f"its options are {', '.join(cls.names())}" if cls.names() else f"{teacher} takes no options")
            raise ConfigError(f"{teacher}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                              f"{valid} (omniforge list {teacher})")
        try:
            return cls(**options)
        except ConfigError as e:
            raise ConfigError(f"{teacher}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def describe(cls) -> list[OptionDoc]:
        hints = _type_hints(cls)
        return [OptionDoc(name=f.name, type=_type_name(hints[f.name]), default=f.default,
                          help=f.metadata.get("help", ""), valid=_valid_values(hints[f.name], f.metadata))
                for f in dataclasses.fields(cls)]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(hint: Any) -> tuple[type, bool]:
    """`X | None` -> (X, True); `X` -> (X, False), for X one of bool, int, float, str."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    base = [a for a in args if a is not type(None)]
    if len(base) != 1 or base[0] not in (bool, int, float, str):
        raise TypeError(f"option type {hint!r} is not supported: use int, float, str or bool, optionally | None")
    return base[0], len(args) > 1


def _type_name(hint: Any) -> str:
    base, optional = _split_optional(hint)
    return base.__name__ + (" | None" if optional else "")


def _valid_values(hint: Any, meta: Mapping[str, Any]) -> str:
    base, optional = _split_optional(hint)
    ge, le, choices = meta.get("ge"), meta.get("le"), meta.get("choices")
    if choices:
        text = "one of " + ", ".join(json.dumps(c) for c in choices)
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}[base]
        if ge is not None and le is not None:
            text += f" in {ge}..{le}" if base is int else f" in [{ge}, {le}]"
        elif ge is not None:
            text += f" >= {ge}"
        elif le is not None:
            text += f" <= {le}"
    return text + (" or null" if optional else "")


def _check_option(name: str, hint: Any, meta: Mapping[str, Any], value: Any) -> Any:
    """The value, checked against its annotation and metadata (a float option's int stored as a float)."""
    base, optional = _split_optional(hint)
    if value is None and optional:
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if ok and base is float:
        ok = math.isfinite(value)
    if ok and base is str:
        ok = bool(value.strip())
    if ok and meta.get("choices"):
        ok = value in meta["choices"]
    if ok and meta.get("ge") is not None:
        ok = value >= meta["ge"]
    if ok and meta.get("le") is not None:
        ok = value <= meta["le"]
    if not ok:
        raise ConfigError(f"option {name}={json.dumps(value, default=repr)} is not valid: expected "
                          f"{_valid_values(hint, meta)}")
    return value


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One teacher's entry in a teacher profile (`Labeler.profiles`): how this teacher labels the modalities it
    writes when a job runs that profile (`omniforge label --profile NAME`).

    weights    the weights kind the teacher loads, as `--weights TEACHER=...` takes it ("pretrained": the
               publisher's weights its documentation names; the release itself is chosen by its options, e.g.
               `hub_id` or `pretrained_tag`)
    options    the teacher's options, as `--option TEACHER.KEY=VALUE` takes them; checked against its options
               class when the teacher registers, so a typo fails on import
    reference  what the profile's model family used for these modalities, in words (teacher, weights,
               resolution, preprocessing, thresholds)
    stand_in   None when this teacher is that reference; otherwise why omniforge runs this one instead and how
               its labels may differ (`omniforge list --profile NAME` prints it as STAND-IN)
    """

    reference: str
    weights: str = PRETRAINED
    options: Mapping[str, Any] = field(default_factory=dict)
    stand_in: str | None = None

    def __post_init__(self) -> None:
        for name in ("reference", "weights"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise TypeError(f"Profile.{name} must be a non-empty string, got {value!r}")
        if self.stand_in is not None and (not isinstance(self.stand_in, str) or not self.stand_in.strip()):
            raise TypeError(f"Profile.stand_in must be None or a non-empty string (why this teacher stands in), "
                            f"got {self.stand_in!r}")
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise TypeError(f"Profile.options must map option names to values, got {self.options!r}")
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))


def check_profile_name(name: Any) -> str:
    """A profile name: lower-case letters, digits, '_' and '-' (e.g. "4m21")."""
    if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
        raise ConfigError(f"profile name {name!r} is not valid: use lower-case letters, digits, _ and -, e.g. "
                          f"{PROFILE_4M21}")
    return name


class Labeler:
    """Base class of every teacher.

    Subclasses set:
      name        registry name of the teacher (e.g. "dinov2"): --weights NAME=..., --option NAME.KEY=VALUE,
                  --teacher MODALITY=NAME
      modalities  the modality folders it writes (e.g. ("dinov2", "dinov2_global"))
      default_for the modalities it writes for which it is the default teacher; a modality with one teacher
                  needs no claim, one with several is written by its claimant unless the job names another
                  (--teacher MODALITY=NAME); two teachers claiming one modality is an error at registration
      options_class  its options (a LabelerOptions subclass; LabelerOptions itself: no options); the
                  constructor builds `self.options` from it, the fingerprint identity is derived from it. None
                  (a labeler written before typed options): the subclass's own constructor takes its options
                  as keywords, and its identity holds them as given
      learned     True when it runs a neural network: the pipeline gives it an actor pool (and a GPU when
                  there is one); False for cheap CPU work that runs in plain tasks
      version     bump when the output for the same weights and options changes
      new_modalities  ModalityInfo entries for modalities omniforge does not know yet (plugins)
      requires    modalities this labeler derives from (e.g. sam_edge from sam_instance): the job runs it
                  after them, or reads them from the shards of an earlier job, and hands them over in
                  `Sample.inputs`; a sample whose required input failed is recorded as failed
                  ("missing_input") without calling the labeler
      optional_inputs  modalities used when they exist for a sample (e.g. metadata from det)
      profiles    {profile name: Profile}: how it labels its modalities in each teacher profile it belongs to
                  (e.g. {PROFILE_4M21: Profile(reference=..., options=...)}); a modality has at most one teacher
                  per profile, checked at registration. Not inherited: a subclass registered under another name
                  is in no profile unless it declares its own (`profile_entries`)
    and implement `label`.
    """

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]
    default_for: ClassVar[tuple[str, ...]] = ()
    options_class: ClassVar[type[LabelerOptions] | None] = None
    learned: ClassVar[bool] = False
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    new_modalities: ClassVar[tuple[Any, ...]] = ()
    profiles: ClassVar[Mapping[str, Profile]] = {}

    options: LabelerOptions

    def __init__(self, *, weights: str = TINY, device: str = "cpu", modalities: tuple[str, ...] | None = None,
                 options: LabelerOptions | None = None, **kwargs: Any):
        """`options` (an instance of `options_class`) or the options as keywords, not both."""
        if self.options_type() is not None:
            self.options = self.make_options(options, **kwargs)
        elif options is not None or kwargs:
            raise ConfigError(f"{self.name}: unknown options {', '.join(sorted(kwargs)) or 'object'}; "
                              f"{self.name} takes no options")
        self.weights = weights
        self.device = device
        self.wanted = tuple(modalities or self.modalities)

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        """Label a batch. Return, per sample, {modality: value} for the modalities in `self.wanted`, or
        a SampleError when that one sample cannot be labeled. Raising fails the whole batch (the
        pipeline then retries the samples one by one to find the culprit)."""
        raise NotImplementedError

    # -- profiles ------------------------------------------------------------------------------------------

    @classmethod
    def profile_entries(cls) -> Mapping[str, Profile]:
        """The profile entries this class declares itself: `profiles` is not inherited, since a subclass is
        another teacher (another name), and a modality has one teacher per profile."""
        return vars(cls).get("profiles", {})

    # -- options -------------------------------------------------------------------------------------------

    @classmethod
    def options_type(cls) -> type[LabelerOptions] | None:
        """The options class; None for a labeler without one whose own constructor takes untyped options."""
        if cls.options_class is not None:
            return cls.options_class
        return LabelerOptions if cls.__init__ is Labeler.__init__ else None

    @classmethod
    def make_options(cls, options: LabelerOptions | None = None, /, **kwargs: Any) -> LabelerOptions:
        """The validated options object, from an instance of the options class or from keywords. Cheap: it
        never loads a model, so the driver calls it for every teacher before a job starts."""
        typed = cls.options_type()
        if typed is None:
            raise TypeError(f"{cls.name} declares no options_class: its constructor takes its own options")
        if options is None:
            return typed.from_mapping(cls.name, kwargs)
        if kwargs or not isinstance(options, typed):
            raise ConfigError(f"{cls.name}: pass a {typed.__name__} or options as keywords, not "
                              f"{type(options).__name__}{' and keywords' if kwargs else ''}")
        return options

    # -- fingerprint ---------------------------------------------------------------------------------------

    @classmethod
    def identity(cls, *, weights: str = TINY, **options: Any) -> dict[str, Any]:
        """What determines this labeler's outputs: written into fingerprints and run records.

        Computed on the driver without loading the model; bad options raise ConfigError here. Local checkpoint
        files are identified by their sha256, so replacing a file invalidates what was labeled with it.
        """
        if cls.options_type() is None:  # untyped options: as given
            values = {k: options[k] for k in sorted(options)}
        else:
            values = cls.identity_options(cls.make_options(**options), weights=weights, given=tuple(options))
        return {"labeler": cls.name, "version": cls.version, "weights": cls.identify_weights(weights),
                "options": values}

    @classmethod
    def identity_options(cls, options: LabelerOptions, *, weights: str, given: tuple[str, ...]) -> dict[str, Any]:
        """The options in the fingerprint. Learned teachers: every option, defaults included (a changed default
        relabels); other teachers: the options the user gave (`given`). That split is how the fingerprints of
        earlier releases were made, kept so that corpora labeled then still count as done."""
        del weights
        values = options.to_dict()
        return values if cls.learned else {k: values[k] for k in sorted(given)}

    @classmethod
    def identify_weights(cls, weights: str) -> str:
        """The weights in the fingerprint: the kind, or a local checkpoint's content hash."""
        return weights_identity(weights)

    @classmethod
    def fingerprint(cls, *, weights: str = TINY, **options: Any) -> str:
        return Labeler.fingerprint_of(cls.identity(weights=weights, **options))

    @staticmethod
    def fingerprint_of(identity: dict[str, Any]) -> str:
        blob = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_identity(weights: str) -> str:
    if weights in (TINY, PRETRAINED) or "://" in weights or weights.startswith("hf-hub:"):
        return weights
    return f"file-sha256:{file_sha256(os.path.abspath(weights))}"


@functools.lru_cache(maxsize=64)
def file_sha256(path: str) -> str:
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint {path} not found: pass an existing file with --weights TEACHER=PATH, "
                           f"or --weights tiny to run offline with random weights")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint_path(weights: str) -> bool:
    return weights not in (TINY, PRETRAINED)

"""Labeler registry: a decorator, a factory, and the `omniforge.labelers` entry-point group.

A modality may have several teachers. Each teacher says in `default_for` for which of its modalities it is
the default; a modality with a single teacher needs no claim. A job runs the default teacher of each
modality unless it names another (`--teacher MODALITY=NAME`, `labeler_for_modality(m, teacher=NAME)`).
Built-in teachers register on `import omniforge.labelers`, plugins after them: a plugin teacher for an
existing modality is one more teacher of it, never a silent replacement.

Teacher profiles (`Labeler.profiles`, e.g. "4m21") are declared by the teachers themselves: the known profiles
are the union over registered teachers, and a modality has at most one teacher in each (`profile_teacher`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniforge._plugins import load_group
from omniforge.errors import ConfigError, WeightsError
from omniforge.labelers.base import Labeler, LabelerOptions, Profile, check_profile_name
from omniforge.modalities import MODALITIES, load_entry_points, register_modality

ENTRY_POINT_GROUP = "omniforge.labelers"

_LABELERS: dict[str, type[Labeler]] = {}  # name -> class, in registration order
_DEFAULTS: dict[str, str] = {}  # modality -> name of the teacher claiming to be its default


def register_labeler(cls: type[Labeler]) -> type[Labeler]:
    """Class decorator: make a Labeler subclass available by its `name`.

    Checks everything before registering anything: a teacher that cannot be registered leaves the registry
    as it was.
    """
    for attr in ("name", "modalities"):
        if not getattr(cls, attr, None):
            raise TypeError(f"labeler {cls.__qualname__} must set the class attribute {attr!r}")
    _check_options_class(cls)
    new = {info.name for info in getattr(cls, "new_modalities", ())}
    if any(m not in MODALITIES and m not in new for m in cls.modalities):
        load_entry_points()  # a plugin's modality may be declared through the omniforge.modalities group
    for m in cls.modalities:
        if m not in MODALITIES and m not in new:
            raise TypeError(f"labeler {cls.__qualname__} writes {m!r}, which is not a known modality: declare it in "
                            f"the class attribute new_modalities = (ModalityInfo(...),) or an omniforge.modalities "
                            f"entry point")
    existing = _LABELERS.get(cls.name)
    if existing is cls:
        return cls
    if existing is not None:
        raise ConfigError(f"labeler name {cls.name!r} is registered twice ({existing.__module__}."
                          f"{existing.__qualname__}, {cls.__module__}.{cls.__qualname__}): rename one of them")
    for m in cls.default_for:
        if m not in cls.modalities:
            raise TypeError(f"labeler {cls.__qualname__} claims to be the default teacher of {m!r}, which it does not "
                            f"write (modalities = {cls.modalities})")
        if m in _DEFAULTS:
            raise ConfigError(f"teachers {_DEFAULTS[m]!r} ({_LABELERS[_DEFAULTS[m]].__module__}) and {cls.name!r} "
                              f"({cls.__module__}) both claim to be the default teacher of {m!r}: remove {m!r} from "
                              f"the default_for of one of them (the other stays selectable with --teacher {m}=NAME)")
    _check_profiles(cls)
    for info in getattr(cls, "new_modalities", ()):
        register_modality(info)
    _LABELERS[cls.name] = cls
    _DEFAULTS.update({m: cls.name for m in cls.default_for})
    return cls


def _check_options_class(cls: type[Labeler]) -> None:
    options = cls.options_class
    if options is None:
        return
    if not (isinstance(options, type) and issubclass(options, LabelerOptions)
            and "__dataclass_fields__" in vars(options) and options.__dataclass_params__.frozen):
        raise TypeError(f"labeler {cls.__qualname__}: options_class must be a LabelerOptions subclass decorated with "
                        f"@dataclass(frozen=True, kw_only=True)")
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"labeler {cls.__qualname__}: option {f.name!r} needs a default")
    options()  # the defaults must be valid (and the annotations supported)


def _check_profiles(cls: type[Labeler]) -> None:
    """Every profile entry of `cls` is a Profile whose options and weights the teacher accepts (checked without
    loading a model), and no other registered teacher of one of its modalities is in the same profile."""
    for name, entry in cls.profile_entries().items():
        check_profile_name(name)
        if not isinstance(entry, Profile):
            raise TypeError(f"labeler {cls.__qualname__}: profiles[{name!r}] must be a Profile, got "
                            f"{type(entry).__name__}")
        try:
            if cls.options_type() is not None:
                cls.make_options(**entry.options)
            elif entry.options:
                raise ConfigError(f"{cls.name} declares no options_class, so a profile cannot set its options")
            cls.identify_weights(entry.weights)
        except (ConfigError, WeightsError) as e:
            raise ConfigError(f"labeler {cls.__qualname__}, profile {name!r}: {e}") from None
        for other in _LABELERS.values():
            shared = [m for m in cls.modalities if m in other.modalities]
            if shared and name in other.profile_entries() and other is not cls:
                raise ConfigError(f"teachers {other.name!r} ({other.__module__}) and {cls.name!r} ({cls.__module__}) "
                                  f"are both in profile {name!r} for {', '.join(shared)}: a modality has one teacher "
                                  f"per profile; remove {name!r} from the profiles of one of them")


def _load_entry_points() -> None:
    load_group(ENTRY_POINT_GROUP, register_labeler)  # the same class twice is a no-op; a taken name an error


def list_labelers() -> list[str]:
    _load_entry_points()
    return sorted(_LABELERS)


def get_labeler_class(name: str) -> type[Labeler]:
    _load_entry_points()
    try:
        return _LABELERS[name]
    except KeyError:
        raise ConfigError(f"unknown labeler {name!r}; registered labelers: {', '.join(sorted(_LABELERS))}") from None


def labelers_for_modality(modality: str) -> list[type[Labeler]]:
    """Every registered teacher that writes `modality`, the default first, then in registration order."""
    _load_entry_points()
    teachers = [cls for cls in _LABELERS.values() if modality in cls.modalities]
    default = _DEFAULTS.get(modality)
    return sorted(teachers, key=lambda cls: cls.name != default)


def labeler_for_modality(modality: str, teacher: str | None = None) -> type[Labeler]:
    """The teacher that writes `modality`: the one named `teacher` (`--teacher MODALITY=NAME`), else the
    modality's default (the teacher claiming it in `default_for`, or its only teacher)."""
    teachers = labelers_for_modality(modality)
    if not teachers:
        known = sorted({m for cls in _LABELERS.values() for m in cls.modalities})
        raise ConfigError(f"no labeler writes modality {modality!r}; labelable modalities: {', '.join(known)}")
    names = ", ".join(cls.name for cls in teachers)
    if teacher is not None:
        for cls in teachers:
            if cls.name == teacher:
                return cls
        what = "does not write it" if teacher in _LABELERS else "is not a registered labeler"
        raise ConfigError(f"--teacher {modality}={teacher}: {teacher!r} {what}; teachers of {modality}: {names}")
    if modality in _DEFAULTS:
        return _LABELERS[_DEFAULTS[modality]]
    if len(teachers) == 1:
        return teachers[0]
    raise ConfigError(f"modality {modality!r} has several teachers ({names}) and none is its default: choose one "
                      f"with --teacher {modality}=NAME")


def default_teacher_name(modality: str) -> str | None:
    """The name of `modality`'s default teacher, or None when it has none (no teacher, or several unclaimed)."""
    try:
        return labeler_for_modality(modality).name
    except ConfigError:
        return None


def list_profiles() -> list[str]:
    """The names of the teacher profiles the registered teachers declare, sorted."""
    _load_entry_points()
    return sorted({name for cls in _LABELERS.values() for name in cls.profile_entries()})


def profile_teacher(profile: str, modality: str) -> type[Labeler] | None:
    """The teacher that writes `modality` in `profile`, or None when the profile has none for it."""
    for cls in labelers_for_modality(modality):
        if profile in cls.profile_entries():
            return cls
    return None


def create_labeler(name: str, **kwargs: Any) -> Labeler:
    return get_labeler_class(name)(**kwargs)

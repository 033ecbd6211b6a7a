"""Labeler registry: a decorator, a factory, and the `omniforge.labelers` entry-point group."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from omniforge.errors import ConfigError
from omniforge.labelers.base import Labeler
from omniforge.modalities import MODALITIES, register_modality

ENTRY_POINT_GROUP = "omniforge.labelers"

_LABELERS: dict[str, type[Labeler]] = {}
_entry_points_loaded = False


def register_labeler(cls: type[Labeler]) -> type[Labeler]:
    """Class decorator: make a Labeler subclass available by its `name`."""
    for attr in ("name", "modalities"):
        if not getattr(cls, attr, None):
            raise TypeError(f"labeler {cls.__qualname__} must set the class attribute {attr!r}")
    for info in getattr(cls, "new_modalities", ()):
        register_modality(info)
    for m in cls.modalities:
        if m not in MODALITIES:
            raise TypeError(f"labeler {cls.__qualname__} writes {m!r}, which is not a known modality: declare it in "
                            f"the class attribute new_modalities = (ModalityInfo(...),)")
    existing = _LABELERS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"labeler name {cls.name!r} is registered twice ({existing.__module__}, {cls.__module__})")
    _LABELERS[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Labeler) and cls.name not in _LABELERS:
            register_labeler(cls)


def list_labelers() -> list[str]:
    _load_entry_points()
    return sorted(_LABELERS)


def get_labeler_class(name: str) -> type[Labeler]:
    _load_entry_points()
    try:
        return _LABELERS[name]
    except KeyError:
        raise ConfigError(f"unknown labeler {name!r}; registered labelers: {', '.join(sorted(_LABELERS))}") from None


def labeler_for_modality(modality: str) -> type[Labeler]:
    """The registered labeler that writes `modality`."""
    _load_entry_points()
    for cls in _LABELERS.values():
        if modality in cls.modalities:
            return cls
    known = sorted(m for cls in _LABELERS.values() for m in cls.modalities)
    raise ConfigError(f"no labeler writes modality {modality!r}; labelable modalities: {', '.join(known)}")


def create_labeler(name: str, **kwargs: Any) -> Labeler:
    return get_labeler_class(name)(**kwargs)

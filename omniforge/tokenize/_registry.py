"""Tokenizer-kind registry: a decorator, a factory, and the `omniforge.tokenizers` entry-point group.

A modality names its kind in `ModalityInfo.tokenizer`; `kind_for(info)` gives the kind class bound to that
modality. Plugins use a built-in kind by name, or register their own class (a `TokenizerKind` subclass)
with `@register_kind` in-tree or through the entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from omniforge._plugins import load_group
from omniforge.errors import ConfigError
from omniforge.modalities import ModalityInfo, get_modality

if TYPE_CHECKING:
    from omniforge.tokenize.kinds import TokenizerKind

ENTRY_POINT_GROUP = "omniforge.tokenizers"

_KINDS: dict[str, type[TokenizerKind]] = {}


def register_kind(cls: type[TokenizerKind]) -> type[TokenizerKind]:
    """Class decorator: make a TokenizerKind subclass available by its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "none":
        raise TypeError(f"tokenizer kind {cls.__qualname__} must set the class attribute `name` (not 'none')")
    existing = _KINDS.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"tokenizer kind {name!r} is registered twice ({existing.__module__}."
                          f"{existing.__qualname__}, {cls.__module__}.{cls.__qualname__})")
    _KINDS[name] = cls
    return cls


def _load() -> None:
    import omniforge.tokenize.kinds  # noqa: F401 - the built-in kinds register themselves on import

    load_group(ENTRY_POINT_GROUP, register_kind)  # the same class twice is a no-op; a taken name an error


def list_kinds() -> list[str]:
    _load()
    return sorted(_KINDS)


def get_kind(name: str) -> type[TokenizerKind]:
    _load()
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(f"unknown tokenizer kind {name!r}; registered kinds: {', '.join(sorted(_KINDS))}") from None


def kind_for(modality: str | ModalityInfo) -> TokenizerKind:
    """The tokenizer kind of a modality, bound to it; ConfigError for a label-only modality."""
    info = modality if isinstance(modality, ModalityInfo) else get_modality(modality)
    if not info.tokenized:
        raise ConfigError(f"modality {info.name!r} has no tokenizer (it is label-only): nothing to tokenize")
    return get_kind(info.tokenizer)(info)

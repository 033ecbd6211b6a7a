"""Loading the entry points of omniforge's plugin families (modalities, labelers, tokenizer kinds), once each."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

_loaded: set[str] = set()  # entry-point groups already loaded in this process


def load_group(group: str, register: Callable[[Any], Any]) -> None:
    """Hand every object the entry points of `group` name to `register`, the first time a group is asked for.

    The group counts as loaded before its plugins are imported, so a plugin that imports omniforge (and so asks
    for the group again) does not recurse; `register` raises for a plugin that clashes with what is there."""
    if group in _loaded:
        return
    _loaded.add(group)
    for ep in importlib.metadata.entry_points(group=group):
        register(ep.load())

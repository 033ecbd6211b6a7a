"""Teachers: one module per labeler, registered by name; a modality may have several, one its default.

Public API: `register_labeler`, `create_labeler`, `list_labelers`, `get_labeler_class`,
`labeler_for_modality` (the default teacher of a modality, or the one named), `labelers_for_modality` (all
of them), `list_profiles` and `profile_teacher` (teacher profiles such as "4m21", declared by the teachers'
`Profile` entries), `Labeler`, `LabelerOptions` and `option` (a teacher's typed options), `Sample`.
"""

from omniforge.labelers._registry import (
    ENTRY_POINT_GROUP,
    create_labeler,
    get_labeler_class,
    labeler_for_modality,
    labelers_for_modality,
    list_labelers,
    list_profiles,
    profile_teacher,
    register_labeler,
)
from omniforge.labelers.base import (
    PRETRAINED,
    PROFILE_4M21,
    TINY,
    Labeler,
    LabelerOptions,
    OptionDoc,
    Profile,
    Sample,
    option,
)



def _import_builtin_teachers() -> None:
    """Every public module of this package is one or more teachers that register themselves on import (a new
    in-tree teacher is its module, nothing more). Heavy dependencies are imported lazily inside them."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not module.startswith("_") and module != "base":
            importlib.import_module(f"{__name__}.{module}")


_import_builtin_teachers()

__all__ = [
    "ENTRY_POINT_GROUP", "PRETRAINED", "PROFILE_4M21", "TINY", "Labeler", "LabelerOptions", "OptionDoc", "Profile",
    "Sample", "create_labeler", "get_labeler_class", "labeler_for_modality", "labelers_for_modality", "list_labelers",
    "list_profiles", "option", "profile_teacher", "register_labeler",
]

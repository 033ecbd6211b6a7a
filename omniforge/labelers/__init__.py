"""Teachers: one module per labeler, registered by name; a modality may have several, one its default.

Public API: `register_labeler`, `create_labeler`, `list_labelers`, `get_labeler_class`,
`labeler_for_modality` (the default teacher of a modality, or the one named), `labelers_for_modality` (all
of them), `Labeler`, `LabelerOptions` and `option` (a teacher's typed options), `Sample`.
"""

from omniforge.labelers._registry import (
    ENTRY_POINT_GROUP,
    create_labeler,
    get_labeler_class,
    labeler_for_modality,
    labelers_for_modality,
    list_labelers,
    register_labeler,
)
from omniforge.labelers.base import PRETRAINED, TINY, Labeler, LabelerOptions, OptionDoc, Sample, option

# Built-in labelers register themselves on import. Heavy dependencies are imported lazily inside them.
from omniforge.labelers import classical as _classical  # noqa: E402,F401
from omniforge.labelers import clip as _clip  # noqa: E402,F401
from omniforge.labelers import dinov2 as _dinov2  # noqa: E402,F401
from omniforge.labelers import sam as _sam  # noqa: E402,F401
from omniforge.labelers import depth_normal as _depth_normal  # noqa: E402,F401
from omniforge.labelers import detection as _detection  # noqa: E402,F401
from omniforge.labelers import semseg as _semseg  # noqa: E402,F401
from omniforge.labelers import imagebind as _imagebind  # noqa: E402,F401
from omniforge.labelers import metadata as _metadata  # noqa: E402,F401

__all__ = [
    "ENTRY_POINT_GROUP", "PRETRAINED", "TINY", "Labeler", "LabelerOptions", "OptionDoc", "Sample", "create_labeler",
    "get_labeler_class", "labeler_for_modality", "labelers_for_modality", "list_labelers", "option", "register_labeler",
]

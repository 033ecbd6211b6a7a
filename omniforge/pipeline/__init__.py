"""Ray orchestration: the plan, label, tokenize, verify and show jobs, and the trainer on a Ray cluster (storage
and shards live in omniforge.storage and omniforge.shards).

Public API: `plan`, `label`, `tokenize`, `verify`, `show` and their configs, and `train_on_ray`. Storage URIs are
local paths or s3://.

`train_on_ray` is imported on first use (PEP 562): it needs torch, which the label command's start path
(checking its flags takes well under a second) and the other jobs' drivers do not import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omniforge.pipeline.label import LabelConfig, LabelSummary, label
from omniforge.pipeline.plan import PlanConfig, plan
from omniforge.shards import load_manifest
from omniforge.pipeline.show import load_sample, show
from omniforge.pipeline.teachers import parse_options, parse_teachers, parse_weights
from omniforge.pipeline.tokenize_job import TokenizeConfig, TokenizeSummary, tokenize
from omniforge.pipeline.verify import VerifyReport, verify

if TYPE_CHECKING:
    from omniforge.pipeline.train_job import train_on_ray

__all__ = [
    "LabelConfig", "LabelSummary", "PlanConfig", "VerifyReport", "label", "load_manifest", "load_sample",
    "parse_options", "parse_teachers", "parse_weights", "plan", "show", "TokenizeConfig", "TokenizeSummary",
    "tokenize", "train_on_ray", "verify",
]


def __getattr__(name: str) -> Any:
    if name == "train_on_ray":
        from omniforge.pipeline.train_job import train_on_ray

        return train_on_ray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

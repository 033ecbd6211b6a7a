"""The labeler contract.

A labeler is a thin class: class attributes declare what it writes, the constructor loads weights once,
and `label` turns a batch of decoded samples into one result per sample. Resources (GPUs, batch size,
concurrency) are decided by the pipeline, never here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from omniforge.errors import SampleError, WeightsError

TINY = "tiny"
PRETRAINED = "pretrained"


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


class Labeler:
    """Base class of every teacher.

    Subclasses set:
      name        registry name of the teacher (e.g. "dinov2")
      modalities  the modality folders it writes (e.g. ("dinov2", "dinov2_global"))
      learned     True when it runs a neural network: the pipeline gives it an actor pool (and a GPU when
                  there is one); False for cheap CPU work that runs in plain tasks
      version     bump when the output for the same weights and options changes
      new_modalities  ModalityInfo entries for modalities omniforge does not know yet (plugins)
      requires    modalities this labeler derives from (e.g. sam_edge from sam_instance): the job runs it
                  after them, or reads them from the shards of an earlier job, and hands them over in
                  `Sample.inputs`; a sample whose required input failed is recorded as failed
                  ("missing_input") without calling the labeler
      optional_inputs  modalities used when they exist for a sample (e.g. metadata from det)
    and implement `label`.
    """

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]
    learned: ClassVar[bool] = False
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    new_modalities: ClassVar[tuple[Any, ...]] = ()

    def __init__(self, *, weights: str = TINY, device: str = "cpu", modalities: tuple[str, ...] | None = None,
                 **options: Any):
        if options:
            raise TypeError(f"{self.name}: unknown options {sorted(options)}")
        self.weights = weights
        self.device = device
        self.wanted = tuple(modalities or self.modalities)

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        """Label a batch. Return, per sample, {modality: value} for the modalities in `self.wanted`, or
        a SampleError when that one sample cannot be labeled. Raising fails the whole batch (the
        pipeline then retries the samples one by one to find the culprit)."""
        raise NotImplementedError

    @classmethod
    def identity(cls, *, weights: str = TINY, **options: Any) -> dict[str, Any]:
        """What determines this labeler's outputs: written into fingerprints and run records.

        Computed on the driver without loading the model. Local checkpoint files are identified by
        their sha256, so replacing a file invalidates what was labeled with it.
        """
        return {"labeler": cls.name, "version": cls.version, "weights": weights_identity(weights),
                "options": {k: options[k] for k in sorted(options)}}

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

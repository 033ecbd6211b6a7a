"""A learned test teacher whose process is killed on its first batch (imported by tests).

`log` names a file: every construction of the teacher appends its process id to it, and the first batch
after a construction kills its own process with SIGKILL when `die_once` is set and the file holds one line only
(the first construction). So the job sees one teacher actor die mid-batch, and Ray must rebuild it and retry
the batch for the job to finish.
"""

import os
import signal
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from omniforge.labelers import Labeler, register_labeler
from omniforge.labelers.base import LabelerOptions, option
from omniforge.modalities import ModalityInfo


@dataclass(frozen=True, kw_only=True)
class DiesOnceOptions(LabelerOptions):
    log: str = option("/nonexistent", "file the teacher appends its pid to at every construction")
    die_once: bool = option(True, "kill the first process on its first batch")


@register_labeler
class DiesOnce(Labeler):
    """dies_once: the mean colour of the image as npy float16 (3,); its first process is killed mid-batch."""

    name = "dies_once"
    modalities = ("dies_once",)
    learned = True
    options_class = DiesOnceOptions
    options: DiesOnceOptions
    new_modalities: ClassVar[tuple] = (ModalityInfo(
        name="dies_once", ext="npy", description="npy float16 (3,) mean colour",
        token_modality="dies_once", num_tokens=0, vocab_size=None, tokenizer="none", shape=(3,)),)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with open(self.options.log, "a") as f:
            f.write(f"{os.getpid()}\n")

    def label(self, samples):
        with open(self.options.log) as f:
            first_life = len(f.read().split()) == 1
        if self.options.die_once and first_life:
            os.kill(os.getpid(), signal.SIGKILL)
        return [{"dies_once": s.image.reshape(-1, 3).mean(0).astype(np.float16)} for s in samples]

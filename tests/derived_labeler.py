"""A test derived labeler: the number of colours in color_palette (imported by tests)."""

from typing import ClassVar

import numpy as np

from omniforge.labelers import Labeler, register_labeler
from omniforge.modalities import ModalityInfo


@register_labeler
class PaletteSize(Labeler):
    """palette_size: npy float16 (1,), the number of colours in the sample's 7-colour palette."""

    name = "palette_size"
    modalities = ("palette_size",)
    requires = ("color_palette",)
    new_modalities: ClassVar[tuple] = (ModalityInfo(
        name="palette_size", ext="npy", description="npy float16 (1,) palette size",
        token_modality="palette_size", num_tokens=0, vocab_size=None, tokenizer="none", shape=(1,)),)

    def label(self, samples):
        return [{"palette_size": np.array([len(s.inputs["color_palette"][0]["7"])], np.float16)} for s in samples]

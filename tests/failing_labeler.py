"""A test teacher that raises on any batch holding a sample captioned "poison" (imported by tests)."""

from typing import ClassVar

import numpy as np

from omniforge.labelers import Labeler, register_labeler
from omniforge.modalities import ModalityInfo


@register_labeler
class AlwaysFailsOnPoison(Labeler):
    """always_fails_on_poison: the mean colour of the image as npy float16 (3,); raises on "poison"."""

    name = "always_fails_on_poison"
    modalities = ("always_fails_on_poison",)
    learned = True
    new_modalities: ClassVar[tuple] = (ModalityInfo(
        name="always_fails_on_poison", ext="npy", description="npy float16 (3,) mean colour",
        token_modality="always_fails_on_poison", num_tokens=0, vocab_size=None, tokenizer="none", shape=(3,)),)

    def label(self, samples):
        if any(s.caption == "poison" for s in samples):
            raise ValueError("poison in this batch")
        return [{"always_fails_on_poison": s.image.reshape(-1, 3).mean(0).astype(np.float16)} for s in samples]

"""What the trainer needs to know about each token folder, derived from the modality registry.

A token folder is one of three kinds:

- ``"image"``: ``tok_<name>@224`` folders (VQ-VAE tokens on a square grid), masked as random subsets of
  positions with 2-D positions;
- ``"global"``: Memcodes folders (a short fixed-length code, 16 tokens), masked like images but with 1-D
  positions;
- ``"sequence"``: WordPiece folders (caption, det, metadata, ...), span-masked T5 style, sharing one
  text vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from omniforge.modalities import MODALITIES, ModalityInfo

Kind = Literal["image", "sequence", "global"]
KINDS: tuple[str, ...] = ("image", "sequence", "global")


@dataclass(frozen=True, kw_only=True)
class ModalitySpec:
    name: str  # token folder, e.g. "tok_rgb@224", "tok_caption"
    kind: Kind
    num_tokens: int  # image/global: tokens per crop; sequence: the modality's max_tokens
    vocab_size: int
    grid: int = 0  # sqrt(num_tokens) for images, 0 otherwise

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModalitySpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_tokens <= 0:
            raise ValueError(f"ModalitySpec {self.name!r}: num_tokens must be positive, got {self.num_tokens}")
        if self.vocab_size <= 0:
            raise ValueError(f"ModalitySpec {self.name!r}: vocab_size must be positive, got {self.vocab_size}")
        if self.kind == "image":
            if self.grid * self.grid != self.num_tokens:
                raise ValueError(
                    f"ModalitySpec {self.name!r}: an image needs grid * grid == num_tokens "
                    f"(got grid={self.grid}, num_tokens={self.num_tokens})")
        elif self.grid != 0:
            raise ValueError(f"ModalitySpec {self.name!r}: grid must be 0 for a {self.kind} modality")

    @property
    def seq_len(self) -> int:
        """Length L of this folder's rows in the batch: num_tokens, or 2 * (num_tokens + 1) for sequences
        (the span-masked input, then the sentinel-delimited target)."""
        return 2 * (self.num_tokens + 1) if self.kind == "sequence" else self.num_tokens


def _by_folder() -> dict[str, ModalityInfo]:
    return {m.token_modality: m for m in MODALITIES.values()}


def spec_for_info(info: ModalityInfo, text_vocab_size: int) -> ModalitySpec:
    """The spec of one registered modality's token folder."""
    if info.tokenizer == "wordpiece":
        return ModalitySpec(name=info.token_modality, kind="sequence", num_tokens=info.num_tokens,
                            vocab_size=text_vocab_size)
    if info.vocab_size is None:
        raise ValueError(f"modality {info.name!r} ({info.tokenizer}) has no vocab_size in the registry")
    if info.tokenizer == "memcodes":
        return ModalitySpec(name=info.token_modality, kind="global", num_tokens=info.num_tokens,
                            vocab_size=info.vocab_size)
    if info.tokenizer == "vqvae":
        if not info.token_modality.endswith("@224"):
            raise ValueError(f"image token folder {info.token_modality!r} should end with '@224'")
        grid = math.isqrt(info.num_tokens)
        return ModalitySpec(name=info.token_modality, kind="image", num_tokens=info.num_tokens,
                            vocab_size=info.vocab_size, grid=grid)
    raise ValueError(f"modality {info.name!r}: unknown tokenizer kind {info.tokenizer!r}")


def specs_for(folders: list[str], text_vocab_size: int) -> dict[str, ModalitySpec]:
    """Specs of the given token folders (e.g. ``["tok_rgb@224", "tok_caption"]``), in the given order."""
    if text_vocab_size <= 0:
        raise ValueError(f"text_vocab_size must be positive, got {text_vocab_size}")
    known = _by_folder()
    out: dict[str, ModalitySpec] = {}
    for folder in folders:
        info = known.get(folder)
        if info is None:
            raise KeyError(f"unknown token folder {folder!r}; known token folders: {', '.join(known)}")
        out[folder] = spec_for_info(info, text_vocab_size)
    return out

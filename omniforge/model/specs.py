"""What the trainer needs to know about each modality folder, derived from the modality registry.

A folder is one of five kinds:

- ``"image"``: ``tok_<name>@224`` folders (VQ-VAE tokens on a square grid), masked as random subsets of
  positions with 2-D positions; ``tok_<name>@448`` (4M-21's 224-448 modalities) are the same on a 28 x 28
  grid (784 tokens, the sin-cos positions of that grid);
- ``"global"``: Memcodes folders (a short fixed-length code, 16 tokens), masked like images but with 1-D
  positions;
- ``"sequence"``: WordPiece folders (caption, det, metadata, ...), span-masked T5 style, sharing one
  text vocabulary. Either a token folder (``tok_det``: the serialization the tokenize job froze) or, as
  ml-4m reads them, the raw label folder itself (``det``, ``metadata``, ``color_palette``, ``caption``):
  the loader serializes the label per training sample, with that sample's crop and draws (palette k,
  metadata order), so every epoch sees new draws;
- ``"pixels"``: raw-pixel input (``rgb@224``, ml-4m's name): the rgb label cropped with the sample's
  ``crop_settings`` to 224 x 224 and cut into 16 x 16 patches, uint8 (196, 768) with each patch flattened
  as (row, column, channel); ``rgb@448`` is the same crop at 448 x 448, (784, 768). Input-only: the encoder
  embeds patches linearly, nothing predicts them;
- ``"embedding"``: a registry modality with crop "embedding" (``t5_caption``, ml-4m's ``seq_emb``), read from
  its own label folder: up to ``num_tokens`` vectors of ``width`` values (the npz's ``emb[mask_valid]``).
  Input-only: the encoder projects each vector linearly (ml-4m's ``SequenceEmbEncoderEmbedding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from omniforge.modalities import (KEEPS, ROLES, ModalityInfo, all_modalities, by_embedding_folder, by_pixel_folder,
                                  by_token_folder, token_folders)

Kind = Literal["image", "sequence", "global", "pixels", "embedding"]
KINDS: tuple[str, ...] = ("image", "sequence", "global", "pixels", "embedding")
RAW_KINDS = ("pixels", "embedding")  # input-only kinds read from label folders (raw sequences are targets too)
PIXEL_SIZE = 224  # side of the square crop a pixel folder holds at the registry's size (rgb@448: 448)
PIXEL_PATCH = 16  # side of one patch: 14 x 14 = 196 patches, like the image tokenizers' 196 tokens
# ImageNet statistics, as ml-4m normalises rgb before the patch embedding.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class ModalitySpec:
    name: str  # token folder, e.g. "tok_rgb@224", "tok_caption"; a raw input's folder ("rgb@224", "t5_caption")
    kind: Kind
    num_tokens: int  # image/global: tokens per crop; sequence: the modality's max_tokens; embedding: max vectors
    vocab_size: int  # 0 for pixels and embeddings (nothing to predict)
    grid: int = 0  # sqrt(num_tokens) for images and pixels, 0 otherwise
    patch: int = 0  # pixels: side of one patch; 0 otherwise
    width: int = 0  # embedding: values per vector (4096 for T5-XXL); 0 otherwise
    source: str = ""  # pixels, embeddings, raw sequences: the label folder read ("rgb", "t5_caption", "det")
    chunks: tuple[int, int] | None = None  # sequences: span masking never cuts these chunks (ModalityInfo.chunks)
    shuffle_chunks: bool = False  # sequences: chunks shuffled per sample before masking
    keep: str = "random"  # sequences: the default span-masking keep scheme
    role: str | None = None  # "both" (default) | "input" (never a target) | "target" (never an input); pixels: "input"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModalitySpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_tokens <= 0:
            raise ValueError(f"ModalitySpec {self.name!r}: num_tokens must be positive, got {self.num_tokens}")
        if self.kind == "pixels":
            if self.vocab_size != 0 or self.patch <= 0 or not self.source:
                raise ValueError(f"ModalitySpec {self.name!r}: pixels need vocab_size 0, a positive patch and "
                                 f"a source folder (got vocab_size={self.vocab_size}, patch={self.patch}, "
                                 f"source={self.source!r})")
        elif self.kind == "embedding":
            if self.vocab_size != 0 or self.width <= 0 or not self.source or self.patch:
                raise ValueError(f"ModalitySpec {self.name!r}: an embedding needs vocab_size 0, a positive width "
                                 f"and a source folder, and no patch (got vocab_size={self.vocab_size}, "
                                 f"width={self.width}, source={self.source!r}, patch={self.patch})")
        elif self.vocab_size <= 0:
            raise ValueError(f"ModalitySpec {self.name!r}: vocab_size must be positive, got {self.vocab_size}")
        elif self.patch or (self.source and self.kind != "sequence"):
            raise ValueError(f"ModalitySpec {self.name!r}: patch is for pixel folders, source for pixel, embedding "
                             "and raw sequence folders")
        if self.width and self.kind != "embedding":
            raise ValueError(f"ModalitySpec {self.name!r}: width is for embedding folders only")
        if self.kind in ("image", "pixels"):
            if self.grid * self.grid != self.num_tokens:
                raise ValueError(
                    f"ModalitySpec {self.name!r}: an image needs grid * grid == num_tokens "
                    f"(got grid={self.grid}, num_tokens={self.num_tokens})")
        elif self.grid != 0:
            raise ValueError(f"ModalitySpec {self.name!r}: grid must be 0 for a {self.kind} modality")
        if self.chunks is not None:
            object.__setattr__(self, "chunks", tuple(self.chunks))  # JSON gives a list
            if self.kind != "sequence" or len(self.chunks) != 2 or min(self.chunks) < 1:
                raise ValueError(f"ModalitySpec {self.name!r}: chunks are two positive sizes, for sequences only")
        if self.keep not in KEEPS:
            raise ValueError(f"ModalitySpec {self.name!r}: keep must be one of {KEEPS}, got {self.keep!r}")
        raw = self.kind in RAW_KINDS
        if self.role is None:
            object.__setattr__(self, "role", "input" if raw else "both")
        if self.role not in ROLES or (raw and self.role != "input"):
            raise ValueError(f"ModalitySpec {self.name!r}: role must be one of {ROLES} ('input' for pixels and "
                             f"embeddings), got {self.role!r}")

    @property
    def seq_len(self) -> int:
        """Length L of this folder's rows in the batch: num_tokens, or 2 * (num_tokens + 1) for sequences
        (the span-masked input, then the sentinel-delimited target)."""
        return 2 * (self.num_tokens + 1) if self.kind == "sequence" else self.num_tokens

    @property
    def patch_dim(self) -> int:
        """Values in one flattened pixel patch (3 * patch * patch); 0 for token folders."""
        return 3 * self.patch * self.patch

    @property
    def raw(self) -> bool:
        """Read from a label folder, not a token shard: pixels, embeddings, raw sequences."""
        return bool(self.source)

    @property
    def input_only(self) -> bool:
        return self.kind in RAW_KINDS or self.role == "input"

    @property
    def target_only(self) -> bool:
        return self.role == "target"


def pixel_spec(info: ModalityInfo) -> ModalitySpec:
    """The raw-pixel input spec of a registered modality with a ``pixel_modality``, at the entry's token size
    (rgb -> rgb@224, 14 x 14 patches; rgb.at(448) -> rgb@448, 28 x 28)."""
    if info.pixel_modality is None:
        raise ValueError(f"modality {info.name!r} has no raw-pixel input folder")
    grid = (info.token_size or PIXEL_SIZE) // PIXEL_PATCH
    return ModalitySpec(name=info.pixel_modality, kind="pixels", num_tokens=grid * grid, vocab_size=0, grid=grid,
                        patch=PIXEL_PATCH, source=info.name, role="input")


def embedding_spec(info: ModalityInfo) -> ModalitySpec:
    """The input spec of a registered embedding modality (t5_caption): its registry (max vectors, width)."""
    if not info.embedded:
        raise ValueError(f"modality {info.name!r} is not an embedding (crop {info.crop!r})")
    length, width = info.shape
    return ModalitySpec(name=info.name, kind="embedding", num_tokens=length, vocab_size=0, width=width,
                        source=info.name, keep=info.keep, role="input")


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H/p * W/p, p * p * 3) uint8 patches in row-major order, each flattened (row, col,
    channel)."""
    h, w, c = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape((h // patch) * (w // patch), patch * patch * c))


def unpatchify(patches: np.ndarray, patch: int) -> np.ndarray:
    """Inverse of :func:`patchify` for a square grid: (N, p * p * 3) -> (H, W, 3)."""
    grid = math.isqrt(patches.shape[0])
    x = patches.reshape(grid, grid, patch, patch, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape(grid * patch, grid * patch, 3))


def spec_for_info(info: ModalityInfo, text_vocab_size: int) -> ModalitySpec:
    """The spec of one registered modality's token folder, from its registry entry's crop: image-like crops
    give a square grid, global vectors a short code, sequences the shared text vocabulary; an embedding's folder
    is its label folder (:func:`embedding_spec`)."""
    if info.embedded:
        return embedding_spec(info)
    if info.crop == "sequence":
        return ModalitySpec(name=info.token_modality, kind="sequence", num_tokens=info.num_tokens,
                            vocab_size=text_vocab_size, chunks=info.chunks, shuffle_chunks=info.shuffle_chunks,
                            keep=info.keep, role=info.role)
    if not info.tokenized:
        raise ValueError(f"modality {info.name!r} is label-only: it has no token folder to train on")
    if info.crop == "global":
        return ModalitySpec(name=info.token_modality, kind="global", num_tokens=info.num_tokens,
                            vocab_size=info.vocab_size, role=info.role)
    grid = math.isqrt(info.num_tokens)
    if grid * grid != info.num_tokens:
        raise ValueError(f"modality {info.name!r}: image-like tokens need a square count, got {info.num_tokens}")
    return ModalitySpec(name=info.token_modality, kind="image", num_tokens=info.num_tokens, vocab_size=info.vocab_size,
                        grid=grid, role=info.role)


def raw_sequence_spec(info: ModalityInfo, text_vocab_size: int) -> ModalitySpec:
    """The spec of a sequence modality read from its raw label folder (``det``) and serialized per sample.
    The serializer draws the chunk order itself (metadata), so the masker does not shuffle again."""
    if raw_sequence_info(info.name) is None:
        raise ValueError(f"modality {info.name!r} cannot be read raw: it is no sequence modality; train on "
                         f"{info.token_modality or 'its token folder'}")
    return ModalitySpec(name=info.name, kind="sequence", num_tokens=info.num_tokens, vocab_size=text_vocab_size,
                        source=info.name, chunks=info.chunks, shuffle_chunks=False, keep=info.keep, role=info.role)


def raw_sequence_info(folder: str) -> ModalityInfo | None:
    """The modality whose raw label folder `folder` is, when the loader can serialize it per sample: every
    sequence modality (its tokenizer kind's `units`: the registry's serializer, or SAM's instances tokenized
    by the SAM-mask tokenizer)."""
    info = next((m for m in all_modalities() if m.name == folder), None)
    return info if info is not None and info.crop == "sequence" else None


def specs_for(folders: list[str], text_vocab_size: int) -> dict[str, ModalitySpec]:
    """Specs of the given folders (e.g. ``["tok_rgb@224", "tok_caption", "det"]``), in the given order."""
    if text_vocab_size <= 0:
        raise ValueError(f"text_vocab_size must be positive, got {text_vocab_size}")
    out: dict[str, ModalitySpec] = {}
    for folder in folders:
        pixels = by_pixel_folder(folder)
        if pixels is not None:
            out[folder] = pixel_spec(pixels)
            continue
        embedding = by_embedding_folder(folder)
        if embedding is not None:
            out[folder] = embedding_spec(embedding)
            continue
        raw_info = raw_sequence_info(folder)
        if raw_info is not None:
            out[folder] = raw_sequence_spec(raw_info, text_vocab_size)
            continue
        info = by_token_folder(folder)
        if info is None:
            known = ", ".join(m.token_modality for m in token_folders())
            raw = ", ".join(m.pixel_modality for m in token_folders() if m.pixel_modality)
            seqs = ", ".join(m.name for m in all_modalities() if raw_sequence_info(m.name))
            emb = ", ".join(m.name for m in all_modalities() if m.embedded)
            raise KeyError(f"unknown folder {folder!r}; known token folders: {known}; raw-pixel input folders: {raw}; "
                           f"raw sequence folders: {seqs}; embedding input folders: {emb}")
        out[folder] = spec_for_info(info, text_vocab_size)
    return out


def pixel_source(folder: str) -> str | None:
    """The label folder a raw-pixel folder is read from (rgb@224 -> rgb); None for any other folder."""
    info = by_pixel_folder(folder)
    return info.name if info is not None else None


def label_source(folder: str) -> str | None:
    """The label folder a raw folder is read from: a pixel folder's (rgb@224 -> rgb), an embedding's or a raw
    sequence's own (t5_caption -> t5_caption, det -> det); None for token folders."""
    source = pixel_source(folder)
    if source is not None:
        return source
    info = by_embedding_folder(folder) or raw_sequence_info(folder)
    return info.name if info is not None else None


def resolve_folder(name: str, available: list[str] | dict[str, ModalitySpec], *, target: bool = False) -> str:
    """A folder name or a modality name ("rgb", "depth", "caption") -> the folder among ``available``: as an
    input, a modality's raw-pixel folder when available (rgb -> rgb@224), else its token folder (depth ->
    tok_depth@224); as a ``target``, always the token folder (pixels are never generated)."""
    if name in available:
        return name
    info = next((m for m in all_modalities() if m.name == name), None)
    if info is not None:
        for folder in ((info.token_modality,) if target else (info.pixel_modality, info.token_modality)):
            if folder in available:
                return folder
    return name

"""The modality registry: the single source of truth for every part of omniforge.

A `ModalityInfo` says everything the other parts need to know about one modality, so that a modality added
by a plugin flows from its teacher to a trained model with no edit to omniforge:

- storage: the folder its label shards live in (`name`), the extension of its one member per key (`ext`),
  a fixed array `shape` when there is one, and the raw format (`description`);
- tokens: the tokenizer kind (`tokenizer`, a name in `omniforge.tokenize.kinds`), the token folder the
  tokenize job writes (`token_modality`), tokens per crop (`num_tokens`) and the codebook (`vocab_size`);
  image-like modalities list the crop sides they are tokenized at (`token_sizes`, default (224,); 4M-21's
  rgb, depth, normal, semseg and clip add 448): `info.at(448)` is the entry of tok_<name>@448 (784 tokens), and
  `by_token_folder` / `by_pixel_folder` give such an entry for every size's folder;
- how a label is cropped before its tokenizer (`crop`): "dense" maps are cropped with `resample`;
  "features" maps are stored for crop 0 and the teacher re-runs on the other crops, as "global" vectors;
  "sequence" labels go through `serializer` with the crop; "embedding" labels (npz sequences of continuous
  vectors, such as T5 caption embeddings) have no tokenizer: the trainer reads the label folder itself and
  embeds the vectors linearly, as an input only (`shape` is (max vectors, width)); "none" is label-only;
- the tokenizer input: `channels`, `dtype`, the `value_range` mapped to [-1, 1], `num_classes` of class maps;
- masking in the trainer: `chunks` never split by span masking, `shuffle_chunks`, the default `keep` scheme,
  and the `role` the trainer may give it (input, target or both; "input" for embeddings); `pixel_modality`
  names a raw-pixel input;
- drawing: the `draw` style `omniforge show` uses;
- checking: the `schema` every decoded label must satisfy (`omniforge verify` runs it; array labels are also
  checked against shape, channels and dtype), and the `format_version` of the raw format, bumped when the
  stored format changes so that labels written in an older one are refused, never misread;
- ml-4m: how ml-4m's own loader reads the folder (`ml4m`: directly, through `omniforge export --dialect
  ml4m`, or not at all) and what differs (`ml4m_note`); Apple's released tokenizer for the modality
  (`ml4m_tokenizer`, a hub repository) and the preprocessing ml-4m applies before it (`ml4m_transform`).

Fields a plugin does not set get defaults derived from `ext`, `shape` and `tokenizer` (see `ModalityInfo`).
Folder names are the 4M-21 modality names, so ml-4m's own webdataset loader reads omniforge output unchanged.

Modalities come from this module's built-in table, from `register_modality` (a labeler's
`new_modalities` goes through it), and from the `omniforge.modalities` entry-point group: a plugin points
an entry at a `ModalityInfo` (or a sequence of them) so that every process (tokenize workers, torchrun
ranks) knows its modalities without importing its teachers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

from omniforge._plugins import load_group
from omniforge.errors import ConfigError

ENTRY_POINT_GROUP = "omniforge.modalities"

IMAGE_MODALITY = "rgb"  # the decoded image: every label aligns with its pixels; crops are drawn in its frame
IMAGE_SIZE = 224  # side of the crop image-like tokenizers are trained at (tok_<name>@224)
IMAGE_PATCH = 16  # their patch side: (224 / 16)^2 = 196 tokens; at 448, (448 / 16)^2 = 784
SUPER_RESOLUTION = (IMAGE_SIZE, 448)  # the token_sizes of 4M-21's 224-448 modalities (tok_<name>@448)
GLOBAL_TOKENS = 16  # Memcodes tokens of a global vector

EXTS = ("jpg", "png", "npy", "npz", "json", "txt")
CROPS = ("dense", "features", "global", "sequence", "embedding", "none")
RESAMPLES = ("bicubic", "bilinear", "nearest", "normal")
DTYPES = ("uint8", "uint16", "float")
KEEPS = ("random", "all", "binary")
ROLES = ("both", "input", "target")
ML4M = ("direct", "export", "none")
# ml-4m's preprocessing before its tokenizers (omniforge.tokenize.ml4m.TRANSFORMS says what each one does)
ML4M_TRANSFORMS = ("rgb", "normal", "depth", "semseg", "features", "global", "mask", "pose")
_ML4M_TRANSFORM_CROPS = {"rgb": "dense", "normal": "dense", "depth": "dense", "semseg": "dense",
                         "features": "features", "global": "global", "mask": "sequence", "pose": "sequence"}
DRAWS = ("rgb", "gray", "heat", "semseg", "features", "vector", "embedding", "text", "boxes", "keypoints", "smpl",
         "palette", "json")
NO_TOKENIZER = "none"
TEXT_SERIALIZER = "omniforge.tokenize.text:text_units"  # a txt label is one unit of text
# What `omniforge label` labels when --modalities is not given: the cheap teachers and the common features.
DEFAULT_LABEL_MODALITIES = ("rgb", "caption", "canny_edge", "color_palette", "clip", "dinov2", "dinov2_global")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_FOLDER_RE = re.compile(r"^[A-Za-z0-9_@.-]+$")
_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True, kw_only=True)
class ModalityInfo:
    """One modality. Required: name, ext, description; the rest defaults from ext, shape and tokenizer.

    name: folder name under the corpus root and the modality name on the CLI ([a-z][a-z0-9_]*).
    ext: extension of the one member per key in the label shard ("<key>.<ext>"): jpg, png, npy, npz, json,
        txt. An npz is an embedding label as ml-4m's CaptionEmbTransform reads it: "emb" float16 (n, L, D)
        and "mask_valid" bool (n, L), True where a vector is real (`omniforge.codecs.embedding_problem`).
    description: the raw format as stored, shown by `omniforge list`.
    tokenizer: the tokenizer kind ("vqvae", "segmentation", "features", "memcodes", "sam_mask", "smpl_pose",
        "wordpiece", a plugin's kind), or "none" for a label-only modality.
    token_modality: folder of the token shards; default tok_<name>@224 for image-like crops ("dense",
        "features"), tok_<name> otherwise, None for label-only modalities.
    num_tokens: tokens per crop (the maximum, [EOS] included, for sequences); default 196 for dense maps,
        h * w for (h, w, C) feature maps, 16 for global vectors; sequences must say. Of `token_modality`,
        the folder at `token_size`.
    token_sizes: image-like modalities: the crop sides (pixels) the tokenize job can write token folders
        at, IMAGE_SIZE (224) first; default (224,). Each size S has its folder (`token_folder(S)`: the
        token_modality's "@224" suffix replaced by "@S", e.g. tok_rgb@448) and its token count
        (`tokens_at(S)`: num_tokens * (S / 224)^2, 784 at 448); the tokenizer trained at 224 encodes every
        size (its position table follows the input grid, as 4M-21's 224-448 tokenizers). A feature map above 224
        is not the stored label (crop 0 at 224): the tokenize job re-runs its teacher at S on every crop (the
        teacher's `label_at(samples, S)`), an (h * S / 224, w * S / 224, C) map. Empty for the rest.
    token_size: the crop side of this entry's `token_modality`: 224 in the registry; `at(S)` gives the
        entry of size S. None for modalities without image-like tokens.
    vocab_size: codebook size of the tokenizer; None for sequences (the shared WordPiece vocabulary).
    shape: fixed array shape of .npy labels, None when it varies (dense maps have the image's H x W); for an
        npz embedding, (L, D): at most L vectors of width D per sequence (its "emb" is (n, L, D)).
    pixel_modality: a raw-pixel input folder the trainer reads from this label ("rgb@224"), or None; at
        another token size its "@224" suffix names that size (rgb@448, 448 x 448 pixels).
    crop: how the tokenize job crops a label, see the module docstring. Default: "sequence" for the
        wordpiece tokenizer and json/txt labels, "global" for memcodes and 1-D shapes, "features" for npy
        labels with a fixed (h, w, C) shape, "dense" for other images and npy maps, "embedding" for npz
        labels, "none" without a tokenizer. An "embedding" has no tokenizer and no token folder; the trainer
        reads the label folder (named like the modality, as in ml-4m) as an input-only sequence of vectors.
    resample: interpolation of a dense crop: "bicubic", "bilinear" (default), "nearest" (class maps: every
        output value is an input value), "normal" (bilinear; a flip mirrors the x component).
    channels: channels of the tokenizer input: 3 for jpg, 1 for png and npy maps, C of a (h, w, C) shape,
        D of a (D,) shape.
    dtype: label dtype the tokenizer reads: "uint8" (jpg, png), "uint16", "float" (npy; float16 or float32).
    value_range: (low, high) of dense values, mapped to [-1, 1] for the tokenizer; default the dtype's full
        range ((0, 255), (0, 65535)) or (0.0, 1.0) for float maps.
    num_classes: class maps (tokenizer "segmentation"): classes 0..num_classes-1; 255 means none.
    serializer: sequences: "module:function" (or the function) turning (label, crop) into text units,
        `omniforge.tokenize.text.Crop` documents the call; default for txt labels: the text itself.
    chunks: masking of a sequence: (tokens of the first chunk, tokens of every later chunk); span masking
        never cuts a chunk. None: every token is its own unit.
    shuffle_chunks: shuffle the chunks per sample before masking (4M-21 does it for metadata).
    keep: default keep scheme of span masking: "random", "all" or "binary" (whole or fully masked).
    role: what the trainer may use the token folder as: "both" (default), "input" (never a target), "target"; an
        embedding is "input" (its default and only role: nothing predicts continuous vectors).
    draw: how `omniforge show` draws the label; default from ext and shape.
    schema: "module:function" (or the function) raising SampleError("bad_label", ...) unless a decoded label
        is well formed (see `omniforge.schemas`); None: only the array checks of `omniforge.schemas.check_array`.
    format_version: version of the raw label format (1 unless it changed); the label job records it, and
        readers refuse shards written under an older one with the command that rewrites them.
    ml4m: how ml-4m's own loader gets this folder: "direct" (it reads omniforge's files as they are),
        "export" (`omniforge export --dialect ml4m` writes ml-4m's form, e.g. a pickle omniforge never writes)
        or "none" (omniforge's label is not ml-4m's modality); `ml4m_note` says what differs, in words.
    ml4m_tokenizer: the hub repository of Apple's released tokenizer for this modality ("EPFL-VILAB/4M_tokenizers_
        depth_8k_224-448"), or None; `omniforge tokenizer import-4m` lays a snapshot of it out in this modality's
        tokenizer folder. Several modalities may share one (the edge tokenizer serves canny_edge and sam_edge).
    ml4m_transform: the preprocessing ml-4m applies to this modality's label before an ml-4m tokenizer, used
        whenever the modality's --tokenizers folder holds one (whatever omniforge's own tokenizers do): "rgb"
        (x / 255 to [-1, 1]), "normal" (the same), "depth" (/ 65535, then standardised per image without its
        lowest and highest 10%), "semseg" (ids + 1, 255 "none" becomes 0), "features" / "global" (as stored),
        "mask" (SAM instance masks in {0, 1}), "pose" (a person's SMPL body pose flattened to 207, as stored); None:
        no ml-4m tokenizer can be used. Required with ml4m_tokenizer.
    """

    name: str
    ext: str
    description: str
    tokenizer: str = NO_TOKENIZER
    token_modality: str | None = None
    num_tokens: int | None = None
    token_sizes: tuple[int, ...] | None = None
    token_size: int | None = None
    vocab_size: int | None = None
    shape: tuple[int, ...] | None = None
    pixel_modality: str | None = None
    crop: str | None = None
    resample: str | None = None
    channels: int | None = None
    dtype: str | None = None
    value_range: tuple[float, float] | None = None
    num_classes: int | None = None
    serializer: str | Callable[..., list[str]] | None = None
    chunks: tuple[int, int] | None = None
    shuffle_chunks: bool = False
    keep: str = "random"
    role: str | None = None
    draw: str | None = None
    schema: str | Callable[[Any], None] | None = None
    format_version: int = 1
    ml4m: str = "direct"
    ml4m_note: str = ""
    ml4m_tokenizer: str | None = None
    ml4m_transform: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ModalityInfo {self.name!r}: {name}={getattr(self, name)!r} {why}")

        def default(name: str, value: Any) -> None:
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"ModalityInfo name={self.name!r}: use lower-case letters, digits and _ "
                              "(it names a folder and a CLI value)")
        if self.ext not in EXTS:
            raise bad("ext", f"is not one of {', '.join(EXTS)}")
        if not isinstance(self.description, str) or not self.description.strip():
            raise bad("description", "must say what the stored label is (dtype, shape, range, units)")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise bad("tokenizer", f"must name a tokenizer kind, or {NO_TOKENIZER!r} for a label-only modality")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            if self.ext not in ("npy", "npz") or not self.shape or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in self.shape):
                raise bad("shape", "is for npy and npz labels: a tuple of positive sizes")
        default("crop", self._default_crop())
        if self.crop not in CROPS:
            raise bad("crop", f"is not one of {', '.join(CROPS)}")
        tokenized = self.tokenized
        if not tokenized:  # no token folder (a value given by an older plugin is dropped)
            object.__setattr__(self, "token_modality", None)
            object.__setattr__(self, "num_tokens", None)
        if tokenized and self.tokenizer == NO_TOKENIZER:
            raise bad("crop", f"needs a tokenizer kind (tokenizer={NO_TOKENIZER!r} is label-only)")
        if not tokenized and self.tokenizer != NO_TOKENIZER:
            raise bad("tokenizer", f"needs a crop other than {self.crop!r}")
        default("role", "input" if self.crop == "embedding" else "both")
        self._check_embedding(bad)
        self._check_spatial(bad, default)
        if tokenized:
            image = self.crop in ("dense", "features")
            default("token_modality", f"tok_{self.name}@{IMAGE_SIZE}" if image else f"tok_{self.name}")
            if not isinstance(self.token_modality, str) or not _FOLDER_RE.match(self.token_modality) \
                    or self.token_modality == self.name:
                raise bad("token_modality", "must be a folder name other than the label folder, e.g. "
                                            f"tok_{self.name}")
            if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
                raise bad("num_tokens", "must be a positive integer (tokens per crop; the maximum for sequences)")
            if self.crop == "sequence":
                if self.vocab_size is not None and self.tokenizer == "wordpiece":
                    raise bad("vocab_size", "must be None: sequences use the shared WordPiece vocabulary")
            elif not isinstance(self.vocab_size, int) or self.vocab_size < 2:
                raise bad("vocab_size", "must be the tokenizer's codebook size (an integer >= 2)")
        self._check_sizes(bad)
        if self.ext == "txt":
            default("serializer", TEXT_SERIALIZER)
        if self.serializer is not None:
            if self.crop != "sequence":
                raise bad("serializer", "is for sequence modalities (crop='sequence')")
            if isinstance(self.serializer, str) and not _REF_RE.match(self.serializer):
                raise bad("serializer", "must be a function or 'package.module:function'")
            if not isinstance(self.serializer, str) and not callable(self.serializer):
                raise bad("serializer", "must be a function or 'package.module:function'")
        if self.chunks is not None:
            object.__setattr__(self, "chunks", tuple(self.chunks))
            if self.crop != "sequence" or len(self.chunks) != 2 or not all(
                    isinstance(c, int) and c > 0 for c in self.chunks):
                raise bad("chunks", "is (first chunk, later chunks) token counts of a sequence, both positive")
        if not isinstance(self.shuffle_chunks, bool) or (self.shuffle_chunks and self.chunks is None):
            raise bad("shuffle_chunks", "must be a bool, and True only with chunks")
        if self.keep not in KEEPS:
            raise bad("keep", f"is not one of {', '.join(KEEPS)}")
        if self.role not in ROLES:
            raise bad("role", f"is not one of {', '.join(ROLES)}")
        if self.pixel_modality is not None and (self.ext != "jpg" or not _FOLDER_RE.match(self.pixel_modality)):
            raise bad("pixel_modality", "is a raw-pixel input folder (e.g. rgb@224) of a jpg modality")
        default("draw", self._default_draw())
        if self.draw not in DRAWS:
            raise bad("draw", f"is not one of {', '.join(DRAWS)}")
        if self.schema is not None and not callable(self.schema) and not (
                isinstance(self.schema, str) and _REF_RE.match(self.schema)):
            raise bad("schema", "must be a function or 'package.module:function'")
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool) \
                or self.format_version < 1:
            raise bad("format_version", "must be a positive integer")
        if self.ml4m not in ML4M:
            raise bad("ml4m", f"is not one of {', '.join(ML4M)}")
        if self.ml4m == "none" and not self.ml4m_note:
            raise bad("ml4m_note", "must say why ml-4m cannot read the folder")
        self._check_ml4m_tokenizer(bad)

    def _check_ml4m_tokenizer(self, bad: Callable[[str, str], ConfigError]) -> None:
        t = self.ml4m_transform
        if t is not None:
            if t not in ML4M_TRANSFORMS:
                raise bad("ml4m_transform", f"is not one of {', '.join(ML4M_TRANSFORMS)}")
            if _ML4M_TRANSFORM_CROPS[t] != self.crop or (t == "semseg") != (self.tokenizer == "segmentation") or (
                    t == "mask") != (self.tokenizer == "sam_mask") or (t == "pose") != (self.tokenizer == "smpl_pose"):
                raise bad("ml4m_transform", f"does not fit crop={self.crop!r} with tokenizer={self.tokenizer!r} "
                                            f"('{t}' is for {_ML4M_TRANSFORM_CROPS[t]} crops"
                                            f"{' of a segmentation' if t == 'semseg' else ''}"
                                            f"{' of the sam_mask tokenizer' if t == 'mask' else ''}"
                                            f"{' of the smpl_pose tokenizer' if t == 'pose' else ''})")
        if self.ml4m_tokenizer is not None:
            if not isinstance(self.ml4m_tokenizer, str) or not _HUB_RE.match(self.ml4m_tokenizer):
                raise bad("ml4m_tokenizer", "must be a hub repository id, owner/name")
            if t is None:
                raise bad("ml4m_tokenizer", "needs ml4m_transform: the preprocessing ml-4m applies before it")

    # -- defaults

    def _default_crop(self) -> str:
        if self.ext == "npz" and self.tokenizer == NO_TOKENIZER:
            return "embedding"
        if self.tokenizer == NO_TOKENIZER:
            return "none"
        if self.tokenizer == "wordpiece" or self.ext in ("json", "txt"):
            return "sequence"
        if self.tokenizer == "memcodes" or (self.shape is not None and len(self.shape) == 1):
            return "global"
        if self.ext == "npy" and self.shape is not None and len(self.shape) == 3:
            return "features"
        return "dense"

    def _default_draw(self) -> str:
        if self.ext == "npz":
            return "embedding"
        if self.ext == "txt":
            return "text"
        if self.ext == "json":
            return "json"
        if self.tokenizer == "segmentation":
            return "semseg"
        if self.crop == "features" or (self.shape is not None and len(self.shape) == 3):
            return "features"
        if self.crop == "global" or (self.shape is not None and len(self.shape) == 1):
            return "vector"
        if self.ext == "npy" and self.channels == 1 and self.dtype == "float":
            return "heat"
        return "rgb" if self.channels == 3 else "gray"

    def _check_sizes(self, bad: Callable[[str, str], ConfigError]) -> None:
        """token_sizes and token_size: image-like modalities only; every size gives a whole square grid and
        names its folders by the "@<size>" suffix."""
        if not self.image_like:
            for name in ("token_sizes", "token_size"):
                if getattr(self, name):
                    raise bad(name, "is for image-like modalities (crop 'dense' or 'features')")
            object.__setattr__(self, "token_sizes", ())
            object.__setattr__(self, "token_size", None)
            return
        sizes = (IMAGE_SIZE,) if self.token_sizes is None else self.token_sizes
        if isinstance(sizes, (str, bytes)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise bad("token_sizes", f"must be a tuple of crop sides in pixels, e.g. {SUPER_RESOLUTION}")
        sizes = tuple(sizes)
        object.__setattr__(self, "token_sizes", sizes)
        if not sizes or sizes[0] != IMAGE_SIZE or len(set(sizes)) != len(sizes):
            raise bad("token_sizes", f"must start with {IMAGE_SIZE} (the size tokenizers are trained at) and list "
                                     "each size once")
        if self.token_size is None:
            object.__setattr__(self, "token_size", IMAGE_SIZE)
        if self.token_size not in sizes:
            raise bad("token_size", f"must be one of token_sizes {sizes}")
        grid = math.isqrt(self.num_tokens)
        for size in sizes:
            if grid * grid != self.num_tokens or (grid * size) % self.token_size:
                raise bad("token_sizes", f"holds {size}: the {grid} x {grid} token grid at {self.token_size} does not "
                                         f"scale to a whole grid at {size}")
        if len(sizes) > 1:
            suffix = f"@{IMAGE_SIZE}"
            for name in ("token_modality", "pixel_modality"):
                value = getattr(self, name)
                if value is not None and self.token_size == IMAGE_SIZE and not value.endswith(suffix):
                    raise bad(name, f"must end with {suffix!r} when token_sizes has other sizes (their folders "
                                    f"replace it with '@<size>')")

    def _check_embedding(self, bad: Callable[[str, str], ConfigError]) -> None:
        """An npz label is an embedding: (L, D) vectors per sequence, read by the trainer as an input only."""
        if (self.ext == "npz" and self.crop not in ("embedding", "none")) or (
                self.crop == "embedding" and self.ext != "npz"):
            raise bad("crop", "'embedding' is the crop of npz labels (or 'none': label-only)")
        if self.crop != "embedding":
            return
        if self.shape is None or len(self.shape) != 2:
            raise bad("shape", "must be the (max vectors, width) of an embedding, e.g. (77, 4096)")
        if self.role != "input":
            raise bad("role", "of an embedding must be 'input': the trainer embeds its vectors, nothing predicts them")

    def _check_spatial(self, bad: Callable[[str, str], ConfigError], default: Callable[[str, Any], None]) -> None:
        """Channels, dtype, value range, resample and token count of image-like and global modalities."""
        crop = self.crop
        if crop == "dense":
            default("resample", "nearest" if self.tokenizer == "segmentation" else "bilinear")
            default("channels", 3 if self.ext == "jpg" else 1)
            default("dtype", "float" if self.ext == "npy" else "uint8")
            default("num_tokens", (IMAGE_SIZE // IMAGE_PATCH) ** 2)
            if self.ext not in ("jpg", "png", "npy"):
                raise bad("crop", "'dense' is for image (jpg, png) and npy map labels")
        elif crop == "features":
            if self.shape is None or len(self.shape) != 3:
                raise bad("shape", "must be the fixed (h, w, C) shape of a feature map")
            default("channels", self.shape[2])
            default("dtype", "float")
            default("num_tokens", self.shape[0] * self.shape[1])
        elif crop == "global":
            if self.shape is None or len(self.shape) != 1:
                raise bad("shape", "must be the fixed (D,) shape of a global vector")
            default("channels", self.shape[0])
            default("dtype", "float")
            default("num_tokens", GLOBAL_TOKENS)
        for name in ("resample", "channels", "dtype", "value_range", "num_classes"):
            if crop not in ("dense", "features", "global") and getattr(self, name) is not None:
                raise bad(name, f"is for image-like and global modalities, not crop={crop!r}")
        if self.resample is not None and (crop != "dense" or self.resample not in RESAMPLES):
            raise bad("resample", f"is for dense crops: one of {', '.join(RESAMPLES)}")
        if self.channels is not None and (not isinstance(self.channels, int) or self.channels < 1):
            raise bad("channels", "must be a positive integer")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise bad("dtype", f"is not one of {', '.join(DTYPES)}")
        if self.ext == "jpg" and (self.dtype != "uint8" or self.channels != 3):
            raise bad("dtype", "of a jpg label is uint8 with 3 channels")
        if self.ext == "png" and (self.dtype == "float" or self.channels not in (1, 3)):
            raise bad("dtype", "of a png label is uint8 or uint16 with 1 or 3 channels")
        if crop == "dense":
            full = {"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0), "float": (0.0, 1.0)}[self.dtype]
            default("value_range", full)
            lo, hi = (float(v) for v in self.value_range)
            if not lo < hi:
                raise bad("value_range", "must be (low, high) with low < high")
            object.__setattr__(self, "value_range", (lo, hi))
        elif self.value_range is not None:
            raise bad("value_range", "is for dense maps")
        if self.num_classes is not None and (self.tokenizer != "segmentation" or not 1 < self.num_classes < 255):
            raise bad("num_classes", "is for class maps (tokenizer 'segmentation'): 2..254 classes, 255 = none")
        if self.tokenizer == "segmentation" and (self.num_classes is None or self.dtype != "uint8"
                                                 or self.channels != 1 or self.resample != "nearest"):
            raise bad("num_classes", "must be given for a class map (uint8, 1 channel, resample 'nearest')")

    # -- derived views

    @property
    def tokenized(self) -> bool:
        """True when the tokenize job writes a token folder for this modality."""
        return self.crop not in ("none", "embedding")

    @property
    def embedded(self) -> bool:
        """True for an embedding: the trainer reads this label folder itself as input vectors (no tokens)."""
        return self.crop == "embedding"

    @property
    def image_like(self) -> bool:
        """Tokens on a square grid (2-D positions in the trainer): dense and feature-map crops."""
        return self.crop in ("dense", "features")

    @property
    def teacher_crops(self) -> bool:
        """Crops 1.. of this label are made by re-running its teacher on the cropped image."""
        return self.crop in ("features", "global")

    def token_folder(self, size: int) -> str:
        """The token folder at crop side `size` (tok_rgb@448); `size` must be one of `token_sizes`."""
        return self._folder_at(self.token_modality, self._check_size(size))

    def tokens_at(self, size: int) -> int:
        """Tokens per crop at crop side `size`: the square token grid scaled by size / token_size (196 at 224,
        784 at 448 for 16-pixel patches)."""
        grid = math.isqrt(self.num_tokens) * self._check_size(size) // self.token_size
        return grid * grid

    def pixel_folder(self, size: int) -> str | None:
        """The raw-pixel input folder at crop side `size` (rgb@448), or None without one."""
        self._check_size(size)
        return None if self.pixel_modality is None else self._folder_at(self.pixel_modality, size)

    @property
    def token_folders(self) -> tuple[str, ...]:
        """Every token folder the tokenize job can write for this modality, one per token size (or the one)."""
        if not self.tokenized:
            return ()
        return tuple(self.token_folder(s) for s in self.token_sizes) if self.token_sizes else (self.token_modality,)

    def sizes(self) -> Iterator[ModalityInfo]:
        """This modality's entry at each of its token sizes (`at(size)`), the registry's own first."""
        for size in self.token_sizes or (None,):
            yield self if size is None else self.at(size)

    def at(self, size: int) -> ModalityInfo:
        """This modality's entry at crop side `size`: the token_modality, num_tokens, pixel_modality and
        token_size of that size (`self` at its own size); every other field is the registry entry's."""
        self._check_size(size)
        if size == self.token_size:
            return self
        from dataclasses import replace

        return replace(self, token_modality=self.token_folder(size), num_tokens=self.tokens_at(size),
                       pixel_modality=self.pixel_folder(size), token_size=size)

    def _folder_at(self, folder: str, size: int) -> str:
        """`folder` (this entry's, at token_size) renamed for `size`: its "@<token_size>" suffix -> "@<size>"."""
        if size == self.token_size:
            return folder
        return folder[: -len(f"@{self.token_size}")] + f"@{size}"

    def _check_size(self, size: int) -> int:
        """`size` itself when it is one of token_sizes; ConfigError naming the sizes (and who has `size`)."""
        if not self.token_sizes:
            raise ConfigError(f"modality {self.name!r} has no image-like tokens: it has no token sizes")
        if size in self.token_sizes:
            return size
        others = [m.name for m in all_modalities() if size in m.token_sizes]
        have = f" (modalities tokenized at {size}: {', '.join(others)})" if others else ""
        raise ConfigError(f"modality {self.name!r} is tokenized at {', '.join(map(str, self.token_sizes))}, not "
                          f"{size!r}{have}")

    def resolve_serializer(self) -> Callable[..., list[str]]:
        """The serializer function (imported on first use when given as 'module:function')."""
        if self.serializer is None:
            raise ConfigError(f"modality {self.name!r} declares no serializer: give ModalityInfo(serializer=...) "
                              "to turn its label into text")
        if callable(self.serializer):
            return self.serializer
        return _import_ref(self.serializer, f"the serializer of modality {self.name!r}")

    def resolve_schema(self) -> Callable[[Any], None]:
        """The schema function (imported on first use when given as 'module:function'); a no-op without one."""
        if self.schema is None:
            return lambda label: None
        if callable(self.schema):
            return self.schema
        return _import_ref(self.schema, f"the schema of modality {self.name!r}")


def _import_ref(ref: str, what: str) -> Any:
    import importlib

    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what} ({ref}) cannot be imported: {e}; install the package that provides it") from None


_IMAGE = "vqvae"
_4M = "EPFL-VILAB/4M_tokenizers_"  # Apple's released tokenizers (hub repositories)
_TEXT = "wordpiece"
_SCHEMA = "omniforge.schemas:"

MODALITIES: dict[str, ModalityInfo] = {
    m.name: m
    for m in [
        ModalityInfo(
            name="rgb", ext="jpg", tokenizer=_IMAGE, vocab_size=16384, pixel_modality="rgb@224", resample="bicubic",
            token_sizes=SUPER_RESOLUTION, ml4m_tokenizer=_4M + "rgb_16k_224-448", ml4m_transform="rgb",
            description="JPEG, EXIF-rotated RGB, shorter side at most the storage size (512)"),
        ModalityInfo(
            name="caption", ext="txt", tokenizer=_TEXT, num_tokens=256, schema=_SCHEMA + "check_caption",
            description="UTF-8 text, the corpus alt-text"),
        ModalityInfo(  # ml-4m: 't5_caption', a 'seq_emb' of max_length 77 and orig_emb_dim 4096, input-only
            name="t5_caption", ext="npz", shape=(77, 4096),
            description="npz as ml-4m reads it: emb float16 (1, 77, 4096), the T5-XXL encoder states of the caption's "
                        "tokens ([EOS] included, cut at 77), zero after them; mask_valid bool (1, 77), True at them",
            ml4m_note="ml-4m's CaptionEmbTransform keeps emb[mask_valid]"),
        ModalityInfo(
            name="det", ext="json", tokenizer=_TEXT, num_tokens=256, draw="boxes",
            serializer="omniforge.tokenize.text:det_crop_units", schema=_SCHEMA + "check_det",
            description='JSON {"instances": [{"boxes": [xmin, ymin, xmax, ymax] in 0..1, "class_name", "score"}]}, '
                        "every box the teacher kept (the serializer keeps score >= 0.6, as ml-4m)",
            ml4m_note="every box the teacher kept; ml-4m's transform and omniforge's serializer keep score >= 0.6"),
        ModalityInfo(
            name="human_poses", ext="json", tokenizer="smpl_pose", num_tokens=275, draw="smpl",
            schema=_SCHEMA + "check_human_poses", format_version=2, ml4m_tokenizer=_4M + "human-poses_1k_8",
            ml4m_transform="pose", ml4m="export",
            ml4m_note="ml-4m's transform needs each person's pose tokens in the JSON (pose_tokenized, N x 8)",
            description='JSON as ml-4m reads it, {} when there is nobody: {"bbox_xyxy": N x [x0, y0, x1, y1] pixels, '
                        '"pred_smpl_params": {"global_orient": N x (1, 3, 3), "body_pose": N x (23, 3, 3) rotation '
                        'matrices, "betas": N x (10,)}, "pred_cam": N x [s, tx, ty] weak-perspective crop camera, '
                        '"score": N det scores}, HMR2.0 on det\'s person boxes'),
        ModalityInfo(
            name="human_keypoints", ext="json", tokenizer=_TEXT, num_tokens=275, draw="keypoints",
            serializer="omniforge.tokenize.text:keypoint_crop_units", schema=_SCHEMA + "check_human_keypoints",
            ml4m="none", ml4m_note="not a 4M-21 modality: 2D COCO-17 keypoints (4M-21's people are human_poses, SMPL)",
            description='JSON {"keypoint_names": [17 COCO names], "instances": [{"bbox": [xmin, ymin, xmax, ymax] in '
                        '0..1, "score", "keypoints": 17 x [x, y, score] in 0..1}]}, ViTPose on det\'s person boxes'),
        ModalityInfo(
            name="sam_instance", ext="json", tokenizer="sam_mask", num_tokens=290, draw="boxes",
            ml4m_tokenizer=_4M + "sam-instance_1k_64", ml4m_transform="mask",
            schema=_SCHEMA + "check_sam_instance", ml4m="export",
            ml4m_note="ml-4m reads it pre-tokenized per crop, a pickled npy (polygons, SAM-mask tokens, boxes)",
            description="JSON COCO RLE masks, XYXY boxes and scores"),
        ModalityInfo(
            name="sam_edge", ext="png", tokenizer=_IMAGE, vocab_size=8192, ml4m_tokenizer=_4M + "edge_8k_224-512",
            ml4m_transform="rgb",
            description="PNG uint8, boundaries of sam_instance masks"),
        ModalityInfo(
            name="canny_edge", ext="png", tokenizer=_IMAGE, vocab_size=8192, ml4m_tokenizer=_4M + "edge_8k_224-512",
            ml4m_transform="rgb",
            description="PNG uint8 (0 or 255), OpenCV Canny edges of rgb"),
        ModalityInfo(
            name="depth", ext="png", tokenizer=_IMAGE, vocab_size=8192, dtype="uint16", draw="heat",
            token_sizes=SUPER_RESOLUTION, ml4m_tokenizer=_4M + "depth_8k_224-448", ml4m_transform="depth",
            description="PNG uint16, relative depth scaled per image to 0..65535",
            ml4m_note="ml-4m's depth transform divides by 65535 and standardizes per image"),
        ModalityInfo(
            name="normal", ext="png", tokenizer=_IMAGE, vocab_size=8192, channels=3, resample="normal",
            token_sizes=SUPER_RESOLUTION, ml4m_tokenizer=_4M + "normal_8k_224-448", ml4m_transform="normal",
            description="PNG uint8 RGB, (n + 1) / 2 * 255, camera frame"),
        ModalityInfo(
            name="semseg_coco", ext="png", tokenizer="segmentation", token_modality="tok_semseg@224",
            vocab_size=4096, num_classes=133, token_sizes=SUPER_RESOLUTION,
            ml4m_tokenizer=_4M + "semseg_4k_224-448", ml4m_transform="semseg",
            description="PNG P-mode uint8, 133 COCO panoptic classes, 255 = none",
            ml4m_note="ml-4m's transform shifts the ids by one (255, none, becomes 0)"),
        ModalityInfo(
            name="clip", ext="npy", tokenizer="features", vocab_size=8192, shape=(14, 14, 512),
            token_sizes=SUPER_RESOLUTION, ml4m_tokenizer=_4M + "CLIP-B16_8k_224-448", ml4m_transform="features",
            description="npy float16 (14, 14, 512), CLIP ViT-B/16 projected last-layer patch features of crop 0 at "
                        "224 (tok_clip@448: the teacher re-run at 448 on every crop, a 28 x 28 map)",
            ml4m_note="ml-4m's tokenizer training names this folder CLIP-B16"),
        ModalityInfo(
            name="dinov2", ext="npy", tokenizer="features", vocab_size=8192, shape=(16, 16, 768),
            ml4m_tokenizer=_4M + "DINOv2-B14_8k_224-448", ml4m_transform="features",
            description="npy float16 (16, 16, 768), DINOv2 ViT-B/14 patch features at 224",
            ml4m_note="ml-4m's tokenizer training names this folder DINOv2-B14"),
        ModalityInfo(
            name="dinov2_global", ext="npy", tokenizer="memcodes", vocab_size=8192, shape=(768,),
            ml4m_tokenizer=_4M + "DINOv2-B14-global_8k_16_224", ml4m_transform="global",
            description="npy float16 (768,), DINOv2 ViT-B/14 CLS token",
            ml4m_note="ml-4m's tokenizer training names this folder DINOv2-B14-global"),
        ModalityInfo(
            name="imagebind", ext="npy", tokenizer="features", vocab_size=8192, shape=(16, 16, 1280),
            ml4m_tokenizer=_4M + "ImageBind-H14_8k_224-448", ml4m_transform="features",
            description="npy float16 (16, 16, 1280), ImageBind-H/14 patch features",
            ml4m_note="ml-4m's tokenizer training names this folder ImageBind-H14"),
        ModalityInfo(
            name="imagebind_global", ext="npy", tokenizer="memcodes", vocab_size=8192, shape=(1280,),
            ml4m_tokenizer=_4M + "ImageBind-H14-global_8k_16_224", ml4m_transform="global",
            description="npy float16 (1280,), ImageBind-H/14 class token after the final LayerNorm, not projected "
                        "(4M-21's ImageBind-H14-global)",
            ml4m_note="the 1280-d class token, as 4M-21; ml-4m's tokenizer training names it ImageBind-H14-global"),
        ModalityInfo(
            name="color_palette", ext="json", tokenizer=_TEXT, num_tokens=23, chunks=(1, 3), keep="binary",
            draw="palette", serializer="omniforge.tokenize.text:palette_crop_units",
            schema=_SCHEMA + "check_color_palette", format_version=2,
            description='JSON [{"1": [[R, G, B]], ..., "7": [7 colours]}], the palette for every k = 1..7, largest '
                        "cluster first (ml-4m's format; the trainer draws k per sample)",
            ml4m_note="a palette for every k; ml-4m's loader and omniforge's raw folder draw k per sample"),
        ModalityInfo(
            name="metadata", ext="json", tokenizer=_TEXT, num_tokens=40, chunks=(2, 2), shuffle_chunks=True,
            serializer="omniforge.tokenize.text:metadata_crop_units", schema=_SCHEMA + "check_metadata",
            format_version=2,
            description="JSON object of the 4M-21 metadata fields, ml-4m's names and units",
            ml4m_note="4M-21's names and units; a field whose source did not run is absent"),
        ModalityInfo(
            name="aesthetic_score", ext="json", schema=_SCHEMA + "check_aesthetic_score",
            ml4m="none", ml4m_note="label-only: ml-4m reads the score inside metadata (aesthetic_score)",
            description="JSON number, the LAION aesthetic predictor's score of the image (an MLP on its CLIP ViT-L/14 "
                        "embedding, trained on 1..10 ratings; higher = more aesthetic); label-only, read by metadata"),
        ModalityInfo(
            name="watermark_score", ext="json", schema=_SCHEMA + "check_watermark_score",
            ml4m="none", ml4m_note="label-only: ml-4m reads the score inside metadata (watermark_score)",
            description="JSON number in [0, 1], the LAION-5B watermark detector's probability that the image carries "
                        "a watermark; label-only, read by metadata"),
    ]
}

def register_modality(info: ModalityInfo) -> ModalityInfo:
    """Add a modality defined outside omniforge (a teacher plugin). Re-registering the same info is a no-op."""
    if not isinstance(info, ModalityInfo):
        raise TypeError(f"register_modality takes a ModalityInfo, got {type(info).__name__}")
    existing = MODALITIES.get(info.name)
    if existing == info:
        return existing
    if existing is not None:
        changed = [f.name for f in fields(ModalityInfo) if getattr(existing, f.name) != getattr(info, f.name)]
        raise ConfigError(f"modality {info.name!r} is already registered with a different definition "
                          f"(fields {', '.join(changed)} differ)")
    folders = {f: m.name for m in MODALITIES.values() for f in m.token_folders}
    for folder in info.token_folders:
        if folder in folders or folder in MODALITIES:
            raise ConfigError(f"modality {info.name!r}: token folder {folder!r} is already used by "
                              f"{folders.get(folder, folder)!r}")
    MODALITIES[info.name] = info
    return info


def load_entry_points() -> None:
    """Register the modalities of installed plugins (entry-point group `omniforge.modalities`), once: an entry
    names a ModalityInfo or a sequence of them."""
    def register(value: Any) -> None:
        for info in (value if isinstance(value, Iterable) else [value]):
            register_modality(info)

    load_group(ENTRY_POINT_GROUP, register)


def get_modality(name: str) -> ModalityInfo:
    load_entry_points()
    try:
        return MODALITIES[name]
    except KeyError:
        raise ConfigError(f"unknown modality {name!r}; known modalities: {', '.join(MODALITIES)}") from None


def all_modalities() -> Iterator[ModalityInfo]:
    """Every registered modality, built-ins first, in registration order."""
    load_entry_points()
    return iter(list(MODALITIES.values()))


def by_token_folder(folder: str) -> ModalityInfo | None:
    """The modality whose token folder is `folder`, at that folder's size (tok_depth@224 -> depth,
    tok_depth@448 -> depth.at(448)), or None."""
    return next((v for m in all_modalities() for v in m.sizes() if v.token_modality == folder), None)


def by_pixel_folder(folder: str) -> ModalityInfo | None:
    """The modality whose raw-pixel input folder is `folder`, at that folder's size (rgb@224 -> rgb, rgb@448 ->
    rgb.at(448)), or None."""
    return next((v for m in all_modalities() for v in m.sizes() if v.pixel_modality == folder), None)


def token_folders() -> Iterator[ModalityInfo]:
    """Every token folder's entry (`by_token_folder` of each), in registry order, every size of a modality."""
    return iter([v for m in all_modalities() if m.tokenized for v in m.sizes()])


def parse_token_target(name: str) -> ModalityInfo:
    """A tokenize target: a modality name ("depth", its token folder at 224) or "<modality>@<size>"
    ("depth@448": tok_depth@448) -> the modality's entry at that size. ConfigError names the valid sizes."""
    base, at, size = name.partition("@")
    info = get_modality(base)
    if not at:
        return info
    if not size.isdigit():
        raise ConfigError(f"{name!r}: a size is <modality>@<pixels>, e.g. {base}@448")
    return info.at(int(size))



def by_embedding_folder(folder: str) -> ModalityInfo | None:
    """The embedding modality whose label folder the trainer reads as input vectors (t5_caption), or None."""
    return next((m for m in all_modalities() if m.embedded and m.name == folder), None)


__all__ = ["DEFAULT_LABEL_MODALITIES", "ENTRY_POINT_GROUP", "IMAGE_MODALITY", "MODALITIES", "SUPER_RESOLUTION",
           "ModalityInfo", "all_modalities", "by_embedding_folder", "by_pixel_folder", "by_token_folder",
           "get_modality", "load_entry_points", "parse_token_target", "register_modality", "token_folders"]

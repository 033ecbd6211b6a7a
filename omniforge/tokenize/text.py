"""The WordPiece text tokenizer and the 4M-21 text forms of the sequence modalities.

Sequence modalities (caption, det, human_poses, human_keypoints, sam_instance, color_palette, metadata) are
written as text and tokenized by one shared WordPiece vocabulary, exactly as 4M-21 does, so token streams are
interchangeable with ml-4m's:

- the vocabulary starts with [PAD] [UNK] [SOS] [EOS] (ids 0..3), the sentinels [S_0]..[S_199] used by span
  masking, the value tokens v0=0..v0=999, v1=0..v1=999, v2=..., v3=... and the 80 COCO class names, all
  kept whole (single-word added tokens);
- every serializer returns a list of *units*: whole elements (one box, one person, one query point, one
  metadata chunk) that must never be split. ``" ".join(units)`` is the 4M-21 string;
  `TextTokenizer.encode_units` packs whole units into the fixed token budget of the modality.

What 4M-21 draws per training sample (the palette size k, the metadata order, SAM's query points and the
order of their instances, the order of each person's SMPL groups) the serializers draw from `Crop.generator()`:
the trainer hands every sample its own generator, so two epochs see different draws as in ml-4m; the tokenize job,
which freezes one draw into the token shards, gets a generator seeded by (crop seed, key, crop index), the same in
every process. Each serializer has a parser that reads the string (or the tokenizer's decoded, lower-cased string)
back.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.coco import COCO_DETECTION_CLASSES, COCO_KEYPOINTS

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
NUM_SENTINELS = 200
COORD_BINS = 1000  # value tokens v0=0 .. v0=999 (and v1, v2, v3)
NUM_VALUE_TYPES = 4  # v0, v1, v2, v3

# Plain words the serializers write; training feeds them so each is one token of the vocabulary.
SERIALIZER_WORDS: tuple[str, ...] = ("human", "point", "polygon", "none", "pose", "global", "camera", "shape")
_WORD_WEIGHT = 1000  # how many times each serializer word is fed to the trainer

# SAM instance mask tokens and SMPL pose tokens: ids 0..1023 written as v0=<t> (t < 512) or v1=<t - 512>, as 4M-21.
SAM_MASK_VOCAB = 1024
POSE_VOCAB = 1024
_SAM_HALF = 512

_INT16_MAX = np.iinfo(np.int16).max


def _sentinel(i: int) -> str:
    return f"[S_{i}]"


def _value(kind: int, v: int) -> str:
    return f"v{kind}={v}"


def _special_tokens() -> list[Any]:
    """The tokens every vocabulary starts with, in id order (as 4M-21's unified WordPiece tokenizer)."""
    from tokenizers import AddedToken

    tokens: list[Any] = [PAD, UNK, SOS, EOS]
    tokens += [AddedToken(_sentinel(i), single_word=True, normalized=False) for i in range(NUM_SENTINELS)]
    tokens += [AddedToken(_value(k, v), single_word=True, normalized=False)
               for k in range(NUM_VALUE_TYPES) for v in range(COORD_BINS)]
    # 4M-21 lists the COCO classes alphabetically (fourm/utils/tokenizer/object_classes.json, "coco").
    tokens += [AddedToken(c, single_word=True, normalized=True) for c in sorted(COCO_DETECTION_CLASSES)]
    return tokens


NUM_SPECIAL_TOKENS = 4 + NUM_SENTINELS + NUM_VALUE_TYPES * COORD_BINS + len(COCO_DETECTION_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# The tokenizer


def train_wordpiece(texts: Iterable[str], *, vocab_size: int = 30_000, min_frequency: int = 0) -> TextTokenizer:
    """Train a 4M-21 WordPiece tokenizer (HF `tokenizers`) on `texts` (captions, usually).

    BertNormalizer (lower-cases), BertPreTokenizer, WordPiece decoder; the special tokens come first, in
    this order: [PAD] [UNK] [SOS] [EOS], [S_0]..[S_199], v0=0..v0=999, v1=.., v2=.., v3=.. (kept verbatim,
    not normalized), then the 80 COCO class names (normalized, so "Dog" finds "dog"). The serializers'
    plain words (SERIALIZER_WORDS) are fed to the trainer so each is a whole token. `vocab_size` is an upper
    bound: a small corpus gives a smaller vocabulary, always with every special token.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, trainers
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    if not isinstance(vocab_size, int) or not NUM_SPECIAL_TOKENS < vocab_size <= _INT16_MAX + 1:
        raise ConfigError(f"vocab_size={vocab_size!r}: must be an integer above {NUM_SPECIAL_TOKENS} (the special, "
                          f"sentinel, value and class tokens) and at most {_INT16_MAX + 1} (ids are stored as int16)")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ConfigError(f"min_frequency={min_frequency!r}: must be a non-negative integer")

    tok = Tokenizer(WordPiece(unk_token=UNK))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        continuing_subword_prefix="##", special_tokens=_special_tokens())

    def corpus() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise ConfigError(f"train_wordpiece: texts must be strings, got {type(text).__name__}")
            yield text
        for word in SERIALIZER_WORDS:
            yield " ".join([word] * _WORD_WEIGHT)

    tok.train_from_iterator(corpus(), trainer=trainer)
    # A vocabulary too small to hold a serializer word whole still gets it as one (added) token.
    missing = [w for w in SERIALIZER_WORDS if len(tok.encode(w, add_special_tokens=False).ids) != 1]
    if missing:
        tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in missing])
    return TextTokenizer(tok)


class TextTokenizer:
    """A trained WordPiece tokenizer with the 4M-21 special tokens ([PAD]=0, [UNK]=1, [SOS]=2, [EOS]=3)."""

    def __init__(self, tokenizer: Any, *, source: str = "tokenizer"):
        ids = [tokenizer.token_to_id(t) for t in (PAD, UNK, SOS, EOS)]
        if ids != [0, 1, 2, 3]:
            raise WeightsError(f"{source}: not a 4M-style text tokenizer ([PAD] [UNK] [SOS] [EOS] must be ids 0..3, "
                               f"found {ids}); train one with `omniforge tokenizer train`")
        if tokenizer.get_vocab_size(with_added_tokens=True) > _INT16_MAX + 1:
            raise WeightsError(f"{source}: vocabulary of {tokenizer.get_vocab_size()} tokens does not fit the int16 "
                               f"token shards (at most {_INT16_MAX + 1})")
        self._tok = tokenizer
        self.pad_id, self.unk_id, self.sos_id, self.eos_id = ids
        sentinels = []
        for i in range(NUM_SENTINELS):
            sid = tokenizer.token_to_id(_sentinel(i))
            if sid is None:
                break
            sentinels.append(sid)
        self.sentinel_ids: list[int] = sentinels

    @classmethod
    def from_file(cls, path: str) -> TextTokenizer:
        """Load a `tokenizer.json` (HF `tokenizers` format, e.g. one written by `save`)."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for missing and malformed files
            reason = " ".join(str(e).split()) or type(e).__name__
            raise WeightsError(f"text tokenizer {path} cannot be loaded ({reason}): pass a tokenizer.json written "
                               f"by `omniforge tokenizer train` (TextTokenizer.save)") from None
        return cls(tok, source=str(path))

    def save(self, path: str) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_units(self, units: Sequence[str], max_tokens: int) -> np.ndarray:
        """Pack `units` into exactly `max_tokens` ids: int16 (max_tokens,); see `pack`."""
        return self.pack(units, max_tokens)[0]

    def pack(self, units: Sequence[str], max_tokens: int) -> tuple[np.ndarray, int]:
        """Pack `units` into exactly `max_tokens` ids: (int16 (max_tokens,), number of units cut).

        Whole units are taken in order while they fit in `max_tokens - 1` tokens (packing stops at the first
        unit that does not fit), then [EOS], then [PAD] up to `max_tokens`. A first unit that alone is longer
        than the budget is cut at `max_tokens - 1` tokens: that is the caption case (a caption is one unit),
        and 4M-21's own truncation of an over-long sequence. The count of units left out (the cut first
        unit counts as kept) is returned so that callers report what a budget drops, never silently.
        (ml-4m keeps chunks while they and a final [EOS] fit, so an over-full metadata loses its [EOS] and
        one chunk fewer; omniforge always ends a sequence with [EOS].)
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: must be a positive integer")
        budget = max_tokens - 1
        ids: list[int] = []
        units = [str(u) for u in units]
        encoded = self._tok.encode_batch(units, add_special_tokens=False) if units else []
        cut = 0
        for i, enc in enumerate(encoded):
            unit = enc.ids
            if len(ids) + len(unit) <= budget:
                ids.extend(unit)
            else:
                if i == 0:
                    ids = unit[:budget]
                cut = len(encoded) - max(i, 1)
                break
        out = np.full(max_tokens, self.pad_id, dtype=np.int16)
        out[: len(ids)] = ids
        out[len(ids)] = self.eos_id
        return out, cut

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, up to the first [EOS]; [PAD] and [SOS] are skipped, every other token kept
        (value tokens, class names and sentinels come back verbatim, words lower-cased)."""
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.sos_id):
                kept.append(i)
        return self._tok.decode(kept, skip_special_tokens=False)


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _bin(v: float, bins: int) -> int:
    """A coordinate in 0..1 (clipped) -> 0..bins-1, rounded as 4M-21 does (Python's round)."""
    return round(min(max(float(v), 0.0), 1.0) * (bins - 1))


def _parse_value(word: str) -> tuple[int, int] | None:
    """"v2=17" -> (2, 17); anything else -> None."""
    if len(word) < 4 or word[0] != "v" or word[2] != "=" or not word[1].isdigit():
        return None
    try:
        return int(word[1]), int(word[3:])
    except ValueError:
        return None


def _bad(message: str) -> SampleError:
    """A label a serializer cannot read; the tokenize job prefixes the modality's name."""
    return SampleError("bad_label", message)


def _check_bins(bins: int) -> None:
    if not isinstance(bins, int) or not 2 <= bins <= COORD_BINS:
        raise ConfigError(f"bins={bins!r}: must be an integer in 2..{COORD_BINS} (the value tokens v0=0..v0=999)")


# ----------------------------------------------------------------------------------------------------------
# det


_DET_ORDERS = {
    # 4M-21's DetectionTransform orders as (sort key of (box, name, score), descending); "random" is left to
    # the trainer (stored shards are deterministic).
    "dist_to_orig": (lambda b: b[0][0] ** 2 + b[0][1] ** 2, False),
    "area": (lambda b: (b[0][2] - b[0][0]) * (b[0][3] - b[0][1]), True),
    "score": (lambda b: b[2], True),
}


def det_units(instances: list[dict], *, order: str = "dist_to_orig", bins: int = 1000,
              min_score: float = 0.0) -> list[str]:
    """det instances -> one unit per box, "v0=<xmin> v1=<ymin> v2=<xmax> v3=<ymax> <class_name>".

    `instances` are det's {"boxes": [xmin, ymin, xmax, ymax] in 0..1, "class_name", "score"}; coordinates
    are clipped to 0..1 and scaled to round(c * (bins - 1)). Order as 4M-21's DetectionTransform:
    "dist_to_orig" (default, ascending xmin^2 + ymin^2), "area" or "score" (descending); ties keep the
    input order. Instances with score < `min_score` are dropped (det's labeler already thresholds; 4M-21's
    transform used 0.6 on its own detector).
    """
    if order not in _DET_ORDERS:
        raise ConfigError(f"order={order!r}: must be one of {', '.join(_DET_ORDERS)}")
    _check_bins(bins)
    boxes = []
    for inst in instances:
        try:
            box = [float(c) for c in inst["boxes"]]
            name, score = str(inst["class_name"]), float(inst.get("score", 1.0))
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(f"malformed box instance {inst!r} ({e})") from None
        if len(box) != 4 or not all(math.isfinite(c) for c in box) or not name.strip():
            raise _bad(f"malformed box instance {inst!r}: need 4 finite box coordinates and a class name")
        if score >= min_score:
            boxes.append((box, name, score))
    key, descending = _DET_ORDERS[order]
    boxes = sorted(boxes, key=key, reverse=descending)  # stable, also when reversed
    return [" ".join([*(_value(k, _bin(c, bins)) for k, c in enumerate(box)), name]) for box, name, _ in boxes]


def parse_det(text: str, bins: int = 1000) -> list[dict]:
    """A det string -> [{"boxes": [xmin, ymin, xmax, ymax] in 0..1, "class_name"}]; incomplete boxes are
    skipped (e.g. a sequence cut by the token budget or a malformed model output)."""
    _check_bins(bins)
    out: list[dict] = []
    words = text.split()
    i = 0
    while i < len(words):
        vals = [_parse_value(w) for w in words[i:i + 4]]
        if len(vals) == 4 and all(v is not None and v[0] == k for k, v in enumerate(vals)):
            j = i + 4
            name = []
            while j < len(words) and _parse_value(words[j]) is None:
                name.append(words[j])
                j += 1
            if name:
                out.append({"boxes": [v[1] / (bins - 1) for v in vals], "class_name": " ".join(name)})
            i = j
        else:
            i += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# color_palette


MAX_PALETTE_COLORS = 7  # 4M-21 keeps one palette for every k = 1..7


def palette_units(colors: list[list[int]]) -> list[str]:
    """One palette -> one unit "v1=<n> v0=R v0=G v0=B ..." (n colours, each channel 0..255), as 4M-21."""
    if not isinstance(colors, (list, tuple)) or not 1 <= len(colors) <= MAX_PALETTE_COLORS:
        raise _bad(f"a palette needs a list of 1..{MAX_PALETTE_COLORS} RGB colours, got {colors!r}")
    words = [_value(1, len(colors))]
    for color in colors:
        try:
            rgb = [round(float(c)) for c in color]
        except (TypeError, ValueError):
            rgb = []
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise _bad(f"palette colour {color!r} is not [R, G, B] in 0..255")
        words += [_value(0, c) for c in rgb]
    return [" ".join(words)]


def palettes_of(label: Any) -> dict[int, list[list[int]]]:
    """The palettes of a color_palette label, by k.

    The label is ml-4m's format: a one-element list holding {"1": [[R, G, B]], "2": [...], ..., "7": [...]}
    (ml-4m's ColorPaletteTransform reads `label[0][str(k)]`); a palette may hold fewer than k colours when
    the image has fewer distinct ones.
    """
    if not (isinstance(label, list) and len(label) == 1 and isinstance(label[0], dict)):
        raise _bad("a color_palette label is [{\"1\": [[R, G, B]], ..., \"7\": [...]}] (one palette for every k "
                   "= 1..7, as ml-4m reads it); a bare list of colours is the format of omniforge 0.1: "
                   "re-run `omniforge label --output ROOT --modalities color_palette` to rewrite it")
    by_k = label[0]
    wanted = [str(k) for k in range(1, MAX_PALETTE_COLORS + 1)]
    if sorted(by_k, key=str) != sorted(wanted):
        raise _bad(f"a color_palette label needs the palettes for k = {', '.join(wanted)}, got keys {sorted(by_k)}")
    return {int(k): by_k[k] for k in wanted}


def palette_draw(rng: np.random.Generator) -> int:
    """4M-21's palette size: k uniform in 1..7, drawn per sample."""
    return int(rng.integers(1, MAX_PALETTE_COLORS + 1))


def parse_palette(text: str) -> list[list[int]]:
    """A color_palette string -> [[R, G, B], ...]; the count v1=<n> limits the colours read when present."""
    values = [v for v in map(_parse_value, text.split()) if v is not None]
    count = next((v for k, v in values if k == 1), None)
    channels = [v for k, v in values if k == 0]
    colors = [channels[i:i + 3] for i in range(0, len(channels) - 2, 3)]
    return colors if count is None else colors[:count]


# ----------------------------------------------------------------------------------------------------------
# metadata

# 4M-21's metadata field ids (MetadataTransform.metadata_id_map): written as v1=<id>.
METADATA_FIELD_IDS: dict[str, int] = {name: i for i, name in enumerate([
    "original_width", "original_height", "caption_n_chars", "caption_n_words", "caption_n_sentences",
    "n_humans", "n_sam_instances", "n_coco_instances", "coco_instance_diversity", "colorfulness", "brightness",
    "contrast", "saturation", "entropy", "walkability", "objectness", "semantic_diversity",
    "geometric_complexity", "occlusion_score", "watermark_score", "aesthetic_score",
])}
_IMAGE_DIM_FIELDS = {"original_width", "original_height"}
_IMAGE_DIM_BIN = 32
_INT_FIELDS = {"caption_n_chars", "caption_n_words", "caption_n_sentences", "n_humans", "n_sam_instances",
               "n_coco_instances", "coco_instance_diversity", "semantic_diversity"}
_MANUAL_BINS = {"watermark_score": (0.5,), "aesthetic_score": (4.5, 5.5)}
_MIN_MAX_BINS = {  # (vmin, vmax, number of bins)
    "colorfulness": (0, 150, 50), "brightness": (0, 255, 50), "contrast": (0, 127, 50),
    "saturation": (0, 255, 50), "entropy": (0, 10, 50), "walkability": (0, 1, 50), "objectness": (0, 1, 50),
    "geometric_complexity": (0, 0.75, 50), "occlusion_score": (0, 0.25, 50),
}
def _metadata_bin(field: str, value: float) -> int:
    vmax = COORD_BINS - 1
    if field in _IMAGE_DIM_FIELDS:
        return max(0, min(int(value) // _IMAGE_DIM_BIN, vmax))
    if field in _INT_FIELDS:
        return max(0, min(int(round(value)), vmax))
    if field in _MANUAL_BINS:
        return sum(1 for edge in _MANUAL_BINS[field] if value >= edge)
    lo, hi, bins = _MIN_MAX_BINS[field]
    return int((max(lo, min(value, hi)) - lo) / (hi - lo) * (bins - 1))


def metadata_units(metadata: dict, order: Sequence[str] | None = None) -> list[str]:
    """metadata -> 4M-21 chunks "v1=<field id> v0=<bin>", one unit per field, in `order` (default: field-id order).

    `metadata` is ml-4m's format: 4M-21 field names (METADATA_FIELD_IDS) and units. The rules are 4M-21's
    MetadataTransform:
      original_width/height: pixels // 32; caption_n_*, n_humans, n_sam_instances, n_coco_instances,
      coco_instance_diversity, semantic_diversity: the integer, clamped to 0..999; watermark_score: bin 0
      below 0.5, else 1; aesthetic_score: 0 below 4.5, 1 below 5.5, else 2; every other field: clipped to
      (vmin, vmax) and int((v - vmin) / (vmax - vmin) * (bins - 1)) with (vmin, vmax, bins) =
      colorfulness (0, 150, 50), brightness (0, 255, 50), contrast (0, 127, 50), saturation (0, 255, 50),
      entropy (0, 10, 50), walkability and objectness (0, 1, 50), geometric_complexity (0, 0.75, 50),
      occlusion_score (0, 0.25, 50).
    An unknown field or a value that is not a finite number is a bad label (ml-4m's transform raises on
    it). `order` names the fields in the order to write them (4M-21 shuffles them per training sample; see
    `metadata_crop_units`); it must hold exactly the label's fields.
    """
    check_metadata(metadata)
    fields = list(metadata) if order is None else list(order)
    if order is not None and sorted(fields) != sorted(metadata):
        raise ValueError(f"order {fields} must name exactly the label's fields {sorted(metadata)}")
    if order is None:
        fields.sort(key=METADATA_FIELD_IDS.__getitem__)
    return [f"{_value(1, METADATA_FIELD_IDS[f])} {_value(0, _metadata_bin(f, metadata[f]))}" for f in fields]


def check_metadata(metadata: Any) -> None:
    """Raise a bad-label SampleError unless `metadata` is ml-4m's format: {4M-21 field name: finite number}."""
    if not isinstance(metadata, dict):
        raise _bad(f"a metadata label is a JSON object of 4M-21 fields, got {type(metadata).__name__}")
    unknown = sorted(set(metadata) - set(METADATA_FIELD_IDS))
    if unknown:
        legacy = {"n_sam_masks", "n_coco_classes"} & set(unknown)
        hint = (": the field names of omniforge 0.1; re-run `omniforge label --output ROOT --modalities "
                "metadata` to rewrite it" if legacy else f"; 4M-21's fields are {', '.join(METADATA_FIELD_IDS)}")
        raise _bad(f"metadata fields {', '.join(unknown)} are not 4M-21 fields{hint}")
    for name, value in metadata.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(f"metadata field {name}={value!r} is not a finite number")


def parse_metadata(text: str) -> dict[str, int]:
    """A metadata string -> {4M-21 field name: bin}; unknown field ids and unpaired values are skipped."""
    names = {i: n for n, i in METADATA_FIELD_IDS.items()}
    values = [_parse_value(w) for w in text.split()]
    out: dict[str, int] = {}
    for a, b in zip(values, values[1:]):
        if a is not None and b is not None and a[0] == 1 and b[0] == 0 and a[1] in names:
            out[names[a[1]]] = b[1]
    return out


# ----------------------------------------------------------------------------------------------------------
# human_keypoints

KEYPOINT_TOKENS_PER_PERSON = 1 + 4 + 2 * len(COCO_KEYPOINTS)  # 39, as a 4M-21 person (human, box, SMPL groups)


def keypoint_units(label: dict, *, bins: int = 1000) -> list[str]:
    """human_keypoints -> one unit per person (39 tokens), or ["none"] when there is nobody (as 4M-21's poses).

    A person is "human v0=<xmin> v1=<ymin> v2=<xmax> v3=<ymax>" (bbox in 0..1 scaled as det) then the 17
    COCO keypoints in COCO order (COCO_KEYPOINTS; the label's `keypoint_names` say where each is), each
    "v0=<x> v1=<y>" scaled to 0..bins-1 when visible (score > 0) and "v2=0 v3=0" when not (or missing).
    The keypoints take the place of 4M-21's SMPL token groups (human_poses), with the same budget per person.
    People keep the label's order (highest score first).
    """
    _check_bins(bins)
    names = list(label.get("keypoint_names") or COCO_KEYPOINTS)
    index = {n: i for i, n in enumerate(names)}
    units = []
    for inst in label.get("instances", []):
        try:
            box = [float(c) for c in inst["bbox"]]
            kps = [[float(c) for c in kp] for kp in inst.get("keypoints", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(f"malformed person ({e})") from None
        if len(box) != 4 or any(len(kp) != 3 for kp in kps):
            raise _bad("a person needs a bbox [xmin, ymin, xmax, ymax] and [x, y, score] keypoints")
        words = ["human", *(_value(k, _bin(c, bins)) for k, c in enumerate(box))]
        for name in COCO_KEYPOINTS:
            i = index.get(name)
            kp = kps[i] if i is not None and i < len(kps) else None
            if kp is not None and math.isfinite(kp[2]) and kp[2] > 0:
                words += [_value(0, _bin(kp[0], bins)), _value(1, _bin(kp[1], bins))]
            else:
                words += [_value(2, 0), _value(3, 0)]
        units.append(" ".join(words))
    return units or ["none"]


def parse_keypoints(text: str, bins: int = 1000) -> list[dict]:
    """A human_keypoints string -> [{"bbox": [xmin, ymin, xmax, ymax] in 0..1, "keypoints": [[x, y, visible]
    x 17]}] (visible 1 or 0; an invisible keypoint is [0.0, 0.0, 0]). "none" and incomplete people give
    nothing."""
    _check_bins(bins)
    words = text.split()
    out = []
    n = KEYPOINT_TOKENS_PER_PERSON
    for i, w in enumerate(words):
        if w != "human" or i + n > len(words):
            continue
        vals = [_parse_value(x) for x in words[i + 1:i + n]]
        if any(v is None for v in vals) or [v[0] for v in vals[:4]] != [0, 1, 2, 3]:
            continue
        kps = []
        for a, b in zip(vals[4::2], vals[5::2]):
            if (a[0], b[0]) == (0, 1):
                kps.append([a[1] / (bins - 1), b[1] / (bins - 1), 1])
            elif (a[0], b[0]) == (2, 3):
                kps.append([0.0, 0.0, 0])
            else:
                break
        if len(kps) == len(COCO_KEYPOINTS):
            out.append({"bbox": [v[1] / (bins - 1) for v in vals[:4]], "keypoints": kps})
    return out


# ----------------------------------------------------------------------------------------------------------
# human_poses

SMPL_GROUPS: tuple[str, ...] = ("pose", "global", "camera", "shape")  # ml-4m's group list (its randperm indexes it)
SMPL_GROUP_SIZES = {"pose": 8, "global": 9, "camera": 3, "shape": 10}  # values after each group word
SMPL_TOKENS_PER_PERSON = 1 + 4 + sum(1 + n for n in SMPL_GROUP_SIZES.values())  # 39: human, box, four groups
GLOBAL_RANGE = (-1.0, 1.0)  # entries of the global orientation's rotation matrix
CAMERA_RANGE = (-1.0, 19.0)  # pred_cam (s, tx, ty), clipped as ml-4m
BETAS_RANGE = (-3.0, 3.0)  # SMPL shape coefficients


def _clipped(values: Any, n: int, lo: float, hi: float, what: str) -> list[float]:
    try:
        out = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    except (TypeError, ValueError):
        out = []
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise _bad(f"a person's {what} must be {n} finite numbers")
    return [min(max(v, lo), hi) for v in out]


def smpl_person_unit(box: Sequence[float], pose_tokens: Sequence[int], global_orient: Any, betas: Any, cam: Any,
                     order: Sequence[int] = (0, 1, 2, 3), *, bins: int = 1000) -> str:
    """One person as 4M-21 writes it (ml-4m's HumanPoseTransform): "human v0=<xmin> v1=<ymin> v2=<xmax>
    v3=<ymax>" (the box in 0..1, clipped, scaled to round(c * (bins - 1))), then the four groups in `order`
    (indices into SMPL_GROUPS = pose, global, camera, shape):

    - "pose" and the 8 pose-tokenizer ids, each "v0=<t>" when t < 512 else "v1=<t - 512>";
    - "global" and the 9 entries of the global orientation, each "v0=<round(499.5 g + 499.5)>";
    - "camera" and pred_cam (s, tx, ty) clipped to [-1, 19], each "v0=<round(49.95 c + 49.95)>";
    - "shape" and the 10 betas, each "v0=<round(166.5 b + 499.5)>".

    Python's round, as ml-4m. ml-4m clips only the camera; omniforge also clips the global orientation to [-1, 1]
    and the betas to [-3, 3] (ml-4m's stated ranges), so that every value is one of the value tokens v0=0..999
    (outside those ranges ml-4m would write "v0=1082", which no vocabulary holds as one token): the same text for
    every value inside them.
    """
    _check_bins(bins)
    tokens = [int(t) for t in pose_tokens]
    if len(tokens) != SMPL_GROUP_SIZES["pose"] or not all(0 <= t < POSE_VOCAB for t in tokens):
        raise _bad(f"a person needs {SMPL_GROUP_SIZES['pose']} pose tokens in 0..{POSE_VOCAB - 1}, got {tokens}")
    if sorted(int(i) for i in order) != [0, 1, 2, 3]:
        raise ValueError(f"order={list(order)} is not a permutation of the 4 SMPL groups")
    corners = _clipped(box, 4, -math.inf, math.inf, "box")
    groups = {
        "pose": [_sam_token(t) for t in tokens],
        "global": [_value(0, round(499.5 * g + 499.5)) for g in _clipped(global_orient, 9, *GLOBAL_RANGE,
                                                                       "global orientation")],
        "camera": [_value(0, round(49.95 * c + 49.95)) for c in _clipped(cam, 3, *CAMERA_RANGE, "camera")],
        "shape": [_value(0, round(166.5 * b + 499.5)) for b in _clipped(betas, 10, *BETAS_RANGE, "betas")],
    }
    words = ["human", *(_value(k, _bin(c, bins)) for k, c in enumerate(corners))]
    for i in order:
        name = SMPL_GROUPS[int(i)]
        words += [name, *groups[name]]
    return " ".join(words)


def smpl_group_orders(n: int, rng: np.random.Generator) -> list[list[int]]:
    """4M-21's group order of each of `n` people: a permutation of SMPL_GROUPS drawn per person (ml-4m draws a
    torch.randperm(4) for every person of every sample)."""
    return [rng.permutation(len(SMPL_GROUPS)).tolist() for _ in range(n)]


def smpl_units(people: Sequence[dict], orders: Sequence[Sequence[int]] | None = None) -> list[str]:
    """human_poses people -> one unit (39 tokens) per person, in the given order, or ["none"] when there is nobody.

    A person is {"box": [xmin, ymin, xmax, ymax] in 0..1 (the crop's frame), "pose_tokens": 8 ids, "global_orient":
    (3, 3) or 9 values, "betas": 10, "pred_cam": 3}; `orders[i]` orders person i's groups (see
    :func:`smpl_person_unit`; None: pose, global, camera, shape).
    """
    if orders is not None and len(orders) != len(people):
        raise ValueError(f"orders has {len(orders)} entries for {len(people)} people")
    units = []
    for i, p in enumerate(people):
        try:
            args = (p["box"], p["pose_tokens"], p["global_orient"], p["betas"], p["pred_cam"])
        except (KeyError, TypeError):
            raise _bad(f"person {i} needs box, pose_tokens, global_orient, betas and pred_cam") from None
        units.append(smpl_person_unit(*args, order=(0, 1, 2, 3) if orders is None else orders[i]))
    return units or ["none"]


def parse_smpl_poses(text: str, bins: int = 1000) -> list[dict]:
    """A human_poses string -> [{"bbox": [xmin, ymin, xmax, ymax] in 0..1, "pose_tokens": [8 ids], "global_orient":
    (3, 3) nested lists, "betas": [10], "pred_cam": [3], "order": [group indices as written]}], the values
    dequantized as ml-4m's plotting reads them ((v - 499.5) / 499.5, (v - 499.5) / 166.5, (v - 49.95) / 49.95).
    "none", incomplete people (a sequence cut by the token budget, a malformed model output) and people whose
    groups are missing, repeated or of the wrong length give nothing."""
    _check_bins(bins)
    words = text.split()
    out = []
    for i, w in enumerate(words):
        if w != "human":
            continue
        person = _parse_person(words, i + 1, bins)
        if person is not None:
            out.append(person)
    return out


def _parse_person(words: list[str], start: int, bins: int) -> dict | None:
    box = [_parse_value(w) for w in words[start:start + 4]]
    if len(box) != 4 or any(v is None or v[0] != k for k, v in enumerate(box)):
        return None
    j, groups, order = start + 4, {}, []
    while len(groups) < len(SMPL_GROUPS):
        name = words[j] if j < len(words) else None
        if name not in SMPL_GROUP_SIZES or name in groups:
            return None
        n = SMPL_GROUP_SIZES[name]
        vals = [_parse_value(x) for x in words[j + 1:j + 1 + n]]
        allowed = (0, 1) if name == "pose" else (0,)
        if len(vals) != n or any(v is None or v[0] not in allowed for v in vals):
            return None
        groups[name] = [v[1] + _SAM_HALF * v[0] for v in vals] if name == "pose" else [v[1] for v in vals]
        order.append(SMPL_GROUPS.index(name))
        j += 1 + n
    glob = [(v - 499.5) / 499.5 for v in groups["global"]]
    return {"bbox": [v[1] / (bins - 1) for v in box], "pose_tokens": groups["pose"],
            "global_orient": [glob[0:3], glob[3:6], glob[6:9]], "betas": [(v - 499.5) / 166.5 for v in groups["shape"]],
            "pred_cam": [(v - 49.95) / 49.95 for v in groups["camera"]], "order": order}


# ----------------------------------------------------------------------------------------------------------
# sam_instance


def sam_query_points(rng: np.random.Generator, size: int = 224, n: int = 7) -> list[tuple[int, int]]:
    """4M-21's "random" query points: `n` points (x, y) in 0..size-1 (y drawn first, then x, as 4M-21)."""
    y = rng.integers(0, size, n)
    x = rng.integers(0, size, n)
    return [(int(a), int(b)) for a, b in zip(x, y)]


def _sam_token(t: int) -> str:
    return _value(0, t) if t < _SAM_HALF else _value(1, t - _SAM_HALF)


def sam_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The outer contours of a boolean instance mask in its crop, int32 (n, 1, 2) [x, y] pixels each, largest
    area first (ties: OpenCV's order): the polygons ml-4m's sam_instance files hold (its transform tests query
    points against the first)."""
    import cv2

    found, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    order = sorted(range(len(found)), key=lambda i: -cv2.contourArea(found[i]))
    return [found[i].astype(np.int32) for i in order]


def sam_bbox(contour: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of a contour's points, inclusive, as ml-4m takes an instance's box."""
    xy = np.asarray(contour).reshape(-1, 2)
    return int(xy[:, 0].min()), int(xy[:, 1].min()), int(xy[:, 0].max()), int(xy[:, 1].max())


def _sam_prepared(instances: Sequence[tuple[np.ndarray, Sequence[int]]]) -> list[tuple[np.ndarray, str]]:
    prepared = []
    for idx, (contour, tokens) in enumerate(instances):
        contour = np.asarray(contour)
        tokens = [int(t) for t in tokens]
        if contour.ndim != 3 or contour.shape[1:] != (1, 2) or len(contour) < 1:
            raise _bad(f"SAM instance {idx}: need a contour of shape (n, 1, 2)")
        if not all(0 <= t < SAM_MASK_VOCAB for t in tokens):
            raise _bad(f"SAM instance {idx}: mask tokens must be in 0..{SAM_MASK_VOCAB - 1}")
        box = [min(max(c, 0), COORD_BINS - 1) for c in sam_bbox(contour)]
        head = " ".join(["polygon", *(_value(k, c) for k, c in enumerate(box))])
        prepared.append((contour.astype(np.int32), " ".join([head, *map(_sam_token, tokens)])))
    return prepared


def _sam_hits(points: Sequence[tuple[int, int]], prepared: list[tuple[np.ndarray, str]]
              ) -> list[tuple[tuple[int, int], list[str]]]:
    """The distinct points (first occurrence kept) and the instances whose polygon holds each, in instance
    order: inside or on the border (cv2.pointPolygonTest >= 0), as ml-4m tests them."""
    import cv2

    out, seen = [], set()
    for x, y in points:
        point = (int(x), int(y))
        if point in seen:
            continue
        seen.add(point)
        out.append((point, [t for contour, t in prepared if cv2.pointPolygonTest(contour, point, False) >= 0]))
    return out


def sam_units(points: Sequence[tuple[int, int]], instances: Sequence[tuple[np.ndarray, Sequence[int]]],
              orders: Sequence[Sequence[int]] | None = None) -> list[str]:
    """sam_instance in 4M-21's form: one unit per distinct query point (x, y), in the order given.

    A unit is "point v0=<y> v1=<x>" (4M-21 writes the row first) followed, for every instance whose polygon
    holds the point (:func:`_sam_hits`), by "polygon v0=<xmin> v1=<ymin> v2=<xmax> v3=<ymax>" (the polygon's
    box, :func:`sam_bbox`) and its mask tokens, each "v0=<t>" when t < 512 else "v1=<t - 512>"; or by "none"
    when no instance holds it. `instances` are (contour int (n, 1, 2) [x, y] in the crop's pixels, mask token
    ids in 0..1023). `orders[j]` orders the instances holding the j-th distinct point (indices into them, in
    instance order); None keeps instance order. A repeated query point is written once (4M-21 keys points by
    their coordinates).
    """
    hits = _sam_hits(points, _sam_prepared(instances))
    if orders is not None and len(orders) != len(hits):
        raise ValueError(f"orders has {len(orders)} entries for {len(hits)} distinct points")
    units = []
    for j, ((x, y), texts) in enumerate(hits):
        order = list(range(len(texts))) if orders is None else [int(i) for i in orders[j]]
        if sorted(order) != list(range(len(texts))):
            raise ValueError(f"orders[{j}]={order} is not a permutation of the {len(texts)} instances at ({x}, {y})")
        units.append(" ".join(["point", _value(0, y), _value(1, x), *([texts[i] for i in order] or ["none"])]))
    return units


def sam_draw_units(instances: Sequence[tuple[np.ndarray, Sequence[int]]], rng: np.random.Generator,
                   size: int = 224) -> list[str]:
    """sam_instance with 4M-21's per-sample draws: 7 random query points (:func:`sam_query_points`), the
    distinct ones in a random order, each point's instances in a random order (ml-4m's SAMInstanceTokTransform
    with point_order="random")."""
    prepared = _sam_prepared(instances)
    hits = _sam_hits(sam_query_points(rng, size=size), prepared)
    points = [hits[i][0] for i in rng.permutation(len(hits))]
    by_point = dict(hits)
    orders = [rng.permutation(len(by_point[p])).tolist() for p in points]
    return sam_units(points, instances, orders)


def parse_sam(text: str) -> list[dict]:
    """A sam_instance string -> [{"point": (x, y), "instances": [{"bbox": (xmin, ymin, xmax, ymax),
    "tokens": [mask token ids]}]}]; malformed points and polygons are skipped."""
    words = text.split()
    out: list[dict] = []
    i = 0
    while i < len(words):
        if words[i] == "point":
            yx = [_parse_value(w) for w in words[i + 1:i + 3]]
            if len(yx) == 2 and yx[0] is not None and yx[1] is not None and (yx[0][0], yx[1][0]) == (0, 1):
                out.append({"point": (yx[1][1], yx[0][1]), "instances": []})
                i += 3
                continue
        elif words[i] == "polygon" and out:
            box = [_parse_value(w) for w in words[i + 1:i + 5]]
            if len(box) == 4 and all(v is not None and v[0] == k for k, v in enumerate(box)):
                j = i + 5
                tokens = []
                while j < len(words) and (v := _parse_value(words[j])) is not None and v[0] in (0, 1):
                    tokens.append(v[1] if v[0] == 0 else v[1] + _SAM_HALF)
                    j += 1
                out[-1]["instances"].append({"bbox": tuple(v[1] for v in box), "tokens": tokens})
                i = j
                continue
        i += 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Serializers: (label, crop) -> units, as ModalityInfo.serializer names them


DET_MIN_SCORE = 0.6  # ml-4m's DetectionTransform keeps boxes scoring at least this (4M-21's det_threshold)

# Purposes of the draws of one crop: each gets its own stream, so adding a draw never shifts another.
DRAW_PALETTE, DRAW_METADATA, DRAW_SAM, DRAW_POSES = 1, 2, 3, 4


@dataclass(frozen=True)
class Crop:
    """One crop of one sample, as a sequence serializer receives it.

    row: int32 (5,) top, left, h, w, hflip in the pixel frame of the sample's rgb label (see crops.py);
    height, width: that frame's size (every label of a sample shares it); size: side of the cropped image in
    pixels; key, index, seed: the sample key, the crop index (0 = the centre crop) and the crop-settings
    seed; rng: the trainer's generator for this sample, when it draws per training sample.
    """

    row: np.ndarray
    height: int
    width: int
    size: int = 224
    key: str = ""
    index: int = 0
    seed: int = 0
    rng: np.random.Generator | None = None

    def generator(self, purpose: int) -> np.random.Generator:
        """The stream a serializer draws from (one per `purpose`, DRAW_*): a child of the trainer's per-sample
        generator, or, for the tokenize job's frozen draw, one seeded by (seed, key, crop index, purpose)."""
        if self.rng is not None:
            return np.random.default_rng(self.rng.integers(0, 2**63))
        digest = hashlib.sha256(f"{self.seed}/{self.key}/{self.index}/{purpose}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def text_units(label: Any, crop: Crop) -> list[str]:
    """A text label is one unit (cut at the token budget when too long); crops do not change it."""
    return [str(label)]


def det_crop_units(label: dict, crop: Crop) -> list[str]:
    """det boxes inside the crop (crops.crop_det) scoring at least DET_MIN_SCORE, closest to the origin first,
    serialized by :func:`det_units`: ml-4m's DetectionTransform as 4M-21 configured it."""
    from omniforge.tokenize.crops import crop_det

    return det_units(crop_det(label, crop.row, crop.height, crop.width), min_score=DET_MIN_SCORE)


def keypoint_crop_units(label: dict, crop: Crop) -> list[str]:
    """human_keypoints people inside the crop (crops.crop_keypoints), serialized by :func:`keypoint_units`."""
    from omniforge.tokenize.crops import crop_keypoints

    return keypoint_units(crop_keypoints(label, crop.row, crop.height, crop.width))


def palette_crop_units(label: list, crop: Crop) -> list[str]:
    """The palette of a k drawn per sample (:func:`palette_draw`) for the whole image (4M-21 does not crop
    it), serialized by :func:`palette_units`."""
    palettes = palettes_of(label)
    return palette_units(palettes[palette_draw(crop.generator(DRAW_PALETTE))])


def metadata_crop_units(label: dict, crop: Crop) -> list[str]:
    """The metadata of the whole image in an order drawn per sample (4M-21 shuffles its fields), serialized
    by :func:`metadata_units`."""
    check_metadata(label)
    fields = sorted(label, key=METADATA_FIELD_IDS.__getitem__)
    order = [fields[i] for i in crop.generator(DRAW_METADATA).permutation(len(fields))]
    return metadata_units(label, order)


__all__ = [
    "BETAS_RANGE", "CAMERA_RANGE", "COORD_BINS", "Crop", "DET_MIN_SCORE", "DRAW_METADATA", "DRAW_PALETTE",
    "DRAW_POSES", "DRAW_SAM", "EOS", "GLOBAL_RANGE", "KEYPOINT_TOKENS_PER_PERSON", "MAX_PALETTE_COLORS",
    "METADATA_FIELD_IDS", "NUM_SENTINELS", "NUM_SPECIAL_TOKENS", "PAD", "POSE_VOCAB", "SERIALIZER_WORDS",
    "SMPL_GROUPS", "SMPL_GROUP_SIZES", "SMPL_TOKENS_PER_PERSON", "SOS", "TextTokenizer", "UNK", "check_metadata",
    "det_crop_units", "det_units", "keypoint_crop_units", "keypoint_units", "metadata_crop_units", "metadata_units",
    "palette_crop_units", "palette_draw", "palette_units", "palettes_of", "parse_det", "parse_keypoints",
    "parse_metadata", "parse_palette", "parse_sam", "parse_smpl_poses", "sam_bbox", "sam_contours", "sam_draw_units",
    "sam_query_points", "sam_units", "smpl_group_orders", "smpl_person_unit", "smpl_units", "text_units",
    "train_wordpiece",
]

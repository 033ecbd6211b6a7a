"""t5_caption: T5 encoder embeddings of the caption (4M-21's T5-XXL caption embeddings) through transformers."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from omniforge.errors import SampleError, WeightsError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers._torch_utils import TorchLabeler, require, short_error
from omniforge.labelers.base import PROFILE_4M21, LabelerOptions, Profile, Sample, option
from omniforge.modalities import get_modality

HUB_ID = "google/t5-v1_1-xxl"  # T5 v1.1 XXL, whose encoder (d_model 4096) 4M-21's T5-XXL embeddings come from
MAX_LENGTH, WIDTH = get_modality("t5_caption").shape  # ml-4m's t5_caption: max_length 77, orig_emb_dim 4096
DTYPES = ("auto", "float32", "bfloat16")  # no float16: T5 v1.1 activations overflow it
_TRANSFORMERS = ("transformers", "transformers>=4.48")
_FOLDER = "save_pretrained folder (config.json, model.safetensors, tokenizer files)"

# weights="tiny": the same T5EncoderModel class (T5 v1.1's gated-GELU feed-forward, relative position buckets)
# with one layer, two heads, d_ff 64 and a 64-piece vocabulary; d_model stays 4096 for the (77, 4096) contract.
TINY_CONFIG = dict(d_model=WIDTH, d_kv=32, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=32, dropout_rate=0.0, tie_word_embeddings=False)
# Its tokenizer, built here (no download): T5's special ids (<pad> 0, </s> 1, <unk> 2), then "▁" + letter pieces,
# letters, digits and punctuation, scored so that a word-initial letter is one piece.
_TINY_SPECIALS = ("<pad>", "</s>", "<unk>")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_TINY_PIECES = [("▁" + c, -1.0) for c in _LETTERS] + [(c, -2.0) for c in _LETTERS + "0123456789.,!?'-"]
_TINY_PIECES += [("▁", -3.0)]


@dataclass(frozen=True, kw_only=True)
class T5CaptionOptions(LabelerOptions):
    hub_id: str = option(HUB_ID, "the T5 checkpoint loaded by --weights pretrained: any transformers T5 whose "
                                 "encoder is 4096 wide (e.g. google/flan-t5-xxl)")
    max_length: int = option(MAX_LENGTH, f"tokens per caption, [EOS] included; longer captions are cut (at most "
                                         f"{MAX_LENGTH}, the t5_caption length 4M-21 trained with)",
                             ge=1, le=MAX_LENGTH)
    dtype: str = option("auto", "encoder weights and compute: auto (bfloat16 on CUDA, float32 on CPU), float32 or "
                                "bfloat16", choices=DTYPES)


def tiny_tokenizer() -> Any:
    """The tokenizer of weights="tiny": a fixed Unigram model (the kind T5's SentencePiece vocabulary is) wrapped
    as a transformers fast tokenizer that appends </s>, the same in every process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    transformers = require(*_TRANSFORMERS)
    vocab = [(s, 0.0) for s in _TINY_SPECIALS] + _TINY_PIECES
    tok = Tokenizer(models.Unigram(vocab, unk_id=_TINY_SPECIALS.index("<unk>")))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


@register_labeler
class T5CaptionLabeler(TorchLabeler):
    """t5_caption: the T5 encoder's last hidden states of the caption, as 4M-21's T5-XXL caption embeddings.

    Output: t5_caption, {"emb": float16 (1, 77, 4096), "mask_valid": bool (1, 77)}, ml-4m's `.npz` format
    (`fourm/data/modality_transforms.py` CaptionEmbTransform keeps `emb[mask_valid]`): one caption per sample;
    row t < n holds the encoder's `last_hidden_state` (after its final RMS norm) at the caption's token t and
    `mask_valid` True, rows n.. are zero with `mask_valid` False, n the caption's token count, [EOS] included,
    at most `max_length`.
    Input: the sample's caption label (`requires = ("caption",)`, the whitespace-normalized alt-text), tokenized
    by the checkpoint's own tokenizer with [EOS] appended, truncated to `max_length` (77, ml-4m's t5_caption
    length; a cut caption keeps its [EOS] as the last token), padded to the longest caption of the batch (the
    attention mask keeps padding out of every caption's states). ml-4m publishes no script for these
    embeddings; this is the usual T5 text-conditioning recipe (Imagen, DeepFloyd IF) at ml-4m's length. A
    sample without a caption, or whose caption is empty, fails with a reason.

    Weights: "pretrained" loads `hub_id` (default "google/t5-v1_1-xxl", T5 v1.1 XXL) with `T5EncoderModel` and
    `AutoTokenizer`; a path loads a local `save_pretrained` folder (config.json of a T5, its weights and its
    tokenizer files); "tiny" builds the same `T5EncoderModel` class with one layer, two heads, d_ff 64, d_model
    4096 and a built-in 64-piece Unigram tokenizer, random weights seeded identically in every process. A
    checkpoint that is no T5, or whose encoder is not 4096 wide, is refused.

    Options (`T5CaptionOptions`, part of the fingerprint): hub_id, max_length (77), dtype ("auto": weights and
    compute in bfloat16 on CUDA, float32 on CPU; T5 v1.1 overflows float16, which is not offered).
    """

    name = "t5_caption"
    modalities = default_for = ("t5_caption",)
    requires = ("caption",)
    learned = True
    options_class = T5CaptionOptions
    options: T5CaptionOptions
    checkpoint_is_dir = True
    checkpoint_format = _FOLDER
    profiles = {PROFILE_4M21: Profile(
        reference="T5-XXL's encoder on the caption: up to 77 states of width 4096 with their valid mask (ml-4m's "
                  "t5_caption; ml-4m names no checkpoint, google/t5-v1_1-xxl is the T5-XXL encoder release)")}

    @property
    def tokenizer(self) -> Any:
        return self.transform

    # -- building ------------------------------------------------------------------------------------------

    def _dtype(self) -> Any:
        import torch

        if self.options.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return getattr(torch, self.options.dtype)

    def _check_config(self, source: str, **kwargs: Any) -> None:
        """WeightsError unless ``source`` holds a T5 config with a 4096-wide encoder (checked before any weights
        are read)."""
        transformers = require(*_TRANSFORMERS)
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
            raise WeightsError(f"t5_caption: {source} has no config.json, so it is no T5 checkpoint: pass a T5 "
                               f"{_FOLDER}, like {HUB_ID}'s, or --weights tiny")
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        if config.model_type != "t5":
            raise WeightsError(f"t5_caption: {source} is a {config.model_type!r} checkpoint, not a T5 one: pass a T5 "
                               f"{_FOLDER} (config.json model_type \"t5\"), like {HUB_ID}'s")
        if config.d_model != WIDTH:
            raise WeightsError(f"t5_caption: {source} is a T5 with d_model {config.d_model}; t5_caption stores "
                               f"{WIDTH}-wide vectors (T5-XXL, as 4M-21): use a T5 with d_model {WIDTH}, e.g. {HUB_ID}")

    def _from_pretrained(self, source: str, **kwargs: Any) -> tuple[Any, Callable]:
        transformers = require(*_TRANSFORMERS)
        self._check_config(source, **kwargs)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as e:
            if importlib.util.find_spec("sentencepiece") is not None:
                raise
            raise WeightsError(f"t5_caption: cannot load the tokenizer of {source} ({short_error(e)}); T5 checkpoints "
                               f"that ship only spiece.model (like {HUB_ID}) need sentencepiece: pip install "
                               f"sentencepiece") from e
        model = transformers.T5EncoderModel.from_pretrained(source, torch_dtype=self._dtype(), **kwargs)
        return model, tokenizer

    def build_pretrained(self) -> tuple[Any, Callable]:
        return self._from_pretrained(self.options.hub_id)

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        return self._from_pretrained(path, local_files_only=True)

    def build_tiny(self) -> tuple[Any, Callable]:
        transformers = require(*_TRANSFORMERS)
        tokenizer = tiny_tokenizer()
        config = transformers.T5Config(vocab_size=len(tokenizer), **TINY_CONFIG)
        return transformers.T5EncoderModel(config).to(self._dtype()), tokenizer

    # -- labeling ------------------------------------------------------------------------------------------

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        import torch

        out: list[dict[str, Any] | SampleError | None] = [None] * len(samples)
        rows, texts = [], []
        for i, sample in enumerate(samples):
            caption = sample.inputs.get("caption")
            if caption is None:
                out[i] = SampleError("missing_input", "t5_caption embeds the caption label; this sample has none")
            elif not isinstance(caption, str) or not caption.strip():
                out[i] = SampleError("empty_caption", "the caption is empty: there is nothing to embed")
            else:
                rows.append(i)
                texts.append(caption)
        if not rows:
            return out  # type: ignore[return-value]
        enc = self.tokenizer(texts, max_length=self.options.max_length, truncation=True, padding="longest",
                             return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(input_ids=enc["input_ids"].to(self.torch_device),
                                attention_mask=enc["attention_mask"].to(self.torch_device)).last_hidden_state
        hidden = hidden.float().cpu().numpy()  # (B, T, 4096)
        valid = enc["attention_mask"].numpy().astype(bool)  # (B, T)
        for j, i in enumerate(rows):
            out[i] = self._label_one(hidden[j][valid[j]])
        return out  # type: ignore[return-value]

    @staticmethod
    def _label_one(vectors: np.ndarray) -> dict[str, Any] | SampleError:
        """(n, 4096) float32 states of one caption's tokens -> its result: the npz label, zero-padded to the
        registry's length."""
        n = len(vectors)
        if n == 0:
            return SampleError("empty_caption", "the caption has no tokens: there is nothing to embed")
        emb = np.zeros((1, MAX_LENGTH, WIDTH), dtype=np.float16)
        emb[0, :n] = vectors
        if not np.isfinite(emb).all():
            return SampleError("teacher_error", "t5_caption: encoder states that are not finite in float16")
        mask = np.zeros((1, MAX_LENGTH), dtype=bool)
        mask[0, :n] = True
        return {"t5_caption": {"emb": emb, "mask_valid": mask}}


__all__ = ["HUB_ID", "T5CaptionLabeler", "T5CaptionOptions", "tiny_tokenizer"]

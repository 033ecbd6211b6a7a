"""What a train config builds before the model: the modality specs (with the text tokenizer and the
trained tokenizers' vocabularies), the masking config, and the checks a launcher runs before it starts
workers (:func:`check_config`). Used by :mod:`omniforge.model.train` and the Ray launcher."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from omniforge.errors import ConfigError
from omniforge.model.data import committed_shards
from omniforge.model.masking import MaskingConfig
from omniforge.model.specs import ModalitySpec, label_source, pixel_source, raw_sequence_info, specs_for

if TYPE_CHECKING:
    from omniforge.model.train_config import TrainConfig

TEXT_TOKENIZER = "text/tokenizer.json"  # inside --tokenizers DIR (omniforge.tokenize.kinds.text_artifact)


def _text_tokenizer(cfg: TrainConfig, sequence_folders: list[str]):
    if not sequence_folders:
        return None
    if cfg.tokenizers is None:
        raise ConfigError(f"{', '.join(sequence_folders)} are text sequences: pass --tokenizers DIR (the directory "
                          f"holding {TEXT_TOKENIZER}, as for `omniforge tokenize`)")
    from omniforge.tokenize.store import TokenizerStore

    return TokenizerStore(cfg.tokenizers).text()


def _is_sequence(folder: str) -> bool:
    from omniforge.modalities import by_token_folder
    from omniforge.model.specs import raw_sequence_info

    info = by_token_folder(folder)
    return (info is not None and info.crop == "sequence") or raw_sequence_info(folder) is not None


def build_specs(cfg: TrainConfig) -> tuple[dict[str, ModalitySpec], Any]:
    """The modality specs of ``cfg.modalities`` and the text tokenizer (None without sequence folders)."""
    try:
        sequences = [f for f in cfg.modalities if _is_sequence(f)]
        tok = _text_tokenizer(cfg, sequences)
        specs = specs_for(list(cfg.modalities), tok.vocab_size if tok is not None else 1)
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    return _tokenizer_vocabularies(cfg, specs), tok


def _tokenizer_vocabularies(cfg: TrainConfig, specs: dict[str, ModalitySpec]) -> dict[str, ModalitySpec]:
    """Image and global heads sized by the trained tokenizers' codebooks when --tokenizers has them (a tiny
    tokenizer's 128 codes, not the registry's 8192), so that sampling can only produce decodable ids."""
    if not cfg.tokenizers:
        return specs
    from dataclasses import replace

    from omniforge.modalities import by_token_folder
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    store = TokenizerStore(cfg.tokenizers)
    out = dict(specs)
    for folder, spec in specs.items():
        if spec.kind == "sequence" or spec.raw:
            continue
        codebook = store.codebook_size(kind_for(by_token_folder(folder)))
        if codebook is not None:
            out[folder] = replace(spec, vocab_size=codebook)
    return out


def _check_shards(cfg: TrainConfig) -> None:
    # A folder must exist somewhere; a root without it gives samples with that modality masked.
    missing = [f for f in cfg.modalities if not any(committed_shards(root, f) for root in cfg.roots)]
    raw = [f for f in missing if raw_sequence_info(f) is not None]
    if raw:
        raise ConfigError(f"{', '.join(raw)} {'are raw label folders' if len(raw) > 1 else 'is a raw label folder'}"
                          f" read with the root's rgb labels and crop_settings, and {', '.join(cfg.roots)} has no "
                          f"shard with all three: label {', '.join(raw)} and tokenize (any modality) first")
    pixels = [f for f in missing if pixel_source(f)]
    if pixels:
        raise ConfigError(f"{', '.join(pixels)} crops the {pixel_source(pixels[0])} labels (in the token root, or in "
                          "the label root its tokenize run read) with the root's crop_settings, and "
                          f"{', '.join(cfg.roots)} has no shard with both: tokenize the labels with crops first, "
                          f"or drop {', '.join(pixels)}")
    embeddings = [f for f in missing if label_source(f) and not pixel_source(f) and raw_sequence_info(f) is None]
    if embeddings:
        raise ConfigError(f"no {', '.join(embeddings)} label shards under {', '.join(cfg.roots)} (nor in the label "
                          f"root a tokenize run there read): run `omniforge label --modalities "
                          f"{','.join(embeddings)}` on the corpus first")
    if missing:
        raise ConfigError(f"no token shards for {', '.join(missing)} under {', '.join(cfg.roots)}: "
                          f"run `omniforge tokenize` for them first")
    if cfg.eval_data is not None and not any(committed_shards(cfg.eval_data, f) for f in cfg.modalities):
        raise ConfigError(f"--eval-data {cfg.eval_data} has no token shards of {', '.join(cfg.modalities)}: "
                          "tokenize the held-out images into it first")


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError for what would stop a run at its start (shards, tokenizers, masking), without
    building the model: launchers call it before they start workers."""
    _check_shards(cfg)
    specs, _ = build_specs(cfg)
    build_masking(cfg)
    if cfg.init_from is not None:
        from omniforge.model.checkpoint import latest_checkpoint
        from omniforge.model.init_from import plan_init

        plan_init(cfg.init_from, specs, resume_from=latest_checkpoint(cfg.out))


def build_masking(cfg: TrainConfig) -> MaskingConfig:
    if cfg.masking is None:
        return MaskingConfig.uniform(list(cfg.modalities), input_tokens=cfg.input_tokens,
                                     target_tokens=cfg.target_tokens)
    if not os.path.exists(cfg.masking):
        raise ConfigError(f"masking config {cfg.masking} not found: pass a YAML file to --masking")
    m = MaskingConfig.from_yaml(cfg.masking)
    m.input_tokens, m.target_tokens = cfg.input_tokens, cfg.target_tokens
    return m

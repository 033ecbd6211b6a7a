"""The tokenizer half of `omniforge export-4m`: a run's tokenizers in ml-4m's hub layout.

Every tokenizer folder a model's modalities need (`TokenizerKind.artifacts`, found in the run's `--tokenizers`
directory) is written under the same name, so `OUT/tokenizers` is itself a `--tokenizers` folder and each
model folder in it is what ml-4m's `VQVAE.from_pretrained` reads (`config.json` + `model.safetensors`):

- "imported": a snapshot of one of Apple's tokenizers (`omniforge tokenizer import-4m`) is copied unchanged;
- "converted": omniforge's own Memcodes MLP tokenizer (`MemcodesTokenizer`) is rewritten as ml-4m's VQVAE with
  BottleneckMLP encoder and decoder and the Memcodes quantizer, by the explicit key map `MEMCODES_KEY_MAP`. The
  arithmetic is the same: ml-4m's BottleneckMLP (linear in, pre-norm residual GELU blocks with torch's default
  LayerNorm eps, linear out), its head-major Memcodes (per-head codes, bias-free key / value projections,
  queries scaled by the head width ** -0.5, argmax ids, value rows out). ml-4m puts a 1 x 1 conv between the MLP
  and the quantizer (`quant_proj`, `post_quant_proj`) where omniforge's MLP maps to the latent directly: the
  export moves omniforge's output (input) linear there and gives ml-4m's MLP an identity output (input) linear,
  which multiplies by exactly 1 and adds exactly 0;
- "trained-in-ml4m-architecture": a ViT VQ-VAE that `omniforge tokenizer train --architecture ml4m` saved in
  ml-4m's hub layout (`ml4m_train`) is copied unchanged, like an imported one;
- "copied": the WordPiece vocabulary (`text/tokenizer.json`) every sequence modality shares.

omniforge's own ViT VQ-VAEs (`VQViTTokenizer`: pixels, segmentation, features, SAM masks) are refused, with
`VQVIT_DIFFERENCE`: ml-4m's ViTEncoder / ViTDecoder has no LayerNorm after its last block, where omniforge's
`ViTStack` ends in one (a normalisation no weight of ml-4m's can reproduce), and its LayerNorms use eps 1e-6
where timm's Block uses torch's 1e-5; its position table at another grid is the stored one resized bicubically
where omniforge recomputes the sin-cos table. Such a modality exports with a tokenizer trained in ml-4m's
architecture (`omniforge tokenizer train --architecture ml4m`) or Apple's tokenizer for it, and the model trained
on those tokens.

`plan` checks everything and converts in memory; `write` writes only after every folder could be planned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omniforge.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

    from omniforge.modalities import ModalityInfo
    from omniforge.tokenize.models import MemcodesTokenizer

SOURCES = ("imported", "converted", "trained-in-ml4m-architecture", "copied")
ML4M_FILES = ("config.json", "model.safetensors")

VQVIT_DIFFERENCE = ("ml-4m's ViT tokenizers have no LayerNorm after the last transformer block (omniforge's ViT "
                    "stacks end in one) and use LayerNorm eps 1e-6 (omniforge's timm blocks: 1e-5)")

# omniforge MemcodesTokenizer state-dict names -> ml-4m VQVAE's (first match wins; every name must match one).
# The "identity" names are ml-4m's linears that omniforge's MLP does not have (see the module docstring).
MEMCODES_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^(encoder|decoder)\.norms\.(\d+)\.(weight|bias)$", r"\1.layernorms.\2.\3"),
    (r"^(encoder|decoder)\.blocks\.(\d+)\.(\d+)\.(weight|bias)$", r"\1.blocks.\2.block.\3.\4"),
    (r"^encoder\.linear_in\.(weight|bias)$", r"encoder.linear_in.\1"),
    (r"^encoder\.linear_out\.(weight|bias)$", r"quant_proj.\1"),  # (H * L, dim) -> a 1 x 1 conv
    (r"^decoder\.linear_in\.(weight|bias)$", r"post_quant_proj.\1"),  # (dim, H * L) -> a 1 x 1 conv
    (r"^decoder\.linear_out\.(weight|bias)$", r"decoder.linear_out.\1"),
    (r"^quantizer\.codes$", "quantize.codes"),  # (H, K, L)
    (r"^quantizer\.to_([kv])$", r"quantize.to_\1.weight"),  # (H, L, L), EinMix 'h d c'
)
MEMCODES_IDENTITY = ("encoder.linear_out", "decoder.linear_in")  # ml-4m's, set to the identity of the MLP width


@dataclass(frozen=True)
class TokenizerExport:
    """One tokenizer folder to write under OUT/tokenizers: copied files, or a converted config and state dict."""

    folder: str
    source: str  # one of SOURCES
    line: str  # what it is, as printed
    modalities: tuple[str, ...] = ()  # the registry modalities it tokenizes
    codebook_size: int | None = None  # token ids it makes lie in [0, codebook_size) (None: the text vocabulary)
    loader: str = ""  # what reads it on ml-4m's side
    copies: tuple[tuple[str, str], ...] = ()  # (file name, local path to copy)
    config: dict[str, Any] | None = None  # converted: ml-4m's config.json
    tensors: dict[str, Tensor] = field(default_factory=dict)  # converted: ml-4m's state dict


def _map_name(name: str) -> str:
    for pattern, repl in MEMCODES_KEY_MAP:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise ConfigError(f"MemcodesTokenizer weight {name!r} has no ml-4m name (MEMCODES_KEY_MAP)")


def memcodes_to_ml4m(model: MemcodesTokenizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ml-4m's config.json and state dict of an omniforge Memcodes MLP tokenizer (same ids and reconstructions
    in ml-4m's VQVAE, see the module docstring)."""
    import torch

    c = model.config
    mlp = f"BottleneckMLP/B_{c.depth}-Wi_{c.dim}"
    config = {"image_size": 224, "n_channels": c.in_channels, "enc_type": mlp, "dec_type": mlp,
              "quant_type": "memcodes", "codebook_size": c.codebook_size, "num_codebooks": c.num_tokens,
              "latent_dim": c.num_tokens * c.latent_dim}
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if name in ("encoder.linear_out.weight", "decoder.linear_in.weight"):
            value = value[:, :, None, None]  # a Linear's (out, in) as a 1 x 1 conv's (out, in, 1, 1)
        tensors[_map_name(name)] = value.contiguous()
    for name in MEMCODES_IDENTITY:
        tensors[f"{name}.weight"] = torch.eye(c.dim)
        tensors[f"{name}.bias"] = torch.zeros(c.dim)
    return config, tensors


def _describe_ml4m(config: Any) -> str:
    return (f"{config.family}, {config.enc_type} -> {config.dec_type or 'no decoder'}, {config.codebook_size} codes, "
            f"decoder {config.decoder_line}")


def _loader(config: Any) -> str:
    """The ml-4m class method that reads a snapshot of this config."""
    if config.decoder == "diffusion":
        return "VQ.from_pretrained (tokens; DiVAE / VQControlNet.from_pretrained to decode)"
    return "VQ.from_pretrained" if config.decoder == "none" else "VQVAE.from_pretrained"


def _plan_one(store: Any, artifact: Any, kind: Any, infos: list[ModalityInfo]) -> TokenizerExport:
    """One folder: `kind` is the kind whose own tokenizer it is (None for the shared vocabulary)."""
    from omniforge.tokenize import ml4m
    from omniforge.tokenize.ml4m_train import is_trained_here
    from omniforge.tokenize.models import MemcodesTokenizer, VQViTTokenizer
    from omniforge.tokenize.store import _local

    folder = artifact.folder
    users = tuple(i.name for i in infos)
    names = ", ".join(users)
    if kind is None:
        (uri,) = store.require(artifact)
        return TokenizerExport(folder, "copied", f"WordPiece vocabulary of {names}", users, None,
                               "tokenizers.Tokenizer.from_file", copies=(("tokenizer.json", _local(uri)),))
    model = store.model(kind)  # loads and checks it against the modality (a clear error when it is missing)
    where = store.path(folder)
    if ml4m.is_ml4m_model(model):
        local = _local(where)
        copies = tuple((f, os.path.join(local, f)) for f in ML4M_FILES)
        source = "trained-in-ml4m-architecture" if is_trained_here(local) else "imported"
        return TokenizerExport(folder, source, f"{_describe_ml4m(model.config)} ({names})", users,
                               model.config.codebook_size, _loader(model.config), copies=copies)
    if isinstance(model, MemcodesTokenizer):
        bad = next((i for i in infos if i.ml4m_transform not in ("global", "pose")), None)
        if bad is not None:
            raise ConfigError(f"{where}: modality {bad.name!r} declares no ml-4m preprocessing of global vectors "
                              f"or poses (ModalityInfo.ml4m_transform={bad.ml4m_transform!r}, not 'global' or "
                              "'pose'): its tokenizer cannot be exported as ml-4m's; export with --model-only")
        config, tensors = memcodes_to_ml4m(model)
        c = model.config
        line = (f"Memcodes MLP, {config['enc_type']} -> {config['dec_type']}, {c.num_tokens} tokens of "
                f"{c.codebook_size} codes ({names})")
        return TokenizerExport(folder, "converted", line, users, c.codebook_size, "VQVAE.from_pretrained",
                               config=config, tensors=tensors)
    if not isinstance(model, VQViTTokenizer):
        raise ConfigError(f"{where}: its tokenizer ({type(model).__name__}) has no ml-4m form: tokenize {names} with "
                          "an ml-4m tokenizer snapshot and train on those tokens, or export with --model-only")
    repo = next((i.ml4m_tokenizer for i in infos if i.ml4m_tokenizer), None)
    apple = f"Apple's (`omniforge tokenizer import-4m {repo} --out DIR`)" if repo else "an ml-4m snapshot"
    fix = (f"train it with `omniforge tokenizer train --architecture ml4m` or use {apple}, then tokenize {names} "
           "and train on those tokens")
    raise ConfigError(f"{where}: omniforge's own ViT VQ-VAE cannot be written as ml-4m's VQVAE ({VQVIT_DIFFERENCE}): "
                      f"{fix}, or export with --model-only")


def plan(directory: str, infos: Iterable[ModalityInfo]) -> list[TokenizerExport]:
    """What exporting the tokenizers of `infos` (the model's tokenized modalities) from the `--tokenizers`
    `directory` writes, one TokenizerExport per folder; ConfigError (one line: the folder, what differs, what to
    do) for the first that cannot be written. Nothing is written."""
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore

    store = TokenizerStore(directory)
    folders: dict[str, tuple[Any, Any, list[ModalityInfo]]] = {}  # folder -> (artifact, its kind or None, users)
    for info in infos:
        kind = kind_for(info)
        for artifact in kind.artifacts:
            own = kind if artifact.folder == kind.artifact.folder and kind.model_kind is not None else None
            _, _, users = folders.setdefault(artifact.folder, (artifact, own, []))
            if info.name not in [u.name for u in users]:
                users.append(info)
    return [_plan_one(store, artifact, kind, users) for artifact, kind, users in folders.values()]


def write(plans: list[TokenizerExport], out: str) -> None:
    """Write planned tokenizer folders under `out` (each `out/<folder>/`)."""
    from safetensors.torch import save_file

    for p in plans:
        dest = os.path.join(out, p.folder)
        os.makedirs(dest, exist_ok=True)
        for name, src in p.copies:
            shutil.copyfile(src, os.path.join(dest, name))
        if p.config is not None:
            save_file(p.tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(dest, "config.json"), "w", encoding="utf-8") as f:
                json.dump(p.config, f, indent=2)


__all__ = ["MEMCODES_IDENTITY", "MEMCODES_KEY_MAP", "ML4M_FILES", "SOURCES", "TokenizerExport", "VQVIT_DIFFERENCE",
           "memcodes_to_ml4m", "plan", "write"]

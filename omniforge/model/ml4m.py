"""Released 4M / 4M-21 checkpoints (ml-4m's hub layout) in omniforge's :class:`~omniforge.model.fm.FourM`.

A released checkpoint is a folder holding what ml-4m's ``FM.save_pretrained`` writes (EPFL-VILAB/4M-21_B, _L,
_XL on the hub): ``config.json`` (``domains_in``, ``domains_out`` and the ``FM`` arguments) and
``model.safetensors``. :func:`read_released` parses the config into a :class:`ModelConfig` in the released
layout (``RELEASED_LAYOUT``, see :mod:`omniforge.model.fm`) and ml-4m's domain names into omniforge folders
(the same names: ``tok_rgb@224``, ``rgb@224``, ``t5_caption`` and the raw sequence folders ``caption``, ``det``
...), takes each modality's vocabulary from the weights and its role from the domains (only in ``domains_in``:
input; only in ``domains_out``: target), and maps every key of the weights to omniforge's by
:func:`key_map`. :func:`load_released` builds the model; :func:`export_released` is the inverse map, writing an
omniforge model in the released layout as the folder ``FM.from_pretrained`` reads. :func:`export_4m`
(``omniforge export-4m``) writes a run's model so and its tokenizers under ``OUT/tokenizers/``
(:mod:`omniforge.tokenize.export4m`), everything checked before anything is written.

What the key map does with each of ml-4m's keys (every key of the file is one of these, or the load fails):

- ``copy``: the same tensor under omniforge's name (a SwiGLU's ``fc1``/``fc3``/``fc2`` are omniforge's
  ``gate``/``fc1``/``fc2``), reshaped from ml-4m's (1, 1, D) modality embeddings and mask token and (1, L, D)
  learned positions;
- ``sincos``: a fixed sin-cos position buffer, checked equal to omniforge's table and not stored;
- ``zero``: the all-zero bias buffer of ml-4m's no-bias LayerNorm, checked zero and not stored;
- ``unused``: an image or global modality's decoder ``token_emb``, which ml-4m's FM never reads (its decoder
  queries are mask tokens); not stored, and written as zeros by the export.

Known difference: ml-4m's decoder gives a sequence target at rank >= the modality's ``max_length`` position 0;
omniforge caps at the registry's ``num_tokens``, which is the same number for every released sequence but
human_poses (ml-4m: max_length 263, max_tokens 275: 7 people of 39 tokens and [EOS]). omniforge keeps 275: a
released checkpoint's human_poses loads unchanged (ml-4m stores every sequence's sin-cos table at 512 rows) and
gives ml-4m's logits for every pose target but the tokens predicted from rank 263 on, the last tokens of a 7th
person (6 people and [EOS] are 235 tokens; tests/model/test_ml4m_fm.py checks both on ml-4m's own outputs).

With ``share_modality_embeddings`` (4M-7's default) the encoder and decoder of a modality share one modality
embedding, which ``save_pretrained`` writes once, under the decoder's name: the encoder's key is then optional.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from omniforge.errors import ConfigError, WeightsError
from omniforge.model._layers import sincos_1d, sincos_2d
from omniforge.model.fm import RELEASED_LAYOUT, FourM, ModelConfig
from omniforge.model.specs import ModalitySpec, specs_for

HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"
IMAGE_SIZE = 224  # ml-4m's image_size: the global modalities' 4 x 4 grid of 56-pixel "patches"
PATCH_SIZE = 16
_ACTIVATIONS = {("SiLU", True): True, ("GELU", False): False}  # (act_layer, gated_mlp) -> swiglu


@dataclass(frozen=True)
class Released:
    """A released checkpoint's configuration, as omniforge builds it."""

    path: str
    config: ModelConfig
    specs: dict[str, ModalitySpec]  # omniforge folder -> spec, vocabulary from the weights, role from the domains
    names: dict[str, str]  # omniforge folder -> ml-4m domain name
    domains_in: tuple[str, ...]  # omniforge folders the encoder embeds
    domains_out: tuple[str, ...]  # omniforge folders the decoder predicts


class Entry(NamedTuple):
    """Where one ml-4m key goes: ``omni`` (None for sincos / zero / unused) and the ``rule`` (module docstring)."""

    omni: str | None
    rule: str  # copy | sincos | zero | unused
    optional: bool = False  # may be absent from the file (a shared modality embedding's encoder copy)


def is_released(path: str) -> bool:
    """True when ``path`` is a folder in the hub layout with an ml-4m FM config (``domains_in``)."""
    config = os.path.join(path, HUB_CONFIG)
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(path, HUB_WEIGHTS))):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return "domains_in" in json.load(f)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# The config


def _flag(data: dict[str, Any], name: str, default: Any) -> Any:
    return data.get(name, default)


def _refuse(path: str, name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{path}: ml-4m config field {name}={value!r} is not supported: {why}")


def parse_config(data: dict[str, Any], path: str = HUB_CONFIG) -> tuple[ModelConfig, list[str], list[str]]:
    """ml-4m's FM config (config.json) -> (ModelConfig in the released layout, domains_in, domains_out).

    A field omniforge does not know, or supports only at other values, is a ConfigError naming it."""
    known = {"domains_in", "domains_out", "image_size", "patch_size", "dim", "encoder_depth", "decoder_depth",
             "num_heads", "mlp_ratio", "qkv_bias", "proj_bias", "mlp_bias", "norm_bias", "act_layer", "gated_mlp",
             "qk_norm", "decoder_causal_mask", "decoder_sep_mask", "num_register_tokens", "use_act_checkpoint",
             "share_modality_embeddings", "drop_path_rate_encoder", "drop_path_rate_decoder", "shared_drop_path"}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an ml-4m FM config is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: ml-4m config field {unknown[0]!r} is unknown to omniforge's loader "
                          f"(it reads {', '.join(sorted(known))})")
    for name in ("domains_in", "domains_out", "image_size", "patch_size", "norm_bias", "act_layer"):
        if name not in data:
            raise ConfigError(f"{path}: ml-4m config field {name!r} is missing (FM needs it)")
    for name in ("domains_in", "domains_out"):
        if not isinstance(data[name], list) or not all(isinstance(d, str) for d in data[name]) or not data[name]:
            raise ConfigError(f"{path}: ml-4m config field {name}={data[name]!r}: must be a list of domain names")
    if data["image_size"] != IMAGE_SIZE:
        raise _refuse(path, "image_size", data["image_size"], f"omniforge's global folders hold 16 tokens "
                      f"(image_size {IMAGE_SIZE})")
    if data["patch_size"] != PATCH_SIZE:
        raise _refuse(path, "patch_size", data["patch_size"], f"omniforge supports {PATCH_SIZE}")
    biases = {name: _flag(data, name, True) for name in ("qkv_bias", "proj_bias", "mlp_bias")}
    biases["norm_bias"] = data["norm_bias"]
    for name, value in biases.items():
        if value != biases["norm_bias"] or not isinstance(value, bool):
            raise _refuse(path, name, value, "omniforge has one bias switch: qkv_bias, proj_bias, mlp_bias and "
                          f"norm_bias must be equal (norm_bias={biases['norm_bias']!r})")
    act, gated = data["act_layer"], _flag(data, "gated_mlp", False)
    if (act, gated) not in _ACTIVATIONS:
        raise _refuse(path, "act_layer", act, f"with gated_mlp={gated!r}; omniforge supports SiLU gated (SwiGLU) "
                      "and GELU ungated")
    fixed = {"qk_norm": (False, "omniforge has no QK-norm"),
             "decoder_causal_mask": (False, "omniforge's decoder is causal only within a sequence"),
             "decoder_sep_mask": (True, "omniforge's decoder attends within each modality"),
             "num_register_tokens": (0, "omniforge has no register tokens"),
             "drop_path_rate_encoder": (0.0, "omniforge has no stochastic depth"),
             "drop_path_rate_decoder": (0.0, "omniforge has no stochastic depth")}
    for name, (value, why) in fixed.items():
        if name in data and data[name] != value:
            raise _refuse(path, name, data[name], why)
    for name in ("use_act_checkpoint", "shared_drop_path", "share_modality_embeddings"):  # no effect on the network
        if name in data and not isinstance(data[name], bool):
            raise ConfigError(f"{path}: ml-4m config field {name}={data[name]!r}: must be true or false")
    try:
        config = ModelConfig(dim=data.get("dim", 768), encoder_depth=data.get("encoder_depth", 12),
                             decoder_depth=data.get("decoder_depth", 12), heads=data.get("num_heads", 12),
                             mlp_ratio=float(data.get("mlp_ratio", 4.0)), swiglu=_ACTIVATIONS[(act, gated)],
                             bias=biases["norm_bias"],
                             separate_modality_embeddings=not data.get("share_modality_embeddings", True),
                             **RELEASED_LAYOUT)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return config, list(data["domains_in"]), list(data["domains_out"])


def folder_for(name: str) -> str:
    """The omniforge folder of an ml-4m domain name (ConfigError when the registry has none)."""
    try:
        specs_for([name], 1)
    except KeyError:
        raise ConfigError(f"ml-4m modality {name!r} has no omniforge folder (no registry modality has it as its token, "
                          "pixel, embedding or raw sequence folder)") from None
    return name


def registry_info(folder: str):
    """The registry modality a folder belongs to (a token, pixel, embedding or raw sequence folder), or None."""
    from omniforge.modalities import by_embedding_folder, by_pixel_folder, by_token_folder
    from omniforge.model.specs import raw_sequence_info

    return by_pixel_folder(folder) or by_embedding_folder(folder) or by_token_folder(folder) or \
        raw_sequence_info(folder)


def not_ml4m(folder: str) -> str | None:
    """Why a folder's content is not ml-4m's modality of the same name (the registry's ``ml4m == "none"``, e.g.
    a plugin's modality that only shares ml-4m's name), or None when it is ml-4m's."""
    info = registry_info(folder)
    return info.ml4m_note if info is not None and info.ml4m == "none" else None


def ml4m_name(folder: str, spec: ModalitySpec) -> str:
    """ml-4m's domain name of an omniforge folder: the folder itself, but a sequence's registry modality name for a
    token folder (tok_caption -> caption)."""
    from omniforge.modalities import by_token_folder

    info = by_token_folder(folder)
    if spec.kind == "sequence" and info is not None:
        return info.name
    return folder


# --------------------------------------------------------------------------------------------------
# The key map


def _linear(out: dict[str, Entry], ml: str, om: str, bias: bool) -> None:
    out[f"{ml}.weight"] = Entry(f"{om}.weight", "copy")
    if bias:
        out[f"{ml}.bias"] = Entry(f"{om}.bias", "copy")


def _norm(out: dict[str, Entry], ml: str, om: str, bias: bool) -> None:
    out[f"{ml}.weight"] = Entry(f"{om}.weight", "copy")
    out[f"{ml}.bias"] = Entry(f"{om}.bias", "copy") if bias else Entry(None, "zero")


def _mlp(out: dict[str, Entry], ml: str, om: str, config: ModelConfig) -> None:
    pairs = (("fc1", "gate"), ("fc3", "fc1"), ("fc2", "fc2")) if config.swiglu else (("fc1", "fc1"), ("fc2", "fc2"))
    for a, b in pairs:
        _linear(out, f"{ml}.{a}", f"{om}.{b}", config.bias)


def _transformer_keys(config: ModelConfig) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    bias = config.bias
    for i in range(config.encoder_depth):
        p = f"encoder.{i}"
        _norm(out, f"{p}.norm1", f"{p}.norm1", bias)
        _linear(out, f"{p}.attn.qkv", f"{p}.attn.qkv", bias)
        _linear(out, f"{p}.attn.proj", f"{p}.attn.proj", bias)
        _norm(out, f"{p}.norm2", f"{p}.norm2", bias)
        _mlp(out, f"{p}.mlp", f"{p}.mlp", config)
    for i in range(config.decoder_depth):
        p = f"decoder.{i}"
        for norm in ("norm1", "query_norm", "context_norm", "norm2"):
            _norm(out, f"{p}.{norm}", f"{p}.{norm}", bias)
        for lin in ("self_attn.qkv", "self_attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj"):
            _linear(out, f"{p}.{lin}", f"{p}.{lin}", bias)
        _mlp(out, f"{p}.mlp", f"{p}.mlp", config)
    _norm(out, "encoder_norm", "encoder_norm", bias)
    _norm(out, "decoder_norm", "decoder_norm", bias)
    _linear(out, "decoder_proj_context", "context_proj", config.bias_of("context"))
    out["mask_token"] = Entry("mask_token", "copy")
    return out


def _learned(config: ModelConfig, spec: ModalitySpec) -> bool:
    return spec.kind == "global" and config.learned_global_positions


def key_map(config: ModelConfig, specs: dict[str, ModalitySpec], names: dict[str, str],
            domains_in: tuple[str, ...], domains_out: tuple[str, ...]) -> dict[str, Entry]:
    """Every key of ml-4m's FM state dict for this configuration -> where it goes in omniforge's FourM."""
    out = _transformer_keys(config)
    for folder in domains_in:
        spec, p = specs[folder], f"encoder_embeddings.{names[folder]}"
        if spec.kind == "pixels":
            _linear(out, f"{p}.proj", f"encoder_tokens.{folder}.proj", config.bias_of("patch"))
        elif spec.kind == "embedding":
            _linear(out, f"{p}.emb_proj", f"encoder_tokens.{folder}.proj", config.bias_of("vector"))
        else:
            out[f"{p}.token_emb.weight"] = Entry(f"encoder_tokens.{folder}.weight", "copy")
        shared = not config.separate_modality_embeddings and folder in domains_out
        out[f"{p}.mod_emb"] = Entry(f"modality_embeddings.{folder}", "copy", optional=shared)
        out[f"{p}.pos_emb"] = (Entry(f"encoder_positions.{folder}", "copy") if _learned(config, spec)
                               else Entry(None, "sincos"))
    for folder in domains_out:
        spec, p = specs[folder], f"decoder_embeddings.{names[folder]}"
        out[f"{p}.to_logits.weight"] = Entry(f"heads.{folder}.weight", "copy")
        out[f"{p}.token_emb.weight"] = (Entry(f"decoder_tokens.{folder}.weight", "copy") if spec.kind == "sequence"
                                        else Entry(None, "unused"))
        table = "decoder_modality_embeddings" if config.separate_modality_embeddings else "modality_embeddings"
        out[f"{p}.mod_emb"] = Entry(f"{table}.{folder}", "copy")
        out[f"{p}.pos_emb"] = (Entry(f"decoder_positions.{folder}", "copy") if _learned(config, spec)
                               else Entry(None, "sincos"))
    return out


def _sincos(spec: ModalitySpec, dim: int, rows: int) -> torch.Tensor:
    """omniforge's fixed table of a folder, (rows, D), as ml-4m builds it (its sequences' tables hold 512 rows)."""
    if spec.kind in ("image", "pixels"):
        return sincos_2d(spec.grid, dim)
    return sincos_1d(rows, dim)


# --------------------------------------------------------------------------------------------------
# Reading


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: a released checkpoint folder holds {HUB_CONFIG} and {HUB_WEIGHTS} "
                           "(the hub layout of EPFL-VILAB/4M-21_*)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not JSON ({e})") from None


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, HUB_WEIGHTS)
    try:
        return load_file(file, device="cpu")
    except FileNotFoundError:
        raise WeightsError(f"{file} not found: a released checkpoint folder holds {HUB_CONFIG} and "
                           f"{HUB_WEIGHTS}") from None
    except (OSError, SafetensorError, ValueError) as e:
        raise WeightsError(f"{file} cannot be read ({e})") from None


def _shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the weights file, read from its header (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    file = os.path.join(path, HUB_WEIGHTS)
    if not os.path.isfile(file):
        raise WeightsError(f"{file} not found: a released checkpoint folder holds {HUB_CONFIG} and {HUB_WEIGHTS}")
    try:
        with safe_open(file, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError, ValueError) as e:
        raise WeightsError(f"{file} cannot be read ({e})") from None


def _vocab(weights: dict[str, tuple[int, ...]], name: str, path: str) -> int:
    sizes = {k: int(weights[k][0]) for k in (f"decoder_embeddings.{name}.to_logits.weight",
                                                     f"encoder_embeddings.{name}.token_emb.weight") if k in weights}
    if not sizes:
        raise WeightsError(f"{path}: {name} has neither decoder_embeddings.{name}.to_logits.weight nor "
                           f"encoder_embeddings.{name}.token_emb.weight in {HUB_WEIGHTS}")
    if len(set(sizes.values())) > 1:
        raise WeightsError(f"{path}: {name}'s token tables disagree on its vocabulary ({sizes})")
    return next(iter(sizes.values()))


def _spec(name: str, weights: dict[str, tuple[int, ...]], role: str, path: str) -> ModalitySpec:
    spec = specs_for([folder_for(name)], 1)[name]
    if spec.kind in ("pixels", "embedding"):
        if role != "input":
            raise ConfigError(f"{path}: {name} is in domains_out, but omniforge's {spec.kind} folders are input-only")
        return spec
    return replace(spec, vocab_size=_vocab(weights, name, path), role=role)


def _released(path: str, weights: dict[str, tuple[int, ...]]) -> Released:
    """The configuration, from config.json and the weights' shapes (``weights``: key -> shape)."""
    config, dom_in, dom_out = parse_config(_read_json(os.path.join(path, HUB_CONFIG)), os.path.join(path, HUB_CONFIG))
    specs: dict[str, ModalitySpec] = {}
    for name in dict.fromkeys([*dom_in, *dom_out]):
        role = "both" if name in dom_in and name in dom_out else "input" if name in dom_in else "target"
        specs[name] = _spec(name, weights, role, path)
    names = {f: f for f in specs}
    outs = tuple(f for f in dom_out if not specs[f].input_only)
    return Released(path, config, specs, names, tuple(dict.fromkeys(dom_in)), tuple(dict.fromkeys(outs)))


def read_released(path: str) -> Released:
    """The configuration of a released checkpoint folder (config.json, and the vocabularies in the weights'
    header: no tensor is read)."""
    return _released(path, _shapes(path))


def _check_positions(key: str, tensor: torch.Tensor, spec: ModalitySpec, dim: int) -> None:
    if tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[2] != dim:
        raise WeightsError(f"{key} has shape {tuple(tensor.shape)}, expected (1, L, {dim})")
    rows = tensor.shape[1]
    if spec.kind in ("image", "pixels", "global") and rows != spec.num_tokens:
        raise WeightsError(f"{key} holds {rows} positions; omniforge's {spec.name} has {spec.num_tokens} tokens")
    if spec.kind == "global":
        return
    expected = _sincos(spec, dim, rows)
    if not torch.allclose(tensor[0].float(), expected, atol=1e-4):
        raise WeightsError(f"{key} is not the fixed sin-cos table omniforge uses for {spec.name} (max difference "
                           f"{(tensor[0].float() - expected).abs().max().item():.3g})")


def model_shapes(config: ModelConfig, specs: dict[str, ModalitySpec]) -> dict[str, torch.Size]:
    """The state dict shapes of FourM(config, specs), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in FourM(config, specs).state_dict().items()}


def released_state(released: Released, weights: dict[str, torch.Tensor],
                   model_shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """ml-4m's weights under omniforge's names, by :func:`key_map`: every key of the file accounted for, every
    shape checked against ``model_shapes`` (a FourM's state dict shapes). WeightsError naming the key otherwise."""
    entries = key_map(released.config, released.specs, released.names, released.domains_in, released.domains_out)
    path = os.path.join(released.path, HUB_WEIGHTS)
    unexpected = sorted(set(weights) - set(entries))
    if unexpected:
        raise WeightsError(f"{path}: {len(unexpected)} key(s) outside the released layout omniforge maps, e.g. "
                           f"{unexpected[0]!r}")
    missing = sorted(k for k, e in entries.items() if k not in weights and not e.optional)
    if missing:
        raise WeightsError(f"{path}: {len(missing)} key(s) of the configured FM missing, e.g. {missing[0]!r}")
    by_ml = {names: folder for folder, names in released.names.items()}
    state: dict[str, torch.Tensor] = {}
    for key, entry in entries.items():
        if key not in weights:
            continue
        tensor = weights[key]
        if entry.rule == "sincos":
            _check_positions(key, tensor, released.specs[by_ml[key.split(".")[1]]], released.config.dim)
        elif entry.rule == "zero":
            if tensor.abs().max().item() != 0:
                raise WeightsError(f"{path}: {key} is a no-bias LayerNorm's bias buffer but is not zero")
        elif entry.rule == "copy":
            shape = model_shapes.get(entry.omni)
            if shape is None or tensor.numel() != math.prod(shape):
                raise WeightsError(f"{path}: {key} has shape {tuple(tensor.shape)}, but omniforge's {entry.omni} "
                                   f"needs {None if shape is None else tuple(shape)}")
            value = tensor.reshape(shape).float()
            if entry.omni in state and not torch.equal(state[entry.omni], value):
                raise WeightsError(f"{path}: {key} differs from the shared modality embedding already read")
            state[entry.omni] = value
    return state


class LoadedReleased(NamedTuple):
    model: FourM  # in eval mode
    released: Released
    fresh: list[str]  # omniforge parameters the checkpoint has no weights for (a target-only modality's encoder)


def load_released(path: str, *, device: str | torch.device = "cpu") -> LoadedReleased:
    """A released checkpoint as omniforge's FourM (eval mode) in the released layout."""
    released = read_released(path)
    weights = _weights(path)
    model = FourM(released.config, released.specs)
    state = released_state(released, weights, {k: v.shape for k, v in model.state_dict().items()})
    result = model.load_state_dict(state, strict=False)
    return LoadedReleased(model.to(device).eval(), released, sorted(result.missing_keys))


# --------------------------------------------------------------------------------------------------
# Writing


def released_problems(config: ModelConfig, specs: dict[str, ModalitySpec]) -> list[str]:
    """Why ml-4m's FM cannot express this model (empty when it can): one line per ModelConfig field."""
    problems = []
    for name, value in RELEASED_LAYOUT.items():
        if name == "learned_global_positions" and not any(s.kind == "global" for s in specs.values()):
            continue
        if name in ("patch_bias", "vector_bias", "context_bias"):
            if config.bias_of(name[:-5]) != value:
                problems.append(f"ModelConfig.{name}={getattr(config, name)!r} (bias={config.bias}): ml-4m's FM "
                                f"has {'a' if value else 'no'} {name[:-5]} bias")
            continue
        if getattr(config, name) != value:
            problems.append(f"ModelConfig.{name}={getattr(config, name)!r}: ml-4m's FM has {value!r}")
    if config.dropout:
        problems.append(f"ModelConfig.dropout={config.dropout!r}: the released FM config has no dropout (0.0)")
    return problems


def hub_config(config: ModelConfig, specs: dict[str, ModalitySpec], names: dict[str, str]) -> dict[str, Any]:
    """ml-4m's FM config.json of a model in the released layout."""
    act = "SiLU" if config.swiglu else "GELU"
    return {"domains_in": [names[f] for f, s in specs.items() if not s.target_only],
            "domains_out": [names[f] for f, s in specs.items() if not s.input_only],
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "dim": config.dim,
            "encoder_depth": config.encoder_depth, "decoder_depth": config.decoder_depth, "num_heads": config.heads,
            "mlp_ratio": config.mlp_ratio, "qkv_bias": config.bias, "proj_bias": config.bias,
            "mlp_bias": config.bias, "norm_bias": config.bias, "act_layer": act, "gated_mlp": config.swiglu,
            "qk_norm": False, "decoder_causal_mask": False, "decoder_sep_mask": True, "num_register_tokens": 0,
            "use_act_checkpoint": False, "share_modality_embeddings": not config.separate_modality_embeddings}


def export_released(model: FourM, out: str) -> dict[str, Any]:
    """Write ``model`` (in the released layout) as ml-4m's hub layout in ``out``: config.json and
    model.safetensors, the inverse of :func:`released_state`. ConfigError naming the ModelConfig field when
    ml-4m's FM cannot express the model (before anything is written). Returns the config written."""
    config, tensors = released_export(model)
    write_released(config, tensors, out)
    return config


def write_released(config: dict[str, Any], tensors: dict[str, torch.Tensor], out: str) -> None:
    """Write what :func:`released_export` made as ``out``/config.json and ``out``/model.safetensors."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, HUB_WEIGHTS))
    with open(os.path.join(out, HUB_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def released_export(model: FourM) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """ml-4m's FM config.json and state dict of ``model`` (in the released layout), written nowhere; ConfigError
    naming the ModelConfig field (or the folder) when ml-4m's FM cannot express it."""
    problems = released_problems(model.config, model.specs)
    if problems:
        raise ConfigError(f"ml-4m's FM cannot express this model: {problems[0]}" +
                          (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    specs = model.specs
    foreign = [(f, not_ml4m(f)) for f in specs if not_ml4m(f)]
    if foreign:
        folder, why = foreign[0]
        raise ConfigError(f"{folder}: omniforge's {folder} is not ml-4m's modality of that name ({why}); a model "
                          "trained on it cannot be exported as ml-4m's")
    names = {f: ml4m_name(f, s) for f, s in specs.items()}
    if len(set(names.values())) != len(names):
        raise ConfigError(f"two folders map to one ml-4m modality: {names}")
    config = hub_config(model.config, specs, names)
    dom_in = tuple(f for f, s in specs.items() if not s.target_only)
    dom_out = tuple(f for f, s in specs.items() if not s.input_only)
    entries = key_map(model.config, specs, names, dom_in, dom_out)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    by_ml = {n: f for f, n in names.items()}
    tensors: dict[str, torch.Tensor] = {}
    dim = model.config.dim
    for key, entry in entries.items():
        if entry.optional:  # save_pretrained writes a shared modality embedding once, under the decoder's name
            continue
        embedding = key.startswith(("encoder_embeddings.", "decoder_embeddings."))
        spec = specs[by_ml[key.split(".")[1]]] if embedding else None
        if entry.rule == "copy":
            value = state[entry.omni]
            if entry.omni == "mask_token" or ".mod_emb" in key or key.endswith(".pos_emb"):
                value = value.reshape(1, -1, dim)
            tensors[key] = value
        elif entry.rule == "sincos":
            rows = 512 if spec.kind in ("sequence", "embedding") else spec.num_tokens  # ml-4m's sequence tables
            tensors[key] = _sincos(spec, dim, rows)[None]
        elif entry.rule == "zero":
            tensors[key] = torch.zeros(dim)
        else:  # unused by ml-4m's forward: an image decoder's token table
            tensors[key] = torch.zeros(spec.vocab_size, dim)
    return config, tensors


# --------------------------------------------------------------------------------------------------
# export-4m: the model and its tokenizers

EXPORT_TOKENIZERS = "tokenizers"  # OUT/tokenizers/<folder>/: the run's tokenizers, itself a --tokenizers folder
_TOKENIZED = ("image", "global", "sequence")  # spec kinds read through a tokenizer (pixels and embeddings are not)


@dataclass(frozen=True)
class Exported:
    """What :func:`export_4m` wrote: the model's config.json and one TokenizerExport per tokenizer folder."""

    out: str
    config: dict[str, Any]
    tokenizers: list[Any]  # omniforge.tokenize.export4m.TokenizerExport
    tokenizers_from: str | None  # the --tokenizers directory they came from


def tokenized_infos(specs: dict[str, ModalitySpec]) -> list[Any]:
    """The registry modalities whose tokenizers a model's token folders were made with (in the model's order)."""
    infos = []
    for folder, spec in specs.items():
        info = registry_info(folder) if spec.kind in _TOKENIZED else None
        if info is not None and info.tokenized and info.name not in [i.name for i in infos]:
            infos.append(info)
    return infos


def export_4m(run: str, out: str, *, tokenizers: str | None = None, model_only: bool = False) -> Exported:
    """``omniforge export-4m``: the model of ``run`` as ml-4m's FM hub layout in ``out`` (config.json +
    model.safetensors) and, unless ``model_only``, its tokenizers in ``out``/tokenizers/<folder>/ (see
    :mod:`omniforge.tokenize.export4m`), read from ``tokenizers`` or else the run's recorded --tokenizers
    directory. Everything is checked (and converted in memory) before anything is written; ConfigError in one
    line otherwise, ``out`` untouched. The files are written in a folder next to ``out`` and moved into it."""
    import shutil
    import tempfile

    from omniforge.model.checkpoint import load_model
    from omniforge.tokenize import export4m

    taken = [f for f in (HUB_CONFIG, HUB_WEIGHTS, EXPORT_TOKENIZERS) if os.path.exists(os.path.join(out, f))]
    if taken:
        raise ConfigError(f"--out {out} already holds {', '.join(taken)}: pick a new folder")
    loaded = load_model(run)
    config, tensors = released_export(loaded.model)
    infos = [] if model_only else tokenized_infos(loaded.specs)
    source = tokenizers or (loaded.config.get("train") or {}).get("tokenizers")
    if infos and not source:
        raise ConfigError(f"{run} records no --tokenizers directory for {', '.join(i.name for i in infos)}: pass "
                          "--tokenizers DIR (the tokenizers its token shards were made with), or --model-only")
    plans = export4m.plan(source, infos) if infos else []
    _check_vocabularies(loaded.specs, plans)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-")
    try:
        write_released(config, tensors, tmp)
        if plans:
            export4m.write(plans, os.path.join(tmp, EXPORT_TOKENIZERS))
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, config, plans, source if plans else None)


def _check_vocabularies(specs: dict[str, ModalitySpec], plans: list[Any]) -> None:
    """ConfigError when a tokenizer makes ids the model's modality cannot read (a codebook above its vocabulary)."""
    for folder, spec in specs.items():
        info = registry_info(folder) if spec.kind in ("image", "global") else None
        for p in plans:
            if info is not None and info.name in p.modalities and p.codebook_size and \
                    p.codebook_size > spec.vocab_size:
                raise ConfigError(f"{folder}: the model reads {spec.vocab_size} token ids, its tokenizer "
                                  f"{p.folder} makes {p.codebook_size}: pass the --tokenizers its token shards were "
                                  "made with")


def export_lines(exported: Exported) -> list[str]:
    """What ``omniforge export-4m`` prints: the model, each tokenizer folder with its source, where it all is."""
    c, out = exported.config, exported.out
    lines = [f"model: {os.path.join(out, HUB_CONFIG)} + {HUB_WEIGHTS} (ml-4m FM, {c['dim']} wide, "
             f"{c['encoder_depth']} + {c['decoder_depth']} blocks; domains_in {','.join(c['domains_in'])}; "
             f"domains_out {','.join(c['domains_out'])})"]
    for t in exported.tokenizers:
        lines.append(f"tokenizer {os.path.join(out, EXPORT_TOKENIZERS, t.folder)}: {t.source}, {t.line}; ml-4m: "
                     f"{t.loader}")
    if not exported.tokenizers:
        lines.append("tokenizers: none written (the model reads no tokenized modality, or --model-only)")
    where = f"wrote {out}: ml-4m's FM.from_pretrained({out!r}) loads the model"
    if exported.tokenizers:
        where += (f"; {os.path.join(out, EXPORT_TOKENIZERS)} is a --tokenizers folder, and the ml-4m reader of "
                  "each tokenizer folder is named on its line")
    lines.append(where)
    return lines

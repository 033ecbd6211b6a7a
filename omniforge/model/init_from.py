"""`omniforge train --init-from DIR`: start a run from a trained model instead of random init.

``DIR`` is a released 4M / 4M-21 checkpoint in ml-4m's hub layout (:mod:`omniforge.model.ml4m`) or an omniforge
checkpoint (a run directory or one of its ``checkpoint-<step>`` folders). The run's model is built with the
source's ModelConfig (``--model`` does not apply) over the run's ``--modalities``:

- a run folder and a source folder of the same registry modality and kind (``tok_rgb@224`` and ``tok_rgb@224``;
  the token folder ``tok_caption`` and ml-4m's raw ``caption``) is *loaded*: its embeddings, positions and head
  come from the source, and its vocabulary is the source's (a run tokenizer with another vocabulary is refused);
- a source folder the run does not use is *dropped*;
- a run folder the source does not have (a plugin modality, say) is *added*: fresh embeddings and head,
  initialised as any new model is (seeded with ``--seed``);
- everything else (the transformer blocks, norms, context projection, mask token) comes from the source.

A run that already has a checkpoint in ``--out`` resumes from it (model, optimizer, data position, RNG) and is
not initialised again: its architecture and specs are read back from that checkpoint's config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
import torch

from omniforge.errors import ConfigError, WeightsError
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.specs import ModalitySpec

# FourM's per-modality tables: a key "<table>.<folder>[.<param>]" belongs to that folder.
_MODALITY_TABLES = ("encoder_tokens", "decoder_tokens", "modality_embeddings", "decoder_modality_embeddings",
                    "encoder_positions", "decoder_positions", "heads")


@dataclass
class InitPlan:
    """What --init-from does to a run: the model it builds and where each folder's weights come from."""

    source: str  # the --init-from directory
    what: str  # "ml-4m hub checkpoint" | "omniforge checkpoint"
    config: ModelConfig  # the run's model config (the source's)
    specs: dict[str, ModalitySpec]  # the run's specs (loaded folders with the source's vocabulary)
    loaded: dict[str, str] = field(default_factory=dict)  # run folder -> source folder
    dropped: list[str] = field(default_factory=list)  # source folders the run does not use
    added: list[str] = field(default_factory=list)  # run folders the source does not have
    foreign: dict[str, str] = field(default_factory=dict)  # added folders ml-4m names alike: why they differ
    foreign_sources: list[str] = field(default_factory=list)  # the checkpoint's folders of those names
    resumed: bool = False  # the run resumes from its own checkpoint: nothing to load here
    source_specs: dict[str, ModalitySpec] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What the run log says about it, one line each."""
        if self.resumed:
            return [f"--init-from {self.source}: not applied, the run resumes from its own checkpoint"]
        out = [f"--init-from {self.source} ({self.what}): model dim {self.config.dim}, "
               f"{self.config.encoder_depth} + {self.config.decoder_depth} blocks; loaded "
               + (", ".join(f"{r}" if r == s else f"{r} (from {s})" for r, s in self.loaded.items()) or "no modality")]
        out += [f"dropped {m}: in the checkpoint, not in --modalities" if m not in self.foreign_sources else
                f"dropped the checkpoint's {m}: not the modality this run's folder of that name holds"
                for m in self.dropped]
        out += [f"added {m}: not in the checkpoint, fresh embeddings and head" if m not in self.foreign else
                f"added {m}: fresh embeddings and head, the checkpoint's {m} is another modality ({self.foreign[m]})"
                for m in self.added]
        return out


def _registry_key(folder: str, spec: ModalitySpec) -> tuple[str, str, int]:
    """(registry modality, kind, image tokens): what makes two folders the same modality (tok_caption and caption;
    tok_depth@224 and tok_depth@448 are two: their token grids differ)."""
    from omniforge.model.ml4m import registry_info

    info = registry_info(folder)
    grid = spec.num_tokens if spec.kind in ("image", "pixels") else 0
    return (info.name if info is not None else folder, spec.kind, grid)


def _read_source(path: str) -> tuple[str, ModelConfig, dict[str, ModalitySpec]]:
    from omniforge.model.checkpoint import CONFIG, resolve_checkpoint
    from omniforge.model.ml4m import is_released, read_released

    if not os.path.isdir(path):
        raise ConfigError(f"--init-from {path}: no such directory; pass a released 4M checkpoint folder "
                          "(config.json + model.safetensors) or an omniforge run / checkpoint-<step> directory")
    if is_released(path):
        released = read_released(path)
        return "ml-4m hub checkpoint", released.config, released.specs
    try:
        directory = resolve_checkpoint(path)
    except WeightsError:
        raise ConfigError(f"--init-from {path}: neither a released 4M checkpoint (config.json with domains_in + "
                          "model.safetensors) nor an omniforge run or checkpoint-<step> directory") from None
    config = _checkpoint_config(os.path.join(directory, CONFIG))
    return "omniforge checkpoint", config[0], config[1]


def _checkpoint_config(path: str) -> tuple[ModelConfig, dict[str, ModalitySpec]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return (ModelConfig.from_dict(data["model"]),
                {m: ModalitySpec(**{"name": m, **s}) for m, s in data["specs"].items()})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an omniforge checkpoint config ({type(e).__name__}: {e})") from None


def _merge(folder: str, run: ModalitySpec, source: ModalitySpec, path: str) -> ModalitySpec:
    """The run's spec of a loaded folder: its own, with the source's vocabulary (the heads' ids)."""
    from omniforge.modalities import by_token_folder

    if run.seq_len != source.seq_len:
        raise ConfigError(f"--init-from {path}: {folder} has {run.num_tokens} tokens in this run, {source.num_tokens} "
                          f"in the checkpoint's {source.name}")
    if run.vocab_size != source.vocab_size:
        info = by_token_folder(folder)
        from_registry = run.kind != "sequence" and info is not None and run.vocab_size == info.vocab_size
        if not from_registry:  # the run's tokenizer decided its vocabulary: it must be the checkpoint's
            raise ConfigError(f"--init-from {path}: {folder}'s tokenizer has {run.vocab_size} ids, the checkpoint's "
                              f"{source.name} {source.vocab_size}: tokenize with the checkpoint's tokenizers")
    return replace(run, vocab_size=source.vocab_size)


def plan_init(path: str, specs: dict[str, ModalitySpec], *, resume_from: str | None = None) -> InitPlan:
    """How ``--init-from path`` builds a run over ``specs`` (the run's, from its --modalities and tokenizers).
    With ``resume_from`` (the run's own latest checkpoint) the run's config.json decides and nothing is loaded."""
    if resume_from is not None:
        from omniforge.model.checkpoint import CONFIG

        config, saved = _checkpoint_config(os.path.join(resume_from, CONFIG))
        return InitPlan(path, "the run's own checkpoint", config, saved, resumed=True)
    what, config, source_specs = _read_source(path)
    from omniforge.model.ml4m import not_ml4m

    by_key = {_registry_key(f, s): f for f, s in source_specs.items()}
    out = dict(specs)
    loaded: dict[str, str] = {}
    foreign: dict[str, str] = {}
    foreign_sources: list[str] = []
    for folder, spec in specs.items():
        source = by_key.get(_registry_key(folder, spec))
        if source is not None and what == "ml-4m hub checkpoint" and not_ml4m(folder):
            foreign[folder] = not_ml4m(folder)  # the same name, another modality: nothing to load
            foreign_sources.append(source)
        elif source is not None:
            out[folder] = _merge(folder, spec, source_specs[source], path)
            loaded[folder] = source
    dropped = [f for f in source_specs if f not in loaded.values()]
    added = [f for f in specs if f not in loaded]
    return InitPlan(path, what, config, out, loaded, dropped, added, foreign=foreign,
                    foreign_sources=foreign_sources, source_specs=source_specs)


def _source_state(plan: InitPlan, model: FourM) -> dict[str, torch.Tensor]:
    """The source's weights under omniforge's names (with the source's folder names)."""
    from omniforge.model.ml4m import _weights, model_shapes, read_released, released_state

    if plan.what == "ml-4m hub checkpoint":
        released = read_released(plan.source)
        weights = _weights(plan.source)
        return released_state(released, weights, model_shapes(plan.config, released.specs))
    from safetensors.torch import load_file

    from omniforge.model.checkpoint import MODEL_FILE, resolve_checkpoint

    return load_file(os.path.join(resolve_checkpoint(plan.source), MODEL_FILE), device="cpu")


def _folder_of(key: str) -> str | None:
    table, _, rest = key.partition(".")
    return rest.split(".", 1)[0] if table in _MODALITY_TABLES else None


def init_model(model: FourM, plan: InitPlan) -> list[str]:
    """Copy the source's weights into ``model`` (built with ``plan.config`` and ``plan.specs``, freshly
    initialised) as the plan says; returns the model's parameters that stay fresh (the added folders', and the
    parts a loaded folder has none of in the source, e.g. the encoder side of a target-only one)."""
    source = _source_state(plan, model)
    renamed: dict[str, torch.Tensor] = {}
    source_to_run = {s: r for r, s in plan.loaded.items()}
    for key, value in source.items():
        folder = _folder_of(key)
        if folder is None:
            renamed[key] = value
        elif folder in source_to_run:
            table, _, rest = key.partition(".")
            renamed[f"{table}.{source_to_run[folder]}{rest[len(folder):]}"] = value
    state = model.state_dict()
    shared = [k for k in state if _folder_of(k) is None]
    missing = [k for k in shared if k not in renamed]
    if missing:
        raise WeightsError(f"--init-from {plan.source}: the checkpoint has no {missing[0]} (and {len(missing) - 1} "
                           "more shared weights)" if len(missing) > 1 else
                           f"--init-from {plan.source}: the checkpoint has no {missing[0]}")
    load: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if key not in state:
            continue  # e.g. a source-only part (the source's decoder tables of a folder this run uses as input only)
        if tuple(value.shape) != tuple(state[key].shape):
            raise WeightsError(f"--init-from {plan.source}: {key} has shape {tuple(value.shape)} in the checkpoint, "
                               f"{tuple(state[key].shape)} in this run's model")
        load[key] = value
    with torch.no_grad():
        for key, value in load.items():
            state[key].copy_(value)
    return sorted(k for k in state if k not in load and k in dict(model.named_parameters()))


def describe(plan: InitPlan, fresh: list[str]) -> list[str]:
    """The plan's log lines, plus one per loaded folder that keeps fresh parts."""
    lines = plan.lines()
    for folder in plan.loaded:
        parts = [k for k in fresh if _folder_of(k) == folder]
        if parts:
            lines.append(f"{folder}: fresh {', '.join(parts)} (the checkpoint has none)")
    return lines


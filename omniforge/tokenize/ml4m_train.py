"""`omniforge tokenizer train --architecture ml4m`: ViT VQ-VAE tokenizers trained in ml-4m's architecture.

omniforge's own ViT VQ-VAEs cannot be written as ml-4m's (`export4m.VQVIT_DIFFERENCE`), and changing their
arithmetic would change every existing tokenizer's tokens. A trainer who wants to export a model to ml-4m trains
the modality's tokenizer in ml-4m's architecture instead: omniforge's implementation of Apple's tokenizers
(`_ml4m_nets`: ViT encoder without a final norm, LayerNorm eps 1e-6, 1 x 1 latent projections, channel-major
patch output) made trainable, with the same EMA cosine codebook and dead-code restarts as the omniforge trainer
(lucidrains' `VectorQuantize`, whose rows stay unit length, so ml-4m's lookup and raw-row output read them
alike), on ml-4m's preprocessing of the modality (`ml4m.prepare`), with the kind's own losses (`models.vq_loss`).
The tokenizer is saved directly in ml-4m's hub layout (`save`), which `--tokenizers` loads like an imported
snapshot and `export-4m` writes through unchanged; the safetensors metadata marks it `TRAINED_MARK`.

`ML4MArchitecture(kind)` is the kind the trainer sees: the modality's own kind with the model, its files and the
preprocessing replaced. Its quality metrics are the kind's, in ml-4m's model space (a standardised depth's PSNR
is over values clamped to [-1, 1], so it is only comparable between runs of this architecture; mask IoU reads
the decoder's logits through a sigmoid).

The sizes: "tiny" is the `vit_oftiny` preset (64 wide, 1 block, 2 heads; ml-4m reads it once that preset is
registered on its side), "base" is ml-4m's `vit_b` (768 wide, 12 blocks, 12 heads).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from omniforge.errors import ConfigError, WeightsError
from omniforge.tokenize._ml4m_nets import LucidCodebook, ML4MTokenizer, build_parts

if TYPE_CHECKING:
    import numpy as np

    from omniforge.tokenize.kinds import TokenizerKind
    from omniforge.tokenize.models import TokenizerConfig

ARCHITECTURES = ("omniforge", "ml4m")
TRAINED_MARK = {"format": "pt", "omniforge": "tokenizer train --architecture ml4m"}  # model.safetensors metadata
VIT_KINDS = ("pixels", "segmentation", "features", "mask")  # TokenizerConfig.kind values it trains
_PRESETS = {(64, 1, 2): "vit_oftiny", (768, 12, 12): "vit_b"}  # (dim, depth, heads) -> ml-4m preset prefix
# the quantizer's state in ml-4m's layout: VectorQuantize's (1, K, ...) buffers without their codebook axis
_CODEBOOK = ("embed", "cluster_size")
TRAINING_FILE = "codebook_training.safetensors"  # the EMA state ml-4m's snapshot has no key for (resume only)
_EMA_AVG = "quantize.vq._codebook.embed_avg"


class TrainableLucid(LucidCodebook):
    """The lucid cosine codebook, trainable: VectorQuantize (EMA updates, dead-code restarts) underneath; lookups
    and decoding as `LucidCodebook` (cosine argmax, raw rows), on VectorQuantize's rows."""

    def __init__(self, codebook_size: int, dim: int, *, decay: float, threshold_ema_dead_code: float,
                 commitment_weight: float):
        torch.nn.Module.__init__(self)
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(dim=dim, codebook_size=codebook_size, codebook_dim=dim, use_cosine_sim=True,
                                 decay=decay, threshold_ema_dead_code=threshold_ema_dead_code,
                                 commitment_weight=commitment_weight, kmeans_init=False)

    @property
    def embed(self) -> Tensor:  # (K, L)
        return self.vq._codebook.embed[0]

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, nh, nw) -> (quantized (B, L, nh, nw), quantizer loss); updates the codebook in training."""
        b, width, nh, nw = latents.shape
        quantized, _, loss = self.vq(latents.float().flatten(2).transpose(1, 2))  # (B, N, L)
        return quantized.transpose(1, 2).reshape(b, width, nh, nw), loss.sum()


class ML4MTrainable(ML4MTokenizer):
    """An ml-4m ViT VQ-VAE in training: `loss` for the trainer, `encode` / `decode` as ML4MTokenizer's (decode
    returns the raw decoder output: mask and class logits). `tokenizer_config` is the TokenizerConfig it was
    made from (the trainer's codebook size and resume check)."""

    def __init__(self, config, tokenizer_config: TokenizerConfig, **parts):
        super().__init__(config, **parts)
        self.tokenizer_config = tokenizer_config

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        from omniforge.tokenize.models import vq_loss

        quantized, quant_loss = self.quantize(self._latents(x))
        out = self.decoder(self.post_quant_proj(quantized))
        return vq_loss(self.tokenizer_config.kind, out, x, quant_loss)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        return self.loss(x)


# ------------------------------------------------------------------------------------------------- config


def ml4m_config(tc: TokenizerConfig) -> dict[str, Any]:
    """The ml-4m config.json (VQVAE's constructor arguments) of a ViT kind's tokenizer config."""
    if tc.kind not in VIT_KINDS:
        raise ConfigError(f"tokenizer {tc.name!r}: --architecture ml4m trains the ViT VQ-VAE kinds "
                          f"({', '.join(VIT_KINDS)}), not {tc.kind!r} (a Memcodes tokenizer is converted on export)")
    preset = _PRESETS.get((tc.dim, tc.depth, tc.heads))
    if preset is None or tc.mlp_ratio != 4.0:
        raise ConfigError(f"tokenizer {tc.name!r}: no ml-4m ViT preset is {tc.dim} wide with {tc.depth} blocks and "
                          f"{tc.heads} heads (mlp_ratio {tc.mlp_ratio})")
    config = {"image_size": tc.image_size, "n_channels": tc.in_channels, "enc_type": f"{preset}_enc",
              "dec_type": f"{preset}_dec", "patch_size": tc.patch_size, "patch_proj": tc.kind != "features",
              "quant_type": "lucid", "codebook_size": tc.codebook_size, "latent_dim": tc.latent_dim,
              "norm_codes": True, "ema_decay": tc.ema_decay, "threshold_ema_dead_code": tc.threshold_ema_dead_code,
              "commitment_weight": tc.commitment_weight, "kmeans_init": False}
    if tc.kind == "segmentation":  # the classes (none included) are embedded to class_emb_dim channels
        config.update(n_labels=tc.in_channels, n_channels=tc.class_emb_dim)
    return config


def build(tc: TokenizerConfig) -> ML4MTrainable:
    """A freshly initialised tokenizer in ml-4m's architecture (training mode); seeds nothing."""
    from omniforge.tokenize._vit import sincos_pos_embed_2d
    from omniforge.tokenize.ml4m import ML4MConfig

    c = ML4MConfig.from_dict(ml4m_config(tc))
    side = c.image_size // c.in_patch
    parts = build_parts(c, lambda prefix: (side, side))
    parts["quantize"] = TrainableLucid(c.codebook_size, c.latent_dim, decay=tc.ema_decay,
                                       threshold_ema_dead_code=tc.threshold_ema_dead_code,
                                       commitment_weight=tc.commitment_weight)
    for net in (parts["encoder"], parts["decoder"]):  # fixed 2-D sin-cos positions, stored like ml-4m's
        dim = net.pos_emb.shape[1]
        net.pos_emb.copy_(sincos_pos_embed_2d(side, dim).t().reshape(1, dim, side, side))
    return ML4MTrainable(c, tc, **parts)


# ------------------------------------------------------------------------------------------------- files


def hub_state(model: ML4MTrainable) -> dict[str, Tensor]:
    """The state dict in ml-4m's names, ml-4m's key set exactly: VectorQuantize's `quantize.vq._codebook.*` become
    ml-4m's `quantize._codebook.*` without the codebook axis (initted as a (1,) tensor); the EMA sums
    (`embed_avg`) are left out (TRAINING_FILE)."""
    out = {}
    for name, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if name.startswith("quantize.vq._codebook."):
            field = name.rsplit(".", 1)[1]
            if field not in (*_CODEBOOK, "initted"):
                continue
            name, value = f"quantize._codebook.{field}", value.reshape(1) if field == "initted" else value[0]
        elif name.startswith("quantize."):
            continue
        out[name] = value.contiguous()
    return out


def save(model: ML4MTrainable, directory: str) -> None:
    """Write ml-4m's hub layout: config.json (ml4m_config) and model.safetensors (hub_state, TRAINED_MARK), and
    the codebook's EMA sums for a resume (TRAINING_FILE), each through a temporary name renamed into place."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        save_file({_EMA_AVG: model.state_dict()[_EMA_AVG].detach().float().cpu().contiguous()}, tmp)
        os.replace(tmp, os.path.join(directory, TRAINING_FILE))
        save_file(hub_state(model), tmp, metadata=TRAINED_MARK)
        os.replace(tmp, os.path.join(directory, "model.safetensors"))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(ml4m_config(model.tokenizer_config), f, indent=2)
        os.replace(tmp, os.path.join(directory, "config.json"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_trained_here(directory: str) -> bool:
    """True for a snapshot folder `save` wrote (its model.safetensors carries TRAINED_MARK)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
            return (f.metadata() or {}).get("omniforge") == TRAINED_MARK["omniforge"]
    except (OSError, ValueError, RuntimeError):
        return False


def load_trainable(directory: str, tc: TokenizerConfig) -> ML4MTrainable:
    """The tokenizer `save` wrote in `directory`, trainable, for resuming a run of config `tc`; ConfigError when
    it was trained with another config."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    if saved != ml4m_config(tc):
        raise ConfigError(f"the tokenizer in {directory} was trained with a different config: pass --restart to "
                          "start over")
    model = build(tc)
    state = {}
    for name, value in load_file(os.path.join(directory, "model.safetensors")).items():
        if name.startswith("quantize._codebook."):
            field = name.rsplit(".", 1)[1]
            name = f"quantize.vq._codebook.{field}"
            value = value.reshape(()).bool() if field == "initted" else value[None]
        state[name] = value
    training = os.path.join(directory, TRAINING_FILE)
    if os.path.exists(training):
        state.update(load_file(training))
    expected = model.state_dict()
    state = {k: v.to(expected[k].dtype) if k in expected else v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"{directory}/model.safetensors lacks {missing[0]}: pass --restart to start over")
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------------- kind


class ML4MArchitecture:
    """A tokenizer kind whose model is trained in ml-4m's architecture: everything as `kind` (crops, labels,
    metrics, folder), but the model (`build`, `save`, `load_trainable`) and the model space (`prepare`,
    `restore`: ml-4m's preprocessing of the modality)."""

    def __init__(self, kind: TokenizerKind):
        if kind.model_kind not in VIT_KINDS:
            raise ConfigError(f"modality {kind.info.name!r}: --architecture ml4m trains the ViT VQ-VAE kinds, not "
                              f"{kind.name!r} (its tokenizer is converted to ml-4m's layout on export as it is)")
        if kind.info.ml4m_transform is None:
            raise ConfigError(f"modality {kind.info.name!r} declares no ml-4m preprocessing "
                              "(ModalityInfo.ml4m_transform): it cannot be trained in ml-4m's architecture")
        self.kind = kind

    def __getattr__(self, name: str) -> Any:  # the modality's own kind for everything not replaced here
        if name == "kind":
            raise AttributeError(name)
        return getattr(self.kind, name)

    def __repr__(self) -> str:
        return f"ML4MArchitecture({self.kind!r})"

    def build(self, config: TokenizerConfig) -> ML4MTrainable:
        return build(config)

    def save(self, model: ML4MTrainable, directory: str) -> None:
        save(model, directory)

    def load_trainable(self, directory: str, config: TokenizerConfig) -> ML4MTrainable:
        return load_trainable(directory, config)

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        from omniforge.tokenize import ml4m

        return ml4m.prepare(self.kind.info, self.kind._check(arrays))

    def restore(self, x: Tensor) -> list[np.ndarray]:
        from omniforge.tokenize import ml4m

        return ml4m.restore(self.kind.info, x)

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        if self.kind.model_kind == "mask":  # the kind scores probabilities; ml-4m's decoder gives logits
            recon = torch.sigmoid(recon)
        return self.kind.quality(x, recon)

    def train(self, cfg: Any, *, progress: bool = True, verbose: bool = True) -> Any:
        from omniforge.tokenize.train import train_model

        return train_model(cfg, self, progress=progress, verbose=verbose)


__all__ = ["ARCHITECTURES", "ML4MArchitecture", "ML4MTrainable", "TRAINED_MARK", "TRAINING_FILE", "TrainableLucid",
           "VIT_KINDS", "build", "hub_state", "is_trained_here", "load_trainable", "ml4m_config", "save"]

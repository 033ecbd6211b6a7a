"""Apple's released 4M tokenizers, loaded from their hub snapshots into omniforge's own implementation.

A snapshot is what ml-4m's `VQ.save_pretrained` writes and `from_pretrained` reads: `config.json` (the
constructor arguments of `fourm.vq.vqvae.VQ` / `VQVAE` / `DiVAE` / `VQControlNet`, flat, no omniforge
"format" key) and `model.safetensors` (the state dict). `load_snapshot` builds the architecture the config
names and loads the weights through an explicit key map (`KEY_MAP`, `IGNORED`):

- encoders: ml-4m's ViT (`enc_type` a preset of `VIT_PRESETS`: patch projection or a 1 x 1 projection of a
  feature map, LayerNorm eps 1e-6, the optional tanh post-MLP, the stored position embedding resized
  bicubically when the input grid is not the trained one, e.g. 448 inputs through a 224-448 tokenizer) or the
  BottleneckMLP of the global-embedding and pose tokenizers (`enc_type` "BottleneckMLP/B_<blocks>-Wi_<width>");
- a 1 x 1 projection to the latent, then the quantizer: "lucid" (cosine lookup against the L2-normalised
  codebook rows, decoding from the raw rows) or "memcodes" (one codebook per head, attention logits);
- decoders: the ViT or BottleneckMLP ones (`dec_type`) when the checkpoint has one. Diffusion decoders (DiVAE's
  UNet/UViT, VQControlNet's Stable Diffusion) are not implemented here: such a snapshot loads its encoder and
  quantizer only, and `decode` raises NoDecoderError.

A config field omniforge does not know, or a known one at a value this implementation does not handle, is
refused with a ConfigError naming it. ViT widths come from `VIT_PRESETS`, keyed by ml-4m's preset names;
`register_vit_preset` adds one (the test fixtures' tiny presets, a preset of a newer ml-4m).

Model space (what `ML4MTokenizer.encode` reads and `decode` returns) is ml-4m's tokenizer input: float
(B, C, H, W) for images and feature maps, int64 (B, H, W) class ids for a class-embedding (semseg) tokenizer,
float (B, D) for an MLP tokenizer's vectors. `prepare` and `restore` go there from omniforge's label arrays
with ml-4m's preprocessing for the modality (`ModalityInfo.ml4m_transform`, see `TRANSFORMS`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from omniforge.errors import ConfigError, SampleError, WeightsError

if TYPE_CHECKING:
    from torch import Tensor

    from omniforge.modalities import ModalityInfo

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSION_LINE = ("its released decoder is a diffusion model, which omniforge does not implement yet (a later "
                  "issue): its tokens are written, not drawn")


# ---------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class VitPreset:
    """Width, depth and heads of one of ml-4m's ViT tokenizer presets (`fourm.vq.models.vit_models`)."""

    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"ViT preset {name}={v!r} must be a positive integer")
        if self.dim % self.heads or self.dim % 4:
            raise ConfigError(f"ViT preset dim={self.dim} must be divisible by heads={self.heads} and by 4")


VIT_PRESETS: dict[str, VitPreset] = {
    "vit_s_enc": VitPreset(512, 8, 8), "vit_s_dec": VitPreset(512, 8, 8),
    "vit_b_enc": VitPreset(768, 12, 12), "vit_b_dec": VitPreset(768, 12, 12),  # every released ViT tokenizer
    "vit_l_enc": VitPreset(1024, 24, 16), "vit_l_dec": VitPreset(1024, 24, 16),
    # omniforge's tiny size of `omniforge tokenizer train --architecture ml4m` (ml-4m reads such a tokenizer once
    # the same preset is registered in its fourm.vq.models.vit_models; the base size is vit_b)
    "vit_oftiny_enc": VitPreset(64, 1, 2), "vit_oftiny_dec": VitPreset(64, 1, 2),
}


def register_vit_preset(name: str, *, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> VitPreset:
    """Add a ViT preset under ml-4m's `enc_type` / `dec_type` name; re-registering the same one is a no-op."""
    preset = VitPreset(dim, depth, heads, mlp_ratio)
    if not isinstance(name, str) or not re.fullmatch(r"vit_\w+_(enc|dec)", name):
        raise ConfigError(f"ViT preset name {name!r} must look like ml-4m's: vit_<size>_enc or vit_<size>_dec")
    if VIT_PRESETS.get(name, preset) != preset:
        raise ConfigError(f"ViT preset {name!r} is already registered as {VIT_PRESETS[name]}")
    VIT_PRESETS[name] = preset
    return preset


_MLP_RE = re.compile(r"^BottleneckMLP/B_(\d+)-Wi_(\d+)(?:-Ex_(\d+))?$")


def mlp_shape(model_id: str) -> tuple[int, int, int]:
    """(blocks, width, expansion) of ml-4m's "BottleneckMLP/B_<blocks>-Wi_<width>[-Ex_<expansion>]" (default 4)."""
    m = _MLP_RE.match(model_id)
    if m is None:
        raise ConfigError(f"{model_id!r} is not a BottleneckMLP/B_<blocks>-Wi_<width> model id")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 4)


# ----------------------------------------------------------------------------------------------- config

# Fields of ml-4m's constructors that change nothing at inference (training, EMA, dead codes, checkpoint paths).
_TRAINING = frozenset({
    "sync_codebook", "ema_decay", "threshold_ema_dead_code", "code_replacement_policy", "commitment_weight",
    "kmeans_init", "ckpt_path", "ignore_keys", "freeze_enc", "norm_latents",
})
# DiVAE's diffusion decoder and schedule, and VQControlNet's Stable Diffusion: they mark a diffusion decoder.
_DIFFUSION = frozenset({
    "num_train_timesteps", "cls_free_guidance_dropout", "masked_cfg", "masked_cfg_low", "masked_cfg_high",
    "scheduler", "beta_schedule", "prediction_type", "clip_sample", "thresholding", "conditioning",
    "dec_transformer_dropout", "zero_terminal_snr",
})
_CONTROLNET = frozenset({"sd_path", "image_size_sd", "pretrained_cn", "enable_xformer", "adapter"})
_DIFFUSION_DECODERS = ("unet_", "uvit_")


@dataclass(frozen=True, kw_only=True)
class ML4MConfig:
    """The architecture a snapshot's config.json describes (ml-4m's constructor arguments, defaults as ml-4m's).

    decoder: "vit" or "mlp" (implemented), "diffusion" (DiVAE / VQControlNet: tokens only), "none".
    """

    image_size: int = 224
    image_size_enc: int | None = None
    image_size_dec: int | None = None
    n_channels: int = 3
    n_labels: int | None = None
    enc_type: str = "vit_b_enc"
    dec_type: str | None = None
    patch_proj: bool = True
    post_mlp: bool = False
    patch_size: int = 16
    patch_size_dec: int | None = None
    out_conv: bool = False
    quant_type: str = "lucid"
    codebook_size: int = 16384
    num_codebooks: int = 1
    latent_dim: int = 32
    norm_codes: bool = True
    undo_std: bool = False
    decoder: str = "none"

    @classmethod
    def from_dict(cls, data: Any, source: str = "config.json") -> ML4MConfig:
        """Validate an ml-4m config; ConfigError naming the first field omniforge cannot honour."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: an ml-4m tokenizer config is a JSON object, got {type(data).__name__}")
        arch = {f.name for f in fields(cls)} - {"decoder"}
        for name in sorted(data):
            if name not in arch | _TRAINING | _DIFFUSION | _CONTROLNET:
                raise ConfigError(f"{source}: unknown ml-4m tokenizer config field {name!r}: omniforge cannot tell "
                                  "what it changes, so it does not load this tokenizer")
        values = {k: v for k, v in data.items() if k in arch}
        if _CONTROLNET & set(data) or _DIFFUSION & set(data) or str(values.get("dec_type", "")).startswith(
                _DIFFUSION_DECODERS):
            values["decoder"] = "diffusion"
        elif values.get("dec_type") is None:
            values["decoder"] = "none"
        else:
            values["decoder"] = "vit" if str(values["dec_type"]).startswith("vit") else "mlp"
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ml-4m tokenizer config field {name}={getattr(self, name)!r} {why}")

        for name in ("image_size", "n_channels", "patch_size", "codebook_size", "num_codebooks", "latent_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a positive integer")
        for name in ("image_size_enc", "image_size_dec", "patch_size_dec", "n_labels"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(name, "must be a positive integer or null")
        for name in ("patch_proj", "post_mlp", "out_conv", "norm_codes", "undo_std"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.undo_std:
            raise bad("undo_std", "(ImageNet-standardised inputs) is not supported: omniforge feeds ml-4m's tokenizer "
                                  "inputs directly")
        if not self.vit_encoder and not self.mlp_encoder:
            raise bad("enc_type", f"is not supported: a ViT preset ({', '.join(sorted(VIT_PRESETS))}; add one "
                                  "with omniforge.tokenize.ml4m.register_vit_preset) or BottleneckMLP/B_<n>-Wi_<w>")
        if self.decoder == "vit" and self.dec_type not in VIT_PRESETS:
            raise bad("dec_type", f"is not supported: a ViT preset ({', '.join(sorted(VIT_PRESETS))}; add one with "
                                  "omniforge.tokenize.ml4m.register_vit_preset), BottleneckMLP/B_<n>-Wi_<w>, or a "
                                  "diffusion decoder (unet_*, uvit_*)")
        if self.decoder == "mlp" and not _MLP_RE.match(str(self.dec_type)):
            raise bad("dec_type", "is not supported: a ViT preset, BottleneckMLP/B_<n>-Wi_<w>, or a diffusion decoder")
        if self.quant_type not in ("lucid", "memcodes"):
            raise bad("quant_type", "is not supported: 'lucid' or 'memcodes'")
        if self.quant_type == "lucid":
            if not self.norm_codes:
                raise bad("norm_codes", "is not supported: omniforge implements the lucid quantizer's cosine codebook "
                                        "(norm_codes true), not its Euclidean one")
            if self.num_codebooks != 1:
                raise bad("num_codebooks", "must be 1 for the lucid quantizer (multi-head lucid codebooks are not "
                                           "implemented)")
            if self.mlp_encoder:
                raise bad("quant_type", "'lucid' with an MLP encoder is not supported (the released MLP tokenizers "
                                        "use 'memcodes')")
        elif self.latent_dim % self.num_codebooks:
            raise bad("latent_dim", f"must be divisible by num_codebooks={self.num_codebooks} (Memcodes heads)")
        elif not self.mlp_encoder:
            raise bad("quant_type", "'memcodes' is supported with the BottleneckMLP encoders (global vectors), not "
                                    "with a ViT encoder")
        if self.vit_encoder and self.patch_proj:
            for name in ("image_size_enc", "image_size"):
                side = getattr(self, name)
                if side is not None and side % self.patch_size:
                    raise bad(name, f"must be a multiple of patch_size={self.patch_size}")

    # -- derived

    @property
    def vit_encoder(self) -> bool:
        return self.enc_type in VIT_PRESETS

    @property
    def mlp_encoder(self) -> bool:
        return bool(_MLP_RE.match(str(self.enc_type)))

    @property
    def has_decoder(self) -> bool:
        """True when omniforge can decode this tokenizer's tokens (a ViT or MLP decoder)."""
        return self.decoder in ("vit", "mlp")

    @property
    def family(self) -> str:
        """How `import-4m` describes it: "ViT VQ-VAE", "ViT VQ-VAE on feature maps", "Memcodes MLP"."""
        if self.mlp_encoder:
            return "Memcodes MLP"
        if self.n_labels is not None:
            return "ViT VQ-VAE (class embedding)"
        return "ViT VQ-VAE" if self.patch_proj else "ViT VQ-VAE on feature maps"

    @property
    def decoder_line(self) -> str:
        return {"vit": "ViT", "mlp": "MLP", "diffusion": "diffusion (tokens only)", "none": "none"}[self.decoder]

    @property
    def in_patch(self) -> int:
        """Input pixels (or feature positions) per token side."""
        return self.patch_size if self.patch_proj else 1

    @property
    def trained_side(self) -> int:
        """The input side the encoder's position embedding was made for."""
        return self.image_size_enc or self.image_size

    def num_tokens(self, side: int | None = None) -> int:
        """Tokens of one input of `side` x `side` (default: the trained side); an MLP tokenizer's heads."""
        if self.mlp_encoder:
            return self.num_codebooks
        side = self.trained_side if side is None else side
        if side % self.in_patch:
            raise ConfigError(f"an input side of {side} is not a multiple of the tokenizer's patch size "
                              f"{self.in_patch}")
        return (side // self.in_patch) ** 2


_SIGNATURE = ("enc_type", "dec_type", "quant_type", "codebook_size", "n_channels", "latent_dim")


def is_snapshot_config(data: Any) -> bool:
    """True for an ml-4m hub config: a flat JSON object without omniforge's "format" key, holding some of ml-4m's
    fields (missing ones take ml-4m's constructor defaults)."""
    return isinstance(data, dict) and "format" not in data and any(k in data for k in _SIGNATURE)


def is_snapshot_dir(directory: str) -> bool:
    """True when a local folder's config.json is an ml-4m hub config (not omniforge's own format)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            return is_snapshot_config(json.load(f))
    except (OSError, ValueError):
        return False


def read_config(directory: str) -> ML4MConfig:
    """The validated config of a snapshot folder (local); WeightsError when it is missing or unreadable."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: an ml-4m tokenizer snapshot holds {CONFIG_FILE} and {WEIGHTS_FILE}") \
            from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is unreadable ({e})") from None
    if not is_snapshot_config(data):
        raise WeightsError(f"{path} is not an ml-4m tokenizer config (none of {', '.join(_SIGNATURE)})")
    return ML4MConfig.from_dict(data, source=path)


# ------------------------------------------------------------------------------------------------- model

# ml-4m state-dict names -> omniforge's (applied in order, first match wins); unmatched names are kept as they are.
KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^quantize\._codebook\.embed$", "quantize.embed"),  # lucid codebook (K, L)
    (r"^quantize\.to_([kv])\.weight$", r"quantize.to_\1"),  # Memcodes' EinMix key / value projections (H, d, d)
    (r"^(encoder|decoder)\.layernorms\.(\d+)\.", r"\1.norms.\2."),  # BottleneckMLP norms
    (r"^(encoder|decoder)\.blocks\.(\d+)\.block\.(\d+)\.", r"\1.blocks.\2.\3."),  # BottleneckMLP blocks
)
# Training state, and decoders omniforge does not implement (dropped only when the config says diffusion).
IGNORED = (r"^quantize\._codebook\.(initted|cluster_size|embed_avg)$",)
IGNORED_DIFFUSION = (r"^decoder\.", r"^vae\.")


def map_state_dict(state: dict[str, Any], config: ML4MConfig) -> dict[str, Any]:
    """An ml-4m state dict renamed to omniforge's module names, training state (and diffusion decoders) dropped."""
    ignored = IGNORED + (IGNORED_DIFFUSION if config.decoder == "diffusion" else ())
    out = {}
    for name, value in state.items():
        if any(re.search(p, name) for p in ignored):
            continue
        for pattern, repl in KEY_MAP:
            new, n = re.subn(pattern, repl, name)
            if n:
                name = new
                break
        out[name] = value
    return out


def is_ml4m_model(model: Any) -> bool:
    """True for a tokenizer `load_snapshot` built (an `ML4MTokenizer`)."""
    return bool(getattr(model, "is_ml4m", False))


def __getattr__(name: str) -> Any:  # ML4MTokenizer lives with the networks (torch loads only when it is asked for)
    if name == "ML4MTokenizer":
        from omniforge.tokenize._ml4m_nets import ML4MTokenizer

        return ML4MTokenizer
    raise AttributeError(name)


def load_snapshot(directory: str, device: str = "cpu"):
    """Build and load the ml-4m tokenizer in a local snapshot folder, in eval mode; ConfigError for a config
    omniforge does not support, WeightsError for missing or mismatched weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(directory)
    path = os.path.join(directory, WEIGHTS_FILE)
    try:
        state = load_file(path, device="cpu")
    except FileNotFoundError:
        raise WeightsError(f"{path} not found: an ml-4m tokenizer snapshot holds {CONFIG_FILE} and {WEIGHTS_FILE}") \
            from None
    except (OSError, SafetensorError, ValueError) as e:
        raise WeightsError(f"{path} is corrupt ({e})") from None
    from omniforge.tokenize._ml4m_nets import build

    state = map_state_dict(state, config)
    model = build(config, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise WeightsError(f"{path} does not match its config.json ({what}; {len(missing)} missing, "
                           f"{len(unexpected)} unexpected): not an ml-4m tokenizer of this architecture")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightsError(f"{path}: {name} has shape {tuple(value.shape)}, its config.json makes "
                               f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# -------------------------------------------------------------------------------------------- transforms

TRANSFORMS = {  # ModalityInfo.ml4m_transform -> what ml-4m does to the label before its tokenizer
    "rgb": "RGBTransform(imagenet_default_mean_and_std=False): x / 255, then (x - 0.5) / 0.5 per channel",
    "normal": "NormalTransform(standardize_surface_normals=False): x / 255, then (x - 0.5) / 0.5 per channel",
    "depth": "DepthTransform(standardize_depth=True): x / 65535, then standardised per image with the mean and "
             "variance of its values after dropping the lowest and highest 10%",
    "semseg": "SemsegTransform(shift_idx_by_one=True): class id + 1 (uint8, so 255 'none' becomes 0)",
    "features": "none: the teacher's feature map as it is, (B, C, h, w)",
    "global": "none: the teacher's vector as it is, (B, D) (ml-4m passes it as (B, D, 1, 1))",
    "mask": "SAMInstanceTransform: the instance's filled 64 x 64 mask in {0, 1}, (B, 1, 64, 64)",
    "pose": "HumanPoseTransform(only_pose=True): a person's SMPL body pose, (23, 3, 3) rotations flattened to 207 as "
            "they are, (B, 207) (ml-4m passes it as (B, 207, 1, 1))",
}
DEPTH_TRIM = 0.1  # the fraction of lowest and highest depth values the standardisation leaves out
DEPTH_EPS = 1e-6  # added to the variance


def _unit(batch: np.ndarray, info: ModalityInfo):
    """Values of `value_range` to [0, 1] (ml-4m's to_tensor / 65535 for full-range uint8 / uint16 labels)."""
    import torch

    lo, hi = info.value_range
    if lo == 0.0 and batch.dtype == np.uint16:  # ml-4m: the uint16 array / 65535.0 in float64, then float32
        x = batch.astype(np.float64) / np.float64(hi)
    elif lo == 0.0:  # ml-4m: to_tensor's float32 / 255
        x = batch.astype(np.float32) / np.float32(hi)
    else:
        x = (batch.astype(np.float64) - lo) / (hi - lo)
    return torch.from_numpy(np.ascontiguousarray(x)).float()


def _channels_first(x):
    return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()  # (B, C, H, W)


def standardize_depth(x):
    """ml-4m's truncated depth standardisation of each (C, H, W) map in a batch (float32)."""
    out = []
    for d in x:
        flat = d.reshape(-1).sort().values
        n = flat.shape[0]
        kept = flat[int(DEPTH_TRIM * n): int((1 - DEPTH_TRIM) * n)]
        out.append((d - kept.mean()) / (kept.var() + DEPTH_EPS).sqrt())
    import torch

    return torch.stack(out)


def prepare(info: ModalityInfo, batch: np.ndarray):
    """Checked label arrays of one modality (stacked, any square side) -> the ml-4m tokenizer's model space, with
    ml-4m's preprocessing for `info.ml4m_transform` (see TRANSFORMS)."""
    import torch

    t = info.ml4m_transform
    if t in ("rgb", "normal"):
        x = _channels_first(_unit(batch, info))
        return (x - 0.5) / 0.5
    if t == "depth":
        return standardize_depth(_channels_first(_unit(batch, info)))
    if t == "semseg":
        bad = (batch >= (info.num_classes or 0)) & (batch != 255)
        if bad.any():
            raise SampleError("bad_value", f"{info.name} class ids must be 0..{(info.num_classes or 0) - 1} or 255 "
                                           f"(none), got {int(batch[bad][0])}")
        return torch.from_numpy((batch.astype(np.uint8) + np.uint8(1)).astype(np.int64))  # 255 wraps to 0
    if t == "features":
        return torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    if t in ("global", "pose"):
        return torch.from_numpy(batch.astype(np.float32))
    if t == "mask":
        return torch.from_numpy((batch > 0).astype(np.float32))[:, None]
    raise ConfigError(f"modality {info.name!r} has no ml-4m preprocessing (ModalityInfo.ml4m_transform="
                      f"{t!r}): give it one of {', '.join(TRANSFORMS)} to use an ml-4m tokenizer")


def restore(info: ModalityInfo, x: Tensor) -> list[np.ndarray]:
    """An ml-4m decoder's output -> omniforge label arrays (inverse of `prepare` where it has one; a standardised
    depth comes back scaled per image to the full value range, as omniforge stores relative depth)."""
    t = info.ml4m_transform
    x = x.detach().float().cpu()
    if t == "semseg":
        ids = x.argmax(dim=1).numpy().astype(np.int64) - 1  # (B, H, W); class 0 is "none"
        return list(np.where(ids < 0, 255, ids).astype(np.uint8))
    if t == "features":
        return [np.ascontiguousarray(a) for a in x.numpy().astype(np.float16).transpose(0, 2, 3, 1)]
    if t == "global":
        return [np.ascontiguousarray(a) for a in x.reshape(x.shape[0], -1).numpy().astype(np.float16)]
    if t == "pose":  # the decoder's 207 values as they are (the kind projects them to rotations)
        return [np.ascontiguousarray(a) for a in x.reshape(x.shape[0], -1).numpy().astype(np.float32)]
    if t == "mask":
        return list((x[:, 0].sigmoid() > 0.5).numpy().astype(np.uint8))
    lo, hi = info.value_range
    if t == "depth":
        flat = x.flatten(1)
        lo_i, hi_i = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
        unit = (x - lo_i) / (hi_i - lo_i).clamp(min=1e-12)
    else:
        unit = (x.clamp(-1, 1) + 1) / 2
    values = (unit * (hi - lo) + lo).numpy()
    values = values.astype(np.float32) if info.dtype == "float" else values.round().astype(info.dtype)
    values = values.transpose(0, 2, 3, 1)  # (B, H, W, C)
    return [a if a.shape[-1] > 1 else a[..., 0] for a in values]


def check_fits(model: Any, info: ModalityInfo, where: str, *, side: int | None, tokens: int) -> None:
    """WeightsError unless the ml-4m tokenizer in `where` reads this modality's labels (`side` x `side` inputs, or
    vectors when None) and makes `tokens` tokens of one."""
    c: ML4MConfig = model.config
    t = info.ml4m_transform
    if t is None:
        raise ConfigError(f"{where} is an ml-4m tokenizer, but modality {info.name!r} declares no ml-4m "
                          "preprocessing (ModalityInfo.ml4m_transform): it cannot use it")
    if t == "semseg":
        want, have, field = (info.num_classes or 0) + 1, c.n_labels, "n_labels"
    elif t in ("features", "global"):
        want, have, field = info.shape[-1], c.n_channels, "n_channels"
    elif t == "mask":
        want, have, field = 1, c.n_channels, "n_channels"
    elif t == "pose":
        from omniforge._smpl import POSE_CHANNELS

        want, have, field = POSE_CHANNELS, c.n_channels, "n_channels"
    else:
        want, have, field = info.channels, c.n_channels, "n_channels"
    if have != want or (t == "semseg") != (c.n_labels is not None) or (t in ("global", "pose")) != c.mlp_encoder:
        raise WeightsError(f"the ml-4m tokenizer in {where} ({c.family}, {field}={have}) does not fit modality "
                           f"{info.name!r} ({t}: {field}={want}); import the right one with "
                           f"`omniforge tokenizer import-4m {info.ml4m_tokenizer or 'SNAPSHOT'} --out DIR`")
    made = c.num_tokens(side) if side is not None else c.num_tokens()
    if made != tokens:
        raise WeightsError(f"the ml-4m tokenizer in {where} makes {made} tokens per input "
                           f"{'' if side is None else f'of {side} x {side} '}where modality {info.name!r} has {tokens}")
    from omniforge.tokenize.text import POSE_VOCAB, SAM_MASK_VOCAB

    if t == "mask" and c.codebook_size > SAM_MASK_VOCAB:
        raise WeightsError(f"the ml-4m SAM mask tokenizer in {where} has {c.codebook_size} codes; 4M-21's SAM "
                           f"serialization writes at most {SAM_MASK_VOCAB}")
    if t == "pose" and c.codebook_size > POSE_VOCAB:
        raise WeightsError(f"the ml-4m pose tokenizer in {where} has {c.codebook_size} codes; 4M-21's human_poses "
                           f"serialization writes at most {POSE_VOCAB}")


__all__ = ["DIFFUSION_LINE", "IGNORED", "KEY_MAP", "ML4MConfig", "ML4MTokenizer", "TRANSFORMS",  # noqa: F822 (lazy)
           "VIT_PRESETS", "VitPreset", "check_fits", "is_ml4m_model", "is_snapshot_config", "is_snapshot_dir",
           "load_snapshot", "map_state_dict", "mlp_shape", "prepare", "read_config", "register_vit_preset", "restore",
           "standardize_depth"]

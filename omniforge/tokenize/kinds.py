"""Tokenizer kinds: how the labels of a modality become tokens and come back.

A kind is a class registered by name (`@register_kind`); a modality names its kind in
`ModalityInfo.tokenizer`, and `kind_for(info)` binds the class to that modality. A kind owns everything
about its tokenizers: the tiny and base configs, the label -> model-input preparation, the restore of a
reconstruction for drawing, its quality metrics, its save/load, and how `omniforge tokenizer train` trains
it. The built-in kinds:

    kind          labels                         model space                          tokens
    vqvae         dense maps (png, jpg, npy)     float (B, C, 224, 224) in [-1, 1]    196, ViT VQ-VAE
    segmentation  class maps (png)               int64 (B, 224, 224) class ids        196, ViT VQ-VAE
                  (bound to `info.at(448)`: (B, C, 448, 448) / (B, 448, 448) crops, 784 tokens)
    features      (h, w, C) teacher features     float (B, C, h, w)                   h * w, ViT VQ-VAE
    memcodes      (D,) global vectors            float (B, D)                         16, Memcodes MLP
    sam_mask      SAM instances (json)           float (B, 1, 64, 64) masks           text + 16 per instance
    smpl_pose     HMR2.0 SMPL people (json)      float (B, 207) body poses            text + 8 per person
    wordpiece     json / txt via a serializer    text units                           WordPiece ids

Data flows through three spaces:

    label --crop_inputs()--> arrays --prepare()--> model batch --encode()--> ids (B, num_tokens)
    ids --decode()--> model-space reconstruction --restore()--> label arrays

Sequence kinds (`sequence = True`) instead turn one crop of a label into text units (`units`) that the
shared WordPiece vocabulary packs into the modality's token budget. A kind's trained files live in
`--tokenizers DIR/<folder>/`; `artifacts` lists what tokenizing needs and `artifact` what `omniforge
tokenizer train --modality <name>` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from omniforge.errors import ConfigError, SampleError
from omniforge.modalities import IMAGE_PATCH, IMAGE_SIZE, ModalityInfo, all_modalities
from omniforge.tokenize._registry import get_kind, kind_for, list_kinds, register_kind

if TYPE_CHECKING:
    from torch import Tensor

    from omniforge.tokenize.models import Tokenizer, TokenizerConfig
    from omniforge.tokenize.store import TokenizerStore
    from omniforge.tokenize.text import Crop
    from omniforge.tokenize.train_config import TokenizerTrainConfig, TrainResult

SIZES = ("tiny", "base")
MODEL_FILES = ("model.safetensors", "config.json")  # a trained VQ-VAE / Memcodes tokenizer (fingerprint order)
TEXT_FILES = ("tokenizer.json",)
TEXT_FOLDER = "text"  # the shared WordPiece vocabulary of every sequence modality
SAM_MASK_FOLDER = "sam_mask"  # the SAM instance-mask VQ-VAE

# dead-code threshold as 4M computes it: (tokens per batch / codebook size) / coefficient
_TINY_DEAD_CODE_THRESHOLD = 2.0
_DEAD_CODE_COEF = 32.0
_REFERENCE_BATCH = {"tiny": 8, "base": 64}
_TINY_CODEBOOK = 128
_PSNR_MSE_FLOOR = 1e-10  # identical data gives a finite 106 dB instead of inf (JSON has no inf)
_NONE_LABEL = 255  # "no class" in a class-map png


@dataclass(frozen=True)
class Artifact:
    """One trained tokenizer in a --tokenizers directory."""

    folder: str  # subfolder of --tokenizers
    files: tuple[str, ...]  # the files that identify it (their content is its fingerprint)
    trained_by: str  # the modality `omniforge tokenizer train --modality` trains it from

    def train_hint(self, directory: str) -> str:
        from omniforge.modalities import get_modality

        hint = f"train it with `omniforge tokenizer train --data LABELS --modality {self.trained_by} --out {directory}`"
        repo = get_modality(self.trained_by).ml4m_tokenizer if self.folder != TEXT_FOLDER else None
        if repo is not None:
            hint += f", or lay out Apple's with `omniforge tokenizer import-4m {repo} --out {directory}`"
        elif self.folder == TEXT_FOLDER:
            hint += (", or lay out ml-4m's vocabulary with `omniforge tokenizer import-4m "
                     f"text_tokenizer_4m_wordpiece_30k.json --out {directory}`")
        return hint


class TokenizerKind:
    """How one modality's labels become tokens and back; an instance is bound to one modality (`info`).

    Subclasses set `name` (the registry name a ModalityInfo's `tokenizer` field uses), `crops` (the
    ModalityInfo.crop values it supports) and, for trained models, `model_kind` (the TokenizerConfig.kind of
    the models it saves) and `summary_metrics` (the quality metrics worth a line), and implement the methods
    of their family.
    """

    name: ClassVar[str]
    crops: ClassVar[tuple[str, ...]]
    sequence: ClassVar[bool] = False
    model_kind: ClassVar[str | None] = None
    summary_metrics: ClassVar[tuple[str, ...]] = ()  # quality metrics the progress and summary lines show
    draws_reconstruction: ClassVar[bool] = True  # `tokenizer train` draws reconstruction.png

    def __init__(self, info: ModalityInfo):
        if info.crop not in self.crops:
            raise ConfigError(f"modality {info.name!r}: tokenizer kind {self.name!r} supports crop "
                              f"{' or '.join(map(repr, self.crops))}, not {info.crop!r}")
        self.info = info
        self.check()

    def check(self) -> None:
        """Raise ConfigError when `info` lacks a field this kind needs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name!r})"

    # -- trained files

    @property
    def artifact(self) -> Artifact:
        """What `omniforge tokenizer train --modality <this modality>` writes."""
        return Artifact(self.info.name, MODEL_FILES, self.info.name)

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        """What tokenizing this modality needs."""
        return (self.artifact,)

    # -- the model

    def config(self, size: str = "tiny") -> TokenizerConfig:
        """The model config at `size`: "tiny" (fast CPU tests) or "base" (the 4M-21 scale)."""
        raise self._no("model config")

    def build(self, config: TokenizerConfig) -> Tokenizer:
        """A freshly initialised model (training mode). Seeds nothing: callers seed torch themselves."""
        from omniforge.tokenize.models import build_tokenizer

        return build_tokenizer(config)

    def save(self, model: Tokenizer, directory: str) -> None:
        from omniforge.tokenize.models import save_tokenizer

        save_tokenizer(model, directory)

    def load(self, directory: str, device: str = "cpu") -> Tokenizer:
        """A trained model in eval mode; WeightsError when it is missing, corrupt or of another kind.

        The folder may instead hold a snapshot of one of Apple's released tokenizers (ml-4m's hub layout):
        it loads through `omniforge.tokenize.ml4m`, checked against this modality (`ml4m_input_side`)."""
        from omniforge.errors import WeightsError
        from omniforge.tokenize import ml4m
        from omniforge.tokenize.models import load_tokenizer

        if ml4m.is_snapshot_dir(directory):
            model = ml4m.load_snapshot(directory, device=device)
            ml4m.check_fits(model, self.info, directory, side=self.ml4m_input_side(), tokens=self.tokens_per_input)
            return model
        model = load_tokenizer(directory, device=device)
        c = model.config
        expected = self.config("tiny")
        if c.kind != self.model_kind or c.in_channels != expected.in_channels or c.image_size != expected.image_size:
            raise WeightsError(f"the tokenizer in {directory} ({c.kind}, {c.in_channels} channels at {c.image_size}) "
                               f"does not fit modality {self.info.name!r} ({self.model_kind}, {expected.in_channels} "
                               f"channels at {expected.image_size}): {self.artifact.train_hint(directory)}")
        return model

    @property
    def tokens_per_input(self) -> int:
        """Tokens the model makes of one model input: the registry's num_tokens (16 per SAM instance mask)."""
        return int(self.info.num_tokens)

    def ml4m_input_side(self) -> int | None:
        """The side of one model input (224, a feature map's h, 64 for SAM masks); None for vectors."""
        shape, _ = self.input_layout()
        return shape[0] if len(shape) > 1 else None

    # -- arrays

    def prepare_for(self, model: Any, arrays: list[np.ndarray]) -> Tensor:
        """`prepare` for the tokenizer `model` will read: for one of Apple's released ml-4m tokenizers, ml-4m's
        preprocessing of this modality (`ModalityInfo.ml4m_transform`), whatever this kind's own is."""
        from omniforge.tokenize import ml4m

        if ml4m.is_ml4m_model(model):
            return ml4m.prepare(self.info, self._check(arrays))
        return self.prepare(arrays)

    def restore_for(self, model: Any, x: Tensor) -> list[np.ndarray]:
        """`restore` of what `model` decoded (ml-4m's model space for a released ml-4m tokenizer)."""
        from omniforge.tokenize import ml4m

        if ml4m.is_ml4m_model(model):
            return ml4m.restore(self.info, x)
        return self.restore(x)

    def _no(self, what: str) -> ConfigError:
        return ConfigError(f"tokenizer kind {self.name!r} (modality {self.info.name!r}) has no {what}")

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        """The shape of one model-input array and its dtype ("uint8", "uint16" or "float")."""
        raise self._no("model inputs")

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        """Model-input arrays (already cropped to the input size) -> one model batch.

        Raises SampleError("bad_shape" | "bad_dtype" | "bad_value", ...) naming what was expected."""
        raise self._no("model inputs")

    def restore(self, x: Tensor) -> list[np.ndarray]:
        """Inverse of prepare for decode() outputs: back to the label dtype and layout, one array per sample."""
        raise self._no("model outputs")

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        """Reconstruction quality of a prepared batch `x` against decode() output `recon`, by metric name."""
        raise self._no("reconstruction quality")

    def example_inputs(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """`n` random valid model-input arrays (contract tests, benchmarks)."""
        shape, dtype = self.input_layout()
        if dtype == "float":
            return [rng.standard_normal(shape).astype(np.float16) for _ in range(n)]
        info = np.iinfo(np.dtype(dtype))
        return [rng.integers(0, info.max, size=shape, endpoint=True).astype(dtype) for _ in range(n)]

    def _check(self, arrays: list[np.ndarray]) -> np.ndarray:
        shape, dtype = self.input_layout()
        name = self.info.name
        if len(arrays) == 0:
            raise ValueError(f"prepare({name!r}) needs at least one array")
        checked = []
        for arr in arrays:
            arr = np.asarray(arr)
            if arr.shape != shape:
                raise SampleError("bad_shape", f"{name} tokenizer input must have shape {shape}, got {arr.shape}")
            if dtype == "float":
                if not np.issubdtype(arr.dtype, np.floating):
                    raise SampleError("bad_dtype", f"{name} tokenizer input must be float16/32, got {arr.dtype}")
                if not np.isfinite(arr).all():
                    raise SampleError("bad_value", f"{name} tokenizer input holds NaN or infinite values")
            elif arr.dtype != np.dtype(dtype):
                raise SampleError("bad_dtype", f"{name} tokenizer input must be {dtype}, got {arr.dtype}")
            checked.append(arr)
        return np.stack(checked)

    # -- labels

    def label_size(self, label: Any) -> tuple[int, int] | None:
        """(H, W) of the image a label belongs to, when crops can be cut from it; None otherwise."""
        return None

    def count_inputs(self, label: Any) -> int:
        """How many model inputs `crop_inputs` makes of one label (an epoch of `tokenizer train` is one pass
        over them): one, except for kinds like SAM instances (one per instance mask)."""
        return 1

    one_input_per_label: ClassVar[bool] = True  # count_inputs is 1 for every label (no need to read them)

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        """The model-input arrays of one crop (`row`: top, left, h, w, hflip) of a decoded label.

        Teacher-crop kinds (features, global) return the stored label: it is crop 0, the only crop a label
        holds (the tokenize job re-runs the teacher for the others)."""
        raise self._no("model inputs")

    # -- sequences

    def units(self, label: Any, crop: Crop, store: TokenizerStore) -> list[str]:
        """Sequence kinds: one crop of a label as 4M-21 text units (whole units are never split)."""
        raise self._no("text units")

    # -- training and drawing

    def train(self, cfg: TokenizerTrainConfig, *, progress: bool = True, verbose: bool = True) -> TrainResult:
        """`omniforge tokenizer train` for this modality: the VQ/Memcodes trainer by default."""
        from omniforge.tokenize.train import train_model

        return train_model(cfg, self, progress=progress, verbose=verbose)

    def ml4m_form(self, label: Any, crops: np.ndarray, store: TokenizerStore) -> Any:
        """The label in ml-4m's form for `omniforge export --dialect ml4m`, for kinds whose modality has
        `ml4m="export"` (an array is saved as a `.npy`, pickled when it is an object array; any other value is
        written in the modality's own extension, e.g. JSON)."""
        raise ConfigError(f"{self.info.name}: the {self.name} tokenizer kind has no ml-4m export form: set the "
                          "modality's ml4m to 'direct' or 'none'")

    def decode(self, ids: np.ndarray, store: TokenizerStore) -> Any:
        """Token ids of one crop -> what `show` and `sample` draw: a label array, or text for sequences."""
        import torch

        model = store.model(self)
        with torch.inference_mode():
            recon = model.decode(torch.from_numpy(np.asarray(ids).astype(np.int64))[None])
        return self.restore_for(model, recon)[0]

    def in_image(self, decoded: Any, crop: Crop) -> Any:
        """`decode`'s output for tokens made from `crop`, placed in the frame of the crop's image, for kinds whose
        decoded label holds image coordinates (human_poses' boxes); the others' output is the crop itself, as is."""
        return decoded


# ------------------------------------------------------------------------------------------ VQ-VAE kinds


def _vq_config(name: str, model_kind: str, *, in_channels: int, image_size: int, patch_size: int, codebook: int,
               size: str, **extra: Any) -> TokenizerConfig:
    from omniforge.tokenize.models import TokenizerConfig

    if size not in SIZES:
        raise ConfigError(f"unknown tokenizer size {size!r}; choose one of {', '.join(SIZES)}")
    tiny = size == "tiny"
    num_tokens = (image_size // patch_size) ** 2
    codebook_size = _TINY_CODEBOOK if tiny else codebook
    # ml-4m's rule for real runs (expected hits per code per batch / 32). Tiny runs are a few dozen steps:
    # at that threshold their codebook sits on a handful of codes for hundreds of steps before restarts
    # rescue it, so they restart codes that average under 2 hits per batch from the start.
    threshold = _REFERENCE_BATCH[size] * num_tokens / codebook_size / _DEAD_CODE_COEF
    if tiny:
        threshold = max(_TINY_DEAD_CODE_THRESHOLD, threshold)
    return TokenizerConfig(
        name=name, kind=model_kind, in_channels=in_channels, image_size=image_size, patch_size=patch_size,
        codebook_size=codebook_size, latent_dim=32, dim=64 if tiny else 768, depth=1 if tiny else 12,
        heads=2 if tiny else 12, num_tokens=num_tokens, class_emb_dim=8 if tiny else 32,
        threshold_ema_dead_code=threshold, **extra)


class _ImageKind(TokenizerKind):
    """A ViT VQ-VAE on a square grid: its token count at 224 is the registry's. Bound to the entry of another
    token size (`info.at(448)`), the same tokenizer reads crops of that side (784 tokens at 448)."""

    def check(self) -> None:
        cfg, expected = self.config("tiny"), self.info.at(IMAGE_SIZE).num_tokens
        if cfg.num_tokens != expected:
            raise ConfigError(f"modality {self.info.name!r}: its {self.name} tokenizer makes {cfg.num_tokens} "
                              f"tokens per crop, the registry says num_tokens={expected}")


@register_kind
class VQVAEKind(_ImageKind):
    """Dense maps at the image's resolution (rgb, depth, normal, edges, a plugin's png or npy map).

    A crop is resized with the registry's `resample`; values are mapped from `value_range` to [-1, 1]
    (float (B, C, 224, 224)); the VQ-VAE is trained with MSE; quality is PSNR (dB, data range 2) and MSE.
    """

    name = "vqvae"
    crops = ("dense",)
    model_kind = "pixels"
    summary_metrics = ("psnr", "mse")

    def config(self, size: str = "tiny") -> TokenizerConfig:
        return _vq_config(self.info.name, self.model_kind, in_channels=self.info.channels, image_size=IMAGE_SIZE,
                          patch_size=IMAGE_PATCH, codebook=self.info.vocab_size, size=size)

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        c, side = self.info.channels, self.info.token_size  # 224, or the size of an `info.at(size)` entry
        return ((side, side, c) if c > 1 else (side, side)), self.info.dtype

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        batch = self._check(arrays)
        lo, hi = self.info.value_range
        x = torch.from_numpy((batch.astype(np.float32) - lo) / (hi - lo) * 2.0 - 1.0)
        return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x.unsqueeze(1)  # (B, C, H, W)

    def restore(self, x: Tensor) -> list[np.ndarray]:
        lo, hi = self.info.value_range
        x = x.detach().float().cpu().clamp(-1, 1)
        values = ((x + 1) / 2 * (hi - lo) + lo).numpy()
        if self.info.dtype == "float":
            batch = values.astype(np.float32)
        else:
            batch = values.round().astype(self.info.dtype)
        batch = batch.transpose(0, 2, 3, 1)  # (B, H, W, C)
        return [a if a.shape[-1] > 1 else a[..., 0] for a in batch]

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        import torch

        x, recon = x.detach().cpu(), recon.detach().cpu().float()
        err = (recon.clamp(-1, 1) - x.float()) ** 2
        per_image = err.flatten(1).mean(dim=1).clamp(min=_PSNR_MSE_FLOOR)
        psnr = (10 * torch.log10(4.0 / per_image)).mean()
        return {"psnr": float(psnr), "mse": float(err.mean())}

    def example_inputs(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        if self.info.dtype != "float":
            return super().example_inputs(n, rng)
        lo, hi = self.info.value_range
        shape, _ = self.input_layout()
        return [rng.uniform(lo, hi, size=shape).astype(np.float16) for _ in range(n)]

    def label_size(self, label: Any) -> tuple[int, int]:
        arr = np.asarray(label)
        return int(arr.shape[0]), int(arr.shape[1])

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        from omniforge.tokenize.crops import crop_dense

        return [crop_dense(np.asarray(label), row, size, mode=self.info.resample)]


@register_kind
class SegmentationKind(VQVAEKind):
    """Class maps (semseg_coco): ids 0..num_classes-1 and 255 = none, cropped with nearest resampling.

    Model space: int64 (B, 224, 224) class ids with none as class num_classes; the VQ-VAE embeds classes and
    predicts num_classes + 1 logits (cross-entropy); quality is mIoU over the classes present in the target
    or the prediction (none included) and pixel accuracy.
    """

    name = "segmentation"
    model_kind = "segmentation"
    summary_metrics = ("miou",)

    @property
    def none_class(self) -> int:
        return self.info.num_classes

    def config(self, size: str = "tiny") -> TokenizerConfig:
        return _vq_config(self.info.name, self.model_kind, in_channels=self.info.num_classes + 1,
                          image_size=IMAGE_SIZE, patch_size=IMAGE_PATCH, codebook=self.info.vocab_size, size=size)

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        return (self.info.token_size, self.info.token_size), "uint8"

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        batch = self._check(arrays)
        bad = (batch >= self.none_class) & (batch != _NONE_LABEL)
        if bad.any():
            raise SampleError("bad_value", f"{self.info.name} class ids must be 0..{self.none_class - 1} or "
                                           f"{_NONE_LABEL} (none), got {int(batch[bad][0])}")
        ids = batch.astype(np.int64)
        ids[ids == _NONE_LABEL] = self.none_class
        return torch.from_numpy(ids)  # (B, H, W)

    def restore(self, x: Tensor) -> list[np.ndarray]:
        ids = x.detach().float().cpu().argmax(dim=1).numpy().astype(np.uint8)  # (B, H, W)
        ids[ids == self.none_class] = _NONE_LABEL
        return list(ids)

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        import torch

        pred, target = recon.detach().cpu().float().argmax(dim=1), x.detach().cpu().long()
        ious = []
        for cls in torch.unique(torch.cat([pred.unique(), target.unique()])):
            p, t = pred == cls, target == cls
            ious.append(float((p & t).sum()) / float((p | t).sum()))
        return {"miou": float(np.mean(ious)), "pixel_acc": float((pred == target).float().mean())}

    def example_inputs(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        side = self.info.token_size
        ids = [rng.integers(0, self.none_class, size=(side, side)).astype(np.uint8) for _ in range(n)]
        for a in ids:
            a[: side // 4] = _NONE_LABEL
        return ids

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        return super().crop_inputs(np.asarray(label), row, size)  # a P-mode png -> its class ids


class _StoredKind(TokenizerKind):
    """Teacher outputs the label job stores for crop 0 (feature maps, global vectors): the model reads them as
    stored; quality is their mean cosine similarity (per position, or per vector)."""

    summary_metrics = ("cosine",)

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        return tuple(self.info.shape), "float"

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        import torch.nn.functional as F

        cos = F.cosine_similarity(recon.detach().cpu().float(), x.detach().cpu().float(), dim=1)
        return {"cosine": float(cos.mean())}

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        return [np.asarray(label)]


@register_kind
class FeaturesKind(_StoredKind, _ImageKind):
    """(h, w, C) teacher feature maps (clip, dinov2, imagebind), stored for crop 0 only.

    Model space: float (B, C, h, w) as stored, patch size 1; trained with smooth-L1 plus cosine distance. The
    model is the one of the stored (224) map; an entry at another size (`info.at(448)`) reads the teacher's map
    at that size, (h * S / 224, w * S / 224, C): (28, 28, 512) for tok_clip@448.
    """

    name = "features"
    crops = ("features",)
    model_kind = "features"

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        h, w, c = self.info.shape  # the stored map, at IMAGE_SIZE
        scale = self.info.token_size
        return (h * scale // IMAGE_SIZE, w * scale // IMAGE_SIZE, c), "float"

    def check(self) -> None:
        h, w, _ = self.info.shape
        if h != w:
            raise ConfigError(f"modality {self.info.name!r}: feature maps must be square for the ViT tokenizer, got "
                              f"{self.info.shape}")
        super().check()

    def config(self, size: str = "tiny") -> TokenizerConfig:
        h, _, c = self.info.shape
        return _vq_config(self.info.name, self.model_kind, in_channels=c, image_size=h, patch_size=1,
                          codebook=self.info.vocab_size, size=size)

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        return torch.from_numpy(self._check(arrays).astype(np.float32)).permute(0, 3, 1, 2).contiguous()

    def restore(self, x: Tensor) -> list[np.ndarray]:
        batch = x.detach().float().cpu().numpy().astype(np.float16).transpose(0, 2, 3, 1)  # (B, h, w, C)
        return [np.ascontiguousarray(a) for a in batch]


@register_kind
class MemcodesKind(_StoredKind):
    """(D,) global vectors (dinov2_global, imagebind_global): a bottleneck MLP to `num_tokens` Memcodes
    positions and back. Model space float (B, D); quality is the mean cosine similarity per vector."""

    name = "memcodes"
    crops = ("global",)
    model_kind = "global"
    draws_reconstruction = False

    def config(self, size: str = "tiny") -> TokenizerConfig:
        from omniforge.tokenize.models import TokenizerConfig

        if size not in SIZES:
            raise ConfigError(f"unknown tokenizer size {size!r}; choose one of {', '.join(SIZES)}")
        tiny = size == "tiny"
        return TokenizerConfig(
            name=self.info.name, kind=self.model_kind, in_channels=self.info.shape[0], image_size=0, patch_size=0,
            codebook_size=_TINY_CODEBOOK if tiny else self.info.vocab_size, latent_dim=32 if tiny else 64,
            dim=128 if tiny else 1024, depth=2 if tiny else 6, heads=0, num_tokens=self.info.num_tokens)

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        return torch.from_numpy(self._check(arrays).astype(np.float32))  # (B, D)

    def restore(self, x: Tensor) -> list[np.ndarray]:
        return [np.ascontiguousarray(a) for a in x.detach().float().cpu().numpy().astype(np.float16)]


# --------------------------------------------------------------------------------------------- sequences


def text_artifact() -> Artifact:
    """The shared WordPiece vocabulary, trained from the first plain-text sequence modality (the captions)."""
    source = next((m.name for m in all_modalities() if m.tokenizer == WordPieceKind.name and m.ext == "txt"),
                  "<a plain-text modality>")
    return Artifact(TEXT_FOLDER, TEXT_FILES, source)


@register_kind
class WordPieceKind(TokenizerKind):
    """Sequence modalities serialized as 4M-21 text and tokenized by the shared WordPiece vocabulary.

    The modality's `serializer` turns (label, crop) into text units; `omniforge tokenizer train` on a plain
    text modality (ext txt, the captions) trains the vocabulary every sequence modality shares.
    """

    name = "wordpiece"
    crops = ("sequence",)
    sequence = True
    draws_reconstruction = False

    def check(self) -> None:
        if self.info.serializer is None:
            raise ConfigError(f"modality {self.info.name!r} uses the wordpiece tokenizer but declares no "
                              "serializer: give ModalityInfo(serializer='package.module:function')")

    @property
    def artifact(self) -> Artifact:
        return text_artifact()

    def units(self, label: Any, crop: Crop, store: TokenizerStore) -> list[str]:
        return self.info.resolve_serializer()(label, crop)

    def decode(self, ids: np.ndarray, store: TokenizerStore) -> str:
        return store.text().decode(np.asarray(ids).tolist())

    def train(self, cfg: TokenizerTrainConfig, *, progress: bool = True, verbose: bool = True) -> TrainResult:
        if self.info.ext != "txt":
            art = self.artifact
            raise ConfigError(f"{self.info.name} is serialized into the shared WordPiece vocabulary "
                              f"({art.folder}/), which is trained from plain text: use --modality {art.trained_by}")
        from omniforge.tokenize.train import train_text

        return train_text(cfg, verbose=verbose)


@register_kind
class SamInstanceKind(TokenizerKind):
    """SAM instances: 4M-21's query points, each followed by the instances containing it,
    every instance a box and the 16 tokens of its mask (a ViT VQ-VAE on 64 x 64 binary masks, trained on
    every instance of every sample). Mask model space: float (B, 1, 64, 64) in {0, 1}; quality: mask IoU.
    """

    name = "sam_mask"
    crops = ("sequence",)
    sequence = True
    model_kind = "mask"
    summary_metrics = ("iou",)
    MASK_SIZE = 64
    MASK_CODEBOOK = 1024

    @property
    def artifact(self) -> Artifact:
        return Artifact(SAM_MASK_FOLDER, MODEL_FILES, self.info.name)

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return text_artifact(), self.artifact

    def config(self, size: str = "tiny") -> TokenizerConfig:
        return _vq_config(SAM_MASK_FOLDER, self.model_kind, in_channels=1, image_size=self.MASK_SIZE,
                          patch_size=IMAGE_PATCH, codebook=self.MASK_CODEBOOK, size=size)

    @property
    def tokens_per_input(self) -> int:
        return self.config("tiny").num_tokens

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        return (self.MASK_SIZE, self.MASK_SIZE), "uint8"

    def _check(self, arrays: list[np.ndarray]) -> np.ndarray:
        arrays = [np.asarray(a) for a in arrays]
        for arr in arrays:
            if arr.dtype not in (np.uint8, np.bool_):
                raise SampleError("bad_dtype", f"{self.info.name} mask tokenizer input must be uint8 0/1, "
                                               f"got {arr.dtype}")
        return super()._check([a.astype(np.uint8) for a in arrays])

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        return torch.from_numpy((self._check(arrays) > 0).astype(np.float32)).unsqueeze(1)  # (B, 1, 64, 64)

    def restore(self, x: Tensor) -> list[np.ndarray]:
        return list((x.detach().float().cpu()[:, 0] > 0.5).numpy().astype(np.uint8))

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        p, t = recon.detach().cpu().float() > 0.5, x.detach().cpu() > 0.5
        union = float((p | t).sum())
        return {"iou": float((p & t).sum()) / union if union else 1.0}

    def example_inputs(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        return [(rng.random((self.MASK_SIZE, self.MASK_SIZE)) > 0.5).astype(np.uint8) for _ in range(n)]

    one_input_per_label = False

    def count_inputs(self, label: Any) -> int:
        return len(label.get("instances", []))

    def label_size(self, label: Any) -> tuple[int, int]:
        height, width = (int(v) for v in label["image_size"])
        return height, width

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        from omniforge.tokenize.crops import crop_sam

        height, width = self.label_size(label)
        instances = crop_sam(label, row, height, width, size=size, mask_size=self.MASK_SIZE)
        return [inst.mask for inst in instances if np.any(inst.mask)]

    def units(self, label: Any, crop: Crop, store: TokenizerStore) -> list[str]:
        from omniforge.tokenize import text
        from omniforge.tokenize.crops import crop_sam

        instances = crop_sam(label, crop.row, crop.height, crop.width, size=crop.size, mask_size=self.MASK_SIZE)
        tokens = store.encode(self, [i.mask for i in instances]) if instances else []
        polygons = [(text.sam_contours(i.full)[0], t.tolist()) for i, t in zip(instances, tokens)]
        return text.sam_draw_units(polygons, crop.generator(text.DRAW_SAM), size=crop.size)

    def ml4m_form(self, label: Any, crops: np.ndarray, store: TokenizerStore) -> np.ndarray:
        """ml-4m's pre-tokenized sam_instance of one sample: an object array with one dict per crop, "points"
        (per instance, its polygons in the size x size crop, int32 (n, 1, 2) [x, y], largest first),
        "token_ids" (int32 (instances, 16), this kind's SAM-mask tokens) and "bbox" (int32 (instances, 4)
        [ymin, xmin, ymax, xmax], the first polygon's box): what ml-4m's SAMInstanceTokTransform loads."""
        from omniforge.tokenize import text
        from omniforge.tokenize.crops import crop_sam

        height, width = self.label_size(label)
        out = np.empty(len(crops), dtype=object)
        for c, row in enumerate(np.asarray(crops)):
            instances = crop_sam(label, row, height, width, size=IMAGE_SIZE, mask_size=self.MASK_SIZE)
            tokens = store.encode(self, [i.mask for i in instances]) if instances else np.zeros((0, 16))
            polygons = [text.sam_contours(i.full) for i in instances]
            boxes = [text.sam_bbox(p[0]) for p in polygons]  # (xmin, ymin, xmax, ymax)
            out[c] = {"points": polygons, "token_ids": np.asarray(tokens, np.int32).reshape(len(instances), -1),
                      "bbox": np.asarray([[b[1], b[0], b[3], b[2]] for b in boxes], np.int32).reshape(-1, 4)}
        return out

    def decode(self, ids: np.ndarray, store: TokenizerStore) -> str:
        return store.text().decode(np.asarray(ids).tolist())


@register_kind
class SmplPoseKind(TokenizerKind):
    """HMR2.0's people (human_poses) as 4M-21 writes them: per person a box, the 8 tokens of its body pose and its
    global orientation, camera and shape as value tokens, the four groups in an order drawn per person
    (`text.smpl_person_unit`); "none" when nobody is in the crop.

    The learned part is the pose tokenizer: a Memcodes bottleneck MLP (ml-4m's human-poses tokenizer: 8 tokens,
    1024 codes, 6 blocks of width 1024 at "base") of one person's body pose, its 23 (3, 3) joint rotations
    flattened to 207 values, trained on every person of every label. Model space float (B, 207); quality is the
    mean joint rotation error in degrees (each reconstructed (3, 3) projected to the nearest rotation, then its
    geodesic angle to the input's). Its folder is `human_poses/` (or a snapshot of Apple's
    `4M_tokenizers_human-poses_1k_8`, fed the body pose as is: ml4m_transform "pose").

    Departures from ml-4m: a flipped crop mirrors the people (`crops.crop_smpl`; ml-4m ignores the flip), the
    global orientation and betas are clipped to ml-4m's stated ranges (`text.smpl_person_unit`), and the tokenizer
    trains on every person of a label, never on the all-zero "pose" ml-4m's `only_pose` gives an image of nobody.
    """

    name = "smpl_pose"
    crops = ("sequence",)
    sequence = True
    model_kind = "global"
    summary_metrics = ("rotation_error_deg",)
    draws_reconstruction = False
    one_input_per_label = False
    POSE_TOKENS = 8
    POSE_CODEBOOK = 1024
    DECODED_SIZE = IMAGE_SIZE  # a decoded label's boxes are pixels of the crop at this side

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return text_artifact(), self.artifact

    def config(self, size: str = "tiny") -> TokenizerConfig:
        from omniforge._smpl import POSE_CHANNELS
        from omniforge.tokenize.models import TokenizerConfig

        if size not in SIZES:
            raise ConfigError(f"unknown tokenizer size {size!r}; choose one of {', '.join(SIZES)}")
        tiny = size == "tiny"
        return TokenizerConfig(
            name=self.info.name, kind=self.model_kind, in_channels=POSE_CHANNELS, image_size=0, patch_size=0,
            codebook_size=_TINY_CODEBOOK if tiny else self.POSE_CODEBOOK, latent_dim=32 if tiny else 128,
            dim=128 if tiny else 1024, depth=2 if tiny else 6, heads=0, num_tokens=self.POSE_TOKENS)

    @property
    def tokens_per_input(self) -> int:
        return self.POSE_TOKENS

    def input_layout(self) -> tuple[tuple[int, ...], str]:
        from omniforge._smpl import POSE_CHANNELS

        return (POSE_CHANNELS,), "float"

    def prepare(self, arrays: list[np.ndarray]) -> Tensor:
        import torch

        return torch.from_numpy(self._check(arrays).astype(np.float32))  # (B, 207)

    def restore(self, x: Tensor) -> list[np.ndarray]:
        """Decoded (B, 207) -> float32 (207,) each, every (3, 3) block projected to the nearest rotation."""
        from omniforge._smpl import nearest_rotation

        flat = x.detach().float().cpu().numpy().reshape(x.shape[0], -1, 3, 3)
        return [a.reshape(-1) for a in nearest_rotation(flat).astype(np.float32)]

    def quality(self, x: Tensor, recon: Tensor) -> dict[str, float]:
        from omniforge._smpl import nearest_rotation, rotation_angle_deg

        target = x.detach().float().cpu().numpy().reshape(x.shape[0], -1, 3, 3)
        got = nearest_rotation(recon.detach().float().cpu().numpy().reshape(target.shape))
        return {"rotation_error_deg": float(rotation_angle_deg(got, target).mean())}

    def example_inputs(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        from omniforge._smpl import BODY_JOINTS, random_rotations

        return [r.astype(np.float32).reshape(-1) for r in random_rotations(rng, (n, len(BODY_JOINTS)), 60.0)]

    def count_inputs(self, label: Any) -> int:
        from omniforge.tokenize.crops import smpl_people

        return len(smpl_people(label))

    def crop_inputs(self, label: Any, row: np.ndarray, size: int) -> list[np.ndarray]:
        """Every person's body pose (float32 (207,)) as stored: the pose does not depend on the crop (a flipped
        crop's mirrored poses are poses too)."""
        from omniforge.tokenize.crops import smpl_people

        return [p.pose_input() for p in smpl_people(label)]

    def crop_people(self, label: Any, crop: Crop, store: TokenizerStore) -> list[dict]:
        """The people of one crop as `text.smpl_units` reads them: box, the pose tokenizer's 8 tokens of the
        (mirrored, on a flipped crop) body pose, global orientation, betas and camera (`crops.crop_smpl`)."""
        from omniforge.tokenize.crops import crop_smpl

        persons = crop_smpl(label, crop.row, crop.height, crop.width)
        tokens = store.encode(self, [p.pose_input() for p in persons]) if persons else []
        return [{"box": p.box, "pose_tokens": t.tolist(), "global_orient": p.global_orient, "betas": p.betas,
                 "pred_cam": p.cam} for p, t in zip(persons, tokens)]

    def units(self, label: Any, crop: Crop, store: TokenizerStore) -> list[str]:
        """One unit per person of the crop (or ["none"]), each person's group order drawn from
        `crop.generator(DRAW_POSES)` (per training sample in the trainer, frozen per crop in the tokenize job)."""
        from omniforge.tokenize import text

        people = self.crop_people(label, crop, store)
        return text.smpl_units(people, text.smpl_group_orders(len(people), crop.generator(text.DRAW_POSES)))

    def ml4m_form(self, label: Any, crops: np.ndarray, store: TokenizerStore) -> dict:
        """The label as ml-4m's HumanPoseTransform reads it, a JSON object: the label itself plus "pose_tokenized",
        int (N, 8), this kind's pose tokens of each person's body pose ({} stays {}). The crops do not enter: ml-4m
        crops the boxes itself (and ignores a flip)."""
        from omniforge.tokenize.crops import smpl_people

        people = smpl_people(label)
        if not people:
            return {}
        tokens = store.encode(self, [p.pose_input() for p in people])
        return {**label, "pose_tokenized": tokens.astype(np.int64).tolist()}

    def decode(self, ids: np.ndarray, store: TokenizerStore) -> dict:
        """Token ids of one crop -> the people they describe, as a human_poses label ({} for nobody): the text
        parsed (`text.parse_smpl_poses`), each person's pose tokens decoded by the pose tokenizer and every joint
        projected to the nearest rotation, the global orientation likewise; "bbox_xyxy" in pixels of the crop at
        DECODED_SIZE x DECODED_SIZE (224) (`in_image` places them in the crop's image). A generated person whose
        pose tokens the tokenizer has no code for (a tiny tokenizer has 128) is left out."""
        import torch

        from omniforge._smpl import BODY_JOINTS, nearest_rotation
        from omniforge.tokenize import text

        people = text.parse_smpl_poses(store.text().decode(np.asarray(ids).tolist()))
        if not people:
            return {}
        model = store.model(self)
        codes = store.codebook_size(self) or self.POSE_CODEBOOK
        people = [p for p in people if max(p["pose_tokens"]) < codes]  # ids the tokenizer has no code for
        if not people:
            return {}
        with torch.inference_mode():
            flat = model.decode(torch.tensor([p["pose_tokens"] for p in people], dtype=torch.int64))
        poses = nearest_rotation(flat.float().cpu().numpy().reshape(len(people), len(BODY_JOINTS), 3, 3))
        orients = nearest_rotation(np.asarray([p["global_orient"] for p in people]))
        side = self.DECODED_SIZE
        return {"bbox_xyxy": [[c * side for c in p["bbox"]] for p in people],
                "pred_smpl_params": {"global_orient": orients[:, None].tolist(), "body_pose": poses.tolist(),
                                     "betas": [p["betas"] for p in people]},
                "pred_cam": [p["pred_cam"] for p in people]}

    def in_image(self, decoded: dict, crop: Crop) -> dict:
        """Decoded people (boxes in pixels of the DECODED_SIZE crop) in the pixels of the crop's image (its height x
        width frame): a flipped crop's people mirrored back (`omniforge._smpl.mirror_person`), then the crop's map
        inverted (x_image = left + x * w / DECODED_SIZE, y_image = top + y * h / DECODED_SIZE). The crop camera
        needs nothing else: it refers to the person's box, wherever that lies."""
        from omniforge._smpl import mirror_person

        if not decoded:
            return decoded
        top, left, h, w, flip = (int(v) for v in np.asarray(crop.row).reshape(-1))
        boxes = np.asarray(decoded["bbox_xyxy"], np.float64) / self.DECODED_SIZE  # normalized to the crop
        smpl = decoded["pred_smpl_params"]
        orients, poses = np.asarray(smpl["global_orient"])[:, 0], np.asarray(smpl["body_pose"])
        cams = np.asarray(decoded["pred_cam"], np.float64)
        if flip:
            boxes = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], 1)
            mirrored = [mirror_person(o, p, b, c) for o, p, b, c in zip(orients, poses, smpl["betas"], cams)]
            orients, poses, cams = (np.stack([m[i] for m in mirrored]) for i in (0, 1, 3))
        pixels = boxes * np.array([w, h, w, h], np.float64) + np.array([left, top, left, top], np.float64)
        return {"bbox_xyxy": pixels.tolist(),
                "pred_smpl_params": {"global_orient": orients[:, None].tolist(), "body_pose": poses.tolist(),
                                     "betas": smpl["betas"]},
                "pred_cam": cams.tolist()}


__all__ = ["Artifact", "FeaturesKind", "MemcodesKind", "SIZES", "SamInstanceKind", "SegmentationKind", "SmplPoseKind",
           "TokenizerKind", "VQVAEKind", "WordPieceKind", "get_kind", "kind_for", "list_kinds", "register_kind",
           "text_artifact"]

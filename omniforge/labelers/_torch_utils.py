"""Machinery shared by the torch teachers (clip, dinov2): weight loading, preprocessing, batching.

A `TorchLabeler` subclass says how to build its model three ways (the publisher's hub weights, a local
checkpoint in the publisher's format, a tiny random model of the same class) and how to turn a batch of
preprocessed crops into feature maps. Everything else (weight-kind dispatch and its errors, the seeded tiny
init, PIL conversion, the package's own eval transform, device and autocast, float16 output) lives here.
torch and the teacher packages are imported lazily so `import omniforge.labelers` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.labelers.base import (PRETRAINED, TINY, Labeler, LabelerOptions, Sample, file_sha256,
                                     is_checkpoint_path)
from omniforge.modalities import get_modality

TINY_SEED = 0  # every actor building weights="tiny" gets the same random weights


def require(module: str, pip_name: str) -> Any:
    """Import an optional heavy dependency, or fail with the line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is required for this teacher: pip install '{pip_name}'") from e


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Seed torch's CPU generator for the block, restoring the caller's RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_image(sample: Sample) -> SampleError | None:
    """The Sample contract for images: (H, W, 3) uint8 with H, W >= 1."""
    image = sample.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or min(image.shape[:2]) < 1:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}".strip()
        return SampleError("bad_image", f"expected an (H, W, 3) uint8 RGB image, got {desc}")
    return None


def dir_sha256(path: str) -> str:
    """Content hash of a checkpoint folder (a transformers `save_pretrained` folder): every regular file's
    relative path and sha256, so replacing any file in it invalidates what was labeled with it."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if os.path.isfile(full):
                h.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\n".encode())
    return h.hexdigest()


def short_error(e: BaseException, limit: int = 300) -> str:
    """One line for a wrapped exception (state-dict errors list every key)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def to_pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def autocast_for(device: Any) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA; CPU runs in float32."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TorchLabeler(Labeler):
    """Base of the teachers that run one torch model on crop 0 of each sample.

    Subclasses set `checkpoint_format` (how the publisher ships a local checkpoint, for error messages)
    and implement `build_pretrained`, `build_from_file` and `build_tiny`, each returning
    `(model, transform)` where `transform` is the package's own eval preprocessing (PIL -> CHW tensor), and
    `forward(x) -> {modality: (B, ...) tensor}` for a preprocessed batch.
    """

    learned = True
    options_class = LabelerOptions  # no options unless a subclass declares its own
    checkpoint_format: ClassVar[str] = "checkpoint"
    # True: a local checkpoint is a folder (a transformers `save_pretrained` folder), not a single file
    checkpoint_is_dir: ClassVar[bool] = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        unknown = [m for m in self.wanted if m not in self.modalities]
        if unknown or not self.wanted:
            raise ConfigError(f"{self.name}: cannot write modalities {unknown or '()'}; it writes "
                              f"{', '.join(self.modalities)}")
        import torch

        self.torch_device = torch.device(self.device)
        model, self.transform = self._load()
        self.model = model.eval().requires_grad_(False).to(self.torch_device)

    @classmethod
    def identify_weights(cls, weights: str) -> str:
        """As `Labeler.identify_weights`; a checkpoint folder (`checkpoint_is_dir`) is identified by its content
        hash, and a checkpoint path of the wrong kind (a file for a folder teacher) is a WeightsError here, on
        the driver, before any job starts."""
        if not is_checkpoint_path(weights) or "://" in weights or weights.startswith("hf-hub:"):
            return super().identify_weights(weights)
        path = os.path.abspath(os.path.expanduser(weights))
        if cls.checkpoint_is_dir:
            if not os.path.isdir(path):
                problem = "is not a folder" if os.path.exists(path) else "not found"
                raise WeightsError(f"{cls.name}: checkpoint {weights} {problem}; {cls.name} loads a "
                                   f"{cls.checkpoint_format}: pass --weights {cls.name}=/path/to/that/folder, or "
                                   f"--weights tiny for random weights")
            return f"dir-sha256:{dir_sha256(path)}"
        return super().identify_weights(weights)

    # -- building ------------------------------------------------------------------------------------------

    def build_pretrained(self) -> tuple[Any, Callable]:
        raise NotImplementedError

    def build_from_file(self, path: str) -> tuple[Any, Callable]:
        raise NotImplementedError

    def build_tiny(self) -> tuple[Any, Callable]:
        raise NotImplementedError

    def forward(self, x: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _load(self) -> tuple[Any, Callable]:
        """Dispatch on the weights kind. Never falls back from one kind to another."""
        offline_hint = (f"pass a local checkpoint with --weights {self.name}=/path/to/{self.checkpoint_format}, "
                        f"or --weights tiny for random weights (tests and offline demos only)")
        if self.weights == TINY:
            with seeded():
                return self.build_tiny()
        if self.weights == PRETRAINED:
            try:
                return self.build_pretrained()
            except (WeightsError, ConfigError, ImportError):
                raise
            except Exception as e:  # hub / network / cache errors: the message says what to do instead
                raise WeightsError(f"{self.name}: could not load the pretrained weights from the hub "
                                   f"({short_error(e)}); on an offline machine {offline_hint}") from e
        path = os.path.abspath(os.path.expanduser(self.weights))
        if not (os.path.isdir(path) if self.checkpoint_is_dir else os.path.isfile(path)):
            raise WeightsError(f"{self.name}: checkpoint {self.weights} not found; {offline_hint}")
        try:
            return self.build_from_file(path)
        except (WeightsError, ConfigError, ImportError):
            raise
        except Exception as e:
            raise WeightsError(f"{self.name}: cannot load {path} in the publisher's checkpoint format "
                               f"(like {self.checkpoint_format}): {short_error(e)}; pass the publisher's "
                               f"checkpoint file, or --weights tiny") from e

    # -- labeling ------------------------------------------------------------------------------------------

    def preprocess(self, samples: list[Sample], transform: Callable | None = None
                   ) -> tuple[list[Any], list[Any], list[int]]:
        """Apply the package's eval transform (or `transform`) to every valid image.

        Returns (out, batch, rows): `out` has one slot per sample, holding the SampleError of an invalid
        image and None elsewhere; `batch` holds the transformed tensors of the samples at indices `rows`.
        """
        transform = self.transform if transform is None else transform
        out: list[Any] = [None] * len(samples)
        batch, rows = [], []
        for i, sample in enumerate(samples):
            err = check_image(sample)
            if err is not None:
                out[i] = err
                continue
            batch.append(transform(to_pil(sample.image)))
            rows.append(i)
        return out, batch, rows

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        """Preprocess each sample with the package's eval transform (crop 0: the largest centred square at
        the teacher's input size), run one batched forward, return float16 features per sample."""
        return self.run_batch(samples, self.transform, self.forward,
                              {m: get_modality(m).shape for m in self.wanted})

    def run_batch(self, samples: list[Sample], transform: Callable, forward: Callable[[Any], dict[str, Any]],
                  shapes: dict[str, tuple[int, ...] | None]) -> list[dict[str, Any] | SampleError]:
        """`label` with a given eval `transform` and `forward`: float16 features per sample, each modality's
        checked against its contract shape in `shapes` (None: unchecked); non-finite features are a
        SampleError("teacher_error"), an invalid image a SampleError("bad_image")."""
        import torch

        out, batch, rows = self.preprocess(samples, transform)
        if batch:
            x = torch.stack(batch).to(self.torch_device)  # (B, 3, S, S)
            with torch.inference_mode(), autocast_for(self.torch_device):
                feats = forward(x)
            arrays = {m: feats[m].float().cpu().numpy().astype(np.float16) for m in self.wanted}
            for m, a in arrays.items():
                shape = shapes.get(m)
                if shape is not None and a.shape[1:] != shape:
                    raise RuntimeError(f"{self.name}: {m} features have shape {a.shape[1:]}, the contract is {shape}")
            for j, i in enumerate(rows):
                labels = {m: arrays[m][j].copy() for m in self.wanted}
                bad = [m for m, a in labels.items() if not np.isfinite(a).all()]
                out[i] = (SampleError("teacher_error", f"{self.name}: non-finite {', '.join(bad)} features")
                          if bad else labels)
        return out  # type: ignore[return-value]


__all__ = ["TINY_SEED", "TorchLabeler", "autocast_for", "check_image", "dir_sha256", "require", "seeded", "short_error",
           "to_pil"]

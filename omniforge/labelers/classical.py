"""Classical labelers: real everywhere, no weights.

rgb, caption, canny_edge and color_palette run as plain CPU tasks in the label job.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np

from omniforge.errors import ConfigError, SampleError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import Labeler, Sample


class _ClassicalLabeler(Labeler):
    """A labeler without weights: `--weights` does not change what it writes."""

    @classmethod
    def identity(cls, *, weights: str = "tiny", **options: Any) -> dict[str, Any]:
        del weights  # no weights: tiny and pretrained are the same labeler
        return {"labeler": cls.name, "version": cls.version, "weights": "none",
                "options": {k: options[k] for k in sorted(options)}}

    def label(self, samples: list[Sample]) -> list[dict[str, Any] | SampleError]:
        out: list[dict[str, Any] | SampleError] = []
        for sample in samples:
            try:
                out.append({self.modalities[0]: self.label_one(sample)})
            except SampleError as e:
                out.append(e)
        return out

    def label_one(self, sample: Sample) -> Any:
        raise NotImplementedError


@register_labeler
class RgbLabeler(_ClassicalLabeler):
    """rgb: the decoded image.

    Output: (H, W, 3) uint8 RGB, EXIF orientation applied, shorter side at most the job's storage size
    (downscaled with the aspect ratio kept, never upscaled), stored as JPEG.
    """

    name = "rgb"
    modalities = ("rgb",)

    def label_one(self, sample: Sample) -> np.ndarray:
        return sample.image


@register_labeler
class CaptionLabeler(_ClassicalLabeler):
    """caption: the corpus alt-text, whitespace-normalized, as UTF-8 text.

    A sample without a caption (or with an empty one) is recorded as failed with "missing_caption".
    """

    name = "caption"
    modalities = ("caption",)

    def label_one(self, sample: Sample) -> str:
        text = " ".join((sample.caption or "").split())
        if not text:
            raise SampleError("missing_caption", "the corpus has no caption for this sample")
        return text


@register_labeler
class CannyEdgeLabeler(_ClassicalLabeler):
    """canny_edge: OpenCV Canny edges of the grayscale rgb image.

    Output: (H, W) uint8, 255 on edges and 0 elsewhere, same size as rgb. Options: `low` and `high`
    hysteresis thresholds (default 100, 200) and `blur` (Gaussian kernel size before Canny, odd, 0 = none).
    """

    name = "canny_edge"
    modalities = ("canny_edge",)

    def __init__(self, *, low: int = 100, high: int = 200, blur: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 <= low <= high:
            raise ConfigError(f"canny_edge: need 0 <= low <= high, got low={low} high={high}")
        if blur < 0 or (blur and blur % 2 == 0):
            raise ConfigError(f"canny_edge: blur must be 0 or an odd kernel size, got {blur}")
        self.low, self.high, self.blur = int(low), int(high), int(blur)

    def label_one(self, sample: Sample) -> np.ndarray:
        import cv2

        gray = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY)
        if self.blur:
            gray = cv2.GaussianBlur(gray, (self.blur, self.blur), 0)
        return cv2.Canny(gray, self.low, self.high)


@register_labeler
class ColorPaletteLabeler(_ClassicalLabeler):
    """color_palette: the image's dominant colours by k-means (OpenCV) in RGB.

    Output: JSON list of 1..7 [R, G, B] integer colours, largest cluster first. The number of colours is
    `num_colors` when set, otherwise drawn per sample from 1..7 by a hash of the key (deterministic, as
    4M-21 samples palette sizes). Clustering runs on at most `max_pixels` pixels (a strided subsample).
    """

    name = "color_palette"
    modalities = ("color_palette",)
    MAX_COLORS: ClassVar[int] = 7

    def __init__(self, *, num_colors: int | None = None, max_pixels: int = 4096, **kwargs: Any):
        super().__init__(**kwargs)
        if num_colors is not None and not 1 <= num_colors <= self.MAX_COLORS:
            raise ConfigError(f"color_palette: num_colors must be in 1..{self.MAX_COLORS}, got {num_colors}")
        self.num_colors = num_colors
        self.max_pixels = int(max_pixels)

    def _k_for(self, key: str) -> int:
        if self.num_colors is not None:
            return self.num_colors
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % self.MAX_COLORS + 1

    def label_one(self, sample: Sample) -> list[list[int]]:
        import cv2

        pixels = sample.image.reshape(-1, 3)
        stride = max(1, len(pixels) // self.max_pixels)
        pixels = np.ascontiguousarray(pixels[::stride], dtype=np.float32)
        k = min(self._k_for(sample.key), len(np.unique(pixels, axis=0)))
        cv2.setRNGSeed(0)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
        _, labels, centers = cv2.kmeans(pixels, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        counts = np.bincount(labels.ravel(), minlength=k)
        order = np.argsort(-counts, kind="stable")
        return [[int(round(c)) for c in np.clip(centers[i], 0, 255)] for i in order]


__all__ = ["CannyEdgeLabeler", "CaptionLabeler", "ColorPaletteLabeler", "RgbLabeler"]

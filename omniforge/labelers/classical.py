"""Classical labelers: real everywhere, no weights.

rgb, caption, canny_edge and color_palette run as plain CPU tasks in the label job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from omniforge.errors import ConfigError, SampleError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import Labeler, LabelerOptions, Sample, option

MAX_COLORS = 7  # color_palette: palettes of 1..7 colours, as 4M-21


class _ClassicalLabeler(Labeler):
    """A labeler without weights: `--weights` does not change what it writes."""

    options_class = LabelerOptions

    @classmethod
    def identify_weights(cls, weights: str) -> str:
        del weights  # no weights: tiny and pretrained are the same labeler
        return "none"

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
    modalities = default_for = ("rgb",)

    def label_one(self, sample: Sample) -> np.ndarray:
        return sample.image


@register_labeler
class CaptionLabeler(_ClassicalLabeler):
    """caption: the corpus alt-text, whitespace-normalized, as UTF-8 text.

    A sample without a caption (or with an empty one) is recorded as failed with "missing_caption".
    """

    name = "caption"
    modalities = default_for = ("caption",)

    def label_one(self, sample: Sample) -> str:
        text = " ".join((sample.caption or "").split())
        if not text:
            raise SampleError("missing_caption", "the corpus has no caption for this sample")
        return text


@dataclass(frozen=True, kw_only=True)
class CannyEdgeOptions(LabelerOptions):
    low: int = option(100, "lower hysteresis threshold of cv2.Canny", ge=0)
    high: int = option(200, "upper hysteresis threshold of cv2.Canny (>= low)", ge=0)
    blur: int = option(3, "Gaussian blur kernel size before Canny: odd, 0 = no blur", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low > self.high:
            raise ConfigError(f"options low={self.low}, high={self.high} are not valid: need 0 <= low <= high")
        if self.blur % 2 == 0 and self.blur:
            raise ConfigError(f"option blur={self.blur} is not valid: expected 0 or an odd kernel size")


@register_labeler
class CannyEdgeLabeler(_ClassicalLabeler):
    """canny_edge: OpenCV Canny edges of the grayscale rgb image.

    Output: (H, W) uint8, 255 on edges and 0 elsewhere, same size as rgb. Options (`CannyEdgeOptions`): `low`
    and `high` hysteresis thresholds (default 100, 200) and `blur` (Gaussian kernel size before Canny, odd,
    0 = none).
    """

    name = "canny_edge"
    modalities = default_for = ("canny_edge",)
    options_class = CannyEdgeOptions
    options: CannyEdgeOptions

    def label_one(self, sample: Sample) -> np.ndarray:
        import cv2

        o = self.options
        gray = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY)
        if o.blur:
            gray = cv2.GaussianBlur(gray, (o.blur, o.blur), 0)
        return cv2.Canny(gray, o.low, o.high)


@dataclass(frozen=True, kw_only=True)
class ColorPaletteOptions(LabelerOptions):
    num_colors: int | None = option(None, "colours per palette; null: drawn per sample from 1..7 by a hash of its key",
                                    ge=1, le=MAX_COLORS)
    max_pixels: int = option(4096, "k-means runs on at most this many pixels (a strided subsample)", ge=1)


@register_labeler
class ColorPaletteLabeler(_ClassicalLabeler):
    """color_palette: the image's dominant colours by k-means (OpenCV) in RGB.

    Output: JSON list of 1..7 [R, G, B] integer colours, largest cluster first. The number of colours is
    `num_colors` when set, otherwise drawn per sample from 1..7 by a hash of the key (deterministic, as
    4M-21 samples palette sizes). Clustering runs on at most `max_pixels` pixels (a strided subsample).
    """

    name = "color_palette"
    modalities = default_for = ("color_palette",)
    options_class = ColorPaletteOptions
    options: ColorPaletteOptions

    def _k_for(self, key: str) -> int:
        if self.options.num_colors is not None:
            return self.options.num_colors
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % MAX_COLORS + 1

    def label_one(self, sample: Sample) -> list[list[int]]:
        import cv2

        pixels = sample.image.reshape(-1, 3)
        stride = max(1, len(pixels) // self.options.max_pixels)
        pixels = np.ascontiguousarray(pixels[::stride], dtype=np.float32)
        k = min(self._k_for(sample.key), len(np.unique(pixels, axis=0)))
        cv2.setRNGSeed(0)
        criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
        _, labels, centers = cv2.kmeans(pixels, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
        counts = np.bincount(labels.ravel(), minlength=k)
        order = np.argsort(-counts, kind="stable")
        return [[int(round(c)) for c in np.clip(centers[i], 0, 255)] for i in order]


__all__ = ["CannyEdgeLabeler", "CannyEdgeOptions", "CaptionLabeler", "ColorPaletteLabeler", "ColorPaletteOptions",
           "MAX_COLORS", "RgbLabeler"]

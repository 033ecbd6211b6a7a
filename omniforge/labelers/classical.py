"""Classical labelers: real everywhere, no weights.

rgb, caption, canny_edge and color_palette run as plain CPU tasks in the label job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from omniforge.errors import ConfigError, SampleError
from omniforge.labelers._registry import register_labeler
from omniforge.labelers.base import PROFILE_4M21, Labeler, LabelerOptions, Profile, Sample, option
from omniforge.tokenize.text import MAX_PALETTE_COLORS as MAX_COLORS  # palettes for k = 1..7, as 4M-21


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
    profiles = {PROFILE_4M21: Profile(reference="the corpus image, decoded and EXIF-rotated, in RGB")}

    def label_one(self, sample: Sample) -> np.ndarray:
        return sample.image


@register_labeler
class CaptionLabeler(_ClassicalLabeler):
    """caption: the corpus alt-text, whitespace-normalized, as UTF-8 text.

    A sample without a caption (or with an empty one) is recorded as failed with "missing_caption".
    """

    name = "caption"
    modalities = default_for = ("caption",)
    profiles = {PROFILE_4M21: Profile(reference="the corpus alt-text (CC12M's captions)")}

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
    # no options: ml-4m publishes no Canny thresholds, and options a job gives change a classical fingerprint
    profiles = {PROFILE_4M21: Profile(reference="OpenCV Canny edges of the image (ml-4m publishes no thresholds: "
                                                "omniforge's defaults apply, low 100, high 200, 3 x 3 blur)")}

    def label_one(self, sample: Sample) -> np.ndarray:
        import cv2

        o = self.options
        gray = cv2.cvtColor(sample.image, cv2.COLOR_RGB2GRAY)
        if o.blur:
            gray = cv2.GaussianBlur(gray, (o.blur, o.blur), 0)
        return cv2.Canny(gray, o.low, o.high)


@dataclass(frozen=True, kw_only=True)
class ColorPaletteOptions(LabelerOptions):
    max_pixels: int = option(4096, "k-means runs on at most this many pixels (a strided subsample)", ge=1)

    removed = {
        "num_colors": "a color_palette label holds the palettes for every k = 1..7 and the trainer draws k per "
                      "sample, as 4M-21; drop the option"}


@register_labeler
class ColorPaletteLabeler(_ClassicalLabeler):
    """color_palette: the image's dominant colours by k-means (OpenCV) in RGB, for every k = 1..7.

    Output: ml-4m's format, a one-element list [{"1": [[R, G, B]], "2": [[R, G, B], [R, G, B]], ..., "7":
    [...]}] of integer colours, largest cluster first (ml-4m's ColorPaletteTransform reads `label[0][str(k)]`
    for the k it draws per training sample). An image with fewer than k distinct colours gets a palette of
    its distinct colours for that k. Clustering (k-means++, 3 attempts, OpenCV's RNG seeded, so a label is
    the same in every process) runs on at most `max_pixels` pixels (a strided subsample).
    """

    name = "color_palette"
    version = "2"  # 1: one palette of a k drawn by key (a bare list of colours)
    modalities = default_for = ("color_palette",)
    options_class = ColorPaletteOptions
    options: ColorPaletteOptions
    profiles = {PROFILE_4M21: Profile(
        reference="PyPalette (github.com/adamgrieger/pypalette): k-means++ on the image's RGB pixels, a palette for "
                  "every k = 1..7",
        stand_in="PyPalette has no PyPI release (PyPI's pypalette is an unrelated project); omniforge runs the same "
                 "method with OpenCV's k-means++ (seeded, 3 attempts, on at most max_pixels pixels), so palettes can "
                 "differ slightly from PyPalette's")}

    def label_one(self, sample: Sample) -> list[dict[str, list[list[int]]]]:
        pixels = sample.image.reshape(-1, 3)
        stride = max(1, len(pixels) // self.options.max_pixels)
        pixels = np.ascontiguousarray(pixels[::stride], dtype=np.float32)
        return [{str(k): palette(pixels, k) for k in range(1, MAX_COLORS + 1)}]


def palette(pixels: np.ndarray, k: int) -> list[list[int]]:
    """The k colours of `pixels` (float32 (N, 3)) by k-means, largest cluster first; with at most k distinct
    colours, those colours, most frequent first (k-means has nothing to cluster, and OpenCV misreads one row)."""
    import cv2

    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    if len(colors) <= k:
        order = np.argsort(-counts, kind="stable")
        return [[int(round(c)) for c in np.clip(colors[i], 0, 255)] for i in order]
    cv2.setRNGSeed(0)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, labels, centers = cv2.kmeans(pixels, k, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    counts = np.bincount(labels.ravel(), minlength=k)
    order = np.argsort(-counts, kind="stable")
    return [[int(round(c)) for c in np.clip(centers[i], 0, 255)] for i in order]


__all__ = ["CannyEdgeLabeler", "CannyEdgeOptions", "CaptionLabeler", "ColorPaletteLabeler", "ColorPaletteOptions",
           "MAX_COLORS", "RgbLabeler"]

"""Drawing every modality of one sample into a single image (used by `omniforge show`).

Panels come in registry order; each modality is drawn in its registry `draw` style (`ModalityInfo.draw`),
anything else (token rows, unknown folders) by its value's type and shape. Only matplotlib's
object-oriented API is used (`Figure` + `FigureCanvasAgg`), so rendering never touches pyplot's global
state or the user's selected backend, and works headless.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import warnings
import textwrap
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from omniforge.modalities import IMAGE_MODALITY, all_modalities

if TYPE_CHECKING:
    from omniforge._smpl import SmplBody

COLUMNS = 4
PANEL_INCHES = (3.4, 3.2)
DPI = 90
DEPTH_CMAP = "turbo"
HEAT_CMAP = "viridis"

_TEXT_WIDTH = 44
_TEXT_LINES = 22
_NONE_CLASS = 255
_BOX_COLORS = ("#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55")


def render_sample(
    key: str,
    values: Mapping[str, object],
    *,
    failures: Mapping[str, str] | None = None,
    title: str | None = None,
    smpl: SmplBody | None = None,
) -> Image.Image:
    """Draw one sample's modalities as a grid of titled panels; returns an RGB PIL image.

    `values` maps modality name to its decoded label (numpy arrays, PIL images, str, JSON values);
    `failures` maps modality name to the recorded failure reason, drawn as a red "failed: ..." panel.
    `smpl` is the SMPL body model (`omniforge._smpl.load_smpl`) that the "smpl" style poses people with; without
    it they are drawn as boxes. A value that cannot be drawn becomes a panel saying why, so rendering itself
    never fails on data.
    """
    failures = dict(failures or {})
    names = _ordered(list(values))
    panels: list[tuple[str, Callable[[Axes], str]]] = [(n, _painter(n, values[n], values, smpl=smpl))
                                                       for n in names]
    panels += [(n, _failure_painter(reason)) for n, reason in sorted(failures.items())]
    if not panels:
        panels = [("(empty)", lambda ax: _text(ax, "this sample has no modalities", color="0.4") or "")]

    ncols = min(COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(PANEL_INCHES[0] * ncols, PANEL_INCHES[1] * nrows + 0.5), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, paint) in zip(axes, panels):
        _draw_panel(ax, name, paint)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(title or key, fontsize=13, fontweight="bold")
    with warnings.catch_warnings():  # text from any vocabulary (e.g. CJK word pieces): a missing glyph is a box
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
        canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(np.ascontiguousarray(rgba[:, :, :3]))


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Project (h, w, C) features onto their first 3 principal components.

    Returns an (h, w, 3) float64 array in 0..1: channel i is principal component i, min-max scaled over
    the image (a constant component is 0). Signs are fixed so that each component's largest-magnitude
    loading is positive, making the colours deterministic. Missing components (C < 3 or rank < 3) are 0.
    """
    feats = np.asarray(features)
    if feats.ndim != 3:
        raise ValueError(f"pca_rgb expects (h, w, C) features, got shape {feats.shape}")
    h, w, c = feats.shape
    x = np.nan_to_num(feats.reshape(h * w, c).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    x -= x.mean(axis=0, keepdims=True)
    out = np.zeros((h * w, 3), dtype=np.float64)
    if x.size and np.any(x):
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        k = min(3, vt.shape[0])
        comps = vt[:k]
        signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
        out[:, :k] = x @ (comps * signs[:, None]).T
    return _minmax_columns(out).reshape(h, w, 3)


def _minmax_columns(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, np.inf)
    return np.clip((x - lo) / span, 0.0, 1.0)


def _styles() -> dict[str, str]:
    """Modality name -> draw style, in registry order."""
    return {m.name: m.draw for m in all_modalities()}


def _ordered(names: list[str]) -> list[str]:
    """Modalities in registry order; a panel annotating one ("depth (decoded ...)") right after it."""
    plain = [n for n in names if " " not in n]
    order = list(_styles())
    out: list[str] = []
    for n in [n for n in order if n in plain] + [n for n in plain if n not in order]:
        out.append(n)
        out += [a for a in names if " " in a and a.split(" ", 1)[0] == n]
    return out + [n for n in names if n not in out]


def _draw_panel(ax: Axes, name: str, paint: Callable[[Axes], str]) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    try:
        desc = paint(ax)
    except Exception as exc:  # noqa: BLE001 - one undrawable value must not hide the others
        ax.clear()
        ax.set_xticks([])
        ax.set_yticks([])
        _text(ax, f"cannot draw: {type(exc).__name__}: {exc}", color="#b00020")
        desc = "unrenderable"
    ax.set_title(f"{name}\n{desc}" if desc else name, fontsize=9)


def _painter(name: str, value: object, values: Mapping[str, object], *,
             smpl: SmplBody | None = None) -> Callable[[Axes], str]:
    """Choose how to draw one modality from its registry draw style first, then from the value's type and
    shape.

    A panel name may carry a note after a space ("depth (decoded from tok_depth@224)"): the first word picks
    the drawing."""
    name = name.split(" ", 1)[0]
    style = _styles().get(name)
    if style == "embedding" and isinstance(value, (Mapping, np.ndarray)):
        return lambda ax: _draw_embedding(ax, value)
    if isinstance(value, Image.Image):
        if value.mode == "P" or style == "semseg":
            return lambda ax: _draw_semseg(ax, np.asarray(value))
        return lambda ax: _draw_rgb(ax, np.asarray(value.convert("RGB")))
    if isinstance(value, (bytes, bytearray)):
        return lambda ax: _text(ax, f"{len(value)} undecoded bytes", color="0.4") or "bytes"
    if isinstance(value, str):
        return lambda ax: _draw_caption(ax, value)
    if style == "smpl" and isinstance(value, Mapping):
        return lambda ax: _draw_people(ax, name, value, _background(values), smpl)
    if isinstance(value, np.ndarray):
        return _array_painter(name, style, value)
    if style == "palette" or _is_palette(value):
        return lambda ax: _draw_palette(ax, value)  # type: ignore[arg-type]
    if style in ("boxes", "keypoints"):
        return lambda ax: _draw_instances(ax, style, value, _background(values))
    return lambda ax: _draw_json(ax, value)


def _background(values: Mapping[str, object]) -> np.ndarray | None:
    """The sample's image (its rgb label), that boxes and people are drawn over; None when it is not shown."""
    rgb = values.get(IMAGE_MODALITY)
    return np.asarray(rgb) if isinstance(rgb, np.ndarray) else None


def _array_painter(name: str, style: str | None, arr: np.ndarray) -> Callable[[Axes], str]:
    if name.startswith("tok_") and arr.ndim == 2 and arr.dtype.kind == "i":
        return lambda ax: _draw_tokens(ax, arr, image="@" in name)
    if style == "gray" and arr.ndim == 2:
        return lambda ax: _draw_gray(ax, arr)
    if style == "heat" and arr.ndim == 2:
        return lambda ax: _draw_heat(ax, arr, DEPTH_CMAP)
    if style == "semseg" and arr.ndim == 2:
        return lambda ax: _draw_semseg(ax, arr)
    if arr.ndim == 3 and arr.shape[2] > 3 and (arr.dtype.kind == "f" or style == "features"):
        return lambda ax: _draw_features(ax, arr)
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        return lambda ax: _draw_rgb(ax, arr)
    if arr.ndim == 1:
        return lambda ax: _draw_vector(ax, arr)
    if arr.ndim == 2 and arr.dtype == np.uint8 and arr.size and arr.max() <= 1:
        return lambda ax: _draw_gray(ax, arr * np.uint8(255))
    return lambda ax: _draw_generic(ax, arr)


def _shape_desc(arr: np.ndarray) -> str:
    return f"{arr.dtype} {tuple(arr.shape)}"


def _draw_rgb(ax: Axes, arr: np.ndarray) -> str:
    ax.imshow(arr, interpolation="antialiased")
    return _shape_desc(arr)


def _draw_gray(ax: Axes, arr: np.ndarray) -> str:
    ax.imshow(arr, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
    return f"{_shape_desc(arr)}, {np.count_nonzero(arr) / max(arr.size, 1):.1%} on"


def _draw_heat(ax: Axes, arr: np.ndarray, cmap: str) -> str:
    data = arr.astype(np.float64)
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="antialiased")
    return f"{_shape_desc(arr)}, {lo:g}..{hi:g}"


def _draw_semseg(ax: Axes, arr: np.ndarray) -> str:
    labels = np.asarray(arr).astype(np.int64)
    ax.imshow(_class_palette()[np.clip(labels, 0, 255)], interpolation="nearest")
    present = [int(c) for c in np.unique(labels) if c != _NONE_CLASS]
    return f"{_shape_desc(np.asarray(arr))}, {len(present)} classes"


@functools.cache
def _class_palette() -> np.ndarray:
    """A fixed categorical colour per class id (golden-ratio hues); 255 (none) is black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(255):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55 + 0.4 * ((i * 7) % 3) / 2, 0.95)
        pal[i] = (round(r * 255), round(g * 255), round(b * 255))
    return pal


def _draw_features(ax: Axes, arr: np.ndarray) -> str:
    ax.imshow(pca_rgb(arr), interpolation="nearest")
    return f"{_shape_desc(arr)}, PCA"


def _draw_vector(ax: Axes, vec: np.ndarray) -> str:
    data = np.nan_to_num(vec.astype(np.float64))
    ax.plot(np.arange(data.size), data, lw=0.6, color="#1f4e9c")
    ax.set_xlim(0, max(data.size - 1, 1))
    ax.set_box_aspect(0.6)
    return f"{_shape_desc(vec)}, L2 {np.linalg.norm(data):.3g}"


def _draw_embedding(ax: Axes, value: Mapping[str, np.ndarray] | np.ndarray) -> str:
    """An embedding: the valid vectors of its first sequence, one row each, as a diverging heat map. ``value`` is
    an npz label ({"emb": (n, L, D), "mask_valid": (n, L)}) or the valid vectors themselves (N, D)."""
    if isinstance(value, Mapping):
        emb, mask = np.asarray(value["emb"]), np.asarray(value["mask_valid"]).astype(bool)
        rows = emb[0][mask[0]]
        desc = f"{_shape_desc(emb)}, {int(mask[0].sum())} of {mask.shape[1]} valid"
    else:
        rows = np.asarray(value)
        desc = f"{_shape_desc(rows)} vectors"
    data = np.nan_to_num(np.atleast_2d(rows).astype(np.float32))
    lim = float(np.abs(data).max()) if data.size else 0.0
    ax.imshow(data, cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0, aspect="auto", interpolation="antialiased")
    return desc


def _draw_tokens(ax: Axes, ids: np.ndarray, *, image: bool) -> str:
    """Token ids of crop 0: a grid for image tokens (one colour per id), the first ids for sequences."""
    first = ids[0]
    side = int(round(np.sqrt(first.size)))
    if image and side * side == first.size:
        ax.imshow(first.reshape(side, side), cmap="tab20", interpolation="nearest")
        return f"{ids.shape[0]} crops x {first.size} tokens, {len(np.unique(first))} distinct (crop 0)"
    used = first[first != 0]
    _text(ax, " ".join(str(int(t)) for t in used[:120]))
    return f"{ids.shape[0]} crops x {first.size}, {used.size} used (crop 0)"


def _draw_generic(ax: Axes, arr: np.ndarray) -> str:
    data = arr
    while data.ndim > 2:
        data = data[..., 0] if data.shape[-1] else data.reshape(data.shape[:2])
    if data.ndim < 2:
        data = np.atleast_2d(data)
    if data.dtype.kind not in "biuf":
        return _text(ax, repr(arr)[:400]) or _shape_desc(arr)
    _draw_heat(ax, data, HEAT_CMAP)
    return _shape_desc(arr)


def _draw_caption(ax: Axes, text: str) -> str:
    _text(ax, text)
    return f"{len(text.split())} words"


def _is_palette(value: object) -> bool:
    return (
        isinstance(value, list) and bool(value)
        and all(isinstance(c, (list, tuple)) and len(c) == 3 for c in value)
        and all(isinstance(v, (int, float)) for c in value for v in c)
    )


def _draw_palette(ax: Axes, colors: list) -> str:
    """One palette (a list of colours, e.g. decoded from tokens) as a row of swatches, or a color_palette
    label (ml-4m's [{"1": [...], ..., "7": [...]}]) as one row per k."""
    if isinstance(colors, list) and len(colors) == 1 and isinstance(colors[0], dict):
        rows = [(int(k), v) for k, v in sorted(colors[0].items(), key=lambda kv: int(kv[0])) if _is_palette(v)]
        if rows:
            for r, (k, palette) in enumerate(rows):
                for i, c in enumerate(palette):
                    rgb = tuple(min(max(float(v) / 255.0, 0.0), 1.0) for v in c)
                    ax.add_patch(Rectangle((i, -r), 1, 0.9, facecolor=rgb, edgecolor="white"))
                ax.text(-0.1, -r + 0.45, f"k={k}", ha="right", va="center", fontsize=6)
            ax.set_xlim(-0.8, max(len(p) for _, p in rows))
            ax.set_ylim(-len(rows) + 0.9, 1)
            ax.set_axis_off()
            return f"palettes for k = 1..{rows[-1][0]}"
    if not _is_palette(colors):
        return _draw_json(ax, colors)
    for i, c in enumerate(colors):
        rgb = tuple(min(max(float(v) / 255.0, 0.0), 1.0) for v in c)
        ax.add_patch(Rectangle((i, 0), 1, 1, facecolor=rgb, edgecolor="white"))
        ax.text(i + 0.5, -0.08, "\n".join(str(int(v)) for v in c), ha="center", va="top", fontsize=6)
    ax.set_xlim(0, len(colors))
    ax.set_ylim(-0.6, 1)
    ax.set_axis_off()
    return f"{len(colors)} colours"


def _draw_instances(ax: Axes, style: str, value: object, rgb: np.ndarray | None) -> str:
    """Boxes (and pose keypoints) over a copy of the image; falls back to text if unrecognized."""
    items = _instance_items(style, value)
    if items is None:
        return _draw_json(ax, value)
    if rgb is not None and rgb.ndim == 3:
        height, width = rgb.shape[:2]
        ax.imshow(rgb)
    else:
        width = height = 1
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
    for i, (box, label, keypoints) in enumerate(items):
        color = _BOX_COLORS[i % len(_BOX_COLORS)]
        scale = (width, height) if max(abs(v) for v in box) <= 1.5 else (1, 1)
        x0, y0, x1, y1 = box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.5))
        if label:
            ax.text(x0, y0, label, color="white", fontsize=7, va="bottom",
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
        if keypoints:
            ax.scatter([k[0] * scale[0] for k in keypoints], [k[1] * scale[1] for k in keypoints], s=6, c=color)
    return f"{len(items)} instance{'' if len(items) == 1 else 's'}"


def _draw_people(ax: Axes, modality: str, label: Mapping, rgb: np.ndarray | None, smpl: SmplBody | None) -> str:
    """SMPL people (the "smpl" style: HMR2.0's human_poses, pixel boxes): each person's box and detector score
    over the image and, with the SMPL body model, their 24 3D joints projected with HMR2.0's camera and joined
    along SMPL's kinematic tree; {} (nobody) is the image with a "no person" note. Without the model, or without
    the image (whose size places the camera), the boxes only, saying what is missing."""
    from omniforge._smpl import SMPL_MODEL_OPTION, place_people
    from omniforge.schemas import check_human_poses

    check_human_poses(label)
    image = rgb is not None and rgb.ndim == 3
    if image:
        ax.imshow(rgb)
    if not label:
        _note(ax, "no person", fontsize=10)
        return "no person"
    boxes = label["bbox_xyxy"]
    if not image:  # no image: a blank canvas that holds the boxes
        ax.set_xlim(0, max(b[2] for b in boxes) * 1.05 or 1)
        ax.set_ylim(max(b[3] for b in boxes) * 1.05 or 1, 0)
    scores = label.get("score")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        color = _BOX_COLORS[i % len(_BOX_COLORS)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=1.0, ls="--"))
        score = scores[i] if isinstance(scores, list) and len(scores) == len(boxes) else None
        ax.text(x0, y0, "person" + (f" {score:.2f}" if isinstance(score, (int, float)) else ""), color="white",
                fontsize=7, va="bottom", bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    people = f"{len(boxes)} {'person' if len(boxes) == 1 else 'people'}"
    if not image:
        return f"{people}, boxes only (no rgb to place the camera)"
    if smpl is None:
        _note(ax, f"no SMPL body model: --option {modality}.{SMPL_MODEL_OPTION}=PATH draws the 3D joints")
        return f"{people}, boxes only"
    height, width = rgb.shape[:2]
    limits = ax.get_xlim(), ax.get_ylim()
    joints = place_people(label, smpl, (width, height))  # (N, 24, 2) pixels, NaN behind the camera
    for i, points in enumerate(joints):
        color = _BOX_COLORS[i % len(_BOX_COLORS)]
        bones = [(points[j], points[p]) for j, p in enumerate(smpl.parents) if p >= 0]
        ax.add_collection(LineCollection(bones, colors=color, linewidths=1.5))
        ax.scatter(points[:, 0], points[:, 1], s=7, c=color, zorder=3)
    ax.set_xlim(limits[0])
    ax.set_ylim(limits[1])
    hidden = int(np.isnan(joints).all(axis=(1, 2)).sum())
    return f"{people}, SMPL joints" + (f", {hidden} behind the camera" if hidden else "")


def _note(ax: Axes, text: str, *, fontsize: int = 6) -> None:
    """A short note on a white label at the bottom of a panel."""
    ax.text(0.5, 0.03, "\n".join(textwrap.wrap(text, 60)), transform=ax.transAxes, ha="center", va="bottom",
            fontsize=fontsize, bbox={"facecolor": "white", "alpha": 0.85, "pad": 2, "edgecolor": "none"})


def _instance_items(style: str, value: object) -> list[tuple[list[float], str, list[list[float]]]] | None:
    """Normalize instance JSON ({"instances": [...]} with "boxes" / "bbox" / "box", "class_name" or "label",
    "score", "keypoints") into (xyxy box, label, keypoints) triples; people ("keypoints") are labeled person."""
    if isinstance(value, dict):
        raw = value.get("instances", value.get("people", value.get("annotations")))
    else:
        raw = value
    if not isinstance(raw, list):
        return None
    items: list[tuple[list[float], str, list[list[float]]]] = []
    for inst in raw:
        if not isinstance(inst, dict):
            return None
        box = inst.get("boxes", inst.get("bbox", inst.get("box")))
        if isinstance(box, list) and len(box) == 1 and isinstance(box[0], list):
            box = box[0]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            return None
        label = str(inst.get("class_name", inst.get("label", "person" if style == "keypoints" else "")))
        score = inst.get("score")
        if isinstance(score, (int, float)):
            label = f"{label} {score:.2f}".strip()
        kps = inst.get("keypoints")
        points = [list(map(float, k[:2])) for k in kps if isinstance(k, list) and len(k) >= 2] if isinstance(
            kps, list) else []
        items.append(([float(v) for v in box], label, points))
    return items


def _draw_json(ax: Axes, value: object) -> str:
    text = json.dumps(value, indent=1, ensure_ascii=False, default=str)
    lines = text.splitlines()
    shown = [ln[:_TEXT_WIDTH + 8] for ln in lines[:_TEXT_LINES]]
    if len(lines) > _TEXT_LINES:
        shown.append(f"... ({len(lines) - _TEXT_LINES} more lines)")
    ax.text(0.02, 0.98, "\n".join(shown), va="top", ha="left", family="monospace", fontsize=6,
            transform=ax.transAxes)
    ax.set_axis_off()
    return type(value).__name__ + (f", {len(value)} items" if isinstance(value, (list, dict)) else "")


def _failure_painter(reason: str) -> Callable[[Axes], str]:
    def paint(ax: Axes) -> str:
        _text(ax, f"failed: {reason}", color="#d00000", fontsize=9)
        for spine in ax.spines.values():
            spine.set_edgecolor("#d00000")
            spine.set_linewidth(2)
        return "failed"

    return paint


def _text(ax: Axes, text: str, *, color: str = "black", fontsize: int = 8) -> str:
    """Wrapped, truncated text filling the panel; returns '' (panels add their own description)."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        lines += textwrap.wrap(para, _TEXT_WIDTH) or [""]
    if len(lines) > _TEXT_LINES:
        lines = lines[: _TEXT_LINES - 1] + ["..."]
    ax.text(0.03, 0.97, "\n".join(lines), va="top", ha="left", wrap=False, color=color, fontsize=fontsize,
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return ""


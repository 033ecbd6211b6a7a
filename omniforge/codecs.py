"""Encoding and decoding of label members by file extension.

No pickles anywhere: arrays are .npy (read with allow_pickle=False), structures .json, text UTF-8.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import numpy as np
from PIL import Image

_NPY_LOCK = threading.Lock()

JPEG_QUALITY = 95


def encode(ext: str, value: Any) -> bytes:
    """Serialize one label value to the bytes of a `<key>.<ext>` member."""
    if ext == "jpg":
        arr = _as_uint8_image(value)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()
    if ext == "png":
        if isinstance(value, Image.Image):  # P-mode images keep their palette
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue()
        arr = np.asarray(value)
        if arr.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"png labels must be uint8 or uint16 arrays, got {arr.dtype}")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()
    if ext == "npy":
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError("npy labels must be numeric arrays, not object arrays")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    if ext == "json":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if ext == "txt":
        if not isinstance(value, str):
            raise TypeError(f"txt labels must be str, got {type(value).__name__}")
        return value.encode("utf-8")
    raise ValueError(f"no encoder for extension {ext!r}")


def decode(ext: str, data: bytes) -> Any:
    """Parse the bytes of a `<key>.<ext>` member; raises on anything malformed."""
    if ext in ("jpg", "png"):
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode == "P":
                return img.copy()
            return np.asarray(img)
    if ext == "npy":
        # numpy parses the .npy header with ast.literal_eval, and CPython 3.11's AST construction is not
        # thread-safe (python/cpython#106905: spurious "SystemError: AST constructor recursion depth mismatch"
        # under verify's reader threads): one header at a time.
        with _NPY_LOCK:
            return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext == "txt":
        return data.decode("utf-8")
    raise ValueError(f"no decoder for extension {ext!r}")


def _as_uint8_image(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"jpg labels must be (H, W, 3) uint8 arrays, got {arr.dtype} {arr.shape}")
    return arr

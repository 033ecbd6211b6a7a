"""The modality registry: the single source of truth for every part of omniforge.

Each entry names the folder a modality's label shards live in, the file extension of its one member per
key, the token modality the tokenize job writes, and the tokenizer facts the trainer needs. Folder names
are the 4M-21 modality names, so ml-4m's own webdataset loader reads omniforge output unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModalityInfo:
    name: str  # folder name under the corpus root, and the modality name on the CLI
    ext: str  # extension of the single member per key in the label shard: "<key>.<ext>"
    description: str  # the raw format, as stored in the label shard
    token_modality: str  # folder of the token shards: tok_<name>@224 (images), tok_<name> (globals, sequences)
    num_tokens: int  # tokens per sample (the maximum, for sequences)
    vocab_size: int | None  # tokenizer vocabulary; None for text modalities (shared WordPiece vocab)
    tokenizer: str  # "vqvae" | "memcodes" | "wordpiece"
    shape: tuple[int, ...] | None = None  # fixed array shape of .npy labels, None when variable
    pixel_modality: str | None = None  # raw-pixel input folder the trainer reads (label + crop_settings)


_IMAGE = "vqvae"
_GLOBAL = "memcodes"
_TEXT = "wordpiece"

MODALITIES: dict[str, ModalityInfo] = {
    m.name: m
    for m in [
        ModalityInfo(
            name="rgb", ext="jpg", tokenizer=_IMAGE, token_modality="tok_rgb@224", num_tokens=196,
            vocab_size=16384, pixel_modality="rgb@224",
            description="JPEG, EXIF-rotated RGB, shorter side at most the storage size (512)"),
        ModalityInfo(
            name="caption", ext="txt", tokenizer=_TEXT, token_modality="tok_caption", num_tokens=256,
            vocab_size=None, description="UTF-8 text, the corpus alt-text"),
        ModalityInfo(
            name="depth", ext="png", tokenizer=_IMAGE, token_modality="tok_depth@224", num_tokens=196,
            vocab_size=8192, description="PNG uint16, relative depth scaled per image to 0..65535"),
        ModalityInfo(
            name="normal", ext="png", tokenizer=_IMAGE, token_modality="tok_normal@224", num_tokens=196,
            vocab_size=8192, description="PNG uint8 RGB, (n + 1) / 2 * 255, camera frame"),
        ModalityInfo(
            name="semseg_coco", ext="png", tokenizer=_IMAGE, token_modality="tok_semseg@224", num_tokens=196,
            vocab_size=4096, description="PNG P-mode uint8, 133 COCO panoptic classes, 255 = none"),
        ModalityInfo(
            name="det", ext="json", tokenizer=_TEXT, token_modality="tok_det", num_tokens=256, vocab_size=None,
            description='JSON {"instances": [{"boxes": [xmin, ymin, xmax, ymax] in 0..1, "class_name", "score"}]}'),
        ModalityInfo(
            name="human_poses", ext="json", tokenizer=_TEXT, token_modality="tok_human_poses", num_tokens=275,
            vocab_size=None, description="JSON per person: bbox, keypoints, optional SMPL parameters"),
        ModalityInfo(
            name="sam_instance", ext="json", tokenizer=_TEXT, token_modality="tok_sam_instance", num_tokens=290,
            vocab_size=None, description="JSON COCO RLE masks, XYXY boxes and scores"),
        ModalityInfo(
            name="sam_edge", ext="png", tokenizer=_IMAGE, token_modality="tok_sam_edge@224", num_tokens=196,
            vocab_size=8192, description="PNG uint8, boundaries of sam_instance masks"),
        ModalityInfo(
            name="canny_edge", ext="png", tokenizer=_IMAGE, token_modality="tok_canny_edge@224", num_tokens=196,
            vocab_size=8192, description="PNG uint8 (0 or 255), OpenCV Canny edges of rgb"),
        ModalityInfo(
            name="clip", ext="npy", tokenizer=_IMAGE, token_modality="tok_clip@224", num_tokens=196,
            vocab_size=8192, shape=(14, 14, 512),
            description="npy float16 (14, 14, 512), CLIP ViT-B/16 projected last-layer patch features"),
        ModalityInfo(
            name="dinov2", ext="npy", tokenizer=_IMAGE, token_modality="tok_dinov2@224", num_tokens=256,
            vocab_size=8192, shape=(16, 16, 768),
            description="npy float16 (16, 16, 768), DINOv2 ViT-B/14 patch features at 224"),
        ModalityInfo(
            name="dinov2_global", ext="npy", tokenizer=_GLOBAL, token_modality="tok_dinov2_global", num_tokens=16,
            vocab_size=8192, shape=(768,), description="npy float16 (768,), DINOv2 ViT-B/14 CLS token"),
        ModalityInfo(
            name="imagebind", ext="npy", tokenizer=_IMAGE, token_modality="tok_imagebind@224", num_tokens=256,
            vocab_size=8192, shape=(16, 16, 1280),
            description="npy float16 (16, 16, 1280), ImageBind-H/14 patch features"),
        ModalityInfo(
            name="imagebind_global", ext="npy", tokenizer=_GLOBAL, token_modality="tok_imagebind_global",
            num_tokens=16, vocab_size=8192, shape=(1024,),
            description="npy float16 (1024,), ImageBind-H/14 global embedding"),
        ModalityInfo(
            name="color_palette", ext="json", tokenizer=_TEXT, token_modality="tok_color_palette", num_tokens=23,
            vocab_size=None, description="JSON list of 1..7 [R, G, B] colours, largest cluster first"),
        ModalityInfo(
            name="metadata", ext="json", tokenizer=_TEXT, token_modality="tok_metadata", num_tokens=40,
            vocab_size=None, description="JSON object of the 4M-21 metadata fields"),
    ]
}


def register_modality(info: ModalityInfo) -> ModalityInfo:
    """Add a modality defined outside omniforge (a teacher plugin). Re-registering the same info is a no-op."""
    existing = MODALITIES.get(info.name)
    if existing is not None and existing != info:
        raise ValueError(f"modality {info.name!r} is already registered with a different definition")
    MODALITIES[info.name] = info
    return info


def get_modality(name: str) -> ModalityInfo:
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r}; known modalities: {', '.join(MODALITIES)}") from None

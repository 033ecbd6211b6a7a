"""`omniforge show`: draw every modality of one sample into a PNG."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow.compute as pc

from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.modalities import all_modalities, token_folders
from omniforge import shards, storage
from omniforge.shards import load_manifest
from omniforge.pipeline.verify import discover_modalities


def load_sample(root: str, key: str, modalities: list[str] | None = None) -> tuple[dict, dict[str, str]]:
    """Decoded labels of one key, and failure reasons of the modalities where it failed."""
    root = storage.normalize(root)
    manifest = load_manifest(root)
    rows = manifest.filter(pc.equal(manifest["key"], key))
    if rows.num_rows == 0:
        sample_keys = manifest.column("key").slice(0, 5).to_pylist()
        raise ConfigError(f"key {key!r} is not in {root}; keys look like {sample_keys}")
    shard = rows.column("shard")[0].as_py()
    exts = {m.name: m.ext for m in all_modalities()}
    values, failures = {}, {}
    for m in modalities or discover_modalities(root):
        status_uri = shards.status_uri(root, m, shard)
        if not storage.exists(status_uri):
            failures[m] = "not labeled yet"
            continue
        status = {r["key"]: r for r in shards.read_status(status_uri).to_pylist()}
        row = status.get(key)
        if row is None:
            failures[m] = "missing from status"
        elif not row["ok"]:
            failures[m] = f"{row['error_type']}: {row['error_message']}"
        else:
            ext = exts.get(m)
            for name, data in shards.iter_tar(shards.tar_uri(root, m, shard)):
                if shards.member_key(name) == key:
                    values[m] = codecs.decode(ext or name.split(".", 1)[1], data)
                    break
            else:
                failures[m] = "missing from tar"
    return values, failures


def decode_tokens(values: dict, tokenizers: str) -> dict[str, object]:
    """Crop 0 of every token modality among `values`, decoded back by its tokenizer kind: image-like and global
    modalities as label arrays (drawn like the label, to compare), sequences as their text, or as their label
    (human_poses' people, placed back in the rgb image when `values` hold it and crop_settings). A tokenizer that
    cannot decode here (a released ml-4m tokenizer whose decoder is a diffusion model) gives the one line saying so."""
    from omniforge.errors import NoDecoderError
    from omniforge.modalities import IMAGE_MODALITY
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.store import TokenizerStore
    from omniforge.tokenize.text import Crop

    store = TokenizerStore(tokenizers)
    crop = None
    if shards.CROP_SETTINGS in values and isinstance(values.get(IMAGE_MODALITY), np.ndarray):
        height, width = values[IMAGE_MODALITY].shape[:2]
        crop = Crop(row=np.asarray(values[shards.CROP_SETTINGS])[0], height=height, width=width)
    out: dict[str, object] = {}
    for info in token_folders():  # every size's folder (tok_rgb@448 decodes at 448)
        folder = info.token_modality
        if folder not in values:
            continue
        ids = np.asarray(values[folder])[0]
        try:
            kind = kind_for(info)
            decoded = kind.decode(ids, store)
            if crop is not None:  # where the crop's image is drawn: labels with image coordinates placed in it
                decoded = kind.in_image(decoded, crop)
            out[f"{info.name} (decoded from {folder}, crop 0)"] = decoded
        except NoDecoderError as e:
            out[f"{info.name} ({folder}, crop 0, not decoded)"] = str(e)
    return out


def load_generated(directory: str, modalities: list[str] | None = None) -> dict[str, object]:
    """What `omniforge sample` wrote for one key (SAMPLES/<key>/): token rows ``<folder>.npy`` (1, N) under their
    folder names, and decoded outputs (``.png``, ``.decoded.npy``, ``.decoded.json``, ``.txt``) under their modality
    names."""
    import os

    from PIL import Image

    names = {m.token_modality: m.name for m in token_folders()}
    values: dict[str, object] = {}
    for file in sorted(os.listdir(directory)):
        path = os.path.join(directory, file)
        folder, _, ext = file.partition(".")
        if folder not in names or (modalities and folder not in modalities and names[folder] not in modalities):
            continue
        panel = f"{names[folder]} (generated, decoded from {folder})"
        if ext == "npy":
            values[folder] = np.load(path, allow_pickle=False)
        elif ext == "decoded.npy":
            values[panel] = np.load(path, allow_pickle=False)
        elif ext == "decoded.json":  # a sequence kind's label (human_poses' people)
            with open(path, "rb") as f:
                values[panel] = codecs.decode("json", f.read())
        elif ext == "png":
            with Image.open(path) as img:
                values[panel] = np.asarray(img)
        elif ext == "txt":
            with open(path, encoding="utf-8") as f:
                values[panel] = f.read().strip()
    return values


def smpl_teachers() -> dict[str, str]:
    """{teacher: modality} for every modality `show` draws as SMPL people (registry draw "smpl"): the teachers whose
    `--option TEACHER.smpl_model=PATH` passes the SMPL body model, the modality's own name while no teacher of it
    is registered."""
    from omniforge.labelers import labelers_for_modality

    out: dict[str, str] = {}
    for m in all_modalities():
        if m.draw == "smpl":
            out.update({cls.name: m.name for cls in labelers_for_modality(m.name)} or {m.name: m.name})
    return out


def smpl_model_option(options: Mapping[str, Mapping[str, Any]]) -> tuple[str, str | None]:
    """The `--option` `show` reads and the SMPL model path it gives, or None when it is not given, from
    `parse_options` items ({teacher: {key: value}}). The value is checked by the teacher's options class when
    the teacher is registered. Any other option is a one-line ConfigError: the rest belong to `omniforge label`."""
    from omniforge._smpl import SMPL_MODEL_OPTION
    from omniforge.labelers import get_labeler_class, list_labelers

    teachers = smpl_teachers()
    option = f"{next(iter(teachers))}.{SMPL_MODEL_OPTION}"
    path = None
    for teacher, opts in options.items():
        wrong = [f"{teacher}.{k}" for k in opts if teacher not in teachers or k != SMPL_MODEL_OPTION]
        if wrong:
            raise ConfigError(f"show takes only --option {option}=PATH (the SMPL body model that draws people's 3D "
                              f"joints), not {', '.join(wrong)}: teacher options belong to `omniforge label`")
        value = opts[SMPL_MODEL_OPTION]
        if teacher in list_labelers():  # the teacher's options class checks its own field
            value = getattr(get_labeler_class(teacher).make_options(**{SMPL_MODEL_OPTION: value}), SMPL_MODEL_OPTION)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"--option {teacher}.{SMPL_MODEL_OPTION}={value!r}: give the path of the SMPL body model "
                              f"file (SMPL_NEUTRAL.pkl)")
        option, path = f"{teacher}.{SMPL_MODEL_OPTION}", value
    return option, path


def _people_without_model(values: Mapping[str, object]) -> bool:
    """Whether a panel of `values` draws SMPL people (a non-empty label of a "smpl" modality) as boxes only."""
    styles = {m.name: m.draw for m in all_modalities()}
    return any(styles.get(name.split(" ", 1)[0]) == "smpl" and isinstance(v, Mapping) and bool(v)
               for name, v in values.items())


def show(root: str, key: str, out: str, modalities: list[str] | None = None, *, tokenizers: str | None = None,
         options: Mapping[str, Mapping[str, Any]] | None = None, note: Callable[[str], None] | None = None) -> str:
    """Draw one key of a corpus root, or of an `omniforge sample` output directory (ROOT/<key>/ written by it).

    `options` are `--option` items; show reads one, `human_poses.smpl_model=PATH` (`smpl_model_option`): the
    SMPL body model, loaded before anything is drawn (a bad path is a one-line ConfigError), with which people
    are drawn as their projected 3D joints, else as boxes. `note` gets the one line saying the model is what is
    missing, when people were drawn without it."""
    from omniforge._render import render_sample
    from omniforge._smpl import load_smpl, missing_model_note

    option, smpl_path = smpl_model_option(options or {})
    smpl = load_smpl(smpl_path, option=option) if smpl_path else None
    values, failures, title = _load_panels(root, key, modalities, tokenizers)
    image = render_sample(key, values, failures=failures, title=title, smpl=smpl)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
    if note is not None and smpl is None and _people_without_model(values):
        note(missing_model_note(option))
    return out


def _load_panels(root: str, key: str, modalities: list[str] | None,
                 tokenizers: str | None) -> tuple[dict[str, Any], dict[str, str], str | None]:
    """What to draw of one key: its values by panel name, failure reasons by modality, and the title (None: the
    key), from a corpus root or an `omniforge sample` output directory."""
    import os

    generated = os.path.join(root, key)
    if not storage.is_s3(root) and not storage.exists(shards.manifest_uri(root)) and os.path.isdir(generated):
        values = load_generated(generated, modalities)
        if not values:
            raise ConfigError(f"{generated} holds no outputs of `omniforge sample` (<folder>.npy, .png, .txt)")
        if tokenizers:  # decode the token rows again; drop the decoded files written beside them
            values = {m: v for m, v in values.items() if m.startswith("tok_")}
            values = decode_tokens(values, tokenizers)
        return values, {}, f"{key}: generated by omniforge sample"
    values, failures = load_sample(root, key, modalities)
    if tokenizers:  # labels beside what their tokens decode to, instead of raw token ids
        decoded = decode_tokens(values, tokenizers)
        values = {m: v for m, v in values.items() if not m.startswith("tok_") and m != "crop_settings"}
        values.update(decoded)
    return values, failures, None

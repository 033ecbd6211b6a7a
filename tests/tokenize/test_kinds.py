"""One contract test generated over every registered tokenizer kind and every modality that uses it.

Model kinds: the tiny config, prepare -> encode -> decode -> restore in the input layout, quality, save and load
(through the kind, refusing a folder of another modality). Sequence kinds: a real label made by the modality's
default teacher (tiny) on a photo, serialized per crop, packed into the token budget and decoded back (to text, or
to a label of the modality).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from omniforge import codecs
from omniforge.errors import ConfigError, SampleError, WeightsError
from omniforge.labelers import (Sample, create_labeler, get_labeler_class, labeler_for_modality, labelers_for_modality,
                                list_labelers)
from omniforge.modalities import all_modalities, get_modality
from omniforge.schemas import check_label
from omniforge.tokenize.crops import CropConfig, crop_settings
from omniforge.tokenize.kinds import TokenizerKind, get_kind, kind_for, list_kinds, register_kind
from omniforge.tokenize.store import TokenizerStore
from omniforge.tokenize.text import Crop, train_wordpiece

PAIRS = [(m.tokenizer, m.name) for m in all_modalities() if m.tokenized]
MODEL_PAIRS = [(k, m) for k, m in PAIRS if get_kind(k).model_kind is not None and not get_kind(k).sequence]
SEQUENCE_PAIRS = [(k, m) for k, m in PAIRS if get_kind(k).sequence]
PHOTO = np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256 x 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_kind_is_used_or_usable():
    assert {"vqvae", "segmentation", "features", "memcodes", "sam_mask", "wordpiece"} <= set(list_kinds())
    assert {k for k, _ in PAIRS} <= set(list_kinds())
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'nope'.*registered kinds"):
        get_kind("nope")


@pytest.mark.parametrize("kind_name, modality", MODEL_PAIRS)
def test_model_kind_contract(kind_name, modality, tmp_path):
    info = get_modality(modality)
    kind = kind_for(info)
    assert kind.name == kind_name
    cfg = kind.config("tiny")
    assert cfg.num_tokens == info.num_tokens and cfg.codebook_size <= 256
    torch.manual_seed(0)
    model = kind.build(cfg).eval()
    arrays = kind.example_inputs(2, np.random.default_rng(0))
    shape, dtype = kind.input_layout()
    assert all(a.shape == shape for a in arrays)
    x = kind.prepare(arrays)
    ids = model.encode(x)
    assert tuple(ids.shape) == (2, info.num_tokens) and 0 <= int(ids.min()) and int(ids.max()) < cfg.codebook_size
    with torch.no_grad():
        recon = model.decode(ids)
    restored = kind.restore(recon)
    assert len(restored) == 2 and all(r.shape == shape for r in restored)
    for r in restored:
        assert np.issubdtype(r.dtype, np.floating) if dtype == "float" else r.dtype == np.dtype(dtype)
    scores = kind.quality(x, recon)
    assert set(kind.summary_metrics) <= set(scores) and all(math.isfinite(v) for v in scores.values())

    # a label of the image's size goes through its crop to the model's input layout
    if kind.label_size(arrays[0]) is not None:
        big = np.concatenate([np.concatenate([arrays[0]] * 2, axis=1)] * 2, axis=0)[:300, :410]
        row = crop_settings("k", big.shape[0], big.shape[1], CropConfig(n_crops=2, seed=3))[1]
        assert [a.shape for a in kind.crop_inputs(big, row, 224)] == [shape]
    else:
        assert kind.crop_inputs(arrays[0], None, 224)[0] is arrays[0]  # crop 0 is the stored label

    folder = tmp_path / kind.artifact.folder
    kind.save(model, str(folder))
    store = TokenizerStore(str(tmp_path))
    assert len(store.fingerprint(kind.artifact)) == 16
    assert torch.equal(store.model(kind).encode(x), ids)
    assert store.codebook_size(kind) == cfg.codebook_size
    other = next(get_modality(m) for k, m in MODEL_PAIRS  # a modality whose tokenizer this one cannot be
                 if k != kind_name or kind_for(m).config("tiny").in_channels != cfg.in_channels)
    with pytest.raises(WeightsError, match=f"does not fit modality {other.name!r}"):
        kind_for(other).load(str(folder))

    wrong = np.zeros(tuple(s + 1 for s in shape), dtype=arrays[0].dtype)
    with pytest.raises(SampleError) as err:
        kind.prepare([arrays[0], wrong])
    assert err.value.error_type == "bad_shape"


def _teacher_label(modality: str):
    """A label of PHOTO as the modality's default teacher (tiny weights) writes it, through the shard codec."""
    cls = labeler_for_modality(modality)
    sample = Sample(key="k", image=PHOTO, caption="an astronaut in a white suit with a flag")
    labelable = {m for n in list_labelers() for m in get_labeler_class(n).modalities}
    for m in (*cls.requires, *(m for m in cls.optional_inputs if m in labelable)):
        sample.inputs[m] = _teacher_label(m)
    result = create_labeler(cls.name, weights="tiny", modalities=(modality,)).label([sample])[0]
    assert not isinstance(result, SampleError), result
    ext = get_modality(modality).ext
    return codecs.decode(ext, codecs.encode(ext, result[modality]))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenizerStore:
    out = tmp_path_factory.mktemp("tokenizers")
    (out / "text").mkdir()
    train_wordpiece(["an astronaut in a white suit", "a cat on a red sofa"] * 4,
                    vocab_size=5000).save(str(out / "text" / "tokenizer.json"))
    torch.manual_seed(0)
    for _, m in SEQUENCE_PAIRS:
        kind = kind_for(m)
        if kind.model_kind is not None:
            kind.save(kind.build(kind.config("tiny")), str(out / kind.artifact.folder))
    return TokenizerStore(str(out))


@pytest.mark.parametrize("kind_name, modality", SEQUENCE_PAIRS)
def test_sequence_kind_contract(kind_name, modality, store):
    info = get_modality(modality)
    kind = kind_for(info)
    assert kind.sequence and kind.name == kind_name
    if not labelers_for_modality(modality):  # a modality whose teacher lives elsewhere (a plugin, another branch)
        pytest.skip(f"no teacher in this tree writes {modality}")
    label = _teacher_label(modality)
    rows = crop_settings("k", PHOTO.shape[0], PHOTO.shape[1], CropConfig(n_crops=3, seed=1, hflip=1.0))
    text = store.text()
    for i, row in enumerate(rows):
        crop = Crop(row=row, height=PHOTO.shape[0], width=PHOTO.shape[1], size=224, key="k", index=i, seed=1)
        units = kind.units(label, crop, store)
        assert isinstance(units, list) and all(isinstance(u, str) and u.strip() for u in units)
        ids = text.encode_units(units, info.num_tokens)
        assert ids.shape == (info.num_tokens,) and ids.dtype == np.int16 and text.eos_id in ids
        decoded = kind.decode(ids, store)
        if isinstance(decoded, str):
            if units:
                assert decoded.split()[0] == text.decode(text.encode(units[0])).split()[0]
        else:  # a kind that decodes to a label of its modality (human_poses: the people)
            check_label(info, decoded)


def test_a_plugin_kind_registers_and_binds():
    class HalfKind(TokenizerKind):
        name = "test_half"
        crops = ("dense",)

    register_kind(HalfKind)
    with pytest.raises(ConfigError, match="registered twice"):
        register_kind(type("HalfKind", (TokenizerKind,), {"name": "test_half", "crops": ("dense",)}))
    from omniforge.modalities import ModalityInfo

    info = ModalityInfo(name="half_x", ext="png", tokenizer="test_half", vocab_size=16, description="d")
    assert isinstance(kind_for(info), HalfKind)
    with pytest.raises(ConfigError, match="supports crop 'dense'"):
        kind_for(ModalityInfo(name="half_y", ext="json", tokenizer="test_half", num_tokens=4, description="d",
                              crop="sequence"))
    with pytest.raises(ConfigError, match="has no model config"):
        kind_for(info).config()

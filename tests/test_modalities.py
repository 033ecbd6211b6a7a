"""The modality registry: one contract test generated over every registered modality, the derived defaults a
plugin relies on, and validation errors that name the field."""

from __future__ import annotations

import pytest

from omniforge.errors import ConfigError
from omniforge.modalities import (
    CROPS, DRAWS, MODALITIES, ModalityInfo, all_modalities, by_pixel_folder, by_token_folder, get_modality,
    register_modality,
)
from omniforge.model.specs import spec_for_info, specs_for
from omniforge.tokenize.kinds import kind_for, list_kinds


@pytest.mark.parametrize("name", [m.name for m in all_modalities()])
def test_modality_contract(name):
    info = get_modality(name)
    assert info.crop in CROPS and info.draw in DRAWS
    if info.embedded:  # read by the trainer from the label folder itself, as an input only
        spec = specs_for([info.name], 1)[info.name]
        assert (spec.kind, spec.num_tokens, spec.width, spec.source) == ("embedding", *info.shape, info.name)
        assert spec.input_only and info.role == "input" and info.ext == "npz" and spec_for_info(info, 1) == spec
    if not info.tokenized:
        assert info.token_modality is None
        return
    assert by_token_folder(info.token_modality) is info
    kind = kind_for(info)  # its tokenizer kind is registered and accepts this modality's fields
    assert kind.name in list_kinds() and kind.info is info
    assert all(a.folder and a.files for a in kind.artifacts) and kind.artifact in kind.artifacts
    trainer = kind_for(kind.artifact.trained_by)  # the modality `tokenizer train` takes trains this very artifact
    assert trainer.artifact == kind.artifact
    spec = spec_for_info(info, text_vocab_size=30000)
    assert spec.name == info.token_modality and spec.num_tokens == info.num_tokens
    assert spec.kind == ("sequence" if kind.sequence else "global" if info.crop == "global" else "image")
    if kind.sequence:
        assert info.vocab_size is None
    else:
        assert kind.config("tiny").num_tokens == info.num_tokens
        assert kind.config("base").codebook_size == info.vocab_size
    if info.pixel_modality:
        assert by_pixel_folder(info.pixel_modality) is info
        assert specs_for([info.pixel_modality], 1)[info.pixel_modality].input_only


def test_token_folders_are_unique():
    folders = [f for m in all_modalities() for f in m.token_folders]
    assert len(folders) == len(set(folders))
    assert not set(folders) & set(MODALITIES)


# 4M-21's 224-448 modalities (ml-4m's modality_info.py: tok_rgb@448 ... tok_semseg@448, rgb@448), written out here
ML4M_448 = {"rgb": "tok_rgb@448", "depth": "tok_depth@448", "normal": "tok_normal@448", "semseg_coco": "tok_semseg@448",
            "clip": "tok_clip@448"}


def test_4m21s_448_folders():
    for name, folder in ML4M_448.items():
        info = get_modality(name)
        assert info.token_sizes == (224, 448) and info.token_size == 224
        assert info.token_folders == (info.token_modality, folder)
        big = by_token_folder(folder)
        assert (big.name, big.token_modality, big.num_tokens, big.token_size) == (name, folder, 784, 448)
        assert big.vocab_size == info.vocab_size and big.at(224) == info and info.at(448) == big
        assert info.tokens_at(448) == 784 and info.tokens_at(224) == 196
        spec = specs_for([folder], 1)[folder]
        assert (spec.kind, spec.num_tokens, spec.grid) == ("image", 784, 28)
        # the tokenizer reads 448 x 448 crops, or the teacher's 28 x 28 map at 448 for a feature map
        side = 28 if info.crop == "features" else 448
        assert kind_for(big).input_layout()[0][:2] == (side, side)
    assert kind_for(get_modality("clip").at(448)).input_layout() == ((28, 28, 512), "float")
    assert kind_for(get_modality("clip")).input_layout() == ((14, 14, 512), "float")
    assert get_modality("clip").at(448).shape == (14, 14, 512)  # the stored label stays the 224 map
    assert "yet" not in get_modality("clip").description
    assert by_pixel_folder("rgb@448").token_size == 448 and by_pixel_folder("rgb@448").name == "rgb"
    assert specs_for(["rgb@448"], 1)["rgb@448"].num_tokens == 784
    # other modalities have one size (dinov2 and imagebind: 4M-21 has no 448 folder for them)
    assert get_modality("canny_edge").token_sizes == (224,) and get_modality("caption").token_sizes == ()
    with pytest.raises(ConfigError, match="modality 'dinov2' is tokenized at 224, not 448"):
        get_modality("dinov2").at(448)


def test_a_plugin_declares_its_448_folder():
    info = ModalityInfo(name="sal_x", ext="png", tokenizer="vqvae", vocab_size=64, token_sizes=(224, 448),
                        description="d")
    assert info.token_folders == ("tok_sal_x@224", "tok_sal_x@448") and info.at(448).num_tokens == 784
    with pytest.raises(ConfigError, match="token_sizes=.*must start with 224"):
        ModalityInfo(name="sal_y", ext="png", tokenizer="vqvae", vocab_size=64, token_sizes=(448,), description="d")
    with pytest.raises(ConfigError, match="token_sizes=.*does not scale to a whole grid at 300"):
        ModalityInfo(name="sal_y", ext="png", tokenizer="vqvae", vocab_size=64, token_sizes=(224, 300),
                     description="d")
    with pytest.raises(ConfigError, match="token_modality=.*must end with '@224'"):
        ModalityInfo(name="sal_y", ext="png", tokenizer="vqvae", vocab_size=64, token_sizes=(224, 448),
                     token_modality="tok_sal", description="d")
    feats = ModalityInfo(name="feat_y", ext="npy", tokenizer="features", shape=(14, 14, 8), vocab_size=64,
                         token_sizes=(224, 448), description="d")  # its teacher runs at 448 (label_at)
    assert feats.at(448).token_modality == "tok_feat_y@448" and feats.at(448).num_tokens == 784
    with pytest.raises(ConfigError, match="token_sizes=.*image-like"):
        ModalityInfo(name="seq_y", ext="json", tokenizer="wordpiece", num_tokens=8, token_sizes=(224,),
                     description="d")


def test_defaults_derive_from_ext_shape_and_tokenizer():
    png = ModalityInfo(name="saliency_x", ext="png", tokenizer="vqvae", vocab_size=1024, description="PNG uint8")
    assert (png.crop, png.token_modality, png.num_tokens, png.channels, png.dtype) == (
        "dense", "tok_saliency_x@224", 196, 1, "uint8")
    assert png.value_range == (0.0, 255.0) and png.resample == "bilinear" and png.draw == "gray"
    npy_map = ModalityInfo(name="heat_x", ext="npy", tokenizer="vqvae", vocab_size=64, description="float map")
    assert (npy_map.crop, npy_map.dtype, npy_map.value_range, npy_map.draw) == ("dense", "float", (0.0, 1.0), "heat")
    feats = ModalityInfo(name="feat_x", ext="npy", tokenizer="features", shape=(8, 8, 32), vocab_size=64,
                         description="features")
    assert (feats.crop, feats.num_tokens, feats.channels, feats.draw) == ("features", 64, 32, "features")
    vec = ModalityInfo(name="vec_x", ext="npy", tokenizer="memcodes", shape=(48,), vocab_size=64, description="vector")
    assert (vec.crop, vec.token_modality, vec.num_tokens, vec.channels, vec.draw) == (
        "global", "tok_vec_x", 16, 48, "vector")
    seq = ModalityInfo(name="seq_x", ext="json", tokenizer="wordpiece", num_tokens=12, serializer="m.n:f",
                       description="json")
    assert (seq.crop, seq.token_modality, seq.vocab_size, seq.draw, seq.keep, seq.role) == (
        "sequence", "tok_seq_x", None, "json", "random", "both")
    txt = ModalityInfo(name="txt_x", ext="txt", tokenizer="wordpiece", num_tokens=8, description="text")
    assert txt.serializer == "omniforge.tokenize.text:text_units" and txt.draw == "text"
    emb = ModalityInfo(name="emb_x", ext="npz", shape=(16, 32), description="npz embedding")
    assert (emb.crop, emb.tokenized, emb.embedded, emb.role, emb.draw, emb.token_modality) == (
        "embedding", False, True, "input", "embedding", None)
    assert get_modality("t5_caption").shape == (77, 4096) and get_modality("t5_caption").embedded
    # a plugin written before modalities could be tokenized: label-only, its token fields ignored
    old = ModalityInfo(name="old_x", ext="npy", description="d", token_modality="old_x", num_tokens=0,
                       vocab_size=None, tokenizer="none", shape=(3,))
    assert not old.tokenized and old.crop == "none" and old.token_modality is None


@pytest.mark.parametrize("fields, field", [
    (dict(ext="bmp"), "ext"),
    (dict(ext="png", tokenizer="vqvae"), "vocab_size"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, num_tokens=0), "num_tokens"),
    (dict(ext="json", tokenizer="wordpiece"), "num_tokens"),
    (dict(ext="json", tokenizer="wordpiece", num_tokens=8, vocab_size=100), "vocab_size"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, serializer="a:b"), "serializer"),
    (dict(ext="json", tokenizer="wordpiece", num_tokens=8, serializer="not a reference"), "serializer"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, resample="lanczos"), "resample"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, dtype="float"), "dtype"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, value_range=(1, 1)), "value_range"),
    (dict(ext="npy", tokenizer="features", crop="features", vocab_size=8), "shape"),
    (dict(ext="png", tokenizer="segmentation", vocab_size=8), "num_classes"),
    (dict(ext="json", tokenizer="wordpiece", num_tokens=8, chunks=(2, 0)), "chunks"),
    (dict(ext="json", tokenizer="wordpiece", num_tokens=8, shuffle_chunks=True), "shuffle_chunks"),
    (dict(ext="json", tokenizer="wordpiece", num_tokens=8, role="output"), "role"),
    (dict(ext="png", tokenizer="none", crop="dense"), "crop"),
    (dict(ext="png", tokenizer="vqvae", vocab_size=8, draw="sparkles"), "draw"),
    (dict(ext="npz"), "shape"),
    (dict(ext="npz", shape=(8, 4, 2)), "shape"),
    (dict(ext="npz", shape=(8, 4), role="both"), "role"),
    (dict(ext="npz", shape=(8, 4), tokenizer="vqvae", vocab_size=8), "crop"),
    (dict(ext="npy", shape=(8, 4), crop="embedding"), "crop"),
])
def test_invalid_fields_name_the_field(fields, field):
    with pytest.raises(ConfigError, match=rf"ModalityInfo 'bad_x': {field}="):
        ModalityInfo(name="bad_x", description="d", **fields)
    with pytest.raises(ConfigError, match="name="):
        ModalityInfo(name="Bad Name", ext="png", description="d")


def test_register_refuses_a_conflicting_definition():
    info = ModalityInfo(name="regtest_x", ext="png", tokenizer="vqvae", vocab_size=8, description="d")
    try:
        assert register_modality(info) is info
        assert register_modality(ModalityInfo(name="regtest_x", ext="png", tokenizer="vqvae", vocab_size=8,
                                              description="d")) is info  # the same definition again: a no-op
        with pytest.raises(ConfigError, match="vocab_size"):
            register_modality(ModalityInfo(name="regtest_x", ext="png", tokenizer="vqvae", vocab_size=16,
                                           description="d"))
        with pytest.raises(ConfigError, match="already used"):
            register_modality(ModalityInfo(name="regtest_y", ext="png", tokenizer="vqvae", vocab_size=8,
                                           token_modality="tok_regtest_x@224", description="d"))
        with pytest.raises(ConfigError, match="'tok_rgb@448' is already used by 'rgb'"):
            register_modality(ModalityInfo(name="regtest_z", ext="png", tokenizer="vqvae", vocab_size=8,
                                           token_modality="tok_rgb@448", description="d"))
    finally:
        MODALITIES.pop("regtest_x", None)
    with pytest.raises(ConfigError, match="unknown modality 'nope'"):
        get_modality("nope")

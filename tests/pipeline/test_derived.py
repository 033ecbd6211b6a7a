"""Derived labelers: run order, inputs from the same job or from shards written earlier, staleness."""

from __future__ import annotations

import json

import pytest

import derived_labeler
from images import photo_bytes
from omniforge import codecs
from omniforge.errors import ConfigError
from omniforge.pipeline import LabelConfig, label, verify
from omniforge import shards
from ray import cloudpickle

cloudpickle.register_pickle_by_value(derived_labeler)


def _members(root, modality, n_shards):
    return {shards.member_key(n): d for s in range(n_shards)
            for n, d in shards.iter_tar(shards.tar_uri(root, modality, s))}


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, name in enumerate(("chelsea", "astronaut", "coffee", "rocket", "chelsea")):
        (folder / f"img{i}.jpg").write_bytes(photo_bytes(name, 48 + 8 * i))
        (folder / f"img{i}.txt").write_text(f"A photo. Number {i}!")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def test_derived_in_the_same_job_and_from_an_earlier_job(corpus, tmp_path, ray_address):
    root = str(tmp_path / "out")
    # job 1: palette and its derived size together, listed in the "wrong" order
    label(LabelConfig(input=str(corpus), output=root, modalities=("palette_size", "color_palette"), shard_size=4,
                      batch_size=2, progress=False), ray_address=ray_address)
    palettes = {k: codecs.decode("json", d) for k, d in _members(root, "color_palette", 2).items()}
    sizes = {k: codecs.decode("npy", d) for k, d in _members(root, "palette_size", 2).items()}
    assert set(sizes) == set(palettes) and len(sizes) == 5
    assert all(int(sizes[k][0]) == len(palettes[k][0]["7"]) for k in sizes)
    assert verify(root).ok

    # job 2 on a fresh root: palette first, then the derived labeler alone reads it back from the shards
    root2 = str(tmp_path / "out2")
    label(LabelConfig(input=str(corpus), output=root2, modalities=("color_palette",), shard_size=4, progress=False),
          ray_address=ray_address)
    summary = label(LabelConfig(output=root2, modalities=("palette_size",), progress=False), ray_address=ray_address)
    assert summary.labeled == {"palette_size": 5}
    assert summary.failed["palette_size"] == {"decode_error": 1}
    sizes2 = {k: codecs.decode("npy", d) for k, d in _members(root2, "palette_size", 2).items()}
    assert {k: int(v[0]) for k, v in sizes2.items()} == {k: int(v[0]) for k, v in sizes.items()}
    assert verify(root2).ok

    # relabeling the input with other options makes the derived labels stale: both are redone
    summary = label(LabelConfig(output=root2, modalities=("color_palette", "palette_size"),
                                options={"color_palette": {"max_pixels": 64}}, progress=False), ray_address=ray_address)
    assert summary.skipped_samples == {"color_palette": 0, "palette_size": 0}
    assert summary.labeled == {"color_palette": 5, "palette_size": 5}
    assert verify(root2).ok


def test_a_derived_labeler_without_its_input_is_refused(corpus, tmp_path, ray_address):
    with pytest.raises(ConfigError, match="add color_palette to --modalities"):
        label(LabelConfig(input=str(corpus), output=str(tmp_path / "o"), modalities=("palette_size",),
                          progress=False), ray_address=ray_address)


def test_metadata_fields_come_only_from_sources_that_ran(corpus, tmp_path, ray_address):
    root = str(tmp_path / "out")
    label(LabelConfig(input=str(corpus), output=root, modalities=("rgb", "metadata"), shard_size=4,
                      progress=False), ray_address=ray_address)
    meta = {k: json.loads(d) for k, d in _members(root, "metadata", 2).items()}
    assert len(meta) == 5
    m = meta["img1"]
    assert m["caption_n_words"] == 4 and m["caption_n_sentences"] == 2
    assert m["caption_n_chars"] == len("A photo. Number 1!")
    assert m["original_width"] > 0 and 0 <= m["brightness"] <= 255 and 0 <= m["entropy"] <= 8
    for absent in ("n_humans", "n_sam_instances", "n_coco_instances", "walkability", "geometric_complexity"):
        assert absent not in m
    assert verify(root).ok

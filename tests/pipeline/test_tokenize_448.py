"""`omniforge tokenize` at 448: tok_<name>@448 beside tok_<name>@224, from the same crop settings, never
upsampled.

The labels are written by a real label job from photos large enough (and one too small); the expected
448 tokens are re-derived here from the label shards with the public building blocks (crop settings, the
448 crop of that window, the tokenizer trained at 224).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from images import photo_bytes
from tiny_labels import digest
from omniforge import codecs, shards
from omniforge.errors import ConfigError
from omniforge.modalities import parse_token_target
from omniforge.pipeline import LabelConfig, label, verify
from omniforge.pipeline.tokenize_job import TokenizeConfig, tokenize
from omniforge.tokenize import crops as C
from omniforge.tokenize import models
from omniforge.tokenize.kinds import kind_for

CROPS = C.CropConfig(n_crops=2, seed=3)
STORAGE = C.min_storage_size(CROPS, 448)  # every crop of an image stored at this size covers 448 x 448
SMALL = "chelsea"  # 300 x 451: stored at its own size, too small for a 448 crop whatever the storage size


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for name in ("astronaut", "coffee"):
        (folder / f"{name}.jpg").write_bytes(photo_bytes(name, STORAGE + 40))
    (folder / f"{SMALL}.jpg").write_bytes(photo_bytes(SMALL))
    return folder


def _label(tmp: Path, storage_size: int, ray_address: str, modalities: tuple[str, ...] = ("rgb",)) -> str:
    root = str(tmp / f"labels{storage_size}{''.join(m for m in modalities if m != 'rgb')}")
    label(LabelConfig(input=str(tmp / "corpus"), output=root, modalities=modalities, storage_size=storage_size,
                      shard_size=8, progress=False), ray_address=ray_address)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok448")
    _corpus(tmp / "corpus")
    return tmp


@pytest.fixture(scope="module")
def tokenizer_dir(corpus) -> str:
    torch.manual_seed(0)
    kind = kind_for("rgb")
    out = corpus / "tokenizers"
    kind.save(kind.build(kind.config("tiny")), str(out / kind.artifact.folder))
    return str(out)


def _members(root: str, folder: str) -> dict[str, object]:
    return {shards.member_key(n): codecs.decode(n.split(".", 1)[1], d)
            for n, d in shards.iter_tar(shards.tar_uri(root, folder, 0))}


@pytest.fixture(scope="module")
def labels(corpus, ray_address) -> str:
    """rgb and clip labeled at STORAGE, read-only (checked at the end of the module): a test that tokenizes in
    place copies it."""
    root = _label(corpus, STORAGE, ray_address, ("rgb", "clip"))
    before = digest(root)
    yield root
    assert digest(root) == before, "a test wrote into the shared label root"


def _own_copy(labels: str, tmp: Path) -> str:
    shutil.copytree(labels, tmp / "labels")
    return str(tmp / "labels")


@pytest.fixture(scope="module")
def clip_448_maps(labels):
    """key -> the label job's teacher (tiny, the same seeded weights) run at 448 on the 448 window of each of the
    key's CROPS crops of the stored rgb: what tok_clip@448 must encode, crop by crop (4M-21: the stored clip
    label is crop 0's 224 map, so every crop, crop 0 included, is the teacher at 448). Computed once a key."""
    from omniforge.labelers import Sample
    from omniforge.labelers.clip import ClipLabeler

    teacher, rgb = ClipLabeler(weights="tiny"), _members(labels, "rgb")

    @functools.cache
    def maps(key: str) -> list[np.ndarray]:
        windows = [Sample(key=key, image=C.crop_image(rgb[key], c, 448))
                   for c in C.crop_settings(key, *rgb[key].shape[:2], CROPS)]
        return [r["clip"] for r in teacher.label_at(windows, 448)]

    return maps


def test_448_tokens_come_from_the_224_crop_windows(corpus, labels, tokenizer_dir, ray_address, tmp_path):
    root = _own_copy(labels, tmp_path)
    cfg = TokenizeConfig(input=root, tokenizers=tokenizer_dir, modalities=("rgb", "rgb@448"), crops=CROPS,
                         progress=False)
    summary = tokenize(cfg, ray_address=ray_address)
    assert summary.written == 2 and summary.left_out == {"too_small": 1}  # chelsea
    report = verify(root)
    assert report.ok, report.lines()
    rgb, crops = _members(root, "rgb"), _members(root, "crop_settings")
    t224, t448 = _members(root, "tok_rgb@224"), _members(root, "tok_rgb@448")
    assert list(t224) == list(t448) == list(crops) == ["astronaut", "coffee"]
    tok = models.load_tokenizer(str(Path(tokenizer_dir) / "rgb"))
    kind224, kind448 = kind_for("rgb"), kind_for(parse_token_target("rgb@448"))
    for key, cs in crops.items():
        h, w = rgb[key].shape[:2]
        assert min(h, w) == STORAGE
        np.testing.assert_array_equal(cs, C.crop_settings(key, h, w, CROPS))
        assert t448[key].dtype == np.int16 and t448[key].shape == (2, 784) and t224[key].shape == (2, 196)
        for i, (top, left, ch, cw, flip) in enumerate(cs):
            # the 448 ids are the tokenizer's ids of the crop's window resized to 448 (bicubic, rgb's resample)
            # and mirrored when the crop is flipped
            window = Image.fromarray(np.ascontiguousarray(rgb[key][top:top + ch, left:left + cw]))
            big = np.asarray(window.resize((448, 448), Image.Resampling.BICUBIC))
            big = np.ascontiguousarray(big[:, ::-1] if flip else big)
            expected = tok.encode(kind448.prepare([big]))[0].numpy()
            np.testing.assert_array_equal(t448[key][i], expected)
            small = C.crop_dense(rgb[key], cs[i], 224, mode="bicubic")
            np.testing.assert_array_equal(t224[key][i], tok.encode(kind224.prepare([small]))[0].numpy())
    failed = [r for r in shards.read_status(shards.status_uri(root, "tok_rgb@448", 0)).to_pylist() if not r["ok"]]
    assert [r["key"] for r in failed] == [SMALL] and failed[0]["error_type"] == "too_small"
    assert f"--storage-size {STORAGE}" in failed[0]["error_message"]
    assert "\n" not in failed[0]["error_message"]
    # `omniforge show` decodes crop 0 of both sizes, the 448 one at 448 x 448
    from omniforge.pipeline.show import decode_tokens, show

    decoded = decode_tokens({"tok_rgb@224": t224["coffee"], "tok_rgb@448": t448["coffee"]}, tokenizer_dir)
    assert sorted(v.shape for v in decoded.values()) == [(224, 224, 3), (448, 448, 3)]
    with Image.open(show(root, "coffee", str(corpus / "coffee.png"), tokenizers=tokenizer_dir)) as img:
        assert img.width > 448


def test_labels_stored_too_small_are_never_upsampled(corpus, tokenizer_dir, ray_address):
    root = _label(corpus, 320, ray_address)
    cfg = TokenizeConfig(input=root, tokenizers=tokenizer_dir, modalities=("rgb", "rgb@448"),
                         crops=C.CropConfig(n_crops=1), progress=False)
    summary = tokenize(cfg, ray_address=ray_address)
    assert summary.written == 0 and summary.left_out == {"too_small": 3}
    rows = shards.read_status(shards.status_uri(root, "tok_rgb@224", 0)).to_pylist()
    assert all(not r["ok"] and "omniforge label --storage-size 448" in r["error_message"] for r in rows)
    assert "covers 320 x 320 stored pixels, under 448" in rows[0]["error_message"]
    # the same labels at 224 alone are tokenized as before
    alone = tokenize(TokenizeConfig(input=root, output=str(corpus / "tok224"), tokenizers=tokenizer_dir,
                                    modalities=("rgb",), crops=C.CropConfig(n_crops=1), progress=False),
                     ray_address=ray_address)
    assert alone.written == 3


def test_clip_448_runs_the_teacher_at_448_on_every_crop(corpus, labels, clip_448_maps, ray_address, tmp_path):
    # tok_clip@448, as 4M-21: every crop (crop 0 included) is the teacher run at 448 on that crop's 448 window of
    # the stored rgb (clip_448_maps), then the clip tokenizer at a 28 x 28 grid
    root = _own_copy(labels, tmp_path)
    torch.manual_seed(0)
    kind224, kind448 = kind_for("clip"), kind_for(parse_token_target("clip@448"))
    tokenizers = corpus / "clip_tokenizers"
    kind224.save(kind224.build(kind224.config("tiny")), str(tokenizers / kind224.artifact.folder))
    summary = tokenize(TokenizeConfig(input=root, tokenizers=str(tokenizers), modalities=("clip", "clip@448"),
                                      crops=CROPS, progress=False), ray_address=ray_address)
    assert summary.written == 2 and summary.left_out == {"too_small": 1}  # chelsea: never upsampled
    report = verify(root)
    assert report.ok, report.lines()
    rgb, stored, crops = _members(root, "rgb"), _members(root, "clip"), _members(root, "crop_settings")
    t224, t448 = _members(root, "tok_clip@224"), _members(root, "tok_clip@448")
    assert list(t224) == list(t448) == list(crops) == ["astronaut", "coffee"]
    tok = models.load_tokenizer(str(tokenizers / "clip"))
    for key, cs in crops.items():
        assert t448[key].dtype == np.int16 and t448[key].shape == (2, 784) and t224[key].shape == (2, 196)
        np.testing.assert_array_equal(cs, C.crop_settings(key, *rgb[key].shape[:2], CROPS))  # clip_448_maps' crops
        feats = clip_448_maps(key)
        assert all(f.shape == (28, 28, 512) for f in feats)
        np.testing.assert_array_equal(t448[key], tok.encode(kind448.prepare(feats)).numpy())
        # the 224 folder is as before: crop 0 is the stored label, never the 448 map
        np.testing.assert_array_equal(t224[key][0], tok.encode(kind224.prepare([stored[key]]))[0].numpy())
    assert not np.array_equal(t448["astronaut"][0], t448["coffee"][0])
    # one crop: the teacher still runs for the 448 folder (crop 0 cannot reuse the stored 224 map)
    one = tokenize(TokenizeConfig(input=root, output=str(tmp_path / "clip448_one"), tokenizers=str(tokenizers),
                                  modalities=("clip@448",), crops=C.CropConfig(n_crops=1, seed=3), progress=False),
                   ray_address=ray_address)
    assert one.written == 2
    ones = _members(str(tmp_path / "clip448_one"), "tok_clip@448")
    for key in ones:
        np.testing.assert_array_equal(ones[key][0], t448[key][0])  # crop 0 is the same centred square


def test_clip_448_through_the_released_224_448_tokenizer(corpus, labels, clip_448_maps, ray_address, tmp_path):
    # Apple's CLIP-B16_8k_224-448 (the fixture snapshot, ml-4m's own classes at a tiny width) encodes the 28 x 28
    # map of the teacher run at 448, its position embedding interpolated
    import json

    from omniforge.tokenize import ml4m

    fixtures = Path(__file__).parents[1] / "fixtures" / "ml4m_tokenizers"
    for name, p in json.loads((fixtures / "tiny_presets.json").read_text()).items():
        ml4m.register_vit_preset(name, **p)
    tokenizers = tmp_path / "clip_snapshot"
    shutil.copytree(fixtures / "snapshots" / "4M_tokenizers_CLIP-B16_8k_224-448", tokenizers / "clip")
    out = str(tmp_path / "clip448_snapshot")
    summary = tokenize(TokenizeConfig(input=labels, output=out, tokenizers=str(tokenizers), modalities=("clip@448",),
                                      crops=CROPS, progress=False), ray_address=ray_address)
    assert summary.written == 2 and summary.left_out == {"too_small": 1}
    rgb, crops, t448 = _members(labels, "rgb"), _members(out, "crop_settings"), _members(out, "tok_clip@448")
    model = ml4m.load_snapshot(str(tokenizers / "clip"))
    info = parse_token_target("clip@448")
    for key, cs in crops.items():
        np.testing.assert_array_equal(cs, C.crop_settings(key, *rgb[key].shape[:2], CROPS))  # clip_448_maps' crops
        expected = model.encode(ml4m.prepare(info, np.stack(clip_448_maps(key)))).numpy()
        assert t448[key].shape == (2, 784) and expected.shape == (2, 784)
        np.testing.assert_array_equal(t448[key], expected)


@pytest.mark.parametrize("target, says", [
    ("dinov2@448", "modality 'dinov2' is tokenized at 224, not 448 (modalities tokenized at 448: rgb, "),
    ("caption@448", "modality 'caption' has no image-like tokens"),
    ("depth@336", "modality 'depth' is tokenized at 224, 448, not 336"),
    ("depth@big", "'depth@big': a size is <modality>@<pixels>, e.g. depth@448"),
])
def test_a_size_a_modality_lacks_is_one_line(target, says):
    with pytest.raises(ConfigError) as e:
        TokenizeConfig(input="x", tokenizers="y", modalities=("depth", target))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)


def test_224_named_by_size_is_the_plain_target_and_twice_is_an_error():
    assert TokenizeConfig(input="x", tokenizers="y", modalities=("depth@224", "depth@448")).modalities == (
        "depth", "depth@448")
    with pytest.raises(ConfigError, match="lists a target twice"):
        TokenizeConfig(input="x", tokenizers="y", modalities=("depth", "depth@224"))

"""Apple's released 4M tokenizers (ml-4m hub snapshots) through omniforge's own implementation.

The fixtures (tests/fixtures/ml4m_tokenizers/, made by its make_fixtures.py with ml-4m's own classes) hold tiny
random-init tokenizers of every released kind in the hub layout, their inputs, and what ml-4m made of them: token
ids at 224 and 448 (448 inputs run the position embedding interpolation: the semseg tokenizer was trained at 224,
the depth one at 448), each token's margin between its best and second-best code, decoded reconstructions, and
ml-4m's preprocessing of raw crops. Expected values come only from those files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError, NoDecoderError, WeightsError
from omniforge.jobs.cli import main as cli_main
from omniforge.modalities import ModalityInfo, get_modality
from omniforge.tokenize import ml4m
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.store import TokenizerStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ml4m_tokenizers"
SNAPSHOTS = FIXTURES / "snapshots"
VOCAB_GZ = Path(__file__).parents[1] / "fixtures" / "ml4m" / "text_tokenizer_4m_wordpiece_30k.json.gz"
NEAR_TIE = 1e-5  # a token whose best and second-best codes are closer than this may flip in another implementation
SEMSEG, CLIP, DEPTH, GLOBAL, SAM, POSES = (f"4M_tokenizers_{n}" for n in (
    "semseg_4k_224-448", "CLIP-B16_8k_224-448", "depth_8k_224-448", "DINOv2-B14-global_8k_16_224",
    "sam-instance_1k_64", "human-poses_1k_8"))


@pytest.fixture(scope="module", autouse=True)
def tiny_presets():
    """The fixtures' ViT presets, registered the way a caller extends the table."""
    for name, p in json.loads((FIXTURES / "tiny_presets.json").read_text()).items():
        ml4m.register_vit_preset(name, **p)


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(FIXTURES / "inputs.npz"))


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIXTURES / "expected.npz"))


def _x2(a: np.ndarray) -> np.ndarray:
    """The fixtures' 448 inputs: the first 224 one, every value repeated 2 x 2."""
    return np.repeat(np.repeat(a[:1], 2, 1), 2, 2)


def _assert_ids(got: np.ndarray, want: np.ndarray, margin: np.ndarray) -> None:
    assert got.shape == want.shape
    differ = got != want
    assert not (differ & (margin >= NEAR_TIE)).any(), f"{int(differ.sum())} ids differ, margins {margin[differ]}"
    assert differ.mean() < 0.01


def _cases(inputs):
    """(snapshot, modality, res, label arrays, expected key) for every kind and resolution."""
    return [(SEMSEG, "semseg_coco", 224, inputs["semseg_224"], "semseg_ids_224"),
            (SEMSEG, "semseg_coco", 448, inputs["semseg_448"], "semseg_ids_448"),
            (CLIP, "clip", 224, inputs["clip_224"], "clip_ids_224"),
            (CLIP, "clip", 448, _x2(inputs["clip_224"]), "clip_ids_448"),
            (DEPTH, "depth", 224, inputs["depth_224"], "depth_ids_224"),
            (DEPTH, "depth", 448, _x2(inputs["depth_224"]), "depth_ids_448"),
            (GLOBAL, "dinov2_global", 0, inputs["dinov2_global"], "global_ids"),
            (SAM, "sam_instance", 64, inputs["sam_mask"], "sam_ids")]


def test_token_ids_equal_ml4m_for_every_kind_at_224_and_448(inputs, expected):
    """Raw label arrays -> omniforge's ml-4m preprocessing -> omniforge's networks: ml-4m's ids, token for token."""
    for snap, modality, _, arrays, key in _cases(inputs):
        model = ml4m.load_snapshot(str(SNAPSHOTS / snap))
        ids = model.encode(ml4m.prepare(get_modality(modality), arrays)).numpy()
        _assert_ids(ids, expected[key], expected[key.replace("_ids", "_margin")])
        assert len(np.unique(ids)) > 20  # varied codes, not a handful winning every token


def test_the_pose_tokenizer_loads_and_encodes(tmp_path, inputs, expected):
    """human-poses_1k_8, laid out by import-4m as human_poses' pose tokenizer: ml-4m's ids from the body poses as
    they are (ml4m_transform "pose"), and its decoding."""
    from omniforge.tokenize.import4m import import_4m

    model = ml4m.load_snapshot(str(SNAPSHOTS / POSES))
    assert model.config.family == "Memcodes MLP" and model.config.num_tokens() == 8
    ids = model.encode(torch.from_numpy(inputs["human_poses"])).numpy()
    _assert_ids(ids, expected["poses_ids"], expected["poses_margin"])
    np.testing.assert_allclose(model.decode(torch.from_numpy(expected["poses_ids"])).numpy(), expected["poses_recon"],
                               atol=1e-5)
    out = tmp_path / "tok"
    import_4m([str(_imported(tmp_path, (POSES,), vocab=False))], str(out))
    store, kind = TokenizerStore(str(out)), kind_for("human_poses")
    got = store.encode(kind, list(inputs["human_poses"]))
    _assert_ids(got.astype(np.int64), expected["poses_ids"], expected["poses_margin"])
    assert store.codebook_size(kind) == 64 and ml4m.is_ml4m_model(store.model(kind))


def test_reconstructions_match_ml4m(expected):
    semseg = ml4m.load_snapshot(str(SNAPSHOTS / SEMSEG))
    for res in (224, 448):
        logits = semseg.decode(torch.from_numpy(expected[f"semseg_ids_{res}"]))
        assert logits.shape == (expected[f"semseg_ids_{res}"].shape[0], 134, res, res)
        s = res // 7
        np.testing.assert_allclose(logits[:, :, ::s, ::s].numpy(), expected[f"semseg_recon_{res}"], atol=1e-5)
    argmax = semseg.decode(torch.from_numpy(expected["semseg_ids_224"])).argmax(1).numpy()
    np.testing.assert_array_equal(argmax, expected["semseg_recon_argmax_224"])
    clip = ml4m.load_snapshot(str(SNAPSHOTS / CLIP))
    for res in (224, 448):
        out = clip.decode(torch.from_numpy(expected[f"clip_ids_{res}"]))
        np.testing.assert_allclose(out[:, ::32].numpy(), expected[f"clip_recon_{res}"], atol=1e-5)
    glob = ml4m.load_snapshot(str(SNAPSHOTS / GLOBAL))
    np.testing.assert_allclose(glob.decode(torch.from_numpy(expected["global_ids"])).numpy(),
                               expected["global_recon"], atol=1e-5)
    sam = ml4m.load_snapshot(str(SNAPSHOTS / SAM))
    np.testing.assert_allclose(sam.decode(torch.from_numpy(expected["sam_ids"])).numpy(), expected["sam_recon"],
                               atol=1e-5)


def test_the_lucid_decoder_reads_the_raw_codebook_rows(expected):
    """The codebook rows are not unit length, so decoding from normalised rows would give other logits."""
    model = ml4m.load_snapshot(str(SNAPSHOTS / SEMSEG))
    norms = model.quantize.embed.norm(dim=-1)
    assert norms.min() < 0.9 and norms.max() > 1.1
    ids = torch.from_numpy(expected["semseg_ids_224"])
    model.quantize.embed.copy_(torch.nn.functional.normalize(model.quantize.embed, dim=-1))
    assert (model.decode(ids)[:, :, ::32, ::32].numpy() - expected["semseg_recon_224"]).__abs__().max() > 1e-3


def test_ml4m_preprocessing_per_modality_equals_ml4m_transforms(inputs, expected):
    """rgb [-1, 1], depth / 65535 then truncated standardisation, normals [-1, 1], semseg ids + 1 (255 -> 0)."""
    for modality, key in (("rgb", "rgb"), ("depth", "depth"), ("normal", "normal")):
        x = ml4m.prepare(get_modality(modality), inputs[f"{key}_224"])
        if key == "depth":  # a mean and a variance: float sums whose order depends on torch's thread count
            np.testing.assert_allclose(x[..., ::7, ::7].numpy(), expected[f"pre_{key}"], atol=1e-6)
        else:
            np.testing.assert_array_equal(x[..., ::7, ::7].numpy(), expected[f"pre_{key}"])  # bit for bit
        flat = x.reshape(x.shape[0], -1).double()
        np.testing.assert_allclose(np.stack([flat.mean(1), flat.std(1)], 1), expected[f"pre_{key}_stats"], atol=1e-6)
    x = ml4m.prepare(get_modality("semseg_coco"), inputs["semseg_224"])
    np.testing.assert_array_equal(x.numpy(), expected["pre_semseg"])
    assert (inputs["semseg_224"] == 255).any() and (x.numpy()[inputs["semseg_224"] == 255] == 0).all()
    # the depth standardisation is not a plain z-score: the top and bottom 10% are left out of mean and variance
    d = inputs["depth_224"][0].astype(np.float64) / 65535
    plain = (d - d.mean()) / d.std()
    assert np.abs(plain[::7, ::7] - expected["pre_depth"][0, 0]).max() > 1e-2


def test_every_builtin_ml4m_transform_is_described():
    from omniforge.modalities import ML4M_TRANSFORMS

    assert set(ml4m.TRANSFORMS) == set(ML4M_TRANSFORMS)


def _imported(tmp_path: Path, names=(SEMSEG, CLIP, DEPTH, GLOBAL, SAM), *, vocab: bool = True) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        shutil.copytree(SNAPSHOTS / n, src / n)
    if vocab:
        import gzip

        (src / "text_tokenizer_4m_wordpiece_30k.json").write_bytes(gzip.decompress(VOCAB_GZ.read_bytes()))
    return src


def test_a_tokenizers_folder_of_snapshots_uses_ml4m_preprocessing_and_codebooks(tmp_path, inputs, expected):
    from omniforge.tokenize.import4m import import_4m

    out = tmp_path / "tok"
    import_4m([str(_imported(tmp_path))], str(out))
    store = TokenizerStore(str(out))
    for modality, key, ids_key in (("depth", "depth_224", "depth_ids_224"), ("semseg_coco", "semseg_224",
                                   "semseg_ids_224"), ("clip", "clip_224", "clip_ids_224"),
                                   ("dinov2_global", "dinov2_global", "global_ids"), ("sam_instance", "sam_mask",
                                                                                      "sam_ids")):
        kind = kind_for(modality)
        got = store.encode(kind, list(inputs[key]))
        assert got.dtype == np.int16
        _assert_ids(got.astype(np.int64), expected[ids_key], expected[ids_key.replace("_ids", "_margin")])
    # the token shards' vocabulary is the loaded tokenizer's codebook, not the registry's
    assert store.codebook_size(kind_for("semseg_coco")) == 256 and get_modality("semseg_coco").vocab_size == 4096
    assert store.codebook_size(kind_for("dinov2_global")) == 128
    # decoding for show/sample: through the ViT / MLP decoders, back to label space
    seg = kind_for("semseg_coco").decode(expected["semseg_ids_224"][0], store)
    argmax = expected["semseg_recon_argmax_224"][0]
    np.testing.assert_array_equal(seg, np.where(argmax == 0, 255, argmax - 1).astype(np.uint8))
    vec = kind_for("dinov2_global").decode(expected["global_ids"][0], store)
    assert vec.dtype == np.float16 and vec.shape == (768,)
    np.testing.assert_allclose(vec, expected["global_recon"][0], atol=2e-3)
    feats = kind_for("clip").decode(expected["clip_ids_224"][0], store)
    assert feats.shape == (14, 14, 512)
    np.testing.assert_allclose(feats[..., ::32].transpose(2, 0, 1), expected["clip_recon_224"][0], atol=2e-2)
    with pytest.raises(NoDecoderError, match="diffusion"):
        kind_for("depth").decode(expected["depth_ids_224"][0], store)
    # every sequence modality shares ml-4m's WordPiece vocabulary from DIR/text/tokenizer.json
    text = store.text()
    assert text.vocab_size == 30000
    ids = text.encode_units(["a cat on a mat."], 16).tolist()
    assert text.decode(ids) == "a cat on a mat."


def test_show_says_in_one_line_that_a_diffusion_only_tokenizer_cannot_decode(tmp_path, expected):
    from omniforge.pipeline.show import decode_tokens
    from omniforge.tokenize.import4m import import_4m

    out = tmp_path / "tok"
    import_4m([str(_imported(tmp_path, (DEPTH, SEMSEG), vocab=False))], str(out))
    panels = decode_tokens({"tok_depth@224": expected["depth_ids_224"][:1],
                            "tok_semseg@224": expected["semseg_ids_224"][:1]}, str(out))
    line = panels["depth (tok_depth@224, crop 0, not decoded)"]
    assert isinstance(line, str) and "\n" not in line and "diffusion" in line and "later issue" in line
    assert panels["semseg_coco (decoded from tok_semseg@224, crop 0)"].shape == (224, 224)


def _edited(tmp_path: Path, name: str, **changes) -> Path:
    dest = tmp_path / name
    shutil.copytree(SNAPSHOTS / name, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(("changes", "field"), [
    ({"mystery_scale": 2.0}, "mystery_scale"),
    ({"quant_type": "fsq"}, "quant_type"),
    ({"enc_type": "vit_g_enc"}, "enc_type"),
    ({"norm_codes": False}, "norm_codes"),
    ({"num_codebooks": 4}, "num_codebooks"),
    ({"undo_std": True}, "undo_std"),
    ({"dec_type": "MLP/B_2-Wi_64"}, "dec_type"),
])
def test_an_unsupported_config_is_refused_with_one_line_naming_the_field(tmp_path, capsys, changes, field):
    snap = _edited(tmp_path, SEMSEG, **changes)
    with pytest.raises(ConfigError, match=field) as err:
        ml4m.load_snapshot(str(snap))
    assert "\n" not in str(err.value)
    code = cli_main(["tokenizer", "import-4m", str(snap), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and field in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    snap = tmp_path / SEMSEG
    shutil.copytree(SNAPSHOTS / SEMSEG, snap)
    state = load_file(snap / "model.safetensors")
    save_file({**state, "decoder.extra.weight": torch.zeros(2)}, snap / "model.safetensors")
    with pytest.raises(WeightsError, match="unexpected decoder.extra.weight"):
        ml4m.load_snapshot(str(snap))
    state.pop("quant_proj.bias")
    save_file(state, snap / "model.safetensors")
    with pytest.raises(WeightsError, match="missing quant_proj.bias"):
        ml4m.load_snapshot(str(snap))


def test_a_diffusion_snapshot_loads_its_encoder_only_and_cannot_decode(tmp_path, inputs, expected):
    """A released DiVAE also holds its UNet (decoder.*): those weights are left out, the tokens are ml-4m's."""
    from safetensors.torch import load_file, save_file

    snap = tmp_path / DEPTH
    shutil.copytree(SNAPSHOTS / DEPTH, snap)
    state = load_file(snap / "model.safetensors")
    save_file({**state, "decoder.input_blocks.0.0.weight": torch.zeros(32, 48, 3, 3)}, snap / "model.safetensors")
    model = ml4m.load_snapshot(str(snap))
    assert model.config.decoder == "diffusion" and not model.has_decoder
    ids = model.encode(ml4m.prepare(get_modality("depth"), inputs["depth_224"])).numpy()
    _assert_ids(ids, expected["depth_ids_224"], expected["depth_margin_224"])
    with pytest.raises(NoDecoderError, match="diffusion") as err:
        model.decode(torch.from_numpy(expected["depth_ids_224"]))
    assert "\n" not in str(err.value)


def test_a_snapshot_that_does_not_fit_its_modality_is_refused(tmp_path):
    """A semseg tokenizer in the depth folder: one line naming what differs."""
    out = tmp_path / "tok"
    shutil.copytree(SNAPSHOTS / SEMSEG, out / "depth")
    with pytest.raises(WeightsError, match="does not fit modality 'depth'"):
        TokenizerStore(str(out)).model(kind_for("depth"))


def test_registry_fields_are_validated():
    with pytest.raises(ConfigError, match="ml4m_transform"):
        ModalityInfo(name="plug_map", ext="png", description="uint8 map", tokenizer="vqvae", vocab_size=64,
                     ml4m_transform="semseg")
    with pytest.raises(ConfigError, match="ml4m_tokenizer=.*needs ml4m_transform"):
        ModalityInfo(name="plug_map", ext="png", description="uint8 map", tokenizer="vqvae", vocab_size=64,
                     ml4m_tokenizer="someone/their_tokenizer")
    with pytest.raises(ConfigError, match="owner/name"):
        ModalityInfo(name="plug_map", ext="png", description="uint8 map", tokenizer="vqvae", vocab_size=64,
                     ml4m_tokenizer="not a repo", ml4m_transform="rgb")
    ok = ModalityInfo(name="plug_map", ext="png", description="uint8 map", tokenizer="vqvae", vocab_size=64,
                      ml4m_tokenizer="someone/their_tokenizer", ml4m_transform="rgb")
    assert ok.ml4m_transform == "rgb"


def test_vit_presets_are_ml4ms_and_extendable():
    assert ml4m.VIT_PRESETS["vit_b_enc"] == ml4m.VitPreset(768, 12, 12)
    assert ml4m.VIT_PRESETS["vit_b_dec"] == ml4m.VitPreset(768, 12, 12)
    ml4m.register_vit_preset("vit_tiny_enc", dim=16, depth=1, heads=2)  # the same again: a no-op
    with pytest.raises(ConfigError, match="already registered"):
        ml4m.register_vit_preset("vit_tiny_enc", dim=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match="vit_<size>_enc"):
        ml4m.register_vit_preset("tiny", dim=32, depth=1, heads=2)


# ------------------------------------------------------------------------------------------------ import-4m


def test_import_4m_lays_out_the_folders_and_prints_what_each_covers(tmp_path, capsys):
    src = _imported(tmp_path)
    shutil.copytree(SNAPSHOTS / POSES, src / "EPFL-VILAB--4M_tokenizers_human-poses_1k_8")
    shutil.copytree(SNAPSHOTS / POSES, src / "EPFL-VILAB--4M_tokenizers_toy_1k_8")  # no modality uses it
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "import-4m", str(src), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in out.iterdir()) == ["clip", "depth", "dinov2_global", "human_poses", "sam_mask",
                                                     "semseg_coco", "text"]
    for folder, snap in (("clip", CLIP), ("depth", DEPTH), ("sam_mask", SAM), ("human_poses", POSES)):
        for f in ("config.json", "model.safetensors"):
            assert (out / folder / f).read_bytes() == (SNAPSHOTS / snap / f).read_bytes()
    assert (out / "text" / "tokenizer.json").stat().st_size > 100_000
    by_folder = {ln.split()[0]: ln for ln in lines if "<-" in ln}
    assert any(ln.startswith("skipped 4M_tokenizers_toy_1k_8") for ln in lines)
    assert "codebook 256" in by_folder["semseg_coco"] and "196-784 tokens" in by_folder["semseg_coco"]
    assert "resolution 224-448" in by_folder["depth"] and "decoder: diffusion (tokens only)" in by_folder["depth"]
    assert "decoder: ViT" in by_folder["semseg_coco"] and "feature maps" in by_folder["clip"]
    assert "Memcodes MLP" in by_folder["dinov2_global"] and "16 tokens" in by_folder["dinov2_global"]
    assert "decoder: MLP" in by_folder["dinov2_global"]
    assert "(for sam_instance)" in by_folder["sam_mask"] and "16 tokens, resolution 64" in by_folder["sam_mask"]
    assert "WordPiece vocabulary, 30000 tokens" in by_folder["text"] and "caption" in by_folder["text"]
    assert "human_poses" in by_folder["text"]
    assert by_folder["human_poses"].endswith("Memcodes MLP, codebook 64, 8 tokens, decoder: MLP")
    assert lines[-1].startswith("7 tokenizer folders")
    # a second import refuses to overwrite; --link --overwrite replaces with links
    assert cli_main(["tokenizer", "import-4m", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["tokenizer", "import-4m", str(src / CLIP), "--out", str(out), "--link", "--overwrite"]) == 0
    assert (out / "clip" / "model.safetensors").is_symlink() and not (out / "depth" / "config.json").is_symlink()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_import_4m_reads_hub_names_and_caches_and_shares_the_edge_tokenizer(tmp_path, capsys):
    """A Hugging Face cache entry (models--owner--name/snapshots/<rev>/); one repository filling two folders."""
    cache = tmp_path / "hub" / "models--EPFL-VILAB--4M_tokenizers_edge_8k_224-512"
    rev = cache / "snapshots" / "0123abcd"
    shutil.copytree(SNAPSHOTS / DEPTH, rev)  # a 1-channel ViT encoder stands in for the edge tokenizer
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abcd")
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "import-4m", str(tmp_path / "hub"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["canny_edge", "sam_edge"]
    text = capsys.readouterr().out
    assert "4M_tokenizers_edge_8k_224-512" in text and "224-512" in text


def test_import_4m_fails_whole_and_in_one_line(tmp_path, capsys, monkeypatch):
    src = _imported(tmp_path, (CLIP, SEMSEG), vocab=False)
    (src / SEMSEG / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "import-4m", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and SEMSEG in err[0] and "corrupt" in err[0]
    assert not out.exists() or list(out.iterdir()) == []  # the good clip snapshot was not written either
    # a hub id without a reachable hub (made certain: offline mode, an empty cache)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert cli_main(["tokenizer", "import-4m", "EPFL-VILAB/4M_tokenizers_depth_8k_224-448", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download EPFL-VILAB/4M_tokenizers_depth_8k_224-448" in err[0]
    assert cli_main(["tokenizer", "import-4m", "EPFL-VILAB/4M_tokenizers_toy_1k_8", "--out", str(out)]) == 2
    assert "no registered modality uses EPFL-VILAB/4M_tokenizers_toy_1k_8" in capsys.readouterr().err
    assert cli_main(["tokenizer", "import-4m", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "neither a local folder nor a hub repository id" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ tokenize job


def test_the_tokenize_job_writes_ml4m_tokens_with_imported_snapshots(tmp_path, tiny_labels, ray_address):
    """The session's labels (tests/tiny_labels.py), the snapshots and ml-4m's vocabulary imported as --tokenizers,
    the tokenize job: the sequence folders (caption, sam_instance: ml-4m's SAM-mask tokenizer inside ml-4m's
    vocabulary) read back through that vocabulary. The dense and feature folders, 224 and 448, are checked crop by
    crop against the snapshots in tests/test_starting_from_4m21.py, which runs the same job through the README's
    commands."""
    from omniforge import codecs, shards
    from omniforge.pipeline import verify
    from omniforge.pipeline.tokenize_job import TokenizeConfig, tokenize
    from omniforge.tokenize import crops as C
    from omniforge.tokenize.import4m import import_4m
    from tiny_labels import OPTIONS

    tok_dir = tmp_path / "tokenizers"
    import_4m([str(_imported(tmp_path))], str(tok_dir), link=True)
    crops = C.CropConfig(n_crops=2, seed=3)
    tokenized = ("sam_instance", "caption")
    out = str(tmp_path / "tokens")
    summary = tokenize(TokenizeConfig(input=tiny_labels, output=out, tokenizers=str(tok_dir), modalities=tokenized,
                                      crops=crops, options={"sam_instance": OPTIONS["sam_instance"]}, progress=False),
                       ray_address=ray_address)
    assert summary.written == 6 and summary.left_out == {"label_failed": 1} and verify(out).ok

    def members(root: str, folder: str, shard: int) -> dict:
        return {shards.member_key(n): codecs.decode(n.split(".", 1)[1], d)
                for n, d in shards.iter_tar(shards.tar_uri(root, folder, shard))}

    text = TokenizerStore(str(tok_dir)).text()
    checked = 0
    for s in range(3):
        captions = members(tiny_labels, "caption", s)
        toks = {m: members(out, get_modality(m).token_modality, s) for m in tokenized}
        for key, caption_label in captions.items():
            caption = text.decode(toks["caption"][key][0].tolist())
            assert caption and caption.split()[0] in caption_label.lower()
            sam = text.decode(toks["sam_instance"][key][0].tolist())
            assert "v0=" in sam or "v1=" in sam
            checked += 1
    assert checked == 6

"""`omniforge export-4m`'s tokenizers: imported ml-4m snapshots copied unchanged, omniforge's Memcodes MLP tokenizers
converted to ml-4m's VQVAE layout (the ids and reconstructions of omniforge's ml-4m loader equal the source
tokenizer's), omniforge's ViT VQ-VAEs refused in one line before anything is written.

The expected ml-4m layout is the fixtures' (tests/fixtures/ml4m_tokenizers, written by ml-4m's own classes); that
ml-4m's VQVAE.from_pretrained reads a converted folder was checked once outside the project (see the report of
the branch that added this file), since ml-4m is not a dependency.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from omniforge.errors import ConfigError
from omniforge.jobs.cli import main as cli_main
from omniforge.modalities import get_modality
from omniforge.tokenize import export4m, ml4m
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.models import save_tokenizer
from omniforge.tokenize.store import TokenizerStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ml4m_tokenizers"
SNAPSHOTS = FIXTURES / "snapshots"
VOCAB_GZ = Path(__file__).parents[1] / "fixtures" / "ml4m" / "text_tokenizer_4m_wordpiece_30k.json.gz"
DEPTH, GLOBAL = "4M_tokenizers_depth_8k_224-448", "4M_tokenizers_DINOv2-B14-global_8k_16_224"


@pytest.fixture(scope="module", autouse=True)
def tiny_presets():
    for name, p in json.loads((FIXTURES / "tiny_presets.json").read_text()).items():
        ml4m.register_vit_preset(name, **p)


def _memcodes(seed: int = 0):
    """omniforge's own tiny dinov2_global tokenizer, every weight random (LayerNorm affines too)."""
    kind = kind_for("dinov2_global")
    torch.manual_seed(seed)
    model = kind.build(kind.config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _vectors(n: int = 64, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(768).astype(np.float16) for _ in range(n)]


def _per_block(key: str) -> str:
    return re.sub(r"\.(blocks|layernorms)\.\d+\.", r".\1.N.", key)


def _ids(model, arrays) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays).astype(np.float32))
    return model.encode(x)


def test_a_memcodes_tokenizer_converts_to_ml4ms_layout_with_the_same_ids_and_reconstructions(tmp_path):
    native = _memcodes()
    tok = tmp_path / "tok"
    save_tokenizer(native, str(tok / "dinov2_global"))
    (plan,) = export4m.plan(str(tok), [get_modality("dinov2_global")])
    assert plan.source == "converted" and plan.folder == "dinov2_global" and plan.codebook_size == 128
    out = tmp_path / "out"
    export4m.write([plan], str(out))
    folder = out / "dinov2_global"
    # the key set of ml-4m's own Memcodes MLP snapshot of the fixtures; a config ml-4m's VQVAE takes
    with safe_open(str(SNAPSHOTS / GLOBAL / "model.safetensors"), "pt") as f, \
            safe_open(str(folder / "model.safetensors"), "pt") as g:
        assert {_per_block(k) for k in f.keys()} == {_per_block(k) for k in g.keys()}  # 1 block there, 2 here
        assert all(len(f.get_slice(k).get_shape()) == len(g.get_slice(k).get_shape()) for k in f.keys())
        assert g.metadata() == {"format": "pt"}
    config = json.loads((folder / "config.json").read_text())
    assert set(config) <= set(json.loads((SNAPSHOTS / GLOBAL / "config.json").read_text()))
    assert ml4m.is_snapshot_dir(str(folder))
    # omniforge's ml-4m loader gives the source's ids (exactly) and reconstructions
    loaded = ml4m.load_snapshot(str(folder))
    arrays = _vectors()
    want = _ids(native, arrays)
    assert want.unique().numel() > 8  # the random inputs exercise many codes
    assert torch.equal(loaded.encode(torch.from_numpy(np.stack(arrays).astype(np.float32))), want)
    with torch.no_grad():
        got, ref = loaded.decode(want).numpy(), native.decode(want).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())  # float32 rounding (1 x 1 conv)
    # ... and so does a --tokenizers folder holding it (ml-4m's preprocessing of global vectors: none)
    store = TokenizerStore(str(out))
    kind = kind_for("dinov2_global")
    assert ml4m.is_ml4m_model(store.model(kind))
    np.testing.assert_array_equal(store.encode(kind, arrays), want.numpy().astype(np.int16))


def test_a_wrong_key_map_would_change_the_ids(tmp_path):
    """The conversion is not vacuous: the key projections transposed give other ids."""
    native = _memcodes()
    config, tensors = export4m.memcodes_to_ml4m(native)
    tensors["quantize.to_k.weight"] = tensors["quantize.to_k.weight"].transpose(1, 2).contiguous()
    folder = tmp_path / "bad"
    export4m.write([export4m.TokenizerExport("bad", "converted", "", config=config, tensors=tensors)], str(tmp_path))
    arrays = _vectors()
    got = ml4m.load_snapshot(str(folder)).encode(torch.from_numpy(np.stack(arrays).astype(np.float32)))
    assert not torch.equal(got, _ids(native, arrays))


def _released_run(tmp_path: Path, folders: list[str]) -> Path:
    """A released-layout FourM over `folders`, written in ml-4m's hub layout (a RUN export-4m reads)."""
    from omniforge.model.fm import RELEASED_LAYOUT, FourM, ModelConfig
    from omniforge.model.ml4m import export_released
    from omniforge.model.specs import specs_for

    torch.manual_seed(0)
    model = FourM(ModelConfig(dim=16, encoder_depth=1, decoder_depth=1, heads=2, **RELEASED_LAYOUT),
                  specs_for(folders, 30000))
    hub = tmp_path / "released"
    export_released(model, str(hub))
    return hub


def test_export_4m_writes_the_model_and_every_tokenizer_and_says_what_each_is(tmp_path, capsys):
    run = _released_run(tmp_path, ["tok_depth@224", "tok_dinov2_global", "caption"])
    tok = tmp_path / "tok"
    shutil.copytree(SNAPSHOTS / DEPTH, tok / "depth")  # as import-4m lays it out
    native = _memcodes()
    save_tokenizer(native, str(tok / "dinov2_global"))
    (tok / "text").mkdir()
    (tok / "text" / "tokenizer.json").write_bytes(gzip.decompress(VOCAB_GZ.read_bytes()))
    out = tmp_path / "export"
    assert cli_main(["export-4m", str(run), "--out", str(out), "--tokenizers", str(tok)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"model: {out / 'config.json'}")
    by_folder = {ln.split()[1].rstrip(":"): ln for ln in lines if ln.startswith("tokenizer ")}
    assert set(by_folder) == {str(out / "tokenizers" / f) for f in ("depth", "dinov2_global", "text")}
    assert ": imported, ViT VQ-VAE" in by_folder[str(out / "tokenizers" / "depth")]
    assert ": converted, Memcodes MLP" in by_folder[str(out / "tokenizers" / "dinov2_global")]
    assert ": copied, WordPiece vocabulary of caption" in by_folder[str(out / "tokenizers" / "text")]
    assert "ml-4m: VQVAE.from_pretrained" in by_folder[str(out / "tokenizers" / "dinov2_global")]
    assert "ml-4m: VQ.from_pretrained" in by_folder[str(out / "tokenizers" / "depth")]  # a diffusion decoder
    assert lines[-1].startswith(f"wrote {out}: ml-4m's FM.from_pretrained")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizers"]
    for f in ("config.json", "model.safetensors"):  # an imported snapshot goes out byte for byte
        assert (out / "tokenizers" / "depth" / f).read_bytes() == (SNAPSHOTS / DEPTH / f).read_bytes()
    assert (out / "tokenizers" / "text" / "tokenizer.json").read_bytes() == (tok / "text" / "tokenizer.json"
                                                                            ).read_bytes()
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    # OUT/tokenizers is a --tokenizers folder giving the source tokenizers' ids
    arrays = _vectors(16)
    np.testing.assert_array_equal(TokenizerStore(str(out / "tokenizers")).encode(kind_for("dinov2_global"), arrays),
                                  TokenizerStore(str(tok)).encode(kind_for("dinov2_global"), arrays))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp")]


def test_export_4m_refuses_omniforges_vit_tokenizers_in_one_line_and_writes_nothing(tmp_path, capsys):
    run = _released_run(tmp_path, ["tok_rgb@224", "tok_dinov2_global"])
    tok = tmp_path / "tok"
    kind = kind_for("rgb")
    save_tokenizer(kind.build(kind.config("tiny")), str(tok / "rgb"))
    save_tokenizer(_memcodes(), str(tok / "dinov2_global"))
    out = tmp_path / "export"
    assert cli_main(["export-4m", str(run), "--out", str(out), "--tokenizers", str(tok)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "rgb" in err and "LayerNorm" in err and "import-4m EPFL-VILAB/4M_tokenizers_rgb_16k_224-448" in err
    assert "omniforge tokenizer train --architecture ml4m" in err
    assert "--model-only" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["released", "tok"]
    # with no --tokenizers recorded or given, the export says how to proceed; --model-only writes the model alone
    assert cli_main(["export-4m", str(run), "--out", str(out)]) == 2
    assert "pass --tokenizers DIR" in capsys.readouterr().err and not out.exists()
    assert cli_main(["export-4m", str(run), "--out", str(out), "--model-only"]) == 0
    assert "tokenizers: none written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_4m_refuses_a_tokenizer_with_more_codes_than_the_model_reads(tmp_path, capsys):
    from omniforge.model.ml4m import export_4m

    run = _released_run(tmp_path, ["tok_dinov2_global"])
    tok = tmp_path / "tok"
    kind = kind_for("dinov2_global")
    big = kind.config("tiny")
    big.codebook_size = 16384  # the model's tok_dinov2_global reads the registry's 8192
    save_tokenizer(kind.build(big), str(tok / "dinov2_global"))
    with pytest.raises(ConfigError, match="reads 8192 token ids.*makes 16384"):
        export_4m(str(run), str(tmp_path / "export"), tokenizers=str(tok))
    assert not (tmp_path / "export").exists()


def test_sam_instances_need_the_vocabulary_and_the_mask_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(SNAPSHOTS / "4M_tokenizers_sam-instance_1k_64", tok / "sam_mask")
    (tok / "text").mkdir()
    (tok / "text" / "tokenizer.json").write_bytes(gzip.decompress(VOCAB_GZ.read_bytes()))
    plans = export4m.plan(str(tok), [get_modality("caption"), get_modality("sam_instance")])
    assert [(p.folder, p.source, p.modalities) for p in plans] == [
        ("text", "copied", ("caption", "sam_instance")), ("sam_mask", "imported", ("sam_instance",))]
    assert plans[1].loader == "VQVAE.from_pretrained" and plans[1].codebook_size == 128
    shutil.rmtree(tok / "sam_mask")
    with pytest.raises(ConfigError, match="no sam_mask tokenizer in .*import-4m"):
        export4m.plan(str(tok), [get_modality("sam_instance")])


def test_a_tokenizer_trained_in_ml4ms_architecture_is_written_through(tmp_path, capsys):
    from omniforge.tokenize import ml4m_train

    run = _released_run(tmp_path, ["tok_rgb@224"])
    tok = tmp_path / "tok"
    kind = ml4m_train.ML4MArchitecture(kind_for("rgb"))
    torch.manual_seed(0)
    kind.save(kind.build(kind.config("tiny")), str(tok / "rgb"))
    out = tmp_path / "export"
    assert cli_main(["export-4m", str(run), "--out", str(out), "--tokenizers", str(tok)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tokenizer "))
    assert ": trained-in-ml4m-architecture, ViT VQ-VAE, vit_oftiny_enc -> vit_oftiny_dec" in line
    assert sorted(p.name for p in (out / "tokenizers" / "rgb").iterdir()) == ["config.json", "model.safetensors"]
    for f in ("config.json", "model.safetensors"):
        assert (out / "tokenizers" / "rgb" / f).read_bytes() == (tok / "rgb" / f).read_bytes()


def test_export_4m_reads_the_tokenizers_a_fine_tuning_run_recorded(tmp_path, capsys):
    """A run fine-tuned from a released checkpoint with --tokenizers exports them without being told where."""
    import io

    from omniforge import shards
    from omniforge.model.train import main as train_main

    folder = "tok_dinov2_global"
    root = str(tmp_path / "tokens")
    keys = [f"k{k}" for k in range(8)]
    members = []
    for i, key in enumerate(keys):
        buf = io.BytesIO()
        np.save(buf, np.tile((np.arange(16) + i) % 32, (2, 1)).astype(np.int16))
        members.append((f"{key}.npy", buf.getvalue()))
    shards.write_tar(shards.tar_uri(root, folder, 0), members)
    shards.write_status(shards.status_uri(root, folder, 0), [{"key": k, "ok": True} for k in keys])
    tok = tmp_path / "tok"
    kind = kind_for("dinov2_global")
    config = kind.config("tiny")
    config.codebook_size = 32  # the fixture checkpoint's tok_dinov2_global vocabulary
    torch.manual_seed(0)
    save_tokenizer(kind.build(config).eval(), str(tok / "dinov2_global"))
    run = tmp_path / "run"
    fm = Path(__file__).parents[1] / "fixtures" / "ml4m_fm" / "swiglu"
    assert train_main(["--data", root, "--modalities", folder, "--out", str(run), "--init-from", str(fm),
                       "--tokenizers", str(tok), "--input-tokens", "8", "--target-tokens", "8", "--batch-size", "2",
                       "--steps", "2", "--save-every", "1000", "--shuffle-buffer", "2", "--device", "cpu",
                       "--no-tensorboard", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert cli_main(["export-4m", str(run), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith(f"tokenizer {out / 'tokenizers' / 'dinov2_global'}: converted") for ln in lines)
    arrays = _vectors(8)
    np.testing.assert_array_equal(TokenizerStore(str(out / "tokenizers")).encode(kind, arrays),
                                  TokenizerStore(str(tok)).encode(kind, arrays))


def test_the_pose_tokenizer_converts_to_ml4ms_human_poses_layout(tmp_path):
    """omniforge's own pose tokenizer (human_poses/) is a Memcodes MLP: it converts to ml-4m's VQVAE of 207 channels
    and 8 heads (the layout of ml-4m's human-poses snapshot), with the same ids, beside the shared vocabulary."""
    from omniforge._smpl import random_rotations

    kind = kind_for("human_poses")
    torch.manual_seed(0)
    native = kind.build(kind.config("tiny")).eval()
    tok = tmp_path / "tok"
    save_tokenizer(native, str(tok / "human_poses"))
    (tok / "text").mkdir()
    (tok / "text" / "tokenizer.json").write_bytes(gzip.decompress(VOCAB_GZ.read_bytes()))
    text_plan, plan = export4m.plan(str(tok), [get_modality("human_poses")])
    assert (text_plan.folder, text_plan.source) == ("text", "copied")
    assert (plan.folder, plan.source, plan.codebook_size) == ("human_poses", "converted", 128)
    assert {k: plan.config[k] for k in ("n_channels", "num_codebooks", "quant_type")} == {
        k: json.loads((SNAPSHOTS / "4M_tokenizers_human-poses_1k_8" / "config.json").read_text())[k]
        for k in ("n_channels", "num_codebooks", "quant_type")}
    out = tmp_path / "out"
    export4m.write([plan], str(out))
    poses = [r.astype(np.float32).reshape(-1) for r in random_rotations(np.random.default_rng(0), (32, 23), 90.0)]
    want = native.encode(torch.from_numpy(np.stack(poses)))
    assert want.unique().numel() > 8
    assert torch.equal(ml4m.load_snapshot(str(out / "human_poses")).encode(torch.from_numpy(np.stack(poses))), want)

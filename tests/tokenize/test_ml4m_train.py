"""`omniforge tokenizer train --architecture ml4m`: a ViT VQ-VAE trained in ml-4m's architecture, saved in ml-4m's
hub layout, loaded by --tokenizers as an ml-4m tokenizer (ml-4m's preprocessing), resumed, and written through
by export-4m. That ml-4m's VQVAE.from_pretrained reads such a folder with the same ids was checked once outside
the project (ml-4m is not a dependency)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from omniforge.errors import ConfigError
from omniforge.tokenize import ml4m, ml4m_train
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.store import TokenizerStore
from omniforge.tokenize.train import TokenizerTrainConfig, train_tokenizer
from _helpers import blob_depth, blob_depth_labels, tokenizer_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory) -> str:
    return blob_depth_labels(str(tmp_path_factory.mktemp("labels")))


def _cfg(root: str, out: str, **kw) -> TokenizerTrainConfig:
    return tokenizer_train_config(root, out, **{"architecture": "ml4m", **kw})


def test_a_depth_tokenizer_trains_in_ml4ms_architecture_and_serves_as_an_ml4m_snapshot(depth_root, tmp_path):
    out = str(tmp_path / "tok")
    result = train_tokenizer(_cfg(depth_root, out, epochs=6, lr=3e-3), progress=False)
    first, last = result.history[0], result.history[-1]
    assert result.steps == 18 and last["heldout_loss"] < 0.7 * first["heldout_loss"]
    assert result.history[-1]["loss"] < result.history[1]["loss"]
    directory = os.path.join(out, "depth")
    for name in ("train_state.json", "loss.png", "reconstruction.png"):
        assert os.path.getsize(os.path.join(directory, name)) > 0, name
    # ml-4m's hub layout: a config ml-4m's VQVAE takes, its quantizer buffers without the codebook axis
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["enc_type"] == "vit_oftiny_enc" and config["quant_type"] == "lucid" and config["n_channels"] == 1
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        assert f.metadata() == ml4m_train.TRAINED_MARK
        assert f.get_slice("quantize._codebook.embed").get_shape() == [128, 32]
        assert f.get_slice("quantize._codebook.cluster_size").get_shape() == [128]
        assert f.get_slice("encoder.pos_emb").get_shape() == [1, 64, 14, 14]
        assert not [k for k in f.keys() if k.endswith("norm.weight") and k.count(".") == 2]  # no final norms
        assert "quantize._codebook.embed_avg" not in f.keys()  # ml-4m's key set; the EMA sums sit beside it
    assert os.path.getsize(os.path.join(directory, ml4m_train.TRAINING_FILE)) > 0
    assert ml4m.is_snapshot_dir(directory) and ml4m_train.is_trained_here(directory)
    # --tokenizers loads it as an ml-4m tokenizer: ml-4m's depth preprocessing, the trained model's ids
    store = TokenizerStore(out)
    kind = kind_for("depth")
    served = store.model(kind)
    assert ml4m.is_ml4m_model(served) and not isinstance(served, ml4m_train.ML4MTrainable)
    rng = np.random.default_rng(3)
    arrays = [blob_depth(rng, 224, 224) for _ in range(4)]
    trained = ml4m_train.load_trainable(directory, kind.config("tiny")).eval()
    x = ml4m.prepare(kind.info, np.stack(arrays))
    assert not torch.allclose(x, kind.prepare(arrays), atol=0.1)  # standardised per image (ml-4m), not [-1, 1]
    with torch.no_grad():
        want = trained.encode(x)
        np.testing.assert_allclose(served.decode(want).numpy(), trained.decode(want).numpy(), atol=1e-6)
    np.testing.assert_array_equal(store.encode(kind, arrays), want.numpy().astype(np.int16))
    assert want.unique().numel() > 1


def test_an_ml4m_architecture_run_resumes_and_refuses_the_other_architecture(depth_root, tmp_path):
    out = str(tmp_path / "tok")
    first = train_tokenizer(_cfg(depth_root, out, epochs=1, max_samples=4, batch_size=2), progress=False)
    second = train_tokenizer(_cfg(depth_root, out, epochs=2, max_samples=4, batch_size=2), progress=False)
    assert [h["epoch"] for h in second.history] == [0, 1, 2] and second.history[:2] == first.history
    assert second.steps == 2 * first.steps
    with pytest.raises(ConfigError, match="another architecture"):
        train_tokenizer(_cfg(depth_root, out, epochs=3, max_samples=4, batch_size=2, architecture="omniforge"),
                        progress=False)


def test_the_architecture_option_is_validated(depth_root, tmp_path):
    with pytest.raises(ConfigError, match="architecture: must be one of omniforge, ml4m"):
        _cfg(depth_root, str(tmp_path), architecture="timm")
    with pytest.raises(ConfigError, match="ViT VQ-VAE kinds"):
        _cfg(depth_root, str(tmp_path), modality="dinov2_global")
    from omniforge.jobs.cli import main

    argv = ["tokenizer", "train", "--data", depth_root, "--modality", "depth", "--out", str(tmp_path / "t"),
            "--epochs", "1", "--max-samples", "4", "--batch-size", "2", "--architecture", "ml4m", "--no-progress"]
    assert main(argv) == 0
    assert ml4m_train.is_trained_here(str(tmp_path / "t" / "depth"))


@pytest.mark.parametrize("modality", ["rgb", "normal", "depth", "semseg_coco", "clip", "sam_instance"])
def test_the_base_size_is_ml4ms_vit_b_and_every_vit_kind_maps_to_an_ml4m_config(modality):
    kind = ml4m_train.ML4MArchitecture(kind_for(modality))
    for size, preset in (("tiny", "vit_oftiny"), ("base", "vit_b")):
        tc = kind.config(size)
        c = ml4m.ML4MConfig.from_dict(ml4m_train.ml4m_config(tc))
        assert (c.enc_type, c.dec_type, c.decoder) == (f"{preset}_enc", f"{preset}_dec", "vit")
        assert c.num_tokens() == tc.num_tokens and c.codebook_size == tc.codebook_size
        assert (c.n_labels is not None) == (modality == "semseg_coco") and c.patch_proj == (modality != "clip")

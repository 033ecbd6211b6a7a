"""An external plugin package, installed with pip, adds modalities that flow from their teachers to a trained
model through the CLI with no edit to omniforge: label, tokenizer train, tokenize, verify, train, sample, show.

The plugin (tests/fixtures/omniforge-example-plugin) declares an image-like modality (saliency, png, "vqvae"),
a global one (color_hist, npy (48,), "memcodes"), a sequence with its own serializer (tone, json,
"wordpiece") and a label-only one declared the old way (mean_color).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniforge import codecs, shards
from omniforge.jobs.demo_corpus import build_demo_corpus

PLUGIN = Path(__file__).parents[1] / "fixtures" / "omniforge-example-plugin"
FOLDERS = "rgb@224,tok_saliency@224,tok_color_hist,tok_tone,tok_caption"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("plugin")
    site, source = tmp / "site", tmp / "plugin"
    shutil.copytree(PLUGIN, source)  # the build writes next to its sources: keep the repo clean
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def _cli(env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "omniforge.jobs.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert run.returncode == 0, f"omniforge {' '.join(args)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _members(root: Path, folder: str) -> dict[str, object]:
    out = {}
    for tar in sorted((root / folder).glob("shard-*.tar")):
        out.update({shards.member_key(n): codecs.decode(n.split(".", 1)[1], d) for n, d in shards.iter_tar(str(tar))})
    return out


@pytest.mark.slow
def test_plugin_modalities_flow_from_teacher_to_trained_model(env, tmp_path):
    listed = _cli(env, "list").stdout
    rows = {line.split()[0]: line for line in listed.splitlines() if line.strip()}
    assert "saliency" in rows and "color_stats" in rows
    assert "tok_saliency@224 (196)" in rows["saliency"] and "(no tokens)" in rows["mean_color"]

    corpus = build_demo_corpus(tmp_path / "corpus", n_images=6)  # 6 captioned photos and a truncated JPEG
    root, tok, run, samples = tmp_path / "labels", tmp_path / "tokenizers", tmp_path / "run", tmp_path / "samples"
    _cli(env, "label", "--input", str(corpus), "--output", str(root), "--shard-size", "3", "--no-progress",
         "--modalities", "rgb,caption,saliency,color_hist,tone,mean_color")
    rgb, saliency, hist = _members(root, "rgb"), _members(root, "saliency"), _members(root, "color_hist")
    assert len(rgb) == 6 and set(saliency) == set(rgb) == set(hist)
    for key, image in rgb.items():
        assert saliency[key].shape == image.shape[:2] and saliency[key].dtype == np.uint8
        assert np.allclose(hist[key].astype(np.float32).reshape(3, 16).sum(axis=1), 1.0, atol=1e-2)

    for modality in ("saliency", "color_hist", "caption"):
        line = _cli(env, "tokenizer", "train", "--data", str(root), "--modality", modality, "--out", str(tok),
                    "--epochs", "2", "--batch-size", "2", "--vocab-size", "5000", "--no-progress").stdout
        assert "tokenizer ->" in line
    assert (tok / "saliency" / "reconstruction.png").stat().st_size > 0
    assert json.loads((tok / "color_hist" / "config.json").read_text())["config"]["kind"] == "global"
    refused = subprocess.run([sys.executable, "-m", "omniforge.jobs.cli", "tokenizer", "train", "--data", str(root),
                              "--modality", "tone", "--out", str(tok)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert refused.returncode == 2 and "--modality caption" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    summary = _cli(env, "tokenize", "--input", str(root), "--tokenizers", str(tok), "--crops", "2", "--no-progress",
                   "--modalities", "saliency,color_hist,tone,caption").stdout
    assert "6 tokenized with every modality" in summary
    tokens = {f: _members(root, f) for f in ("tok_saliency@224", "tok_color_hist", "tok_tone", "crop_settings")}
    assert all(set(t) == set(rgb) for t in tokens.values())
    for key in rgb:
        assert tokens["tok_saliency@224"][key].shape == (2, 196) and tokens["tok_color_hist"][key].shape == (2, 16)
        assert tokens["tok_tone"][key].shape == (2, 4)
    verified = _cli(env, "verify", str(root))
    assert "OK" in verified.stdout.splitlines()[0]

    _cli(env, "train", "--data", str(root), "--modalities", FOLDERS, "--tokenizers", str(tok), "--out", str(run),
         "--steps", "6", "--batch-size", "2", "--save-every", "6", "--no-progress", "--device", "cpu")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    targets = {m for e in log for m in e["losses"]}
    assert {"tok_saliency@224", "tok_color_hist", "tok_tone"} <= targets  # the plugin modalities are targets

    key = sorted(rgb)[0]
    lines = _cli(env, "sample", "--checkpoint", str(run), "--input", str(root), "--key", key, "--from",
                 "saliency,color_hist", "--to", "tone,caption", "--tokenizers", str(tok), "--out", str(samples)).stdout
    assert "tok_tone" in lines and (samples / key / "tok_tone.txt").exists()  # plugin modalities as inputs
    _cli(env, "sample", "--checkpoint", str(run), "--input", str(root), "--key", key, "--from", "rgb",
         "--to", "saliency,color_hist", "--tokenizers", str(tok), "--out", str(samples / "from_rgb"))
    generated = samples / "from_rgb" / key
    decoded = np.asarray(codecs.decode("png", (generated / "tok_saliency@224.png").read_bytes()))
    assert decoded.shape == (224, 224) and decoded.dtype == np.uint8
    assert np.load(generated / "tok_color_hist.decoded.npy", allow_pickle=False).shape == (48,)

    _cli(env, "show", str(root), "--key", key, "--tokenizers", str(tok), "--out", str(tmp_path / "show.png"))
    _cli(env, "show", str(samples / "from_rgb"), "--key", key, "--out", str(tmp_path / "generated.png"))
    assert (tmp_path / "show.png").stat().st_size > 10_000 and (tmp_path / "generated.png").stat().st_size > 10_000

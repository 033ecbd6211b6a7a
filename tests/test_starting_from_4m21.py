"""The README's "Starting from 4M-21" chain on the tiny fixtures, run command by command through omniforge's CLI
entry point: a freshly labeled corpus, Apple-tokenized shards (ml-4m tokenizer snapshots, 224 and 448 tokens), a
fine-tuned "released 4M-21" and samples from it, then the export back to ml-4m's hub layout.

The fixtures are ml-4m's own: tests/fixtures/ml4m_tokenizers/snapshots (tiny random-init tokenizers; their ViT
presets are registered here, as a caller extends the table) and tests/fixtures/ml4m_fm/chain (a tiny random-init
ml-4m FM over exactly those tokenizers' modalities, vocabularies equal to their codebooks). `COMMANDS` are the
README's, word for word; the assertions recompute what each step must have written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from omniforge.jobs.cli import main as cli_main
from omniforge.modalities import get_modality
from omniforge.tokenize import ml4m

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests" / "fixtures"
KEY = "people_astronaut"
TOO_SMALL = {"animals_chelsea_the_cat-7bf0eff8", "objects_coffee", "space_rocket", "objects_coins"}  # side < 448
DIFFUSION = "cannot decode: its released decoder is a diffusion model"
TRAINED = ("rgb@224", "tok_depth@224", "tok_depth@448", "tok_semseg@224", "tok_clip@224", "tok_dinov2_global")

# Run from a folder holding demo_out/corpus/images (the demo corpus) and the repository's tests/ (the fixtures).
COMMANDS = {
    "label": "omniforge label --input demo_out/corpus/images --output labels "
             "--modalities rgb,depth,semseg_coco,clip,dinov2_global --weights tiny --shard-size 4",
    "import": "omniforge tokenizer import-4m tests/fixtures/ml4m_tokenizers/snapshots --out tokenizers",
    "tokenize": "omniforge tokenize --input labels --modalities depth,depth@448,semseg_coco,clip,dinov2_global "
                "--tokenizers tokenizers",
    "train": "omniforge train --data labels --modalities " + ",".join(TRAINED) + " --tokenizers tokenizers "
             "--init-from tests/fixtures/ml4m_fm/chain --out run --steps 30 --batch-size 8 --lr 2e-3 "
             "--warmup-steps 5 --no-progress",
    "sample_released": "omniforge sample --checkpoint tests/fixtures/ml4m_fm/chain --input labels "
                       f"--key {KEY} --from rgb --to semseg_coco,clip,depth --tokenizers tokenizers "
                       "--out samples_released",
    "sample": f"omniforge sample --checkpoint run --input labels --key {KEY} --from rgb "
              "--to semseg_coco,clip,depth --tokenizers tokenizers --out samples",
    "export": "omniforge export-4m run --out 4M-21_tiny_finetuned",
}


def test_the_readme_shows_these_commands():
    """The README's tiny chain is COMMANDS, in order (its output blocks are pasted from a run of them)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Starting from 4M-21"):]
    section = section[:section.index("\n## ", 1)]
    shown = [line[2:] for line in section.splitlines() if line.startswith("$ omniforge ")]
    assert shown == list(COMMANDS.values())


def _omniforge(line: str) -> str:
    """Run one README command line through the CLI entry point; its stdout and stderr (it must succeed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = cli_main(shlex.split(line)[1:])
        except SystemExit as e:
            rc = e.code
    text = out.getvalue()
    assert rc in (0, None), f"{line}\n{text}"
    return text


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_address):
    """Every README command run in order in a fresh folder; (folder, {step: output})."""
    from omniforge.jobs.demo_corpus import build_demo_corpus

    for name, p in json.loads((FIXTURES / "ml4m_tokenizers" / "tiny_presets.json").read_text()).items():
        ml4m.register_vit_preset(name, **p)
    work = tmp_path_factory.mktemp("from4m21")
    build_demo_corpus(work / "demo_out" / "corpus")
    (work / "tests").symlink_to(REPO / "tests")
    before = os.getcwd()
    os.chdir(work)
    torch.manual_seed(0)
    try:
        outputs = {step: _omniforge(line) for step, line in COMMANDS.items()}
    finally:
        os.chdir(before)
    return work, outputs


def _members(root: Path, folder: str) -> dict[str, object]:
    from omniforge import codecs, shards

    out: dict[str, object] = {}
    for shard in range(4):  # 13 samples in shards of 4
        out.update({shards.member_key(n): codecs.decode(n.split(".", 1)[1], d)
                    for n, d in shards.iter_tar(shards.tar_uri(str(root), folder, shard))})
    return out


@pytest.mark.slow
def test_the_tokens_are_the_imported_tokenizers_on_ml4m_preprocessing(chain):
    from omniforge.tokenize import crops as C

    work, out = chain
    assert "8 tokenized with every modality, 5 left out" in out["tokenize"] and "too_small" in out["tokenize"]
    assert "human_poses    <- 4M_tokenizers_human-poses_1k_8: Memcodes MLP, codebook 64, 8 tokens" in out["import"]
    labels = work / "labels"
    crops = _members(labels, "crop_settings")
    tokens = {m: _members(labels, m) for m in ("tok_depth@224", "tok_depth@448", "tok_semseg@224", "tok_clip@224",
                                               "tok_dinov2_global")}
    assert set(crops) == set(tokens["tok_depth@448"]) and len(crops) == 8
    assert not set(crops) & TOO_SMALL  # left out: a 448 crop of them would be upsampled
    snapshots = FIXTURES / "ml4m_tokenizers" / "snapshots"
    models = {m: ml4m.load_snapshot(str(snapshots / f"4M_tokenizers_{s}")) for m, s in (
        ("depth", "depth_8k_224-448"), ("semseg_coco", "semseg_4k_224-448"), ("clip", "CLIP-B16_8k_224-448"),
        ("dinov2_global", "DINOv2-B14-global_8k_16_224"))}
    raw = {m: _members(labels, m) for m in models}
    for key, rows in crops.items():
        assert rows.shape == (1, 5)
        for m, size in (("depth", 224), ("depth", 448), ("semseg_coco", 224)):
            info = get_modality(m).at(size)
            got = tokens[info.token_modality][key]
            assert got.dtype == np.int16 and got.shape == (1, (size // 16) ** 2)
            window = C.crop_dense(np.asarray(raw[m][key]), rows[0], size, mode=info.resample)
            np.testing.assert_array_equal(got, models[m].encode(ml4m.prepare(info, window[None])).numpy())
        for m in ("clip", "dinov2_global"):  # crop 0: the label job's features
            info = get_modality(m)
            want = models[m].encode(ml4m.prepare(info, np.asarray(raw[m][key])[None])).numpy()
            np.testing.assert_array_equal(tokens[info.token_modality][key], want)
        assert int(tokens["tok_depth@448"][key].max()) < 256 and int(tokens["tok_dinov2_global"][key].max()) < 128


@pytest.mark.slow
def test_init_from_the_released_model_then_training_lowers_the_loss(chain):
    work, out = chain
    assert "loaded " + ", ".join(TRAINED) in out["train"] and "dropped" not in out["train"]
    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    assert set(log[-1]["losses"]) == set(TRAINED[1:])


@pytest.mark.slow
@pytest.mark.parametrize("samples", ["samples_released", "samples"])
def test_samples_decode_through_the_vit_decoders_and_write_the_diffusion_ones_tokens(chain, samples):
    from PIL import Image

    work, out = chain
    text = out["sample_released" if samples == "samples_released" else "sample"]
    assert text.count(DIFFUSION) == 1 and "tok_depth@224:" in text.splitlines()[-2]
    folder = work / samples / KEY
    depth = np.load(folder / "tok_depth@224.npy")
    assert depth.shape[-1] == 196 and 0 <= depth.min() and depth.max() < 256  # tokens written, not drawn
    assert not list(folder.glob("tok_depth@224.png"))
    semseg = np.asarray(Image.open(folder / "tok_semseg@224.png"))
    assert semseg.shape[:2] == (224, 224)
    clip = np.load(folder / "tok_clip@224.decoded.npy")
    assert clip.shape == (14, 14, 512) and np.isfinite(clip.astype(np.float32)).all()
    assert (folder / "sample.png").stat().st_size > 0


@pytest.mark.slow
def test_the_fine_tuned_model_exports_to_the_hub_layout(chain):
    from omniforge.model.checkpoint import load_model
    from omniforge.model.ml4m import load_released, read_released

    work, out = chain
    exported = work / "4M-21_tiny_finetuned"
    lines = out["export"].strip().splitlines()
    assert lines[0].startswith("model: 4M-21_tiny_finetuned/config.json + model.safetensors (ml-4m FM, 16 wide, "
                               "2 + 2 blocks;")
    assert lines[-1].startswith("wrote 4M-21_tiny_finetuned: ")
    # the run's tokenizers come along, byte for byte the imported snapshots, as a --tokenizers folder
    exported_tokenizers = {line.split(":", 1)[0].rsplit("/", 1)[1] for line in lines[1:-1]}
    assert exported_tokenizers == {"depth", "semseg_coco", "clip", "dinov2_global"}
    for folder in exported_tokenizers:
        for name in ("config.json", "model.safetensors"):
            assert (exported / "tokenizers" / folder / name).read_bytes() == (work / "tokenizers" / folder /
                                                                              name).read_bytes()
    released = read_released(str(exported))
    original = read_released(str(FIXTURES / "ml4m_fm" / "chain"))
    assert {m: s.vocab_size for m, s in released.specs.items()} == {m: s.vocab_size for m, s in
                                                                   original.specs.items()}
    # the export is the fine-tuned model, not the fixture: the same logits as the run's checkpoint
    run = load_model(str(work / "run")).model.eval()
    again = load_released(str(exported)).model.eval()
    rng = np.random.default_rng(0)
    batch = {"rgb@224": {"tensor": torch.from_numpy(rng.integers(0, 256, (2, 196, 768), dtype=np.uint8)),
                         "input_mask": torch.zeros(2, 196, dtype=torch.bool),
                         "target_mask": torch.ones(2, 196, dtype=torch.bool)}}
    for m in TRAINED[1:]:
        n = released.specs[m].num_tokens
        batch[m] = {"tensor": torch.from_numpy(rng.integers(0, released.specs[m].vocab_size, (2, n))),
                    "input_mask": torch.ones(2, n, dtype=torch.bool),
                    "target_mask": torch.from_numpy(rng.random((2, n)) > 0.05)}
    with torch.no_grad():
        a, b = run.decoder_logits(batch, scatter=True), again.decoder_logits(batch, scatter=True)
    assert set(a) == set(b) == set(TRAINED[1:])
    assert all(torch.allclose(a[m], b[m], atol=1e-5) for m in a)
    fixture = load_released(str(FIXTURES / "ml4m_fm" / "chain")).model.eval()
    with torch.no_grad():
        c = fixture.decoder_logits(batch, scatter=True)
    assert not torch.allclose(a["tok_semseg@224"], c["tok_semseg@224"], atol=1e-3)  # fine-tuning moved it

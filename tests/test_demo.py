"""`omniforge demo` end to end: every registered teacher on the bundled photos, verified, drawn."""

import pytest
from PIL import Image

from omniforge.jobs.demo import demo
from omniforge.labelers import get_labeler_class, list_labelers
from omniforge.pipeline import verify


@pytest.mark.slow
def test_demo_labels_every_teacher_and_verifies(tmp_path, ray_address, capsys):
    assert demo(str(tmp_path), ray_address=ray_address) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    report = verify(str(tmp_path / "labels"))
    assert report.ok, report.lines()
    expected = {m for name in list_labelers() for m in get_labeler_class(name).modalities}
    assert expected <= set(report.modalities)
    for m in expected:  # 12 photos labeled, the truncated JPEG recorded as failed
        assert (report.modalities[m].labeled, report.modalities[m].failed) == (12, 1), m
    with Image.open(tmp_path / "preview.png") as img:
        assert img.width > 800 and img.height > 800
    # then tiny tokenizers and token shards of every tokenizable modality, with 2 crops
    from omniforge.modalities import get_modality

    # the random-weight detector finds nobody, so human_poses has no person to train its pose tokenizer on: the demo
    # says so and leaves it out of tokenizing, training and the export (its labels are there, {} each)
    assert "human_poses tokenizer: not trained: " in out and "every label is empty" in out
    assert "demo: human_poses left out of tokenizing, training and the export: no tokenizer" in out
    expected_tokens = expected - {"human_poses"}
    tokenized = [get_modality(m).token_modality for m in expected_tokens if get_modality(m).tokenized]
    assert len(tokenized) == 17
    for folder in tokenized:
        assert (report.modalities[folder].labeled, report.modalities[folder].failed) == (12, 1), folder
    assert (report.modalities["crop_settings"].labeled, report.modalities["crop_settings"].failed) == (12, 1)
    assert "12 tokenized with every modality, 1 left out" in out
    with Image.open(tmp_path / "reconstruction.png") as img:
        assert img.width > 800 and img.height > 800
    # then a few tiny training steps on all of it (raw rgb pixels included) and one chained sample
    import json

    import numpy as np

    from omniforge.jobs.demo import DEMO_TRAIN_STEPS
    from omniforge.model.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(str(tmp_path / "train"))
    assert checkpoint is not None and checkpoint.endswith(f"checkpoint-{DEMO_TRAIN_STEPS}")
    with open(tmp_path / "train" / "log.jsonl", encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    assert [e["step"] for e in log] == list(range(1, DEMO_TRAIN_STEPS + 1))
    assert all(np.isfinite(e["loss"]) for e in log) and np.mean([e["loss"] for e in log[-10:]]) < log[0]["loss"]
    with open(f"{checkpoint}/config.json", encoding="utf-8") as f:
        specs = json.load(f)["specs"]
    assert specs["rgb@224"]["kind"] == "pixels" and specs["t5_caption"]["kind"] == "embedding"
    sequences = [m for m in expected_tokens if get_modality(m).crop == "sequence"]
    assert all(specs[m]["kind"] == "sequence" and specs[m]["source"] == m for m in sequences)  # read raw, as ml-4m
    assert len(specs) == 2 + len(tokenized) and all(e["budget_cuts"].keys() == set(sequences) for e in log)
    key_dir = next((tmp_path / "samples").iterdir())
    depth = np.load(key_dir / "tok_depth@224.npy")
    assert depth.shape == (1, 196) and 0 <= depth.min() and depth.max() < specs["tok_depth@224"]["vocab_size"]
    assert (key_dir / "tok_depth@224.png").exists() and (key_dir / "caption.txt").exists()
    with Image.open(key_dir / "sample.png") as img:
        assert img.width > 400
    assert "rgb@224 -> tok_depth@224, caption" in out
    # and the corpus in ml-4m's dialect: the same keys in every folder, sam_instance pre-tokenized
    from omniforge import shards

    assert "export ml4m: 12 samples in every folder, 0 left out" in out
    names = [n for n, _ in shards.iter_tar(shards.tar_uri(str(tmp_path / "ml4m"), "sam_instance", 0))]
    assert names and all(n.endswith(".npy") for n in names)
    assert names == [n.replace(".jpg", ".npy") for n, _ in shards.iter_tar(shards.tar_uri(str(tmp_path / "ml4m"),
                                                                                          "rgb", 0))]

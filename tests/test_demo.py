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
    from omniforge.pipeline.tokenize_job import TOKENIZABLE, token_folder

    for m in TOKENIZABLE:
        folder = token_folder(m)
        assert (report.modalities[folder].labeled, report.modalities[folder].failed) == (12, 1), folder
    assert (report.modalities["crop_settings"].labeled, report.modalities["crop_settings"].failed) == (12, 1)
    assert "12 tokenized with every modality, 1 left out" in out
    with Image.open(tmp_path / "reconstruction.png") as img:
        assert img.width > 800 and img.height > 800

"""`omniforge list` and `omniforge list TEACHER`: what the registry holds, read back from the printed text."""

from __future__ import annotations

from omniforge.jobs.cli import main as cli_main
from omniforge.labelers import list_labelers


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["list", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_marks_the_default_teacher_of_a_modality_with_several(capsys):
    code, out, _ = _run(capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.split("\n\n")[0].splitlines()[1:]}
    assert set(rows) == set(list_labelers())
    assert rows["depth"].split()[1] == "learned" and "depth (default)" in rows["depth"]
    assert "depth (--teacher depth=omnidata)" in rows["omnidata"]
    assert rows["clip"].split()[1:] == ["learned", "clip"]  # a modality with one teacher: no mark
    assert rows["canny_edge"].split()[1] == "classical"


def test_list_teacher_prints_its_summary_modalities_kind_and_options(capsys):
    code, out, _ = _run(capsys, "det")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("det: COCO object detection with RT-DETR")
    assert "  modalities: det" in lines and any(line.startswith("  kind: learned") for line in lines)
    options = {line.split()[0]: line for line in lines if line.startswith("    ")}
    assert set(options) == {"hub_id", "threshold", "max_detections"}
    assert options["threshold"].split()[1:4] == ["float", "default", "0.3:"]
    assert "a number in [0.0, 1.0]" in options["threshold"]
    assert options["hub_id"].split()[1:4] == ["str", "default", '"PekingU/rtdetr_r50vd":']
    code, out, _ = _run(capsys, "color_palette")
    assert "kind: classical" in out and "max_pixels  int  default 4096:" in out
    code, out, _ = _run(capsys, "rgb")
    assert code == 0 and "  options: none" in out.splitlines()


def test_list_an_unknown_teacher_is_one_line_listing_the_teachers(capsys):
    code, out, err = _run(capsys, "midas")
    assert code == 2 and not out and err.count("\n") == 1
    assert err.startswith("omniforge list: error: unknown labeler 'midas'; registered labelers: ")
    assert all(name in err for name in list_labelers())


def test_list_dialect_says_how_ml4m_reads_every_folder(capsys):
    from omniforge.modalities import all_modalities

    code, out, _ = _run(capsys, "--dialect", "ml4m")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {m.name for m in all_modalities()} <= set(rows)
    assert "export --dialect ml4m" in rows["sam_instance"] and "pickled" in rows["sam_instance"]
    assert "not in ml-4m's form" in rows["human_keypoints"] and "not a 4M-21 modality" in rows["human_keypoints"]
    assert "reads it as is" in rows["det"] and "0.6" in rows["det"]
    assert "export --dialect ml4m" in rows["human_poses"] and "pose_tokenized" in rows["human_poses"]

"""Teacher profiles (`--profile 4m21`): entries declared by the teachers, resolved on the driver with the user's
flags winning, printed by `omniforge list --profile`. Fast: no model is loaded, no Ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from omniforge.errors import ConfigError
from omniforge.jobs.cli import main as cli_main
from omniforge.labelers import (PROFILE_4M21, Labeler, LabelerOptions, Profile, get_labeler_class,
                                labelers_for_modality, list_labelers, list_profiles, option, profile_teacher)
from omniforge.labelers import _registry
from omniforge.labelers.clip import ClipLabeler
from omniforge.labelers.depth_normal import OmnidataDepthLabeler
from omniforge.labelers.semseg import SemsegCocoLabeler
from omniforge.modalities import all_modalities
from omniforge.pipeline.label import LabelConfig, _config_for_record, _teacher_for_record
from omniforge.pipeline.teachers import parse_weights, profile_rows, resolve_teachers

# What 4M-21 used that omniforge runs another way (ml-4m's README_DATA.md and the paper): ViTDet-H needs detectron2,
# PyPalette is not on PyPI, 4M-21's metadata code is not published.
EXPECTED_STAND_INS = {"det", "color_palette", "metadata"}
JOB = ("rgb", "caption", "depth", "normal", "semseg_coco", "det", "clip", "sam_instance", "sam_edge", "metadata")


def entries() -> list[tuple[str, str]]:
    return [(name, profile) for name in list_labelers() for profile in get_labeler_class(name).profiles]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test teachers without leaving them behind."""
    monkeypatch.setattr(_registry, "_LABELERS", dict(_registry._LABELERS))
    monkeypatch.setattr(_registry, "_DEFAULTS", dict(_registry._DEFAULTS))


# -- the entries --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,profile", entries())
def test_every_entry_is_accepted_by_its_teacher_without_a_download(name, profile):
    cls = get_labeler_class(name)
    entry = cls.profiles[profile]
    assert isinstance(entry, Profile) and entry.reference.strip()
    assert entry.stand_in is None or entry.stand_in.strip()
    options = cls.make_options(**entry.options)  # every key an option of the teacher, every value valid
    assert all(getattr(options, k) == v for k, v in entry.options.items())
    # the weights the teacher identifies without loading anything: a kind (or "none" for a teacher without
    # weights), never a checkpoint path that would be hashed
    assert cls.identify_weights(entry.weights) in ((entry.weights,) if cls.learned else (entry.weights, "none"))
    assert entry.weights in ("pretrained", "tiny") or "://" in entry.weights
    identity = cls.identity(weights=entry.weights, **entry.options)
    assert identity["labeler"] and isinstance(identity["options"], dict)


def test_4m21_is_built_in_and_has_one_teacher_per_modality():
    assert PROFILE_4M21 in list_profiles()
    for m in all_modalities():
        in_profile = [cls.name for cls in labelers_for_modality(m.name) if PROFILE_4M21 in cls.profiles]
        assert len(in_profile) <= 1, (m.name, in_profile)
    assert profile_teacher(PROFILE_4M21, "depth") is OmnidataDepthLabeler  # not the default Depth Anything
    assert profile_teacher(PROFILE_4M21, "semseg_coco") is SemsegCocoLabeler
    assert profile_teacher(PROFILE_4M21, "human_keypoints") is None  # ViTPose keypoints: not a 4M-21 modality
    rows = {r.modality: r for r in profile_rows(PROFILE_4M21)}
    assert {m for m, r in rows.items() if r.entry is not None and r.entry.stand_in} == EXPECTED_STAND_INS
    assert rows["clip"].entry.options["pretrained_tag"] == "openai"
    assert rows["sam_instance"].entry.options["model_type"] == "vit_h"
    assert rows["semseg_coco"].entry.options["hub_id"] == "facebook/mask2former-swin-base-coco-panoptic"
    assert (rows["semseg_coco"].entry.options["shortest_edge"], rows["semseg_coco"].entry.options["longest_edge"]) \
        == (800, 1333)  # Mask2Former's own COCO test size, not the hub processor's 384 x 384
    assert rows["imagebind"].entry.options == {"model_name": "ViT-H-14", "pretrained_tag": "laion2b_s32b_b79k"}
    assert rows["dinov2"].teacher is rows["dinov2_global"].teacher


def test_a_typo_in_an_entry_fails_at_registration(scratch_registry):
    @dataclass(frozen=True, kw_only=True)
    class EdgeOptions(LabelerOptions):
        level: int = option(1, "how many edges", ge=0)

    class Edges(Labeler):
        name = "test_edges"
        modalities = ("canny_edge",)
        options_class = EdgeOptions
        profiles = {"test": Profile(reference="edges", options={"levle": 2})}

    with pytest.raises(ConfigError, match="profile 'test': test_edges: unknown option levle; its options are level"):
        _registry.register_labeler(Edges)
    assert "test_edges" not in list_labelers()

    class BadValue(Edges):
        profiles = {"test": Profile(reference="edges", options={"level": -1})}

    with pytest.raises(ConfigError, match="option level=-1 is not valid"):
        _registry.register_labeler(BadValue)
    with pytest.raises(TypeError, match="reference"):
        Profile(reference=" ")
    with pytest.raises(TypeError, match="stand_in"):
        Profile(reference="x", stand_in="")


def test_two_teachers_of_a_modality_in_one_profile_are_refused(scratch_registry):
    class OtherEdges(Labeler):
        name = "test_other_edges"
        modalities = ("canny_edge",)
        profiles = {PROFILE_4M21: Profile(reference="other edges")}

    with pytest.raises(ConfigError, match="'canny_edge' .* and 'test_other_edges' .* are both in profile '4m21' for "
                                          "canny_edge"):
        _registry.register_labeler(OtherEdges)
    assert "test_other_edges" not in list_labelers()

    class NewProfile(OtherEdges):
        profiles = {"other": Profile(reference="other edges")}

    _registry.register_labeler(NewProfile)  # another profile: fine, and known from then on
    assert list_profiles() == sorted({PROFILE_4M21, "other"})

    class CannyVariant(get_labeler_class("canny_edge")):  # a subclass is another teacher: it inherits no entry
        name = "test_canny_variant"
        default_for = ()

    _registry.register_labeler(CannyVariant)
    assert CannyVariant.profile_entries() == {} and profile_teacher(PROFILE_4M21, "canny_edge").name == "canny_edge"


# -- resolution ---------------------------------------------------------------------------------------------------

def by_name(modalities, weights=None, options=None, teachers=None, profile=PROFILE_4M21):
    return {t.name: t for t in resolve_teachers(modalities, weights or {}, options or {}, teachers=teachers,
                                                profile=profile)}


def test_the_profile_picks_its_teachers_weights_and_options():
    resolved = by_name(JOB)
    assert resolved["omnidata"].modalities == ("depth",) and "depth" not in resolved  # Depth Anything does not run
    assert all(resolved[n].weights == "pretrained" for n in ("omnidata", "normal", "semseg_coco", "det", "clip",
                                                              "sam_instance"))
    assert resolved["semseg_coco"].options["shortest_edge"] == 800
    assert resolved["clip"].options == {"pretrained_tag": "openai"}
    # the same fingerprints as the same teachers named by hand: a corpus labeled that way counts as done
    assert resolved["omnidata"].fingerprint == OmnidataDepthLabeler.fingerprint(weights="pretrained")
    assert resolved["clip"].fingerprint == ClipLabeler.fingerprint(weights="pretrained")
    assert resolved["rgb"].fingerprint == get_labeler_class("rgb").fingerprint(weights="tiny")
    det = resolved["det"].profile
    assert det["profile"] == PROFILE_4M21 and "detectron2" in det["stand_in"] and det["overrides"] == {}
    assert resolved["clip"].profile["stand_in"] is None
    # without a profile: the defaults, tiny
    plain = by_name(JOB, profile=None)
    assert "depth" in plain and "omnidata" not in plain and plain["clip"].weights == "tiny"
    assert plain["clip"].profile is None


def test_the_users_flags_override_the_profile():
    resolved = by_name(JOB, weights=parse_weights("clip=tiny"), options={"semseg_coco": {"threshold": 0.5}})
    assert resolved["clip"].weights == "tiny" and resolved["det"].weights == "pretrained"
    assert resolved["clip"].profile["overrides"] == {"weights": "tiny"}
    semseg = resolved["semseg_coco"]
    assert semseg.options["threshold"] == 0.5 and semseg.options["shortest_edge"] == 800  # the others stay
    assert semseg.profile["overrides"] == {"options": {"threshold": 0.5}}
    # a default kind replaces the profile's weights for every teacher: the profile offline, with random weights
    tiny = by_name(JOB, weights=parse_weights("tiny"))
    assert {t.weights for t in tiny.values()} == {"tiny"} and "omnidata" in tiny
    assert tiny["sam_instance"].identity["options"]["pred_iou_thresh"] == 0.0  # tiny SAM's own defaults apply
    # --teacher takes a modality out of the profile; a learned teacher then needs its weights
    with pytest.raises(ConfigError, match=r"depth runs outside profile 4m21 .*--weights depth=pretrained"):
        by_name(("rgb", "depth"), teachers={"depth": "depth"})
    outside = by_name(("rgb", "depth"), weights=parse_weights("depth=pretrained"), teachers={"depth": "depth"})
    assert outside["depth"].weights == "pretrained" and outside["depth"].profile == {"profile": "4m21",
                                                                                     "outside": True}
    with pytest.raises(ConfigError, match="'midas' is not a registered labeler"):
        by_name(("depth",), teachers={"depth": "midas"})
    with pytest.raises(ConfigError, match="clip: unknown option pretrained_tga"):
        by_name(("clip",), options={"clip": {"pretrained_tga": "openai"}})


def test_a_modality_without_a_teacher_in_the_profile_is_an_error_saying_what_to_do():
    with pytest.raises(ConfigError) as e:
        by_name(("rgb", "det", "human_keypoints"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("profile 4m21 has no teacher for human_keypoints")
    assert "drop human_keypoints from --modalities" in message and "--teacher human_keypoints=NAME" in message
    chosen = by_name(("rgb", "det", "human_keypoints"), weights=parse_weights("human_keypoints=tiny"),
                     teachers={"human_keypoints": "human_keypoints"})
    assert chosen["human_keypoints"].profile["outside"] and chosen["det"].profile["stand_in"]


def test_an_unknown_profile_is_a_one_line_error_listing_the_known_ones():
    for make in (lambda: by_name(("rgb",), profile="4m22"),
                 lambda: LabelConfig(output="/tmp/x", modalities=("rgb",), profile="4m22")):
        with pytest.raises(ConfigError) as e:
            make()
        message = str(e.value)
        assert message.startswith("unknown teacher profile '4m22'; known profiles: 4m21") and "\n" not in message


def test_the_run_record_holds_the_profile_and_what_it_resolved_to():
    cfg = LabelConfig(output="/tmp/x", modalities=("rgb", "det"), profile=PROFILE_4M21)
    assert cfg.weights == {} and _config_for_record(cfg)["profile"] == PROFILE_4M21
    det = resolve_teachers(cfg.modalities, cfg.weights, cfg.options, profile=cfg.profile)[-1]
    record = _teacher_for_record(det)
    assert record["identity"]["weights"] == "pretrained" and record["identity"]["options"]["hub_id"]
    assert record["profile"]["reference"].startswith("ViTDet") and record["profile"]["stand_in"]
    plain = _teacher_for_record(resolve_teachers(("rgb",), {}, {})[0])
    assert "profile" not in plain  # records of runs without a profile are as before


def test_tokenize_re_runs_the_profiles_feature_teachers(tmp_path):
    from omniforge.pipeline.tokenize_job import TokenizeConfig, _resolve_teachers
    from omniforge.tokenize.crops import CropConfig

    cfg = TokenizeConfig(input=str(tmp_path), tokenizers=str(tmp_path), modalities=("clip", "depth"),
                         crops=CropConfig(n_crops=2), profile=PROFILE_4M21, progress=False)
    (teacher,) = _resolve_teachers(cfg, str(tmp_path), {("clip", 0): [ClipLabeler.fingerprint(weights="pretrained")]})
    assert teacher.cls is ClipLabeler and teacher.weights == "pretrained"
    with pytest.raises(ConfigError, match="--profile/--teacher/--weights/--option of the label job"):
        _resolve_teachers(dataclasses.replace(cfg, profile=None), str(tmp_path),
                          {("clip", 0): [ClipLabeler.fingerprint(weights="pretrained")]})


# -- the CLI ------------------------------------------------------------------------------------------------------

def test_list_profile_prints_every_modality_and_names_each_stand_in_with_its_reason(capsys):
    code = cli_main(["list", "--profile", PROFILE_4M21])
    out = capsys.readouterr().out
    assert code == 0
    table = out.split("\n\n")[0].splitlines()[1:]
    rows = {line.split()[0]: line for line in table}
    assert set(rows) == {r.modality for r in profile_rows(PROFILE_4M21)}
    assert rows["depth"].split()[1:3] == ["omnidata", "pretrained"]
    assert rows["rgb"].split()[1:3] == ["rgb", "-"]  # a classical teacher: no weights
    assert "shortest_edge=800 longest_edge=1333" in rows["semseg_coco"]
    assert {m for m, line in rows.items() if "STAND-IN:" in line} == EXPECTED_STAND_INS
    for m in EXPECTED_STAND_INS:
        assert rows[m].endswith("STAND-IN: " + profile_teacher(PROFILE_4M21, m).profiles[PROFILE_4M21].stand_in)
    assert "detectron2" in rows["det"] and "PyPI" in rows["color_palette"]
    keypoints = rows["human_keypoints"]
    assert "not in profile 4m21" in keypoints and "--teacher human_keypoints=NAME" in keypoints


def test_cli_profile_errors_are_one_line_before_any_work(capsys, tmp_path):
    code = cli_main(["list", "--profile", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown teacher profile 'nope'; known profiles: 4m21" in err
    code = cli_main(["label", "--output", str(tmp_path / "out"), "--modalities", "rgb,human_keypoints",
                     "--profile", PROFILE_4M21, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no teacher for human_keypoints" in err
    assert not (tmp_path / "out").exists()  # refused before planning anything

"""human_poses (HMR2.0): a checkpoint in the publisher's Lightning layout must give 4D-Humans' own SMPL parameters
and camera, and omniforge's crops 4D-Humans' own crops. The references were made once by 4D-Humans' code
(tests/fixtures/hmr2/make_fixtures.py); the full-size check draws its ViT-H weights by
tests/fixtures/hmr2/weights_rule.py."""

from __future__ import annotations

import enum
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

skimage_data = pytest.importorskip("skimage.data")

from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers import _hmr2  # noqa: E402
from omniforge.modalities import MODALITIES  # noqa: E402
from omniforge.pipeline.label import _encode_checked  # noqa: E402
from omniforge.schemas import check_human_poses  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hmr2"
CACHE = FIXTURES / "4DHumans"
RUN = CACHE / "logs" / "train" / "multiruns" / "hmr2" / "0"
CKPT = RUN / "checkpoints" / "epoch=35-step=1000000.ckpt"
FIXTURE_HEADS = 4  # the fixture backbone's head count (a ViT's weights do not tell it)
SMPL_KEYS = ("global_orient", "body_pose", "betas", "pred_cam")
LEVEL = 1 / 255  # one 8-bit level, in the crops' 0..1 units before normalization


@pytest.fixture(scope="module")
def crops():
    return dict(np.load(FIXTURES / "crops.npz"))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def fixture_labeler():
    return create_labeler("human_poses", weights=str(RUN), backbone_heads=FIXTURE_HEADS)


def unnormalized(crop: np.ndarray) -> np.ndarray:
    """(3, H, W) ImageNet-normalized -> 0..1."""
    return crop * np.float32(_hmr2.IMAGENET_STD)[:, None, None] + np.float32(_hmr2.IMAGENET_MEAN)[:, None, None]


def det_json(*people) -> dict:
    return {"instances": [{"boxes": list(b), "class_name": c, "score": s} for b, c, s in people]}


def encodes(value) -> None:
    assert _encode_checked(MODALITIES["human_poses"], value)
    json.dumps(value, allow_nan=False)


# -- the crop -----------------------------------------------------------------------------------------------------

def test_crops_are_4d_humans_crops_on_every_hand_placed_box(crops):
    images = [crops["image_a"], crops["image_b"]]
    for i, (box, image, name) in enumerate(zip(crops["boxes"], crops["image"], crops["names"])):
        assert _hmr2.crop_size(box) == pytest.approx(float(crops["box_size"][i]), rel=1e-6), name
        ours = _hmr2.person_crop(images[image], box)
        official = crops["crops"][i]
        assert ours.shape == official.shape == (3, 256, 256) and ours.dtype == np.float32
        diff = np.abs(unnormalized(ours) - unnormalized(official))
        blurred = crops["box_size"][i] / 512 > 1.1
        h, w = images[image].shape[:2]
        outside = not (box[2] > 0 and box[0] < w and box[3] > 0 and box[1] < h)
        if blurred or outside:  # 4D-Humans warps the blurred float image (or nothing): the same values
            assert diff.max() < 1e-6, (name, diff.max())
        else:  # 4D-Humans warps the uint8 image and rounds; omniforge's crop is the unrounded one
            assert diff.max() <= 0.5 * LEVEL + 1e-6 and diff.mean() < 0.1 * LEVEL, (name, diff.max(), diff.mean())
        assert np.abs(unnormalized(official) - unnormalized(crops["crops"][(i + 1) % len(official)])).max() > 0.1


def test_cropping_a_window_equals_cropping_the_whole_image():
    """person_crop blurs and warps only the pixels around the box: the same crop as 4D-Humans' whole-image way,
    blur everything, then warp (done here with scikit-image and OpenCV directly), for a box well inside a large
    image, with and without the anti-aliasing blur."""
    import cv2
    from skimage.filters import gaussian

    image = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)  # sharp everywhere
    for box in (np.array([400.0, 80.0, 1100.0, 1413.5]), np.array([400.3, 500.0, 560.0, 780.0])):
        side = _hmr2.crop_size(box)
        factor = side / 512
        center = (box[:2] + box[2:]).astype(np.float32) / 2
        whole = gaussian(image, sigma=float((factor - 1) / 2), channel_axis=2, preserve_range=True) \
            if factor > 1.1 else image.astype(np.float64)
        matrix = cv2.getAffineTransform(np.float32([center, center + [0, side / 2], center + [side / 2, 0]]),
                                        np.float32([[128, 128], [128, 256], [256, 128]]))
        expected = cv2.warpAffine(whole, matrix, (256, 256), flags=cv2.INTER_LINEAR).transpose(2, 0, 1) / 255
        np.testing.assert_allclose(unnormalized(_hmr2.person_crop(image, box)), expected, atol=1e-5)
        assert (factor > 2.5) if box[0] == 400.0 else (factor < 1.1)  # blurred (sigma 0.8), not blurred


def test_crop_is_black_outside_the_image_and_scales_with_rescale_factor(crops):
    image = crops["image_a"]
    outside = _hmr2.person_crop(image, np.array([500.0, 500.0, 560.0, 600.0]))
    assert np.allclose(unnormalized(outside), 0, atol=1e-6)
    box = np.array([40.0, 20.0, 100.0, 110.0])
    assert _hmr2.crop_size(box, rescale=2.5) == pytest.approx(2.5 * _hmr2.crop_size(box), rel=1e-6)
    wide = _hmr2.person_crop(image, box, rescale=2.5)
    tight = _hmr2.person_crop(image, box)
    # the larger square holds the whole image: its corners are black, the tight one's are not
    assert np.allclose(unnormalized(wide)[:, :8, :8], 0, atol=1e-6) and unnormalized(tight)[:, :8, :8].max() > 0.1


# -- the model on the fixture checkpoint --------------------------------------------------------------------------

def test_fixture_checkpoint_gives_4d_humans_outputs_on_its_crops(fixture_labeler, crops, reference):
    model = fixture_labeler.model
    assert (model.cfg.width, model.cfg.depth, model.cfg.head_depth, model.cfg.ief_iters) == (32, 2, 2, 2)
    with torch.inference_mode():
        out = model(torch.from_numpy(crops["crops"]))
    for key, tol in (("features", 1e-4), ("token", 1e-4), ("pose_6d", 1e-4), ("global_orient", 1e-4),
                     ("body_pose", 1e-4), ("betas", 1e-4), ("pred_cam", 1e-4)):
        np.testing.assert_allclose(out[key].numpy(), reference[key], atol=tol, rtol=0, err_msg=key)
    preds = fixture_labeler.predict(crops["crops"])  # the labeler's own batched path, 32 crops a forward
    for key in SMPL_KEYS:
        np.testing.assert_allclose(preds[key], reference[key], atol=1e-4, rtol=0, err_msg=key)
    rot = preds["body_pose"].reshape(-1, 3, 3)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    assert np.abs(reference["betas"][0] - reference["betas"][1]).max() > 0.05  # the outputs depend on the crop


def test_the_head_runs_in_float32_under_autocast(fixture_labeler, crops):
    model = fixture_labeler.model
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast_for gives on CUDA, here on the CPU
            out = model(torch.from_numpy(crops["crops"][:2]))
        plain = model.head(out["features"].float())
    assert out["betas"].dtype == torch.float32  # and the head ignored the autocast: bfloat16 there moves them
    assert all(torch.equal(out[k], plain[k]) for k in SMPL_KEYS)


def test_the_ckpt_file_and_its_run_folder_load_the_same(fixture_labeler, crops):
    by_file = create_labeler("human_poses", weights=str(CKPT), backbone_heads=FIXTURE_HEADS)
    a, b = (lab.predict(crops["crops"][:2]) for lab in (fixture_labeler, by_file))
    assert all(np.array_equal(a[k], b[k]) for k in SMPL_KEYS)
    cls = get_labeler_class("human_poses")
    assert cls.identify_weights(str(RUN)) == cls.identify_weights(str(CKPT)) != cls.identify_weights("tiny")


def test_labeling_the_fixture_images_gives_4d_humans_people(fixture_labeler, crops, reference):
    """The whole path: det boxes (normalized, as det writes them) -> crops -> network -> ml-4m's JSON."""
    inside = [0, 1, 2, 8]  # the fixture boxes det could give (det clips its boxes to the image)
    samples = []
    for index in (0, 1):
        image = crops[f"image_{'ab'[index]}"]
        h, w = image.shape[:2]
        people = [(crops["boxes"][i] / np.array([w, h, w, h]), "person", 0.9 - 0.1 * k)
                  for k, i in enumerate(inside) if crops["image"][i] == index]
        samples.append(Sample(f"img{index}", image, inputs={"det": det_json(*people)}))
    out = fixture_labeler.label(samples)
    a, b = out[0]["human_poses"], out[1]["human_poses"]
    for label in (a, b):
        check_human_poses(label)
        encodes(label)
    assert len(a["bbox_xyxy"]) == 3 and len(b["bbox_xyxy"]) == 1 and a["score"] == [0.9, 0.8, 0.7]
    rows = [0, 1, 2, 8]
    np.testing.assert_allclose(np.array(a["bbox_xyxy"] + b["bbox_xyxy"]), crops["boxes"][rows], atol=0.01)
    # the crops pred_cam refers to, as 4D-Humans' ViTDetDataset gives them (show places people with them)
    np.testing.assert_allclose(np.array(a["box_center"] + b["box_center"]), crops["box_center"][rows], atol=0.01)
    np.testing.assert_allclose(np.array(a["box_size"] + b["box_size"]), crops["box_size"][rows], atol=0.01)
    images = [crops["image_a"]] * 3 + [crops["image_b"]]
    ours = fixture_labeler.predict(np.stack([_hmr2.person_crop(im, crops["boxes"][r]) for im, r in zip(images, rows)]))
    for key in SMPL_KEYS:
        got = np.concatenate([smpl(a, key), smpl(b, key)])
        np.testing.assert_allclose(got, ours[key], atol=6e-6, rtol=0, err_msg=key)  # the JSON's 5 decimals
        # against 4D-Humans' outputs on its own crops, which differ from omniforge's by at most half a level: the
        # random tiny network moves by up to 3e-3 for the 3 x 5 px box blown up 54 times
        np.testing.assert_allclose(got, reference[key][rows], atol=1e-2, rtol=0, err_msg=key)


def smpl(label: dict, key: str) -> np.ndarray:
    return np.array(label[key] if key == "pred_cam" else label["pred_smpl_params"][key])


# -- weights -----------------------------------------------------------------------------------------------------

def test_pretrained_reads_the_release_where_4d_humans_downloads_it(monkeypatch, tmp_path, crops, fixture_labeler):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="hmr2_data.tar.gz") as err:
        create_labeler("human_poses", weights="pretrained", backbone_heads=FIXTURE_HEADS)
    assert "--weights human_poses=" in str(err.value) and "\n" not in str(err.value)
    shutil.copytree(CACHE, tmp_path / ".cache" / "4DHumans")
    released = create_labeler("human_poses", weights="pretrained", backbone_heads=FIXTURE_HEADS)
    a, b = (lab.predict(crops["crops"][:1]) for lab in (released, fixture_labeler))
    assert all(np.array_equal(a[k], b[k]) for k in SMPL_KEYS)


def _release(tmp_path: Path, state: dict, config_edit=None, name: str = "run") -> Path:
    """A run folder: the fixture's model_config.yaml (edited) and a Lightning checkpoint holding `state`."""
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    text = (RUN / "model_config.yaml").read_text()
    (run / "model_config.yaml").write_text(config_edit(text) if config_edit else text)
    torch.save({"epoch": 1, "global_step": 2, "state_dict": state}, run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def fixture_state():
    return _hmr2.read_lightning_checkpoint(str(CKPT))["state_dict"]


def test_weights_errors_name_the_problem_and_the_fix(tmp_path, fixture_state):
    def fails(weights, match, **options):
        with pytest.raises(WeightsError, match=match) as err:
            create_labeler("human_poses", weights=str(weights), **{"backbone_heads": FIXTURE_HEADS, **options})
        assert "\n" not in str(err.value)

    fails(tmp_path / "nowhere", "not found.*--weights human_poses=")
    missing = {k: v for k, v in fixture_state.items() if k != "smpl_head.deccam.weight"}
    fails(_release(tmp_path, missing, name="missing"), r"smpl_head\.deccam\.weight is missing")
    reshaped = {**fixture_state, "backbone.blocks.1.mlp.fc2.bias": torch.zeros(7)}
    fails(_release(tmp_path, reshaped, name="shape"), r"backbone\.blocks\.1\.mlp\.fc2\.bias has shape \(7,\)")
    unknown = {**fixture_state, "smpl_head.transformer.extra.weight": torch.zeros(2)}
    fails(_release(tmp_path, unknown, name="unknown"), r"smpl_head\.transformer\.extra\.weight is not part of")
    deeper = _release(tmp_path, fixture_state, lambda t: t.replace("depth: 2", "depth: 3"), name="deeper")
    fails(deeper, r"smpl_head\.transformer\.transformer\.layers\.2\..* is missing")
    mean_input = _release(tmp_path, fixture_state, lambda t: t.replace("IEF_ITERS: 2", "IEF_ITERS: 2\n    "
                                                                      "TRANSFORMER_INPUT: mean_shape"), name="mean")
    fails(mean_input, "TRANSFORMER_INPUT is 'mean_shape'; omniforge's HMR2.0 implements 'zero'")
    fails(RUN, "backbone_heads=3 does not divide", backbone_heads=3)
    two = _release(tmp_path, fixture_state, name="two")
    torch.save({"state_dict": fixture_state}, two / "checkpoints" / "other.ckpt")
    fails(two, "holds 2 .ckpt files")
    no_config = tmp_path / "bare" / "checkpoints"
    no_config.mkdir(parents=True)
    shutil.copy(CKPT, no_config / "x.ckpt")
    fails(no_config / "x.ckpt", "model_config.yaml not found")


# -- the safe reader -------------------------------------------------------------------------------------------

class Mode(enum.Enum):
    FIT = "fit"


class _Payload:
    """Unpickling this runs code: it writes `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_the_reader_keeps_every_tensor_and_instantiates_nothing(tmp_path, fixture_state, crops, reference):
    checkpoint = _hmr2.read_lightning_checkpoint(str(CKPT))  # the publisher's layout, omegaconf config and all
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, weights_only=True)  # why the reader exists: hyper_parameters hold a DictConfig
    cfg = checkpoint["hyper_parameters"]["cfg"]
    assert isinstance(cfg, _hmr2.Inert) and cfg.pickled_as == "omegaconf.dictconfig.DictConfig"
    assert checkpoint["epoch"] == 35 and checkpoint["pytorch-lightning_version"] == "2.0.2"
    assert isinstance(checkpoint["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    assert checkpoint["state_dict"]["initialized"].item() is True
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"backbone", "smpl_head", "discriminator", "smpl",
                                                                  "initialized"}

    control, marker = tmp_path / "control.ckpt", tmp_path / "ran-control"
    torch.save({"state_dict": fixture_state, "hyper_parameters": {"cfg": _Payload(str(marker))}}, control)
    torch.load(control, weights_only=False)  # plain unpickling runs the payload: the check below can fail
    assert marker.read_text() == "ran"

    marker = tmp_path / "ran"
    run = _release(tmp_path, fixture_state, name="crafted")
    torch.save({"state_dict": fixture_state, "hyper_parameters": {"cfg": _Payload(str(marker))}},
               run / "checkpoints" / "last.ckpt")
    crafted = _hmr2.read_lightning_checkpoint(str(run / "checkpoints" / "last.ckpt"))
    assert not marker.exists()
    assert crafted["hyper_parameters"]["cfg"].pickled_as == "__builtin__.exec"  # protocol 2 spells builtins so
    labeler = create_labeler("human_poses", weights=str(run), backbone_heads=FIXTURE_HEADS)
    assert not marker.exists()
    preds = labeler.predict(crops["crops"][:2])
    np.testing.assert_allclose(preds["betas"], reference["betas"][:2], atol=1e-4)


def test_the_reader_takes_any_python_object_as_a_shell(tmp_path, fixture_state):
    """Objects of unknown classes where dict keys, sets, lists and object state go: kept as inert shells."""
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": fixture_state, "hyper_parameters": {Mode.FIT: [Mode.FIT, {Mode.FIT}, Path("/x")]}},
               path)
    loaded = _hmr2.read_lightning_checkpoint(str(path))
    (key, value), = loaded["hyper_parameters"].items()
    assert isinstance(key, _hmr2.Inert) and key.pickled_as.endswith(".Mode") and len(value) == 3
    assert all(isinstance(v, _hmr2.Inert) for v in (value[0], *value[1], value[2]))
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in fixture_state.items())


def test_the_reader_reads_torch_legacy_files(tmp_path, fixture_state):
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": fixture_state, "epoch": 3}, legacy, _use_new_zipfile_serialization=False)
    loaded = _hmr2.read_lightning_checkpoint(str(legacy))
    assert loaded["epoch"] == 3 and all(torch.equal(loaded["state_dict"][k], v) for k, v in fixture_state.items())
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsError, match="cannot read .* as a PyTorch Lightning checkpoint"):
        _hmr2.read_lightning_checkpoint(str(tmp_path / "bad.ckpt"))


def test_the_key_map_reads_both_ways():
    model = _hmr2.HMR2(_hmr2.tiny_config(4))
    for key in model.state_dict():
        publisher = _hmr2.rename(key, to_publisher=True)
        assert publisher is not None and publisher.startswith(("backbone.", "smpl_head.")), key
        assert _hmr2.rename(publisher) == key


# -- the labeler ---------------------------------------------------------------------------------------------------

ASTRONAUT = [0.30, 0.05, 0.80, 0.98]


def test_people_come_from_det_boxes_in_score_order():
    labeler = create_labeler("human_poses", weights="tiny")
    image = skimage_data.astronaut()  # 512 x 512
    det = det_json(([0.1, 0.5, 0.3, 0.9], "person", 0.6), (ASTRONAUT, "person", 0.95), ([0, 0, 1, 1], "cat", 0.99),
                   ([0.5, 0.5, 0.6, 0.6], "person", 0.2), ([0.4, 0.4, 0.4, 0.8], "person", 0.9))
    out = labeler.label([Sample("a", image, inputs={"det": det})])[0]["human_poses"]
    check_human_poses(out)
    encodes(out)
    assert out["score"] == [0.95, 0.6]  # the cat, the low score and the zero-width box are not people here
    np.testing.assert_allclose(out["bbox_xyxy"], np.array([ASTRONAUT, [0.1, 0.5, 0.3, 0.9]]) * 512, atol=0.01)
    assert np.array(out["pred_smpl_params"]["body_pose"]).shape == (2, 23, 3, 3)
    assert np.array(out["pred_smpl_params"]["global_orient"]).shape == (2, 1, 3, 3)
    assert out["pred_smpl_params"]["betas"][0] != out["pred_smpl_params"]["betas"][1]
    again = create_labeler("human_poses", weights="tiny", batch_size=1).label([Sample("a", image, inputs={"det": det})])
    np.testing.assert_allclose(np.array(again[0]["human_poses"]["pred_cam"]), np.array(out["pred_cam"]), atol=2e-5)
    for max_persons, scores in ((3, [0.95, 0.6]), (1, [0.95])):  # det's 3 best persons, the zero-width one skipped
        lower = create_labeler("human_poses", weights="tiny", person_threshold=0.1, max_persons=max_persons)
        assert lower.label([Sample("a", image, inputs={"det": det})])[0]["human_poses"]["score"] == scores


def test_bad_inputs_are_recorded_results_or_failures():
    labeler = create_labeler("human_poses", weights="tiny")
    image = skimage_data.astronaut()
    person = det_json((ASTRONAUT, "person", 0.9))
    out = labeler.label([
        Sample("ok", image, inputs={"det": person}),
        Sample("nobody", image, inputs={"det": {"instances": []}}),
        Sample("zero_area", image, inputs={"det": det_json(([0.5, 0.2, 0.5, 0.9], "person", 0.9),
                                                           ([0.1, 0.3, 0.6, 0.3], "person", 0.8))}),
        Sample("missing", image),
        Sample("bad_det", image, inputs={"det": {"instances": [{"boxes": [0, 0, 1], "class_name": "person"}]}}),
        Sample("gray", skimage_data.camera(), inputs={"det": person}),
        Sample("dot", np.full((1, 1, 3), 9, np.uint8), inputs={"det": det_json(([0, 0, 1, 1], "person", 0.9))}),
    ])
    assert len(out[0]["human_poses"]["bbox_xyxy"]) == 1
    assert out[1] == {"human_poses": {}} and out[2] == {"human_poses": {}}
    for empty in (out[1], out[2]):
        check_human_poses(empty["human_poses"])
        encodes(empty["human_poses"])
    assert [o.error_type for o in out[3:6]] == ["missing_input", "bad_input", "bad_image"]
    assert "det" in out[3].message
    assert len(out[6]["human_poses"]["bbox_xyxy"]) == 1  # a 1 x 1 image with a whole-image person


def test_a_non_finite_output_fails_only_its_image(monkeypatch):
    labeler = create_labeler("human_poses", weights="tiny")
    model = labeler.model

    def poisoned(x):
        out = model(x)
        betas = out["betas"].clone()
        betas[1:2] = float("nan")  # the second person of the batch: the first person of the second image
        return {**out, "betas": betas}

    monkeypatch.setattr(labeler, "model", type("Poisoned", (), {"__call__": staticmethod(poisoned),
                                                                "cfg": model.cfg})())
    image = skimage_data.astronaut()
    person = det_json((ASTRONAUT, "person", 0.9))
    out = labeler.label([Sample("a", image, inputs={"det": person}), Sample("b", image, inputs={"det": person})])
    assert len(out[0]["human_poses"]["bbox_xyxy"]) == 1
    assert isinstance(out[1], SampleError) and out[1].error_type == "teacher_error" and "betas" in out[1].message


def test_options_and_fingerprints(tmp_path):
    cls = get_labeler_class("human_poses")
    assert cls.requires == ("det",) and cls.learned and cls.default_for == ("human_poses",)
    with pytest.raises(ConfigError, match="smpl_model=.*no such file or folder"):
        cls.make_options(smpl_model=str(tmp_path / "SMPL_NEUTRAL.pkl"))
    (tmp_path / "SMPL_NEUTRAL.pkl").write_bytes(b"licensed")
    assert cls.make_options(smpl_model=str(tmp_path / "SMPL_NEUTRAL.pkl")).smpl_model.endswith("SMPL_NEUTRAL.pkl")
    base = cls.fingerprint(weights="tiny")
    assert cls.fingerprint(weights="tiny", batch_size=1, smpl_model=str(tmp_path / "SMPL_NEUTRAL.pkl")) == base
    assert cls.fingerprint(weights="tiny", person_threshold=0.3) != base != cls.fingerprint(weights="pretrained")
    assert cls.fingerprint(weights="tiny", rescale_factor=2.5) != base
    assert create_labeler("human_poses", weights="tiny").model.cfg == _hmr2.tiny_config(16)


# -- full size -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_vit_h_checkpoint_gives_4d_humans_outputs(tmp_path, crops):
    """ViT-H/16 and the release's head with the weights of weights_rule.py, written in the Lightning layout and
    loaded through the real path, against 4D-Humans' own forward with the same weights."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import weights_rule
    finally:
        sys.path.remove(str(FIXTURES))
    full = np.load(FIXTURES / "full_size.npz")
    ends = np.cumsum(full["shape_len"])
    shapes = [(str(k), tuple(int(d) for d in full["shape_flat"][e - n:e]))
              for k, n, e in zip(full["keys"], full["shape_len"], ends)]
    state: dict[str, torch.Tensor] = {}

    def drawn():
        for key, value in weights_rule.tensors(shapes):
            state[key] = torch.from_numpy(value)
            yield key, value

    assert weights_rule.checksum(drawn()) == int(full["checksum"])  # numpy draws what the fixture drew
    state["discriminator.D_conv1.weight"] = torch.zeros(32, 9, 1, 1)  # as the release, keys the reader drops
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    config = (RUN / "model_config.yaml").read_text()
    release_head = ("    TRANSFORMER_DECODER:\n      depth: 6\n      heads: 8\n      mlp_dim: 1024\n"
                    "      dim_head: 64\n      dropout: 0.0\n      emb_dropout: 0.0\n      norm: layer\n"
                    "      context_dim: 1280\n")  # hmr_vit_transformer.yaml's, IEF_ITERS left at 1
    tiny_head = config[config.index("    TRANSFORMER_DECODER:"):config.index("LOSS_WEIGHTS:")]
    (run / "model_config.yaml").write_text(config.replace(tiny_head, release_head))
    torch.save({"epoch": 35, "global_step": 1000000, "state_dict": state},
               run / "checkpoints" / _hmr2.RELEASE_CHECKPOINT)
    state.clear()  # the file holds them now
    labeler = create_labeler("human_poses", weights=str(run))  # backbone_heads: ViT-H's 16, the default
    cfg = labeler.model.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_hidden, cfg.head_width, cfg.head_depth, cfg.ief_iters) == \
        (1280, 32, 16, 5120, 1024, 6, 1)
    preds = labeler.predict(crops["crops"][full["crop_index"]])
    for key in SMPL_KEYS:
        np.testing.assert_allclose(preds[key], full[key], atol=1e-4, rtol=0, err_msg=key)  # measured: <= 5e-6

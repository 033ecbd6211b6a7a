"""SMPL people placed in their image (omniforge._smpl) and drawn by `show`'s "smpl" style (omniforge._render).

The body model is a small random one in SMPL's file format (tests/smpl_models.py). Expected joints and pixels
are worked out here from the definitions (SMPL's rest joints are J_regressor @ shaped template; HMR2.0's crop
camera puts a body point (X, Y, Z) at u = W/2 + f (X + tx_full) / (Z + tz) with f = 5000 / 256 * max(W, H)),
not taken from the code under test.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from smpl_models import SMPL_PARENTS, write_smpl_model

from omniforge._render import _BOX_COLORS, _painter, render_sample
from omniforge._smpl import cam_crop_to_full, full_image_focal, load_smpl, person_box, place_people, project
from omniforge.errors import ConfigError

OPTION = "human_poses.smpl_model"
W, H = 640, 480


def _rot_x(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _people(boxes, cams, orients=None, poses=None, betas=None) -> dict:
    n = len(boxes)
    orients = np.broadcast_to(np.eye(3), (n, 1, 3, 3)) if orients is None else np.asarray(orients)
    poses = np.broadcast_to(np.eye(3), (n, 23, 3, 3)) if poses is None else np.asarray(poses)
    betas = np.zeros((n, 10)) if betas is None else np.asarray(betas)
    return {  # JSON as a label holds it: fresh nested lists, one per person
        "bbox_xyxy": [list(map(float, b)) for b in boxes],
        "pred_smpl_params": {"global_orient": orients.tolist(), "body_pose": poses.tolist(), "betas": betas.tolist()},
        "pred_cam": [list(map(float, c)) for c in cams],
        "score": [0.9 - 0.1 * i for i in range(n)],
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("smpl") / "SMPL_NEUTRAL.pkl"
    arrays = write_smpl_model(path)
    return load_smpl(str(path), option=OPTION), arrays


def test_person_box_grows_the_box_to_192_by_256_and_takes_the_larger_side() -> None:
    center, size = person_box([100, 50, 160, 250])  # 60 x 200, taller than 3:4: width grows to 150
    assert center.tolist() == [130.0, 150.0] and size == pytest.approx(200.0)
    center, size = person_box([0, 0, 300, 100])  # 300 x 100, wider: height grows to 400
    assert center.tolist() == [150.0, 50.0] and size == pytest.approx(400.0)
    assert person_box([0, 0, 60, 200], rescale_factor=2.0)[1] == pytest.approx(400.0)  # 120 x 400
    assert person_box([0, 0, 192, 256])[1] == pytest.approx(256.0)  # already 3:4
    assert person_box([5, 5, 5, 5])[1] == 0.0


def test_a_body_on_the_optical_axis_projects_to_the_image_centre() -> None:
    # the crop is centred in the image and its camera has no shift: the body origin lies on the optical axis
    f = full_image_focal((W, H))
    assert f == pytest.approx(5000 / 256 * 640)
    t = cam_crop_to_full(np.array([[0.5, 0.0, 0.0]]), np.array([[W / 2, H / 2]]), np.array([200.0]), (W, H), f)
    assert t[0] == pytest.approx([0.0, 0.0, 2 * 12500.0 / (200 * 0.5)])  # depth 2 f / (size * s) = 250
    uv = project(np.array([[[0.0, 0.0, 0.0], [0.1, -0.2, 0.0], [0.0, 0.0, 50.0]]]), t, f, (W, H))
    assert uv[0, 0] == pytest.approx([320.0, 240.0])
    assert uv[0, 1] == pytest.approx([320 + 12500 * 0.1 / 250, 240 - 12500 * 0.2 / 250])  # 5 px, -10 px
    assert uv[0, 2] == pytest.approx([320.0, 240.0])  # on the axis at any depth


def test_a_point_behind_the_camera_is_not_projected() -> None:
    f = full_image_focal((W, H))
    t = cam_crop_to_full(np.array([[-0.5, 0.0, 0.0]]), np.array([[100.0, 100.0]]), np.array([100.0]), (W, H), f)
    assert t[0, 2] < 0
    assert np.isnan(project(np.zeros((1, 2, 3)), t, f, (W, H))).all()


def test_smpl_joints_follow_the_rotation_matrices_and_betas(model) -> None:
    body, arrays = model
    assert body.parents == SMPL_PARENTS
    rest = arrays["J_regressor"] @ arrays["v_template"]
    people = _people([[0, 0, 10, 10]] * 3, [[1, 0, 0]] * 3)
    turn, bend = _rot_x(180), _rot_z(90)
    people["pred_smpl_params"]["global_orient"][1] = [turn.tolist()]
    people["pred_smpl_params"]["body_pose"][2][2] = bend.tolist()  # body_pose[2] turns joint 3 (spine1)
    betas = np.linspace(-1, 1, 10)
    people["pred_smpl_params"]["betas"][0] = betas.tolist()
    joints = body.joints(people["pred_smpl_params"])
    assert joints.shape == (3, 24, 3)
    shaped = arrays["J_regressor"] @ (arrays["v_template"] + arrays["shapedirs"] @ betas)
    np.testing.assert_allclose(joints[0], shaped, atol=1e-5)
    np.testing.assert_allclose(joints[1], rest[0] + (rest - rest[0]) @ turn.T, atol=1e-5)  # about the pelvis
    spine = [3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]  # joint 3 and everything below it
    expected = rest.copy()
    expected[spine] = rest[3] + (rest[spine] - rest[3]) @ bend.T
    np.testing.assert_allclose(joints[2], expected, atol=1e-5)


def test_people_land_where_the_crop_camera_puts_them(model) -> None:
    body, arrays = model
    rest = arrays["J_regressor"] @ arrays["v_template"]
    boxes, cams = [[100, 50, 200, 350], [400, 100, 520, 200]], [[0.8, 0.05, 0.1], [0.6, -0.1, 0.0]]
    uv = place_people(_people(boxes, cams), body, (W, H))
    assert uv.shape == (2, 24, 2)
    # person 0: box 100 x 300, crop side 300 centred at (150, 200); the pelvis (body origin) lands at
    # centre + (tx, ty) * side * s / 2, whatever the focal length
    assert uv[0, 0] == pytest.approx([150 + 0.05 * 300 * 0.8 / 2, 200 + 0.1 * 300 * 0.8 / 2])
    # every joint of person 1 (box 120 x 100: side 160, centre (460, 150)) through the full-image pinhole
    f, bs = 5000 / 256 * 640, 160 * 0.6
    tx, ty, tz = 2 * (460 - 320) / bs - 0.1, 2 * (150 - 240) / bs + 0.0, 2 * f / bs
    expected = np.stack([f * (rest[:, 0] + tx) / (rest[:, 2] + tz) + 320,
                         f * (rest[:, 1] + ty) / (rest[:, 2] + tz) + 240], axis=1)
    np.testing.assert_allclose(uv[1], expected, atol=1e-3)


def test_the_crop_the_teacher_recorded_places_the_person(model) -> None:
    """A label made with another rescale_factor records its crops (box_center, box_size): show uses them."""
    body, _ = model
    label = {**_people([[100, 50, 200, 350]], [[0.8, 0.05, 0.1]]), "box_center": [[150.0, 200.0]],
             "box_size": [750.0]}  # rescale_factor 2.5: a 750 px square instead of 300
    uv = place_people(label, body, (W, H))
    assert uv[0, 0] == pytest.approx([150 + 0.05 * 750 * 0.8 / 2, 200 + 0.1 * 750 * 0.8 / 2])
    assert place_people(label, body, (W, H), rescale_factor=2.5) == pytest.approx(uv, nan_ok=True)


def _panel(label, rgb, smpl):
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    desc = _painter("human_poses", label, {"rgb": rgb}, smpl=smpl)(ax)
    canvas.draw()
    return ax, np.asarray(canvas.buffer_rgba())[..., :3].astype(int), desc


def _is_color(pixels: np.ndarray, hex_color: str) -> np.ndarray:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(pixels - rgb).max(axis=-1) < 40


def test_the_panel_draws_the_skeleton_on_the_projected_joints(model) -> None:
    body, _ = model
    gray = np.full((H, W, 3), 128, np.uint8)
    label = _people([[100, 50, 200, 350]], [[0.8, 0.05, 0.1]])
    ax, pixels, desc = _panel(label, gray, body)
    assert desc == "1 person, SMPL joints"
    joints = place_people(label, body, (W, H))[0]
    red = _is_color(pixels, _BOX_COLORS[0])
    height = pixels.shape[0]
    for u, v in joints:
        x, y = ax.transData.transform((u, v))
        row, col = int(round(height - y)), int(round(x))
        assert red[row - 3:row + 4, col - 3:col + 4].any(), (u, v)
    # the joints (inside the box) hold more of the person's colour than the dashed box edges alone would
    x0, y1 = ax.transData.transform((105, 345))
    x1, y0 = ax.transData.transform((195, 55))
    inside = red[int(height - y0):int(height - y1), int(x0):int(x1)]
    assert inside.sum() > 50
    _, without, desc = _panel(label, gray, None)
    assert desc == "1 person, boxes only"
    assert _is_color(without, _BOX_COLORS[0])[int(height - y0):int(height - y1), int(x0):int(x1)].sum() == 0


def test_without_the_model_the_boxes_are_drawn_and_the_option_named() -> None:
    gray = np.full((H, W, 3), 128, np.uint8)
    label = _people([[100, 50, 200, 350], [400, 100, 520, 200]], [[0.8, 0, 0]] * 2)
    ax, pixels, desc = _panel(label, gray, None)
    assert desc == "2 people, boxes only"
    assert _is_color(pixels, _BOX_COLORS[0]).sum() > 100 and _is_color(pixels, _BOX_COLORS[1]).sum() > 100
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "person 0.90" in texts and "person 0.80" in texts
    assert "--option human_poses.smpl_model=PATH" in texts.replace("\n", " ")


def test_nobody_is_the_image_with_a_no_person_note(model) -> None:
    body, _ = model
    photo = np.zeros((H, W, 3), np.uint8)
    photo[:, :, 2] = 200
    ax, pixels, desc = _panel({}, photo, body)
    assert desc == "no person" and [t.get_text() for t in ax.texts] == ["no person"]
    assert (np.abs(pixels - [0, 0, 200]).max(axis=-1) < 5).mean() > 0.8  # the image is drawn


def test_a_malformed_label_is_a_panel_saying_why(model) -> None:
    body, _ = model
    label = _people([[0, 0, 10, 10]], [[1, 0, 0]])
    label["pred_cam"] = [[1, 0]]
    img = np.asarray(render_sample("k", {"rgb": np.zeros((20, 20, 3), np.uint8), "human_poses": label}, smpl=body))
    red = (img[..., 0] > 150) & (img[..., 1] < 60) & (img[..., 2] < 60)  # "cannot draw: ..." in red
    assert red.sum() > 20


def test_the_npz_form_and_a_model_folder_load_the_same_model(model, tmp_path) -> None:
    body, _ = model
    write_smpl_model(tmp_path / "SMPL_NEUTRAL.npz")
    label = _people([[100, 50, 200, 350]], [[0.8, 0.05, 0.1]])
    folder = load_smpl(str(tmp_path), option=OPTION)
    assert folder.path == str(tmp_path / "SMPL_NEUTRAL.npz")
    np.testing.assert_allclose(place_people(label, folder, (W, H)), place_people(label, body, (W, H)), atol=1e-3)


def _error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_smpl(str(path), option=OPTION)
    message = str(e.value)
    assert "\n" not in message and f"--option {OPTION}" in message
    return message


def test_a_bad_model_path_is_a_one_line_error_naming_the_option(tmp_path) -> None:
    assert "no such file" in _error(tmp_path / "missing.pkl")
    assert "holds no SMPL_NEUTRAL.pkl" in _error(tmp_path)
    (tmp_path / "notes.pkl").write_text("not a pickle")
    assert "not an SMPL body model" in _error(tmp_path / "notes.pkl")
    with open(tmp_path / "partial.pkl", "wb") as f:
        pickle.dump({"v_template": np.zeros((4, 3)), "f": np.zeros((1, 3), np.uint32)}, f)
    assert "no shapedirs, posedirs, J_regressor, weights, kintree_table" in _error(tmp_path / "partial.pkl")
    arrays = write_smpl_model(tmp_path / "good.npz")
    np.savez(tmp_path / "short.npz", **{**arrays, "J_regressor": arrays["J_regressor"][:17]})
    assert "J_regressor has shape (17, 40)" in _error(tmp_path / "short.npz")


def test_a_pickle_with_code_or_chumpy_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    assert "os.system" in _error(evil) and not marker.exists()
    chumpy = tmp_path / "v1.0.0.pkl"
    chumpy.write_bytes(b"\x80\x02cchumpy.ch\nCh\nq\x00)\x81q\x01.")
    assert "chumpy" in _error(chumpy)

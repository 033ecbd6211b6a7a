"""The LAION teachers (aesthetic, watermark): checkpoints written in the publishers' formats must give the
publishers' own forward (open_clip's encode_image + their MLP; timm's EfficientNet + their head)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

pytestmark = pytest.mark.filterwarnings("ignore:Mapping deprecated model name efficientnet_b3a")

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from omniforge import codecs  # noqa: E402
from omniforge.errors import ConfigError, SampleError, WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.labelers.base import file_sha256  # noqa: E402
from omniforge.labelers.laion import AESTHETIC_MLP_URL, AestheticLabeler, WatermarkLabeler  # noqa: E402
from omniforge.modalities import get_modality  # noqa: E402

# ViT-L-14 at random init is ~430M parameters: the test registers the same ViT-L/14 family (width 1024, patch 14,
# image 224, embedding 768) with two blocks as an open_clip model config.
SMALL_ARCH = "ViT-L-14-omniforge-test"
SMALL_CFG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 1024, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
# The tensors of the publisher's released sac+logos+ava1-l14-linearMSE.pth (read from the file itself): the MLP
# of improved-aesthetic-predictor's simple_inference.py, saved with torch.save(model.state_dict()).
PUBLISHED_MLP_SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}


def photos() -> list[Sample]:
    # astronaut is square (512x512), chelsea is landscape (300x451): the centre crop matters for the second
    return [Sample("astronaut", skimage_data.astronaut()), Sample("chelsea", skimage_data.chelsea())]


class PublisherMLP(nn.Module):
    """improved-aesthetic-predictor's MLP as its simple_inference.py lists it (its ReLUs commented out), without
    the pytorch_lightning training hooks: forward(x) = layers(x)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def publisher_normalized(a: np.ndarray) -> np.ndarray:
    """The publisher's `normalized`: L2 along the last axis, a zero norm left as 1."""
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, -1)


# -- aesthetic ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aesthetic_official(tmp_path_factory):
    """A small ViT-L/14-family open_clip model and the publisher's MLP at random init, saved as their publishers
    ship them, plus the reference scores: open_clip's encode_image, their normalization, their MLP."""
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{SMALL_ARCH}.json").write_text(json.dumps(SMALL_CFG))
    open_clip.add_model_config(cfg_dir / f"{SMALL_ARCH}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model, _, preprocess = open_clip.create_model_and_transforms(SMALL_ARCH)
        mlp = PublisherMLP(768)
        for k, layer in enumerate(m for m in mlp.layers if isinstance(m, nn.Linear)):
            # unit-variance outputs for a unit-norm embedding, where the default init would shrink them
            # about threefold per layer: the two photos' scores then differ visibly
            nn.init.normal_(layer.weight, std=1.0 if k == 0 else layer.in_features ** -0.5)
            nn.init.normal_(layer.bias, std=0.1)
        with torch.no_grad():
            mlp.layers[7].bias.fill_(5.0)  # scores around 5, as the real predictor's
    model.eval(), mlp.eval()
    folder = tmp_path_factory.mktemp("aesthetic")
    clip_path, mlp_path = folder / "open_clip_pytorch_model.bin", folder / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(model.state_dict(), clip_path)
    torch.save(mlp.state_dict(), mlp_path)

    x = torch.stack([preprocess(Image.fromarray(s.image).convert("RGB")) for s in photos()])
    with torch.no_grad():
        emb = publisher_normalized(model.encode_image(x).numpy())
        ref = mlp(torch.from_numpy(emb).float())[:, 0].numpy()
    return str(clip_path), str(mlp_path), ref


def _aesthetic(clip_path: str, mlp_path: str, **kwargs) -> AestheticLabeler:
    return AestheticLabeler(weights=clip_path, model_name=SMALL_ARCH, pretrained_tag=None, mlp_checkpoint=mlp_path,
                            **kwargs)


def test_aesthetic_mlp_checkpoint_has_the_published_layout(aesthetic_official):
    _, mlp_path, _ = aesthetic_official
    state = torch.load(mlp_path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == PUBLISHED_MLP_SHAPES
    from omniforge.labelers.laion import build_aesthetic_head

    assert {k: tuple(v.shape) for k, v in build_aesthetic_head(768).state_dict().items()} == PUBLISHED_MLP_SHAPES


def test_aesthetic_local_checkpoints_match_the_publishers_forward(aesthetic_official):
    clip_path, mlp_path, ref = aesthetic_official
    out = _aesthetic(clip_path, mlp_path).label(photos())
    assert [list(o) for o in out] == [["aesthetic_score"], ["aesthetic_score"]]
    scores = np.array([o["aesthetic_score"] for o in out])
    assert all(isinstance(o["aesthetic_score"], float) for o in out)
    np.testing.assert_allclose(scores, ref, atol=2e-4)
    assert abs(ref[0] - ref[1]) > 0.05  # the comparison is between two different scores
    # the label is a JSON number the metadata labeler can read back
    info = get_modality("aesthetic_score")
    assert info.ext == "json" and not info.tokenized
    assert codecs.decode("json", codecs.encode("json", out[0]["aesthetic_score"])) == out[0]["aesthetic_score"]


def test_aesthetic_batch_of_one_gives_the_same_score(aesthetic_official):
    clip_path, mlp_path, ref = aesthetic_official
    out = _aesthetic(clip_path, mlp_path).label(photos()[1:])
    assert abs(out[0]["aesthetic_score"] - ref[1]) < 2e-4


def test_aesthetic_bad_mlp_checkpoints_are_one_line_weights_errors(aesthetic_official, tmp_path):
    clip_path, _, _ = aesthetic_official
    other = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(3)}, other)
    narrow = tmp_path / "vit_b_32.pth"
    torch.save(PublisherMLP(512).state_dict(), narrow)  # an MLP for 512-d (ViT-B/32) embeddings
    cases = [(other, "is not a LAION aesthetic MLP state dict"), (narrow, "takes 512-d embeddings but"),
             (tmp_path / "missing.pth", "mlp_checkpoint .* not found; pass the publisher's")]
    for path, message in cases:
        with pytest.raises(WeightsError, match=message) as err:
            _aesthetic(clip_path, str(path))
        assert "\n" not in str(err.value)


def test_aesthetic_wrong_clip_checkpoint_is_a_weights_error(aesthetic_official, tmp_path):
    _, mlp_path, _ = aesthetic_official
    path = tmp_path / "other.bin"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="cannot load"):
        _aesthetic(str(path), mlp_path)


def test_aesthetic_mlp_download_failure_names_the_offline_option(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    clip_path = tmp_path / "clip.bin"
    clip_path.write_bytes(b"never read: the MLP is loaded first")
    with pytest.raises(WeightsError, match="cannot load mlp_checkpoint https://.*--option "
                                           "aesthetic.mlp_checkpoint=/path/to/it") as err:
        AestheticLabeler(weights=str(clip_path))
    assert "\n" not in str(err.value)
    assert AestheticLabeler.make_options().mlp_checkpoint == AESTHETIC_MLP_URL


def test_aesthetic_tiny_contract_and_determinism():
    a = create_labeler("aesthetic", weights="tiny").label(photos())
    b = AestheticLabeler(weights="tiny").label(photos())
    assert a == b and all(np.isfinite(o["aesthetic_score"]) for o in a)
    assert AestheticLabeler(weights="tiny").model["head"][0][0].in_features == 768  # the published MLP's shapes
    assert get_labeler_class("aesthetic").learned
    with pytest.raises(ConfigError, match="tiny uses a random MLP"):
        AestheticLabeler(weights="tiny", mlp_checkpoint="/some/mlp.pth")


def test_aesthetic_bad_image_is_a_sample_error():
    out = AestheticLabeler(weights="tiny").label([Sample("gray", skimage_data.camera()), photos()[1]])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"
    assert list(out[1]) == ["aesthetic_score"]


def test_aesthetic_fingerprint_follows_both_checkpoints(tmp_path):
    clip_a, mlp_a, mlp_b = tmp_path / "clip_a.bin", tmp_path / "mlp_a.pth", tmp_path / "mlp_b.pth"
    clip_a.write_bytes(b"clip a")
    mlp_a.write_bytes(b"mlp a")
    mlp_b.write_bytes(b"mlp b")
    by_url = AestheticLabeler.fingerprint(weights=str(clip_a))
    fa = AestheticLabeler.fingerprint(weights=str(clip_a), mlp_checkpoint=str(mlp_a))
    fb = AestheticLabeler.fingerprint(weights=str(clip_a), mlp_checkpoint=str(mlp_b))
    assert len({by_url, fa, fb}) == 3
    mlp_a.write_bytes(b"mlp a, retrained")  # the same path, other content: relabel
    file_sha256.cache_clear()
    assert AestheticLabeler.fingerprint(weights=str(clip_a), mlp_checkpoint=str(mlp_a)) != fa
    assert AestheticLabeler.identity(weights="tiny")["options"] == {
        "model_name": "ViT-L-14", "pretrained_tag": "openai", "mlp_checkpoint": AESTHETIC_MLP_URL}
    with pytest.raises(WeightsError):
        AestheticLabeler.fingerprint(weights=str(clip_a), mlp_checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="tiny uses a random MLP"):
        AestheticLabeler.fingerprint(weights="tiny", mlp_checkpoint=str(mlp_a))


# -- watermark ----------------------------------------------------------------------------------------------------

def publisher_watermark_model() -> nn.Module:
    """LAION-5B-WatermarkDetection's network as its inference.py builds it."""
    model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(in_features=1536, out_features=625), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(in_features=625, out_features=256), nn.ReLU(), nn.Linear(in_features=256, out_features=2))
    return model


PUBLISHER_PREPROCESSING = T.Compose([
    T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


@pytest.fixture(scope="module")
def watermark_official(tmp_path_factory):
    """The publisher's detector at random init with BatchNorm statistics set by one train-mode pass over the
    photos (a random network's eval-mode activations otherwise shrink to the same output for every image) and
    its last layer set so the photos' probabilities are about 0.18 and 0.82; saved as their example_use.py loads
    it, and the reference: their preprocessing, the network, softmax column 0."""
    x = torch.stack([PUBLISHER_PREPROCESSING(Image.fromarray(s.image).convert("RGB")) for s in photos()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = publisher_watermark_model()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
        last = model.classifier[5]
        with torch.no_grad():  # logit differences (watermark - clear) of +1.5 and -1.5 for the two photos
            last.bias.zero_()
            logits = model(x)
            diff = logits[:, 0] - logits[:, 1]
            last.weight.mul_(3.0 / (diff[0] - diff[1]).abs())
            last.bias[0] = -(diff[0] + diff[1]) * 3.0 / (diff[0] - diff[1]).abs() / 2
            ref = model(x).softmax(dim=1)[:, 0].numpy()
    path = tmp_path_factory.mktemp("watermark") / "watermark_model_v1.pt"
    torch.save(model.state_dict(), path)
    return str(path), ref


def test_watermark_local_checkpoint_matches_the_publishers_forward(watermark_official):
    path, ref = watermark_official
    out = create_labeler("watermark", weights=path).label(photos())
    assert [list(o) for o in out] == [["watermark_score"], ["watermark_score"]]
    scores = np.array([o["watermark_score"] for o in out])
    np.testing.assert_allclose(scores, ref, atol=2e-4)
    assert ((0.02 < ref) & (ref < 0.98)).all() and abs(ref[0] - ref[1]) > 0.05  # two different, unsaturated scores
    info = get_modality("watermark_score")
    assert info.ext == "json" and not info.tokenized


def test_watermark_checkpoint_in_the_inference_script_layout(watermark_official, tmp_path):
    # their inference.py reads torch.load('./model.pt')['weights']
    path, ref = watermark_official
    wrapped = tmp_path / "model.pt"
    torch.save({"weights": torch.load(path, weights_only=True)}, wrapped)
    out = WatermarkLabeler(weights=str(wrapped)).label(photos()[1:])
    assert abs(out[0]["watermark_score"] - ref[1]) < 2e-4


def test_watermark_wrong_checkpoints_are_one_line_weights_errors(tmp_path):
    plain = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)  # timm's head, not theirs
    cases = {"foo.pt": {"foo": torch.zeros(3)}, "timm_head.pt": plain.state_dict(), "list.pt": [1, 2]}
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsError, match="watermark: .*watermark_model_v1.pt") as err:
            WatermarkLabeler(weights=str(tmp_path / name))
        assert "\n" not in str(err.value)


def test_watermark_pretrained_download_failure_is_a_weights_error(monkeypatch):
    calls = []

    def offline(url, **kwargs):
        calls.append(url)
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="--weights watermark=/path/to/watermark_model_v1.pt.*--weights tiny"):
        WatermarkLabeler(weights="pretrained")
    assert calls == ["https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"]


def test_watermark_tiny_contract_and_determinism():
    a = create_labeler("watermark", weights="tiny").label(photos())
    b = WatermarkLabeler(weights="tiny").label(photos())
    assert a == b
    scores = [o["watermark_score"] for o in a]
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[0] != scores[1]  # the random network sees the image
    head = WatermarkLabeler(weights="tiny").model.classifier
    assert [tuple(m.weight.shape) for m in head if isinstance(m, nn.Linear)][1:] == [(256, 625), (2, 256)]


def test_watermark_bad_image_is_a_sample_error():
    out = WatermarkLabeler(weights="tiny").label([Sample("gray", skimage_data.camera()), photos()[1]])
    assert isinstance(out[0], SampleError) and out[0].error_type == "bad_image"
    assert list(out[1]) == ["watermark_score"]


def test_watermark_fingerprints(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"checkpoint a")
    b.write_bytes(b"checkpoint b")
    assert len({WatermarkLabeler.fingerprint(weights=w) for w in (str(a), str(b), "tiny", "pretrained")}) == 4
    with pytest.raises(WeightsError):
        WatermarkLabeler.fingerprint(weights=str(tmp_path / "missing.pt"))

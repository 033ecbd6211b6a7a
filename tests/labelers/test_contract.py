"""One contract test for every registered labeler, on its tiny variant and real photos."""

import numpy as np
import pytest
from skimage import data

from omniforge import codecs
from omniforge.errors import SampleError
from omniforge.labelers import Sample, create_labeler, get_labeler_class, labeler_for_modality, list_labelers
from omniforge.modalities import MODALITIES
from omniforge.pipeline.label import _encode_checked


def _samples():
    return [
        Sample(key="astronaut", image=np.ascontiguousarray(data.astronaut()), caption="an astronaut"),
        Sample(key="tall", image=np.ascontiguousarray(data.chelsea()[:, :40]), caption="a strip of a cat"),
        Sample(key="tiny", image=np.full((1, 1, 3), 200, np.uint8), caption=None),
    ]


def _with_inputs(cls, samples):
    """Give derived labelers what the pipeline would: their inputs from the tiny teachers that write them,
    encoded and decoded as in the shards. Samples whose required input failed are left out, as in a job."""
    labelable = {m for n in list_labelers() for m in get_labeler_class(n).modalities}
    for m in (*cls.requires, *[m for m in cls.optional_inputs if m in labelable]):
        producer = labeler_for_modality(m)
        results = create_labeler(producer.name, weights="tiny", modalities=(m,)).label(samples)
        for sample, res in zip(samples, results):
            if not isinstance(res, SampleError):
                sample.inputs[m] = codecs.decode(MODALITIES[m].ext, _encode_checked(MODALITIES[m], res[m]))
    return [s for s in samples if all(m in s.inputs for m in cls.requires)]


@pytest.mark.parametrize("name", list_labelers())
def test_labeler_contract(name):
    cls = get_labeler_class(name)
    labeler = create_labeler(name, weights="tiny")
    samples = _with_inputs(cls, _samples())
    results = labeler.label(samples)
    assert len(results) == len(samples)
    n_ok = 0
    arrays: dict[str, list[np.ndarray]] = {}
    for sample, res in zip(samples, results):
        if isinstance(res, SampleError):
            assert res.error_type and res.message
            continue
        n_ok += 1
        assert set(res) == set(cls.modalities)
        for m, value in res.items():
            info = MODALITIES[m]
            assert _encode_checked(info, value)  # shape, finiteness and encodability
            if info.ext == "npy":
                arr = np.asarray(value)
                assert arr.dtype == np.float16 and arr.shape == info.shape
                assert np.isfinite(arr.astype(np.float32)).all()
                arrays.setdefault(m, []).append(arr.astype(np.float32))
            if m in ("rgb", "canny_edge"):
                assert np.asarray(value).shape[:2] == sample.image.shape[:2]
    assert n_ok >= 2, f"{name} labeled fewer than 2 of 3 real images"
    for m, arrs in arrays.items():  # features must depend on the image
        assert not all(np.array_equal(arrs[0], a) for a in arrs[1:]), f"{m} is the same for different images"
    # the fingerprint is stable and depends on the weights
    assert cls.fingerprint(weights="tiny") == cls.fingerprint(weights="tiny")


def test_learned_labelers_fingerprint_their_weights(tmp_path):
    for name in list_labelers():
        cls = get_labeler_class(name)
        if not cls.learned:
            continue
        ckpt = tmp_path / f"{name}.bin"
        ckpt.write_bytes(b"not really weights")
        assert cls.fingerprint(weights="tiny") != cls.fingerprint(weights=str(ckpt))

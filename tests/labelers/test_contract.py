"""One contract test for every registered labeler, on its tiny variant and real photos, and one for every
labeler's options class; the registry's rules for several teachers of one modality."""

import dataclasses
import json

import numpy as np
import pytest
from skimage import data

from omniforge import _plugins, codecs
from omniforge.errors import ConfigError, SampleError
from omniforge.labelers import (Labeler, LabelerOptions, Sample, _registry, create_labeler, get_labeler_class,
                                labeler_for_modality, labelers_for_modality, list_labelers, option)
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
            if info.embedded:  # ml-4m's npz: float16 emb (n, L, D) and its bool mask_valid (n, L)
                assert codecs.embedding_problem(value, info.shape) is None
                assert codecs.embedding_problem(codecs.decode("npz", codecs.encode("npz", value)), info.shape) is None
                arrays.setdefault(m, []).append(value["emb"].astype(np.float32))
            if m in ("rgb", "canny_edge"):
                assert np.asarray(value).shape[:2] == sample.image.shape[:2]
    assert n_ok >= 2, f"{name} labeled fewer than 2 of 3 real images"
    for m, arrs in arrays.items():  # features must depend on the image (embeddings: on the caption)
        assert not all(np.array_equal(arrs[0], a) for a in arrs[1:]), f"{m} is the same for different images"
    # the fingerprint is stable and depends on the weights
    assert cls.fingerprint(weights="tiny") == cls.fingerprint(weights="tiny")


def test_learned_labelers_fingerprint_their_weights(tmp_path):
    for name in list_labelers():
        cls = get_labeler_class(name)
        if not cls.learned:
            continue
        ckpt = tmp_path / f"{name}.bin"
        if getattr(cls, "checkpoint_is_dir", False):  # a save_pretrained folder, identified by its files
            ckpt.mkdir()
            (ckpt / "config.json").write_bytes(b"not really a config")
        else:
            ckpt.write_bytes(b"not really weights")
        assert cls.fingerprint(weights="tiny") != cls.fingerprint(weights=str(ckpt))


# -- options: every labeler declares its options once, in a frozen dataclass ----------------------------------

@pytest.mark.parametrize("name", list_labelers())
def test_labeler_options_contract(name):
    cls = get_labeler_class(name)
    options = cls.options_type()
    if options is None:  # a plugin written before typed options: its identity holds its options as given
        assert json.dumps(cls.identity(weights="tiny"))
        return
    defaults = cls.make_options()
    assert isinstance(defaults, options) and defaults == options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.x = 1
    identity = cls.identity(weights="tiny")
    assert json.loads(json.dumps(identity)) == identity  # JSON without a default= fallback
    assert identity["version"] == cls.version and isinstance(identity["options"], dict)
    docs = options.describe()
    assert [d.name for d in docs] == list(options.names())
    for d in docs:
        assert d.help and d.type and d.valid, f"{name}.{d.name} is not documented"
        assert json.dumps(d.default) is not None
    with pytest.raises(ConfigError) as err:
        cls.make_options(not_an_option=1)
    message = str(err.value)
    assert message.startswith(f"{name}: unknown option not_an_option") and "\n" not in message
    assert all(n in message for n in options.names()) if options.names() else "takes no options" in message
    if cls.learned:  # learned teachers fingerprint every option: giving the defaults changes nothing
        assert cls.fingerprint(weights="tiny", **defaults.to_dict()) == cls.fingerprint(weights="tiny")
    for d in docs:  # a value of the wrong type is refused, naming the option and its valid values
        bad = [] if d.type.startswith("str") else "not a number"
        with pytest.raises(ConfigError, match=f"^{name}: option {d.name}=.* expected"):
            cls.make_options(**{d.name: bad})


def test_every_labelable_modality_has_a_default_teacher():
    labelable = {m for n in list_labelers() for m in get_labeler_class(n).modalities}
    for m in labelable:
        teachers = labelers_for_modality(m)
        assert teachers and teachers[0] is labeler_for_modality(m)
        assert [c for c in teachers if m in c.default_for] in ([], [teachers[0]])
    assert [c.name for c in labelers_for_modality("depth")] == ["depth", "omnidata"]


@pytest.fixture
def registry(monkeypatch):
    """A copy of the labeler registry that the test may change."""
    monkeypatch.setattr(_registry, "_LABELERS", dict(_registry._LABELERS))
    monkeypatch.setattr(_registry, "_DEFAULTS", dict(_registry._DEFAULTS))
    return _registry


def test_a_second_teacher_of_a_modality_is_chosen_only_by_name(registry):
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class EdgeOptions(LabelerOptions):
        level: int = option(1, "how many edges", ge=0)

    class OtherEdges(Labeler):
        """canny_edge: all zeros (a test teacher)."""

        name = "other_edges"
        modalities = ("canny_edge",)
        options_class = EdgeOptions

    registry.register_labeler(OtherEdges)
    assert labeler_for_modality("canny_edge").name == "canny_edge"  # the built-in stays the default
    assert labeler_for_modality("canny_edge", teacher="other_edges") is OtherEdges
    assert [c.name for c in labelers_for_modality("canny_edge")] == ["canny_edge", "other_edges"]
    assert OtherEdges(level=3).options.level == 3
    with pytest.raises(ConfigError, match="other_edges: option level=-1 is not valid: expected an integer >= 0"):
        OtherEdges(level=-1)


def test_two_teachers_claiming_one_default_is_an_error_at_registration(registry):
    class Claimer(Labeler):
        name = "claims_depth"
        modalities = default_for = ("depth",)

    with pytest.raises(ConfigError, match="'depth' .* and 'claims_depth' .* both claim to be the default teacher of "
                                          "'depth'"):
        registry.register_labeler(Claimer)
    assert "claims_depth" not in registry.list_labelers()  # nothing was registered
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register_labeler(type("Clash", (Labeler,), {"name": "rgb", "modalities": ("rgb",)}))


def test_several_teachers_without_a_default_must_be_chosen(registry):
    from omniforge.modalities import MODALITIES, ModalityInfo

    info = ModalityInfo(name="test_only_modality", ext="npy", description="npy float16 (1,) a test value",
                        token_modality="test_only_modality", num_tokens=0, vocab_size=None, tokenizer="none",
                        shape=(1,))
    for teacher in ("first_writer", "second_writer"):
        registry.register_labeler(type(teacher, (Labeler,), {"name": teacher, "modalities": (info.name,),
                                                             "new_modalities": (info,)}))
    try:
        with pytest.raises(ConfigError, match="several teachers .*first_writer, second_writer.*--teacher "
                                              "test_only_modality=NAME"):
            labeler_for_modality(info.name)
        assert labeler_for_modality(info.name, teacher="second_writer").name == "second_writer"
    finally:
        MODALITIES.pop(info.name, None)


def test_a_labeler_written_before_typed_options_keeps_working():
    """tests/derived_labeler.py and the example plugin declare no options class (today's contract)."""
    import derived_labeler  # noqa: F401 - registers palette_size

    cls = get_labeler_class("palette_size")
    assert cls.options_class is None and cls.options_type() is LabelerOptions  # no constructor of its own
    assert cls.identity(weights="tiny")["options"] == {}

    class Untyped(Labeler):  # options taken by its own constructor, as before typed options
        name = "untyped"
        modalities = ("rgb",)

        def __init__(self, *, size: int = 2, **kwargs):
            super().__init__(**kwargs)
            self.size = size

    assert Untyped.options_type() is None and Untyped(size=5).size == 5
    assert Untyped.identity(weights="tiny", size=5)["options"] == {"size": 5}
    with pytest.raises(ConfigError, match="unknown options colour"):
        Untyped(colour=1)


def test_an_entry_point_plugin_never_replaces_a_builtin_teacher(registry, monkeypatch):
    class PluginEdges(Labeler):
        """canny_edge from a plugin (a test teacher)."""

        name = "plugin_edges"
        modalities = ("canny_edge",)

    class PluginRgb(Labeler):
        name = "rgb"  # a built-in teacher's name
        modalities = ("rgb",)

    class EntryPoint:
        def __init__(self, cls):
            self.cls = cls

        def load(self):
            return self.cls

    def entry_points(group):
        assert group == registry.ENTRY_POINT_GROUP
        return plugins

    monkeypatch.setattr(_plugins.importlib.metadata, "entry_points", entry_points)
    plugins = [EntryPoint(PluginEdges)]
    monkeypatch.setattr(_plugins, "_loaded", set())
    assert "plugin_edges" in registry.list_labelers()
    assert labeler_for_modality("canny_edge").name == "canny_edge"  # one more teacher, not a replacement
    assert labeler_for_modality("canny_edge", teacher="plugin_edges") is PluginEdges
    plugins = [EntryPoint(PluginRgb)]
    monkeypatch.setattr(_plugins, "_loaded", set())
    with pytest.raises(ConfigError, match="labeler name 'rgb' is registered twice"):
        registry.list_labelers()
    assert get_labeler_class("rgb").__module__ == "omniforge.labelers.classical"

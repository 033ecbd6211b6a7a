"""omniforge's serializations equal ml-4m's own, token id for token id.

The fixtures (tests/fixtures/ml4m, made by its make_fixtures.py) hold raw labels omniforge's labelers wrote
and what ml-4m's own transforms and text tokenizer made of them, crop by crop and draw by draw. omniforge
reads the same labels (through its own shard writer and loader), serializes them with the draws ml-4m made,
and tokenizes with ml-4m's vocabulary file given to omniforge's TextTokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from omniforge import codecs, shards
from omniforge.modalities import get_modality
from omniforge.tokenize import text
from omniforge.tokenize.text import Crop, TextTokenizer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ml4m"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
CASES = [(key, i) for key in sorted(EXPECTED) for i in range(len(EXPECTED[key]["crops"]))]


@pytest.fixture(scope="module")
def ml4m_vocab(tmp_path_factory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("ml4m") / "text_tokenizer_4m_wordpiece_30k.json"
    path.write_bytes(gzip.decompress((FIXTURES / "text_tokenizer_4m_wordpiece_30k.json.gz").read_bytes()))
    return TextTokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, dict]:
    """The fixture labels written to label shards by omniforge's writer and read back by its loader."""
    root = str(tmp_path_factory.mktemp("corpus"))
    out: dict[str, dict] = {key: {} for key in LABELS}
    for m in ("det", "metadata", "color_palette", "caption"):
        ext = get_modality(m).ext
        uri = shards.tar_uri(root, m, 0)
        shards.write_tar(uri, ((f"{k}.{ext}", codecs.encode(ext, LABELS[k][m])) for k in sorted(LABELS)))
        for name, data in shards.iter_tar(uri):
            key = name.split(".", 1)[0]
            out[key][m] = codecs.decode(ext, data)
            assert out[key][m] == LABELS[key][m]  # the round trip is exact
    return out


def _crop(key: str, i: int) -> Crop:
    h, w = LABELS[key]["size"]
    return Crop(row=np.asarray(EXPECTED[key]["crops"][i]["crop"], np.int32), height=h, width=w, key=key, index=i)


def test_fixtures_exercise_what_they_should():
    dets = [c["det"] for e in EXPECTED.values() for c in e["crops"]]
    assert any(dets) and not all(dets)  # some crops keep boxes, some keep none
    scores = [i["score"] for lab in LABELS.values() for i in lab["det"]["instances"]]
    assert min(scores) < text.DET_MIN_SCORE < max(scores)
    ks = {d["palette_k"] for e in EXPECTED.values() for c in e["crops"] for d in c["draws"]}
    assert len(ks) >= 3
    assert any(c["crop"][4] for e in EXPECTED.values() for c in e["crops"])  # a flipped crop


@pytest.mark.parametrize("key,i", CASES)
def test_det_matches_ml4m(key, i, stored, ml4m_vocab):
    want = EXPECTED[key]["crops"][i]
    units = text.det_crop_units(stored[key]["det"], _crop(key, i))
    assert " ".join(units) == want["det"]
    assert ml4m_vocab.encode(" ".join(units)) == want["det_ids"]


@pytest.mark.parametrize("key,i", CASES)
def test_palette_and_metadata_draws_match_ml4m(key, i, stored, ml4m_vocab):
    for draw in EXPECTED[key]["crops"][i]["draws"]:
        palette = text.palette_units(text.palettes_of(stored[key]["color_palette"])[draw["palette_k"]])
        assert palette == [draw["palette"]]
        assert ml4m_vocab.encode(palette[0]) == draw["palette_ids"]
        chunks = text.metadata_units(stored[key]["metadata"], draw["metadata_order"])
        assert chunks == draw["metadata_chunks"]
        assert [ml4m_vocab.encode(c) for c in chunks] == draw["metadata_ids"]


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_caption_matches_ml4m(key, stored, ml4m_vocab):
    units = text.text_units(stored[key]["caption"], _crop(key, 0))
    assert units == [EXPECTED[key]["caption"]]
    assert ml4m_vocab.encode(units[0]) == EXPECTED[key]["caption_ids"]


def test_per_sample_draws_cover_what_ml4m_draws(stored):
    """With the trainer's generator the serializers draw k in 1..7 and every metadata order, as ml-4m does."""
    key = "chelsea"
    rng = np.random.default_rng(0)
    ks, orders = set(), set()
    for _ in range(200):
        crop = Crop(row=_crop(key, 0).row, height=300, width=451, key=key, rng=rng)
        ks.add(int(text.palette_crop_units(stored[key]["color_palette"], crop)[0].split()[0][3:]))
        orders.add(tuple(text.metadata_crop_units(stored[key]["metadata"], crop)))
    assert ks == set(range(1, 8))
    assert len(orders) > 150  # 12 fields: almost every draw a new order
    assert all(sorted(o) == sorted(text.metadata_units(stored[key]["metadata"])) for o in orders)
    # the tokenize job's frozen draw: the same for the same key and crop, in every process
    frozen = [text.metadata_crop_units(stored[key]["metadata"], _crop(key, 0)) for _ in range(3)]
    assert frozen[0] == frozen[1] == frozen[2]


def test_metadata_budget_cuts_are_counted(ml4m_vocab):
    """21 fields need 42 tokens: the 40-token budget cuts two chunks, and says so."""
    every = {name: 1 for name in text.METADATA_FIELD_IDS}
    units = text.metadata_units(every)
    assert len(units) == 21
    ids, cut = ml4m_vocab.pack(units, get_modality("metadata").num_tokens)
    assert cut == 2
    kept = ml4m_vocab.decode(ids).split()
    assert len(kept) == 38 and ids[38] == ml4m_vocab.eos_id
    assert ml4m_vocab.pack(units[:19], 40)[1] == 0


def _sam_instances(key: str, i: int) -> list[tuple[np.ndarray, list[int]]]:
    crop = LABELS[key]["sam_ml4m"][i]
    return [(np.asarray(polygons[0], np.int32), tokens) for polygons, tokens in zip(crop["points"], crop["token_ids"])]


def _ml4m_draws(parsed: list[dict], instances: list) -> tuple[list, list]:
    """The query points ml-4m drew (in its shuffled order) and, per point, the order it gave the instances
    holding the point, as indices into them in instance order."""
    boxes = [text.sam_bbox(contour) for contour, _ in instances]
    points, orders = [], []
    for p in parsed:
        listed = []
        for inst in p["instances"]:
            match = [j for j, (b, (_, t)) in enumerate(zip(boxes, instances))
                     if b == inst["bbox"] and list(t) == inst["tokens"] and j not in listed]
            listed.append(match[0])
        points.append(p["point"])
        orders.append([sorted(listed).index(j) for j in listed])
    return points, orders


@pytest.mark.parametrize("key,i", CASES)
def test_sam_instance_matches_ml4m(key, i, ml4m_vocab):
    """ml-4m's SAMInstanceTokTransform on the files `export --dialect ml4m` writes, and omniforge's serializer on
    the same instances with the same draws (query points, their order, each point's instance order)."""
    instances = _sam_instances(key, i)
    assert instances
    hits = 0
    for draw in EXPECTED[key]["crops"][i]["draws"]:
        parsed = text.parse_sam(draw["sam"])
        points, orders = _ml4m_draws(parsed, instances)
        units = text.sam_units(points, instances, orders)
        assert " ".join(units) == draw["sam"]
        assert ml4m_vocab.encode(" ".join(units)) == draw["sam_ids"]
        hits += sum(len(p["instances"]) for p in parsed)
    assert hits > 0

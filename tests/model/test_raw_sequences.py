"""The trainer's raw sequence folders: labels serialized per training sample, new draws every epoch, exact resume.

The corpus is the ml-4m fixture's (tests/fixtures/ml4m): three photos with the det, metadata, color_palette
and caption labels omniforge wrote, their crop_settings, and ml-4m's own WordPiece vocabulary as the text
tokenizer; sam_instance and human_poses labels made here (rectangles; synthetic SMPL people, nobody in one).
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from sam_labels import rectangles, sam_label
from smpl_labels import random_boxes, smpl_label

from omniforge import codecs, shards, storage
from omniforge.errors import ConfigError
from omniforge.model.data import DataConfig, TokenShardDataset, make_loader
from omniforge.model.masking import Masker, MaskingConfig
from omniforge.model.specs import specs_for
from omniforge.pipeline.formats import LegacyFormatError
from omniforge.tokenize.kinds import kind_for
from omniforge.tokenize.text import METADATA_FIELD_IDS, TextTokenizer

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ml4m"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
RAW = ("color_palette", "metadata", "det", "caption", "sam_instance", "human_poses")
PEOPLE = {"astronaut": 2, "chelsea": 1, "coffee": 0}
EVERY_FIELD = "coffee"  # its metadata gets all 21 fields: 42 tokens, over the 40-token budget


def _write(root: str, folder: str, members: dict[str, bytes], fingerprint: str = "fp") -> None:
    keys = sorted(members)
    shards.write_tar(shards.tar_uri(root, folder, 0), [(f"{k}.{_EXT[folder]}", members[k]) for k in keys])
    shards.write_status(shards.status_uri(root, folder, 0), [
        {"key": k, "ok": True, "error_type": None, "error_message": None, "fingerprint": fingerprint,
         "seconds": 0.0} for k in keys])


_EXT = {"rgb": "jpg", "crop_settings": "npy", "det": "json", "metadata": "json", "color_palette": "json",
        "caption": "txt", "sam_instance": "json", "human_poses": "json"}


def _sam_label(image: np.ndarray) -> dict:
    h, w = image.shape[:2]
    return sam_label(rectangles(h, w, [(0, h // 2, 0, w // 2), (h // 4, h, w // 4, w)]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    import pyarrow as pa

    root = str(tmp_path_factory.mktemp("raw"))
    shards.write_parquet(shards.manifest_uri(root), pa.table({"key": sorted(LABELS), "shard": [0] * len(LABELS)}))
    _write(root, "rgb", {k: codecs.encode("jpg", np.ascontiguousarray(getattr(data, k)())) for k in LABELS})
    _write(root, "crop_settings", {k: codecs.encode("npy", np.asarray(v["crops"], np.int32))
                                   for k, v in LABELS.items()})
    labels = {m: {k: v[m] for k, v in LABELS.items()} for m in RAW if m not in ("sam_instance", "human_poses")}
    labels["sam_instance"] = {k: _sam_label(getattr(data, k)()) for k in LABELS}
    rng = np.random.default_rng(3)
    labels["human_poses"] = {k: smpl_label(rng, random_boxes(rng, PEOPLE[k], *getattr(data, k)().shape[:2]))
                             for k in LABELS}
    labels["metadata"][EVERY_FIELD] = {name: 1 for name in METADATA_FIELD_IDS}
    for m in RAW:
        _write(root, m, {k: codecs.encode(_EXT[m], v) for k, v in labels[m].items()})
    tokenizers = str(tmp_path_factory.mktemp("tokenizers"))
    storage.write_bytes(storage.join(tokenizers, "text", "tokenizer.json"), gzip.decompress(
        (FIXTURES / "text_tokenizer_4m_wordpiece_30k.json.gz").read_bytes()))
    torch.manual_seed(0)
    for m in ("sam_instance", "human_poses"):
        kind = kind_for(m)
        kind.save(kind.build(kind.config("tiny")), storage.join(tokenizers, kind.artifact.folder))
    return root, tokenizers


def _masker(tokenizers: str) -> tuple[Masker, TextTokenizer]:
    tok = TextTokenizer.from_file(storage.join(tokenizers, "text", "tokenizer.json"))
    specs = specs_for(list(RAW), tok.vocab_size)
    cfg = MaskingConfig.uniform(list(RAW), input_tokens=64, target_tokens=64)
    return Masker(cfg, specs, sentinel_ids=tok.sentinel_ids, pad_id=tok.pad_id, eos_id=tok.eos_id), tok


def _cfg(corpus, **kw) -> DataConfig:
    root, tokenizers = corpus
    return DataConfig(root=root, folders=RAW, **{"tokenizers": tokenizers, "batch_size": 3, "keys": True, **kw})


def _palette_k(batch, i: int, tok: TextTokenizer) -> int | None:
    """The palette size k row i's palette says (its "v1=<k>" token, in the input or the target), or None when
    the masker gave the palette no tokens in this row."""
    sizes = {tok.token_to_id(f"v1={k}"): k for k in range(1, 8)}
    return next((sizes[t] for t in batch["color_palette"]["tensor"][i].tolist() if t in sizes), None)


def _sam_points(batch, i: int, tok: TextTokenizer) -> frozenset:
    """The query points (y, x) in row i's sam_instance tokens: a "point" token, then v0=<y> v1=<x>."""
    point = tok.token_to_id("point")
    value = {tok.token_to_id(f"v{k}={v}"): v for k in (0, 1) for v in range(224)}
    ids = batch["sam_instance"]["tensor"][i].tolist()
    return frozenset((value[a], value[b]) for p, a, b in zip(ids, ids[1:], ids[2:])
                     if p == point and a in value and b in value)


def _first_groups(batch, i: int, tok: TextTokenizer) -> set:
    """The SMPL group words that follow a person's box (its v3= token) in row i's human_poses tokens: a person's
    first group, which only changes when the group order is drawn again."""
    groups = {tok.token_to_id(w) for w in ("pose", "global", "camera", "shape")}
    ymax = {tok.token_to_id(f"v3={v}") for v in range(1000)}
    ids = batch["human_poses"]["tensor"][i].tolist()
    return {b for a, b in zip(ids, ids[1:]) if b in groups and a in ymax}


def test_every_epoch_draws_again_and_the_draws_cover_ml4ms(corpus):
    torch.set_num_threads(1)
    masker, tok = _masker(corpus[1])
    ks, points, firsts = defaultdict(list), defaultdict(list), defaultdict(set)
    humans, nobody = defaultdict(int), defaultdict(int)
    for batch in make_loader(_cfg(corpus, epochs=16), masker, rank=0, world_size=1):
        for i, key in enumerate(batch["__key__"]):
            k = _palette_k(batch, i, tok)
            if k is not None:
                ks[key].append(k)
            p = _sam_points(batch, i, tok)
            if p:
                points[key].append(p)
            firsts[key] |= _first_groups(batch, i, tok)
            poses = batch["human_poses"]["tensor"][i].tolist()
            humans[key] += poses.count(tok.token_to_id("human"))
            nobody[key] += poses.count(tok.token_to_id("none"))
    assert sorted(ks) == sorted(LABELS) and all(len(v) >= 3 for v in ks.values())
    assert all(len(set(v)) > 1 for v in ks.values())  # the same sample, other palette sizes in other epochs
    assert sorted(points) == sorted(LABELS) and all(len(set(v)) == len(v) >= 3 for v in points.values())
    # the SMPL group order is drawn per sample: a fixed order would start each person with one group in every epoch
    assert all(len(firsts[k]) > n for k, n in PEOPLE.items() if n) and not firsts["coffee"]
    assert humans["coffee"] == 0 and nobody["coffee"] > 0 and humans["astronaut"] > 0 and humans["chelsea"] > 0


def test_budget_cuts_are_counted_per_sample(corpus):
    masker, _ = _masker(corpus[1])
    batch = next(iter(make_loader(_cfg(corpus, epochs=1), masker, rank=0, world_size=1)))
    cuts = dict(zip(batch["__key__"], batch["__cut__"]["metadata"].tolist()))
    assert cuts == {k: (2 if k == EVERY_FIELD else 0) for k in LABELS}  # 21 fields: two chunks do not fit
    assert batch["__cut__"]["color_palette"].sum() == 0


def test_resume_is_exact(corpus):
    masker, _ = _masker(corpus[1])
    cfg = _cfg(corpus, epochs=4, batch_size=2)
    full = list(make_loader(cfg, masker, rank=0, world_size=1))
    first = make_loader(cfg, masker, rank=0, world_size=1)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    resumed = make_loader(cfg, masker, rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        assert a["__key__"] == b["__key__"]
        for m in RAW:
            for field in ("tensor", "input_mask", "target_mask"):
                assert torch.equal(a[m][field], b[m][field]), (m, field)


def test_raw_folders_need_the_text_tokenizer_and_refuse_old_formats(corpus, tmp_path):
    masker, _ = _masker(corpus[1])
    with pytest.raises(ConfigError, match="--tokenizers"):
        TokenShardDataset(_cfg(corpus, tokenizers=None), masker, rank=0, world_size=1)
    root = str(tmp_path)
    for folder in ("rgb", "crop_settings", *RAW):
        for uri in (shards.tar_uri(corpus[0], folder, 0), shards.status_uri(corpus[0], folder, 0)):
            storage.write_bytes(uri.replace(corpus[0], root, 1), storage.read_bytes(uri))
    storage.write_bytes(storage.join(root, "manifest/runs/old.json"), json.dumps(
        {"job": "label", "teachers": {"color_palette": {"fingerprint": "fp", "modalities": ["color_palette"]}}}
    ).encode())  # omniforge 0.1 recorded no formats: its palettes are one list of colours
    with pytest.raises(LegacyFormatError, match="--modalities color_palette"):
        TokenShardDataset(_cfg((root, corpus[1])), masker, rank=0, world_size=1)


def test_the_trainer_trains_on_raw_folders_and_logs_the_cuts(corpus, tmp_path):
    from omniforge.model.train import main

    torch.set_num_threads(1)
    root, tokenizers = corpus
    out = tmp_path / "run"
    rc = main(["--config", "tiny", "--data", root, "--modalities", ",".join(RAW), "--tokenizers", tokenizers,
               "--out", str(out), "--steps", "3", "--batch-size", "3", "--input-tokens", "48",
               "--target-tokens", "48", "--device", "cpu", "--no-progress"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(e["loss"]) for e in log)
    assert all(set(e["budget_cuts"]) == set(RAW) for e in log)
    assert sum(e["budget_cuts"]["metadata"] for e in log) == 2 * 3  # every batch holds the 21-field sample
    assert list((out / "tb").iterdir())  # TensorBoard gets them too, one scalar per folder

    # sampling reads a raw input folder as the tokenize job would have frozen it (crop 0)
    from omniforge.jobs.cli import main as cli_main

    samples = tmp_path / "samples"
    assert cli_main(["sample", "--checkpoint", str(out), "--input", root, "--key", "chelsea", "--from",
                     "caption,color_palette,human_poses", "--to", "det", "--out", str(samples), "--tokenizers",
                     tokenizers, "--device", "cpu"]) == 0
    assert (samples / "chelsea" / "det.npy").exists() and (samples / "chelsea" / "sample.png").exists()
    # a human_poses input (drawn in sample.png above) is decoded back to people by the pose tokenizer, not as text
    from omniforge.model.sample import decode_output, read_input
    from omniforge.schemas import check_human_poses

    tok = TextTokenizer.from_file(storage.join(tokenizers, "text", "tokenizer.json"))
    spec = specs_for(["human_poses"], tok.vocab_size)["human_poses"]
    people = decode_output("human_poses", read_input(root, spec, "chelsea", tokenizers), spec, tokenizers, tok)
    check_human_poses(people)
    assert len(people["bbox_xyxy"]) == PEOPLE["chelsea"]

"""The token-shard loader: key coverage across ranks and workers, crops, missing modalities, exact resume."""

from collections import Counter

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError, CorpusError
from omniforge.model.data import DataConfig, TokenShardDataset, make_loader, parse_shards
from omniforge.model.masking import Masker, MaskingConfig
from omniforge.model.specs import ModalitySpec
from omniforge import shards
from _helpers import npy_bytes

EOS, PAD = 3, 0
SENTINELS = list(range(10, 210))
IMG, CAP = "tok_rgb@224", "tok_caption"
SPECS = {IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=4096, grid=4),
         CAP: ModalitySpec(name=CAP, kind="sequence", num_tokens=8, vocab_size=4096)}
N_SHARDS, N_KEYS, N_CROPS = 5, 5, 3
MISSING = ("s001-k002", IMG)  # this key has no rgb tokens


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Token shards whose ids say where they come from: image token = 1000 + 10 * crop + position % 10,
    caption = [300 + key index, 400 + crop, EOS, PAD...]."""
    root = str(tmp_path_factory.mktemp("tokens"))
    for s in range(N_SHARDS):
        keys = [f"s{s:03d}-k{k:03d}" for k in range(N_KEYS)]
        for folder in (IMG, CAP):
            members, rows = [], []
            for k, key in enumerate(keys):
                if (key, folder) == MISSING:
                    rows.append({"key": key, "ok": False, "error_type": "teacher_error", "error_message": "x"})
                    continue
                if folder == IMG:
                    arr = np.array([[1000 + 10 * c + p % 10 for p in range(16)] for c in range(N_CROPS)])
                else:
                    arr = np.array([[300 + s * N_KEYS + k, 400 + c, EOS] + [PAD] * 5 for c in range(N_CROPS)])
                members.append((f"{key}.npy", npy_bytes(arr.astype(np.int16))))
                rows.append({"key": key, "ok": True})
            shards.write_tar(shards.tar_uri(root, folder, s), members)
            shards.write_status(shards.status_uri(root, folder, s), rows)
    return root


def _masker():
    cfg = MaskingConfig.uniform(list(SPECS), input_tokens=12, target_tokens=12)
    return Masker(cfg, SPECS, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)


def _cfg(root, **kw):
    return DataConfig(root=root, folders=(IMG, CAP), **{"batch_size": 3, "shuffle_buffer": 4, "keys": True, **kw})


def _crop_of(batch, i):
    """The crop index recorded in row i's image tokens and in its caption tokens (None when absent)."""
    img = batch[IMG]["tensor"][i]
    img_crop = None if batch[IMG]["input_mask"][i].all() else int(img[0] - 1000) // 10
    cap = batch[CAP]["tensor"][i].tolist()
    cap_crop = next((t - 400 for t in cap if 400 <= t < 400 + N_CROPS), None)
    return img_crop, cap_crop


def test_every_key_once_per_epoch_across_ranks_and_workers(root):
    torch.set_num_threads(1)
    seen = Counter()
    for rank in range(2):
        loader = make_loader(_cfg(root, num_workers=2, epochs=1), _masker(), rank=rank, world_size=2)
        for batch in loader:
            seen.update(batch["__key__"])
            for i, key in enumerate(batch["__key__"]):
                crop = int(batch["__crop__"][i])
                assert 0 <= crop < N_CROPS
                img_crop, cap_crop = _crop_of(batch, i)
                assert img_crop in (None, crop) and cap_crop in (None, crop)
                if key == MISSING[0]:
                    assert batch[IMG]["input_mask"][i].all() and batch[IMG]["target_mask"][i].all()
    expected = {f"s{s:03d}-k{k:03d}" for s in range(N_SHARDS) for k in range(N_KEYS)}
    assert set(seen) == expected and set(seen.values()) == {1}


def test_missing_key_kept_and_crops_vary(root):
    ds = TokenShardDataset(_cfg(root, epochs=2, shards="{000001..000002}"), _masker(), rank=0, world_size=1)
    keys, crops = Counter(), set()
    for batch in ds:
        keys.update(batch["__key__"])
        crops.update(batch["__crop__"].tolist())
    assert keys[MISSING[0]] == 2 and len(keys) == 2 * N_KEYS and set(keys.values()) == {2}
    assert crops == set(range(N_CROPS))


def _flat(batch):
    return [batch["__key__"]] + [batch[f][n] for f in (IMG, CAP) for n in sorted(batch[f])]


def _same(a, b):
    fa, fb = _flat(a), _flat(b)
    return fa[0] == fb[0] and all(torch.equal(x, y) for x, y in zip(fa[1:], fb[1:]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(root, num_workers):
    cfg = _cfg(root, num_workers=num_workers)  # endless
    reference = make_loader(cfg, _masker(), rank=0, world_size=1)
    it = iter(reference)
    expected = [next(it) for _ in range(14)]  # crosses blocks, shards and an epoch (25 samples / 3)

    first = make_loader(cfg, _masker(), rank=0, world_size=1)
    it = iter(first)
    for i in range(5):
        assert _same(next(it), expected[i])
    state = first.state_dict()
    resumed = make_loader(cfg, _masker(), rank=0, world_size=1)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for i in range(5, 14):
        assert _same(next(it), expected[i])


def test_config_errors(root):
    with pytest.raises(ConfigError, match="cannot feed"):
        TokenShardDataset(_cfg(root, num_workers=3), _masker(), rank=0, world_size=2)
    ds = TokenShardDataset(_cfg(root), _masker(), rank=0, world_size=1)
    other = TokenShardDataset(_cfg(root, seed=1), _masker(), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="seed"):
        other.load_state_dict(ds.state_dict())
    assert parse_shards("{000002..000004},7") == [2, 3, 4, 7]


@pytest.fixture(scope="module")
def captions_only(tmp_path_factory):
    """A second dataset: 3 shards of 4 keys with captions but no rgb tokens at all."""
    root = str(tmp_path_factory.mktemp("captions"))
    for s in range(3):
        keys = [f"c{s:03d}-k{k:03d}" for k in range(4)]
        arr = np.array([[500, 400, EOS] + [PAD] * 5], dtype=np.int16)
        shards.write_tar(shards.tar_uri(root, CAP, s), [(f"{k}.npy", npy_bytes(arr)) for k in keys])
        shards.write_status(shards.status_uri(root, CAP, s), [{"key": k, "ok": True} for k in keys])
    return root


def test_mixed_roots_follow_the_weights_and_mask_what_a_root_lacks(root, captions_only):
    cfg = _cfg((root, captions_only), weights=(3.0, 1.0), batch_size=8)
    loader = make_loader(cfg, _masker(), rank=0, world_size=1)
    it = iter(loader)
    keys = [(b, k, i) for b in (next(it) for _ in range(40)) for i, k in enumerate(b["__key__"])]
    from_second = [k.startswith("c") for _, k, _ in keys]
    assert abs(np.mean(from_second) - 0.25) < 0.05  # 320 draws at 1:3
    assert {k for _, k, _ in keys if k.startswith("c")} == {f"c{s:03d}-k{k:03d}" for s in range(3) for k in range(4)}
    for batch, key, i in keys:
        if key.startswith("c"):  # no rgb tokens in that dataset: masked out, nothing to see or predict
            assert batch[IMG]["input_mask"][i].all() and batch[IMG]["target_mask"][i].all()


def test_mixed_roots_resume_exactly(root, captions_only):
    cfg = _cfg((root, captions_only), weights=(1.0, 1.0), num_workers=2)
    it = iter(make_loader(cfg, _masker(), rank=0, world_size=1))
    expected = [next(it) for _ in range(12)]
    first = make_loader(cfg, _masker(), rank=0, world_size=1)
    it = iter(first)
    for i in range(5):
        assert _same(next(it), expected[i])
    resumed = make_loader(cfg, _masker(), rank=0, world_size=1)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for i in range(5, 12):
        assert _same(next(it), expected[i])
    other = make_loader(_cfg((root, captions_only), weights=(2.0, 1.0), num_workers=2), _masker(), rank=0,
                        world_size=1)
    with pytest.raises(ConfigError, match="weights"):
        other.load_state_dict(first.state_dict())


def test_resumes_from_a_single_root_state_of_format_1(root):
    cfg = _cfg(root)
    it = iter(make_loader(cfg, _masker(), rank=0, world_size=1))
    expected = [next(it) for _ in range(8)]
    first = make_loader(cfg, _masker(), rank=0, world_size=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    old = {**state, "version": 1, "shards": state["shards"][0],
           "workers": {w: s["roots"][0] for w, s in state["workers"].items()}}
    for k in ("roots", "weights"):
        old.pop(k)
    resumed = make_loader(cfg, _masker(), rank=0, world_size=1)
    resumed.load_state_dict(old)
    it = iter(resumed)
    for i in range(3, 8):
        assert _same(next(it), expected[i])


def test_mixed_roots_config_errors(root, captions_only):
    with pytest.raises(ConfigError, match="2 roots"):
        _cfg((root, captions_only), weights=(1.0,))
    with pytest.raises(ConfigError, match="endlessly"):
        _cfg((root, captions_only), epochs=1)
    with pytest.raises(ConfigError, match="distinct"):
        _cfg((root, root))


def test_a_truncated_tar_is_a_corpus_error(root, tmp_path):
    """A shard tar cut short after its commit stops the loader with a one-line error naming the file."""
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    tar = shards.tar_uri(broken, CAP, 1)
    with open(tar, "rb") as f:
        data = f.read()
    with open(tar, "wb") as f:
        f.write(data[:1000])
    with pytest.raises(CorpusError, match=r"shard-000001\.tar is not a readable tar .*omniforge verify"):
        list(TokenShardDataset(_cfg(broken, epochs=1), _masker(), rank=0, world_size=1))

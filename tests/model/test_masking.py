"""4M-21 masking: budgets, disjoint input/target, span masking round trips, chunks, the Dirichlet mixture."""

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError
from dataclasses import replace

from omniforge.model.masking import Masker, MaskingConfig, collate, merge_spans, span_mask
from omniforge.model.specs import ModalitySpec, specs_for

EOS, PAD = 3, 0
SENTINELS = list(range(10, 210))
IMG, CAP = "tok_rgb@224", "tok_caption"
METADATA, COLOR_PALETTE = "tok_metadata", "tok_color_palette"
_REGISTRY = specs_for([METADATA, COLOR_PALETTE], 1000)  # their chunks, shuffling and keep scheme
SPECS = {
    IMG: ModalitySpec(name=IMG, kind="image", num_tokens=16, vocab_size=64, grid=4),
    "tok_dinov2_global": ModalitySpec(name="tok_dinov2_global", kind="global", num_tokens=8, vocab_size=64),
    CAP: ModalitySpec(name=CAP, kind="sequence", num_tokens=20, vocab_size=1000),
    METADATA: replace(_REGISTRY[METADATA], num_tokens=16),
    COLOR_PALETTE: replace(_REGISTRY[COLOR_PALETTE], num_tokens=12),
}


def _row(ids, n):
    row = np.full(n, PAD, dtype=np.int16)
    row[: len(ids)] = ids
    row[len(ids)] = EOS
    return row


def _sample(rng, missing=()):
    cap = rng.integers(300, 400, size=int(rng.integers(0, 19)))
    meta = [t for field in range(int(rng.integers(0, 7))) for t in (500 + field, 600 + field)]  # v1=<id> v0=<bin>
    n_colors = int(rng.integers(1, 4))
    palette = [700 + n_colors] + [800 + 10 * c + ch for c in range(n_colors) for ch in range(3)]
    sample = {IMG: rng.integers(0, 64, size=16), "tok_dinov2_global": rng.integers(0, 64, size=8),
              CAP: _row(cap, 20), METADATA: _row(meta, 16), COLOR_PALETTE: _row(palette, 12)}
    for m in missing:
        sample[m] = None
    return sample


def _masker(cfg=None, **kw):
    cfg = cfg or MaskingConfig.uniform(list(SPECS), input_tokens=24, target_tokens=20, **kw)
    return Masker(cfg, SPECS, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)


def _original(row):
    ids = [int(t) for t in row]
    return ids[: ids.index(EOS) + 1]


def _split_sequence(out, spec):
    """(input ids, target ids) of one masked sequence row."""
    t, im, tm = out["tensor"], out["input_mask"], out["target_mask"]
    return t[~im].tolist(), t[~tm].tolist()


def test_shapes_budgets_and_disjoint_positions():
    torch.set_num_threads(1)
    masker, rng = _masker(), np.random.default_rng(0)
    for _ in range(200):
        out = masker(_sample(rng), rng)
        assert set(out) == set(SPECS)
        n_in = n_tgt = 0
        for folder, spec in SPECS.items():
            row = out[folder]
            assert row["tensor"].shape == (spec.seq_len,) and row["tensor"].dtype == torch.int64
            assert row["input_mask"].dtype == torch.bool and row["target_mask"].dtype == torch.bool
            assert not (~row["input_mask"] & ~row["target_mask"]).any()  # disjoint
            n_in += int((~row["input_mask"]).sum())
            n_tgt += int((~row["target_mask"]).sum())
            dam = row["decoder_attention_mask"]
            if spec.kind == "sequence":
                assert torch.equal(dam.bool(), ~row["target_mask"])
            else:
                assert not dam.any()
        assert n_in <= 24 and n_tgt <= 20
        assert n_in > 0 and n_tgt > 0


def test_missing_modality_is_all_masked_and_budget_goes_elsewhere():
    masker, rng = _masker(), np.random.default_rng(1)
    for _ in range(50):
        out = masker(_sample(rng, missing=(IMG, CAP)), rng)
        for m in (IMG, CAP):
            assert out[m]["input_mask"].all() and out[m]["target_mask"].all()
            assert not out[m]["tensor"].any()
        assert sum(int((~out[m]["input_mask"]).sum()) for m in SPECS) > 0


def test_input_only_folder_is_never_a_target():
    masker, rng = _masker(input_only=(IMG,)), np.random.default_rng(2)
    for _ in range(50):
        assert masker(_sample(rng), rng)[IMG]["target_mask"].all()


@pytest.mark.parametrize("folder", [CAP, METADATA, COLOR_PALETTE])
def test_span_masking_round_trip(folder):
    """Input + target merged at the sentinels give back the stored sequence (incl. [EOS]) when the target
    budget is not limiting."""
    cfg = MaskingConfig(alphas=[{folder: 1.0}], target_alphas=[{folder: 1.0}], input_tokens=40,
                        target_tokens=60, shuffle_chunks=False)
    masker = Masker(cfg, {folder: SPECS[folder]}, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)
    rng = np.random.default_rng(3)
    for _ in range(100):
        sample = {folder: _sample(rng)[folder]}
        out = masker(sample, rng)[folder]
        inp, tgt = _split_sequence(out, SPECS[folder])
        assert tgt[-1] in SENTINELS  # untruncated targets end with the final sentinel
        assert merge_spans(inp, tgt, SENTINELS) == _original(sample[folder])


def test_chunks_are_never_split_and_metadata_chunks_are_shuffled():
    specs = {METADATA: SPECS[METADATA], COLOR_PALETTE: SPECS[COLOR_PALETTE]}
    cfg = MaskingConfig.uniform(list(specs), input_tokens=14, target_tokens=40)
    masker = Masker(cfg, specs, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)
    rng = np.random.default_rng(4)
    orders = set()
    for _ in range(200):
        sample = {k: v for k, v in _sample(rng).items() if k in specs}
        out = masker(sample, rng)
        for folder in specs:
            inp, tgt = _split_sequence(out[folder], specs[folder])
            # Split input and target at sentinels: every piece is a run of whole chunks. (A target over its
            # budget is cut by token count, ml-4m's rule, so only whole targets are checked.)
            for seq in (inp, tgt) if tgt[-1:] and tgt[-1] in SENTINELS else (inp,):
                pieces, cur = [], []
                for t in seq:
                    if t in SENTINELS:
                        pieces.append(cur)
                        cur = []
                    else:
                        cur.append(t)
                pieces.append(cur)
                for piece in pieces:
                    body = [t for t in piece if t != EOS]
                    if folder == METADATA:  # pairs (500 + f, 600 + f)
                        assert len(body) % 2 == 0
                        assert all(body[i + 1] == body[i] + 100 for i in range(0, len(body), 2))
                    else:  # the count (70x) alone, colours as RGB triples (8c0, 8c1, 8c2)
                        rest = [t for t in body if t < 700 or t >= 800]
                        assert len(rest) % 3 == 0
                        assert all(rest[i] % 10 == 0 and rest[i + 2] == rest[i] + 2 for i in range(0, len(rest), 3))
            if folder == METADATA:
                merged = merge_spans(inp, tgt, SENTINELS)
                stored = _original(sample[METADATA])
                n_spans = sum(t in SENTINELS for t in inp)
                if inp and tgt[:1] == [SENTINELS[1]] and tgt[-1] == SENTINELS[n_spans + 1]:  # untruncated
                    assert sorted(merged) == sorted(stored)
                    orders.add(merged != stored)
    assert orders == {True, False}  # chunk order is shuffled (sometimes it comes out unchanged)


def test_target_over_budget_is_cut_at_a_sentinel():
    cfg = MaskingConfig(alphas=[{CAP: 1.0}], target_alphas=[{CAP: 1.0}], input_tokens=3, target_tokens=5)
    masker = Masker(cfg, {CAP: SPECS[CAP]}, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)
    rng = np.random.default_rng(5)
    for _ in range(100):
        row = _row(rng.integers(300, 400, size=15), 20)
        inp, tgt = _split_sequence(masker({CAP: row}, rng)[CAP], SPECS[CAP])
        assert len(inp) <= 3 and 0 < len(tgt) <= 5 and tgt[0] in SENTINELS


def test_span_mask_and_merge_are_inverse():
    units = [[1], [2], [3, 4], [5], [6]]
    masked = np.array([False, True, True, False, True])
    inp, tgt = span_mask(units, masked, SENTINELS)
    assert inp == [1, SENTINELS[1], 5, SENTINELS[2]]
    assert tgt == [SENTINELS[1], 2, 3, 4, SENTINELS[2], 6, SENTINELS[3]]
    assert merge_spans(inp, tgt, SENTINELS) == [1, 2, 3, 4, 5, 6]


def test_dirichlet_mixture_favours_the_heavy_modality():
    specs = {IMG: SPECS[IMG], "tok_dinov2_global": SPECS["tok_dinov2_global"]}
    heavy = {IMG: 100.0, "tok_dinov2_global": 0.01}
    other = {IMG: 0.01, "tok_dinov2_global": 100.0}
    cfg = MaskingConfig(alphas=[heavy, other], target_alphas=[other, heavy], weights=[1.0, 0.0],
                        input_tokens=8, target_tokens=8)
    masker = Masker(cfg, specs, sentinel_ids=SENTINELS, pad_id=PAD, eos_id=EOS)
    rng = np.random.default_rng(6)
    share = []
    for _ in range(200):
        out = masker({IMG: np.arange(16), "tok_dinov2_global": np.arange(8)}, rng)
        n_img = int((~out[IMG]["input_mask"]).sum())
        n_glob = int((~out["tok_dinov2_global"]["input_mask"]).sum())
        share.append(n_img / max(1, n_img + n_glob))
        assert int((~out["tok_dinov2_global"]["target_mask"]).sum()) >= 7  # target alphas favour the global
    assert np.mean(share) > 0.9


def test_collate_stacks_and_config_checks():
    masker, rng = _masker(), np.random.default_rng(7)
    batch = collate([masker(_sample(rng), rng) for _ in range(3)])
    assert batch[CAP]["tensor"].shape == (3, 42) and batch[IMG]["input_mask"].shape == (3, 16)
    with pytest.raises(ConfigError, match="target_alphas"):
        MaskingConfig(alphas=[{IMG: 1.0}], target_alphas=[])
    with pytest.raises(ConfigError, match="no alpha"):
        Masker(MaskingConfig.uniform([IMG]), SPECS, sentinel_ids=SENTINELS, eos_id=EOS)


def test_from_ml4m_mixture_dict():
    d = {"sampling_weights": [1.0, 0.5],
         "alphas_mixture": {"caption": {"input_alphas": [0.1, 1.0], "target_alphas": [0.5, 0.0],
                                        "keep": ["random", "all"]},
                            "tok_rgb@224": {"input_alphas": [1.0, 0.0], "target_alphas": [1.0, 1.0]}},
         "input_tokens": 64}
    cfg = MaskingConfig.from_dict(d)
    assert cfg.alphas == [{CAP: 0.1, IMG: 1.0}, {CAP: 1.0, IMG: 0.0}]
    assert cfg.weights == [1.0, 0.5] and cfg.input_tokens == 64
    assert cfg.keep_for(CAP, 1) == "all" and cfg.keep_for(COLOR_PALETTE, 0, SPECS[COLOR_PALETTE].keep) == "binary"
    assert SPECS[METADATA].chunks == (2, 2) and SPECS[METADATA].shuffle_chunks and SPECS[COLOR_PALETTE].chunks == (1, 3)
    specs = specs_for([IMG, CAP], text_vocab_size=1000)
    assert specs[IMG].grid == 14 and specs[CAP].kind == "sequence" and specs[CAP].seq_len == 2 * 257

"""t5_caption teacher: a T5 save_pretrained folder must give transformers' own encoder states, in ml-4m's npz."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from omniforge import codecs  # noqa: E402
from omniforge.errors import WeightsError  # noqa: E402
from omniforge.labelers import Sample, create_labeler, get_labeler_class  # noqa: E402
from omniforge.modalities import get_modality  # noqa: E402
from omniforge.pipeline.label import _encode_checked  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["An astronaut floating high above the earth.", "Two dogs run on a sandy beach at sunset"]
LONG = " ".join(["a dog and a cat on the beach"] * 20)  # far more than 77 tokens
IMAGE = np.zeros((8, 8, 3), np.uint8)  # t5_caption reads the caption only


def t5_tokenizer():
    """A T5-style SentencePiece-unigram tokenizer trained here (no download): <pad> 0, </s> 1, <unk> 2, </s>
    appended, as transformers' T5 tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = CAPTIONS + ["a cat sleeping on a red sofa", "an apple and a bowl of green pears"]
    tok.train_from_iterator(corpus * 20, trainers.UnigramTrainer(vocab_size=120, unk_token="<unk>",
                                                                 special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, extra_ids=0)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A T5 v1.1-style encoder (gated GELU, relative position buckets) at random init, 2 layers but the full
    4096 width, and its tokenizer, saved as the publisher saves them."""
    tok = t5_tokenizer()
    config = transformers.T5Config(vocab_size=len(tok), d_model=4096, d_kv=16, d_ff=96, num_layers=2, num_heads=3,
                                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.T5EncoderModel(config).eval()
    folder = tmp_path_factory.mktemp("t5") / "t5-small-4096"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), model, tok


def reference(model, tok, caption: str) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own tokenizer and encoder, run directly: (states (77, 4096) float32, valid (77,) bool)."""
    enc = tok(caption, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc).last_hidden_state[0]
    return states.numpy(), enc["attention_mask"][0].numpy().astype(bool)


def samples(*captions):
    return [Sample(key=f"k{i}", image=IMAGE, inputs={"caption": c}) for i, c in enumerate(captions)]


def test_embeddings_equal_transformers_own_encoder(official):
    folder, model, tok = official
    labeler = create_labeler("t5_caption", weights=folder)
    results = labeler.label(samples(*CAPTIONS, LONG))  # one batch: padded to its longest caption
    labels = [r["t5_caption"] for r in results]
    info = get_modality("t5_caption")
    for caption, label in zip([*CAPTIONS, LONG], labels):
        emb, mask = label["emb"], label["mask_valid"]
        assert emb.dtype == np.float16 and emb.shape == (1, 77, 4096) and mask.dtype == bool and mask.shape == (1, 77)
        states, valid = reference(model, tok, caption)
        assert np.array_equal(mask[0], valid)
        n = int(valid.sum())
        assert 5 < n and valid[:n].all()  # the valid tokens come first
        np.testing.assert_allclose(emb[0, :n].astype(np.float32), states[:n], rtol=2e-3, atol=2e-3)
        assert np.abs(emb[0, :n]).max() > 0.5 and not emb[0, n:].any()  # real states, zero padding
        # stored and read back as ml-4m's CaptionEmbTransform reads it: np.load, then emb[mask_valid]
        stored = np.load(io.BytesIO(_encode_checked(info, label)))
        kept = stored["emb"][0][stored["mask_valid"][0].astype(bool)]
        assert kept.shape == (n, 4096) and np.array_equal(kept, emb[0, :n])
    n0, n1 = (int(label["mask_valid"].sum()) for label in labels[:2])
    first = [label["emb"][0, : min(n0, n1)].astype(np.float32) for label in labels[:2]]
    assert not np.allclose(first[0], first[1], atol=0.1)  # different captions, different embeddings
    # a caption longer than 77 tokens is cut at 77, its [EOS] kept as the last token
    assert labels[2]["mask_valid"].all()
    assert tok(LONG, max_length=77, truncation=True)["input_ids"][-1] == tok.eos_token_id


def test_a_caption_less_or_empty_sample_fails_with_a_reason(official):
    labeler = create_labeler("t5_caption", weights=official[0])
    no_caption = Sample(key="none", image=IMAGE)
    results = labeler.label([no_caption, *samples("   ", CAPTIONS[0])])
    assert results[0].error_type == "missing_input" and "caption" in results[0].message
    assert results[1].error_type == "empty_caption" and results[1].message
    assert int(results[2]["t5_caption"]["mask_valid"].sum()) > 5
    (alone,) = labeler.label([no_caption])  # a batch with nothing to embed
    assert alone.error_type == "missing_input"


def test_max_length_cuts_shorter_and_the_fingerprint_follows_it(official):
    folder, model, tok = official
    label = create_labeler("t5_caption", weights=folder, max_length=6).label(samples(CAPTIONS[0]))[0]["t5_caption"]
    assert int(label["mask_valid"].sum()) == 6 and label["emb"].shape == (1, 77, 4096)
    enc = tok(CAPTIONS[0], max_length=6, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc).last_hidden_state[0].numpy()
    np.testing.assert_allclose(label["emb"][0, :6].astype(np.float32), states, rtol=2e-3, atol=2e-3)
    cls = get_labeler_class("t5_caption")
    assert cls.fingerprint(weights=folder, max_length=6) != cls.fingerprint(weights=folder)
    assert cls.fingerprint(weights=folder) != cls.fingerprint(weights="tiny")


def test_a_folder_that_is_no_4096_wide_t5_is_a_one_line_weights_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"not weights")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64).save_pretrained(bert)
    narrow = tmp_path / "t5-small"
    transformers.T5Config(d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2).save_pretrained(narrow)
    for folder, expected in ((empty, "no config.json"), (bert, "'bert' checkpoint, not a T5"),
                             (narrow, "d_model 64")):
        with pytest.raises(WeightsError) as err:
            create_labeler("t5_caption", weights=str(folder))
        assert expected in str(err.value) and str(folder) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        create_labeler("t5_caption", weights=str(tmp_path / "missing"))


def test_a_sentencepiece_only_tokenizer_without_sentencepiece_says_what_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the spiece.model tokenizer would load")
    folder = tmp_path / "t5-v1_1-like"
    transformers.T5Config(d_model=4096, d_kv=8, d_ff=64, num_layers=1, num_heads=2).save_pretrained(folder)
    (folder / "spiece.model").write_bytes(b"a SentencePiece model, as google/t5-v1_1-xxl ships its tokenizer")
    with pytest.raises(WeightsError, match="pip install sentencepiece") as err:
        create_labeler("t5_caption", weights=str(folder))
    assert "\n" not in str(err.value)


def test_tiny_is_4096_wide_and_the_same_in_every_build():
    a = create_labeler("t5_caption", weights="tiny").label(samples(*CAPTIONS))
    b = create_labeler("t5_caption", weights="tiny").label(samples(*CAPTIONS))
    for ra, rb in zip(a, b):
        assert codecs.embedding_problem(ra["t5_caption"], (77, 4096)) is None
        assert np.array_equal(ra["t5_caption"]["emb"], rb["t5_caption"]["emb"])
        assert np.array_equal(ra["t5_caption"]["mask_valid"], rb["t5_caption"]["mask_valid"])
    assert not np.array_equal(a[0]["t5_caption"]["emb"], a[1]["t5_caption"]["emb"])

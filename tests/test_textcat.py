"""hf_textcat: doc.cats for every label, exclusive and multi-label, long docs in windows."""

import numpy as np
import pytest
import spacy
import torch
from conftest import model_inputs
from spacy.training import Example
from transformers import AutoModelForSequenceClassification, AutoTokenizer

TEXT = "A charming and often touching film about two friends."


def textcat_nlp(model, sentencizer=False, **config):
    nlp = spacy.blank("en")
    if sentencizer:
        nlp.add_pipe("sentencizer")
    nlp.add_pipe("hf_textcat", config={"model": str(model), "device": "cpu", **config})
    return nlp


def test_exclusive_cats_equal_the_raw_model(ckpts):
    doc = textcat_nlp(ckpts["textcat"])(TEXT)
    tok = AutoTokenizer.from_pretrained(ckpts["textcat"])
    model = AutoModelForSequenceClassification.from_pretrained(ckpts["textcat"]).eval()
    with torch.no_grad():
        probs = model(**tok(TEXT, return_tensors="pt")).logits.softmax(-1)[0].numpy()
    assert list(doc.cats) == ["neg", "pos"]
    np.testing.assert_allclose([doc.cats["neg"], doc.cats["pos"]], probs, rtol=1e-5)
    assert sum(doc.cats.values()) == pytest.approx(1.0)


def test_multi_label_uses_sigmoid_and_per_label_thresholds(ckpts):
    nlp = textcat_nlp(ckpts["multilabel"], thresholds={"a": 0.0, "b": 1.0})
    doc = nlp(TEXT)
    pipe = nlp.get_pipe("hf_textcat")
    assert pipe.multi_label and set(doc.cats) == {"a", "b", "c"}
    logits = _raw_logits(ckpts["multilabel"], [TEXT])[0]
    np.testing.assert_allclose([doc.cats[label] for label in "abc"], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    decided = pipe.labels_for(doc)
    assert "a" in decided and "b" not in decided
    assert ("c" in decided) == (doc.cats["c"] >= 0.5)


def test_thresholds_for_unknown_labels_are_refused(ckpts):
    with pytest.raises(ValueError, match="unknown labels"):
        textcat_nlp(ckpts["multilabel"], thresholds={"zzz": 0.3})("x")


def _spy_windows(nlp):
    """Record the length of every sequence the pipeline's hf_textcat model runs (length-sorted batches)."""
    return model_inputs(nlp.get_pipe("hf_textcat"))


def _raw_logits(model_dir, texts):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.stack([model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in texts])


def _pooled_softmax(logits, pooling):
    pooled = logits.mean(axis=0) if pooling == "mean" else logits.max(axis=0)
    return np.exp(pooled - pooled.max()) / np.exp(pooled - pooled.max()).sum()


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_long_doc_with_sentences_pools_whole_sentence_windows(ckpts, pooling):
    """7 equal sentences, room for 3 per window: windows of 3, 3 and 1 sentences. Reference: the raw
    model on each window's text, pooled and softmaxed by hand."""
    per_sentence = len(AutoTokenizer.from_pretrained(ckpts["textcat"])(TEXT, add_special_tokens=False)["input_ids"])
    nlp = textcat_nlp(ckpts["textcat"], sentencizer=True, pooling=pooling, max_length=2 + 3 * per_sentence + 2)
    seen = _spy_windows(nlp)
    doc = nlp(" ".join([TEXT] * 7))
    assert sorted(seen) == sorted([2 + 3 * per_sentence, 2 + 3 * per_sentence, 2 + per_sentence])
    reference = _pooled_softmax(_raw_logits(ckpts["textcat"], [" ".join([TEXT] * 3)] * 2 + [TEXT]), pooling)
    np.testing.assert_allclose([doc.cats["neg"], doc.cats["pos"]], reference, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_long_doc_without_sentences_pools_token_windows(ckpts, pooling):
    """No sentence boundaries: windows are filled with whole spaCy tokens, greedily, up to 20 pieces.
    Reference: that packing done by hand from each token's own pieces, and the raw model on the text of
    each window."""
    text = " ".join(["Terrible boring awful mess, said Schwarzenegger."] * 8 + ["Wonderful moving delight!"] * 8)
    nlp = textcat_nlp(ckpts["textcat"], pooling=pooling, max_length=22)
    seen = _spy_windows(nlp)
    doc = nlp(text)
    tok = AutoTokenizer.from_pretrained(ckpts["textcat"])
    windows, start, size = [], None, 0  # (first char, last char) of each window
    for token in nlp.make_doc(text):
        n = len(tok(token.text, add_special_tokens=False)["input_ids"])
        assert 0 < n <= 20
        if start is None or size + n > 20:
            windows.append([token.idx, token.idx + len(token)])
            start, size = token.idx, n
        else:
            windows[-1][1] = token.idx + len(token)
            size += n
    assert len(windows) > 3 and sorted(seen) == sorted(len(tok(text[s:e])["input_ids"]) for s, e in windows)
    reference = _pooled_softmax(_raw_logits(ckpts["textcat"], [text[s:e] for s, e in windows]), pooling)
    np.testing.assert_allclose([doc.cats["neg"], doc.cats["pos"]], reference, rtol=1e-5)


def test_long_multi_label_doc_pools_logits_then_applies_the_sigmoid(ckpts):
    nlp = textcat_nlp(ckpts["multilabel"], sentencizer=True, max_length=14)
    seen = _spy_windows(nlp)
    sentences = ["The soup was cold and the waiter was rude.", "The view was lovely.", "We paid too much."]
    doc = nlp(" ".join(sentences))
    tok = AutoTokenizer.from_pretrained(ckpts["multilabel"])
    pieces = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    assert pieces[0] <= 12 and pieces[0] + pieces[1] > 12 and pieces[1] + pieces[2] <= 12
    assert sorted(seen) == sorted([2 + pieces[0], 2 + pieces[1] + pieces[2]])  # sentence 1, sentences 2 and 3
    pooled = _raw_logits(ckpts["multilabel"], [sentences[0], " ".join(sentences[1:])]).mean(axis=0)
    np.testing.assert_allclose([doc.cats[label] for label in "abc"], 1 / (1 + np.exp(-pooled)), rtol=1e-5)


@pytest.mark.parametrize("text", ["", "  \n ", "🙂🙃 Ελληνικά 中文", "\x00\x1f", "y" * 200_000])
def test_bad_input_gets_every_label(ckpts, text):
    doc = textcat_nlp(ckpts["textcat"])(text)
    assert set(doc.cats) == {"neg", "pos"} and sum(doc.cats.values()) == pytest.approx(1.0)


def test_new_head_from_the_real_minilm(tmp_path):
    """The offline MiniLM base with a new head: runs, saves, reloads identically."""
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"labels": ["negative", "positive"], "device": "cpu"})
    doc = nlp(TEXT)
    assert set(doc.cats) == {"negative", "positive"}
    nlp.to_disk(tmp_path / "p")
    again = spacy.load(tmp_path / "p")(TEXT)
    assert again.cats == pytest.approx(doc.cats, rel=1e-5)


def test_cats_scorer_through_nlp_evaluate(ckpts):
    nlp = textcat_nlp(ckpts["textcat"])
    examples = []
    for text, label in [(TEXT, "pos"), ("dull and empty", "neg"), ("fine", "pos")]:
        ref = nlp.make_doc(text)
        ref.cats = {"neg": float(label == "neg"), "pos": float(label == "pos")}
        examples.append(Example(nlp.make_doc(text), ref))
    scores = nlp.evaluate(examples)
    preds = [max(d.cats, key=d.cats.get) for d in nlp.pipe([e.reference.text for e in examples])]
    gold = ["pos", "neg", "pos"]
    accuracy = sum(p == g for p, g in zip(preds, gold)) / 3
    assert "cats_score" in scores and "cats_f_per_type" in scores
    assert scores["cats_micro_f"] == pytest.approx(accuracy)


def test_tokenizer_without_its_own_class_still_gets_special_tokens(ckpts, tmp_path):
    """A checkpoint with only tokenizer.json loads as a plain PreTrainedTokenizerFast, whose
    build_inputs_with_special_tokens adds nothing: [CLS]/[SEP] must come from its post-processor."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "plain"
    AutoModelForSequenceClassification.from_pretrained(ckpts["textcat"]).save_pretrained(folder)
    bert = AutoTokenizer.from_pretrained(ckpts["textcat"])
    plain = PreTrainedTokenizerFast(tokenizer_object=bert.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                    cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    plain.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).build_inputs_with_special_tokens([7]) == [7]
    ours = textcat_nlp(folder)(TEXT).cats
    reference = textcat_nlp(ckpts["textcat"])(TEXT).cats
    assert ours == pytest.approx(reference, rel=1e-5)

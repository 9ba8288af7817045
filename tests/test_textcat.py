"""hf_textcat: doc.cats for every label, exclusive and multi-label, long docs in windows."""

import numpy as np
import pytest
import spacy
import torch
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
    assert all(0 < v < 1 for v in doc.cats.values())
    decided = pipe.labels_for(doc)
    assert "a" in decided and "b" not in decided
    assert ("c" in decided) == (doc.cats["c"] >= 0.5)


def test_thresholds_for_unknown_labels_are_refused(ckpts):
    with pytest.raises(ValueError, match="unknown labels"):
        textcat_nlp(ckpts["multilabel"], thresholds={"zzz": 0.3})("x")


def _count_windows(nlp):
    pipe = nlp.get_pipe("hf_textcat")
    seen = []
    forward = pipe._forward
    pipe._forward = lambda inputs: seen.append([len(i.input_ids) for i in inputs]) or forward(inputs)
    return seen


@pytest.mark.parametrize("sentencizer", [False, True])
def test_long_doc_is_split_not_truncated(ckpts, sentencizer):
    nlp = textcat_nlp(ckpts["textcat"], sentencizer=sentencizer)
    seen = _count_windows(nlp)
    text = " ".join([TEXT] * 30)
    doc = nlp(text)
    lengths = seen[0]
    n_pieces = len(nlp.get_pipe("hf_textcat")._encode([text])[0].ids)
    assert len(lengths) > 1 and max(lengths) <= 64
    assert sum(n - 2 for n in lengths) == n_pieces  # every piece is in exactly one window
    if sentencizer:  # each window holds whole sentences (all sentences here are the same)
        per_sentence = len(nlp.get_pipe("hf_textcat")._encode([TEXT])[0].ids)
        assert all((n - 2) % per_sentence == 0 for n in lengths), (per_sentence, lengths)
    assert sum(doc.cats.values()) == pytest.approx(1.0)


def test_max_pooling_differs_from_mean_on_long_docs(ckpts):
    text = " ".join(["Terrible boring awful mess."] * 20 + ["Wonderful moving delight."] * 20)
    mean = textcat_nlp(ckpts["textcat"])(text).cats
    maxed = textcat_nlp(ckpts["textcat"], pooling="max")(text).cats
    assert mean != maxed


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

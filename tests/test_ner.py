"""hf_ner: entities on spaCy tokens, windows, snapping, scores, bad input."""

import json
import math
import shutil

import numpy as np
import pytest
import spacy
import torch
from conftest import model_inputs
from spacy.training import Example
from transformers import AutoModelForTokenClassification, AutoTokenizer

from spacy_llm_components import CheckpointError
from spacy_llm_components.core.align import window_spans
from spacy_llm_components.core.decode import decode_entities, log_softmax, transitions

TEXT = "Angela Merkel visited Paris and met Emmanuel Macron at the Elysee Palace on Monday."
BAD_INPUTS = ["", "   \n\t ", "😀🎉 東京 Москва café naïve \u200b", "ctrl\x00\x01\x07chars\x1b[0m", "a" * 3000]


def ner_nlp(model, **config):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(model), "device": "cpu", **config})
    return nlp


def raw_entities(model_dir, text):
    """Reference: the HF model run directly on the whole text, decoded per word with the same decoder."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        logits = model(**enc).logits[0].numpy()
    word_ids = enc.word_ids()
    first = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    last = {w: i for i, w in enumerate(word_ids) if w is not None}
    tags = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ents = decode_entities(log_softmax(logits[first]), tags, transitions(tags, "IOB2"))
    words = [word_ids[i] for i in first]
    return [(offsets[first[s]][0], offsets[last[words[e - 1]]][1], label) for s, e, label, _ in ents]


def raw_scores(model_dir, text):
    """The mean probability of each entity's tags, as `raw_entities` decodes them."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0].numpy()
    word_ids = enc.word_ids()
    first = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    tags = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return [score for *_, score in decode_entities(log_softmax(logits[first]), tags, transitions(tags, "IOB2"))]


def test_entities_match_the_raw_model_and_lie_on_tokens(ckpts):
    nlp = ner_nlp(ckpts["ner"])
    doc = nlp(TEXT)
    assert doc.ents, "the random head tags something in this sentence"
    ours = [(e.start_char, e.end_char, e.label_) for e in doc.ents]
    assert ours == raw_entities(ckpts["ner"], TEXT)
    assert [e._.score for e in doc.ents] == pytest.approx(raw_scores(ckpts["ner"], TEXT), abs=1e-6)
    assert nlp.get_pipe("hf_ner").labels == ["PER", "LOC", "ORG"]


# A long text of plain words (no accents, apostrophes or unknown characters), so that the tokenizer's
# words are spaCy's tokens and Hugging Face's word heuristics hold.
LONG_TEXT = " ".join(
    f"{name} {surname} visited {city} on day {i} and met the mayor of {other} near the old harbour ."
    for i, (name, surname, city, other) in enumerate([
        ("Angela", "Merkel", "Paris", "Berlin"), ("Lena", "Hartmann", "Lindenfeld", "Ostbrook"),
        ("Tomas", "Ekdahl", "Sarn", "Rome"), ("Mary", "Jones", "Madrid", "Vienna"),
        ("Peter", "Brown", "Oslo", "Copenhagen"), ("Ada", "Brenner", "Korvell", "Lisbon")]))


@pytest.fixture(scope="module")
def context_free_ner(tmp_path_factory):
    """A token classifier whose logits for a word piece depend on that piece alone (no attention layers,
    position embeddings zeroed): cut into windows or not, every piece gets the same logits, so any
    window setting must give exactly the unwindowed entities. Confident (scaled) head, so that the
    comparison does not hang on float noise."""
    from conftest import NER_TAGS, save_tiny, tiny_config
    from transformers import BertForTokenClassification

    torch.manual_seed(3)
    labels = dict(enumerate(NER_TAGS))
    model = BertForTokenClassification(tiny_config(
        num_hidden_layers=0, max_position_embeddings=512, num_labels=len(NER_TAGS), id2label=labels,
        label2id={v: k for k, v in labels.items()})).eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
        model.classifier.weight.mul_(40.0)
    return save_tiny(model, tmp_path_factory.mktemp("context-free") / "ner")


def _spy_windows(nlp):
    """Record the length of every sequence the pipeline's hf_ner model runs."""
    return model_inputs(nlp.get_pipe("hf_ner"))


def _ents(doc):
    return [(e.start_char, e.end_char, e.label_) for e in doc.ents]


@pytest.mark.parametrize("decoder", ["viterbi", "greedy"])
def test_windowed_entities_equal_the_unwindowed_ones_whatever_the_window_settings(context_free_ner, decoder):
    whole_nlp = ner_nlp(context_free_ner, decoder=decoder)
    seen = _spy_windows(whole_nlp)
    whole = whole_nlp(LONG_TEXT)
    n = len(AutoTokenizer.from_pretrained(context_free_ner)(LONG_TEXT, add_special_tokens=False)["input_ids"])
    assert 100 < n <= 510 and seen == [n + 2]  # the reference run: one window
    assert len(whole.ents) > 10 and len({e.label_ for e in whole.ents}) == 3
    # windows of 12 pieces; neighbours share `stride` pieces, at most half a window
    for stride, step in ((0, 12), (3, 9), (100, 6)):
        nlp = ner_nlp(context_free_ner, decoder=decoder, max_length=14, stride=stride)
        seen = _spy_windows(nlp)
        doc = nlp(LONG_TEXT)
        assert len(seen) == 1 + math.ceil((n - 12) / step) and max(seen) == 14, stride
        assert _ents(doc) == _ents(whole), stride
        assert [e._.score for e in doc.ents] == pytest.approx([e._.score for e in whole.ents], abs=1e-5)


def test_the_viterbi_entities_equal_the_raw_model_decoded_by_hand(context_free_ner):
    doc = ner_nlp(context_free_ner, max_length=14, stride=3)(LONG_TEXT)
    assert _ents(doc) == raw_entities(context_free_ner, LONG_TEXT)


def test_greedy_windowed_entities_equal_the_transformers_pipeline(context_free_ner):
    """Hugging Face's token-classification pipeline (argmax of each word's first piece, entities grouped
    as it groups them) on the whole text: the reference for the greedy decoder."""
    from transformers import pipeline

    hf = pipeline("token-classification", model=str(context_free_ner), aggregation_strategy="first", device="cpu")
    reference = hf(LONG_TEXT)
    assert len(reference) > 10
    doc = ner_nlp(context_free_ner, decoder="greedy", max_length=14, stride=3)(LONG_TEXT)
    assert _ents(doc) == [(r["start"], r["end"], r["entity_group"]) for r in reference]
    assert [e._.score for e in doc.ents] == pytest.approx([float(r["score"]) for r in reference], abs=1e-5)


def test_long_doc_runs_in_overlapping_windows_and_covers_the_end(ckpts):
    nlp = ner_nlp(ckpts["ner"], stride=16)
    pipe = nlp.get_pipe("hf_ner")
    seen = model_inputs(pipe)
    text = " ".join([TEXT] * 20)
    doc = nlp(text)
    n_pieces = len(AutoTokenizer.from_pretrained(ckpts["ner"])(text, add_special_tokens=False)["input_ids"])
    assert n_pieces > 300
    assert len(seen) == len(window_spans(n_pieces, 64 - 2, 16)) > 5  # 62 pieces + [CLS] [SEP] per window
    assert any(e.start_char > len(text) - 200 for e in doc.ents), "entities near the end: nothing truncated"


def test_entity_inside_a_spacy_token_is_snapped_not_dropped(ckpts):
    nlp = ner_nlp(ckpts["ner"])
    pipe = nlp.get_pipe("hf_ner")
    doc = nlp.make_doc("@angelamerkel visited")  # one spaCy token; the tokenizer's words are "@" and "angelamerkel"
    assert doc[0].text == "@angelamerkel"
    pieces = pipe._pieces([doc.text])
    words = pieces.words()
    assert len(words.first) == 3  # "@", "angelamerkel", "visited"
    tags = pipe.tags
    logits = np.full((len(words.first), len(tags)), -5.0, dtype=np.float32)
    logits[:, tags.index("O")] = 5.0
    logits[1, tags.index("B-PER")] = 10.0  # the tokenizer word "angelamerkel"
    pred = pipe._entities([doc], [len(doc.text)], words, log_softmax(logits))
    assert pred.of(0)[0][:3] == (0, 1, "PER") and pred.snapped.tolist() == [1]
    pipe.set_annotations([doc], pred)
    assert [(e.text, e.label_) for e in doc.ents] == [("@angelamerkel", "PER")]
    assert pipe.snapped == 1


def test_spans_key_leaves_doc_ents_alone(ckpts):
    in_ents = ner_nlp(ckpts["ner"])(TEXT)
    doc = ner_nlp(ckpts["ner"], spans_key="hf")(TEXT)
    assert not doc.ents and len(doc.spans["hf"]) > 0
    assert [(s.start, s.end, s.label_, s._.score) for s in doc.spans["hf"]] == \
        [(e.start, e.end, e.label_, e._.score) for e in in_ents.ents]


def greedy_mean_entities(model_dir, text):
    """Reference for aggregation=mean, decoder=greedy, by hand: the mean of each word's piece logits,
    its argmax tag, entities grouped as conlleval reads tags; score = mean probability of the tags."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        logits = model(**enc).logits[0].numpy()
    pieces = {}
    for i, w in enumerate(enc.word_ids()):
        if w is not None:
            pieces.setdefault(w, []).append(i)
    entities, previous = [], "O"
    for w, idx in sorted(pieces.items()):
        mean = logits[idx].mean(axis=0)
        probs = np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()
        tag = model.config.id2label[int(mean.argmax())]
        start, end = offsets[idx[0]][0], offsets[idx[-1]][1]
        if tag != "O" and tag[2:] == previous[2:] and previous != "O" and tag.startswith("I-"):
            entities[-1][1] = end
            entities[-1][3].append(probs.max())
        elif tag != "O":
            entities.append([start, end, tag[2:], [probs.max()]])
        previous = tag
    return [(s, e, label, float(np.mean(p))) for s, e, label, p in entities]


def test_mean_aggregation_with_the_greedy_decoder_equals_a_hand_computed_reference(ckpts):
    doc = ner_nlp(ckpts["ner"], aggregation="mean", decoder="greedy")(TEXT)
    reference = greedy_mean_entities(ckpts["ner"], TEXT)
    assert reference, "the random head tags something in this sentence"
    assert [(e.start_char, e.end_char, e.label_) for e in doc.ents] == [r[:3] for r in reference]
    assert [e._.score for e in doc.ents] == pytest.approx([r[3] for r in reference], abs=1e-5)


def test_pipe_keeps_order_and_equals_single_calls(ckpts):
    nlp = ner_nlp(ckpts["ner"], batch_size=3)
    texts = [TEXT[: n * 7] for n in range(1, 12)] + BAD_INPUTS
    piped = [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in nlp.pipe(texts, batch_size=5)]
    single = [[(e.start_char, e.end_char, e.label_) for e in nlp(t).ents] for t in texts]
    assert piped == single
    assert [d.text for d in nlp.pipe(texts)] == texts


@pytest.mark.parametrize("text", BAD_INPUTS + ["x" * 200_000])
def test_bad_input_runs(ckpts, text):
    doc = ner_nlp(ckpts["ner"])(text)
    for ent in doc.ents:
        assert ent.text.strip()
    if not text.strip():
        assert not doc.ents


def test_preset_entities_stay_unless_overwrite_ents(ckpts):
    """Like spaCy's entity_ruler: earlier entities win by default, predictions fill the rest."""
    fresh = [(e.start, e.end, e.label_) for e in ner_nlp(ckpts["ner"])(TEXT).ents]
    for overwrite in (False, True):
        nlp = ner_nlp(ckpts["ner"], overwrite_ents=overwrite)
        doc = nlp.make_doc(TEXT)
        doc.ents = [doc.char_span(0, 13, label="OLD")]  # "Angela Merkel", tokens 0-2
        doc = nlp(doc)
        got = [(e.start, e.end, e.label_) for e in doc.ents]
        clash = [e for e in fresh if e[0] < 2]
        if overwrite:
            assert all(e in got for e in fresh)
            assert ((0, 2, "OLD") in got) == (not clash)
        else:
            assert (0, 2, "OLD") in got
            assert [e for e in got if e[2] != "OLD"] == [e for e in fresh if e[0] >= 2]


def test_two_textcat_components_keep_each_others_cats(ckpts):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", name="sentiment", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    nlp.add_pipe("hf_textcat", name="topic", config={"model": str(ckpts["multilabel"]), "device": "cpu"})
    assert set(nlp(TEXT).cats) == {"neg", "pos", "a", "b", "c"}


def test_unreadable_label_scheme_names_the_checkpoint(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["ner"], tmp_path / "labels")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(7)}
    cfg["label2id"] = {f"LABEL_{i}": i for i in range(7)}
    (folder / "config.json").write_text(json.dumps(cfg))
    nlp = ner_nlp(folder)
    with pytest.raises(CheckpointError, match="labels.*label scheme.*LABEL_0"):
        nlp("text")


def test_bad_config_values_fail_at_add_pipe(ckpts):
    for bad in ({"scheme": "XYZ"}, {"aggregation": "max"}, {"decoder": "beam"}, {"dtype": "float16"}):
        with pytest.raises(ValueError):
            ner_nlp(ckpts["ner"], **bad)


def test_ents_scorer_through_nlp_evaluate(ckpts):
    nlp = ner_nlp(ckpts["ner"])
    pred = nlp(TEXT)
    gold = nlp.make_doc(TEXT)
    gold.ents = [gold.char_span(0, 13, label="PER"), gold.char_span(22, 27, label="LOC")]
    scores = nlp.evaluate([Example(nlp.make_doc(TEXT), gold)])
    tp = len({(e.start_char, e.end_char, e.label_) for e in pred.ents} & {(0, 13, "PER"), (22, 27, "LOC")})
    assert scores["ents_p"] == pytest.approx(tp / len(pred.ents))
    assert scores["ents_r"] == pytest.approx(tp / 2)
    assert "ents_per_type" in scores

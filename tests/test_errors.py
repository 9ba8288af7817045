"""Error analysis: each kind of error found on hand-made examples whose errors are known, most confident
first, and what `sllm evaluate` writes of them (errors.jsonl, the report's section)."""

import json
from types import SimpleNamespace

import pytest
import spacy
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_llm_components.tasks import task_spec

WORDS = ["Ann", "Lee", "met", "Bo", "in", "New", "York", "and", "Rome", "."]


def _doc(vocab, ents, scores=None):
    doc = Doc(vocab, words=WORDS)
    doc.ents = [Span(doc, s, e, label=label) for s, e, label in ents]
    for ent, score in zip(doc.ents, scores or []):
        ent._.score = score
    return doc


def test_ner_errors_of_every_kind():
    vocab = spacy.blank("en").vocab
    gold = [(0, 2, "PER"), (3, 4, "PER"), (5, 7, "LOC"), (8, 9, "LOC")]
    # right: Ann Lee; wrong label: Bo (LOC); boundary: York alone; missed: Rome; spurious: "met"
    predicted = [(0, 2, "PER"), (2, 3, "MISC"), (3, 4, "LOC"), (6, 7, "LOC")]
    eg = Example(_doc(vocab, predicted, [0.99, 0.6, 0.9, 0.7]), _doc(vocab, gold))
    errors = task_spec("ner").errors([eg], SimpleNamespace(spans_key=None))
    kinds = {(r["kind"], (r["predicted"] or {}).get("text"), tuple(g["text"] for g in r["gold"])) for r in errors}
    assert kinds == {("wrong_label", "Bo", ("Bo",)), ("boundary", "York", ("New York",)),
                     ("false_positive", "met", ()), ("false_negative", None, ("Rome",))}
    assert all(r["text"] == eg.predicted.text and r["doc"] == 0 for r in errors)
    assert next(r for r in errors if r["kind"] == "wrong_label")["score"] == 0.9


def test_textcat_errors_exclusive_and_multi_label_most_confident_first():
    nlp = spacy.blank("en")
    rows = [({"pos": 0.9, "neg": 0.1}, "neg"), ({"pos": 0.3, "neg": 0.7}, "neg"), ({"pos": 0.6, "neg": 0.4}, "neg")]
    examples = []
    for i, (cats, label) in enumerate(rows):
        predicted, reference = nlp.make_doc(f"text {i}"), nlp.make_doc(f"text {i}")
        predicted.cats, reference.cats = cats, {"pos": float(label == "pos"), "neg": float(label == "neg")}
        examples.append(Example(predicted, reference))
    pipe = SimpleNamespace(labels=["neg", "pos"], multi_label=False, cfg={})
    errors = task_spec("textcat").errors(examples, pipe)
    assert [(r["doc"], r["gold"], r["predicted"], r["score"]) for r in errors] == [(0, "neg", "pos", 0.9),
                                                                                  (2, "neg", "pos", 0.6)]
    multi = SimpleNamespace(labels=["a", "b"], multi_label=True, cfg={"threshold": 0.5, "thresholds": {"b": 0.8}})
    predicted, reference = nlp.make_doc("one"), nlp.make_doc("one")
    predicted.cats, reference.cats = {"a": 0.7, "b": 0.75}, {"a": 0.0, "b": 1.0}  # a: spurious; b: under its 0.8
    errors = task_spec("textcat").errors([Example(predicted, reference)], multi)
    assert [(r["kind"], r["label"]) for r in errors] == [("false_negative", "b"), ("false_positive", "a")]
    assert errors[0]["score"] == 1 - 0.75 and errors[1]["score"] == 0.7


def test_qa_errors_wrong_missing_and_spurious_answers():
    nlp = spacy.blank("en")
    reference = nlp.make_doc("Ada wrote notes in London today .")
    reference._.qas = [{"id": "1", "question": "where", "answers": [{"text": "London", "answer_start": 19}],
                        "is_impossible": False},
                       {"id": "2", "question": "who", "answers": [{"text": "Ada", "answer_start": 0}],
                        "is_impossible": False},
                       {"id": "3", "question": "when", "answers": [{"text": "today", "answer_start": 26}],
                        "is_impossible": False},
                       {"id": "4", "question": "why", "answers": [], "is_impossible": True}]
    predicted = nlp.make_doc(reference.text)
    spans = []
    for question, start, end, score in (("where", 3, 5, 0.8), ("who", 0, 1, 0.9), ("why", 2, 3, 0.4)):
        span = predicted[start:end]
        span._.question, span._.score = question, score
        spans.append(span)
    predicted.spans["answers"] = spans
    errors = task_spec("qa").errors([Example(predicted, reference)], SimpleNamespace(spans_key="answers"))
    got = {(r["kind"], r["question"], r["predicted"]) for r in errors}
    assert got == {("wrong_answer", "where", "in London"), ("false_negative", "when", None),
                   ("false_positive", "why", "notes")}
    assert next(r for r in errors if r["question"] == "where")["f1"] == 2 / 3


def test_evaluate_writes_every_error_and_the_worst_in_the_report(tiny_pipelines, tmp_path):
    from spacy_llm_components.stages.evaluate import evaluate

    result = evaluate(tiny_pipelines["ner"]["pipeline"], tiny_pipelines["ner"]["test"], tmp_path / "eval",
                      bootstrap=None)
    records = [json.loads(line) for line in (tmp_path / "eval" / "errors.jsonl").read_text().splitlines()]
    assert records == result.errors and records  # (a 2-step model makes plenty)
    # every predicted entity that is not exactly right is one error record: precision follows from them
    predicted = sum(len(d.ents) for d in result.predictions)
    wrong = sum(r["kind"] != "false_negative" for r in records)
    assert predicted and result.scores["ents_p"] == pytest.approx((predicted - wrong) / predicted)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Errors" in report and "errors.jsonl" in report

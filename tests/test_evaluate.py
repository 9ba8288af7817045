"""Evaluation metrics on handcrafted cases (hand-computed values, seqeval cross-check), and the
`evaluate` / `predict_file` paths on a real saved pipeline."""

import json
import random

import pytest
import spacy
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_llm_components.data import DataError
from spacy_llm_components.evaluate import evaluate, score_pipeline
from spacy_llm_components.predict import predict_file
from spacy_llm_components.scorers import score_ner, score_squad, score_textcat


def cats_example(nlp, gold: str, predicted: dict) -> Example:
    labels = ["a", "b", "c"]
    ref = nlp.make_doc("x")
    ref.cats = {label: float(label == gold) for label in labels}
    pred = nlp.make_doc("x")
    pred.cats = predicted
    return Example(pred, ref)


def test_textcat_metrics_by_hand(nlp):
    # gold a a a b b c ; predicted a a b b c c
    pairs = [("a", "a"), ("a", "a"), ("a", "b"), ("b", "b"), ("b", "c"), ("c", "c")]
    examples = [cats_example(nlp, g, {l: (0.6 if l == p else 0.2) for l in "abc"}) for g, p in pairs]
    scores = score_textcat(examples, labels=["a", "b", "c"], multi_label=False, details=True)
    per_label, confusion = scores["cats_f_per_type"], scores["cats_confusion"]
    per_label = {k: {**v, "support": scores["cats_support_per_type"][k]} for k, v in per_label.items()}
    assert scores["cats_accuracy"] == pytest.approx(4 / 6)
    assert confusion == {"labels": ["a", "b", "c"], "matrix": [[2, 1, 0], [0, 1, 1], [0, 0, 1]]}
    # a: P 2/2, R 2/3 ; b: P 1/2, R 1/2 ; c: P 1/2, R 1/1
    assert per_label["a"]["p"] == pytest.approx(1.0) and per_label["a"]["r"] == pytest.approx(2 / 3)
    assert per_label["b"]["f"] == pytest.approx(0.5)
    assert per_label["c"]["f"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert [per_label[l]["support"] for l in "abc"] == [3, 2, 1]
    macro_f = (0.8 + 0.5 + 2 / 3) / 3
    assert scores["cats_macro_f"] == pytest.approx(macro_f)
    assert 0.0 <= scores["cats_macro_auc"] <= 1.0


def test_multilabel_accuracy_is_exact_set_match(nlp):
    def ex(gold, pred):
        ref, p = nlp.make_doc("x"), nlp.make_doc("x")
        ref.cats, p.cats = gold, pred
        return Example(p, ref)

    examples = [ex({"a": 1.0, "b": 1.0}, {"a": 0.9, "b": 0.7}), ex({"a": 1.0, "b": 0.0}, {"a": 0.9, "b": 0.7})]
    scores = score_textcat(examples, labels=["a", "b"], multi_label=True, details=True)
    assert scores["cats_accuracy"] == 0.5 and "cats_confusion" not in scores


def _tags_to_doc(nlp, words, tags) -> Doc:
    doc = Doc(nlp.vocab, words=words)
    from spacy_llm_components.decode import tags_to_entities

    doc.ents = [Span(doc, s, e, label=t) for s, e, t in tags_to_entities(tags)]
    return doc


def test_ner_scores_match_seqeval(nlp):
    rng = random.Random(7)
    types = ["PER", "LOC", "ORG"]
    gold_tags, pred_tags, examples = [], [], []
    for _ in range(60):
        n = rng.randint(1, 12)
        sentences = []
        for _ in range(2):
            tags, i = [], 0
            while i < n:
                if rng.random() < 0.3:
                    t, length = rng.choice(types), rng.randint(1, 3)
                    tags += [f"B-{t}"] + [f"I-{t}"] * (length - 1)
                    i += length
                else:
                    tags.append("O")
                    i += 1
            sentences.append(tags[:n])
        gold, pred = sentences
        words = [f"w{i}" for i in range(n)]
        gold_tags.append(gold)
        pred_tags.append(pred)
        examples.append(Example(_tags_to_doc(nlp, words, pred), _tags_to_doc(nlp, words, gold)))
    ours = score_ner(examples)
    assert ours["ents_p"] == pytest.approx(precision_score(gold_tags, pred_tags))
    assert ours["ents_r"] == pytest.approx(recall_score(gold_tags, pred_tags))
    assert ours["ents_f"] == pytest.approx(f1_score(gold_tags, pred_tags))
    report = classification_report(gold_tags, pred_tags, output_dict=True)
    for t in types:
        assert ours["ents_per_type"][t]["f"] == pytest.approx(report[t]["f1-score"])


def test_squad_scores_from_gold_qas(nlp):
    ref = nlp.make_doc("The tower is in Paris.")
    ref._.qas = [{"id": "1", "question": "Where?", "answers": [{"text": "in Paris", "start": 13},
                                                                 {"text": "Paris", "start": 16}], "is_impossible": False},
                 {"id": "2", "question": "What?", "answers": [{"text": "The tower is", "start": 0}],
                  "is_impossible": False},
                 {"id": "3", "question": "Who?", "answers": [], "is_impossible": True}]
    pred = nlp.make_doc(ref.text)
    spans = []
    for (start, end), question in (((4, 5), "Where?"), ((1, 2), "What?")):
        span = Span(pred, start, end, label="ANSWER", span_id=pred.vocab.strings.add(question))
        span._.question = question
        spans.append(span)
    pred.spans["answers"] = spans
    scores = score_squad([Example(pred, ref)])
    # Where?: "Paris" exact; What?: "tower" vs "tower is" (articles dropped) EM 0, F1 2/3; Who?: no answer, right
    assert scores["qa_exact"] == pytest.approx(2 / 3) and scores["qa_f1"] == pytest.approx(8 / 9)
    assert scores["qa_has_ans_exact"] == pytest.approx(0.5) and scores["qa_has_ans_f1"] == pytest.approx(5 / 6)
    assert scores["qa_no_ans_exact"] == 1.0 and scores["qa_no_ans_total"] == 1


# -- on a saved pipeline ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def textcat_pipeline(ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("tc") / "pipeline"
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    nlp.to_disk(path)
    return path


def test_evaluate_writes_metrics_report_and_plot(textcat_pipeline, tmp_path):
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "".join(f"text number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12)))
    result = evaluate(textcat_pipeline, test, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["primary"] == "cats_score" and metrics["statistics"]["docs"] == 12
    assert metrics["statistics"]["words_per_second"] > 0
    # the reported accuracy is that of the predictions the run made
    correct = sum(max(d.cats, key=d.cats.get) == ("pos" if i % 2 else "neg") for i, d in enumerate(result.predictions))
    assert metrics["scores"]["cats_accuracy"] == pytest.approx(correct / 12) == metrics["scores"]["cats_score"]
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 12
    assert (tmp_path / "eval/confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cats_accuracy" in (tmp_path / "eval/report.md").read_text()


def test_evaluate_unknown_label_names_the_row(textcat_pipeline, tmp_path):
    test = tmp_path / "test.csv"
    test.write_text("text,label\nfine,pos\nodd,maybe\n")
    with pytest.raises(DataError, match=r"test\.csv, line 3: label\(s\) \['maybe'\] not among the labels"):
        evaluate(textcat_pipeline, test, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_score_pipeline_ner_uses_nlp_pipe(ckpts, nlp):
    nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    ref = nlp.make_doc("Angela Merkel visited Paris")
    ref.ents = [ref.char_span(0, 13, "PER")]
    result = score_pipeline(nlp, [ref])
    assert result.primary == "ents_f" and result.per_label["PER"]["support"] == 1
    assert [e.text for e in result.predictions[0].ents] == [e.text for e in nlp(ref.text).ents]


def test_predict_file_streams_and_reports_bad_lines(ckpts, tmp_path, nlp):
    nlp.add_pipe("hf_qa", config={"model": str(ckpts["qa"]), "device": "cpu"})
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "text": "The tower is in Paris.", "questions": ["Where?"]}) + "\n"
                   + '{"text": 5}\n' + json.dumps({"text": "No questions here."}) + "\n")
    with pytest.raises(DataError, match=r"in\.jsonl, line 2: \"text\" must be a string"):
        predict_file(nlp, src, tmp_path / "out.jsonl", show_progress=False)
    assert not (tmp_path / "out.jsonl").exists()  # no half output
    report = predict_file(nlp, src, tmp_path / "out.jsonl", skip_bad=True, show_progress=False)
    assert report["written"] == 2 and report["skipped"][0]["where"] == "line 2"
    first, second = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert first["id"] == 1 and first["answers"][0]["question"] == "Where?"
    answer = first["answers"][0]
    assert first["text"][answer["start_char"] : answer["end_char"]] == answer["text"]
    assert second["answers"] == []


def test_doc_predictions_from_every_hf_component(ckpts, nlp):
    from spacy_llm_components.predict import doc_predictions

    nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    doc = nlp("Angela Merkel visited Paris")
    out = doc_predictions(doc, nlp)
    assert set(out) == {"ents", "cats"} and set(out["cats"]) == {"neg", "pos"}
    assert [e["text"] for e in out["ents"]] == [e.text for e in doc.ents]

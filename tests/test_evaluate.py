"""`evaluate` (metrics.json: scores apart from statistics, report, plot) and `predict_file` on real saved
pipelines; the scorers' own arithmetic is in test_scorers.py."""

import json

import pytest
import spacy

from spacy_llm_components.data import DataError
from spacy_llm_components.stages.annotate import predict_file
from spacy_llm_components.stages.evaluate import evaluate
from spacy_llm_components.stages.shared.scoring import score_pipeline


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
    assert metrics["statistics"]["words"] == 3 * 12 and metrics["statistics"]["words_per_second"] > 0
    # the reported accuracy is that of the predictions the run made
    correct = sum(max(d.cats, key=d.cats.get) == ("pos" if i % 2 else "neg") for i, d in enumerate(result.predictions))
    assert metrics["scores"]["cats_accuracy"] == pytest.approx(correct / 12) == metrics["scores"]["cats_score"]
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 12
    assert (tmp_path / "eval/confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cats_accuracy" in (tmp_path / "eval/report.md").read_text()


def test_multi_label_evaluation_applies_the_components_thresholds(ckpts, tmp_path):
    """`a` at threshold 0 is always decided, `b` at 1 never, `c` at the shared 0.5: the reported scores
    must count those decisions (what `labels_for` gives users), not a 0.5 cut for every label."""
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["multilabel"]), "device": "cpu",
                                       "thresholds": {"a": 0.0, "b": 1.0}})
    nlp.to_disk(tmp_path / "pipeline")
    rows = [("first", ["a"]), ("second", ["a", "b"]), ("third", ["b", "c"]), ("fourth", []), ("fifth", ["c"])]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": f"the {t} text", "label": labels}) + "\n" for t, labels in rows))
    result = evaluate(tmp_path / "pipeline", test, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["primary"] == "cats_score" and metrics["scores"]["cats_score"] == metrics["scores"]["cats_macro_f"]
    assert set(metrics["scores"]) & set(metrics["statistics"]) == set()  # scores apart from statistics
    assert metrics["statistics"]["docs"] == 5 and metrics["skipped"] == []

    pipe = spacy.load(tmp_path / "pipeline").get_pipe("hf_textcat")
    decided = [set(pipe.labels_for(doc)) for doc in result.predictions]
    assert all("a" in d and "b" not in d for d in decided)
    per_label = metrics["per_label"]
    assert per_label["a"]["p"] == pytest.approx(2 / 5) and per_label["a"]["r"] == 1.0  # decided for all 5 docs
    assert per_label["b"]["p"] == per_label["b"]["r"] == 0.0 and per_label["b"]["support"] == 2
    gold_c = [False, False, True, False, True]
    tp_c = sum(g and "c" in d for g, d in zip(gold_c, decided))
    assert per_label["c"]["r"] == pytest.approx(tp_c / 2)
    exact = sum(d == set(labels) for d, (_, labels) in zip(decided, rows))
    assert metrics["scores"]["cats_accuracy"] == pytest.approx(exact / 5)


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
    from spacy_llm_components.components.pipeline import doc_predictions

    nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    doc = nlp("Angela Merkel visited Paris")
    out = doc_predictions(doc, nlp)
    assert set(out) == {"ents", "cats"} and set(out["cats"]) == {"neg", "pos"}
    assert [e["text"] for e in out["ents"]] == [e.text for e in doc.ents]

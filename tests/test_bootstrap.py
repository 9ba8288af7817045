"""Bootstrap confidence intervals. References: a brute-force loop over the same resampled documents that
scores each resampled test set with spaCy's entity scorer (or the task's own scorer), the point estimate
against that scorer on the whole set, and the coverage of a synthetic case with a known answer."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import spacy
from spacy.scorer import get_ner_prf
from spacy.tokens import Doc
from spacy.training import Example
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.core.bootstrap import BootstrapSettings, DocStatistics, intervals, percentile_interval
from spacy_llm_components.tasks import task_spec
from spacy_llm_components.tasks.qa import score_squad
from spacy_llm_components.tasks.textcat import score_textcat

WORDS = ["Ann", "Lee", "met", "Bo", "in", "Oslo", "and", "Rome", "today", "."]
GOLD = [(0, 2, "PER"), (3, 4, "PER"), (5, 6, "LOC"), (7, 8, "LOC")]


def _ner_examples(n: int = 37, seed: int = 1):
    """Examples whose predictions are right, wrong in label, wrong in boundary, missing or spurious, at
    random: every kind of count spaCy's scorer keeps."""
    rng = np.random.default_rng(seed)
    vocab = spacy.blank("en").vocab
    examples = []
    for _ in range(n):
        gold = [e for e in GOLD if rng.random() < 0.8]
        predicted = []
        for start, end, label in gold:
            r = rng.random()
            if r < 0.6:
                predicted.append((start, end, label))
            elif r < 0.75:
                predicted.append((start, end, "LOC" if label == "PER" else "PER"))
            elif r < 0.85 and end - start > 1:
                predicted.append((start, start + 1, label))
        if rng.random() < 0.3 and not any(s <= 8 < e for s, e, _ in gold):
            predicted.append((8, 9, "ORG"))  # spurious, of a type the gold never has
        as_doc = lambda ents: Doc(vocab, words=WORDS, ents=_iob(ents))  # noqa: E731
        reference = as_doc(gold) if rng.random() > 0.1 else Doc(vocab, words=WORDS)  # some without annotation
        examples.append(Example(as_doc(predicted), reference))
    assert any(not eg.y.has_annotation("ENT_IOB") for eg in examples)
    return examples


def _iob(ents):
    tags = ["O"] * len(WORDS)
    for start, end, label in ents:
        tags[start] = f"B-{label}"
        tags[start + 1:end] = [f"I-{label}"] * (end - start - 1)
    return tags


def _brute_force(examples, score, replicates, seed):
    """Score each resampled list of examples with `score`: the draws are numpy's default_rng(seed), one
    (replicates x docs) array of indices."""
    drawn = np.random.default_rng(seed).integers(0, len(examples), size=(replicates, len(examples)))
    return [score([examples[i] for i in row]) for row in drawn]


def test_entity_intervals_equal_a_brute_force_loop_over_spacys_scorer():
    examples = _ner_examples()
    stats = task_spec("ner").doc_statistics(examples, SimpleNamespace(spans_key=None))
    want = get_ner_prf(examples)
    point = stats.point()
    for metric in ("ents_p", "ents_r", "ents_f"):
        assert point[metric] == pytest.approx(want[metric], abs=1e-12), metric
    for label, prf in want["ents_per_type"].items():
        assert point[(label, "f")] == pytest.approx(prf["f"], abs=1e-12), label
    # several chunks of draws (max_cells): the same replicates as one array of draws
    got = intervals(stats, replicates=300, seed=7, max_cells=len(examples) * 64)
    loop = _brute_force(examples, get_ner_prf, 300, 7)
    for metric in ("ents_p", "ents_r", "ents_f"):
        assert got[metric] == pytest.approx(percentile_interval(np.array([s[metric] for s in loop])), abs=1e-9)
    for label in ("PER", "LOC"):
        per_type = np.array([(s["ents_per_type"].get(label) or {"f": 0.0})["f"] for s in loop])
        assert got[(label, "f")] == pytest.approx(percentile_interval(per_type), abs=1e-9), label
    low, high = got["ents_f"]
    assert low < want["ents_f"] < high and high - low > 0.02  # a real interval, around the estimate
    assert intervals(stats, replicates=300, seed=7) == got  # seeded: the same intervals
    assert intervals(stats, replicates=300, seed=8) != got


def _textcat_examples(multi_label: bool, n: int = 41):
    rng = np.random.default_rng(3)
    nlp = spacy.blank("en")
    labels = ["a", "b", "c"]
    examples = []
    for i in range(n):
        reference = nlp.make_doc(f"text {i}")
        gold = rng.integers(0, 3)
        reference.cats = {label: float(rng.random() < 0.4 if multi_label else j == gold)
                          for j, label in enumerate(labels)}
        predicted = nlp.make_doc(f"text {i}")
        scores = rng.random(3) + 0.6 * np.array([reference.cats[label] for label in labels])
        predicted.cats = {label: float(s / (scores.sum() if not multi_label else 1.6)) for label, s in zip(labels, scores)}
        examples.append(Example(predicted, reference))
    return examples, labels


@pytest.mark.parametrize("multi_label", [False, True])
def test_category_intervals_equal_a_brute_force_loop_over_the_scorer(multi_label):
    examples, labels = _textcat_examples(multi_label)
    pipe = SimpleNamespace(labels=labels, multi_label=multi_label, cfg={"threshold": 0.5})
    score = lambda egs: score_textcat(egs, labels=labels, multi_label=multi_label)  # noqa: E731
    stats = task_spec("textcat").doc_statistics(examples, pipe)
    want = score(examples)
    for metric in ("cats_score", "cats_accuracy", "cats_macro_f", "cats_micro_f"):
        assert stats.point()[metric] == pytest.approx(want[metric], abs=1e-12), metric
    got = intervals(stats, replicates=200, seed=2)
    loop = _brute_force(examples, score, 200, 2)
    for metric in ("cats_score", "cats_accuracy", "cats_macro_f"):
        assert got[metric] == pytest.approx(percentile_interval(np.array([s[metric] for s in loop])), abs=1e-9)
    per_label = np.array([s["cats_f_per_type"]["b"]["f"] for s in loop])
    assert got[("b", "f")] == pytest.approx(percentile_interval(per_label), abs=1e-9)


def test_answer_intervals_resample_contexts_with_all_their_questions():
    nlp = spacy.blank("en")
    rng = np.random.default_rng(4)
    examples = []
    for i in range(30):
        reference = nlp.make_doc(f"Ada wrote {i} notes in London today .")
        questions = [f"q{i}-{j}" for j in range(int(rng.integers(0, 4)))]  # contexts of 0 to 3 questions
        reference._.qas = [{"id": q, "question": q, "answers": [] if j == 2 else [{"text": "London", "answer_start": 0}],
                            "is_impossible": j == 2} for j, q in enumerate(questions)]  # the third: unanswerable
        predicted = nlp.make_doc(reference.text)
        spans = []
        for q in questions:
            start = [5, 4, 3][int(rng.integers(0, 3))]  # "London", "in London", "notes in London"
            span = predicted[start:6]
            span._.question = q
            spans.append(span)
        predicted.spans["answers"] = spans
        examples.append(Example(predicted, reference))
    stats = task_spec("qa").doc_statistics(examples, SimpleNamespace(spans_key="answers"))
    want = score_squad(examples)
    assert stats.point()["qa_exact"] == pytest.approx(want["qa_exact"], abs=1e-12)
    assert stats.point()["qa_f1"] == pytest.approx(want["qa_f1"], abs=1e-12)
    got = intervals(stats, replicates=200, seed=0)
    loop = _brute_force(examples, score_squad, 200, 0)
    for metric in ("qa_exact", "qa_f1"):
        assert got[metric] == pytest.approx(percentile_interval(np.array([s[metric] for s in loop])), abs=1e-9)


def test_the_interval_is_the_central_share_of_the_replicates():
    assert percentile_interval(np.arange(1001) / 1000) == pytest.approx((0.025, 0.975))
    assert percentile_interval(np.arange(1001) / 1000, level=0.9) == pytest.approx((0.05, 0.95))


def test_intervals_cover_a_known_accuracy_about_as_often_as_they_claim():
    """Test sets of 300 docs, each right with probability 0.8: the 95% interval of each set's accuracy
    holds 0.8 for about 95% of the sets (the percentile bootstrap is close to nominal at this size)."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        right = (rng.random(300) < 0.8).astype(float)[:, None]
        stats = DocStatistics(right, lambda sums: {"accuracy": sums[:, 0] / 300})
        low, high = intervals(stats, replicates=500, seed=trial)["accuracy"]
        covered += low <= 0.8 <= high
    assert 0.9 <= covered / 200 <= 0.99, covered


def test_evaluate_writes_intervals_in_metrics_report_and_cli(tiny_pipelines, tmp_path):
    parts = tiny_pipelines["ner"]
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(parts["pipeline"]), str(parts["test"]), "-o", str(out),
                                      "--bootstrap-replicates", "400", "--bootstrap-seed", "3", "--no-track"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    drawn = metrics["intervals"]
    assert (drawn["replicates"], drawn["seed"], drawn["level"], drawn["unit"]) == (400, 3, 0.95, "document")
    low, high = drawn["scores"]["ents_f"]
    assert low <= metrics["scores"]["ents_f"] <= high
    assert set(drawn["per_label"]) <= set(metrics["per_label"]) and drawn["per_label"]
    assert f"ents_f: {100 * metrics['scores']['ents_f']:.2f} (95% CI {100 * low:.2f}–{100 * high:.2f})" in result.output
    report = (out / "report.md").read_text()
    assert "| metric | value | 95% CI |" in report and f"{100 * low:.2f}–{100 * high:.2f}" in report
    assert "percentile bootstrap, 400 replicates of the documents (seed 3" in report
    none = CliRunner().invoke(app, ["evaluate", str(parts["pipeline"]), str(parts["test"]), "-o",
                                    str(tmp_path / "none"), "--bootstrap-replicates", "0", "--no-track"])
    assert none.exit_code == 0 and json.loads((tmp_path / "none" / "metrics.json").read_text())["intervals"] == {}
    bad = CliRunner().invoke(app, ["evaluate", str(parts["pipeline"]), str(parts["test"]), "-o", str(tmp_path / "bad"),
                                   "--bootstrap-level", "1.5", "--no-track"])
    assert bad.exit_code == 2 and "--bootstrap-level 1.5" in bad.output and not (tmp_path / "bad").exists()


def test_evaluate_refuses_bad_bootstrap_settings_before_reading_anything(tmp_path):
    from spacy_llm_components.stages.evaluate import evaluate

    with pytest.raises(ValueError, match="--bootstrap-replicates -5"):
        evaluate(tmp_path / "no-pipeline", tmp_path / "no-test", tmp_path / "out",
                 bootstrap=BootstrapSettings(replicates=-5))
    assert not (tmp_path / "out").exists()


def test_intervals_reach_the_mlflow_metrics_and_the_model_card():
    from spacy_llm_components.core.cards import model_card
    from spacy_llm_components.stages.shared.tracking import interval_metrics

    drawn = {"level": 0.95, "replicates": 1000, "scores": {"ents_f": [0.81, 0.85]}, "per_label": {}}
    evaluation = {"primary": "ents_f", "scores": {"ents_f": 0.83}, "statistics": {"docs": 10}, "intervals": drawn,
                  "test": "t.conll"}
    assert interval_metrics(evaluation) == {"ents_f.ci_low": 0.81, "ents_f.ci_high": 0.85}
    heads = {"primary": "weighted_score", "scores": {"weighted_score": 0.8}, "heads": {"ner": evaluation}}
    assert interval_metrics(heads) == {"ner_ents_f.ci_low": 0.81, "ner_ents_f.ci_high": 0.85}
    card = model_card("m", "1", {"task": "ner"}, evaluation, {})
    assert "**ents_f 83.00** (95% CI 81.00–85.00)" in card
    assert "(95% CI 81.00–85.00)" in model_card("m", "1", {"task": "ner+textcat"}, heads, {})


# -- paired comparison ------------------------------------------------------------------------------------
def _decided(examples, right):
    """Copies of the examples whose prediction is the gold class where `right`, another class elsewhere."""
    out = []
    for eg, ok in zip(examples, right):
        gold = max(eg.reference.cats, key=eg.reference.cats.get)
        wrong = next(label for label in eg.reference.cats if label != gold)
        predicted = eg.predicted.copy()
        predicted.cats = {label: 0.9 if label == (gold if ok else wrong) else 0.05 for label in eg.reference.cats}
        out.append(Example(predicted, eg.reference))
    return out


def test_paired_comparison_of_a_model_right_on_more_docs_equals_a_brute_force_loop():
    from spacy_llm_components.core.bootstrap import mcnemar, paired_differences

    examples, labels = _textcat_examples(False, n=60)
    rng = np.random.default_rng(5)
    right_a = rng.random(60) < 0.6
    right_b = right_a | (rng.random(60) < 0.5)  # right wherever A is, and on more docs
    a, b = _decided(examples, right_a), _decided(examples, right_b)
    pipe = SimpleNamespace(labels=labels, multi_label=False, cfg={})
    spec = task_spec("textcat")
    diffs = paired_differences(spec.doc_statistics(a, pipe), spec.doc_statistics(b, pipe), replicates=300, seed=4)
    accuracy = diffs["cats_accuracy"]
    assert accuracy.difference == pytest.approx(right_b.mean() - right_a.mean(), abs=1e-12) and accuracy.difference > 0
    drawn = np.random.default_rng(4).integers(0, 60, size=(300, 60))  # the same documents drawn for A and B
    loop = [score_textcat([b[i] for i in row], labels=labels)["cats_accuracy"]
            - score_textcat([a[i] for i in row], labels=labels)["cats_accuracy"] for row in drawn]
    assert accuracy.interval == pytest.approx(percentile_interval(np.array(loop)), abs=1e-9)
    assert accuracy.interval[0] > 0 and accuracy.p_value < 0.01  # B is better, and the test says so
    test = mcnemar(right_a, right_b)
    assert test["only_a_right"] == 0 and test["only_b_right"] == int((right_b & ~right_a).sum()) > 5
    assert test["p_value"] < 0.05
    same = paired_differences(spec.doc_statistics(a, pipe), spec.doc_statistics(a, pipe), replicates=300, seed=4)
    assert all(d.difference == 0 and d.interval == (0.0, 0.0) and d.p_value == 1.0 for d in same.values())


def test_mcnemar_by_hand():
    from spacy_llm_components.core.bootstrap import mcnemar

    a = np.array([1, 1] + [0] * 10 + [1] * 5, dtype=bool)  # 2 docs only A gets right, 10 only B, 5 both
    b = np.array([0, 0] + [1] * 10 + [1] * 5, dtype=bool)
    # two-sided exact binomial: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar(a, b) == {"only_a_right": 2, "only_b_right": 10, "p_value": pytest.approx(158 / 4096)}
    assert mcnemar(a, a)["p_value"] == 1.0


def test_compare_command_writes_the_comparison_and_refuses_pipelines_that_differ(tiny_pipelines, ckpts, tmp_path):
    from spacy_llm_components.components.pipeline import build_pipeline
    from spacy_llm_components.stages.evaluate import compare

    parts = tiny_pipelines["textcat"]
    result = CliRunner().invoke(app, ["compare", str(parts["pipeline"]), str(parts["pipeline"]), "--test",
                                      str(parts["test"]), "-o", str(tmp_path / "same"), "--bootstrap-replicates", "200"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "same" / "comparison.json").read_text())
    assert data["scores"]["cats_score"]["difference"] == 0 and data["scores"]["cats_score"]["p_value"] == 1.0
    assert data["mcnemar"] == {"only_a_right": 0, "only_b_right": 0, "p_value": 1.0}
    assert "| cats_score |" in result.output and "McNemar" in (tmp_path / "same" / "comparison.md").read_text()
    ner = tiny_pipelines["ner"]["pipeline"]
    with pytest.raises(ValueError, match="compare pipelines of one task"):
        compare(parts["pipeline"], ner, parts["test"], tmp_path / "tasks")
    other = build_pipeline("textcat", ckpts["multilabel"], settings={"device": "cpu"})
    with pytest.raises(ValueError, match="different labels"):
        compare(build_pipeline("textcat", ckpts["textcat"], settings={"device": "cpu"}), other, parts["test"],
                tmp_path / "labels")
    exclusive = build_pipeline("textcat", ckpts["textcat"], settings={"device": "cpu"})
    multi = build_pipeline("textcat", ckpts["textcat"], settings={"device": "cpu", "multi_label": True})
    with pytest.raises(ValueError, match="not the same metric"):
        compare(exclusive, multi, parts["test"], tmp_path / "kinds")
    with pytest.raises(ValueError, match="needs replicates"):
        compare(parts["pipeline"], parts["pipeline"], parts["test"], tmp_path / "none",
                bootstrap=BootstrapSettings(replicates=0))
    assert not any((tmp_path / d).exists() for d in ("tasks", "labels", "kinds", "none"))


def test_promotion_rules_better_significant_and_no_worse(tiny_pipelines, mlflow_project):
    from mlflow.tracking import MlflowClient

    from spacy_llm_components.stages import registry
    from spacy_llm_components.stages.shared.references import RegistryError

    parts = tiny_pipelines["textcat"]
    metrics = parts["evaluation"] / "metrics.json"
    registry.register(parts["pipeline"], "rules", metrics=metrics)
    assert registry.promote("rules").promoted  # no champion yet
    import shutil

    copy = mlflow_project / "copy"  # the same weights as another version (one more file: another fingerprint)
    shutil.copytree(parts["pipeline"], copy)
    (copy / "NOTE.txt").write_text("a copy")
    registry.register(copy, "rules", metrics=metrics)
    test = str(parts["test"])
    with pytest.raises(RegistryError, match="--margin -1"):
        registry.promote("rules", test=test, rule="no-worse", margin=-1)
    with pytest.raises(RegistryError, match="pass --test"):
        registry.promote("rules", rule="significant")
    assert registry.RULE_TAG not in MlflowClient().get_registered_model("rules").tags  # refused: nothing kept
    # the same weights: not better, not significantly better, but no worse
    assert not registry.promote("rules", test=test).promoted
    decision = registry.promote("rules", test=test, rule="significant")
    assert not decision.promoted and "difference +0.00 points" in decision.reason and "reaches 0" in decision.reason
    decision = registry.promote("rules", test=test, rule="no-worse", margin=0.5)
    assert decision.promoted and "above -0.5 points (no-worse)" in decision.reason
    tags = MlflowClient().get_registered_model("rules").tags
    assert tags[registry.RULE_TAG] == "no-worse" and float(tags[registry.MARGIN_TAG]) == 0.5


@pytest.mark.parametrize("rule, margin, low, high, passed", [
    ("significant", 0.5, 0.001, 0.02, True), ("significant", 0.5, -0.001, 0.02, False),
    ("no-worse", 0.5, -0.004, 0.01, True), ("no-worse", 0.5, -0.006, 0.01, False), ("no-worse", 0.0, 0.0, 0.0, True),
    ("no-worse", 0.0, -0.0001, 0.0, False)])
def test_paired_verdicts_by_rule(rule, margin, low, high, passed):
    """B (the challenger) against A (the champion): the rule reads the interval of B - A (fractions; the
    margin is in points)."""
    from spacy_llm_components.core.bootstrap import PairedDifference
    from spacy_llm_components.stages.registry import paired_verdict

    d = PairedDifference(a=0.80, b=0.81, difference=0.01, interval=(low, high), p_value=0.2)
    comparison = SimpleNamespace(primary="ents_f", primary_difference=d, settings=BootstrapSettings())
    got, reason = paired_verdict(comparison, rule, margin)
    assert got is passed, reason
    assert "challenger ents_f 81.00 vs champion's 80.00: difference +1.00 points" in reason
    assert f"[{100 * low:+.2f}, {100 * high:+.2f}]" in reason


def test_compare_one_head_of_pipelines_with_several(ckpts, tmp_path):
    """A multi-task pipeline (NER + textcat on one hf_encoder) against a one-head textcat pipeline, by the
    head named with --test HEAD=FILE: each side's accuracy equals its doc.cats' argmax against the gold."""
    import csv

    from conftest import demo_files, make_ckpt, save_tiny
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from spacy_llm_components.components.pipeline import build_pipeline

    ner = AutoModelForTokenClassification.from_pretrained(ckpts["ner"])  # an NER head on the textcat encoder
    ner.bert.load_state_dict(AutoModelForSequenceClassification.from_pretrained(ckpts["textcat"]).bert.state_dict(),
                             strict=False)  # (the token head has no pooler)
    save_tiny(ner, tmp_path / "ner-ckpt")
    shared = spacy.blank("en")
    shared.add_pipe("hf_encoder", name="encoder", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    shared.add_pipe("hf_ner", name="ner", config={"encoder": "encoder", "model": str(tmp_path / "ner-ckpt")})
    shared.add_pipe("hf_textcat", name="textcat", config={"encoder": "encoder"})
    shared.initialize()
    shared.to_disk(tmp_path / "shared")
    other = make_ckpt(tmp_path / "other-ckpt", "textcat", seed=7, num_labels=2, id2label={0: "neg", 1: "pos"},
                      label2id={"neg": 0, "pos": 1})
    alone = build_pipeline("textcat", other, settings={"device": "cpu"})
    alone.to_disk(tmp_path / "alone")
    with open(demo_files("textcat")[2], encoding="utf8", newline="") as f:  # the demo's texts, the checkpoints' labels
        rows = [{"text": r["text"], "label": r["label"][:3]} for r in csv.DictReader(f)]
    test = tmp_path / "test.csv"
    with open(test, "w", encoding="utf8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    right = []
    for nlp in (spacy.load(tmp_path / "shared"), spacy.load(tmp_path / "alone")):
        docs = list(nlp.pipe(r["text"] for r in rows))
        right.append(np.array([max(d.cats, key=d.cats.get) == r["label"] for d, r in zip(docs, rows)]))
    assert (right[0] != right[1]).any()  # the two heads decide differently: the comparison has something to show
    expected = [r.mean() for r in right]
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "shared"), str(tmp_path / "alone"), "--test",
                                      f"textcat={test}", "-o", str(tmp_path / "cmp"), "--bootstrap-replicates", "100"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    accuracy = data["scores"]["cats_accuracy"]
    assert data["head"] == "textcat" and data["task"] == "textcat"
    assert (accuracy["a"], accuracy["b"]) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    assert accuracy["difference"] == pytest.approx(expected[1] - expected[0])
    assert data["mcnemar"]["only_a_right"] == int((right[0] & ~right[1]).sum())
    assert data["mcnemar"]["only_b_right"] == int((right[1] & ~right[0]).sum())
    refused = CliRunner().invoke(app, ["compare", str(tmp_path / "shared"), str(tmp_path / "alone"), "--test",
                                       str(test), "-o", str(tmp_path / "no-head")])
    assert refused.exit_code == 2 and "HEAD=FILE" in refused.output
    unknown = CliRunner().invoke(app, ["compare", str(tmp_path / "shared"), str(tmp_path / "alone"), "--test",
                                       f"sentiment={test}", "-o", str(tmp_path / "unknown")])
    assert unknown.exit_code == 2 and "no hf_* head 'sentiment'" in unknown.output
    assert not (tmp_path / "no-head").exists() and not (tmp_path / "unknown").exists()

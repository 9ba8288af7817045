"""The scorers registered for spaCy, on hand-built Examples: hand-computed values, seqeval for NER,
and the textcat component's own decision rule (argmax, or per-label thresholds)."""

import random

import pytest
import spacy
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from spacy.tokens import Doc, Span
from spacy.training import Example

from spacy_llm_components.tasks.ner import score_ner
from spacy_llm_components.tasks.qa import score_squad
from spacy_llm_components.tasks.textcat import score_textcat


def cats_example(nlp, gold: str, predicted: dict) -> Example:
    labels = ["a", "b", "c"]
    ref = nlp.make_doc("x")
    ref.cats = {label: float(label == gold) for label in labels}
    pred = nlp.make_doc("x")
    pred.cats = predicted
    return Example(pred, ref)


@pytest.mark.parametrize("top, rest", [(0.6, 0.2), (0.4, 0.3)])  # (0.4, 0.3): the argmax is under 0.5, still the class
def test_exclusive_textcat_metrics_by_hand(nlp, top, rest):
    # gold a a a b b c ; predicted a a b b c c
    pairs = [("a", "a"), ("a", "a"), ("a", "b"), ("b", "b"), ("b", "c"), ("c", "c")]
    examples = [cats_example(nlp, g, {l: (top if l == p else rest) for l in "abc"}) for g, p in pairs]
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
    assert scores["cats_score"] == scores["cats_accuracy"]  # the primary metric of exclusive classes
    # one-vs-rest AUC over the pairs (positive, negative), ties half:
    # a: positives top top rest, negatives rest x3 -> (6 + 3/2) / 9; b: positives top rest, negatives
    # rest rest top rest -> (3 + 1/2 + 3/2) / 8; c: positive top, negatives rest x4 and top -> (4 + 1/2) / 5
    auc = {"a": 7.5 / 9, "b": 5 / 8, "c": 4.5 / 5}
    assert scores["cats_auc_per_type"] == pytest.approx(auc)
    assert scores["cats_macro_auc"] == pytest.approx(sum(auc.values()) / 3)


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
    from spacy_llm_components.core.decode import tags_to_entities

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


# -- multi-label: the component's thresholds decide --------------------------------------------------
THRESHOLDS = {"a": 0.3, "b": 0.8}  # c keeps the shared 0.5
MULTI = [  # gold labels, predicted probabilities -> decided with THRESHOLDS
    ({"a"}, {"a": 0.4, "b": 0.7, "c": 0.6}),  # -> a, c
    ({"a", "b"}, {"a": 0.2, "b": 0.85, "c": 0.1}),  # -> b
    ({"c"}, {"a": 0.35, "b": 0.9, "c": 0.45}),  # -> a, b
    ({"b"}, {"a": 0.1, "b": 0.81, "c": 0.2}),  # -> b
]


def multi_examples(nlp):
    examples = []
    for gold, probs in MULTI:
        ref, pred = nlp.make_doc("x"), nlp.make_doc("x")
        ref.cats = {label: float(label in gold) for label in "abc"}
        pred.cats = dict(probs)
        examples.append(Example(pred, ref))
    return examples


def check_multi_label_scores(scores):
    # a: TP 1 (doc 1), FP 1 (doc 3), FN 1 (doc 2); b: TP 2, FP 1; c: TP 0, FP 1, FN 1
    per = scores["cats_f_per_type"]
    assert per["a"] == pytest.approx({"p": 0.5, "r": 0.5, "f": 0.5})
    assert per["b"] == pytest.approx({"p": 2 / 3, "r": 1.0, "f": 0.8})
    assert per["c"] == pytest.approx({"p": 0.0, "r": 0.0, "f": 0.0})
    assert scores["cats_micro_p"] == pytest.approx(3 / 6) and scores["cats_micro_r"] == pytest.approx(3 / 5)
    assert scores["cats_macro_f"] == pytest.approx(1.3 / 3) == scores["cats_score"]  # macro F is primary
    assert scores["cats_accuracy"] == pytest.approx(1 / 4)  # only doc 4's decided set equals its gold set


def test_multi_label_scores_follow_per_label_thresholds(nlp):
    scores = score_textcat(multi_examples(nlp), labels=list("abc"), multi_label=True, threshold=0.5,
                           thresholds=THRESHOLDS)
    check_multi_label_scores(scores)


def _multi_label_component(ckpts):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["multilabel"]), "device": "cpu",
                                       "thresholds": THRESHOLDS})
    return nlp, nlp.get_pipe("hf_textcat")


def test_the_component_scores_what_labels_for_decides(ckpts):
    nlp, pipe = _multi_label_component(ckpts)
    pipe.checkpoint  # (loaded: see the next test)
    examples = multi_examples(nlp)
    decided = [set(pipe.labels_for(eg.predicted)) for eg in examples]
    assert decided == [{"a", "c"}, {"b"}, {"a", "b"}, {"b"}]
    scores = pipe.score(examples)  # spaCy's Pipe.score: the component's settings go to its scorer
    check_multi_label_scores(scores)
    # and the counts behind them are those of labels_for
    for label in "abc":
        gold = [label in g for g, _ in MULTI]
        mine = [label in d for d in decided]
        tp = sum(g and m for g, m in zip(gold, mine))
        p = tp / sum(mine) if sum(mine) else 0.0
        r = tp / sum(gold) if sum(gold) else 0.0
        assert scores["cats_f_per_type"][label]["p"] == pytest.approx(p)
        assert scores["cats_f_per_type"][label]["r"] == pytest.approx(r)


def test_the_component_scores_multi_label_before_its_checkpoint_loads(ckpts):
    nlp, pipe = _multi_label_component(ckpts)
    check_multi_label_scores(pipe.score(multi_examples(nlp)))

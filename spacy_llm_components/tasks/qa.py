"""Extractive question answering: answer spans for the questions in `doc._.questions`."""

from typing import Any, Callable, Dict, Iterable, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from spacy.training import Example
from spacy.util import registry

from ..core.bootstrap import DocStatistics
from ..core.calibration import TemperatureProblem, best_null_threshold
from ..core.constants import NULL_MARGIN
from ..core.decode import log_softmax
from ..core.metrics import exact_match, squad_scores, token_f1
from ..data.errors import DataError
from ..data.squad import read_squad
from ..data.types import Loaded
from .base import Demo, TaskSpec, TunedThresholds, by_confidence, error_record, kl_divergence, register_task

PADDING_LOGIT = -1e4  # a padded position's logit when the start/end softmax is taken over the input


class QASpec(TaskSpec):
    name, hf_task, factory = "qa", "question-answering", "hf_qa"
    head = "span"
    primary = "qa_f1"
    score_weights = {"qa_f1": 1.0, "qa_exact": 0.0}
    formats = (".json", ".spacy")
    has_labels = False
    targets = ("start_positions", "end_positions")
    gold_description = "questions with gold answers (doc._.qas)"
    description = "extractive question answering (hf_qa)"
    input_example = {"text": ["The Lindenfeld bridge was finished in 1894 by the engineer Ada Brenner."],
                     "questions": [["When was the bridge finished?", "Who built the bridge?"]]}
    request_note = " with a `questions` list per row"
    output_columns = {"answers": ("spans", {"question": "string"})}
    corpus_formats = (".json",)
    demo = Demo(("train.json", "dev.json", "test.json"), {"epochs": 6, "lr": 1e-4, "batch_size": 8, "max_length": 256},
                {"dataframe_records": [{"text": "The Korvell mill was built in 1887 by Tomas Ekdahl on the river Sarn. "
                                                "It ground wheat for the town of Ostbrook until 1952.",
                                        "questions": ["Who built the Korvell mill?", "When was the mill built?"]}]})

    def has_gold(self, doc):
        return bool(doc._.qas)

    def read(self, path, nlp, bad, options):
        pairs = read_squad(path, nlp, bad)
        return Loaded(path, [d for d, _ in pairs], groups=[title for _, title in pairs])

    def check_docbin(self, path, docs):
        for i, doc in enumerate(docs):
            if not doc._.qas:
                raise DataError(path, f"record {i}", "doc has no questions (doc._.qas)")
        return Loaded(path, docs)

    def describe(self, docs):
        qas = [qa for d in docs for qa in d._.qas]
        return {**super().describe(docs), "questions": len(qas), "impossible": sum(qa["is_impossible"] for qa in qas)}

    def summary_line(self, counts):
        return f"{counts['docs']:,} docs, {counts['questions']:,} questions"

    def component_settings(self, labels, multi_label, train_docs):
        impossible = any(qa["is_impossible"] for doc in train_docs for qa in doc._.qas)
        return {"handle_impossible": True} if impossible else {}  # SQuAD 2.0: the model learned to abstain

    def unlabelled(self, doc, pipe):
        doc._.qas = [{"id": f"unlabelled-{i}", "question": question, "answers": [], "is_impossible": True}
                     for i, question in enumerate(doc._.questions or [])]
        return doc

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # start and end distributions
        padding = batch["attention_mask"] == 0
        kl = [kl_divergence(getattr(student, name).float().masked_fill(padding, -1e4) / temperature,
                  getattr(teacher, name).float().masked_fill(padding, -1e4) / temperature).mean()
              for name in ("start_logits", "end_logits")]
        return (kl[0] + kl[1]) / 2 * temperature ** 2

    def gold_loss(self, student, batch, pipe):
        gold = batch["gold"].bool()
        if not gold.any():
            return student.start_logits.sum() * 0.0
        return (F.cross_entropy(student.start_logits.float()[gold], batch["start_positions"][gold])
                + F.cross_entropy(student.end_logits.float()[gold], batch["end_positions"][gold])) / 2

    def calibration_rows(self, output, batch, pipe):  # start and end positions, each a softmax over the input
        padding = batch["attention_mask"] == 0
        rows = [getattr(output, name).float().masked_fill(padding, PADDING_LOGIT) for name in ("start_logits",
                                                                                                "end_logits")]
        targets = [batch["start_positions"], batch["end_positions"]]
        return torch.cat(rows).cpu().numpy(), torch.cat(targets).cpu().numpy()

    def errors(self, examples, pipe):  # questions whose best answer matches no gold answer exactly
        records = []
        for i, eg in enumerate(examples):
            best = {}
            for span in eg.predicted.spans.get(pipe.spans_key, []):
                best.setdefault(span._.question, span)
            for question, answers in question_golds(eg, pipe.spans_key):
                span = best.get(question)
                predicted = span.text if span is not None else ""
                if max(exact_match(predicted, a) for a in (answers or [""])) == 1.0:
                    continue
                kind = ("false_negative" if span is None else "false_positive" if not answers else "wrong_answer")
                records.append(error_record(i, eg.predicted, kind, question=question, predicted=predicted or None,
                                            gold=list(answers), score=span._.score if span is not None else None,
                                            f1=max((token_f1(predicted, a) for a in answers), default=0.0)))
        return by_confidence(records)

    def tune_thresholds(self, pipe, examples, request):  # SQuAD 2.0: the no-answer threshold, for F1
        golds = [dict(question_golds(eg, pipe.spans_key)) for eg in examples]
        if not (request.f1 and pipe.handle_impossible and any(not a for g in golds for a in g.values())):
            return TunedThresholds()
        handle = pipe.handle_impossible
        pipe.handle_impossible = False  # every question's best answer, and its margin to the null score
        try:
            docs = list(pipe.pipe(eg.predicted.copy() for eg in examples))  # (their questions come along)
        finally:
            pipe.handle_impossible = handle
        margin, f1, em, impossible = [], [], [], []
        for doc, gold in zip(docs, golds):
            group = doc.spans.get(pipe.spans_key)
            best = {}
            for span in group or []:
                best.setdefault(span._.question, span.text)
            for question, answers in gold.items():
                margin.append(group.attrs[NULL_MARGIN].get(question, np.inf) if group is not None else np.inf)
                predicted = best.get(question, "")
                f1.append(max(token_f1(predicted, a) for a in answers) if answers else 0.0)
                em.append(max(exact_match(predicted, a) for a in answers) if answers else 0.0)
                impossible.append(not answers)
        margin, impossible = np.array(margin), np.array(impossible)
        threshold, best_f1 = best_null_threshold(np.nan_to_num(margin, posinf=1e9), np.array(f1), impossible)
        abstain = margin > threshold
        exact = np.where(abstain, impossible, np.where(impossible, 0.0, em)).mean()
        return TunedThresholds({"null_threshold": threshold}, {"qa_exact": float(exact), "qa_f1": best_f1})

    def temperature_problem(self, pipe, examples):
        """Each question's best answer's score (p_start * p_end in its window) against whether it matches a
        gold answer exactly, so that the fitted temperature makes `span._.score` say how often an answer is
        right (fitted on the start and end positions' NLL instead, it stays far too low: the probability of
        an answer's span is spread over the spans overlapping it)."""
        windows = pipe.best_answer_logits([eg.predicted for eg in examples])
        rows, chosen, right = [], [], []
        for eg, per_question in zip(examples, windows):
            best = {}
            for span in eg.predicted.spans.get(pipe.spans_key, []):
                best.setdefault(span._.question, span)
            for question, answers in question_golds(eg, pipe.spans_key):
                span = best.get(question)
                if span is None or span._.score is None or question not in per_question:
                    continue
                start, end, s, e = per_question[question]
                if abs(float(np.exp(log_softmax(start)[s] + log_softmax(end)[e])) - span._.score) > 1e-4:
                    continue  # (another window's span snapped to the same tokens)
                rows += [start, end]
                chosen += [s, e]
                right.append(max(exact_match(span.text, a) for a in (answers or [""])) == 1.0)
        width = max((len(r) for r in rows), default=1)
        padded = np.full((len(rows), width), -np.inf)
        for k, r in enumerate(rows):
            padded[k, :len(r)] = r
        return TemperatureProblem("segments", padded, np.array(right, dtype=bool), np.array(chosen, dtype=np.int64),
                                  np.repeat(np.arange(len(right)), 2), product=True)

    def confidences(self, examples, pipe):  # each question's best answer's score, right if an exact match
        scores, right = [], []
        for eg in examples:
            best = {}
            for span in eg.predicted.spans.get(pipe.spans_key, []):
                best.setdefault(span._.question, span)
            gold = dict(question_golds(eg, pipe.spans_key))
            for question, span in best.items():
                if question in gold and span._.score is not None:
                    scores.append(float(span._.score))
                    right.append(max(exact_match(span.text, g) for g in (gold[question] or [""])) == 1.0)
        return (np.array(scores, dtype=np.float64), np.array(right, dtype=bool),
                "each question's best answer's score (span._.score), right when it matches a gold answer exactly")

    def input_doc(self, nlp, reference):
        doc = nlp.make_doc(reference.text)
        if reference._.qas:
            doc._.questions = [qa["question"] for qa in reference._.qas]
        return doc

    def scores(self, examples, pipe):
        return score_squad(examples, spans_key=pipe.spans_key), {}, None

    def doc_statistics(self, examples, pipe):  # a context and all its questions are drawn together
        values = np.zeros((len(examples), 3))
        for i, eg in enumerate(examples):
            for prediction, answers in question_pairs(eg, pipe.spans_key):
                golds = list(answers) or [""]
                values[i] += (max(exact_match(prediction, g) for g in golds),
                              max(token_f1(prediction, g) for g in golds), 1)

        def metrics(sums):
            questions = np.maximum(sums[:, 2], 1)
            return {"qa_exact": sums[:, 0] / questions, "qa_f1": sums[:, 1] / questions}

        return DocStatistics(values, metrics)


def score_squad(examples: Iterable[Example], *, spans_key: str = "answers", **_: Any) -> Dict[str, Any]:
    """SQuAD EM/F1 of predicted answers against the reference's answers, per question.

    Gold answers come from the reference's `doc._.qas` (character offsets, as
    `sllm prepare` writes them) or else from `doc.spans[spans_key]` (each with
    `span._.question`) for the questions in `doc._.questions`; a question
    without gold answers is unanswerable. The prediction for a question is its
    best (first) answer span, or "" when there is none.
    """
    return squad_scores(pair for eg in examples for pair in question_pairs(eg, spans_key))


def question_pairs(eg: Example, spans_key: str) -> List[Tuple[str, List[str]]]:
    """(predicted answer text, gold answer texts) for each question of one example."""
    predicted: Dict[str, str] = {}
    for span in eg.predicted.spans.get(spans_key, []):
        predicted.setdefault(span._.question, span.text)
    return [(predicted.get(q, ""), answers) for q, answers in question_golds(eg, spans_key)]


def question_golds(eg: Example, spans_key: str) -> List[Tuple[str, List[str]]]:
    """(question, gold answer texts) of one example: from `doc._.qas`, else the reference's answer spans."""
    gold: Dict[str, List[str]] = {}
    if eg.reference._.qas:
        for qa in eg.reference._.qas:
            gold.setdefault(qa["question"], []).extend(a["text"] for a in qa["answers"])
    else:
        gold = {q: [] for q in (eg.reference._.questions or [])}
        for span in eg.reference.spans.get(spans_key, []):
            gold.setdefault(span._.question, []).append(span.text)
    return list(gold.items())


@registry.scorers("spacy_llm_components.squad_scorer.v1")
def make_squad_scorer() -> Callable:
    return score_squad


QA = register_task(QASpec())

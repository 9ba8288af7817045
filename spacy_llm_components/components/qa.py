"""hf_qa: `AutoModelForQuestionAnswering` (extractive QA) as a spaCy component writing answer spans."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from spacy.language import Language
from spacy.tokens import Doc, Span, SpanGroup

from ..core.align import snap_to_tokens, unit_piece_ranges, window_spans
from ..core.constants import NULL_MARGIN
from ..core.decode import answer_candidates
from ..core.settings import setting
from ..tasks.qa import QA
from .base import Feature, HFPipe, ModelInput, span_record
from .settings import SharedSettings, component_factory

ANSWER_LABEL = "ANSWER"


@dataclass
class QASettings(SharedSettings):
    """hf_qa's settings (`[components.qa]` in a config)."""

    questions: List[str] = setting([], "questions asked of every doc without its own `doc._.questions`")
    spans_key: str = setting("answers", "the span group the answers go to")
    top_k: int = setting(1, "answers per question, best first", ge=1)
    max_answer_len: int = setting(30, "longest answer in word pieces", ge=1)
    max_question_len: int = setting(64, "word pieces of a question kept (at most half the input)", ge=1)
    doc_stride: int = setting(128, "word pieces two windows of a long context overlap by", ge=0)
    handle_impossible: bool = setting(False, "SQuAD 2.0: no answer where the null score wins by `null_threshold`")
    null_threshold: float = setting(0.0, "how far the no-answer score must beat the best answer (`sllm calibrate` "
                                         "tunes it on dev data with unanswerable questions)")
    batch_size: int = setting(32, "sequences per forward pass (length-sorted batches)", ge=1)
    max_length: Optional[int] = setting(384, "question + context window in word pieces; null: the model's limit", ge=8)
    scorer: Optional[Callable] = setting({"@scorers": "spacy_llm_components.squad_scorer.v1"},
                                         "the scorer `nlp.evaluate` uses")


@dataclass
class Answer:
    """One answer: a token range of the doc, the question it answers, and its score."""

    question: str
    start: int
    end: int
    score: float


@dataclass
class DocAnswers:
    """A doc's answers, and per question how far the no-answer score beat the best answer (negative: it
    did not); with `handle_impossible`, a question whose margin exceeds `null_threshold` gets no answer."""

    answers: List[Answer]
    null_margin: Dict[str, float]


class HFQuestionAnswerer(HFPipe):
    """Answers the questions in `doc._.questions` (else the config's `questions`) from the doc's text.

    Answers become Spans in `doc.spans[spans_key]`, snapped to spaCy tokens,
    grouped by question in question order and best first within a question,
    each with `span._.question` and `span._.score`. Long contexts run as windows
    overlapping by `doc_stride` pieces. With `handle_impossible`, a question
    whose no-answer score beats the best answer by more than `null_threshold`
    gets no answer (SQuAD 2.0).
    """

    spec = QA
    output_names = ("start_logits", "end_logits")
    reads_hidden = False  # question + context in one sequence: its own pass, on a shared encoder's weights

    def __init__(self, nlp: Language, name: str, settings: QASettings) -> None:
        super().__init__(nlp, name, settings)
        self.questions = list(settings.questions)
        self.spans_key = settings.spans_key
        self.top_k = settings.top_k
        self.max_answer_len = settings.max_answer_len
        self.max_question_len = settings.max_question_len
        self.doc_stride = settings.doc_stride
        self.handle_impossible = settings.handle_impossible
        self.null_threshold = settings.null_threshold
        self.cfg = {"spans_key": settings.spans_key}

    def writes(self) -> List[str]:
        return [f"doc.spans[{self.spans_key!r}]"]

    def _questions_of(self, doc: Doc) -> List[str]:
        asked = doc._.questions
        if asked is None:
            return self.questions
        if isinstance(asked, str):
            return [asked]
        if not all(isinstance(q, str) for q in asked):
            raise TypeError(f"{self.name}: doc._.questions must be a string or a list of strings, got {asked!r}")
        return list(asked)

    def _pair(self, question: Sequence[int], context: Sequence[int]) -> Tuple[ModelInput, int]:
        """Model input for (question, context slice) and the position where the context starts."""
        sp = self.specials
        pre_t, q_t, mid_t, c_t, suf_t = sp.pair_types
        ids = sp.pair_prefix + list(question) + sp.pair_middle + list(context) + sp.pair_suffix
        types = pre_t + [q_t] * len(question) + mid_t + [c_t] * len(context) + suf_t
        return ModelInput(ids, types), len(sp.pair_prefix) + len(question) + len(sp.pair_middle)

    def _question_ids(self, questions: Sequence[str]) -> Dict[str, List[int]]:
        """Word pieces per distinct question, cut so at least half the input is left to the context."""
        unique = sorted(set(questions))
        q_len = min(self.max_question_len, self.max_length // 2)
        return {q: enc.ids[:q_len] for q, enc in zip(unique, self._encode(unique))} if unique else {}

    def _windows(self, question: Sequence[int], context: Sequence[int]) -> List[Tuple[ModelInput, int, int, int]]:
        """(model input, context piece start, input position of the context start, window length) per
        window of the context that fits beside the question."""
        window = self.max_length - len(question) - self.specials.n_pair
        spans = window_spans(len(context), window, self.doc_stride) if len(context) else []
        out = []
        for start, end in spans:
            model_input, offset = self._pair(question, context[start:end])
            out.append((model_input, start, offset, end - start))
        return out

    def features(self, docs: Sequence[Doc]) -> List[Feature]:
        """Training features from gold `doc._.qas`: one per (question, context window), with the first
        gold answer's start/end piece, or the null position (CLS) when the window does not hold it
        (or the question is unanswerable), as in Hugging Face's run_qa."""
        if not self.specials.pair_prefix:
            raise ValueError(f"{self.name}: the tokenizer puts no token before the question; training "
                             "needs one (CLS) as the no-answer position")
        qas = [doc._.qas or [] for doc in docs]
        q_ids = self._question_ids([qa["question"] for qs in qas for qa in qs])
        features = []
        for doc, questions, ctx in zip(docs, qas, self._encode([d.text for d in docs])):
            for qa in questions:
                answer = (0, 0)
                if qa["answers"] and not qa["is_impossible"]:
                    gold = qa["answers"][0]
                    answer = unit_piece_ranges([(gold["start"], gold["start"] + len(gold["text"]))], ctx.offsets)[0]
                for model_input, start, offset, length in self._windows(q_ids[qa["question"]], ctx.ids):
                    inside = answer[1] > answer[0] and start <= answer[0] and answer[1] <= start + length
                    first, last = (offset + answer[0] - start, offset + answer[1] - 1 - start) if inside else (0, 0)
                    features.append(model_input.feature(start_positions=first, end_positions=last))
        return features

    def _search(self, docs: Sequence[Doc]):
        """Every window of every (doc, question) through the model, its answer candidates snapped to spaCy
        tokens: (questions per doc; per doc and question, token span -> (best score, window, start, end in
        it); each (doc, question)'s least no-answer score; each window's logits and context range)."""
        asked = [self._questions_of(doc) for doc in docs]
        q_ids = self._question_ids([q for qs in asked for q in qs])
        contexts = self._encode([d.text for d in docs]) if q_ids else [None] * len(docs)
        null_index = 0 if self.specials.pair_prefix else None
        inputs: List[ModelInput] = []
        plan = []  # (doc index, question, context piece start, input position of context start, window length)
        for i, (questions, ctx) in enumerate(zip(asked, contexts)):
            for question in questions:
                for model_input, start, offset, length in self._windows(q_ids[question], ctx.ids):
                    inputs.append(model_input)
                    plan.append((i, question, start, offset, length))
        found: List[Dict[str, Dict[Tuple[int, int], Tuple[float, int, int, int]]]] = [{q: {} for q in qs}
                                                                                     for qs in asked]
        null: Dict[Tuple[int, str], float] = {}
        bounds = [([t.idx for t in doc], [t.idx + len(t) for t in doc]) for doc in docs]
        windows = []
        for j, ((i, question, start, offset, length), (start_logits, end_logits)) in enumerate(
                zip(plan, self._forward(inputs))):
            windows.append((start_logits, end_logits, offset, length))
            candidates, null_score = answer_candidates(
                # extra candidates: several can snap to the same tokens and count once
                start_logits / self.temperature, end_logits / self.temperature, (offset, offset + length),
                self.max_answer_len, 4 * self.top_k, null_index
            )
            null[(i, question)] = min(null.get((i, question), 1.0), null_score)
            offsets = contexts[i].offsets
            best = found[i][question]
            for s, e, score in candidates:
                # snap before ranking, so spans that snap to the same tokens count once towards top_k
                tokens = snap_to_tokens((offsets[start + s - offset][0], offsets[start + e - offset][1]), *bounds[i])
                if tokens is not None and score > best.get(tokens, (0.0,))[0]:
                    best[tokens] = (score, j, s, e)
        return asked, found, null, windows

    def _predict_prepared(self, docs: Sequence[Doc], prepared: None) -> List["DocAnswers"]:
        asked, found, null, _ = self._search(docs)
        results = []
        for i, questions in enumerate(asked):
            answers, margins = [], {}
            for question in dict.fromkeys(questions):
                ranked = sorted(((k, v[0]) for k, v in found[i][question].items()), key=lambda kv: -kv[1])[: self.top_k]
                margins[question] = null.get((i, question), 0.0) - (ranked[0][1] if ranked else 0.0)
                if self.handle_impossible and (not ranked or margins[question] > self.null_threshold):
                    continue
                answers.extend(Answer(question, s, e, score) for (s, e), score in ranked)
            results.append(DocAnswers(answers, margins))
        return results

    def best_answer_logits(self, docs: Sequence[Doc]) -> List[Dict[str, Tuple[np.ndarray, np.ndarray, int, int]]]:
        """Per doc and question, what its best answer's score is made of: the start and end logits of the
        window it came from (-inf outside the context and the null position, as the softmax takes them)
        and the answer's start and end there. (The score is p_start * p_end at the head's temperature.)"""
        asked, found, _, windows = self._search(docs)
        null_index = 0 if self.specials.pair_prefix else None
        out = []
        for i, questions in enumerate(asked):
            per_question = {}
            for question in dict.fromkeys(questions):
                if found[i][question]:
                    _, j, s, e = max(found[i][question].values())
                    start_logits, end_logits, offset, length = windows[j]
                    keep = np.zeros(len(start_logits), dtype=bool)
                    keep[offset:offset + length] = True
                    if null_index is not None:
                        keep[null_index] = True
                    per_question[question] = (np.where(keep, start_logits, -np.inf),
                                              np.where(keep, end_logits, -np.inf), s, e)
            out.append(per_question)
        return out

    def record(self, doc: Doc) -> Dict[str, List[Dict[str, Any]]]:
        return {"answers": [{"question": s._.question, **span_record(s)} for s in doc.spans.get(self.spans_key, [])]}

    def set_annotations(self, docs: Sequence[Doc], predictions: Sequence["DocAnswers"]) -> None:
        for doc, predicted in zip(docs, predictions):
            spans = []
            for ans in predicted.answers:
                span = Span(doc, ans.start, ans.end, label=ANSWER_LABEL, span_id=doc.vocab.strings.add(ans.question))
                span._.question = ans.question
                span._.score = ans.score
                spans.append(span)
            group = SpanGroup(doc, name=self.spans_key, spans=spans)
            group.attrs[NULL_MARGIN] = predicted.null_margin
            doc.spans[self.spans_key] = group


make_hf_qa = component_factory("hf_qa", QASettings, HFQuestionAnswerer, module=__name__, assigns=["doc.spans"],
                               default_score_weights=QA.score_weights)


def ask(nlp: Language, context: str, questions: Union[str, Sequence[str]]) -> List[Span]:
    """Answer question(s) about `context` with the pipeline's hf_qa component; spans best first per question."""
    qa = [pipe for _, pipe in nlp.pipeline if isinstance(pipe, HFQuestionAnswerer)]
    if not qa:
        raise ValueError(f"the pipeline has no hf_qa component (it has {nlp.pipe_names})")
    doc = nlp.make_doc(context)
    doc._.questions = [questions] if isinstance(questions, str) else list(questions)
    doc = nlp(doc)
    return list(doc.spans[qa[0].spans_key])

"""hf_qa: answers as spans with their question and score; windows; SQuAD 2.0 null answers."""

import pytest
import spacy
from conftest import model_inputs
from spacy.training import Example

from spacy_llm_components import ask
from spacy_llm_components.core.metrics import exact_match, token_f1

CONTEXT = "The Eiffel Tower is in Paris. It was finished in 1889 by Gustave Eiffel's company."


def qa_nlp(model, **config):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_qa", config={"model": str(model), "device": "cpu", **config})
    return nlp


def test_no_questions_gives_no_answers_and_no_error(ckpts):
    doc = qa_nlp(ckpts["qa"])(CONTEXT)
    assert list(doc.spans["answers"]) == []


def test_answers_from_doc_questions_best_first_per_question(ckpts):
    nlp = qa_nlp(ckpts["qa"], top_k=3)
    doc = nlp.make_doc(CONTEXT)
    doc._.questions = ["Where is the tower?", "When was it finished?"]
    answers = list(nlp(doc).spans["answers"])
    assert [a._.question for a in answers] == ["Where is the tower?"] * 3 + ["When was it finished?"] * 3
    for q in doc._.questions:
        scores = [a._.score for a in answers if a._.question == q]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert all(a.end_char <= len(CONTEXT) and len(a) <= 30 for a in answers)


def test_config_questions_and_ask(ckpts):
    nlp = qa_nlp(ckpts["qa"], questions=["Who built it?"])
    doc = nlp(CONTEXT)
    assert [a._.question for a in doc.spans["answers"]] == ["Who built it?"]
    spans = ask(nlp, CONTEXT, "Where?")
    assert len(spans) == 1 and spans[0]._.question == "Where?"
    with pytest.raises(ValueError, match="no hf_qa"):
        ask(spacy.blank("en"), CONTEXT, "Where?")


def test_same_answer_span_for_two_questions_keeps_both_questions(ckpts):
    nlp = qa_nlp(ckpts["qa"])
    doc = nlp.make_doc(CONTEXT)
    doc._.questions = ["Q one?", "Q one? "]  # near-identical questions: same best span
    answers = list(nlp(doc).spans["answers"])
    assert [a._.question for a in answers] == ["Q one?", "Q one? "]


@pytest.fixture(scope="module")
def plain_words(ckpts):
    """Distinct words of one word piece and one spaCy token each: every candidate span then lies on word
    and token boundaries, and no answer text repeats (Hugging Face's pipeline adds up the scores of
    answers with the same text)."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(ckpts["qa"]).get_vocab()
    nlp = spacy.blank("en")
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w.isascii() and w.isalpha() and len(w) > 3]
    return [w for w in words[:400] if len(nlp.make_doc(w)) == 1][:240]


def hf_window_answers(model_dir, question, context, windows, top_k, max_answer_len):
    """Reference: Hugging Face's question-answering pipeline on the same checkpoint, run on each window's
    text (character ranges of `context`); a span found in several windows keeps its best score."""
    from transformers import pipeline

    qa = pipeline("question-answering", model=str(model_dir), device="cpu")
    best = {}
    for start, end in windows:
        found = qa(question=question, context=context[start:end], top_k=top_k, max_answer_len=max_answer_len,
                   max_seq_len=64)
        for answer in found if isinstance(found, list) else [found]:
            key = (start + answer["start"], start + answer["end"])
            best[key] = max(best.get(key, 0.0), float(answer["score"]))
    return sorted(best.items(), key=lambda kv: -kv[1])[:top_k]


@pytest.mark.parametrize("n_words, doc_stride", [(30, 8), (200, 0), (200, 8), (200, 27)])
def test_answers_equal_the_transformers_pipeline_window_by_window(ckpts, plain_words, n_words, doc_stride):
    words = plain_words[:n_words]
    context = " ".join(words)
    question = "When was the mill built?"
    nlp = qa_nlp(ckpts["qa"], top_k=3, max_length=64, doc_stride=doc_stride, max_answer_len=6)
    pipe = nlp.get_pipe("hf_qa")
    seen = model_inputs(pipe)
    ours = [((a.start_char, a.end_char), a._.score) for a in ask(nlp, context, question)]

    # windows of `size` words (one piece each) beside the question and [CLS] [SEP] [SEP], sharing doc_stride
    size = 64 - len(pipe.checkpoint.tokenizer(question, add_special_tokens=False)["input_ids"]) - 3
    starts = list(range(0, max(n_words - doc_stride, 1), size - doc_stride))
    word_windows = [(s, min(s + size, n_words)) for s in starts if s == 0 or s + doc_stride < n_words]
    assert word_windows[-1][1] == n_words and len(seen) == len(word_windows)
    assert (len(seen) > 3) == (n_words > size)
    char_start = [0]
    for w in words:
        char_start.append(char_start[-1] + len(w) + 1)
    windows = [(char_start[s], char_start[e] - 1) for s, e in word_windows]
    reference = hf_window_answers(ckpts["qa"], question, context, windows, 3, 6)
    assert [span for span, _ in ours] == [span for span, _ in reference]
    assert [score for _, score in ours] == pytest.approx([score for _, score in reference], rel=1e-4)


def test_null_threshold_decides_unanswerable(ckpts):
    never = qa_nlp(ckpts["qa"], handle_impossible=True, null_threshold=-1.0)
    always = qa_nlp(ckpts["qa"], handle_impossible=True, null_threshold=1.0)
    assert ask(never, CONTEXT, "What?") == []
    assert len(ask(always, CONTEXT, "What?")) == 1


@pytest.mark.parametrize("text", ["", "   ", "🚀 火箭 ракета", "\x00\x01", "z " * 2000])
def test_bad_input_runs(ckpts, text):
    spans = ask(qa_nlp(ckpts["qa"]), text, "What is it?")
    assert all(s.text.strip() for s in spans)
    if not text.strip():
        assert spans == []


def test_questions_must_be_strings(ckpts):
    nlp = qa_nlp(ckpts["qa"])
    doc = nlp.make_doc(CONTEXT)
    doc._.questions = [1, 2]
    with pytest.raises(TypeError, match="questions must be"):
        nlp(doc)


def test_squad_scorer_through_nlp_evaluate(ckpts):
    nlp = qa_nlp(ckpts["qa"])
    question = "Where is the tower?"
    predicted = nlp.make_doc(CONTEXT)
    predicted._.questions = [question]
    reference = nlp.make_doc(CONTEXT)
    reference._.questions = [question]
    gold = reference.char_span(23, 28, label="ANSWER", span_id=reference.vocab.strings.add(question))
    gold._.question = question
    reference.spans["answers"] = [gold]
    scores = nlp.evaluate([Example(predicted, reference)])
    answer = ask(nlp, CONTEXT, question)[0].text
    assert scores["qa_exact"] == exact_match(answer, "Paris")
    assert scores["qa_f1"] == pytest.approx(token_f1(answer, "Paris"))


def test_a_question_longer_than_the_model_input_still_gets_answers(ckpts):
    """The tiny model takes 64 pieces: a 200-word question is cut so the context still fits."""
    nlp = qa_nlp(ckpts["qa"], max_question_len=500)
    spans = ask(nlp, CONTEXT, "where " * 200 + "?")
    assert len(spans) == 1 and spans[0].end_char <= len(CONTEXT)

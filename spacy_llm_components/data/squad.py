"""SQuAD v1.1 / v2.0 JSON for extractive QA: one Doc per paragraph (its context), with its
questions in `doc._.questions` and gold answers by character offset in `doc._.qas`."""

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from spacy.language import Language
from spacy.tokens import Doc

from .errors import BadRecords, DataError
from .text import read_text


def read_squad(path: Path, nlp: Language, bad: BadRecords) -> List[Tuple[Doc, str]]:
    """(doc, article title) per paragraph; a bad question is a bad record (its paragraph keeps the others)."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", f"not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(path, None, 'not SQuAD JSON: expected an object with a "data" list of articles')
    v2 = str(data.get("version", "")).startswith("v2") or any(
        isinstance(qa, dict) and "is_impossible" in qa
        for article in data["data"] if isinstance(article, dict)
        for paragraph in article.get("paragraphs") or [] if isinstance(paragraph, dict)
        for qa in paragraph.get("qas") or []
    )
    out = []
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            bad.report(DataError(path, f"record data[{a}]", 'article has no "paragraphs" list'))
            continue
        title = str(article.get("title", a))
        for p, paragraph in enumerate(paragraphs):
            where = f"record data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                bad.report(DataError(path, where, '"context" must be a non-empty string'))
                continue
            qas = []
            for q, qa in enumerate(paragraph.get("qas") or []):
                try:
                    qas.append(_question(path, f"{where}.qas[{q}]", qa, context, v2))
                except DataError as err:
                    bad.report(err)
            if qas:
                doc = nlp.make_doc(context)
                doc._.qas = qas
                doc._.questions = [x["question"] for x in qas]
                out.append((doc, title))
    return out


def _question(path: Path, where: str, qa: Any, context: str, v2: bool) -> Dict[str, Any]:
    if not isinstance(qa, dict):
        raise DataError(path, where, "a question must be an object")
    if "id" in qa:
        where = f"{where} (id {qa['id']})"
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, where, '"question" must be a non-empty string')
    answers = qa.get("answers", [])
    impossible = bool(qa.get("is_impossible", False))
    if not isinstance(answers, list):
        raise DataError(path, where, '"answers" must be a list')
    if impossible and answers:
        raise DataError(path, where, 'is_impossible is true but "answers" is not empty')
    if not impossible and not answers:
        hint = "" if v2 else " (SQuAD v1.1 has no unanswerable questions; v2.0 marks them is_impossible)"
        raise DataError(path, where, f"no answers{hint}")
    gold = []
    for i, answer in enumerate(answers):
        text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
            raise DataError(path, where, f"answer {i} needs a non-empty 'text' and an integer 'answer_start'")
        if context[start:start + len(text)] != text:
            raise DataError(path, where, f"answer {i} {text!r} is not at answer_start {start}: the context there "
                            f"reads {context[start:start + len(text)]!r}")
        gold.append({"text": text, "start": start})
    return {"id": str(qa.get("id", where)), "question": question.strip(), "answers": gold, "is_impossible": impossible}

"""Custom attributes: `Doc._.questions`, `Doc._.qas`, `Span._.score`, `Span._.question`.

`Doc._.qas` holds gold QA data by character offset (SQuAD style): a list of
{"id", "question", "answers": [{"text", "start"}], "is_impossible"}.

spaCy keys span attributes by character offsets only, so an entity and an
answer over the same characters would share one `score`. These attributes are
keyed by offsets, label and span id instead, and never collide.
"""

from functools import partial
from typing import Any, Tuple

from spacy.tokens import Doc, Span


def value_key(name: str, start_char: int, end_char: int, label: int, span_id: int = 0) -> Tuple[Any, ...]:
    """The user_data key of `span._.NAME` for a span with these offsets, label hash and id: what the
    components write directly, without a Span or spaCy's Underscore object (their hot path)."""
    return ("sllm", name, start_char, end_char, label, span_id)


def _key(span: Span, name: str) -> Tuple[Any, ...]:
    return value_key(name, span.start_char, span.end_char, span.label, span.id)


def _get(name: str, span: Span) -> Any:
    return span.doc.user_data.get(_key(span, name))


def _set(name: str, span: Span, value: Any) -> None:
    span.doc.user_data[_key(span, name)] = value



def register_extensions() -> None:
    """Register the attributes once; leaves attributes another package registered alone. Getters
    and setters are module-level functions (partials), so spaCy can pickle them for worker processes
    started with `spawn`."""
    for name in ("score", "question"):
        if not Span.has_extension(name):
            Span.set_extension(name, getter=partial(_get, name), setter=partial(_set, name))
    for name in ("questions", "qas"):
        if not Doc.has_extension(name):
            Doc.set_extension(name, default=None)

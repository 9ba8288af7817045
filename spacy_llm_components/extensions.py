"""Custom attributes: `Doc._.questions`, `Doc._.qas`, `Span._.score`, `Span._.question`.

`Doc._.qas` holds gold QA data by character offset (SQuAD style): a list of
{"id", "question", "answers": [{"text", "start"}], "is_impossible"}.

spaCy keys span attributes by character offsets only, so an entity and an
answer over the same characters would share one `score`. These attributes are
keyed by offsets, label and span id instead, and never collide.
"""

from typing import Any, Callable, Tuple

from spacy.tokens import Doc, Span


def _key(span: Span, name: str) -> Tuple[Any, ...]:
    return ("sllm", name, span.start_char, span.end_char, span.label, span.id)


def _getter(name: str) -> Callable[[Span], Any]:
    return lambda span: span.doc.user_data.get(_key(span, name))


def _setter(name: str) -> Callable[[Span, Any], None]:
    def set_value(span: Span, value: Any) -> None:
        span.doc.user_data[_key(span, name)] = value

    return set_value


def register_extensions() -> None:
    """Register the attributes once; leaves attributes another package registered alone."""
    for name in ("score", "question"):
        if not Span.has_extension(name):
            Span.set_extension(name, getter=_getter(name), setter=_setter(name))
    for name in ("questions", "qas"):
        if not Doc.has_extension(name):
            Doc.set_extension(name, default=None)

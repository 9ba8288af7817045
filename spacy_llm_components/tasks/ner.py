"""Named-entity recognition: entities in `doc.ents` (or a span group), tagged per word."""

from collections import Counter
from typing import Any, Callable, Dict, Iterable, Optional

import torch.nn.functional as F
from spacy.pipeline.spancat import spancat_score
from spacy.scorer import get_ner_prf
from spacy.training import Example
from spacy.util import filter_spans, registry
from transformers import DataCollatorForTokenClassification

from ..core.constants import IGNORE_INDEX
from ..data.conll import read_conll
from ..data.errors import DataError
from ..data.jsonl import read_ner_jsonl
from ..data.types import Loaded
from .base import Demo, TaskSpec, kl_divergence, register_task


class NerSpec(TaskSpec):
    name, hf_task, factory = "ner", "token-classification", "hf_ner"
    head = "token"
    primary = "ents_f"
    score_weights = {"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None}
    formats = (".conll", ".iob", ".bio", ".txt", ".tsv", ".jsonl", ".spacy")
    gold_description = "entity annotation (doc.ents)"
    description = "named-entity recognition (hf_ner)"
    input_example = {"text": ["Marta Kowalczyk opened a bakery in Lindenfeld for Brightwater Foods."]}
    output_columns = {"ents": ("spans", {"label": "string"})}
    corpus_formats = (".conll", ".iob", ".bio")
    demo = Demo(("train.conll", "dev.conll", "test.conll"), {"epochs": 10, "lr": 1e-4, "batch_size": 8},
                {"dataframe_records": [{"text": "Lena Hartmann joined Brightwater Foods in Lindenfeld last spring."}]})

    def has_gold(self, doc):
        return doc.has_annotation("ENT_IOB")

    def gold_labels(self, docs):
        return sorted({ent.label_ for doc in docs for ent in doc.ents})

    def read(self, path, nlp, bad, options):
        if path.suffix.lower() == ".jsonl":
            return Loaded(path, read_ner_jsonl(path, nlp, bad))
        docs, repairs = read_conll(path, nlp.vocab, bad, strict=options.strict)
        return Loaded(path, docs, repairs=repairs)

    def check_docbin(self, path, docs):
        if not any(d.has_annotation("ENT_IOB") for d in docs):
            raise DataError(path, None, "no doc has entity annotation (doc.ents)")
        return Loaded(path, docs)

    def labels(self, parts, multi_label):
        types = sorted({ent.label_ for part in parts for doc in part.docs for ent in doc.ents})
        if not types:
            raise DataError(parts[0].path, None, "no entities in the data")
        return types, False

    def describe(self, docs):
        per_label = Counter(e.label_ for d in docs for e in d.ents)
        return {**super().describe(docs), "entities": sum(per_label.values()), "per_label": dict(sorted(per_label.items()))}

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)  # labels padded with -100

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # per piece that the tagger reads
        mask = batch["labels"] != IGNORE_INDEX  # first pieces of words, in gold and unlabelled rows alike
        kl = kl_divergence(student.logits.float()[mask] / temperature, teacher.logits.float()[mask] / temperature)
        return kl.mean() * temperature ** 2 if kl.numel() else student.logits.sum() * 0.0

    def gold_loss(self, student, batch, pipe):
        labels = batch["labels"].masked_fill(~batch["gold"].bool()[:, None], IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            return student.logits.sum() * 0.0
        logits = student.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def scores(self, examples, pipe):
        if pipe.spans_key:  # gold data holds doc.ents: score the predicted span group as entities
            for eg in examples:
                eg.predicted.ents = filter_spans(eg.predicted.spans.get(pipe.spans_key, []))
        scores = score_ner(examples)
        support = Counter(ent.label_ for eg in examples for ent in eg.reference.ents)
        per_label = {label: {**prf, "support": support.get(label, 0)}
                     for label, prf in sorted((scores.pop("ents_per_type", None) or {}).items())}
        for label in support:
            per_label.setdefault(label, {"p": 0.0, "r": 0.0, "f": 0.0, "support": support[label]})
        return scores, per_label, None


def score_ner(examples: Iterable[Example], *, spans_key: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """spaCy's entity scorer for `doc.ents`, its span scorer for `doc.spans[spans_key]`."""
    if spans_key:
        return spancat_score(examples, spans_key=spans_key, allow_overlap=True)
    return get_ner_prf(examples)


@registry.scorers("spacy_llm_components.ner_scorer.v1")
def make_ner_scorer() -> Callable:
    return score_ner


NER = register_task(NerSpec())

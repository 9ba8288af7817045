"""Cross-check a fine-tuned NER pipeline's entity F1 with seqeval on a CoNLL file.

The docs are the CoNLL tokens themselves, so spaCy's entities map one-to-one to
IOB2 tags; seqeval's F1 must equal `sllm evaluate`'s ents_f.

    .venv/bin/python bench/check_seqeval.py bench/out/accuracy/conll2003/model ../shared/data/conll2003/dev.conll
"""

import sys

import spacy
from seqeval.metrics import f1_score

from spacy_llm_components.tasks import load_docs

nlp = spacy.load(sys.argv[1])
gold_docs = load_docs("ner", sys.argv[2], nlp).docs
predicted = nlp.pipe(spacy.tokens.Doc(nlp.vocab, words=[t.text for t in d], spaces=[bool(t.whitespace_) for t in d])
                     for d in gold_docs)


def iob2(doc):
    return [f"{t.ent_iob_}-{t.ent_type_}" if t.ent_iob_ != "O" and t.ent_iob_ else "O" for t in doc]


gold_tags, pred_tags = zip(*((iob2(g), iob2(p)) for g, p in zip(gold_docs, predicted)))
print(f"seqeval entity F1: {100 * f1_score(list(gold_tags), list(pred_tags)):.2f} on {len(gold_docs):,} docs")

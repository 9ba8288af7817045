"""Check that hf_ner (greedy) equals transformers' token-classification pipeline wherever
HF's entities lie on spaCy tokens, i.e. that every disagreement comes from snapping.

    .venv/bin/python bench/check_ner_agreement.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import spacy  # noqa: E402
import transformers  # noqa: E402
from bench_inference import DATA, OUT, conll_sentences  # noqa: E402

texts = conll_sentences(DATA / "conll2003" / "dev.conll")[:1000]
model = OUT / "minilm-random-ner"
pipe = transformers.pipeline("token-classification", model=str(model), aggregation_strategy="first", device=-1, batch_size=8)
hf = [{(e["start"], e["end"], e["entity_group"]) for e in ents} for ents in pipe(texts)]
nlp = spacy.blank("en"); nlp.add_pipe("hf_ner", config={"model": str(model), "decoder": "greedy"})
n_aligned = same = 0; bad = []
for t, h in zip(texts, hf):
    doc = nlp(t)
    ours = {(e.start_char, e.end_char, e.label_) for e in doc.ents}
    if all(doc.char_span(s, e) is not None for s, e, _ in h) and len({s for s, _, _ in h}) == len(h):
        n_aligned += 1; same += ours == h
        if ours != h: bad.append((t, sorted(ours - h), sorted(h - ours)))
print(f"docs whose HF entities all lie on spaCy tokens: {n_aligned}; identical: {same}")
for b in bad[:3]: print(b)

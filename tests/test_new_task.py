"""A fourth task, added from outside the package: a spec, an existing head kind (token) and a component,
and nothing else. Prepare, fine-tune, evaluate, register (model card, served model signature and example),
serve and int8 all take it, since everything that differs between tasks is asked of the spec.

The toy task is a per-token binary tagger: which tokens of a sentence are highlighted.
"""

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import spacy
from mlflow.tracking import MlflowClient
from spacy.tokens import Doc, Span, SpanGroup
from transformers import DataCollatorForTokenClassification

from spacy_llm_components.components.base import HFPipe
from spacy_llm_components.components.inputs import Rows
from spacy_llm_components.components.settings import SharedSettings, component_factory
from spacy_llm_components.core.constants import IGNORE_INDEX
from spacy_llm_components.core.settings import setting
from spacy_llm_components.data.errors import DataError
from spacy_llm_components.data.jsonl import json_records
from spacy_llm_components.data.types import Loaded
from spacy_llm_components.tasks import TaskSpec, register_task, unregister_task
from spacy_llm_components.tasks.base import Demo

KEY = "highlight"
LABELS = ["O", "H"]


class HighlightSpec(TaskSpec):
    name, hf_task, factory, head = "highlight", "token-highlighting", "hf_highlight", "token"
    primary = "highlight_f"
    score_weights = {"highlight_f": 1.0}
    formats = (".jsonl", ".spacy")
    description = "token highlighting (hf_highlight)"
    input_example = {"text": ["the red fox ran"]}
    output_columns = {KEY: ("spans", {})}
    demo = Demo(("train.jsonl", "dev.jsonl", "test.jsonl"), {}, {})
    gold_description = "highlighted tokens (doc.spans['highlight'])"
    has_labels = False  # the head's labels are fixed: O and H

    def read(self, path, nlp, bad, options):
        docs = []
        for number, record in json_records(path, bad):
            words, marks = record.get("words"), record.get("highlight")
            if not isinstance(words, list) or not isinstance(marks, list) or len(words) != len(marks):
                bad.report(DataError(path, f"line {number}", '"words" and "highlight" must be lists of one length'))
                continue
            doc = Doc(nlp.vocab, words=words)
            doc.spans[KEY] = SpanGroup(doc, name=KEY, spans=[Span(doc, i, i + 1, "H") for i, m in enumerate(marks) if m])
            docs.append(doc)
        return Loaded(path, docs)

    def has_gold(self, doc):
        return KEY in doc.spans

    def labels(self, parts, multi_label):
        return ["H"], False

    def component_settings(self, labels, multi_label, train_docs):
        return {}

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)

    def scores(self, examples, pipe):
        gold = {(i, s.start) for i, eg in enumerate(examples) for s in eg.reference.spans.get(KEY, [])}
        found = {(i, s.start) for i, eg in enumerate(examples) for s in eg.predicted.spans.get(KEY, [])}
        p = len(gold & found) / len(found) if found else 0.0
        r = len(gold & found) / len(gold) if gold else 0.0
        return {"highlight_p": p, "highlight_r": r, "highlight_f": 2 * p * r / (p + r) if p + r else 0.0}, {}, None


HIGHLIGHT = HighlightSpec()


@dataclass
class HighlightSettings(SharedSettings):
    min_probability: Optional[float] = setting(0.5, "a token is highlighted at this probability of H", ge=0, le=1)


class HFHighlighter(HFPipe):
    spec = HIGHLIGHT

    def __init__(self, nlp, name, settings):
        super().__init__(nlp, name, settings)
        self.min_probability = settings.min_probability

    def _new_head_labels(self):
        return LABELS

    @property
    def labels(self):
        return ["H"]

    def _first_pieces(self, doc, offsets):
        """The first piece of each spaCy token (the tokens are whitespace-separated words)."""
        starts = [start for start, _ in offsets]
        return [starts.index(next(s for s in starts if s >= token.idx)) for token in doc]

    def features(self, docs):
        out = []
        for doc, enc in zip(docs, self._encode([d.text for d in docs])):
            marked = {s.start for s in doc.spans.get(KEY, [])}
            labels = [IGNORE_INDEX] * len(enc.ids)
            for i, piece in enumerate(self._first_pieces(doc, enc.offsets)):
                labels[piece] = int(i in marked)
            model_input = self._single(enc.ids)
            n = len(self.specials.single_prefix)
            out.append(model_input.feature(labels=[IGNORE_INDEX] * n + labels + [IGNORE_INDEX] * (
                len(model_input.input_ids) - n - len(labels))))
        return out

    def _predict_prepared(self, docs, prepared):
        pieces = self._pieces([d.text for d in docs])
        probability = np.zeros(len(pieces.ids), dtype=np.float32)
        rows = Rows(pieces.bounds[:-1], pieces.lengths, np.arange(len(docs)))
        for batch, out in self._run(docs, pieces, rows):
            probs = out.logits.float().softmax(-1)[..., 1]
            probability[batch.piece] = probs[batch.row, batch.col].cpu().numpy()
        result = []
        for d, doc in enumerate(docs):
            start = pieces.bounds[d]
            offsets = list(zip(pieces.start[start:pieces.bounds[d + 1]], pieces.end[start:pieces.bounds[d + 1]]))
            firsts = self._first_pieces(doc, offsets) if len(doc) else []
            result.append([i for i, piece in enumerate(firsts) if probability[start + piece] >= self.min_probability])
        return result

    def set_annotations(self, docs, predictions):
        for doc, marked in zip(docs, predictions):
            doc.spans[KEY] = SpanGroup(doc, name=KEY, spans=[Span(doc, i, i + 1, "H") for i in marked])

    def record(self, doc):
        return {KEY: [{"text": s.text, "start_char": s.start_char, "end_char": s.end_char, "score": None}
                      for s in doc.spans.get(KEY, [])]}


make_hf_highlight = component_factory("hf_highlight", HighlightSettings, HFHighlighter, module=__name__,
                                      assigns=["doc.spans"], default_score_weights=HIGHLIGHT.score_weights)

WORDS = "the red fox ran over a green field and the blue bird sang".split()
COLOURS = {"red", "green", "blue"}


@pytest.fixture
def highlight_task(tmp_path):
    register_task(HIGHLIGHT)
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("dev", 12), ("test", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                words = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
                f.write(json.dumps({"words": words, "highlight": [int(w in COLOURS) for w in words]}) + "\n")
    yield tmp_path
    unregister_task(HIGHLIGHT.name)


def test_a_fourth_task_goes_through_every_stage(highlight_task, ckpts, mlflow_project, tmp_path):
    from spacy_llm_components.stages.compress import quantized_copy
    from spacy_llm_components.stages.evaluate import evaluate
    from spacy_llm_components.stages.finetune import finetune
    from spacy_llm_components.stages.prepare import prepare
    from spacy_llm_components.stages.registry import register
    from spacy_llm_components.stages.shared.references import local_pipeline
    from spacy_llm_components.stages.shared.training import FinetuneConfig

    data = prepare("highlight", highlight_task / "train.jsonl", tmp_path / "data", dev=highlight_task / "dev.jsonl")
    assert data.labels == ["H"] and data.summary["splits"]["train"]["docs"] == 48
    result = finetune("highlight", data.train, data.dev, tmp_path / "model", FinetuneConfig(
        base_model=str(ckpts["base"]), max_steps=60, eval_steps=20, lr=3e-3, batch_size=8, device="cpu"),
        progress=False)
    losses = [e["loss"] for e in result.log if "loss" in e]
    assert losses[-1] < losses[0] and result.dev_metrics["highlight_f"] > 0.9  # it learned the colours

    evaluation = evaluate(tmp_path / "model", highlight_task / "test.jsonl", tmp_path / "eval")
    assert evaluation.primary == "highlight_f" and evaluation.primary_score > 0.9
    assert "highlight_f" in (tmp_path / "eval" / "report.md").read_text()

    version = register(tmp_path / "model", "hl", metrics=tmp_path / "eval" / "metrics.json")
    card = MlflowClient().get_model_version("hl", version.version).description
    assert "token highlighting (hf_highlight)" in card
    import mlflow

    served = mlflow.pyfunc.load_model(version.uri)
    assert "highlight" in {c.name for c in served.metadata.get_output_schema().inputs}
    answer = served.predict([{"text": "the red fox ran"}])[0]
    assert [s["text"] for s in answer["highlight"]] == ["red"]

    int8 = quantized_copy(local_pipeline(version.uri), tmp_path / "int8")
    doc = spacy.load(int8)("a blue bird sang")
    assert [s.text for s in doc.spans[KEY]] == ["blue"]

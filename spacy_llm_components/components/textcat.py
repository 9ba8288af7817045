"""hf_textcat: `AutoModelForSequenceClassification` as a spaCy component writing `doc.cats`."""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from spacy.language import Language
from spacy.tokens import Doc

from ..core.align import pack_units, refine_units, unit_piece_ranges
from ..core.constants import TEACHER_PREFIX
from ..core.decode import decide_labels, label_thresholds, softmax
from ..core.settings import setting
from ..tasks.textcat import TEXTCAT
from .base import Feature, HFPipe, ModelInput
from .inputs import Pieces, Rows
from .settings import SharedSettings, component_factory
from .strategies import WindowPooling, resolve_strategy


@dataclass
class TextcatSettings(SharedSettings):
    """hf_textcat's settings (`[components.textcat]` in a config)."""

    labels: Optional[List[str]] = setting(None, "categories of a new head on a base encoder; null: the checkpoint's "
                                                "(or, in `spacy train`, the data's)")
    multi_label: Optional[bool] = setting(None, "a sigmoid per label instead of a softmax over them; null: the "
                                                "checkpoint's problem_type (a new head: the data's)")
    threshold: float = setting(0.5, "multi-label: a label is decided at or above this probability", ge=0, le=1)
    thresholds: Dict[str, float] = setting({}, "multi-label: per-label thresholds that replace `threshold`")
    pooling: Union[str, WindowPooling] = setting({"@sllm_strategies": "sllm.mean_windows.v1"},
                                                 "a long doc's window logits to one (a registered strategy)")
    scorer: Optional[Callable] = setting({"@scorers": "spacy_llm_components.textcat_scorer.v1"},
                                         "the scorer `nlp.evaluate` uses")


class HFTextCategorizer(HFPipe):
    """Scores every label of a sequence-classification head into `doc.cats`.

    Exclusive heads give a softmax, multi-label heads (problem_type
    multi_label_classification, or `multi_label = true`) a sigmoid per label.
    A doc longer than the model's input is split into windows (on sentence
    boundaries when the doc has them, else on token boundaries) whose logits
    are pooled (mean or max) before the softmax/sigmoid: never truncated.
    """

    spec = TEXTCAT
    per_token = False

    def __init__(self, nlp: Language, name: str, settings: TextcatSettings) -> None:
        super().__init__(nlp, name, settings)
        bad = {k: v for k, v in settings.thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"{name}: thresholds must lie in [0, 1], got {bad}")
        self.new_head_labels = settings.labels
        self.multi_label_cfg = settings.multi_label
        self.pooling = resolve_strategy("pooling", settings.pooling, name)
        self.cfg = {"threshold": settings.threshold, "thresholds": dict(settings.thresholds)}

    def _new_head_labels(self) -> Optional[List[str]]:
        return self.new_head_labels

    def _new_head_problem_type(self) -> Optional[str]:
        if self.multi_label_cfg is None:
            return None
        return "multi_label_classification" if self.multi_label_cfg else "single_label_classification"

    def score(self, examples, **kwargs):
        self.checkpoint  # multi_label (in cfg, the scorer's settings) comes from the checkpoint
        return super().score(examples, **kwargs)

    def _labels_from_data(self, docs: Sequence[Doc]) -> None:
        if not self.new_head_labels:
            self.new_head_labels = self.spec.gold_labels(docs)
        if self.multi_label_cfg is None:  # a doc with other than exactly one category makes it multi-label
            self.multi_label_cfg = any(sum(v >= 0.5 for v in doc.cats.values()) != 1 for doc in docs if doc.cats)

    def _on_load(self) -> None:
        unknown = set(self.cfg["thresholds"]) - set(self.labels)
        if unknown:
            raise ValueError(f"{self.name}: thresholds for unknown labels {sorted(unknown)}; labels are {self.labels}")
        self.cfg["multi_label"] = self.multi_label

    @property
    def labels(self) -> List[str]:
        return self._label_names()

    @property
    def multi_label(self) -> bool:
        if self.multi_label_cfg is not None:
            return self.multi_label_cfg
        return self.checkpoint.head.problem_type == "multi_label_classification"

    def writes(self) -> List[str]:
        return [f"doc.cats[{label!r}]" for label in self.labels]

    def _windows(self, doc: Doc, offsets: Sequence, window: int):
        """A long doc's windows: sentence (else token) boundaries packed to fit; on a shared encoder, the
        encoder's windows of word pieces, whose hidden states are already there."""
        if self.encoder_name is not None:
            return self.shared.windows(len(offsets))
        if len(offsets) <= window:
            return [(0, len(offsets))]
        tokens = unit_piece_ranges([(t.idx, t.idx + len(t)) for t in doc], offsets)
        if doc.has_annotation("SENT_START"):
            sents = unit_piece_ranges([(s.start_char, s.end_char) for s in doc.sents], offsets)
            tokens = refine_units(sents, tokens, window)
        return pack_units(tokens, window)

    def _inputs(self, docs: Sequence[Doc]) -> Tuple[List[ModelInput], List[int]]:
        """Model inputs of the docs' windows, and the doc each window belongs to."""
        window = self.max_length - self.specials.n_single
        inputs, owner = [], []
        for i, (doc, enc) in enumerate(zip(docs, self._encode([d.text for d in docs]))):
            for start, end in self._windows(doc, enc.offsets, window):
                inputs.append(self._single(enc.ids[start:end]))
                owner.append(i)
        return inputs, owner

    def features(self, docs: Sequence[Doc], teacher: Optional[np.ndarray] = None) -> List[Feature]:
        """Training features from gold `doc.cats`: every window of a doc carries the doc's labels
        (a class index, or a 0/1 vector for multi-label heads), as `predict` pools over them. With
        `teacher` (docs x this head's labels: a teacher's logits), each window carries its doc's row as
        `teacher_logits`."""
        labels = self.labels
        targets = []
        for doc in docs:
            missing = [label for label in labels if label not in doc.cats]
            if missing:
                raise ValueError(f"{self.name}: doc.cats lacks labels {missing} of the model: {doc.text[:60]!r}")
            scores = [float(doc.cats[label]) for label in labels]
            targets.append(scores if self.multi_label else int(np.argmax(scores)))
        inputs, owner = self._inputs(docs)
        if teacher is None:
            return [model_input.feature(labels=targets[i]) for model_input, i in zip(inputs, owner)]
        return [model_input.feature(labels=targets[i], **{TEACHER_PREFIX + "logits": teacher[i]})
                for model_input, i in zip(inputs, owner)]

    def distillation_features(self, docs: Sequence[Doc], teacher: "HFTextCategorizer") -> List[Feature]:
        """Training features of `docs` carrying the teacher's (the same labels, any tokenizer) logits of
        each doc, read back from its probabilities at its temperature (a calibrated teacher's T is
        divided out): log-probabilities for exclusive classes, log-odds for multi-label ones."""
        if sorted(teacher.labels) != sorted(self.labels) or teacher.multi_label != self.multi_label:
            raise ValueError(f"the teacher's labels {sorted(teacher.labels)} (multi-label: {teacher.multi_label}) "
                             f"differ from the student's {sorted(self.labels)} ({self.multi_label})")
        probs = teacher._predict_prepared(docs, teacher._prepare(docs)).astype(np.float64)
        probs = np.clip(probs[:, [teacher.labels.index(label) for label in self.labels]], 1e-7, 1 - 1e-7)
        logits = np.log(probs) - (np.log1p(-probs) if self.multi_label else 0.0)
        return self.features(docs, teacher=(logits * teacher.temperature).astype(np.float32))

    def _prepare(self, docs: Sequence[Doc]) -> Pieces:
        return self._pieces([d.text for d in docs])

    def _predict_prepared(self, docs: Sequence[Doc], pieces: Pieces) -> np.ndarray:
        """(docs x labels) probabilities. A doc that fits one window is scored on the model's device and
        only its probabilities leave it; a longer doc's window logits are pooled on the host."""
        window = self.max_length - self.specials.n_single
        lengths, starts = pieces.lengths, pieces.bounds[:-1]
        fitting_docs = np.flatnonzero(lengths <= window)
        long_docs = np.flatnonzero(lengths > window).tolist()
        windows = {d: self._windows(docs[d], list(zip(pieces.start[pieces.bounds[d]:pieces.bounds[d + 1]].tolist(),
                                                       pieces.end[pieces.bounds[d]:pieces.bounds[d + 1]].tolist())),
                                    window) for d in long_docs}
        owners = [d for d in long_docs for _ in windows[d]]
        rows = Rows(np.concatenate([starts[fitting_docs], [starts[d] + s for d in long_docs for s, _ in windows[d]]]
                                   ).astype(np.int64),
                    np.concatenate([lengths[fitting_docs], [e - s for d in long_docs for s, e in windows[d]]]
                                   ).astype(np.int64),
                    np.concatenate([fitting_docs, owners]).astype(np.int64))
        probs = np.zeros((len(docs), len(self.labels)), dtype=np.float32)
        window_logits: Dict[int, List[np.ndarray]] = {d: [] for d in long_docs}
        for batch, out in self._run(docs, pieces, rows):
            logits = out.logits.float() / self.temperature
            fitting = batch.rows < len(fitting_docs)
            if fitting.any():
                chosen = logits[torch.from_numpy(np.flatnonzero(fitting)).to(logits.device)]
                normalised = torch.sigmoid(chosen) if self.multi_label else torch.softmax(chosen, dim=-1)
                probs[fitting_docs[batch.rows[fitting]]] = normalised.cpu().numpy()
            for j in np.flatnonzero(~fitting).tolist():  # windows in row order: each doc's in text order
                window_logits[owners[int(batch.rows[j]) - len(fitting_docs)]].append((int(batch.rows[j]),
                                                                                      logits[j].cpu().numpy()))
        for d in long_docs:
            pooled = self.pooling(np.stack([x for _, x in sorted(window_logits[d], key=lambda w: w[0])]))
            # (the windows' logits were divided by the temperature: mean and max pooling commute with that)
            probs[d] = 1.0 / (1.0 + np.exp(-pooled)) if self.multi_label else softmax(pooled, axis=-1)
        return probs

    def set_annotations(self, docs: Sequence[Doc], probs: np.ndarray) -> None:
        labels = self.labels
        for doc, p in zip(docs, np.asarray(probs).tolist()):
            doc.cats.update(zip(labels, p))  # other components' cats stay

    def record(self, doc: Doc) -> Dict[str, Dict[str, float]]:
        return {"cats": {label: round(float(doc.cats[label]), 6) for label in self.labels if label in doc.cats}}

    def labels_for(self, doc: Doc) -> List[str]:
        """The decision for a scored doc: labels at or over their threshold (multi-label), or the argmax;
        the same rule its scorer evaluates."""
        labels = [label for label in self.labels if label in doc.cats]
        if not labels:
            return []
        probs = np.array([[doc.cats[label] for label in labels]])
        thresholds = label_thresholds(labels, self.cfg["threshold"], self.cfg["thresholds"])
        decided = decide_labels(probs, self.multi_label, thresholds)[0]
        return [label for label, keep in zip(labels, decided) if keep]


make_hf_textcat = component_factory("hf_textcat", TextcatSettings, HFTextCategorizer, module=__name__,
                                    assigns=["doc.cats"], default_score_weights=TEXTCAT.score_weights)

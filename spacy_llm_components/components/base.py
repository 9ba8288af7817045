"""What the three components share: lazy checkpoint loading, length-sorted batched
inference, and storing the checkpoint inside the pipeline folder."""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import ensure_path, minibatch
from thinc.api import Model, Optimizer

from ..models.checkpoint import DEFAULT_MODEL, peek_labels
from ..models.collate import FeatureCollator
from ..models.devices import resolve_device, resolve_dtype
from ..models.runtimes import check_runtime, inference_model
from ..models.task_model import (
    TaskCheckpoint,
    TaskModel,
    attach_head,
    has_head,
    load_task_checkpoint,
    peek_head_labels,
    save_head,
    save_task_checkpoint,
)
from ..tasks import TaskSpec
from .encoder import HFEncoder, check_writers, find_encoder
from .folders import FolderBytes
from .inputs import Batch, Feature, ModelInput, Pieces, Rows, SpecialTokens, pad_inputs, padded_batches
from .settings import SharedSettings, check_component_settings
from .spacy_train import check_labels, loss_model, training_docs

MODEL_DIR = "model"  # the checkpoint's folder inside the component's folder
HEAD_DIR = "head"  # the head alone, for a component that reads a shared encoder

def _one_thread_after_fork() -> None:
    """Forked children (spaCy's `nlp.pipe(n_process=N)`) cannot use the parent's OpenMP
    pool: their first forward pass would hang. One intra-op thread per worker, as
    torch's DataLoader workers do."""
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_after_fork)


def span_record(span, **extra: Any) -> Dict[str, Any]:
    """A span as JSON-ready data: text, character offsets, extra fields, score."""
    score = span._.score
    return {"text": span.text, "start_char": span.start_char, "end_char": span.end_char, **extra,
            "score": None if score is None else round(float(score), 6)}


class HFPipe(FolderBytes, TrainablePipe):
    """Base of hf_textcat, hf_ner and hf_qa.

    The checkpoint loads on first use, not in the factory: `spacy.load` then
    restores it from the pipeline folder and never touches `model` (the path the
    pipeline was first built from, which may be gone).

    With `encoder` naming an hf_encoder component earlier in the pipeline, the component is a head on
    that shared encoder: it reads the encoder's hidden states (`reads_hidden`) or runs its own pass
    through the same weights, and saves only its head.
    """

    spec: ClassVar[TaskSpec]
    output_names: ClassVar[Tuple[str, ...]] = ("logits",)
    per_token: ClassVar[bool] = True
    reads_hidden: ClassVar[bool] = True  # a shared encoder's hidden states serve this head (not QA's pairs)

    def __init__(self, nlp: Language, name: str, settings: SharedSettings) -> None:
        check_component_settings(name, settings)
        resolved = resolve_device(settings.device)
        check_runtime(settings.runtime, settings.quantize, resolved, resolve_dtype(settings.dtype, resolved))
        self.settings = settings
        self.vocab = nlp.vocab
        self.name = name
        self.encoder_name = settings.encoder
        if self.encoder_name is not None and (settings.quantize or settings.runtime != "torch"):
            raise ValueError(f"{name}: a head on the shared encoder {self.encoder_name!r} runs in PyTorch at the "
                             "encoder's precision; set quantize = null and runtime = \"torch\"")
        self._nlp = nlp
        self._shared: Optional[HFEncoder] = None
        self.batch_size = settings.batch_size
        self.max_length_cfg = settings.max_length
        self.device = settings.device
        self.dtype = settings.dtype
        self.quantize = settings.quantize
        self.runtime = settings.runtime
        self.mixed_precision = settings.mixed_precision
        self.temperature = settings.temperature
        self.model: Optional[Model] = None  # spaCy's trainable model: set when the checkpoint loads
        self.scorer = settings.scorer
        self.cfg: dict = {}
        self._checkpoint: Optional[TaskCheckpoint] = None
        self._specials: Optional[SpecialTokens] = None

    # -- loading -----------------------------------------------------------------
    def _new_head_labels(self) -> Optional[List[str]]:
        """Labels of a new head when the checkpoint is a bare encoder (None: no new head)."""
        return None

    def _new_head_problem_type(self) -> Optional[str]:
        return None

    def _on_load(self) -> None:
        """Read what the component needs from a freshly loaded checkpoint (labels, scheme)."""

    @property
    def model_name(self) -> str:
        """Where the head (and, without a shared encoder, the encoder) loads from."""
        if self.settings.model is not None:
            return self.settings.model
        return self.shared.encoder.source if self.encoder_name is not None else DEFAULT_MODEL  # (where its weights
        # are now: a loaded pipeline's own folder, not the checkpoint it was first built from)

    @property
    def shared(self) -> HFEncoder:
        """The hf_encoder component this head reads, checked: it exists, comes before this head, and no other
        head on it writes what this one writes. (`model`, when set, is where the head's weights load from:
        a checkpoint trained on the same encoder weights, which `attach_head` checks, or a head folder.)"""
        if self._shared is None:
            self._shared = find_encoder(self._nlp, self)
            check_writers(self._nlp, self.encoder_name)
        return self._shared

    def writes(self) -> List[str]:
        """What the component sets on a doc (two heads on one encoder must not set the same)."""
        raise NotImplementedError

    def _set_checkpoint(self, checkpoint: TaskCheckpoint) -> None:
        from tokenizers import Tokenizer

        self._checkpoint = checkpoint
        if self.encoder_name is None:
            checkpoint.encoder.name = checkpoint.encoder.owner = self.name  # its own encoder, saved with it
        # what inference runs: the checkpoint's model, an int8 copy of it, or an ONNX Runtime session (the
        # float32 weights stay, for to_disk, export and fine-tuning)
        self._model = inference_model(checkpoint.model, quantize=self.quantize, runtime=self.runtime,
                                      input_names=checkpoint.encoder.input_names, output_names=self.output_names)
        if self.encoder_name is not None and self.shared.runner is not checkpoint.encoder.model:
            self._model = TaskModel(self.shared.runner, checkpoint.head).eval()  # an own pass (QA) on the int8 encoder
        # what `spacy train` updates: the checkpoint's model wrapped for thinc (features in, loss out)
        collate = FeatureCollator(self.spec.collator(checkpoint.tokenizer), checkpoint.tokenizer)
        trainable = self.quantize is None and self.runtime == "torch" and self.encoder_name is None
        self.model = (loss_model(checkpoint.model, collate, checkpoint.device, self.mixed_precision)
                      if trainable else None)
        self._specials = SpecialTokens.of(checkpoint.tokenizer)
        # the Rust tokenizer itself, on a copy without truncation or padding: what the Hugging Face
        # tokenizer's __call__ runs, without building its per-text Python lists we do not use
        self._backend = Tokenizer.from_str(checkpoint.tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._on_load()

    @property
    def checkpoint(self) -> TaskCheckpoint:
        if self._checkpoint is None and self.encoder_name is not None:
            self._set_checkpoint(attach_head(self.shared.encoder, self.model_name, self.spec.head,
                                             labels=self._new_head_labels(),
                                             problem_type=self._new_head_problem_type()))
        if self._checkpoint is None:
            self._set_checkpoint(
                load_task_checkpoint(
                    self.model_name,
                    self.spec.head,
                    labels=self._new_head_labels(),
                    problem_type=self._new_head_problem_type(),
                    device=self.device,
                    dtype=self.dtype,
                )
            )
        return self._checkpoint  # type: ignore[return-value]

    def _label_names(self) -> List[str]:
        """Head labels; before the checkpoint is loaded, read from config without loading.

        spaCy asks for `labels` while restoring a pipeline, before `from_disk`:
        loading the original checkpoint then would be slow, or fail if it is gone.
        """
        if self._checkpoint is not None:
            return self._checkpoint.id2label
        if self.encoder_name is not None:  # the encoder's checkpoint may hold another task's head
            return peek_head_labels(self.model_name, self.spec.head) or self._new_head_labels() or []
        return peek_labels(self.model_name) or self._new_head_labels() or []

    @property
    def specials(self) -> SpecialTokens:
        self.checkpoint
        return self._specials  # type: ignore[return-value]

    @property
    def max_length(self) -> int:
        if self.encoder_name is not None and self.reads_hidden:
            return self.shared.max_length  # the encoder's windows
        limit = self.checkpoint.max_length
        return min(limit, self.max_length_cfg) if self.max_length_cfg else limit

    def initialize(self, get_examples: Optional[Callable] = None, *, nlp: Optional[Language] = None) -> None:
        """Load the checkpoint (`spacy assemble`, `nlp.initialize` and `spacy train` call this). Given training
        examples (`spacy train`), check that they hold this task's annotation and labels the component
        has; a new head (a base encoder with no labels configured) takes the data's labels."""
        docs = training_docs(self.name, self.spec, get_examples)
        if docs and self._checkpoint is None and not has_head(self.model_name, self.spec.head):
            self._labels_from_data(docs)
        self.checkpoint
        if docs and self.spec.has_labels:
            check_labels(self.name, self.spec, docs, self.labels)

    def _labels_from_data(self, docs: Sequence[Doc]) -> None:
        """Configure a new head's labels from training docs when none are configured."""

    # -- training ----------------------------------------------------------------
    def features(self, docs: Sequence[Doc]) -> List[Feature]:
        """Training features from reference docs, built with the encoding and windows `predict` uses."""
        raise NotImplementedError

    def distillation_features(self, docs: Sequence[Doc], teacher: "HFPipe") -> List[Feature]:
        """`features` of `docs` plus the outputs of `teacher` (a head of this task and labels, with any
        tokenizer and width) in this head's units, as `teacher_*` fields: what a student distilled across
        tokenizers learns from."""
        raise ValueError(f"{self.name}: distilling a {self.spec.name} head across tokenizers is not supported; "
                         "distill it into fewer of the teacher's layers instead (without --student-base)")

    def update(self, examples: Iterable[Example], *, drop: float = 0.0, sgd: Optional[Optimizer] = None,
               losses: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """One step of `spacy train`: the features of the reference docs through the model, its loss back.
        (`drop` is not applied: the checkpoint's own dropout settings are.)"""
        losses = {} if losses is None else losses
        losses.setdefault(self.name, 0.0)
        if self.encoder_name is not None:
            raise ValueError(f"{self.name}: `spacy train` does not train heads that share the encoder "
                             f"{self.encoder_name!r} (each head's optimizer would step the encoder again); train "
                             "each task in its own pipeline")
        if self.quantize or self.runtime != "torch":
            raise ValueError(f"{self.name}: a component with quantize = {self.quantize!r} and runtime = "
                             f"{self.runtime!r} cannot be trained; train the float32 PyTorch pipeline and set "
                             "these for inference")
        features = self.features([eg.reference for eg in examples])
        if not features:
            return losses
        scores, backprop = self.model.begin_update(features)
        loss, d_scores = self.get_loss(examples, scores)
        backprop(d_scores)
        if sgd not in (None, False):
            self.finish_update(sgd)
        losses[self.name] += loss
        return losses

    def get_loss(self, examples: Iterable[Example], scores) -> Tuple[float, Any]:
        """The model's task loss (it computed it from the features' targets) and its gradient, 1."""
        return float(scores[0]), self.model.ops.xp.ones_like(scores)

    # -- inference ---------------------------------------------------------------
    def __call__(self, doc: Doc) -> Doc:
        error_handler = self.get_error_handler()
        try:
            self.set_annotations([doc], self.predict([doc]))
        except Exception as err:
            error_handler(self.name, self, [doc], err)
        self._release([doc])
        return doc

    def _release(self, docs: Sequence[Doc]) -> None:
        """The last head to read a shared encoder's hidden states lets them go."""
        if self.encoder_name is not None and self.reads_hidden and self.shared.readers()[-1:] == [self.name]:
            self.shared.release(docs)

    def predict(self, docs: Sequence[Doc]) -> Any:
        return self._predict_prepared(docs, self._prepare(docs))

    def _prepare(self, docs: Sequence[Doc]) -> Any:
        """The work on a batch that needs no model (tokenizing with the model's tokenizer): `pipe` runs it
        for the next batch in a background thread while this one is on the model."""
        return None

    def _predict_prepared(self, docs: Sequence[Doc], prepared: Any) -> Any:
        raise NotImplementedError

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 1000) -> Iterator[Doc]:
        """Annotate docs in order; each `batch_size` docs form one buffer sorted by length. With the model
        on a GPU, the next buffer is tokenized in a background thread (the Rust tokenizer releases the GIL)
        while the current one runs through the model and is decoded."""
        error_handler = self.get_error_handler()
        if not self._run_ahead():
            for docs in minibatch(stream, size=batch_size):
                yield from self._annotate(docs, partial(self._prepare, docs), error_handler)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-prepare") as ahead:
            pending: Optional[Tuple[List[Doc], Future]] = None
            for docs in minibatch(stream, size=batch_size):
                upcoming = (docs, ahead.submit(self._prepare, docs))
                if pending is not None:
                    yield from self._annotate(pending[0], pending[1].result, error_handler)
                pending = upcoming
            if pending is not None:
                yield from self._annotate(pending[0], pending[1].result, error_handler)

    def _run_ahead(self) -> bool:
        """Tokenize the next buffer in a thread only where that overlaps with idle hardware: on a GPU. On
        a CPU, torch's threads already use every core, and the thread measured no faster (BENCHMARKS.md,
        overhead mode)."""
        return self.checkpoint.device.type == "cuda"

    def _annotate(self, docs: List[Doc], prepared: Callable[[], Any], error_handler: Callable) -> List[Doc]:
        """`prepared()` gives the batch's `_prepare` result (its errors, too, go to the error handler)."""
        try:
            self.set_annotations(docs, self._predict_prepared(docs, prepared()))
        except Exception as err:
            error_handler(self.name, self, docs, err)
        self._release(docs)
        return docs

    def _encode(self, texts: Sequence[str]) -> list:
        """`tokenizers` Encodings of whole texts, no special tokens: ids, character offsets, word ids."""
        self.checkpoint
        return self._backend.encode_batch(list(texts), add_special_tokens=False)

    def _pieces(self, texts: Sequence[str]) -> Pieces:
        return Pieces.of(self._encode(texts))

    def _single(self, ids: Sequence[int]) -> ModelInput:
        return self.specials.single(ids)

    def _feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: Optional[np.ndarray] = None):
        return self.checkpoint.encoder.feed(input_ids, attention_mask, token_type_ids)

    def _run(self, docs: Sequence[Doc], pieces: Pieces, rows: Rows) -> Iterator[Tuple[Batch, Any]]:
        """Single-sequence rows of the docs' `pieces` through the model, in length-sorted padded batches:
        yields each batch with the model's outputs (tensors on the model's device; reduce them there).
        On a shared encoder, only the head runs, on the hidden states the encoder kept for those rows."""
        ck = self.checkpoint
        pad_id = ck.tokenizer.pad_token_id or 0
        self._model.eval()  # (spacy train's updates leave it in training mode)
        with torch.inference_mode():
            for batch in padded_batches(pieces.ids, rows, self.specials, self.batch_size, pad_id):
                if self.encoder_name is not None:
                    yield batch, ck.head(self.shared.hidden(docs, pieces, rows, batch))
                else:
                    yield batch, self._model(**self._feed(batch.input_ids, batch.attention_mask))

    def _forward(self, inputs: Sequence[ModelInput]) -> List[Tuple[np.ndarray, ...]]:
        """Run the model over sequences of any shape (pairs too), batched by similar length; results in
        input order. Each result holds one float32 array per name in `output_names`, cut to the
        sequence's own length for per-token outputs."""
        ck = self.checkpoint
        pad_id = ck.tokenizer.pad_token_id or 0
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i].input_ids))
        results: List[Tuple[np.ndarray, ...]] = [()] * len(inputs)
        self._model.eval()
        with torch.inference_mode():
            for batch in minibatch(order, size=self.batch_size):
                ids, mask, types = pad_inputs([inputs[i] for i in batch], pad_id)
                out = self._model(**self._feed(ids, mask, types))
                arrays = [getattr(out, name).float().cpu().numpy() for name in self.output_names]
                for row, i in enumerate(batch):
                    n = len(inputs[i].input_ids)
                    results[i] = tuple(a[row, :n] if self.per_token else a[row] for a in arrays)
        return results

    def feature_outputs(self, features: Sequence[Feature]) -> Iterator[Tuple[Dict[str, Any], Any]]:
        """Training features (`features`) through the model inference runs (int8 too), length-sorted in
        batches: yields (the padded batch, targets included; the model's outputs). What calibration fits on."""
        ck = self.checkpoint
        collate = FeatureCollator(self.spec.collator(ck.tokenizer), ck.tokenizer)
        model = self._model if self.runtime == "torch" else ck.model  # (an ONNX session takes no tensors)
        model.eval()
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        with torch.inference_mode():
            for chosen in minibatch(order, size=self.batch_size):
                batch = {k: v.to(ck.device) for k, v in collate([features[i] for i in chosen]).items()}
                yield batch, model(**{k: v for k, v in batch.items() if k not in self.spec.targets})

    def record(self, doc: Doc) -> Dict[str, Any]:
        """This component's predictions on an annotated doc as JSON-ready data (for `sllm predict`
        and model serving)."""
        raise NotImplementedError

    # -- serialization -----------------------------------------------------------
    # The component's settings live in the pipeline's config.cfg, as for spaCy's own components; its
    # folder holds the checkpoint only. `exclude=["model"]` skips the checkpoint, as spaCy's
    # serializers skip an excluded part.
    def to_disk(self, path, *, exclude: Iterable[str] = tuple()) -> None:
        """Weights (safetensors), tokenizer and label map go into `path/model`."""
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        if MODEL_DIR in exclude:
            return
        if self.encoder_name is not None:  # the encoder is the hf_encoder component's to save
            save_head(self.checkpoint, path / HEAD_DIR)
        else:
            save_task_checkpoint(self.checkpoint, path / MODEL_DIR)

    def from_disk(self, path, *, exclude: Iterable[str] = tuple()) -> "HFPipe":
        if MODEL_DIR in exclude:
            return self
        folder = ensure_path(path) / (HEAD_DIR if self.encoder_name is not None else MODEL_DIR)
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: no {'head' if self.encoder_name else 'checkpoint'} folder at "
                                    f"{folder}: the pipeline folder is incomplete; save it again with nlp.to_disk")
        if self.encoder_name is not None:
            self._set_checkpoint(attach_head(self.shared.encoder, folder, self.spec.head))
        else:
            self._set_checkpoint(load_task_checkpoint(folder, self.spec.head, device=self.device, dtype=self.dtype))
        return self


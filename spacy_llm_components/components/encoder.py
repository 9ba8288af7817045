"""hf_encoder: one Transformer encoder that several heads read, so each doc runs through it once.

    [components.encoder]
    factory = "hf_encoder"
    model = ${paths.model}

    [components.ner]
    factory = "hf_ner"
    encoder = "encoder"

The encoder tokenizes a batch of docs, cuts docs longer than the model into overlapping windows of
word pieces (`stride` pieces shared by neighbours), and runs every window through the encoder in
length-sorted batches. Heads that name it (hf_ner, hf_textcat) read those hidden states and run only
their own layers. hf_qa uses the same encoder weights but runs its own pass: its input is the question
and the context in one sequence, which no other head reads.

The hidden states are kept beside the docs (never in them: nothing of it is serialized) until the
last enabled head that reads them has run, and go with the docs they belong to.
"""

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc
from spacy.util import ensure_path, minibatch

from ..core.align import window_spans
from ..core.settings import setting
from ..models.checkpoint import DEFAULT_MODEL
from ..models.devices import DTYPES, resolve_device, resolve_dtype
from ..models.encoder import Encoder
from ..models.runtimes import QUANTIZATIONS, check_runtime, inference_model
from ..models.task_model import load_encoder, save_encoder
from .folders import FolderBytes
from .inputs import Batch, Pieces, Rows, SpecialTokens, padded_batches
from .settings import check_component_settings, component_factory

MODEL_DIR = "model"


@dataclass
class EncoderSettings:
    """hf_encoder's settings (`[components.encoder]` in a config)."""

    model: str = setting(DEFAULT_MODEL, "the encoder's checkpoint: a local Hugging Face folder or hub name (a model "
                                        "with a head gives its encoder; the heads' weights load from it too)")
    batch_size: int = setting(64, "sequences per forward pass (length-sorted batches)", ge=1)
    max_length: Optional[int] = setting(None, "cap on the model input in word pieces; null: the model's own limit "
                                              "(longer docs are windowed)", ge=8)
    stride: int = setting(128, "word pieces two windows of a long doc overlap by", ge=0)
    device: str = setting("auto", "auto, cpu or cuda:N")
    dtype: str = setting("float32", "weights' precision", choices=tuple(DTYPES))
    quantize: Optional[str] = setting(None, "int8: the encoder's Linear layers dynamically quantized on the CPU for "
                                            "inference (the heads stay float32; float32 weights stay on disk)",
                                      choices=QUANTIZATIONS)


@dataclass
class Encoded:
    """A doc as the encoder saw it: its word pieces (a `tokenizers` Encoding) and the hidden states of
    each of its windows, by (first piece, number of pieces)."""

    encoding: Any
    rows: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (positions x width)


class HFEncoder(FolderBytes, Pipe):
    """A shared Transformer encoder: runs once per doc, for every head that names it."""

    def __init__(self, nlp: Language, name: str, settings: EncoderSettings) -> None:
        check_component_settings(name, settings)
        resolved = resolve_device(settings.device)
        check_runtime("torch", settings.quantize, resolved, resolve_dtype(settings.dtype, resolved))
        self.settings = settings
        self.name = name
        self.model_name = settings.model
        self.batch_size = settings.batch_size
        self.stride = settings.stride
        self._nlp = nlp
        self._encoder: Optional[Encoder] = None
        self._encoded: "weakref.WeakKeyDictionary[Doc, Encoded]" = weakref.WeakKeyDictionary()

    # -- the encoder ---------------------------------------------------------------
    def _set_encoder(self, encoder: Encoder) -> None:
        from tokenizers import Tokenizer

        encoder.name = encoder.owner = self.name
        self._encoder = encoder
        # what inference runs: the encoder, or an int8 copy of it (the float32 one stays, for to_disk, export
        # and training); every head reads what it computes, QA's own pass too
        self.runner = inference_model(encoder.model, quantize=self.settings.quantize, runtime="torch",
                                      input_names=encoder.input_names, output_names=("last_hidden_state",))
        self.specials = SpecialTokens.of(encoder.tokenizer)
        self._backend = Tokenizer.from_str(encoder.tokenizer.backend_tokenizer.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._set_encoder(load_encoder(self.model_name, device=self.settings.device, dtype=self.settings.dtype,
                                           pooler=False))
        return self._encoder  # type: ignore[return-value]

    @property
    def max_length(self) -> int:
        limit = self.encoder.max_length
        return min(limit, self.settings.max_length) if self.settings.max_length else limit

    @property
    def window(self) -> int:
        """Word pieces of a doc per window (the model input less the special tokens)."""
        return self.max_length - self.specials.n_single

    def windows(self, n_pieces: int) -> List[Tuple[int, int]]:
        """The piece windows of a doc of `n_pieces` pieces: one for a doc that fits (an empty one too)."""
        return window_spans(n_pieces, self.window, self.stride)

    def initialize(self, get_examples: Optional[Callable] = None, *, nlp: Optional[Language] = None) -> None:
        self.encoder

    def readers(self) -> List[str]:
        """The enabled components, in pipeline order, that read this encoder's hidden states."""
        return [name for name, pipe in self._nlp.pipeline
                if getattr(pipe, "encoder_name", None) == self.name and getattr(pipe, "reads_hidden", False)]

    # -- running -------------------------------------------------------------------
    def __call__(self, doc: Doc) -> Doc:
        try:
            self.encode([doc])
        except Exception as err:
            self.get_error_handler()(self.name, self, [doc], err)
        return doc

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 1000) -> Iterator[Doc]:
        for docs in minibatch(stream, size=batch_size):
            try:
                self.encode(docs)
            except Exception as err:
                self.get_error_handler()(self.name, self, docs, err)
            yield from docs

    def encode(self, docs: Sequence[Doc], *, needed: bool = False) -> None:
        """Run the docs' windows through the encoder and keep their hidden states for the heads (not when
        no enabled head reads them, unless `needed`)."""
        if not docs or not (needed or self.readers()):
            return
        encoder = self.encoder
        encodings = self._backend.encode_batch([doc.text for doc in docs], add_special_tokens=False)
        pieces = Pieces.of(encodings)
        spans = [self.windows(int(n)) for n in pieces.lengths]
        owner = np.repeat(np.arange(len(docs)), [len(s) for s in spans])
        first = np.array([s for doc_spans in spans for s, _ in doc_spans], dtype=np.int64)
        length = np.array([e - s for doc_spans in spans for s, e in doc_spans], dtype=np.int64)
        rows = Rows(pieces.bounds[:-1][owner] + first, length, owner)
        entries = [Encoded(e) for e in encodings]
        n_special = self.specials.n_single
        self.runner.eval()
        with torch.inference_mode():
            for batch in padded_batches(pieces.ids, rows, self.specials, self.batch_size, self.pad_id):
                out = self.runner(**encoder.feed(batch.input_ids, batch.attention_mask), return_dict=True)
                hidden = out.last_hidden_state  # (no pooler: a sequence head that reads one holds its own)
                for b, j in enumerate(batch.rows.tolist()):
                    entries[owner[j]].rows[(int(first[j]), int(length[j]))] = hidden[b, :int(length[j]) + n_special]
        for doc, entry in zip(docs, entries):
            self._encoded[doc] = entry

    @property
    def pad_id(self) -> int:
        return self.encoder.tokenizer.pad_token_id or 0

    def encoded(self, docs: Sequence[Doc]) -> List[Encoded]:
        """The docs' encodings; docs that did not come through this component (a head called on its own)
        are encoded now."""
        missing = [doc for doc in docs if doc not in self._encoded]
        if missing:
            self.encode(missing, needed=True)
        return [self._encoded[doc] for doc in docs]

    def hidden(self, docs: Sequence[Doc], pieces: Pieces, rows: Rows, batch: Batch
               ) -> torch.Tensor:
        """The hidden states of a padded batch of the docs' rows, laid out as the encoder's own output for
        that batch would be."""
        entries = self.encoded(docs)
        chosen = []
        for j in batch.rows.tolist():
            d = int(rows.doc[j])
            key = (int(rows.start[j] - pieces.bounds[d]), int(rows.length[j]))
            try:
                chosen.append(entries[d].rows[key])
            except KeyError:
                raise RuntimeError(f"{self.name}: no hidden states for pieces {key} of doc {d}: the head's windows "
                                   f"differ from the encoder's ({sorted(entries[d].rows)})") from None
        return torch.nn.utils.rnn.pad_sequence(chosen, batch_first=True)

    def release(self, docs: Sequence[Doc]) -> None:
        """Let the docs' hidden states go (the last head that reads them has run)."""
        for doc in docs:
            self._encoded.pop(doc, None)

    # -- serialization -------------------------------------------------------------
    def to_disk(self, path, *, exclude: Iterable[str] = tuple()) -> None:
        """The encoder as a bare `AutoModel` folder in `path/model`."""
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        if MODEL_DIR not in exclude:
            save_encoder(self.encoder, path / MODEL_DIR)

    def from_disk(self, path, *, exclude: Iterable[str] = tuple()) -> "HFEncoder":
        if MODEL_DIR in exclude:
            return self
        model_dir = ensure_path(path) / MODEL_DIR
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: no encoder folder at {model_dir}: the pipeline folder is "
                                    "incomplete; save it again with nlp.to_disk")
        self._set_encoder(load_encoder(model_dir, device=self.settings.device, dtype=self.settings.dtype, pooler=False))
        return self


def find_encoder(nlp: Language, head) -> HFEncoder:
    """The hf_encoder component that the head (an hf_* component) names: it exists and comes first."""
    name, names = head.encoder_name, list(nlp.component_names)
    where = f"{head.name}: encoder = {name!r}"
    if name not in names:
        raise ValueError(f"{where}: the pipeline has no component of that name (it has {names}); add an hf_encoder "
                         f"component before {head.name!r}")
    encoder = nlp.get_pipe(name)
    if not isinstance(encoder, HFEncoder):
        raise ValueError(f"{where} is a {type(encoder).__name__}, not an hf_encoder component")
    if head.name in names and names.index(name) > names.index(head.name):
        raise ValueError(f"{where} comes after {head.name!r} in the pipeline; put the encoder first")
    return encoder


def check_writers(nlp: Language, name: str) -> None:
    """No two heads on the encoder `name` set the same thing on a doc."""
    writers: Dict[str, str] = {}
    names = list(nlp.component_names)
    for other in names:
        pipe = nlp.get_pipe(other)
        if getattr(pipe, "encoder_name", None) == name:
            for target in pipe.writes():
                if target in writers:
                    raise ValueError(f"{other} and {writers[target]} both read the encoder {name!r} and write "
                                     f"{target}; give one of them another spans_key (or other labels)")
                writers[target] = other


make_hf_encoder = component_factory("hf_encoder", EncoderSettings, HFEncoder, module=__name__, assigns=[])

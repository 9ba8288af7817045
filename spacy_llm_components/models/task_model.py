"""An encoder with a task head: loaded from any checkpoint (a bare encoder, or a model fine-tuned with
`AutoModelFor*` elsewhere), and written back as a standard `AutoModelFor*` folder.

`TaskModel` is the torch module that inference, `spacy train` and the Hugging Face `Trainer` run: the
encoder's forward pass, then the head's, with the head's loss when targets are given.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from ..artifacts import replace_folder
from .checkpoint import (
    SAFE_WEIGHTS,
    CheckpointError,
    Source,
    load_fast_tokenizer,
    logger,
    open_source,
    peek_config,
    peek_labels,
    read_config,
    read_weights,
    resolve_source,
    weight_names,
)
from .devices import resolve_device, resolve_dtype
from .encoder import Encoder, keep_layers, load_base_model
from .heads import (
    HEAD_KINDS,
    POOLER,
    FirstTokenPooler,
    Head,
    checkpoint_head_kind,
    head_class,
    head_labels,
    hidden_width,
)


class TaskModel(nn.Module):
    """An encoder and one head: ids in, the head's outputs (and loss, given targets) out."""

    def __init__(self, encoder: nn.Module, head: Head) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                start_positions: Optional[torch.Tensor] = None, end_positions: Optional[torch.Tensor] = None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        encoded = self.encoder(**inputs, return_dict=True)
        pooled = getattr(encoded, "pooler_output", None)
        targets = ({"start_positions": start_positions, "end_positions": end_positions} if self.head.kind == "span"
                   else {"labels": labels})
        return self.head(encoded.last_hidden_state, pooled, **targets)


@dataclass
class TaskCheckpoint:
    """What a component runs: its encoder, its head and the two as one module."""

    encoder: Encoder
    head: Head
    model: TaskModel
    head_is_new: bool

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.encoder.tokenizer

    @property
    def source(self) -> str:
        return self.encoder.source

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def id2label(self) -> List[str]:
        return self.head.labels

    @property
    def max_length(self) -> int:
        return self.encoder.max_length


def _head_kind_of(config, kind: str, source) -> bool:
    """True when the checkpoint has a head of `kind`; raise when it has another task's head."""
    found = checkpoint_head_kind(config)
    if found == kind:
        return True
    archs = getattr(config, "architectures", None) or []
    if found is not None or any(a.endswith(("ForMultipleChoice", "ForNextSentencePrediction")) for a in archs):
        wanted = HEAD_KINDS[kind].auto_class.__name__[len("AutoModelFor"):]
        raise CheckpointError(f"{source}: checkpoint has a {archs[0]} head, but this component needs a {wanted} head")
    return False


def has_head(name: Union[str, Path], kind: str) -> bool:
    """Whether the checkpoint already has a head of `kind` (read from its config; weights stay on disk)."""
    source = resolve_source(name)
    return _head_kind_of(read_config(source), kind, source)


def new_head(source: Source, config: PretrainedConfig, kind: str, *, labels: Optional[Sequence[str]] = None,
             problem_type: Optional[str] = None) -> Tuple[Head, bool]:
    """The head of `kind` for a checkpoint's config, and whether it is present there: a checkpoint with
    that head gives its labels (`labels`, when given, must be the same set) and problem type; otherwise
    the head is new, with `labels`. Its weights are not read yet (`load_head_weights`)."""
    cls = head_class(kind)
    present = _head_kind_of(config, kind, source)
    needs_labels = cls is not HEAD_KINDS["span"]
    head_labels_ = labels
    if needs_labels and present:
        existing = head_labels(config)
        if labels is not None and sorted(existing) != sorted(labels):
            raise CheckpointError(f"{source}: checkpoint head has labels {existing}, the config asks for "
                                  f"{list(labels)}; set labels to null to use the checkpoint's")
        head_labels_ = existing
    if needs_labels and not head_labels_:
        raise CheckpointError(f"{source}: checkpoint has no {cls.auto_class.__name__[len('AutoModelFor'):]} head "
                              f"(architectures: {getattr(config, 'architectures', None)}); give `labels` to add a "
                              "new one")
    if problem_type is None and present:
        problem_type = getattr(config, "problem_type", None)
    return cls(config, head_labels_ or [], problem_type), present


def load_head_weights(source: Source, config: PretrainedConfig, head: Head, present: bool) -> bool:
    """Fill `head` with the checkpoint's weights when it has that head; True when the head stays new
    (random, logged)."""
    head_is_new = True
    if present:
        wanted = head.state_dict()
        stored = read_weights(source, wanted)
        if stored and set(stored) != set(wanted):
            raise CheckpointError(f"{source}: the checkpoint's head lacks {sorted(set(wanted) - set(stored))}")
        if stored:
            head.load_state_dict(stored)
            head_is_new = False
        elif weight_names(source):
            raise CheckpointError(f"{source}: config.json names a {config.architectures[0]} head, and its weights "
                                  f"have none of {sorted(wanted)}")
    if head_is_new:
        logger.warning("%s: the %s head is newly initialised (random) until fine-tuned", source,
                       head.auto_class.__name__[len("AutoModelFor"):])
    return head_is_new


def load_encoder(name: Union[str, Path], *, device: str = "auto", dtype: str = "float32",
                 pooler: Optional[bool] = None) -> Encoder:
    """The encoder of a local folder or hub name (a bare encoder, or a model with any head: the head is
    left out), with its fast tokenizer, on `device`."""
    source = open_source(name)
    torch_device = resolve_device(device)
    model = load_base_model(source, read_config(source), torch_dtype=resolve_dtype(dtype, torch_device), pooler=pooler)
    return Encoder(model.to(torch_device).eval(), load_fast_tokenizer(source, "for character offsets"), str(source))


def attach_head(encoder: Encoder, name: Union[str, Path], kind: str, *, labels: Optional[Sequence[str]] = None,
                problem_type: Optional[str] = None) -> TaskCheckpoint:
    """A head of `kind` on an encoder already loaded (shared with other heads): its weights from the
    checkpoint or head folder `name` when that has the head, else new with `labels`. The head must fit
    the encoder: same family and width."""
    source = open_source(name)
    config = read_config(source)
    if checkpoint_head_kind(config) != kind:  # a checkpoint with another task's head: its encoder only
        config.architectures = None
    mine = encoder.config
    if (config.model_type, hidden_width(config)) != (mine.model_type, hidden_width(mine)):
        raise CheckpointError(f"{source}: a {config.model_type} head of width {hidden_width(config)} cannot read the "
                              f"shared encoder {encoder.name!r} ({mine.model_type}, width {hidden_width(mine)}, from "
                              f"{encoder.source})")
    if str(source) != encoder.source:
        _check_same_encoder(source, encoder)
    head, present = new_head(source, config, kind, labels=labels, problem_type=problem_type)
    head_is_new = load_head_weights(source, config, head, present)
    if head.uses_pooler:
        _own_pooler(head, source, config, encoder.model.base_model_prefix)
    head.to(device=encoder.device, dtype=next(encoder.model.parameters()).dtype).eval()
    return TaskCheckpoint(encoder, head, TaskModel(encoder.model, head).eval(), head_is_new)


def _own_pooler(head: Head, source: Source, config: PretrainedConfig, prefix: str) -> None:
    """Give a head that reads BERT's pooler a pooler of its own: the checkpoint's (in the base model of an
    `AutoModelFor*` folder, or of a bare encoder), else a new one."""
    head.pooler = FirstTokenPooler(config)
    names = set(weight_names(source))
    for where in (f"{prefix}.{POOLER}", POOLER):
        wanted = {f"{where}{k}": k for k in head.pooler.state_dict()}
        if set(wanted) <= names:
            stored = read_weights(source, wanted)
            head.pooler.load_state_dict({wanted[name]: tensor for name, tensor in stored.items()})
            return
    logger.warning("%s: the sequence head's pooler is newly initialised (random) until fine-tuned", source)


def _check_same_encoder(source: Source, encoder: Encoder) -> None:
    """A checkpoint that carries encoder weights (not a head folder) must carry the shared encoder's own:
    a head trained on other encoder weights would read hidden states it has never seen."""
    state = encoder.model.state_dict()
    prefix = encoder.model.base_model_prefix
    names = set(weight_names(source))
    stored = {k: f"{prefix}.{k}" if f"{prefix}.{k}" in names else k for k in state if k in names or f"{prefix}.{k}" in names}
    if not stored:
        return  # a head alone
    found = read_weights(source, stored.values())
    for key, name in stored.items():
        if not torch.equal(found[name].to(state[key].dtype), state[key].cpu()):
            raise CheckpointError(f"{source}: its encoder weights differ from the shared encoder {encoder.name!r} "
                                  f"({encoder.source}; first difference: {key}): heads on one encoder must have "
                                  "been trained on that encoder. Load it in a pipeline of its own, or train the head "
                                  "on the shared encoder")


def peek_head_labels(name: Union[str, Path], kind: str) -> Optional[List[str]]:
    """The labels of a local checkpoint's head of `kind`, without loading it (None: no such head, or not
    local)."""
    config = peek_config(name)
    suffix = HEAD_KINDS[kind].auto_class.__name__[len("AutoModel"):]
    if not any(str(a).endswith(suffix) for a in config.get("architectures") or []):
        return None
    return peek_labels(name)


def load_task_checkpoint(name: Union[str, Path], kind: str, *, labels: Optional[Sequence[str]] = None,
                         problem_type: Optional[str] = None, device: str = "auto",
                         dtype: str = "float32") -> TaskCheckpoint:
    """The encoder of a local folder or hub name with a head of `kind` (token, sequence, span).

    A checkpoint with that head brings its weights and labels (`labels`, when given, must be the same
    set); a bare encoder gets a new, randomly initialised head with `labels`. The encoder is loaded as
    `AutoModel`, whatever head the checkpoint carries."""
    source = open_source(name)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = read_config(source)
    head, present = new_head(source, config, kind, labels=labels, problem_type=problem_type)
    encoder_model = load_base_model(source, config, torch_dtype=torch_dtype, pooler=True if head.uses_pooler else None)
    head_is_new = load_head_weights(source, config, head, present)
    head.to(dtype=torch_dtype)
    tokenizer = load_fast_tokenizer(source, "for character offsets")
    encoder = Encoder(encoder_model, tokenizer, str(source))
    model = TaskModel(encoder_model, head).to(torch_device).eval()
    return TaskCheckpoint(encoder, head, model, head_is_new)


def hf_config(checkpoint: TaskCheckpoint) -> PretrainedConfig:
    """The config of the checkpoint's `AutoModelFor*` class: the encoder's, with the head's fields."""
    encoder, head = checkpoint.encoder.model, checkpoint.head
    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.num_labels, config.problem_type = 2, None  # transformers' defaults: a shared encoder's config may
    # carry another head's labels (and transformers' QA class sizes its output by num_labels)
    for key, value in head.hf_config().items():
        setattr(config, key, value)
    config.architectures = [head.architecture(config)]
    config.torch_dtype = str(next(encoder.parameters()).dtype).split(".")[1]
    return config


def hf_state(checkpoint: TaskCheckpoint):
    """(config, state dict) of the checkpoint as its family's `AutoModelFor*` class has them: the encoder's
    weights under the class' prefix and the head's under its own names, nothing more, nothing missing."""
    encoder, head = checkpoint.encoder.model, checkpoint.head
    config = hf_config(checkpoint)
    target = head.auto_class._model_mapping[type(config)]
    with torch.device("meta"):
        expected = set(target(config).state_dict())
    prefix = target.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in encoder.state_dict().items()}
    state.update({head.hf_name(k, prefix): v for k, v in head.state_dict().items()})
    missing = expected - set(state)
    if missing:
        raise CheckpointError(f"{checkpoint.source}: cannot write a {config.architectures[0]}: no weights for "
                              f"{sorted(missing)[:5]}")
    return config, {k: v.detach().contiguous() for k, v in state.items() if k in expected}


def write_hf_folder(checkpoint: TaskCheckpoint, folder: Union[str, Path]) -> None:
    """The checkpoint as a `save_pretrained` folder of its `AutoModelFor*` class (safetensors, config,
    tokenizer) in an existing folder."""
    from safetensors.torch import save_file

    config, state = hf_state(checkpoint)
    save_file({k: v.cpu() for k, v in state.items()}, str(Path(folder) / SAFE_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(folder)
    checkpoint.tokenizer.save_pretrained(folder)


def save_task_checkpoint(checkpoint: TaskCheckpoint, path: Union[str, Path]) -> Path:
    """`write_hf_folder` into a temporary sibling first, moved into place: a failure never leaves half a
    checkpoint at `path`."""
    return replace_folder(path, lambda folder: write_hf_folder(checkpoint, folder))


def save_head(checkpoint: TaskCheckpoint, path: Union[str, Path]) -> Path:
    """The head alone, for a pipeline whose encoder is saved once by its own component: the config of
    its `AutoModelFor*` class and the head's weights under that class' names (`attach_head` reads it)."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        prefix = checkpoint.encoder.model.base_model_prefix
        state = {checkpoint.head.hf_name(k, prefix): v.detach().contiguous().cpu()
                 for k, v in checkpoint.head.state_dict().items()}
        save_file(state, str(folder / SAFE_WEIGHTS), metadata={"format": "pt"})
        hf_config(checkpoint).save_pretrained(folder)

    return replace_folder(path, write)


def save_encoder(encoder: Encoder, path: Union[str, Path]) -> Path:
    """The encoder alone as a bare `AutoModel` folder (safetensors, config, tokenizer)."""

    def write(folder: Path) -> None:
        encoder.model.save_pretrained(folder, safe_serialization=True)
        encoder.tokenizer.save_pretrained(folder)

    return replace_folder(path, write)


def with_layers(checkpoint: TaskCheckpoint, keep: Sequence[int]) -> TaskCheckpoint:
    """A copy of the checkpoint whose encoder keeps only the layers `keep` (structured pruning: the
    DistilBERT student init); the embeddings, pooler and head are copied unchanged."""
    import copy

    encoder = Encoder(keep_layers(checkpoint.encoder.model, keep), checkpoint.tokenizer, checkpoint.source)
    head = copy.deepcopy(checkpoint.head)
    return TaskCheckpoint(encoder, head, TaskModel(encoder.model, head), head_is_new=False)

"""What makes the hf_* components trainable by `spacy train`: the Hugging Face model wrapped for thinc
(its PyTorch wrapper, as spacy-transformers does), so spaCy's optimizer, schedules, gradient
accumulation and mixed precision apply, and the checks `initialize` runs on the training data.

The model computes its task loss itself from the training features (the same `features()` and the
same loss as `sllm finetune`), so both ways of training optimise one objective.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from spacy.tokens import Doc
from spacy.training import Example
from thinc.api import ArgsKwargs, Model, PyTorchWrapper_v2, torch2xp, xp2torch

from ..tasks import TASKS, TaskSpec

Collate = Callable[[List[Dict[str, Any]]], Dict[str, torch.Tensor]]


def loss_model(module: torch.nn.Module, collate: Collate, device: torch.device, mixed_precision: bool) -> Model:
    """A thinc Model: training features in, the model's loss (shape (1,)) out; backprop runs torch's."""

    def convert_inputs(model: Model, features: List[Dict[str, Any]], is_train: bool):
        batch = {k: v.to(device) for k, v in collate(features).items()}
        return ArgsKwargs(args=(), kwargs=batch), lambda d_inputs: []

    def convert_outputs(model: Model, inputs_outputs, is_train: bool):
        _, output = inputs_outputs
        loss = output.loss.reshape(1)

        def backward(d_loss):
            return ArgsKwargs(args=(loss,), kwargs={"grad_tensors": xp2torch(d_loss).to(loss.device)})

        return torch2xp(loss.detach().float()), backward

    return PyTorchWrapper_v2(module, convert_inputs=convert_inputs, convert_outputs=convert_outputs,
                             mixed_precision=mixed_precision, device=device)


def training_docs(name: str, spec: TaskSpec, get_examples: Optional[Callable[[], Iterable[Example]]]) -> List[Doc]:
    """The reference docs of `spacy train`'s data, checked to hold this task's annotation. Docs without
    annotation of any task (what `nlp.initialize()` makes up when it gets no data) are no training data."""
    if get_examples is None:
        return []
    docs = [eg.reference for eg in get_examples()]
    if any(spec.has_gold(doc) for doc in docs):
        return docs
    others = sorted({other.name for other in TASKS.values() for doc in docs if other.has_gold(doc)})
    if others:
        raise ValueError(f"{name}: none of the {len(docs)} training docs has {spec.gold_description}, they hold "
                         f"{' and '.join(others)} annotation: {spec.factory} learns {spec.name} ({spec.hf_task})")
    return []


def check_labels(name: str, spec: TaskSpec, docs: Sequence[Doc], labels: Sequence[str]) -> None:
    """The data's labels must all be labels of the component."""
    unknown = sorted(set(spec.gold_labels(docs)) - set(labels))
    if unknown:
        raise ValueError(f"{name}: the training data has labels {unknown} that the component does not have "
                         f"({list(labels)}); set the component's labels to null (a new head learns the data's) "
                         f"or list them all")

"""What every way of distilling shares: the teacher loaded and checked against the data, its loss mixed
with the gold labels, and the extra unlabelled corpus it labels."""

from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import spacy
import torch
from spacy.language import Language

from ... import artifacts
from ...components.pipeline import hf_component, make_input_doc
from ...core.settings import check_settings
from ...data import DataError
from ..shared.references import local_pipeline, pin_model
from ..shared.trainer import training_device
from ..shared.training import FinetuneConfig, check_prepared
from . import CompressError, hf_components


def distill_loss(pipe, outputs, teacher, inputs, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * the task's KL to the teacher's outputs at `temperature` + (1 - alpha) * its gold loss."""
    soft = pipe.spec.soft_loss(outputs, teacher, inputs, temperature, pipe)
    gold = pipe.spec.gold_loss(outputs, inputs, pipe) if alpha < 1 else soft * 0.0
    return alpha * soft + (1 - alpha) * gold


def check_data(spec_name: str, labels: Sequence[str], multi_label: Optional[bool], train: Path, dev: Path):
    info = check_prepared(spec_name, train, dev, "distillation", whose="the teacher's task")
    if sorted(info.labels) != sorted(labels):
        raise DataError(train.parent / artifacts.LABELS, None,
                        f"the teacher's labels {sorted(labels)} differ from the data's {sorted(info.labels)}: "
                        "distill on data with the teacher's label set")
    if multi_label is not None and bool(info.multi_label) != multi_label:
        kinds = {True: "multi-label", False: "single-label"}
        raise DataError(train.parent / artifacts.LABELS, None,
                        f"the teacher is {kinds[multi_label]}, the data is {kinds[bool(info.multi_label)]}: "
                        "distill on data of the teacher's kind")
    return info


def load_teacher(teacher: Union[str, Path], train: Path, dev: Path, config: FinetuneConfig):
    """The teacher pipeline (a folder or models:/ reference) loaded in float32 PyTorch on the training
    device, its data checked against it: (reference, folder, the loading overrides, device, its hf_*
    component, the prepared data's info)."""
    check_settings(config, error=CompressError)
    reference = pin_model(teacher)
    folder = local_pipeline(reference)
    names = hf_components(folder)
    device = training_device(config.device)
    # both run in float32 on the training device (bf16 comes from the Trainer's autocast on CUDA)
    settings = {"device": str(device), "dtype": "float32", "quantize": None, "runtime": "torch"}
    if config.max_length:
        settings["max_length"] = config.max_length
    overrides = {"components": {name: dict(settings) for name in names}}
    teacher_pipe = hf_component(spacy.load(folder, config=overrides))
    spec = teacher_pipe.spec
    info = check_data(spec.name, teacher_pipe.labels if spec.has_labels else [],
                      spec.multi_label_of(teacher_pipe), train, dev)
    return reference, folder, overrides, device, teacher_pipe, info


def corpus_docs(path: Path, nlp: Language, spec, pipe) -> List[Any]:
    """The extra corpus as training docs with placeholder gold (the teacher's outputs are their only target)."""
    from ...data.errors import BadRecords
    from ...data.jsonl import json_records

    bad = BadRecords(False)
    docs = [spec.unlabelled(make_input_doc(nlp, record, f"line {number}", path), pipe)
            for number, record in json_records(path, bad)]
    if not docs:
        raise DataError(path, None, "no records")
    return docs

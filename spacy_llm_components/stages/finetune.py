"""Fine-tune: a component's encoder and head on prepared data (`train.spacy`, `dev.spacy` from prepare),
written as a spaCy pipeline folder; the training itself is `shared.training`'s, which distillation uses too.
"""

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import spacy
from transformers import TrainerCallback, set_seed

from .. import artifacts
from ..artifacts import sha256_file
from ..components.pipeline import build_pipeline, hf_component
from ..core.settings import check_settings
from ..data import DataError
from ..tasks import load_docs, task_spec
from .shared.trainer import TrainingError, training_device
from .shared.training import (
    FinetuneConfig,
    FinetuneResult,
    TrainingPlan,
    check_prepared,
    schedule,
    train_component,
    warn_if_capped,
)

FinetuneError = TrainingError  # the name callers of `finetune` catch


def finetune(task: str, train: Union[str, Path], dev: Union[str, Path], output: Union[str, Path],
             config: Optional[FinetuneConfig] = None, *, resume: bool = False, keep_checkpoints: bool = False,
             progress: bool = True, callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult:
    """Fine-tune `config.base_model` on `train` (a `.spacy` file from `prepare`), pick the best
    checkpoint on `dev`, and write a spaCy pipeline folder to `output`.

    Checkpoints go to `output/checkpoints` while training; with `resume`, an
    interrupted run continues from the last one and ends as the uninterrupted
    run would have.
    """
    wall_start = time.perf_counter()
    config = config or FinetuneConfig()
    plan = _plan(task, Path(train), Path(dev), config)
    return train_component(plan, Path(output), config, wall_start=wall_start, resume=resume,
                          keep_checkpoints=keep_checkpoints, progress=progress, callbacks=callbacks)


def _plan(task: str, train: Path, dev: Path, config: FinetuneConfig) -> TrainingPlan:
    """Read and check the data, build the pipeline over the base model and its training features, and
    work out the schedule: every error surfaces here, before an output folder exists."""
    spec = task_spec(task)
    check_settings(config, error=TrainingError)
    info = check_prepared(spec.name, train, dev, "fine-tuning")
    device = training_device(config.device)
    vocab_nlp = spacy.blank(info.lang)
    train_docs = load_docs(spec.name, train, vocab_nlp).docs
    dev_docs = load_docs(spec.name, dev, vocab_nlp).docs
    settings = {**spec.component_settings(info.labels, info.multi_label, train_docs), "device": str(device)}
    if config.max_length:
        settings["max_length"] = config.max_length
    set_seed(config.seed)  # the new head's initial weights
    nlp = build_pipeline(spec.name, config.base_model, settings=settings, lang=info.lang)
    pipe = hf_component(nlp)
    warn_if_capped(config, pipe)
    features = pipe.features(train_docs)
    if not features:
        raise DataError(train, None, "no training features (are the docs empty?)")
    total_steps, eval_steps = schedule(len(features), config)
    run = {"task": spec.name, "train_sha256": sha256_file(train), "dev_sha256": sha256_file(dev),
           "train_docs": len(train_docs), "dev_docs": len(dev_docs), "labels": info.labels,
           "multi_label": info.multi_label, "lang": info.lang, "config": asdict(config)}
    encoder = artifacts.encoder_lineage(config.base_model)
    return TrainingPlan(spec, run, nlp, features, dev_docs, device, total_steps, eval_steps,
                        description=f"{spec.name} fine-tuned from {config.base_model} with spacy-llm-components",
                        meta={**run, "base_model": config.base_model, **({"encoder": encoder} if encoder else {})})

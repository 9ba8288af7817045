"""Fine-tune: a component's encoder and head on prepared data (`train.spacy`, `dev.spacy` from prepare),
written as a spaCy pipeline folder; the training itself is `shared.training`'s, which distillation uses too.
Several tasks at once (`finetune_tasks`): one shared encoder (hf_encoder) and a head per task, trained
together on one training set per task (`shared.multitask`).
"""

import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Union

import spacy
from transformers import TrainerCallback, set_seed

from .. import artifacts
from ..artifacts import sha256_file
from ..components.encoder import HFEncoder
from ..components.pipeline import build_pipeline, hf_component
from ..core.settings import check_settings
from ..data import DataError
from ..models.collate import FeatureCollator
from ..tasks import load_docs, task_spec
from .shared.multitask import (
    SCORE,
    TASK_KEY,
    MultitaskCollator,
    MultiTaskModel,
    MultitaskSettings,
    MultitaskTrainer,
    parse_weights,
    task_batch_counts,
)
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


def finetune_tasks(tasks: Sequence[str], train: Sequence[Union[str, Path]], dev: Sequence[Union[str, Path]],
                   output: Union[str, Path], config: Optional[FinetuneConfig] = None,
                   multitask: Optional[MultitaskSettings] = None, *, resume: bool = False,
                   keep_checkpoints: bool = False, progress: bool = True,
                   callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult:
    """Fine-tune one head per task on a shared encoder, together: `train[i]` and `dev[i]` are task i's
    prepared data (the corpora need not hold the same documents). The encoder starts from
    `config.base_model`: a checkpoint, or a pipeline folder with an hf_encoder whose heads are kept (with
    `freeze_encoder`, unchanged: the new heads train on the frozen encoder). The pipeline written to
    `output` holds the encoder once and every head; the checkpoint with the best weighted dev score wins.
    Resume, early stopping, bf16 and torchrun work as for one task."""
    wall_start = time.perf_counter()
    config = config or FinetuneConfig()
    multitask = multitask or MultitaskSettings()
    plan = _multitask_plan(list(tasks), [Path(p) for p in train], [Path(p) for p in dev], config, multitask)
    return train_component(plan, Path(output), config, wall_start=wall_start, resume=resume,
                           keep_checkpoints=keep_checkpoints, progress=progress, callbacks=callbacks,
                           trainer_class=MultitaskTrainer)


def _multitask_plan(tasks: List[str], train: List[Path], dev: List[Path], config: FinetuneConfig,
                    multitask: MultitaskSettings) -> TrainingPlan:
    """As `_plan`, for several tasks: every error (data, settings, heads that cannot share) before any
    output exists."""
    specs = [task_spec(task) for task in tasks]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or not names:
        raise TrainingError(f"tasks {'+'.join(tasks)}: name different tasks, each once")
    if not len(train) == len(dev) == len(names):
        raise TrainingError(f"{len(names)} tasks ({'+'.join(names)}) need as many --train and --dev files, in "
                            f"the same order; got {len(train)} and {len(dev)}")
    check_settings(config, error=TrainingError)
    check_settings(multitask, error=TrainingError)
    loss_weights = parse_weights(multitask.loss_weights, names, "--loss-weights")
    score_weights = parse_weights(multitask.score_weights, names, "--score-weights")
    infos = [check_prepared(name, t, d, "fine-tuning") for name, t, d in zip(names, train, dev)]
    if len({info.lang for info in infos}) > 1:
        raise TrainingError(f"the tasks' data were prepared for different languages: {[i.lang for i in infos]}")
    device = training_device(config.device)
    vocab_nlp = spacy.blank(infos[0].lang)
    train_docs = [load_docs(name, path, vocab_nlp).docs for name, path in zip(names, train)]
    dev_docs = [load_docs(name, path, vocab_nlp).docs for name, path in zip(names, dev)]
    nlp, encoder_name = _shared_base(config, infos[0].lang, device, specs)
    set_seed(config.seed)  # the new heads' initial weights
    for spec, info, docs in zip(specs, infos, train_docs):
        settings = {**spec.component_settings(info.labels, info.multi_label, docs), "encoder": encoder_name}
        nlp.add_pipe(spec.factory, name=spec.component, config=settings).initialize(nlp=nlp)
    pipes = [nlp.get_pipe(spec.component) for spec in specs]
    features = []
    for index, (pipe, docs, path) in enumerate(zip(pipes, train_docs, train)):
        mine = pipe.features(docs)
        if not mine:
            raise DataError(path, None, "no training features (are the docs empty?)")
        features += [{**f, TASK_KEY: index} for f in mine]
    encoder = nlp.get_pipe(encoder_name).encoder
    model = MultiTaskModel(encoder.model, {spec.component: pipe.checkpoint.head for spec, pipe in zip(specs, pipes)},
                           {spec.component: loss_weights[spec.name] for spec in specs}, multitask.freeze_encoder)
    collator = MultitaskCollator([FeatureCollator(spec.collator(encoder.tokenizer), encoder.tokenizer)
                                  for spec in specs])
    counts = task_batch_counts([sum(f[TASK_KEY] == i for f in features) for i in range(len(specs))],
                               config.batch_size, multitask.sampling, multitask.temperature)
    total_steps, eval_steps = schedule(sum(counts) * config.batch_size, config)
    run = {"task": "+".join(names), "train_sha256": [sha256_file(p) for p in train],
           "dev_sha256": [sha256_file(p) for p in dev], "train_docs": [len(d) for d in train_docs],
           "dev_docs": [len(d) for d in dev_docs], "labels": {n: i.labels for n, i in zip(names, infos)},
           "multi_label": {n: i.multi_label for n, i in zip(names, infos)}, "lang": infos[0].lang,
           "config": {**asdict(config), **asdict(multitask)}, "batches_per_epoch": dict(zip(names, counts))}
    trainer = {"primaries": {spec.component: spec.primary for spec in specs},
               "score_weights": {spec.component: score_weights[spec.name] for spec in specs}, "counts": counts,
               "encoder_name": encoder_name}
    lineage = artifacts.encoder_lineage(config.base_model)
    dev_by_head = {spec.component: docs for spec, docs in zip(specs, dev_docs)}
    return TrainingPlan(None, run, nlp, features, dev_by_head, device, total_steps, eval_steps, name=run["task"],
                        primary=SCORE, model=model, collator=collator, trainer_kwargs=trainer,
                        description=f"{run['task']} fine-tuned together on one encoder from {config.base_model} "
                                    "with spacy-llm-components",
                        meta={**run, "base_model": config.base_model, **({"encoder": lineage} if lineage else {})})


def _shared_base(config: FinetuneConfig, lang: str, device, specs) -> tuple:
    """(pipeline, its encoder's name): a pipeline folder with an hf_encoder as it is (its heads kept), or a
    new pipeline with an hf_encoder over the checkpoint `config.base_model`."""
    base = Path(config.base_model).expanduser()
    if (base / "config.cfg").is_file():
        nlp = spacy.load(base)
        encoders = [name for name, pipe in nlp.pipeline if isinstance(pipe, HFEncoder)]
        if not encoders:
            raise TrainingError(f"{base}: a pipeline without an hf_encoder component; give a checkpoint, or a "
                                "pipeline whose heads share an encoder")
        taken = [spec.component for spec in specs if spec.component in nlp.component_names]
        if taken:
            raise TrainingError(f"{base} already has {taken}; train the tasks it lacks (its heads are kept)")
        encoder = nlp.get_pipe(encoders[0])
        encoder.encoder.model.to(device)
        return nlp, encoders[0]
    nlp = spacy.blank(lang)
    settings = {"model": config.base_model, "device": str(device)}
    if config.max_length:
        settings["max_length"] = config.max_length
    nlp.add_pipe("hf_encoder", name="encoder", config=settings).initialize()
    return nlp, "encoder"

"""Training a pipeline's hf_* component with the Hugging Face `Trainer`: what fine-tuning and distillation
share. Reference docs -> features (built by the component itself, with the encoding and windows it uses
at inference) -> `Trainer` (schedules, mixed precision, checkpoints, resume, early stopping, multi-GPU
through torchrun/accelerate) -> a spaCy pipeline folder. Dev evaluations run the real pipeline through
`nlp.pipe` and its scorers, and pick the best checkpoint by that metric.
"""

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from spacy.language import Language
from spacy.tokens import Doc
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from ... import artifacts
from ...artifacts import CHECKPOINTS, METRICS, LabelInfo, read_labels
from ...components.pipeline import hf_component
from ...components.settings import SharedSettings
from ...core.settings import same_as, setting
from ...data import DataError
from ...models.checkpoint import DEFAULT_MODEL
from ...models.collate import FeatureCollator
from ...models.devices import precision_for
from ...tasks import TaskSpec
from .scoring import score_pipeline
from .trainer import (
    EvaluateAtEnd,
    JsonlLog,
    TimedTrainer,
    TrainerSettings,
    barrier,
    check_resume,
    checkpoint_step,
    duration,
    nothing_left_unless_resumable,
    start_run,
    training_arguments,
    world_size,
)

logger = logging.getLogger("spacy_llm_components")


@dataclass
class FinetuneConfig(TrainerSettings):
    """Fine-tuning settings; each is also an option of `sllm finetune`, `run` and `schedule`."""

    base_model: str = setting(DEFAULT_MODEL, "local HF checkpoint folder or hub name to start from")
    patience: Optional[int] = setting(None, "stop early after N evaluations without improvement", ge=1)
    device: str = setting("auto", "auto, cpu or cuda:N (bf16 on CUDA devices that support it)")
    max_length: Optional[int] = same_as(SharedSettings, "max_length")  # the component's setting
    eval_batch_size: int = setting(64, "nlp.pipe batch size of the dev evaluations", ge=1)


@dataclass
class FinetuneResult:
    output: Path
    task: str
    primary: str
    dev_metrics: Dict[str, Any]
    best_step: Optional[int]
    training: Dict[str, Any]  # steps, seconds, word pieces and their rate, device, precision, resumed_from
    log: List[Dict[str, Any]] = field(default_factory=list)
    verb: str = "fine-tuned"  # what the run did, for the summary line

    @property
    def steps(self) -> int:
        return self.training["steps"]

    @property
    def resumed_from(self) -> Optional[int]:
        return self.training["resumed_from"]

    def summary(self) -> str:
        t = self.training
        best = self.dev_metrics.get(self.primary)
        best_text = f"{100 * best:.2f}" if isinstance(best, (int, float)) else "n/a"
        return (f"{self.verb} {self.task} in {duration(t['wall_seconds'])}: {t['steps']} steps, "
                f"{t['word_pieces']:,} word pieces at {t['word_pieces_per_second']:,.0f}/s "
                f"({t['device']}, {t['precision']}); best dev {self.primary} {best_text} "
                f"at step {self.best_step}; pipeline in {self.output}")


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches in an order fixed by (seed, epoch).

    The Trainer's own LengthGroupedSampler draws from the global RNG, which a
    resumed run restores only after the epoch's order was drawn: a run resumed
    mid-epoch would train other batches than the uninterrupted run.
    """

    def __init__(self, batch_size: int, lengths: List[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class PipelineTrainer(TimedTrainer):
    """A Trainer whose evaluation runs the spaCy pipeline (sharing the model being trained) over the
    dev docs and reports the component's scores, and whose batches are length-grouped in a seeded order."""

    def __init__(self, *args, nlp: Language, dev_docs: Sequence[Doc], eval_batch_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nlp = nlp
        self.dev_docs = dev_docs
        self.nlp_batch_size = eval_batch_size

    def _get_train_sampler(self, *args, **kwargs):
        lengths = [len(feature["input_ids"]) for feature in self.train_dataset]
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return SeededLengthGroupedSampler(batch, lengths, self.args.data_seed or self.args.seed)

    def dev_scores(self) -> Dict[str, float]:
        return score_pipeline(self.nlp, self.dev_docs, batch_size=self.nlp_batch_size).scores


@dataclass
class TrainingPlan:
    """Everything a training run of a pipeline (fine-tuning, distillation) needs, checked and built
    before anything is written."""

    spec: Optional[TaskSpec]  # the task (None for several: see `name`, `primary`, `model`, `collator`)
    run: Dict[str, Any]  # what run.json records: task, data hashes, labels, settings
    nlp: Language
    features: List[Dict[str, Any]]
    dev_docs: Any  # the dev docs (several tasks: by head)
    device: torch.device
    total_steps: int
    eval_steps: int
    description: str = ""  # meta.json's description of the pipeline written
    verb: str = "fine-tuned"  # what the run does, for its summary line
    meta: Dict[str, Any] = field(default_factory=dict)  # meta.json's `sllm` block (best_step is added)
    resume_keys: Tuple[str, ...] = ("task", "train_sha256", "dev_sha256", "labels")  # a resume needs the same
    name: str = ""  # the task's name, or the tasks' ("ner+textcat")
    primary: str = ""  # the dev metric that picks the best checkpoint
    model: Optional[torch.nn.Module] = None  # what the Trainer trains: the component's model unless given
    collator: Optional[Any] = None  # how its batches are padded: the task's collator unless given
    trainer_kwargs: Dict[str, Any] = field(default_factory=dict)  # what the Trainer class takes besides

    def __post_init__(self) -> None:
        if self.spec is not None:
            self.name = self.name or self.spec.name
            self.primary = self.primary or self.spec.primary


def train_component(plan: TrainingPlan, output: Path, config: FinetuneConfig, *, wall_start: float, resume: bool,
                   keep_checkpoints: bool, progress: bool, callbacks: Sequence[TrainerCallback] = (),
                   trainer_class: Optional[type] = None, trainer_kwargs: Optional[Dict[str, Any]] = None
                   ) -> FinetuneResult:
    """Train the plan's pipeline with the Trainer (`trainer_class`, a PipelineTrainer) and write it to
    `output`: what fine-tuning and distillation share (resume, schedule, callbacks, best checkpoint,
    outputs)."""
    with nothing_left_unless_resumable(output):  # a run that fails before its first checkpoint leaves nothing
        last = check_resume(output, plan.run, resume, same=list(plan.resume_keys))
        start_run(output, plan.run, last)

        pipe = hf_component(plan.nlp)
        model = plan.model or pipe.checkpoint.model
        collator = plan.collator or FeatureCollator(plan.spec.collator(pipe.checkpoint.tokenizer),
                                                    pipe.checkpoint.tokenizer)
        trainer_callbacks: List[TrainerCallback] = [EvaluateAtEnd(), JsonlLog(output), *callbacks]
        if config.patience:
            trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.patience))
        args = training_arguments(
            output, config, device=plan.device, eval_steps=plan.eval_steps, metric=plan.primary,
            greater_is_better=True, progress=progress, group_by_length=True,  # (in the seeded order of the sampler)
            ddp_find_unused_parameters=plan.model is not None or None)  # (a multi-task batch uses one head)
        trainer = (trainer_class or PipelineTrainer)(
            model=model, args=args, train_dataset=plan.features,
            eval_dataset=plan.features[:1],  # required by the Trainer; evaluation runs the pipeline on dev_docs
            data_collator=collator, callbacks=trainer_callbacks, nlp=plan.nlp, dev_docs=plan.dev_docs,
            eval_batch_size=config.eval_batch_size, **plan.trainer_kwargs, **(trainer_kwargs or {}))
        if not progress:
            trainer.remove_callback(PrinterCallback)  # without a progress bar the Trainer prints every log dict
        train_out = trainer.train(resume_from_checkpoint=last)
    model.to(plan.device).eval()
    barrier()  # under torchrun: the log is complete, and no process reads the checkpoints any more

    best_step, dev_metrics = best_evaluation(trainer, plan.primary)
    training = trainer.speed(train_out.metrics.get("train_runtime", 0.0),
                             time.perf_counter() - wall_start, plan.device, precision_for(plan.device), last)
    if trainer.is_world_process_zero():  # under torchrun, one process writes
        write_outputs(plan, output, best_step, dev_metrics, training, keep_checkpoints)
    barrier()  # every process returns once the pipeline is written
    return FinetuneResult(output=output, task=plan.name, primary=plan.primary, dev_metrics=dev_metrics,
                          best_step=best_step, training=training, log=artifacts.read_log(output), verb=plan.verb)


def check_prepared(task: str, train: Path, dev: Path, stage: str, whose: str = "") -> LabelInfo:
    """The labels.json of the train/dev DocBins that `sllm prepare` wrote for `task`; a DataError naming
    the file when they are not that (another format, a missing file, data of another task)."""
    for path in (train, dev):
        if path.suffix != ".spacy":
            raise DataError(path, None, f"{stage} reads the .spacy files that `sllm prepare` writes")
        if not path.is_file():
            raise DataError(path, None, "file does not exist")
    info = read_labels(train)
    if info.task != task:
        raise DataError(train.parent / artifacts.LABELS, None,
                        f"the data was prepared for {info.task!r}, not {task!r}" + (f" ({whose})" if whose else ""))
    return info


def warn_if_capped(config: FinetuneConfig, pipe) -> None:
    """Say so when --max-length asks for more word pieces than the model takes (the model's limit rules)."""
    limit = pipe.checkpoint.max_length
    if config.max_length and config.max_length > limit:
        logger.warning("--max-length %d is capped to %d, the longest input %s takes", config.max_length, limit,
                       pipe.checkpoint.source)


def schedule(n_features: int, config: FinetuneConfig) -> Tuple[int, int]:
    """(total optimizer steps, steps between evaluations): --max-steps or the epochs, and --eval-steps or
    once per epoch."""
    steps_per_epoch = math.ceil(n_features / (config.batch_size * config.grad_accum * world_size()))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    return total_steps, max(1, min(config.eval_steps or steps_per_epoch, total_steps))


def best_evaluation(trainer: TimedTrainer, primary: str) -> tuple:
    """(step, dev metrics) of the checkpoint the Trainer kept as best."""
    best = trainer.state.best_model_checkpoint
    best_step = checkpoint_step(best) if best else None
    evals = [e for e in trainer.state.log_history if f"eval_{primary}" in e]
    chosen = next((e for e in evals if e.get("step") == best_step), evals[-1] if evals else {})
    metrics = {k[len("eval_"):]: v for k, v in chosen.items() if k.startswith("eval_")}
    return (best_step if best else chosen.get("step")), metrics


def write_outputs(plan: TrainingPlan, output: Path, best_step: Optional[int], dev_metrics: Dict[str, Any],
                   training: Dict[str, Any], keep_checkpoints: bool) -> None:
    """The pipeline folder (meta.json's `sllm` block records the run and the encoder it started from),
    then metrics.json."""
    nlp = plan.nlp
    nlp.meta.update(
        name=f"sllm_{plan.name.replace('+', '_')}", version="0.0.0", description=plan.description,
        performance={k: v for k, v in dev_metrics.items() if isinstance(v, (int, float))},
    )
    nlp.meta[artifacts.META_BLOCK] = {**plan.meta, "best_step": best_step}
    save_pipeline(nlp, output)
    artifacts.write_json(output / METRICS, {"primary": plan.primary, "best_step": best_step,
                                            "dev": dev_metrics, "training": training})
    if not keep_checkpoints:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)


def save_pipeline(nlp: Language, output: Path) -> None:
    """nlp.to_disk into a temporary folder, then move each part into `output` (which keeps its
    checkpoints and logs)."""
    tmp = output / ".pipeline-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    nlp.to_disk(tmp)
    for part in tmp.iterdir():
        target = output / part.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(part, target)
    tmp.rmdir()


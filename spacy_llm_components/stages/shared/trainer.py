"""What every training stage (fine-tuning, pre-training, distillation) shares around the Hugging Face
`Trainer`: its settings, declared once (and turned into CLI options), checkpoints and resume, the
training device, the JSONL log, evaluation by the stage's own scores, timing that keeps evaluation and
checkpointing out of the throughput, and the rule that one process writes under torchrun.
"""

import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainerCallback

from ... import artifacts
from ...artifacts import CHECKPOINTS, read_json, write_json
from ...core.settings import setting
from ...models.devices import precision_for, resolve_device

logger = logging.getLogger("spacy_llm_components")

RUN_FILE = "run.json"  # in OUTPUT/checkpoints: settings and data hashes of the run the checkpoints belong to


class TrainingError(ValueError):
    """Training cannot start as asked: the message says why and what to do."""


@dataclass
class TrainerSettings:
    """The Trainer's settings that every training stage has; each is an option of its command."""

    epochs: float = setting(3.0, "training epochs", gt=0)
    max_steps: int = setting(-1, "stop after this many optimizer steps (overrides --epochs)", ge=1, unset=-1)
    batch_size: int = setting(16, "batch size per device", ge=1)
    lr: float = setting(5e-5, "peak learning rate (linear warmup and decay; 0 trains nothing)", ge=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    warmup_ratio: float = setting(0.1, "share of steps spent warming up", ge=0, lt=1)
    grad_accum: int = setting(1, "gradient accumulation steps", ge=1)
    eval_steps: Optional[int] = setting(None, "evaluate (and checkpoint) every N steps; default once per epoch", ge=1)
    save_total_limit: int = setting(2, "Trainer checkpoints kept while training", ge=1)
    seed: int = setting(0, "random seed (new head, data order)", ge=0)


# -- processes ---------------------------------------------------------------------------------------
def world_size() -> int:
    """Processes under torchrun / accelerate launch (1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_device(device: str) -> torch.device:
    """The device a training process puts its models on: `device` resolved ('auto', 'cpu', 'cuda:N'),
    except that under torchrun each process trains on its own GPU (cuda:LOCAL_RANK)."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and world_size() > 1:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if resolved.type == "cuda" and resolved.index:
        torch.cuda.set_device(resolved)
    return resolved


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def sum_over_processes(value: int, device: torch.device) -> int:
    """`value` summed over the processes (itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    total = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def distributed_backend(device: torch.device) -> Optional[str]:
    """gloo for several CPU processes (NCCL, the default, needs GPUs)."""
    return "gloo" if device.type == "cpu" and world_size() > 1 else None


# -- checkpoints and resume --------------------------------------------------------------------------
def checkpoint_step(checkpoint: "str | Path") -> int:
    """The step of a Trainer checkpoint folder (`checkpoint-N`)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def last_complete_checkpoint(checkpoints: Path) -> Optional[str]:
    """The newest `checkpoint-N` the Trainer finished writing (trainer_state.json is written last);
    one cut short by a kill during saving is skipped."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.glob("checkpoint-*")
            if p.name.rsplit("-", 1)[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=checkpoint_step)) if done else None


def check_resume(output: Path, run: Dict[str, Any], resume: bool, same: List[str]) -> Optional[str]:
    """The checkpoint to continue from, or None for a fresh start. An interrupted run is never
    overwritten without `resume`, and is resumed only with the same values of `same` (data hashes);
    other changed settings are allowed, with a warning."""
    checkpoints = output / CHECKPOINTS
    last = last_complete_checkpoint(checkpoints)
    if last and not resume:
        raise TrainingError(f"{checkpoints} holds an interrupted run (last checkpoint {Path(last).name}); "
                            "pass --resume to continue it, or delete that folder to start over")
    if not last:
        if resume:
            logger.warning("%s: no checkpoint to resume from; starting from the beginning", checkpoints)
        return None
    previous = read_json(checkpoints / RUN_FILE)
    for key in same:
        if previous.get(key) != run[key]:
            what = key[:-len("_sha256")] if key.endswith("_sha256") else key
            raise TrainingError(f"{checkpoints}: the interrupted run used another {what} "
                                f"({str(previous.get(key))[:80]!r}); resume with the same data and settings, "
                                "or delete the folder")
    changed = sorted(k for k in run["config"] if previous.get("config", {}).get(k) != run["config"][k])
    if changed:
        logger.warning("resuming with changed settings %s: the result differs from an uninterrupted run", changed)
    return last


@contextmanager
def nothing_left_unless_resumable(output: Path) -> Iterator[None]:
    """An output folder this run made is removed again when the run fails before it wrote a complete
    checkpoint (a bad setting the Trainer finds, a crash in the first steps): nothing half made stays
    behind. One with a checkpoint stays, to be resumed."""
    fresh = not output.exists()
    try:
        yield
    except BaseException:
        if fresh and is_main_process() and not last_complete_checkpoint(output / CHECKPOINTS):
            shutil.rmtree(output, ignore_errors=True)
        raise


def start_run(output: Path, run: Dict[str, Any], resume_from: Optional[str]) -> None:
    """Record the run beside its checkpoints and start (or trim) its log; only then is anything written."""
    if not is_main_process():
        return
    (output / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    write_json(output / CHECKPOINTS / RUN_FILE, run)
    artifacts.truncate_log(output, checkpoint_step(resume_from) if resume_from else None)


# -- callbacks and timing ----------------------------------------------------------------------------
class EvaluateAtEnd(TrainerCallback):
    """Evaluate and save at the last step too, so the final weights compete for 'best'."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


class BestCheckpointOnEveryRank(TrainerCallback):
    """Every process knows the best checkpoint. The Trainer records it only where the checkpoint folder
    exists when it looks, which on the other processes of a torchrun run depends on how far process 0
    got writing it; a process that missed it skips the barrier before the best model is reloaded, and
    the run hangs there."""

    def on_save(self, args, state, control, **kwargs):
        best = getattr(state, "best_global_step", None)
        if best:
            state.best_model_checkpoint = os.path.join(args.output_dir, f"checkpoint-{best}")


class JsonlLog(TrainerCallback):
    """Appends every Trainer log (loss, learning rate, dev metrics) to OUTPUT/training_log.jsonl, with the
    time it was logged."""

    def __init__(self, output: Path) -> None:
        self.output = output

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            artifacts.append_log(self.output, {"step": state.global_step, "epoch": state.epoch,
                                               "time": round(time.time(), 3), **logs})


class TimedTrainer(Trainer):
    """A Trainer whose evaluation is the stage's own `dev_scores`, and that times evaluation, checkpoint
    saving and best-model reloading apart from training, so throughput counts training only."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(BestCheckpointOnEveryRank())
        self.eval_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.word_pieces = 0  # the real (unpadded) pieces this process trained on

    def training_step(self, model, inputs, *args, **kwargs):
        self.word_pieces += int(inputs["attention_mask"].sum())
        return super().training_step(model, inputs, *args, **kwargs)

    def dev_scores(self) -> Dict[str, float]:
        """The model's scores on the stage's dev data (called with the model in eval mode)."""
        raise NotImplementedError

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        start = time.perf_counter()
        metrics = None
        if self.is_world_process_zero():  # under torchrun, one process scores and tells the others
            training = self.model.training
            self.model.eval()
            try:
                scores = self.dev_scores()
            finally:
                self.model.train(training)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        if self.args.world_size > 1:
            metrics = broadcast_object_list([metrics])[0]  # every process keeps the same best checkpoint
        self.eval_seconds += time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self.checkpoint_seconds += time.perf_counter() - start

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        # transformers 4.50-4.56 (fixed upstream by #40923): `_save_checkpoint` records the best checkpoint
        # only if its folder exists, which another process can test before the main one has made it; a
        # process left without a best checkpoint skips the barrier before the best model is reloaded at
        # the end, and the processes hang.
        if _internal_call:
            barrier()

    def _load_best_model(self):
        start = time.perf_counter()
        try:
            return super()._load_best_model()
        finally:
            self.checkpoint_seconds += time.perf_counter() - start

    def speed(self, train_runtime: float, wall_seconds: float, device: torch.device, precision: str,
              resumed_from: Optional[str]) -> Dict[str, Any]:
        """The `training` block of metrics.json (word pieces summed over the processes)."""
        word_pieces = sum_over_processes(self.word_pieces, self.args.device)
        train_seconds = max(train_runtime - self.eval_seconds - self.checkpoint_seconds, 0.0)
        return {"steps": self.state.global_step, "wall_seconds": round(wall_seconds, 2),
                "train_seconds": round(train_seconds, 2), "eval_seconds": round(self.eval_seconds, 2),
                "checkpoint_seconds": round(self.checkpoint_seconds, 2), "word_pieces": word_pieces,
                "word_pieces_per_second": round(word_pieces / train_seconds, 1) if train_seconds else 0.0,
                "device": str(device), "precision": precision, "world_size": world_size(),
                "resumed_from": checkpoint_step(resumed_from) if resumed_from else None}


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def training_arguments(output: Path, settings: TrainerSettings, *, device: torch.device, eval_steps: int, metric: str,
                       greater_is_better: bool, progress: bool, **extra: Any):
    """TrainingArguments every stage shares: linear warmup and decay, evaluation and a checkpoint every
    `eval_steps` (best by `metric` reloaded at the end), precision for the device, gloo across CPU
    processes, seeded data order, no external reporting."""
    from transformers import TrainingArguments

    precision = precision_for(device)
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS), num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr, weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
        lr_scheduler_type="linear", eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps",
        save_steps=eval_steps, save_total_limit=settings.save_total_limit, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=greater_is_better, logging_strategy="steps",
        logging_steps=max(1, min(50, eval_steps)), seed=settings.seed, data_seed=settings.seed,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience survives a resume
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device.type == "cpu",
        ddp_backend=distributed_backend(device), report_to="none", disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False, save_safetensors=True, **extra)

"""Domain-adaptive pre-training: a text corpus -> continued masked-language-model training with the
Hugging Face `Trainer` -> a plain Hugging Face encoder folder that `sllm finetune --base-model` takes.

The corpus streams through `datasets` (see `lm`); a seeded share of its documents (or `--dev` files)
is held out, masked once, and scored before training and at every evaluation, so the perplexities
compare the same masked positions. The Trainer brings the schedule, precision, checkpoints, resume
and multi-GPU launchers, as for fine-tuning (`training`). The output folder holds the encoder
(`save_pretrained`: safetensors, config, fast tokenizer), `metrics.json` (perplexity before and after,
the curve, the corpus' hashes, speed) and `training_log.jsonl`.
"""

import ast
import hashlib
import logging
import math
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from ... import artifacts
from ...artifacts import CHECKPOINTS, METRICS, sha256_file
from ...core.settings import setting
from ...data import DataError
from ...models.checkpoint import DEFAULT_MODEL
from ...models.collate import FeatureCollator
from ...models.devices import precision_for, resolve_device
from ...models.masked_lm import MaskedLM, load_masked_lm, write_masked_lm
from ..shared.trainer import (
    EvaluateAtEnd,
    JsonlLog,
    TimedTrainer,
    TrainerSettings,
    TrainingError,
    check_resume,
    checkpoint_step,
    duration,
    nothing_left_unless_resumable,
    start_run,
    training_arguments,
    world_size,
)
from .lm import (
    BlockMasking,
    LMDataConfig,
    block_length,
    check_settings,
    check_whole_word_tokenizer,
    corpus_cache,
    count_pieces,
    datasets_progress,
    derived_seed,
    heldout_masking,
    masked_batches,
    masked_loss_sum,
    mlm_head,
    perplexity,
    read_documents,
    to_blocks,
)

PathLike = Union[str, Path]


@dataclass
class PretrainConfig(LMDataConfig, TrainerSettings):
    """Pre-training settings; each is also an option of `sllm pretrain` (and, prefixed, of `sllm run`). The
    Trainer's are `TrainerSettings`, with what differs for masked-LM training said here."""

    base_model: str = setting(DEFAULT_MODEL, "local HF encoder folder or hub name to continue pre-training")
    epochs: float = setting(1.0, "passes over the corpus", gt=0)
    batch_size: int = setting(16, "blocks per batch per device", ge=1)
    eval_steps: Optional[int] = setting(None, "score the held-out text (and checkpoint) every N steps; default once "
                                              "per epoch", ge=1)
    dev_fraction: float = setting(0.05, "share of the corpus' documents held out for perplexity when no --dev file "
                                        "is given", gt=0, lt=1)
    seed: int = setting(0, "random seed (new head parts, held-out split, masking, data order)", ge=0)


@dataclass
class PretrainResult:
    output: Path
    perplexity_before: float
    perplexity_after: float
    best_step: Optional[int]
    training: Dict[str, Any]  # steps, seconds, word pieces and their rate, device, precision, resumed_from
    corpus: Dict[str, Any]  # files and hashes, documents, word pieces, blocks

    def summary(self) -> str:
        t = self.training
        return (f"pre-trained in {duration(t['wall_seconds'])}: {t['steps']} steps, {t['word_pieces']:,} word pieces "
                f"at {t['word_pieces_per_second']:,.0f}/s ({t['device']}, {t['precision']}); held-out perplexity "
                f"{self.perplexity_before:,.2f} -> {self.perplexity_after:,.2f} (step {self.best_step}); "
                f"encoder in {self.output}")


class KeyedBlocks(torch.utils.data.Dataset):
    """The training blocks, each returned with its key: `epoch * len + index` (see KeyedSampler)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: int) -> Dict[str, Any]:
        return {"input_ids": self.blocks[key % len(self.blocks)]["input_ids"], "key": key}


class KeyedSampler(torch.utils.data.Sampler):
    """Blocks in an order fixed by (seed, epoch), each as `epoch * n + index`: the key that seeds its
    masking, so a block is masked anew every epoch, and the same way wherever a run was resumed (the
    Trainer restores the global random state only after it fetched the first batch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter((order + self.epoch * self.n).tolist())


class MaskedLMTrainer(TimedTrainer):
    """A Trainer whose evaluation is the perplexity of the fixed held-out batches, and whose loss is the mean
    over every masked piece of the global batch: in one process computed from vocabulary logits of the
    masked positions only; under torchrun from each process' own forward pass (which synchronises the
    gradients), weighted by its share of the masked pieces, so that N processes train as one does on the
    same global batch (a plain mean of the processes' means would weigh a block with few masked pieces more)."""

    def __init__(self, *args, heldout: List[Dict[str, torch.Tensor]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heldout = heldout
        self.head = mlm_head(self.model)

    def _get_train_sampler(self, *args, **kwargs):
        return KeyedSampler(len(self.train_dataset), self.args.data_seed or self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.head is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if model is not self.model:  # wrapped for several processes
            count = (inputs["labels"] != -100).sum()
            everywhere = self.accelerator.gather(count.reshape(1)).sum().clamp(min=1)
            return model(**inputs).loss * count * self.accelerator.num_processes / everywhere
        with self.accelerator.autocast():
            total, count = masked_loss_sum(model, self.head, inputs)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return total / num_items_in_batch
        return total / count.clamp(min=1)

    def dev_scores(self) -> Dict[str, float]:
        return perplexity(self.model, self.heldout, self.args.device).scores()


@dataclass
class _Plan:
    """Everything a pre-training run needs, checked and built before anything is written."""

    lm: MaskedLM
    train_blocks: Any  # datasets.Dataset of {"input_ids"}
    heldout: List[Dict[str, torch.Tensor]]
    run: Dict[str, Any]  # what run.json records: corpus and held-out hashes, settings
    corpus: Dict[str, Any]
    heldout_info: Dict[str, Any]
    device: torch.device
    eval_steps: int


def pretrain(corpus: Union[PathLike, Sequence[PathLike]], output: PathLike, config: Optional[PretrainConfig] = None,
             *, dev: Union[None, PathLike, Sequence[PathLike]] = None, resume: bool = False,
             keep_checkpoints: bool = False, progress: bool = True,
             callbacks: Sequence[TrainerCallback] = ()) -> PretrainResult:
    """Continue pre-training `config.base_model` with masked-language modelling on the corpus files and
    write the encoder to `output`; `dev` files are the held-out text (default a seeded share of the
    corpus). Checkpoints go to `output/checkpoints` while training; with `resume`, an interrupted run
    continues from the last one and ends as the uninterrupted run would have."""
    wall_start = time.perf_counter()
    config = config or PretrainConfig()
    output = Path(output)
    corpus, dev = _paths(corpus), _paths(dev)
    with corpus_cache(beside=output) as cache, datasets_progress(progress), nothing_left_unless_resumable(output):
        plan = _plan(corpus, dev, config, cache)
        last = check_resume(output, plan.run, resume, same=["corpus_sha256", "dev_sha256"])
        start_run(output, plan.run, last)
        collator = FeatureCollator(BlockMasking(plan.lm, config, derived_seed(config.seed, "train")),
                                    plan.lm.tokenizer)
        total_steps = _total_steps(len(plan.train_blocks), config)
        args = training_arguments(
            output, config, device=plan.device, eval_steps=max(1, min(plan.eval_steps, total_steps)),
            metric="perplexity", greater_is_better=False, progress=progress)
        trainer = MaskedLMTrainer(
            model=plan.lm.model, args=args, train_dataset=KeyedBlocks(plan.train_blocks),
            eval_dataset=plan.heldout,  # required by the Trainer; evaluation scores the fixed held-out batches
            data_collator=collator, callbacks=[EvaluateAtEnd(), JsonlLog(output), *callbacks], heldout=plan.heldout)
        if not progress:
            trainer.remove_callback(PrinterCallback)  # without a progress bar the Trainer prints every log dict
        before = trainer.evaluate() if last is None else _score(trainer)  # the base model (step 0 of the curve)
        with _tied_weights_understood(plan.lm.model):
            train_out = trainer.train(resume_from_checkpoint=last)
    best_step = checkpoint_step(trainer.state.best_model_checkpoint) if trainer.state.best_model_checkpoint else None
    training = trainer.speed(train_out.metrics.get("train_runtime", 0.0),
                             time.perf_counter() - wall_start, plan.device, precision_for(plan.device), last)
    result = PretrainResult(output, before["eval_perplexity"], float(trainer.state.best_metric), best_step, training,
                            plan.corpus)
    if trainer.is_world_process_zero():  # under torchrun, one process writes
        _write_outputs(plan, output, config, result, keep_checkpoints)
    return result


class _TiedWeightsNotice(logging.Filter):
    """The Trainer, loading a checkpoint, warns that the output layer is missing from it: it is tied to
    the input embeddings (saved once, as safetensors requires) and loads with them."""

    def __init__(self, tied: Sequence[str]) -> None:
        super().__init__()
        self.tied = list(tied)  # patterns, as transformers reads them

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("There were missing keys in the checkpoint model loaded"):
            return True
        try:
            missing = ast.literal_eval(message.split(": ", 1)[1].rstrip("."))
        except (ValueError, SyntaxError, IndexError):
            return True
        return not all(any(re.search(pattern, key) for pattern in self.tied) for key in missing)


@contextmanager
def _tied_weights_understood(model) -> Iterator[None]:
    trainer_logger = logging.getLogger("transformers.trainer")
    notice = _TiedWeightsNotice(getattr(model, "_tied_weights_keys", None) or [])
    trainer_logger.addFilter(notice)
    try:
        yield
    finally:
        trainer_logger.removeFilter(notice)


def _score(trainer: MaskedLMTrainer) -> Dict[str, float]:
    """The held-out scores without logging them (a resumed run logged the base model's already)."""
    trainer.model.eval()
    return {f"eval_{k}": v for k, v in trainer.dev_scores().items()}


def _paths(files: Union[None, PathLike, Sequence[PathLike]]) -> List[Path]:
    if files is None:
        return []
    return [Path(files)] if isinstance(files, (str, Path)) else [Path(p) for p in files]


def _total_steps(blocks: int, config: PretrainConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return math.ceil(math.ceil(blocks / (config.batch_size * config.grad_accum * world_size())) * config.epochs)


def _plan(corpus: List[Path], dev: List[Path], config: PretrainConfig, cache: Path) -> _Plan:
    """Check the settings and files, load the model, read, split, tokenize and pack the corpus, and mask
    the held-out blocks: every error surfaces here, before an output folder exists."""
    check_settings(config)
    if not corpus:
        raise TrainingError("no corpus file given")
    if not dev and not 0.0 < config.dev_fraction < 1.0:
        raise TrainingError(f"--dev-fraction {config.dev_fraction}: use a share between 0 and 1, or give --dev FILE")
    for path in [*corpus, *dev]:
        if not path.is_file():
            raise DataError(path, None, "file does not exist" if not path.exists() else "not a file")
    device = resolve_device(config.device)
    set_seed(config.seed)  # the head parts a checkpoint lacks
    lm = load_masked_lm(config.base_model, device="cpu")  # the Trainer moves it
    if config.whole_word_mask:
        check_whole_word_tokenizer(lm)
    length = block_length(lm, config)
    documents = read_documents(corpus, config, cache)
    if dev:
        train_docs, dev_docs = documents, read_documents(dev, config, cache)
        held_from = "file"
    else:
        if len(documents) < 2:
            raise DataError(corpus[0], None, f"{len(documents)} document: too few to hold out a share for perplexity; "
                            "give more text or a --dev FILE")
        n_dev = min(len(documents) - 1, max(1, round(config.dev_fraction * len(documents))))
        split = documents.train_test_split(test_size=n_dev, seed=config.seed)
        train_docs, dev_docs = split["train"], split["test"]
        held_from = f"{config.dev_fraction:g} of the corpus documents, seed {config.seed}"
    train_blocks, dev_blocks = to_blocks(train_docs, lm.tokenizer, length), to_blocks(dev_docs, lm.tokenizer, length)
    heldout = masked_batches(dev_blocks, heldout_masking(lm, config), config.eval_batch_size)
    masked = sum(int((b["labels"] != -100).sum()) for b in heldout)
    if not masked:
        raise DataError((dev or corpus)[0], None, "the held-out text is too short: not one word piece was masked; "
                        "give more text or a longer --dev FILE")
    corpus_info = {**_files_identity(corpus, config), "documents": len(train_docs),
                   "word_pieces": count_pieces(train_blocks), "blocks": len(train_blocks), "block_length": length}
    heldout_info = {**(_files_identity(dev, config) if dev else {"files": [], "sha256": None}), "from": held_from,
                    "documents": len(dev_docs), "word_pieces": count_pieces(dev_blocks), "blocks": len(dev_blocks),
                    "masked_pieces": masked}
    run = {"stage": "pretrain", "corpus_sha256": corpus_info["sha256"], "dev_sha256": heldout_info["sha256"],
           "base_model": config.base_model, "config": asdict(config)}
    steps_per_epoch = math.ceil(len(train_blocks) / (config.batch_size * config.grad_accum * world_size()))
    return _Plan(lm, train_blocks, heldout, run, corpus_info, heldout_info, device,
                 eval_steps=config.eval_steps or steps_per_epoch)


def _files_identity(paths: List[Path], config: PretrainConfig) -> Dict[str, Any]:
    """Each file's path and sha256, and one hash of them all with the options that decide how they read."""
    files = [{"path": str(p.resolve()), "sha256": sha256_file(p)} for p in paths]
    digest = hashlib.sha256(f"{config.text_unit}|{config.text_column}".encode())
    for f in files:
        digest.update(b"\0" + f["sha256"].encode())
    return {"files": files, "sha256": digest.hexdigest()}


def _write_outputs(plan: _Plan, output: Path, config: PretrainConfig, result: PretrainResult,
                   keep_checkpoints: bool) -> None:
    """The encoder files and metrics.json, moved into `output` together; then the checkpoints go."""
    curve = [{"step": e["step"], "perplexity": e["eval_perplexity"], "loss": e["eval_loss"]}
             for e in artifacts.read_log(output) if "eval_perplexity" in e]
    metrics = {"stage": "pretrain", "base_model": config.base_model, "perplexity_before": result.perplexity_before,
               "perplexity_after": result.perplexity_after, "best_step": result.best_step, "curve": curve,
               "corpus": plan.corpus, "heldout": plan.heldout_info, "new_head_weights": plan.lm.new_weights,
               "config": asdict(config), "training": result.training}
    plan.lm.model.to("cpu").eval()

    def fill(folder: Path) -> None:
        write_masked_lm(plan.lm, folder)
        (folder / METRICS).write_bytes(artifacts.json_bytes(metrics))

    artifacts.write_folder(output, fill)
    if not keep_checkpoints:
        shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)

"""Distill a pipeline into a student with fewer encoder layers (every other one of the teacher's by
default, as DistilBERT), with the teacher's embeddings and head, trained with the Hugging Face `Trainer`
on the teacher's temperature-softened outputs (KL, T^2-scaled) mixed with the gold labels, optionally on
extra unlabelled text that only the teacher labels. Resumable like fine-tuning; its output is an ordinary
pipeline of this project, whose meta.json records the teacher and the layers.

A teacher whose heads share an encoder (hf_encoder) gives a student with every head on one shorter
encoder, trained on one training set per head, batches drawn across the heads as in multi-task
fine-tuning (`shared.multitask`).
"""

import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Union

import spacy
import torch
from transformers import TrainerCallback, set_seed

from ... import artifacts
from ...artifacts import sha256_file, sha256_tree
from ...components.pipeline import hf_component
from ...core.settings import check_settings, setting
from ...data import DataError
from ...models.collate import FeatureCollator
from ...models.devices import resolve_device
from ...models.encoder import Encoder, encoder_layers, keep_layers
from ...models.task_model import save_encoder, save_task_checkpoint, with_layers
from ...tasks import load_docs
from ..shared.multitask import (
    SCORE,
    TASK_KEY,
    MultitaskCollator,
    MultiTaskModel,
    MultitaskSettings,
    MultitaskTrainer,
    parse_weights,
    task_batch_counts,
)
from ..shared.references import local_pipeline, pin_model
from ..shared.trainer import training_device
from ..shared.training import (
    FinetuneConfig,
    FinetuneResult,
    PipelineTrainer,
    TrainingPlan,
    schedule,
    train_component,
)
from . import COMPRESSION, CompressError, check_apart, hf_components, shared_encoders
from .cross import CrossDistillTrainer, check_student_base, cross_plan
from .teacher import check_data, corpus_docs, distill_loss, load_teacher


@dataclass
class DistillConfig:
    """Distillation settings; each is also an option of `sllm distill` (and, prefixed, of `sllm run`)."""

    layers: Optional[int] = setting(None, "student encoder layers, taken evenly from the teacher's (default: every "
                                          "other layer, as DistilBERT)", ge=1)
    keep: Optional[str] = setting(None, "teacher layers the student keeps, by index, e.g. 0,2,4 (instead of --layers)")
    alpha: float = setting(0.5, "weight of the teacher's soft outputs in the loss; 1 - alpha goes to the gold labels",
                           ge=0, le=1)
    temperature: float = setting(2.0, "softmax temperature of the KL term (the term is scaled by T^2)", gt=0)
    corpus: Optional[str] = setting(None, 'extra unlabelled text that the teacher labels: JSONL {"text": ..., '
                                          '"questions": [...]} per line, as `sllm predict` reads')
    student_base: Optional[str] = setting(None, "a Hugging Face encoder checkpoint the student starts from instead "
                                                "of the teacher's layers: any tokenizer, width and depth (NER, textcat)")


def check_distill_config(config: DistillConfig, teacher_layers: Optional[int] = None) -> Optional[List[int]]:
    """Refuse bad distillation settings before any work: alpha, temperature, the corpus file, --layers /
    --keep; with the teacher's layer count, also their range, and return the kept layer indices."""
    check_settings(config, error=CompressError)
    if config.corpus and not Path(config.corpus).is_file():
        raise DataError(Path(config.corpus), None, "file does not exist")
    if config.student_base is not None:
        check_student_base(config.student_base)
    if teacher_layers is not None:
        return kept_layers(teacher_layers, config)
    _keep_indices(config)
    return None


def _keep_indices(config: DistillConfig) -> Optional[List[int]]:
    if config.keep is not None and config.layers is not None:
        raise CompressError("give --layers or --keep, not both")
    if config.keep is None:
        return None
    try:
        return [int(part) for part in str(config.keep).split(",") if part.strip()]
    except ValueError:
        raise CompressError(f"--keep {config.keep!r}: expected layer indices like 0,2,4") from None


def kept_layers(teacher_layers: int, config: DistillConfig) -> List[int]:
    """The teacher layer indices the student keeps: `keep`, or `layers` spread evenly from the first
    (6 -> 3 keeps 0, 2, 4), or every other layer."""
    keep = _keep_indices(config)
    if keep is not None:
        bad = [i for i in keep if not 0 <= i < teacher_layers]
        if not keep or bad or len(set(keep)) != len(keep) or keep != sorted(keep):
            raise CompressError(f"--keep {config.keep!r}: the teacher has {teacher_layers} layers; give distinct "
                                f"indices from 0 to {teacher_layers - 1} in increasing order")
        return keep
    layers = config.layers if config.layers is not None else max(1, teacher_layers // 2)
    if not 1 <= layers <= teacher_layers:
        raise CompressError(f"--layers {layers}: the student needs 1 to {teacher_layers} layers "
                            f"(the teacher has {teacher_layers})")
    return [i * teacher_layers // layers for i in range(layers)]


class DistillTrainer(PipelineTrainer):
    """A PipelineTrainer whose loss is alpha * KL(teacher || student) at temperature T (times T^2) plus
    (1 - alpha) * the gold loss; the teacher runs on each batch in eval mode, without gradients."""

    def __init__(self, *args, teacher: torch.nn.Module, alpha: float, temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.pipe = hf_component(self.nlp)
        self.model_accepts_loss_kwargs = False  # the loss is a mean per batch: the Trainer scales it for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.pipe.spec
        feed = {k: v for k, v in inputs.items() if k not in spec.targets and k != "gold"}
        outputs = model(**feed)
        with torch.no_grad():
            self.teacher.eval()
            teacher = self.teacher(**feed)
        loss = distill_loss(self.pipe, outputs, teacher, inputs, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


class MultitaskDistillTrainer(MultitaskTrainer):
    """DistillTrainer's loss for a student whose heads share an encoder: each batch (of one head's task)
    through the student's and the teacher's encoder and that head, alpha * KL + (1 - alpha) * gold, times
    the task's loss weight; evaluation scores every head on its own dev docs (MultitaskTrainer's)."""

    def __init__(self, *args, teacher: torch.nn.Module, alpha: float, temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = int(inputs[TASK_KEY][0])
        pipe = self.nlp.get_pipe(list(self.primaries)[index])
        spec = pipe.spec
        feed = {k: v for k, v in inputs.items() if k not in spec.targets and k != "gold"}
        outputs = model(**feed)["output"]
        with torch.no_grad():
            self.teacher.eval()
            teacher = self.teacher(**feed)["output"]
        loss = distill_loss(pipe, outputs, teacher, inputs, self.alpha, self.temperature) * \
            self.model.loss_weights[index]
        return (loss, {"loss": loss}) if return_outputs else loss


Paths = Union[str, Path, Sequence[Union[str, Path]]]


def distill(teacher: Union[str, Path], train: Paths, dev: Paths, output: Union[str, Path],
            config: Optional[FinetuneConfig] = None, distill_config: Optional[DistillConfig] = None,
            multitask: Optional[MultitaskSettings] = None, *, resume: bool = False, keep_checkpoints: bool = False,
            progress: bool = True, callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult:
    """Distill the pipeline `teacher` (a folder or models:/ reference) into a student with fewer encoder
    layers, trained on `train` (a `.spacy` file from `prepare`, whose labels must be the teacher's) and
    the optional extra corpus; the best checkpoint on `dev` is written to `output` as a pipeline.
    `config` holds the training settings of `sllm finetune` (its base_model is not used).

    A teacher whose heads share an encoder takes one `train` and `dev` file per head, in the pipeline's
    order; the student keeps every head, on one encoder, and `multitask` says how batches are drawn
    across the heads and how their losses and dev scores are weighed (as in `finetune_tasks`)."""
    wall_start = time.perf_counter()
    config = config or FinetuneConfig()
    distill_config = distill_config or DistillConfig()
    if distill_config.student_base is not None:
        if is_shared(teacher):
            raise CompressError("--student-base: distilling heads on a shared encoder into another encoder is not "
                                "supported; distill each head's pipeline, or drop --student-base to keep the layers")
        plan, kwargs = cross_plan(teacher, _one(train, "train"), _one(dev, "dev"), Path(output), config, distill_config)
        return train_component(plan, Path(output), config, wall_start=wall_start, resume=resume,
                               keep_checkpoints=keep_checkpoints, progress=progress, callbacks=callbacks,
                               trainer_class=CrossDistillTrainer, trainer_kwargs=kwargs)
    if is_shared(teacher):
        plan, teacher_model = _shared_plan(teacher, _paths(train), _paths(dev), Path(output), config, distill_config,
                                           multitask or MultitaskSettings())
        trainer_class = MultitaskDistillTrainer
    else:
        if multitask is not None and multitask != MultitaskSettings():
            raise CompressError("the --heads-* options draw batches across heads on a shared encoder; this teacher "
                                "has one head")
        plan, teacher_model = _plan(teacher, _one(train, "train"), _one(dev, "dev"), Path(output), config,
                                    distill_config)
        trainer_class = DistillTrainer
    return train_component(plan, Path(output), config, wall_start=wall_start, resume=resume,
                          keep_checkpoints=keep_checkpoints, progress=progress, callbacks=callbacks,
                          trainer_class=trainer_class,
                          trainer_kwargs={"teacher": teacher_model, "alpha": distill_config.alpha,
                                          "temperature": distill_config.temperature})


def is_shared(pipeline: Union[str, Path]) -> bool:
    """Whether the pipeline (a folder or models:/ reference) has heads on a shared encoder."""
    folder = local_pipeline(pin_model(pipeline))
    hf_components(folder)  # (not a pipeline, or one without hf_* components: a CompressError here)
    return bool(shared_encoders(folder))


def _paths(paths: Paths) -> List[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def _one(paths: Paths, option: str) -> Path:
    """The one file of a teacher with one head."""
    given = _paths(paths)
    if len(given) != 1:
        raise CompressError(f"a teacher with one head takes one --{option} file; got {len(given)}")
    return given[0]


def check_distillation(teacher: Union[str, Path], train: Union[str, Path], dev: Union[str, Path],
                       distill_config: DistillConfig, config: Optional[FinetuneConfig] = None) -> List[int]:
    """Everything `distill` refuses (the settings, the layers against the teacher's, the data's task,
    labels and label kind against the teacher's), checked without training: the compress flow runs it
    before it makes any variant. Returns the kept layer indices."""
    config = config or FinetuneConfig()
    resolve_device(config.device)  # a device this machine lacks fails here too; the check itself runs on the CPU
    return _load_and_check(teacher, Path(train), Path(dev), replace(config, device="cpu"), distill_config)[-1]


def _load_and_check(teacher, train: Path, dev: Path, config: FinetuneConfig, distill_config: DistillConfig):
    """`load_teacher` after the settings are checked, with the kept layer indices last."""
    check_distill_config(distill_config)
    loaded = load_teacher(teacher, train, dev, config)
    return (*loaded, kept_layers(len(encoder_layers(loaded[4].checkpoint.encoder.model)), distill_config))


def _plan(teacher: Union[str, Path], train: Path, dev: Path, output: Path, config: FinetuneConfig,
          distill_config: DistillConfig):
    """Load the teacher, check the data against it and the settings, and build the student pipeline
    and its features: every error surfaces here, before an output folder exists."""
    reference, folder, overrides, device, teacher_pipe, info, keep = _load_and_check(teacher, train, dev, config,
                                                                                   distill_config)
    check_apart(output, folder, "the student")
    spec = teacher_pipe.spec
    corpus = Path(distill_config.corpus) if distill_config.corpus else None
    teacher_model = teacher_pipe.checkpoint.model

    set_seed(config.seed)
    student_nlp = spacy.load(folder, config=overrides)
    student_pipe = hf_component(student_nlp)
    with tempfile.TemporaryDirectory(prefix="sllm-student-") as tmp:  # loaded back through the public from_disk
        save_task_checkpoint(with_layers(teacher_pipe.checkpoint, keep), Path(tmp) / "model")
        student_pipe.from_disk(tmp)
    vocab_nlp = spacy.blank(info.lang)
    train_docs = load_docs(spec.name, train, vocab_nlp).docs
    dev_docs = load_docs(spec.name, dev, vocab_nlp).docs
    features = [{**f, "gold": 1} for f in student_pipe.features(train_docs)]
    if corpus is not None:
        features += [{**f, "gold": 0} for f in student_pipe.features(corpus_docs(corpus, vocab_nlp, spec,
                                                                                   student_pipe))]
    if not features:
        raise DataError(train, None, "no training features (are the docs empty?)")
    total_steps, eval_steps = schedule(len(features), config)
    run = {"task": spec.name, "train_sha256": sha256_file(train), "dev_sha256": sha256_file(dev),
           "labels": info.labels, "multi_label": info.multi_label, "lang": info.lang,
           "teacher_sha256": sha256_tree(folder), "kept_layers": keep,
           "corpus_sha256": sha256_file(corpus) if corpus else None,
           "distill_loss": {"alpha": distill_config.alpha, "temperature": distill_config.temperature},
           "config": asdict(config), "distill_config": asdict(distill_config)}
    teacher_block = artifacts.read_meta_block(folder)
    distillation = {"teacher": str(reference), "teacher_sha256": run["teacher_sha256"],
                    "teacher_layers": len(encoder_layers(teacher_pipe.checkpoint.encoder.model)), "kept_layers": keep,
                    "alpha": distill_config.alpha, "temperature": distill_config.temperature,
                    "corpus": str(corpus) if corpus else None}
    meta = {**run, "base_model": teacher_block.get("base_model", str(reference)),
            COMPRESSION: {"method": "distill", "source": str(reference), "source_sha256": run["teacher_sha256"]},
            "distillation": distillation}
    plan = TrainingPlan(spec, run, student_nlp, features, dev_docs, device, total_steps, eval_steps,
                        description=f"{spec.name} distilled from {reference} ({len(keep)} of "
                                    f"{distillation['teacher_layers']} layers) with spacy-llm-components",
                        meta=meta, verb="distilled",
                        resume_keys=("task", "train_sha256", "dev_sha256", "labels", "teacher_sha256",
                                     "kept_layers", "corpus_sha256", "distill_loss"))
    return plan, teacher_model


def _shared_plan(teacher: Union[str, Path], train: List[Path], dev: List[Path], output: Path, config: FinetuneConfig,
                 distill_config: DistillConfig, multitask: MultitaskSettings):
    """`_plan` for a teacher whose heads share an encoder: the student is the teacher's pipeline with the
    encoder's kept layers and every head, trained on one training set per head (in the pipeline's order).
    Every error (settings, data of another task or label set, file counts) before any output exists."""
    check_settings(config, error=CompressError)
    check_distill_config(distill_config)
    check_settings(multitask, error=CompressError)
    if multitask.freeze_encoder:
        raise CompressError("--freeze-encoder: distillation trains the student's encoder; it cannot be frozen")
    reference = pin_model(teacher)
    folder = local_pipeline(reference)
    check_apart(output, folder, "the student")
    encoders = shared_encoders(folder)
    if len(encoders) != 1:
        raise CompressError(f"{folder}: a teacher with {len(encoders)} shared encoders ({encoders}); distill a "
                            "pipeline whose heads share one")
    encoder_name = encoders[0]
    device = training_device(config.device)
    settings = {"device": str(device), "dtype": "float32", "quantize": None}  # float32 on the training device
    if config.max_length:
        settings["max_length"] = config.max_length
    overrides = {"components": {encoder_name: settings}}
    teacher_nlp = spacy.load(folder, config=overrides)
    heads = [name for name, pipe in teacher_nlp.pipeline if getattr(pipe, "encoder_name", None) == encoder_name]
    pipes = [teacher_nlp.get_pipe(name) for name in heads]
    if not len(train) == len(dev) == len(heads):
        raise CompressError(f"{folder}: the teacher's {len(heads)} heads ({', '.join(heads)}) need as many --train "
                            f"and --dev files, in that order; got {len(train)} and {len(dev)}")
    infos = [check_data(p.spec.name, p.labels if p.spec.has_labels else [], p.spec.multi_label_of(p), t, d)
             for p, t, d in zip(pipes, train, dev)]
    if len({info.lang for info in infos}) > 1:
        raise CompressError(f"the heads' data were prepared for different languages: {[i.lang for i in infos]}")
    loss_weights = parse_weights(multitask.loss_weights, heads, "--heads-loss-weights")
    score_weights = parse_weights(multitask.score_weights, heads, "--heads-score-weights")
    teacher_encoder = teacher_nlp.get_pipe(encoder_name).encoder
    teacher_layers = len(encoder_layers(teacher_encoder.model))
    keep = kept_layers(teacher_layers, distill_config)
    corpus = Path(distill_config.corpus) if distill_config.corpus else None
    teacher_model = MultiTaskModel(teacher_encoder.model, {name: p.checkpoint.head for name, p in zip(heads, pipes)},
                                   {name: 1.0 for name in heads})

    set_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="sllm-student-") as tmp:  # loaded back through the public spacy.load
        teacher_nlp.to_disk(tmp, exclude=[encoder_name])
        student_encoder = Encoder(keep_layers(teacher_encoder.model, keep), teacher_encoder.tokenizer,
                                  teacher_encoder.source)
        save_encoder(student_encoder, Path(tmp) / encoder_name / "model")
        student_nlp = spacy.load(tmp, config=overrides)
    students = [student_nlp.get_pipe(name) for name in heads]
    vocab_nlp = spacy.blank(infos[0].lang)
    features, dev_docs = [], {}
    for index, (name, pipe, path, dev_path) in enumerate(zip(heads, students, train, dev)):
        mine = [{**f, "gold": 1} for f in pipe.features(load_docs(pipe.spec.name, path, vocab_nlp).docs)]
        if corpus is not None:
            mine += [{**f, "gold": 0} for f in pipe.features(corpus_docs(corpus, vocab_nlp, pipe.spec, pipe))]
        if not mine:
            raise DataError(path, None, "no training features (are the docs empty?)")
        features += [{**f, TASK_KEY: index} for f in mine]
        dev_docs[name] = load_docs(pipe.spec.name, dev_path, vocab_nlp).docs
    encoder = student_nlp.get_pipe(encoder_name).encoder
    model = MultiTaskModel(encoder.model, {name: p.checkpoint.head for name, p in zip(heads, students)}, loss_weights)
    collator = MultitaskCollator([FeatureCollator(p.spec.collator(encoder.tokenizer), encoder.tokenizer)
                                  for p in students])
    counts = task_batch_counts([sum(f[TASK_KEY] == i for f in features) for i in range(len(heads))],
                               config.batch_size, multitask.sampling, multitask.temperature)
    total_steps, eval_steps = schedule(sum(counts) * config.batch_size, config)
    task = "+".join(p.spec.name for p in pipes)
    run = {"task": task, "heads": heads, "train_sha256": [sha256_file(p) for p in train],
           "dev_sha256": [sha256_file(p) for p in dev], "labels": {n: i.labels for n, i in zip(heads, infos)},
           "multi_label": {n: i.multi_label for n, i in zip(heads, infos)}, "lang": infos[0].lang,
           "teacher_sha256": sha256_tree(folder), "kept_layers": keep,
           "corpus_sha256": sha256_file(corpus) if corpus else None,
           "distill_loss": {"alpha": distill_config.alpha, "temperature": distill_config.temperature},
           "config": {**asdict(config), **asdict(multitask)}, "distill_config": asdict(distill_config),
           "batches_per_epoch": dict(zip(heads, counts))}
    teacher_block = artifacts.read_meta_block(folder)
    distillation = {"teacher": str(reference), "teacher_sha256": run["teacher_sha256"], "teacher_layers": teacher_layers,
                    "kept_layers": keep, "alpha": distill_config.alpha, "temperature": distill_config.temperature,
                    "corpus": str(corpus) if corpus else None}
    meta = {**run, "base_model": teacher_block.get("base_model", str(reference)),
            COMPRESSION: {"method": "distill", "source": str(reference), "source_sha256": run["teacher_sha256"]},
            "distillation": distillation}
    trainer = {"primaries": {name: p.spec.primary for name, p in zip(heads, students)},
               "score_weights": score_weights, "counts": counts, "encoder_name": encoder_name}
    plan = TrainingPlan(None, run, student_nlp, features, dev_docs, device, total_steps, eval_steps, name=task,
                        primary=SCORE, model=model, collator=collator, trainer_kwargs=trainer,
                        description=f"{task} distilled from {reference} ({len(keep)} of {teacher_layers} layers of "
                                    "the shared encoder) with spacy-llm-components",
                        meta=meta, verb="distilled",
                        resume_keys=("task", "heads", "train_sha256", "dev_sha256", "labels", "teacher_sha256",
                                     "kept_layers", "corpus_sha256", "distill_loss", "batches_per_epoch"))
    return plan, teacher_model

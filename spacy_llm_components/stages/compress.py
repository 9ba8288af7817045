"""Compress a pipeline for serving: an int8 copy, or a student distilled from it.

- `quantized_copy`: the same pipeline folder with the hf_* components' `quantize` setting set to
  "int8" in config.cfg (what `spacy.load` honours: the float32 weights stay on disk, inference runs on
  a dynamically quantized copy of the Linear layers, on the CPU).
- `distill`: a student whose encoder keeps a subset of the teacher's layers (every other one by
  default, as DistilBERT), with the teacher's embeddings and head, trained with the Hugging Face
  `Trainer` on the teacher's temperature-softened outputs (KL, T^2-scaled) mixed with the gold labels,
  optionally on extra unlabelled text that only the teacher labels. Resumable like fine-tuning; its
  output is an ordinary pipeline of this project, whose meta.json records the teacher and the layers.
"""

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import spacy
import torch
from spacy.language import Language
from transformers import TrainerCallback, set_seed

from .. import artifacts
from ..artifacts import METRICS, TRAINING_LOG, sha256_file, sha256_tree
from ..components.pipeline import hf_component, make_input_doc
from ..core.settings import check_settings, setting
from ..data import DataError
from ..models.devices import resolve_device
from ..models.encoder import encoder_layers
from ..models.task_model import save_task_checkpoint, with_layers
from ..tasks import TASKS, factories_in_words, load_docs
from .shared.references import local_pipeline, pin_model
from .shared.trainer import training_device
from .shared.training import (
    FinetuneConfig,
    FinetuneResult,
    PipelineTrainer,
    TrainingPlan,
    check_prepared,
    schedule,
    train_component,
)

METHODS = ("int8", "distill")  # what `sllm run --compress` and the compress flow produce
COMPRESSION = "compression"  # key of the `sllm` meta block that says how a variant was made


class CompressError(ValueError):
    """A pipeline cannot be compressed as asked: the message names what is wrong."""


def check_methods(methods: Sequence[str]) -> List[str]:
    """The compression methods asked for, checked: one or more of METHODS."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CompressError(f"compression methods {list(methods)}: use one or more of {', '.join(METHODS)}")
    return list(methods)


def check_max_drop(max_drop: float) -> float:
    """The points a variant may lose against its source and still get its alias: >= 0."""
    if not max_drop >= 0:
        raise CompressError(f"max_drop {max_drop}: give the points a variant may lose, >= 0")
    return max_drop


# ---------------------------------------------------------------------------------------------
# int8


def hf_components(pipeline: Path) -> List[str]:
    """Names of the hf_* components in a pipeline folder's config.cfg, or a CompressError."""
    config_file = Path(pipeline) / "config.cfg"
    if not config_file.is_file():
        raise CompressError(f"{pipeline}: not a spaCy pipeline folder (no config.cfg)")
    config = spacy.util.load_config(config_file, interpolate=False)
    factories = {spec.factory for spec in TASKS.values()}
    names = [name for name, block in config["components"].items() if block.get("factory") in factories]
    if not names:
        raise CompressError(f"{pipeline}: the pipeline has no {factories_in_words()} component "
                            f"(it has {list(config['components'])}): nothing to quantize")
    return names


def shared_encoders(pipeline: Path) -> List[str]:
    """Names of the hf_encoder components in a pipeline folder's config.cfg."""
    config = spacy.util.load_config(Path(pipeline) / "config.cfg", interpolate=False)
    return [name for name, block in config["components"].items() if block.get("factory") == "hf_encoder"]


def quantized_copy(pipeline: Union[str, Path], output: Union[str, Path], runtime: str = "torch") -> Path:
    """Write `pipeline` (a folder or models:/ reference) to `output` with its hf_* components set to
    `quantize = "int8"` on the CPU, in PyTorch or (`runtime = "onnxruntime"`) ONNX Runtime. The weights
    stay float32 and identical; metrics.json and training_log.jsonl of the source come along; meta.json's
    `sllm` block records the source (a registry reference pinned to its version, or the folder) and its
    content hash. `output` is replaced whole, or left as it was on an error; it may not be the source or
    a folder around it."""
    reference = pin_model(pipeline)
    folder = local_pipeline(pipeline)
    output = _apart(output, folder, "the int8 copy")
    overrides = {name: {"quantize": "int8", "runtime": runtime, "device": "cpu"} for name in hf_components(folder)}
    encoders = shared_encoders(folder)
    if encoders:  # heads on a shared encoder: the encoder is quantized, the heads read what it computes
        if runtime != "torch":
            raise CompressError(f"{folder}: heads on a shared encoder run int8 in PyTorch only (runtime 'torch')")
        overrides = {name: {"quantize": "int8", "device": "cpu"} for name in encoders}
    try:
        nlp = spacy.load(folder, config={"components": overrides})
    except ValueError as err:  # e.g. a bfloat16 pipeline: int8 starts from float32 weights
        raise CompressError(f"{folder}: cannot quantize: {err}") from err
    block = dict(nlp.meta.get(artifacts.META_BLOCK) or {})
    block[COMPRESSION] = {"method": "int8", "runtime": runtime, "source": str(reference),
                          "source_sha256": sha256_tree(folder)}
    nlp.meta[artifacts.META_BLOCK] = block
    artifacts.replace_folder(output, lambda tmp: _to_disk_with(nlp, folder, tmp))
    return output


def _apart(output: Union[str, Path], source: Path, what: str) -> Path:
    """`output`, resolved, if replacing it whole cannot delete `source` (the same folder or one inside it)."""
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source or source.is_relative_to(output):
        raise CompressError(f"{output}: {what} needs a folder apart from its source {source} (writing there would "
                            "replace the source)")
    return output


def _to_disk_with(nlp: Language, source: Path, target: Path) -> None:
    nlp.to_disk(target)
    for name in (METRICS, TRAINING_LOG):  # how the weights were trained: still true of the copy
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


# ---------------------------------------------------------------------------------------------
# distillation


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


def check_distill_config(config: DistillConfig, teacher_layers: Optional[int] = None) -> Optional[List[int]]:
    """Refuse bad distillation settings before any work: alpha, temperature, the corpus file, --layers /
    --keep; with the teacher's layer count, also their range, and return the kept layer indices."""
    check_settings(config, error=CompressError)
    if config.corpus and not Path(config.corpus).is_file():
        raise DataError(Path(config.corpus), None, "file does not exist")
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
        soft = spec.soft_loss(outputs, teacher, inputs, self.temperature, self.pipe)
        gold = spec.gold_loss(outputs, inputs, self.pipe) if self.alpha < 1 else soft * 0.0
        loss = self.alpha * soft + (1 - self.alpha) * gold
        return (loss, outputs) if return_outputs else loss


def distill(teacher: Union[str, Path], train: Union[str, Path], dev: Union[str, Path], output: Union[str, Path],
            config: Optional[FinetuneConfig] = None, distill_config: Optional[DistillConfig] = None, *,
            resume: bool = False, keep_checkpoints: bool = False, progress: bool = True,
            callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult:
    """Distill the pipeline `teacher` (a folder or models:/ reference) into a student with fewer encoder
    layers, trained on `train` (a `.spacy` file from `prepare`, whose labels must be the teacher's) and
    the optional extra corpus; the best checkpoint on `dev` is written to `output` as a pipeline.
    `config` holds the training settings of `sllm finetune` (its base_model is not used)."""
    wall_start = time.perf_counter()
    config = config or FinetuneConfig()
    distill_config = distill_config or DistillConfig()
    plan, teacher_model = _plan(teacher, Path(train), Path(dev), Path(output), config, distill_config)
    return train_component(plan, Path(output), config, wall_start=wall_start, resume=resume,
                          keep_checkpoints=keep_checkpoints, progress=progress, callbacks=callbacks,
                          trainer_class=DistillTrainer,
                          trainer_kwargs={"teacher": teacher_model, "alpha": distill_config.alpha,
                                          "temperature": distill_config.temperature})


def _check_data(spec_name: str, labels: Sequence[str], multi_label: Optional[bool], train: Path, dev: Path):
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


def check_distillation(teacher: Union[str, Path], train: Union[str, Path], dev: Union[str, Path],
                       distill_config: DistillConfig, config: Optional[FinetuneConfig] = None) -> List[int]:
    """Everything `distill` refuses (the settings, the layers against the teacher's, the data's task,
    labels and label kind against the teacher's), checked without training: the compress flow runs it
    before it makes any variant. Returns the kept layer indices."""
    config = config or FinetuneConfig()
    resolve_device(config.device)  # a device this machine lacks fails here too; the check itself runs on the CPU
    return _load_and_check(teacher, Path(train), Path(dev), replace(config, device="cpu"), distill_config)[-1]


def _load_and_check(teacher: Union[str, Path], train: Path, dev: Path, config: FinetuneConfig,
                    distill_config: DistillConfig):
    check_settings(config, error=CompressError)
    check_distill_config(distill_config)
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
    info = _check_data(spec.name, teacher_pipe.labels if spec.has_labels else [],
                       spec.multi_label_of(teacher_pipe), train, dev)
    keep = kept_layers(len(encoder_layers(teacher_pipe.checkpoint.encoder.model)), distill_config)
    return reference, folder, overrides, device, teacher_pipe, info, keep


def _plan(teacher: Union[str, Path], train: Path, dev: Path, output: Path, config: FinetuneConfig,
          distill_config: DistillConfig):
    """Load the teacher, check the data against it and the settings, and build the student pipeline
    and its features: every error surfaces here, before an output folder exists."""
    reference, folder, overrides, device, teacher_pipe, info, keep = _load_and_check(teacher, train, dev, config,
                                                                                   distill_config)
    _apart(output, folder, "the student")
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
        features += [{**f, "gold": 0} for f in student_pipe.features(_corpus_docs(corpus, vocab_nlp, spec,
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


def _corpus_docs(path: Path, nlp: Language, spec, pipe) -> List[Any]:
    """The extra corpus as training docs with placeholder gold (the teacher's outputs are their only target)."""
    from ..data.errors import BadRecords
    from ..data.jsonl import json_records

    bad = BadRecords(False)
    docs = [spec.unlabelled(make_input_doc(nlp, record, f"line {number}", path), pipe)
            for number, record in json_records(path, bad)]
    if not docs:
        raise DataError(path, None, "no records")
    return docs

"""Distill a pipeline into a student of another encoder: any tokenizer, width and depth (`sllm distill
TEACHER --student-base FOLDER`), e.g. MPNet-base into MiniLM.

The two models read different word pieces, so the teacher cannot run on the student's batches. The
teacher runs once over the training docs (and the extra unlabelled corpus) and its outputs are carried
into the student's units where both tokenizations can be compared, through the character offsets both
compute (`HFPipe.distillation_features`): per word for NER (each student word takes the tag
distribution of the teacher word it starts in), per document for textcat. Training is then the Hugging
Face `Trainer` on the student with the soft targets in its batches: alpha * KL at temperature T (times
T^2) + (1 - alpha) * the gold loss, as in same-tokenizer distillation. The student is an ordinary
pipeline whose meta.json and model card record the teacher.
"""

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np
import spacy
import torch
from transformers import set_seed

from ... import artifacts
from ...artifacts import sha256_file, sha256_tree
from ...components.pipeline import build_pipeline, hf_component
from ...core.constants import TEACHER_PREFIX
from ...data import DataError
from ...models.checkpoint import CheckpointError, open_source, read_config, resolve_source
from ...models.collate import FeatureCollator
from ...tasks import load_docs
from ..shared.training import FinetuneConfig, PipelineTrainer, TrainingPlan, schedule
from . import COMPRESSION, CompressError, check_apart
from .teacher import corpus_docs, distill_loss, load_teacher


def check_student_base(base: str) -> Path:
    """The student's starting encoder: a Hugging Face checkpoint folder (config.json, safetensors weights),
    not a spaCy pipeline, or a CompressError saying what it is instead."""
    try:
        folder = resolve_source(base)  # a folder, or the name of an offline mirror (all-MiniLM-L6-v2)
    except CheckpointError as err:
        raise CompressError(f"--student-base {base}: {err}") from None
    if not isinstance(folder, Path):
        raise CompressError(f"--student-base {base}: not a folder (give a Hugging Face encoder checkpoint)")
    if (folder / "config.cfg").is_file():
        raise CompressError(f"--student-base {base}: a spaCy pipeline, not an encoder; give its encoder's "
                            "checkpoint folder (config.json, weights and tokenizer)")
    try:
        read_config(open_source(folder))
    except CheckpointError as err:
        raise CompressError(f"--student-base: not an encoder checkpoint: {err}") from None
    return folder


class SoftTargetCollator:
    """The task's collator for a student's features, with the teacher's outputs (`teacher_*` fields)
    stacked beside them: per-position ones padded to the batch's length on the tokenizer's padding side."""

    def __init__(self, collator: FeatureCollator, tokenizer, fields: Dict[str, bool]) -> None:
        self.collator, self.fields = collator, fields
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        keys = [TEACHER_PREFIX + name for name in self.fields]
        batch = self.collator([{k: v for k, v in f.items() if k not in keys} for f in features])
        length = batch["input_ids"].shape[1]
        for name, per_position in self.fields.items():
            rows = [np.asarray(f[TEACHER_PREFIX + name], dtype=np.float32) for f in features]
            if per_position:
                pad = [((length - len(r), 0) if self.left else (0, length - len(r)),) + ((0, 0),) * (r.ndim - 1)
                       for r in rows]
                rows = [np.pad(r, p) for r, p in zip(rows, pad)]
            batch[TEACHER_PREFIX + name] = torch.from_numpy(np.stack(rows))
        return batch


class CrossDistillTrainer(PipelineTrainer):
    """DistillTrainer's loss with the teacher's outputs read from the batch (they were computed once,
    in the student's units) instead of the teacher run on it."""

    def __init__(self, *args, alpha: float, temperature: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature = alpha, temperature
        self.pipe = hf_component(self.nlp)
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.pipe.spec
        teacher = SimpleNamespace(**{k[len(TEACHER_PREFIX):]: v for k, v in inputs.items()
                                     if k.startswith(TEACHER_PREFIX)})
        outputs = model(**{k: v for k, v in inputs.items()
                           if k not in spec.targets and k != "gold" and not k.startswith(TEACHER_PREFIX)})
        loss = distill_loss(self.pipe, outputs, teacher, inputs, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


def cross_plan(teacher, train: Path, dev: Path, output: Path, config: FinetuneConfig, distill_config):
    """Load the teacher and the student base, check them and the data against each other, label the
    training docs (and the corpus) with the teacher, and build the student pipeline and its features:
    every error before an output folder exists. Returns (plan, trainer kwargs)."""
    if distill_config.layers is not None or distill_config.keep is not None:
        raise CompressError("--student-base starts the student from another encoder: --layers / --keep (which "
                            "pick teacher layers) do not apply")
    check_student_base(distill_config.student_base)
    base = distill_config.student_base  # as given: a folder or an offline mirror's name
    reference, folder, _, device, teacher_pipe, info = load_teacher(teacher, train, dev, config)
    check_apart(output, folder, "the student")
    spec = teacher_pipe.spec
    vocab_nlp = spacy.blank(info.lang)
    train_docs = load_docs(spec.name, train, vocab_nlp).docs
    dev_docs = load_docs(spec.name, dev, vocab_nlp).docs
    settings = {**spec.component_settings(info.labels, info.multi_label, train_docs), "device": str(device)}
    if isinstance(getattr(teacher_pipe, "scheme", None), str):  # a tagger: the student tags in the teacher's scheme
        settings["scheme"] = teacher_pipe.scheme
    if config.max_length:
        settings["max_length"] = config.max_length
    set_seed(config.seed)  # the student's new head
    try:
        student_nlp = build_pipeline(spec.name, str(base), settings=settings, lang=info.lang)
    except (ValueError, OSError) as err:
        raise CompressError(f"--student-base {base}: cannot build a {spec.name} student on it: {err}") from err
    student = hf_component(student_nlp)
    try:
        features = [{**f, "gold": 1} for f in student.distillation_features(train_docs, teacher_pipe)]
        corpus = Path(distill_config.corpus) if distill_config.corpus else None
        if corpus is not None:
            docs = corpus_docs(corpus, vocab_nlp, spec, student)
            features += [{**f, "gold": 0} for f in student.distillation_features(docs, teacher_pipe)]
    except ValueError as err:
        raise CompressError(f"{folder} -> {base}: {err}") from err
    if not features:
        raise DataError(train, None, "no training features (are the docs empty?)")
    total_steps, eval_steps = schedule(len(features), config)
    teacher_block = artifacts.read_meta_block(folder)
    run = {"task": spec.name, "train_sha256": sha256_file(train), "dev_sha256": sha256_file(dev),
           "labels": info.labels, "multi_label": info.multi_label, "lang": info.lang,
           "teacher_sha256": sha256_tree(folder), "student_base": str(base),
           "corpus_sha256": sha256_file(corpus) if corpus else None,
           "distill_loss": {"alpha": distill_config.alpha, "temperature": distill_config.temperature},
           "config": asdict(config), "distill_config": asdict(distill_config)}
    distillation = {"teacher": str(reference), "teacher_sha256": run["teacher_sha256"],
                    "teacher_base": teacher_block.get("base_model"), "student_base": str(base),
                    "across_tokenizers": True, "alpha": distill_config.alpha,
                    "temperature": distill_config.temperature, "corpus": str(corpus) if corpus else None}
    meta = {**run, "base_model": str(base),
            COMPRESSION: {"method": "distill", "source": str(reference), "source_sha256": run["teacher_sha256"]},
            "distillation": distillation}
    collator = SoftTargetCollator(FeatureCollator(spec.collator(student.checkpoint.tokenizer),
                                                  student.checkpoint.tokenizer),
                                  student.checkpoint.tokenizer, spec.teacher_outputs)
    plan = TrainingPlan(spec, run, student_nlp, features, dev_docs, device, total_steps, eval_steps,
                        description=f"{spec.name} distilled from {reference} into {base} with "
                                    "spacy-llm-components", meta=meta, verb="distilled", collator=collator,
                        resume_keys=("task", "train_sha256", "dev_sha256", "labels", "teacher_sha256",
                                     "student_base", "corpus_sha256", "distill_loss"))
    del teacher_pipe  # its outputs are in the features
    return plan, {"alpha": distill_config.alpha, "temperature": distill_config.temperature}


#END

"""Pipelines of hf_* components: the shipped configs (`pipelines/*.cfg`) and building from them, finding a
pipeline's component, its predictions as data, and its checkpoint exported as a Hugging Face folder."""

from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, Optional, Union

import spacy
from spacy.language import Language
from spacy.tokens import Doc
from thinc.api import Config

from ..data.errors import DataError
from ..models.task_model import save_task_checkpoint
from ..tasks import TaskSpec, factories_in_words, task_spec
from .base import HFPipe


def config_path(task: str) -> Path:
    return Path(str(files("spacy_llm_components.pipelines") / f"{task_spec(task).name}.cfg"))


def build_pipeline(task: str, model: str, *, settings: Optional[Dict[str, Any]] = None, lang: str = "en") -> Language:
    """The task's shipped pipeline over `model`, its component configured with `settings` (device,
    max_length, a new head's labels...), with its checkpoint loaded.

    A bare encoder needs `labels` (entity types for NER) for its new head; a checkpoint with a
    head brings its own (the shipped default labels are dropped unless given)."""
    spec = task_spec(task)
    if config_path(spec.name).is_file():
        config = Config().from_disk(config_path(spec.name), interpolate=False)
    else:  # a task without a shipped config: its component alone
        config = Config({"paths": {}, "nlp": {"pipeline": [spec.component]},
                         "components": {spec.component: {"factory": spec.factory, "model": str(model)}}})
    config["paths"]["model"] = str(model)
    config["nlp"]["lang"] = lang
    component = config["components"][spec.component]
    if spec.has_labels:
        component["labels"] = None
    component.update(settings or {})
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    nlp.initialize()
    return nlp


def hf_component(nlp: Language) -> HFPipe:
    """The pipeline's (first) hf_* component."""
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, HFPipe):
            return pipe
    raise ValueError(f"the pipeline has no {factories_in_words()} component (it has {nlp.pipe_names})")


def task_of(nlp: Language) -> TaskSpec:
    """The task of the pipeline's hf_* component."""
    return hf_component(nlp).spec


def doc_predictions(doc: Doc, nlp: Language) -> Dict[str, Any]:
    """What the pipeline's hf_* components predicted on a doc, as plain JSON-ready data:
    `cats`, `ents` and/or `answers`, one key per component (see `HFPipe.record`)."""
    out: Dict[str, Any] = {}
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, HFPipe):
            out.update(pipe.record(doc))
    return out


def make_input_doc(nlp: Language, record: Dict[str, Any], where: str, path: Union[str, Path]) -> Doc:
    """A doc from an input record {"text": ..., "questions": [...]} (questions only for QA)."""
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(path, where, f'"text" must be a string, got {type(text).__name__}'
                        if "text" in record else 'no "text" field')
    doc = nlp.make_doc(text)
    questions = record.get("questions")
    if questions is not None:
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise DataError(path, where, '"questions" must be a string or a list of strings')
        doc._.questions = questions
    return doc


def export_hf(nlp: Language, component: str, output: Union[str, Path]) -> Path:
    """Write `component`'s encoder and head as the `save_pretrained` folder of its family's
    `AutoModelFor*` class, which `AutoModelFor*.from_pretrained(output)` loads; returns the folder."""
    if component not in nlp.pipe_names:
        raise ValueError(f"no component {component!r} in the pipeline (it has {nlp.pipe_names})")
    pipe = nlp.get_pipe(component)
    if not isinstance(pipe, HFPipe):
        raise ValueError(f"component {component!r} is a {type(pipe).__name__}, not an hf_* component")
    return save_task_checkpoint(pipe.checkpoint, output)

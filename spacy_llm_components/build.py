"""The shipped pipeline configs (`pipelines/*.cfg`) and building a pipeline from them."""

from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, Optional

import spacy
from spacy.language import Language
from thinc.api import Config

from .components.base import HFPipe
from .tasks import TaskSpec, task_spec


def config_path(task: str) -> Path:
    return Path(str(files("spacy_llm_components.pipelines") / f"{task_spec(task).name}.cfg"))


def build_pipeline(task: str, model: str, *, settings: Optional[Dict[str, Any]] = None, lang: str = "en") -> Language:
    """The task's shipped pipeline over `model`, its component configured with `settings` (device,
    max_length, a new head's labels...), with its checkpoint loaded.

    A bare encoder needs `labels` (entity types for NER) for its new head; a checkpoint with a
    head brings its own (the shipped default labels are dropped unless given)."""
    spec = task_spec(task)
    config = Config().from_disk(config_path(spec.name), interpolate=False)
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
    raise ValueError(f"the pipeline has no hf_textcat, hf_ner or hf_qa component (it has {nlp.pipe_names})")


def task_of(nlp: Language) -> TaskSpec:
    """The task of the pipeline's hf_* component."""
    return hf_component(nlp).spec

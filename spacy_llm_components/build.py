"""The shipped pipeline configs (`pipelines/*.cfg`) and building a pipeline from them."""

from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional

import spacy
from spacy.language import Language
from thinc.api import Config

from .components.base import HFPipe

# task -> the name of its hf_* component in the shipped config
COMPONENT = {"ner": "ner", "textcat": "textcat", "qa": "qa"}


def config_path(task: str) -> Path:
    if task not in COMPONENT:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(COMPONENT)}")
    return Path(str(files("spacy_llm_components.pipelines") / f"{task}.cfg"))


def build_pipeline(task: str, model: str, *, labels: Optional[List[str]] = None, multi_label: Optional[bool] = None,
                   device: str = "auto", lang: str = "en", overrides: Optional[Dict[str, Any]] = None) -> Language:
    """The task's shipped pipeline over `model`, with its checkpoint loaded.

    `labels` gives a new head's labels (entity types for NER) when `model` is a
    bare encoder; for a checkpoint with a head, leave it None.
    """
    name = COMPONENT[task]
    config = Config().from_disk(config_path(task), interpolate=False)
    config["paths"]["model"] = str(model)
    config["nlp"]["lang"] = lang
    component = config["components"][name]
    component["device"] = device
    if task != "qa":
        component["labels"] = list(labels) if labels else None
    if task == "textcat":
        component["multi_label"] = multi_label
    for dotted, value in (overrides or {}).items():
        section = config
        *parents, key = dotted.split(".")
        for parent in parents:
            section = section[parent]
        section[key] = value
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    nlp.initialize()
    return nlp


def hf_component(nlp: Language) -> HFPipe:
    """The pipeline's (first) hf_* component."""
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, HFPipe):
            return pipe
    raise ValueError(f"the pipeline has no hf_textcat, hf_ner or hf_qa component (it has {nlp.pipe_names})")


def task_of(nlp: Language) -> str:
    """'textcat', 'ner' or 'qa', from the pipeline's hf_* component."""
    task = {"text-classification": "textcat", "token-classification": "ner", "question-answering": "qa"}
    return task[hf_component(nlp).task]

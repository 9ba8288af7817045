"""Export a pipeline component's checkpoint back to a plain Hugging Face folder."""

from pathlib import Path
from typing import Union

from spacy.language import Language

from .components.base import HFPipe
from .models.task_model import save_task_checkpoint


def export_hf(nlp: Language, component: str, output: Union[str, Path]) -> Path:
    """Write `component`'s model and tokenizer as a `save_pretrained` folder that
    `AutoModelFor*.from_pretrained(output)` loads; returns the folder."""
    if component not in nlp.pipe_names:
        raise ValueError(f"no component {component!r} in the pipeline (it has {nlp.pipe_names})")
    pipe = nlp.get_pipe(component)
    if not isinstance(pipe, HFPipe):
        raise ValueError(f"component {component!r} is a {type(pipe).__name__}, not an hf_* component")
    return save_task_checkpoint(pipe.checkpoint, output)

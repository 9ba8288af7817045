"""`sllm`: the command line (thin: parse arguments, call the library, print).

`python -m spacy_llm_components.cli` runs it too (what torchrun / accelerate launch and
project.yml call)."""

from . import compress, lifecycle, model, pretrain  # noqa: F401  (register the commands)
from .common import app


@app.callback()
def main() -> None:
    """spacy-llm-components command line."""


__all__ = ["app"]

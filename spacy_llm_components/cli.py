"""`sllm`: the command line (thin: parse arguments, call the library, print)."""

from pathlib import Path

import spacy
import typer

from .export import export_hf

app = typer.Typer(help="spaCy components for fine-tuned Hugging Face Transformers.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """spacy-llm-components command line."""


@app.command("export-hf")
def export_hf_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    component: str = typer.Argument(..., help="name of the hf_* component in the pipeline"),
    output: Path = typer.Argument(..., help="folder to write (save_pretrained layout)"),
) -> None:
    """Write a component's model and tokenizer as a plain Hugging Face folder."""
    nlp = spacy.load(pipeline)
    try:
        path = export_hf(nlp, component, output)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2)
    typer.echo(f"wrote {path}")

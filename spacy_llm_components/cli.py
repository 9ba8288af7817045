"""`sllm`: the command line (thin: parse arguments, call the library, print)."""

from pathlib import Path
from typing import List, Optional

import spacy
import typer

from .data import DataError, ReadOptions
from .data.load import TASKS

app = typer.Typer(help="spaCy components for fine-tuned Hugging Face Transformers.", no_args_is_help=True)

TaskArg = typer.Argument(..., help=f"one of: {', '.join(TASKS)}")
SkipBad = typer.Option(False, "--skip-bad", help="skip bad records (and list them) instead of stopping at the first")
TextColumn = typer.Option("text", help="text column (CSV/TSV) or field (JSONL) for textcat")
LabelColumn = typer.Option("label", help="label column (CSV/TSV) or field (JSONL; a list makes it multi-label)")
LabelSep = typer.Option(None, help="separator of several labels in one CSV/TSV cell (multi-label)")


@app.callback()
def main() -> None:
    """spacy-llm-components command line."""


def _fail(err: Exception, code: int = 2) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=code)


def _check_task(task: str) -> None:
    if task not in TASKS:
        _fail(ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}"))


@app.command("prepare")
def prepare_command(
    task: str = TaskArg,
    inputs: List[Path] = typer.Argument(..., help="training file(s): CoNLL/JSONL/.spacy (ner), CSV/TSV/JSONL (textcat), SQuAD JSON (qa)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for train.spacy, dev.spacy, labels.json, summary.json"),
    dev: Optional[Path] = typer.Option(None, help="dev file; without it a seeded, stratified split of train"),
    dev_fraction: float = typer.Option(0.1, help="share of train carved out as dev when no dev file is given"),
    seed: int = typer.Option(0, help="seed of the dev split"),
    lang: str = typer.Option("en", help="spaCy language of the tokenizer"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    skip_bad: bool = SkipBad,
) -> None:
    """Turn labelled data into spaCy DocBin files for fine-tuning."""
    from .data import prepare

    _check_task(task)
    try:
        result = prepare(task, inputs, output, dev=dev, dev_fraction=dev_fraction, seed=seed, lang=lang,
                         options=ReadOptions(text_column, label_column, label_sep), skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        _fail(err)
    s = result.summary
    for split in ("train", "dev"):
        counts = s["splits"][split]
        extra = f", {counts['questions']:,} questions" if task == "qa" else f", per label {counts['per_label']}"
        typer.echo(f"{split}: {counts['docs']:,} docs{extra}")
    if s["skipped"]["count"]:
        typer.echo(f"skipped {s['skipped']['count']} bad record(s):", err=True)
        for record in s["skipped"]["records"][:20]:
            typer.echo(f"  {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {output} (content hash {s['content_hash'][:12]})")


@app.command("finetune")
def finetune_command(
    task: str = TaskArg,
    train: Path = typer.Option(..., help="train.spacy from `sllm prepare`"),
    dev: Path = typer.Option(..., help="dev.spacy from `sllm prepare`"),
    output: Path = typer.Option(..., "--output", "-o", help="spaCy pipeline folder to write"),
    base_model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", help="local HF checkpoint folder or hub name"),
    epochs: float = typer.Option(3.0, help="training epochs"),
    max_steps: int = typer.Option(-1, help="stop after this many optimizer steps (overrides --epochs)"),
    batch_size: int = typer.Option(16, help="batch size per device"),
    lr: float = typer.Option(5e-5, help="peak learning rate (linear warmup and decay)"),
    grad_accum: int = typer.Option(1, help="gradient accumulation steps"),
    warmup_ratio: float = typer.Option(0.1, help="share of steps spent warming up"),
    eval_steps: Optional[int] = typer.Option(None, help="evaluate (and checkpoint) every N steps; default once per epoch"),
    patience: Optional[int] = typer.Option(None, help="stop early after N evaluations without improvement"),
    max_length: Optional[int] = typer.Option(None, help="cap on the model input in word pieces (long docs are windowed)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda:N (bf16 on CUDA devices that support it)"),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint"),
    keep_checkpoints: bool = typer.Option(False, help="keep OUTPUT/checkpoints after a finished run"),
) -> None:
    """Fine-tune a Hugging Face model with the Trainer and save a spaCy pipeline."""
    from .train import FinetuneConfig, FinetuneError, finetune

    _check_task(task)
    config = FinetuneConfig(base_model=base_model, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                            grad_accum=grad_accum, warmup_ratio=warmup_ratio, eval_steps=eval_steps,
                            patience=patience, max_length=max_length, device=device, seed=seed)
    try:
        result = finetune(task, train, dev, output, config, resume=resume, keep_checkpoints=keep_checkpoints)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: continue with the same command plus --resume (checkpoints in {output}/checkpoints)",
                   err=True)
        raise typer.Exit(code=130)
    except (DataError, FinetuneError, ValueError) as err:
        _fail(err)
    typer.echo(result.summary())


@app.command("evaluate")
def evaluate_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    test: Path = typer.Argument(..., help="test data in any format `sllm prepare` reads"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for metrics.json, report.md, confusion.png"),
    batch_size: Optional[int] = typer.Option(None, help="nlp.pipe batch size"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    skip_bad: bool = SkipBad,
) -> None:
    """Score a pipeline on test data through nlp.pipe; write metrics and a report."""
    from .evaluate import evaluate

    try:
        result = evaluate(pipeline, test, output, options=ReadOptions(text_column, label_column, label_sep),
                          skip_bad=skip_bad, batch_size=batch_size)
    except (DataError, ValueError) as err:
        _fail(err)
    m = result.metrics
    typer.echo(f"{m['primary']}: {100 * m[m['primary']]:.2f} on {m['docs']:,} docs ({m['words_per_second']:,} words/s)")
    typer.echo(f"wrote {output}/metrics.json and {output}/report.md")


@app.command("predict")
def predict_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    input_path: Path = typer.Argument(..., help='JSONL: {"text": ..., "questions": [...]} per line'),
    output_path: Path = typer.Argument(..., help="JSONL: each input record plus cats / ents / answers"),
    batch_size: Optional[int] = typer.Option(None, help="nlp.pipe batch size"),
    skip_bad: bool = SkipBad,
) -> None:
    """Stream records through the pipeline (constant memory) and write predictions."""
    from .predict import predict_file

    nlp = spacy.load(pipeline)
    try:
        report = predict_file(nlp, input_path, output_path, batch_size=batch_size, skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        _fail(err)
    for record in report["skipped"][:20]:
        typer.echo(f"skipped {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {report['written']:,} records to {output_path}"
               + (f" ({len(report['skipped'])} skipped)" if report["skipped"] else ""))


@app.command("export-hf")
def export_hf_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    component: str = typer.Argument(..., help="name of the hf_* component in the pipeline"),
    output: Path = typer.Argument(..., help="folder to write (save_pretrained layout)"),
) -> None:
    """Write a component's model and tokenizer as a plain Hugging Face folder."""
    from .export import export_hf

    nlp = spacy.load(pipeline)
    try:
        path = export_hf(nlp, component, output)
    except ValueError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":  # torchrun / accelerate launch -m spacy_llm_components.cli ...
    app()

"""The `sllm` app and what its commands share: options declared once, and the one way to fail."""

import functools
import inspect
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

import typer

from ..core.settings import check_settings
from ..tasks import TASKS, task_spec

app = typer.Typer(help="spaCy components for fine-tuned Hugging Face Transformers.", no_args_is_help=True)

TaskArg = typer.Argument(..., help=f"one of: {', '.join(TASKS)}")
ModelArg = typer.Argument(..., help="a spaCy pipeline folder, models:/NAME@ALIAS or models:/NAME/VERSION")
SkipBad = typer.Option(False, "--skip-bad", help="skip bad records (and list them) instead of stopping at the first")
TextColumn = typer.Option("text", help="text column (CSV/TSV) or field (JSONL) for textcat")
LabelColumn = typer.Option("label", help="label column (CSV/TSV) or field (JSONL; a list makes it multi-label)")
LabelSep = typer.Option(None, help="separator of several labels in one CSV/TSV cell (multi-label)")
Strict = typer.Option(False, "--strict", help="refuse CoNLL tag sequences that break their scheme (default: "
                                               "repair them as conlleval reads them, and count the repairs)")
Track = typer.Option(True, "--track/--no-track", help="record the run in MLflow (see `sllm ui mlflow`)")
BatchSize = typer.Option(None, help="nlp.pipe batch size")
GpuId = typer.Option(None, help="spaCy style: -1 for CPU, N for cuda:N (overrides --device)")
Resume = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint")
KeepCheckpoints = typer.Option(False, help="keep OUTPUT/checkpoints after a finished run")


def fail(err: Exception, code: int = 2) -> NoReturn:
    """Print the error (which names the file, line or record) and exit with `code`."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=code)


@contextmanager
def training_errors(output: Path) -> Iterator[None]:
    """A training command's failures: Ctrl-C says how to resume (exit 130), bad input is an exit-2 error."""
    from ..data import DataError

    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: continue with the same command plus --resume (checkpoints in {output}/checkpoints)",
                   err=True)
        raise typer.Exit(code=130)
    except (DataError, ValueError) as err:
        fail(err)


def device_of(gpu_id: int) -> str:
    """--device for a spaCy-style --gpu-id."""
    return "cpu" if gpu_id < 0 else f"cuda:{gpu_id}"


def check_task(task: str) -> str:
    try:
        return task_spec(task).name
    except ValueError as err:
        fail(err)


def read_options(text_column: str, label_column: str, label_sep: Optional[str], strict: bool = False):
    from ..data import ReadOptions

    return ReadOptions(text_column, label_column, label_sep, strict)


def with_settings(config_class: type, name: str, prefix: str = "",
                  exclude: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Give a command one `--option` per field of the dataclass `config_class` (help text from the
    field's metadata) and call it with one instance as `name`: the options are declared once, in the
    dataclass, for every command that takes them. `prefix` tells apart two groups on one command;
    `exclude` leaves out fields that another group of the command decides (they keep their defaults)."""
    hints = typing.get_type_hints(config_class)
    group = [(f, f"{prefix.replace('-', '_')}{f.name}") for f in fields(config_class) if f.name not in exclude]

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name != name]
        added = [inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                   default=typer.Option(f.default, f"--{prefix}{f.name.replace('_', '-')}",
                                                        help=f.metadata.get("help")))
                 for f, param in group]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(param) for f, param in group}
            config = config_class(**values)
            try:  # every value in its range before any work starts
                check_settings(config, name=lambda field: f"--{prefix}{field.replace('_', '-')}")
            except ValueError as err:
                fail(err)
            return command(**kwargs, **{name: config})

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k != name},
                                   **{param: hints[f.name] for f, param in group}}
        return wrapper

    return decorate

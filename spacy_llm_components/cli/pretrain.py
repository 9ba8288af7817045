"""`sllm pretrain` and `evaluate-lm`: domain-adaptive pre-training of an encoder, and its perplexity."""

from pathlib import Path
from typing import List, Optional

import typer

from ..data import DataError
from ..stages.pretrain import PretrainConfig
from ..stages.pretrain.lm import LMDataConfig
from .common import GpuId, KeepCheckpoints, Resume, Track, app, device_of, fail, training_errors, with_settings

CORPUS_HELP = ("plain text (.txt and others: a document per line, or per paragraph with --text-unit paragraph), "
               "JSONL, CSV/TSV (--text-column), CoNLL sentences, SQuAD contexts (.json) or .spacy")


@app.command("pretrain")
@with_settings(PretrainConfig, "config")
def pretrain_command(
    corpus: List[Path] = typer.Option(..., help=f"corpus file(s), repeat for several: {CORPUS_HELP}"),
    output: Path = typer.Option(..., "--output", "-o", help="encoder folder to write (save_pretrained layout)"),
    dev: Optional[List[Path]] = typer.Option(None, help="held-out text for perplexity (repeatable); default a "
                                                        "seeded share of the corpus (--dev-fraction)"),
    gpu_id: Optional[int] = GpuId,
    resume: bool = Resume,
    keep_checkpoints: bool = KeepCheckpoints,
    track: bool = Track,
    config: PretrainConfig = None,
) -> None:
    """Continue pre-training an encoder with masked-language modelling on your text; the folder it
    writes is a --base-model for `sllm finetune` and `sllm run`."""
    from ..stages.pretrain import pretrain
    from ..stages.shared.trainer import is_main_process

    if gpu_id is not None:
        config.device = device_of(gpu_id)
    with training_errors(output):
        result = pretrain(corpus, output, config, dev=dev, resume=resume, keep_checkpoints=keep_checkpoints)
    typer.echo(result.summary())
    if track and is_main_process():  # under torchrun, one process logs
        from ..stages.shared.tracking import log_pretrain, tracking_uri

        typer.echo(f"MLflow run {log_pretrain(output)} in {tracking_uri()}")


@app.command("evaluate-lm")
@with_settings(LMDataConfig, "config")
def evaluate_lm_command(
    encoder: str = typer.Argument(..., help="HF encoder folder (e.g. from `sllm pretrain`) or hub name"),
    texts: List[Path] = typer.Argument(..., help=f"text file(s): {CORPUS_HELP}"),
    config: LMDataConfig = None,
) -> None:
    """Masked-LM perplexity of an encoder on text files, masked as `sllm pretrain` masks held-out text
    (same settings and seed: same positions, comparable figures)."""
    from ..stages.pretrain.lm import evaluate_lm

    try:
        score = evaluate_lm(encoder, texts, config)
    except (DataError, ValueError) as err:
        fail(err)
    typer.echo(score.summary())

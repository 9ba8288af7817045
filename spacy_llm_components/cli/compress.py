"""`sllm quantize`, `distill`, `compress`: smaller, faster variants of a pipeline for serving."""

from pathlib import Path
from typing import List, Optional

import typer

from ..data import DataError
from ..stages.compress.distill import DistillConfig
from ..stages.shared.multitask import MultitaskSettings
from ..stages.shared.training import FinetuneConfig
from .common import (
    GpuId,
    KeepCheckpoints,
    ModelArg,
    Resume,
    Track,
    app,
    device_of,
    fail,
    training_errors,
    with_settings,
)

NOT_FOR_DISTILLATION = ("base_model",)  # the student starts from the teacher


@app.command("quantize")
def quantize_command(
    model: str = ModelArg,
    output: Path = typer.Option(..., "--output", "-o", help="pipeline folder to write (the int8 copy)"),
    runtime: str = typer.Option("torch", help="torch (PyTorch dynamic quantization) or onnxruntime (an ONNX export "
                                              "quantized by ONNX Runtime at load; pip install "
                                              "'spacy-llm-components[onnx]')"),
) -> None:
    """Copy a pipeline with its hf_* components set to quantize = "int8" (CPU inference on int8 weights;
    the float32 weights stay on disk)."""
    from ..stages.compress import quantized_copy

    try:
        path = quantized_copy(model, output, runtime=runtime)
    except ValueError as err:
        fail(err)
    typer.echo(f"wrote {path} (quantize = \"int8\", runtime = \"{runtime}\"; spacy.load runs it on the CPU)")


@app.command("distill")
@with_settings(MultitaskSettings, "multitask", exclude=("freeze_encoder",), prefix="heads-")  # (--temperature is KL's)
@with_settings(DistillConfig, "distill_config")
@with_settings(FinetuneConfig, "config", exclude=NOT_FOR_DISTILLATION)
def distill_command(
    teacher: str = ModelArg,
    train: List[Path] = typer.Option(..., help="train.spacy from `sllm prepare` (the teacher's labels); a teacher "
                                               "whose heads share an encoder: one per head, in the pipeline's order"),
    dev: List[Path] = typer.Option(..., help="dev.spacy from `sllm prepare` (one per head)"),
    output: Path = typer.Option(..., "--output", "-o", help="spaCy pipeline folder to write (the student)"),
    gpu_id: Optional[int] = GpuId,
    resume: bool = Resume,
    keep_checkpoints: bool = KeepCheckpoints,
    track: bool = Track,
    config: FinetuneConfig = None,
    distill_config: DistillConfig = None,
    multitask: MultitaskSettings = None,
) -> None:
    """Distill a pipeline into a student with fewer encoder layers (the teacher's, every other one by
    default), or with --student-base into another encoder (its own tokenizer and width, e.g. MPNet into
    MiniLM; NER and textcat), trained on the teacher's soft outputs and the gold labels with the HF
    Trainer. Heads on a shared encoder stay together: the student has every head on one shorter encoder."""
    from ..stages.compress.distill import distill
    from ..stages.shared.trainer import is_main_process

    if gpu_id is not None:
        config.device = device_of(gpu_id)
    with training_errors(output):
        result = distill(teacher, train, dev, output, config, distill_config, multitask, resume=resume,
                         keep_checkpoints=keep_checkpoints)
    typer.echo(result.summary())
    if track and is_main_process():
        from ..stages.shared.tracking import log_finetune, tracking_uri

        typer.echo(f"MLflow run {log_finetune(output, run_name='distill-' + result.task)} in {tracking_uri()}")


def parse_methods(methods: str) -> List[str]:
    """`int8,distill` -> ["int8", "distill"], or exit 2 naming the unknown method."""
    from ..stages.compress import check_methods

    try:
        return check_methods([m.strip() for m in methods.split(",") if m.strip()])
    except ValueError as err:
        fail(err)


Compress = typer.Option(None, help="after registering, compress the new version: int8 and/or distill, "
                                   "comma-separated (see `sllm compress`)")
MaxDrop = typer.Option(0.5, help="a variant gets its alias (int8, distilled) only if its primary metric is at most "
                                 "this many points below the version it came from")
Gate = typer.Option("drop", help="drop (the variant's score at most --max-drop points below its source's) or no-worse "
                                 "(the paired bootstrap interval of the difference on the test file above -MAX_DROP)")


@app.command("compress")
@with_settings(DistillConfig, "distill_config")
@with_settings(FinetuneConfig, "config", exclude=NOT_FOR_DISTILLATION)
def compress_command(
    model: str = typer.Argument(..., help="the registered version to compress: models:/NAME/VERSION or "
                                          "models:/NAME@ALIAS"),
    test: Path = typer.Option(..., help="test file the variants and their source are evaluated on"),
    methods: str = typer.Option("int8,distill", help="int8 and/or distill, comma-separated"),
    max_drop: float = MaxDrop,
    gate: str = Gate,
    train: Optional[Path] = typer.Option(None, help="train.spacy from `sllm prepare` (for distill)"),
    dev: Optional[Path] = typer.Option(None, help="dev.spacy from `sllm prepare` (for distill)"),
    workdir: Optional[Path] = typer.Option(None, help="outputs (variants and evaluations); default training/NAME"),
    gpu_id: Optional[int] = GpuId,
    config: FinetuneConfig = None,
    distill_config: DistillConfig = None,
) -> None:
    """The compress flow: make the variants of a registered version, evaluate each on --test, register
    each as a new version, and move its alias (int8, distilled) to it if it is within --max-drop."""
    from dataclasses import asdict

    chosen = parse_methods(methods)
    from ..flows.compress import compress

    if gpu_id is not None:  # where distillation trains (int8 variants run on the CPU)
        config.device = device_of(gpu_id)

    absolute = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
    try:
        result = compress(model, str(test.resolve()), chosen, max_drop=max_drop, train=absolute(train),
                          dev=absolute(dev), workdir=absolute(workdir), finetune_config=asdict(config),
                          distill_config=asdict(distill_config), gate=gate)
    except (DataError, ValueError, OSError) as err:
        fail(err)
    for variant in result["variants"]:
        typer.echo(variant_line(variant))


def variant_line(variant: dict) -> str:
    gate = variant["gate"]
    return (f"{variant['method']}: {variant['name']} version {variant['version']}, {variant['primary']} "
            f"{100 * variant['score']:.2f} vs {100 * variant['source_score']:.2f}, "
            f"{variant['speedup']:.2f}x the docs/s of version {variant['source_version']}; "
            f"{'alias ' + gate['alias'] if gate['promoted'] else 'no alias'} ({gate['reason']})")

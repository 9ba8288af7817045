"""Compress a pipeline for serving: an int8 copy here, or a student distilled from it (`distill`).

- `quantized_copy`: the same pipeline folder with the hf_* components' `quantize` setting set to
  "int8" in config.cfg (what `spacy.load` honours: the float32 weights stay on disk, inference runs on
  a dynamically quantized copy of the Linear layers, on the CPU).
- `distill` (its own module): a student with fewer encoder layers trained on the teacher's outputs.
"""

from pathlib import Path
from typing import List, Sequence, Union

import spacy

from ... import artifacts
from ...artifacts import sha256_tree
from ...tasks import TASKS, factories_in_words
from ..shared.references import local_pipeline, pin_model

METHODS = ("int8", "distill")  # what `sllm run --compress` and the compress flow produce
COMPRESSION = "compression"  # key of the `sllm` meta block that says how a variant was made


class CompressError(ValueError):
    """A pipeline cannot be compressed as asked: the message names what is wrong."""


def check_methods(methods: Sequence[str]) -> List[str]:
    """The compression methods asked for, checked: one or more of METHODS."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CompressError(f"compression methods {list(methods)}: use one or more of {', '.join(METHODS)}")
    return list(methods)


def check_max_drop(max_drop: float) -> float:
    """The points a variant may lose against its source and still get its alias: >= 0."""
    if not max_drop >= 0:
        raise CompressError(f"max_drop {max_drop}: give the points a variant may lose, >= 0")
    return max_drop


# ---------------------------------------------------------------------------------------------
# int8


def hf_components(pipeline: Path) -> List[str]:
    """Names of the hf_* components in a pipeline folder's config.cfg, or a CompressError."""
    config_file = Path(pipeline) / "config.cfg"
    if not config_file.is_file():
        raise CompressError(f"{pipeline}: not a spaCy pipeline folder (no config.cfg)")
    config = spacy.util.load_config(config_file, interpolate=False)
    factories = {spec.factory for spec in TASKS.values()}
    names = [name for name, block in config["components"].items() if block.get("factory") in factories]
    if not names:
        raise CompressError(f"{pipeline}: the pipeline has no {factories_in_words()} component "
                            f"(it has {list(config['components'])}): nothing to quantize")
    return names


def shared_encoders(pipeline: Path) -> List[str]:
    """Names of the hf_encoder components in a pipeline folder's config.cfg."""
    config = spacy.util.load_config(Path(pipeline) / "config.cfg", interpolate=False)
    return [name for name, block in config["components"].items() if block.get("factory") == "hf_encoder"]


def quantized_copy(pipeline: Union[str, Path], output: Union[str, Path], runtime: str = "torch") -> Path:
    """Write `pipeline` (a folder or models:/ reference) to `output` with its hf_* components set to
    `quantize = "int8"` on the CPU, in PyTorch or (`runtime = "onnxruntime"`) ONNX Runtime. The weights
    stay float32 and identical; metrics.json and training_log.jsonl of the source come along; meta.json's
    `sllm` block records the source (a registry reference pinned to its version, or the folder) and its
    content hash. `output` is replaced whole, or left as it was on an error; it may not be the source or
    a folder around it."""
    reference = pin_model(pipeline)
    folder = local_pipeline(pipeline)
    output = check_apart(output, folder, "the int8 copy")
    overrides = {name: {"quantize": "int8", "runtime": runtime, "device": "cpu"} for name in hf_components(folder)}
    encoders = shared_encoders(folder)
    if encoders:  # heads on a shared encoder: the encoder is quantized, the heads read what it computes
        if runtime != "torch":
            raise CompressError(f"{folder}: heads on a shared encoder run int8 in PyTorch only (runtime 'torch')")
        overrides = {name: {"quantize": "int8", "device": "cpu"} for name in encoders}
    try:
        nlp = spacy.load(folder, config={"components": overrides})
    except ValueError as err:  # e.g. a bfloat16 pipeline: int8 starts from float32 weights
        raise CompressError(f"{folder}: cannot quantize: {err}") from err
    block = dict(nlp.meta.get(artifacts.META_BLOCK) or {})
    block[COMPRESSION] = {"method": "int8", "runtime": runtime, "source": str(reference),
                          "source_sha256": sha256_tree(folder)}
    nlp.meta[artifacts.META_BLOCK] = block
    artifacts.replace_folder(output, lambda tmp: artifacts.save_pipeline_copy(nlp, folder, tmp))
    return output


def check_apart(output: Union[str, Path], source: Path, what: str) -> Path:
    """`output`, resolved, if replacing it whole cannot delete `source` (the same folder or one inside it)."""
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source or source.is_relative_to(output):
        raise CompressError(f"{output}: {what} needs a folder apart from its source {source} (writing there would "
                            "replace the source)")
    return output

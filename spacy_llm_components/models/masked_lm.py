"""An encoder with its masked-language-model head, for (continued) pre-training and perplexity."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch
from transformers import MODEL_FOR_MASKED_LM_MAPPING, AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerFast

from .checkpoint import CheckpointError, load_fast_tokenizer, logger, open_source, read_config, read_weights
from .devices import resolve_device


@dataclass
class MaskedLM:
    """A masked-LM model with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    source: str
    new_weights: List[str] = field(default_factory=list)  # head parts the checkpoint lacked, initialised here
    # weights of the checkpoint that the masked-LM model does not use (a pooler): saved back unchanged, so a
    # classifier fine-tuned from the pre-trained encoder starts from them as it would from the original
    kept_weights: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        from .encoder import Encoder

        return Encoder(self.model.base_model, self.tokenizer, self.source).max_length


def load_masked_lm(name: Union[str, Path], *, device: str = "auto") -> MaskedLM:
    """An encoder from a local folder or hub name with its masked-LM head (`AutoModelForMaskedLM`), in
    float32. An encoder saved without one (a sentence-embedding model such as the offline MiniLM) gets
    the missing head parts initialised, the decoder tied to the input embeddings; the log says so."""
    source = open_source(name)
    torch_device = resolve_device(device)
    config = read_config(source)
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise CheckpointError(
            f"{source}: a {config.model_type!r} model has no masked-language-model architecture in transformers; "
            "pre-training needs an encoder such as BERT, RoBERTa, DistilBERT or DeBERTa"
        )
    tokenizer = load_fast_tokenizer(source, "to pack the corpus into blocks")
    if tokenizer.mask_token is None:
        raise CheckpointError(f"{source}: the tokenizer has no mask token, which masked-language modelling needs "
                              "(BERT's [MASK], RoBERTa's <mask>)")
    from .checkpoint import quiet_loading

    try:
        with quiet_loading():
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
    return MaskedLM(model=model, tokenizer=tokenizer, source=str(source), new_weights=new, kept_weights=kept)


def _unused_weights(source, model: PreTrainedModel, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The tensors of a local checkpoint that `model` did not load, under the names `model` reports."""
    if not names or not isinstance(source, Path):
        return {}
    prefix = f"{model.base_model_prefix}."
    candidates = {name: [name, name[len(prefix):]] if name.startswith(prefix) else [name] for name in names}
    stored = read_weights(source, {key for keys in candidates.values() for key in keys})
    return {name: next(stored[k] for k in keys if k in stored) for name, keys in candidates.items()
            if any(k in stored for k in keys)}


def write_masked_lm(lm: MaskedLM, folder: Union[str, Path]) -> None:
    """`save_pretrained` of model (safetensors, with its kept weights) and tokenizer into an existing folder."""
    state = {**lm.model.state_dict(), **lm.kept_weights} if lm.kept_weights else None
    lm.model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    lm.tokenizer.save_pretrained(folder)

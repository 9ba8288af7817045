"""The encoder: the `AutoModel` of any family (BERT, RoBERTa, DistilBERT, ELECTRA, MPNet...) with its fast
tokenizer, apart from any task head, so one encoder can feed several heads.

An encoder has a name in its pipeline and an owner: the component that saves it. A head never loads
or saves an encoder it does not own.
"""

import copy
import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .checkpoint import CheckpointError, Source, quiet_loading, weight_names
from .heads import POOLER


@dataclass
class Encoder:
    """A loaded encoder: the base model, its tokenizer, where it came from, its name and owner."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    source: str
    name: str = "encoder"
    owner: Optional[str] = None  # the pipeline component that saves it

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_names(self) -> Tuple[str, ...]:
        """The inputs it takes: ids and mask, and segment ids where the tokenizer makes them."""
        types = ("token_type_ids",) if "token_type_ids" in self.tokenizer.model_input_names else ()
        return ("input_ids", "attention_mask", *types)

    def feed(self, input_ids, attention_mask, token_type_ids=None) -> Dict[str, torch.Tensor]:
        """The model's keyword inputs from numpy arrays, on its device (segment ids where it takes them:
        zeros unless given)."""
        device = self.device
        out = {"input_ids": torch.from_numpy(input_ids).to(device),
               "attention_mask": torch.from_numpy(attention_mask).to(device)}
        if "token_type_ids" in self.input_names:
            types = token_type_ids if token_type_ids is not None else np.zeros_like(input_ids)
            out["token_type_ids"] = torch.from_numpy(types).to(device)
        return out

    @property
    def max_length(self) -> int:
        """Longest input the model takes: its position embeddings (less the offset of families that number
        positions after the padding index, as RoBERTa and MPNet do), capped by the tokenizer's limit."""
        limits = []
        positions = getattr(self.config, "max_position_embeddings", None)
        if positions:
            padding_idx = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
            limits.append(positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0))
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:  # HF uses a huge sentinel for "unset"
            limits.append(tok_max)
        if not limits:
            raise CheckpointError(f"{self.source}: cannot tell the model's maximum input length")
        return min(limits)


def base_model_class(config: PretrainedConfig) -> type:
    """The family's base model class (what `AutoModel` would pick): looked up directly, since
    `AutoModel.from_pretrained` imports the config module of every family transformers knows to do so."""
    try:
        return MODEL_MAPPING[type(config)]  # (and not .get, which imports them all too)
    except KeyError:
        raise CheckpointError(f"a {config.model_type!r} model has no base model class in transformers") from None


def load_base_model(source: Source, config: PretrainedConfig, *, torch_dtype: torch.dtype,
                    pooler: Optional[bool] = None) -> PreTrainedModel:
    """The checkpoint's base model (the `AutoModel` class of its family), from a bare encoder or from a model
    with any head. A pooler is built when the checkpoint has one (`pooler` None), always (True: a BERT
    sequence head reads it) or never (False: a shared encoder, whose sequence heads hold their own).
    Missing encoder weights are an error: only heads and poolers start new."""
    kwargs = {}
    names = weight_names(source)
    cls = base_model_class(config)
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = pooler if pooler is not None else any(POOLER in name for name in names)
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(source, config=config, trust_remote_code=False, use_safetensors=True,
                                              torch_dtype=torch_dtype, output_loading_info=True, **kwargs)
    except Exception as err:
        raise CheckpointError(f"{source}: cannot load the model weights: {err}") from err
    missing = [k for k in info.get("missing_keys") or [] if not k.startswith(POOLER)]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks encoder weights {missing[:5]}"
                              f"{' and more' if len(missing) > 5 else ''}: not a {config.model_type} encoder")
    return model


def encoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of Transformer layers of an encoder (`encoder.layer` for BERT-like models,
    `transformer.layer` for DistilBERT): its one ModuleList as long as the config's layer count."""
    count = getattr(model.config, "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if count is None or len(stacks) != 1:
        raise CheckpointError(f"{model.config.model_type} model: cannot find its stack of {count} encoder layers "
                              "(only BERT-like encoders with one layer list can have layers removed)")
    return stacks[0]


def keep_layers(model: PreTrainedModel, keep: Sequence[int]) -> PreTrainedModel:
    """A copy of the encoder `model` that keeps only the layers `keep` (indices, in order); embeddings
    and pooler are copied unchanged (structured pruning: the DistilBERT student init)."""
    total = len(encoder_layers(model))
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise CheckpointError(f"layers {list(keep)}: give distinct indices from 0 to {total - 1}")
    student = copy.deepcopy(model)
    layers = encoder_layers(student)
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    for parent in student.modules():  # put the shorter stack where the full one was
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, kept)
    student.config.num_hidden_layers = len(keep)
    return student

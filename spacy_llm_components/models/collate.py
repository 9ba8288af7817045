"""Batches of training features for a model (no Trainer import: `spacy train` uses this too)."""

from typing import Any, Dict, List

import torch


class FeatureCollator:
    """Pads features into a batch with the task's collator, dropping token_type_ids for models that take none."""

    def __init__(self, pad, tokenizer) -> None:
        self.pad = pad
        self.keep_types = "token_type_ids" in tokenizer.model_input_names

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if not self.keep_types:
            features = [{k: v for k, v in f.items() if k != "token_type_ids"} for f in features]
        return self.pad(features)

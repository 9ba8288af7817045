"""Batches of training features for a model (no Trainer import: `spacy train` uses this too)."""

from typing import Any, Dict, List

import torch


class CountingCollator:
    """A collator that counts the real (unpadded) word pieces of the batches it makes, and drops
    token_type_ids for models that take none."""

    def __init__(self, pad, tokenizer) -> None:
        self.pad = pad
        self.keep_types = "token_type_ids" in tokenizer.model_input_names
        self.word_pieces = 0

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if not self.keep_types:
            features = [{k: v for k, v in f.items() if k != "token_type_ids"} for f in features]
        batch = self.pad(features)
        self.word_pieces += int(batch["attention_mask"].sum())
        return batch

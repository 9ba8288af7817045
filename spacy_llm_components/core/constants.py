"""Constants every layer agrees on."""

IGNORE_INDEX = -100  # label of positions a loss skips (torch's CrossEntropyLoss default, HF's collators' padding)

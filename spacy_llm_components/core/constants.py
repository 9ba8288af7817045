"""Constants every layer agrees on."""

IGNORE_INDEX = -100  # label of positions a loss skips (torch's CrossEntropyLoss default, HF's collators' padding)
NULL_MARGIN = "null_margin"  # hf_qa's answer group attrs: per question, the no-answer score - the best answer's
TEACHER_PREFIX = "teacher_"  # a training feature's field holding a teacher's output in the student's units

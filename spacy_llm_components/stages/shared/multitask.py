"""Training several heads on one encoder at once (hard parameter sharing, as in MT-DNN): each batch holds
features of one task, drawn across tasks proportionally or temperature-scaled; the batch's loss is its
head's, times the task's weight; every head is scored on its own dev docs at each evaluation, and the
checkpoint with the best weighted score is kept.

With the encoder frozen only the heads train (in eval mode, without gradients through the encoder):
what adds a head to a deployed encoder without moving the heads already on it.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from spacy.language import Language
from spacy.tokens import Doc
from torch import nn
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

from ...core.settings import setting
from ...models.collate import FeatureCollator
from ...models.heads import Head
from .scoring import score_pipeline
from .trainer import TimedTrainer, TrainingError

TASK_KEY = "task"  # the index of a feature's task, in the order of MultiTaskModel.names
SCORE = "weighted_score"  # what picks the best checkpoint of a multi-task run
SAMPLINGS = ("proportional", "temperature")


@dataclass
class MultitaskSettings:
    """How the tasks of a multi-task run share the training; options of `sllm finetune TASK+TASK`."""

    sampling: str = setting("proportional", "how batches are drawn across tasks: proportional (each task's "
                                            "batches once per epoch) or temperature (p ~ n^(1/T), MT-DNN)",
                            choices=SAMPLINGS)
    temperature: float = setting(2.0, "--sampling temperature: T (1 is proportional; larger evens the tasks out)",
                                 gt=0)
    loss_weights: str = setting("", "each task's loss weight, e.g. ner=1,textcat=0.5 (default 1 each)")
    score_weights: str = setting("", "each task's weight in the score that picks the best checkpoint, e.g. "
                                     "ner=2,textcat=1 (default 1 each)")
    freeze_encoder: bool = setting(False, "train the new heads only, on a frozen encoder (the heads already "
                                          "on it keep their outputs)")


def parse_weights(text: str, tasks: Sequence[str], option: str) -> Dict[str, float]:
    """`ner=1,textcat=0.5` as {task: weight}, every task 1 unless given; unknown tasks and weights that are
    not positive numbers are refused."""
    weights = {task: 1.0 for task in tasks}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, value = part.partition("=")
        if not sep or task.strip() not in weights:
            raise TrainingError(f"{option} {text!r}: write TASK=WEIGHT for the tasks {', '.join(tasks)}")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            raise TrainingError(f"{option} {text!r}: {value!r} is not a number") from None
        if not weights[task.strip()] > 0:
            raise TrainingError(f"{option} {text!r}: a weight must be > 0")
    return weights


class MultiTaskModel(nn.Module):
    """The shared encoder and one head per task: a batch (of one task) through the encoder and that task's
    head; the loss is the head's times the task's weight (`output`: the head's own outputs)."""

    accepts_loss_kwargs = False  # (the Trainer would pass num_items_in_batch into **targets)

    def __init__(self, encoder: nn.Module, heads: Dict[str, Head], loss_weights: Dict[str, float],
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.names = list(heads)
        self.loss_weights = [float(loss_weights[name]) for name in self.names]
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder computes what it computes at inference
        return self

    def forward(self, task: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, **targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        index = int(task[0])
        if bool((task != index).any()):
            raise ValueError("a multi-task batch must hold features of one task")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            hidden = self.encoder(**inputs, return_dict=True).last_hidden_state
        out = self.heads[self.names[index]](hidden, None, **targets)
        if out.loss is None:  # no targets (distillation): the head's outputs, which the trainer's loss reads
            return {"output": out}
        return {"loss": out.loss * self.loss_weights[index], "output": out}


class MultitaskCollator:
    """Pads a batch of one task's features with that task's collator, and adds the task index."""

    def __init__(self, collators: Sequence[FeatureCollator]) -> None:
        self.collators = list(collators)

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        index = features[0][TASK_KEY]
        batch = self.collators[index]([{k: v for k, v in f.items() if k != TASK_KEY} for f in features])
        batch[TASK_KEY] = torch.full((len(features),), index, dtype=torch.long)
        return batch


def task_batch_counts(sizes: Sequence[int], batch_size: int, sampling: str, temperature: float) -> List[int]:
    """Batches of each task in one epoch. The epoch has as many batches as the tasks' data fill
    (sum of ceil(n / batch_size)); proportional sampling gives each task its own, temperature sampling
    shares them out by p_t ~ n_t^(1/T) (largest remainders; every task at least one)."""
    own = [math.ceil(n / batch_size) for n in sizes]
    if sampling == "proportional":
        return own
    total = sum(own)
    weights = [n ** (1.0 / temperature) for n in sizes]
    shares = [total * w / sum(weights) for w in weights]
    counts = [max(1, math.floor(s)) for s in shares]
    for i in sorted(range(len(sizes)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True):
        if sum(counts) >= total:
            break
        counts[i] += 1
    return counts


class MultitaskSampler(Sampler):
    """Feature indices in batches of one task each (`batch_size` per device, so the DataLoader's batches
    never mix tasks), length-grouped within a task, the batches of all tasks shuffled together, in an order
    fixed by (seed, epoch) so that a resumed run trains the batches the uninterrupted one did. A task with
    more batches than its data fills (temperature sampling) goes round its data again; a short last batch
    is filled up with other features of its task."""

    def __init__(self, tasks: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int,
                 counts: Sequence[int]) -> None:
        self.tasks, self.lengths, self.batch_size, self.seed = list(tasks), list(lengths), batch_size, seed
        self.counts = list(counts)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts) * self.batch_size

    def batches(self) -> List[List[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: List[List[int]] = []
        for task, count in enumerate(self.counts):
            mine = [i for i, t in enumerate(self.tasks) if t == task]
            own: List[List[int]] = []
            while len(own) < count:  # round the task's data again when it has more batches than data
                order = get_length_grouped_indices([self.lengths[i] for i in mine], self.batch_size,
                                                   generator=generator)
                ranked = [mine[j] for j in order]
                own += [ranked[k:k + self.batch_size] for k in range(0, len(ranked), self.batch_size)]
            for batch in own[:count]:
                while len(batch) < self.batch_size:  # fill a short batch with other features of its task
                    batch.append(mine[int(torch.randint(len(mine), (1,), generator=generator))])
                batches.append(batch)
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def __iter__(self):
        return iter([i for batch in self.batches() for i in batch])


class MultitaskTrainer(TimedTrainer):
    """A Trainer over a MultiTaskModel: task-homogeneous batches (`MultitaskSampler`), and an evaluation
    that scores each head on its own dev docs (the encoder and that head only) and weighs the primary
    scores into `weighted_score`."""

    def __init__(self, *args, nlp: Language, dev_docs: Dict[str, Sequence[Doc]], primaries: Dict[str, str],
                 score_weights: Dict[str, float], counts: Sequence[int], eval_batch_size: int,
                 encoder_name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nlp, self.dev_docs, self.primaries = nlp, dev_docs, primaries
        self.score_weights, self.counts = score_weights, counts
        self.nlp_batch_size, self.encoder_name = eval_batch_size, encoder_name

    def _get_train_sampler(self, *args, **kwargs):
        dataset = self.train_dataset
        return MultitaskSampler([f[TASK_KEY] for f in dataset], [len(f["input_ids"]) for f in dataset],
                                self.args.train_batch_size, self.args.data_seed or self.args.seed, self.counts)

    def dev_scores(self) -> Dict[str, float]:
        scores: Dict[str, float] = {}
        for name, docs in self.dev_docs.items():
            with self.nlp.select_pipes(enable=[self.encoder_name, name]):
                evaluation = score_pipeline(self.nlp, docs, batch_size=self.nlp_batch_size, component=name)
            scores.update({f"{name}_{k}": v for k, v in evaluation.scores.items()})
        total = sum(self.score_weights.values())
        scores[SCORE] = sum(w * scores[f"{name}_{self.primaries[name]}"]
                            for name, w in self.score_weights.items()) / total
        return scores

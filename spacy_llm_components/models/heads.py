"""Task heads: the layers a task puts on an encoder's hidden states, apart from the encoder.

Three kinds, each the exact computation (and weight names) of the transformers class it stands for,
so a checkpoint fine-tuned with `AutoModelFor*` loads here with its head and predicts what
transformers predicts, and a head trained here exports as that class:

- `token`: dropout + `classifier` per position (`AutoModelForTokenClassification`);
- `sequence`: the family's own pooling, then `classifier` (`AutoModelForSequenceClassification`):
  BERT reads the pooler inside `BertModel`; RoBERTa, XLM-R, CamemBERT and MPNet put dense + tanh +
  out_proj on the first token, ELECTRA the same with GELU; DistilBERT pre_classifier + ReLU;
- `span`: `qa_outputs`, one start and one end logit per position (`AutoModelForQuestionAnswering`).

A head computes its own loss from the targets it is given, as the transformers class does.
"""

from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
)
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from ..core.constants import IGNORE_INDEX
from .checkpoint import CheckpointError

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
POOLER = "pooler."  # the pooler's weights, in a base model or in a head that holds its own


def hidden_width(config: PretrainedConfig) -> int:
    return getattr(config, "hidden_size", None) or config.dim  # DistilBERT calls it dim


def _dropout(config: PretrainedConfig, *names: str) -> float:
    """The first of the config's dropout settings `names` that is set (families name them differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return 0.1


def init_linear(layer: nn.Linear, config: PretrainedConfig) -> None:
    """transformers' initialisation of a new head layer: normal(0, initializer_range), zero bias."""
    nn.init.normal_(layer.weight, mean=0.0, std=getattr(config, "initializer_range", 0.02))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Head(nn.Module):
    """A task head. `labels` are the output classes (none for span heads); `forward` takes the encoder's
    last hidden states (and its pooled output, for heads that read it) and the training targets."""

    kind: ClassVar[str]
    auto_class: ClassVar[type]  # the transformers Auto class whose models carry this head
    output_names: ClassVar[Tuple[str, ...]] = ("logits",)
    per_position: ClassVar[bool] = True  # outputs per input position (token, span) or per sequence
    uses_pooler: bool = False  # reads the encoder's pooler (BERT's sequence head)

    def __init__(self, config: PretrainedConfig, labels: Sequence[str], problem_type: Optional[str] = None) -> None:
        super().__init__()
        self.labels = list(labels)
        self.problem_type = problem_type

    def hf_config(self) -> Dict:
        """The config fields transformers keeps for this head (labels, problem type)."""
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}, "problem_type": self.problem_type}

    def hf_name(self, name: str, prefix: str) -> str:
        """The name a weight of this head has in its `AutoModelFor*` class (a pooler's sits in the base
        model, under the class' prefix)."""
        return f"{prefix}.{name}" if name.startswith(POOLER) else name

    def architecture(self, config: PretrainedConfig) -> str:
        """The transformers class of the encoder family with this head, e.g. BertForTokenClassification."""
        try:
            return self.auto_class._model_mapping[type(config)].__name__
        except KeyError:
            raise CheckpointError(f"a {config.model_type!r} encoder has no {self.auto_class.__name__[9:]} class in "
                                  "transformers to export to") from None


class FirstTokenPooler(nn.Module):
    """BERT's pooler, dense + tanh on the first token. It lives inside `BertModel`; a sequence head on a
    shared encoder holds its own copy, so that training one head's pooler never moves another head."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_width(config), hidden_width(config))
        init_linear(self.dense, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TokenClassificationHead(Head):
    kind, auto_class = "token", AutoModelForTokenClassification

    def __init__(self, config, labels, problem_type=None) -> None:
        super().__init__(config, labels, None)
        self.dropout = nn.Dropout(_dropout(config, "classifier_dropout", "hidden_dropout_prob", "dropout"))
        self.classifier = nn.Linear(hidden_width(config), len(self.labels))
        init_linear(self.classifier, config)

    def hf_config(self) -> Dict:
        return {k: v for k, v in super().hf_config().items() if k != "problem_type"}

    def forward(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> TokenClassifierOutput:
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1).to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        return TokenClassifierOutput(loss=loss, logits=logits)


class _DenseOnFirst(nn.Module):
    """RoBERTa's / MPNet's / ELECTRA's classification head: dropout, dense, activation, dropout, out_proj
    on the first token's hidden state."""

    def __init__(self, config, num_labels: int, activation: str) -> None:
        super().__init__()
        width = hidden_width(config)
        self.dense = nn.Linear(width, width)
        self.dropout = nn.Dropout(_dropout(config, "classifier_dropout", "hidden_dropout_prob"))
        self.out_proj = nn.Linear(width, num_labels)
        self.activation = torch.tanh if activation == "tanh" else F.gelu
        for layer in (self.dense, self.out_proj):
            init_linear(layer, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden[:, 0, :])
        x = self.dropout(self.activation(self.dense(x)))
        return self.out_proj(x)


# How each family turns a sequence into one vector for its classifier (`pooled`: the encoder's pooler).
SEQUENCE_POOLING = {"bert": "pooled", "roberta": "tanh", "xlm-roberta": "tanh", "camembert": "tanh", "mpnet": "tanh",
                    "electra": "gelu", "distilbert": "pre_classifier"}


class SequenceClassificationHead(Head):
    kind, auto_class = "sequence", AutoModelForSequenceClassification
    per_position = False

    def __init__(self, config, labels, problem_type=None) -> None:
        super().__init__(config, labels, problem_type)
        if problem_type is not None and problem_type not in PROBLEM_TYPES:
            raise CheckpointError(f"problem_type {problem_type!r}: use one of {PROBLEM_TYPES}")
        self.pooling = SEQUENCE_POOLING.get(config.model_type)
        if self.pooling is None:
            raise CheckpointError(f"sequence classification on a {config.model_type!r} encoder: its pooling is not "
                                  f"known here; supported families: {', '.join(sorted(SEQUENCE_POOLING))}")
        width, n = hidden_width(config), len(self.labels)
        if self.pooling == "pooled":
            self.uses_pooler = True
            self.dropout = nn.Dropout(_dropout(config, "classifier_dropout", "hidden_dropout_prob"))
            self.classifier = nn.Linear(width, n)
            init_linear(self.classifier, config)
        elif self.pooling == "pre_classifier":
            self.pre_classifier = nn.Linear(width, width)
            self.classifier = nn.Linear(width, n)
            self.dropout = nn.Dropout(_dropout(config, "seq_classif_dropout"))
            for layer in (self.pre_classifier, self.classifier):
                init_linear(layer, config)
        else:
            self.classifier = _DenseOnFirst(config, n, self.pooling)

    def forward(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> SequenceClassifierOutput:
        if self.pooling == "pooled":
            if pooled is None and getattr(self, "pooler", None) is not None:
                pooled = self.pooler(hidden)
            if pooled is None:
                raise CheckpointError("this sequence head reads the encoder's pooler, and the encoder has none")
            logits = self.classifier(self.dropout(pooled))
        elif self.pooling == "pre_classifier":
            logits = self.classifier(self.dropout(F.relu(self.pre_classifier(hidden[:, 0]))))
        else:
            logits = self.classifier(hidden)
        loss = None if labels is None else self.loss(logits, labels.to(logits.device))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' rule: the problem type, or else regression for one output, single-label for
        integer targets and multi-label for float vectors."""
        problem = self.problem_type
        if problem is None:
            problem = ("regression" if len(self.labels) == 1 else
                       "single_label_classification" if labels.dtype in (torch.long, torch.int) else
                       "multi_label_classification")
        if problem == "regression":
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(logits.view(-1, len(self.labels)), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class SpanHead(Head):
    kind, auto_class = "span", AutoModelForQuestionAnswering
    output_names = ("start_logits", "end_logits")

    def __init__(self, config, labels=(), problem_type=None) -> None:
        super().__init__(config, [], None)
        qa_dropout = getattr(config, "qa_dropout", None)  # DistilBERT's only; the other families apply none
        self.dropout = nn.Dropout(qa_dropout) if qa_dropout is not None else nn.Identity()
        self.qa_outputs = nn.Linear(hidden_width(config), 2)
        init_linear(self.qa_outputs, config)

    def hf_config(self) -> Dict:
        return {}

    def forward(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                start_positions: Optional[torch.Tensor] = None,
                end_positions: Optional[torch.Tensor] = None) -> QuestionAnsweringModelOutput:
        logits = self.qa_outputs(self.dropout(hidden))
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # positions outside the input are ignored, as in transformers
            start = start_positions.view(-1).clamp(0, ignored).to(start_logits.device)
            end = end_positions.view(-1).clamp(0, ignored).to(end_logits.device)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


HEAD_KINDS: Dict[str, Type[Head]] = {cls.kind: cls for cls in (TokenClassificationHead, SequenceClassificationHead,
                                                             SpanHead)}


def head_class(kind: str) -> Type[Head]:
    try:
        return HEAD_KINDS[kind]
    except KeyError:
        raise ValueError(f"head kind {kind!r}: use one of {', '.join(HEAD_KINDS)}") from None


def checkpoint_head_kind(config: PretrainedConfig) -> Optional[str]:
    """The kind of head a checkpoint's `architectures` name (None: a bare encoder or another head)."""
    for architecture in getattr(config, "architectures", None) or []:
        for kind, cls in HEAD_KINDS.items():
            if architecture.endswith(cls.auto_class.__name__[len("AutoModel"):]):
                return kind
    return None


def head_labels(config: PretrainedConfig) -> List[str]:
    return [config.id2label[i] for i in range(config.num_labels)]

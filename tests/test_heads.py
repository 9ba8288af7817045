"""Encoder and head apart, against transformers' own `AutoModelFor*` on the same weights, for every family.

The reference is the fused transformers model loaded from the same checkpoint: same outputs (inference,
dropout off), same loss on the same targets, and an exported folder that transformers loads with no
unused or newly initialised weight and that predicts what the component predicts.
"""

import logging

import pytest
import torch
from families import FAMILIES, make_checkpoint
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from spacy_llm_components.models.checkpoint import CheckpointError
from spacy_llm_components.models.task_model import load_task_checkpoint, save_task_checkpoint

KINDS = {"token": ("ner", AutoModelForTokenClassification, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]),
         "sequence": ("textcat", AutoModelForSequenceClassification, ["neg", "neutral", "pos"]),
         "span": ("qa", AutoModelForQuestionAnswering, None)}
TEXTS = ["Marta Kowalczyk opened a bakery in Lindenfeld.", "The soup was still hot", "a"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {(family, kind): make_checkpoint(root / family / kind, family, task, labels, seed=i)
            for i, (family, (kind, (task, _, labels))) in enumerate(
                (f, k) for f in FAMILIES for k in KINDS.items())}


def _batch(tokenizer):
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def _outputs(output, kind):
    return (output.start_logits, output.end_logits) if kind == "span" else (output.logits,)


def _targets(batch, kind, labels):
    generator = torch.Generator().manual_seed(0)
    shape = batch["input_ids"].shape
    if kind == "token":
        targets = torch.randint(0, len(labels), shape, generator=generator)
        return {"labels": targets.masked_fill(batch["attention_mask"] == 0, -100)}
    if kind == "sequence":
        return {"labels": torch.randint(0, len(labels), (shape[0],), generator=generator)}
    return {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 2, 99])}  # 99: ignored


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_head_on_encoder_computes_what_transformers_computes(checkpoints, family, kind):
    folder = checkpoints[(family, kind)]
    _, auto_class, labels = KINDS[kind]
    reference = auto_class.from_pretrained(folder).eval()
    ours = load_task_checkpoint(folder, kind, device="cpu")
    assert not ours.head_is_new and ours.id2label == (labels or [])
    batch = _batch(ours.tokenizer)
    if "token_type_ids" not in ours.encoder.input_names:
        batch.pop("token_type_ids", None)
    targets = _targets(batch, kind, labels)
    with torch.no_grad():
        want, got = reference(**batch, **targets), ours.model(**batch, **targets)
    for a, b in zip(_outputs(got, kind), _outputs(want, kind)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert torch.allclose(got.loss, want.loss, atol=1e-6)
    assert float(got.loss) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_without_warnings_and_predicts_the_same(checkpoints, family, kind, tmp_path,
                                                                             caplog):
    _, auto_class, _ = KINDS[kind]
    ours = load_task_checkpoint(checkpoints[(family, kind)], kind, device="cpu")
    with torch.no_grad():  # a changed head and encoder, so the export cannot pass by copying the input folder
        ours.head.state_dict()[next(iter(ours.head.state_dict()))].add_(0.5)
        ours.encoder.model.get_input_embeddings().weight.mul_(1.5)
    folder = save_task_checkpoint(ours, tmp_path / "exported")
    with caplog.at_level(logging.INFO, logger="transformers.modeling_utils"):
        exported, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [r for r in caplog.records if "newly initialized" in r.getMessage() or "not used" in r.getMessage()]
    assert exported.config.architectures == [type(exported).__name__]
    batch = _batch(ours.tokenizer)
    if "token_type_ids" not in ours.encoder.input_names:
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        for a, b in zip(_outputs(ours.model(**batch), kind), _outputs(exported.eval()(**batch), kind)):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bare_encoder_gets_a_new_head_that_trains_like_transformers_new_head(tmp_path, family):
    """A new head starts as transformers would start it (same layers, same init scale), on the encoder's
    unchanged weights, and its loss matches the fused model given the same head weights."""
    base = make_checkpoint(tmp_path / "base", family, "base")
    ours = load_task_checkpoint(base, "sequence", labels=["a", "b"], device="cpu")
    assert ours.head_is_new
    reference = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()
    state = {**{f"{reference.base_model_prefix}.{k}": v for k, v in ours.encoder.model.state_dict().items()},
             **ours.head.state_dict()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and all(".pooler." in k for k in unexpected), (missing, unexpected)  # a pooler it reads not
    for name, value in ours.head.state_dict().items():
        if name.endswith("weight") and value.dim() == 2:  # normal(0, initializer_range), as transformers'
            assert value.std().item() == pytest.approx(reference.config.initializer_range, rel=0.5)
    batch = _batch(ours.tokenizer)
    if "token_type_ids" not in ours.encoder.input_names:
        batch.pop("token_type_ids", None)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        assert torch.allclose(ours.model(**batch, labels=labels).loss, reference(**batch, labels=labels).loss,
                              atol=1e-6)


def test_a_head_of_another_task_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match="RobertaForSequenceClassification head.*TokenClassification"):
        load_task_checkpoint(checkpoints[("roberta", "sequence")], "token", device="cpu")


def test_mpnet_and_roberta_use_every_position_they_have(checkpoints):
    """Both number positions after the padding index: two fewer usable positions than the config says."""
    for family in ("mpnet", "roberta"):
        ours = load_task_checkpoint(checkpoints[(family, "token")], "token", device="cpu")
        assert ours.max_length == ours.encoder.config.max_position_embeddings - 2 == 64
        ids = torch.full((1, ours.max_length), 5)
        ours.model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the longest input runs
    assert load_task_checkpoint(checkpoints[("bert", "token")], "token", device="cpu").max_length == 64

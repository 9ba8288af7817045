"""Every encoder family (BERT, DistilBERT, ELECTRA, MPNet, RoBERTa: tiny random checkpoints with their own
tokenizers) through every stage, as a user chains them: pre-train, fine-tune, evaluate, quantize,
distill (fewer layers, and into another tokenizer), export to transformers, register and serve (the
MLflow pyfunc model). References: the raw Hugging Face model for the exported head, spaCy's round trip
for every folder written, the pipeline in process for the served model."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import spacy
import torch
from conftest import assert_same_predictions, demo_files, in_process_predictions
from families import FAMILIES, make_checkpoint
from transformers import AutoModelForTokenClassification, AutoTokenizer

from spacy_llm_components.components.pipeline import export_hf, hf_component
from spacy_llm_components.models.encoder import encoder_layers
from spacy_llm_components.stages import registry
from spacy_llm_components.stages.compress import quantized_copy
from spacy_llm_components.stages.compress.distill import DistillConfig, distill
from spacy_llm_components.stages.evaluate import evaluate
from spacy_llm_components.stages.finetune import finetune
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.pretrain import PretrainConfig, pretrain
from spacy_llm_components.stages.shared.training import FinetuneConfig

TEXTS = ["Lena Hartmann joined Brightwater Foods in Lindenfeld.", "Tomas Ekdahl's mill, in Ostbrook!"]


def config(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"device": "cpu", "batch_size": 8, "max_steps": 3, "eval_steps": 3, "lr": 1e-3,
                             "warmup_ratio": 0.0, **kwargs})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-data")
    train, dev, test = demo_files("ner")
    return {"prepared": prepare("ner", [train], root / "corpus", dev=dev), "test": test, "root": root,
            "wordpiece": make_checkpoint(root / "bert-student", "bert", "base", seed=4)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_goes_through_every_stage(family, corpus, tmp_path, mlflow_project):
    prepared, test = corpus["prepared"], corpus["test"]
    base = make_checkpoint(tmp_path / "base", family, "base", seed=1)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(d.strip() for d in (TEXTS * 20)) + "\n")
    lm = pretrain([text], tmp_path / "encoder", PretrainConfig(base_model=str(base), max_steps=2, batch_size=4,
                                                               max_length=32, device="cpu"), progress=False)
    assert np.isfinite(lm.perplexity_after) and (tmp_path / "encoder" / "config.json").is_file()

    finetune("ner", prepared.train, prepared.dev, tmp_path / "ner", config(base_model=str(tmp_path / "encoder")),
             progress=False)
    nlp = spacy.load(tmp_path / "ner")
    pipe = hf_component(nlp)
    assert pipe.checkpoint.encoder.model.config.model_type == family
    metrics = evaluate(tmp_path / "ner", test, tmp_path / "eval")
    assert 0.0 <= metrics.scores["ents_f"] <= 1.0 and metrics.statistics["docs"] > 0

    exported = export_hf(nlp, pipe.name, tmp_path / "hf")  # the raw transformers model computes what we do
    raw = AutoModelForTokenClassification.from_pretrained(exported).eval()
    tok = AutoTokenizer.from_pretrained(exported)
    batch = tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        want = torch.log_softmax(raw(**batch).logits[0], -1).numpy()
    words, log_probs, _ = pipe.word_tag_log_probs([nlp.make_doc(TEXTS[0])])
    firsts = [batch.word_ids().index(w) for w in dict.fromkeys(w for w in batch.word_ids() if w is not None)]
    np.testing.assert_allclose(log_probs, want[firsts][:, [raw.config.label2id[t] for t in pipe.tags]], atol=1e-4)

    int8 = quantized_copy(tmp_path / "ner", tmp_path / "int8")
    quantized = spacy.load(int8)
    qpipe = hf_component(quantized)
    assert qpipe.quantize == "int8"
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in qpipe._model.modules())
    _, int8_log_probs, _ = qpipe.word_tag_log_probs([quantized.make_doc(TEXTS[0])])
    np.testing.assert_allclose(int8_log_probs, log_probs, atol=0.25)  # int8 weights, close to float32

    distill(tmp_path / "ner", prepared.train, prepared.dev, tmp_path / "student", config(),
            DistillConfig(layers=1), progress=False)
    student = hf_component(spacy.load(tmp_path / "student"))
    assert len(encoder_layers(student.checkpoint.encoder.model)) == 1

    distill(tmp_path / "ner", prepared.train, prepared.dev, tmp_path / "cross", config(),
            DistillConfig(student_base=str(corpus["wordpiece"])), progress=False)
    cross = hf_component(spacy.load(tmp_path / "cross"))
    assert cross.checkpoint.encoder.model.config.model_type == "bert" and cross.tags == pipe.tags

    version = registry.register(tmp_path / "ner", f"family-{family}", metrics=tmp_path / "eval" / "metrics.json")
    served = mlflow.pyfunc.load_model(version.uri).predict(pd.DataFrame({"text": TEXTS}))
    assert_same_predictions(served, in_process_predictions(tmp_path / "ner", [{"text": t} for t in TEXTS]))
    block = json.loads((tmp_path / "ner" / "meta.json").read_text())["sllm"]
    assert block["base_model"] == str(tmp_path / "encoder")


def test_an_option_the_family_does_not_have_is_a_clear_error(corpus, tmp_path):
    """MPNet takes no token_type_ids: a config asking for them is refused when the pipeline is made."""
    ckpt = make_checkpoint(tmp_path / "mpnet", "mpnet", "ner", ["O", "B-PER", "I-PER"])
    nlp = spacy.blank("en")
    with pytest.raises(Exception, match="token_type_ids"):
        nlp.add_pipe("hf_ner", config={"model": str(ckpt), "device": "cpu", "token_type_ids": True})
    assert "token_type_ids" not in hf_component(_pipeline(ckpt)).checkpoint.encoder.input_names


def _pipeline(ckpt):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(ckpt), "device": "cpu"})
    nlp.initialize()
    return nlp

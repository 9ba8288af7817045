"""`spacy train` on the shipped training configs, the hf_* components as spaCy TrainablePipes."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spacy
import torch
from conftest import NER_TAGS, demo_files, make_ckpt
from spacy.tokens import Doc, DocBin, Span
from spacy.training import Example
from thinc.api import SGD

from spacy_llm_components.stages import registry
from spacy_llm_components.stages.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
NER_TRAIN = "".join(f"{name} B-PER\n{surname} I-PER\nvisited O\n{city} B-LOC\n. O\n\n" for name, surname, city in [
    ("Angela", "Merkel", "Paris"), ("John", "Smith", "Berlin"), ("Mary", "Jones", "Rome"), ("Peter", "Brown", "Madrid")])


def spacy_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spacy", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("spacy-train-ner")
    (root / "train.conll").write_text(NER_TRAIN)
    return prepare("ner", root / "train.conll", root / "data", dev=root / "train.conll")


@pytest.mark.parametrize("task", ["ner", "textcat", "qa"])
def test_the_shipped_training_configs_pass_spacy_debug_config(task, tmp_path):
    done = spacy_cli("debug", "config", ROOT / "pipelines" / f"train-{task}.cfg", "--paths.train", "x.spacy",
                     "--paths.dev", "y.spacy", cwd=tmp_path)
    assert done.returncode == 0 and "Config is valid" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_spacy_train_learns_the_training_data_and_the_best_model_serves(ner_data, ckpts, tmp_path, mlflow_project):
    """A new head on the tiny base, 80 spaCy steps at lr 1e-3 on four sentences: it learns them."""
    done = spacy_cli("train", ROOT / "pipelines" / "train-ner.cfg", "--paths.train", ner_data.train, "--paths.dev",
                     ner_data.dev, "--output", tmp_path / "out", "--paths.model", ckpts["base"],
                     "--training.max_steps", 80, "--training.eval_frequency", 40, "--training.batcher.size", 4,
                     "--training.optimizer.learn_rate.initial_rate", 1e-3,
                     "--training.optimizer.learn_rate.warmup_steps", 0, "--components.ner.device", "cpu",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nlp = spacy.load(tmp_path / "out" / "model-best")
    assert nlp.get_pipe("ner").labels == ["LOC", "PER"]  # the new head took the data's entity types
    gold = [doc for doc in DocBin().from_disk(ner_data.train).get_docs(nlp.vocab)]
    scores = nlp.evaluate([Example(nlp.make_doc(doc.text), doc) for doc in gold])
    assert scores["ents_f"] == 1.0, scores
    version = registry.register(tmp_path / "out" / "model-best", "spacy-trained")  # serves through our pyfunc
    import mlflow

    served = mlflow.pyfunc.load_model(version.uri).predict(pd.DataFrame({"text": [gold[0].text]}))
    assert [(e["text"], e["label"]) for e in served[0]["ents"]] == [("Angela Merkel", "PER"), ("Paris", "LOC")]


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory):
    """Tiny NER and textcat checkpoints without dropout: a training step is then deterministic."""
    root = tmp_path_factory.mktemp("no-dropout")
    tags = dict(enumerate(NER_TAGS))
    off = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {"ner": make_ckpt(root / "ner", "ner", num_labels=len(tags), id2label=tags,
                             label2id={v: k for k, v in tags.items()}, **off),
            "textcat": make_ckpt(root / "textcat", "textcat", num_labels=2, id2label={0: "neg", 1: "pos"},
                                 label2id={"neg": 0, "pos": 1}, **off)}


def test_one_spacy_update_is_one_gradient_step_on_the_finetune_loss(no_dropout):
    """update() through thinc's wrapper and optimizer = plain SGD on the loss `sllm finetune` minimises
    (the model's own loss on the same training features), done here with torch alone."""
    nlp = spacy.blank("en")
    pipe = nlp.add_pipe("hf_ner", config={"model": str(no_dropout["ner"]), "device": "cpu"})
    doc = nlp.make_doc("Angela Merkel visited Paris .")
    doc.ents = [Span(doc, 0, 2, "PER"), Span(doc, 3, 4, "LOC")]
    examples = [Example(nlp.make_doc(doc.text), doc)]
    nlp.initialize(lambda: examples)
    model = pipe.checkpoint.model
    reference = copy.deepcopy(model).train()
    (feature,) = pipe.features([doc])
    batch = {k: torch.tensor([v]) for k, v in feature.items()}
    loss = reference(**batch).loss
    loss.backward()
    expected = {name: p.detach() - 0.5 * p.grad for name, p in reference.named_parameters() if p.grad is not None}
    losses = pipe.update(examples, sgd=SGD(0.5, L2=0.0, grad_clip=1e9, use_averages=False))
    assert losses[pipe.name] == pytest.approx(loss.item(), rel=1e-5)
    trained = dict(model.named_parameters())
    moved = 0
    for name, value in expected.items():
        np.testing.assert_allclose(trained[name].detach().numpy(), value.numpy(), atol=1e-6, err_msg=name)
        moved += not torch.allclose(value, dict(reference.named_parameters())[name].detach())
    assert moved > 10  # the step changed the weights: the comparison is not of untouched tensors


def test_the_update_loss_is_the_models_loss_on_the_features(no_dropout):
    nlp = spacy.blank("en")
    pipe = nlp.add_pipe("hf_textcat", config={"model": str(no_dropout["textcat"]), "device": "cpu"})
    docs = []
    for text, label in [("good fun", "pos"), ("dull and long", "neg")]:
        doc = nlp.make_doc(text)
        doc.cats = {"neg": float(label == "neg"), "pos": float(label == "pos")}
        docs.append(doc)
    examples = [Example(nlp.make_doc(d.text), d) for d in docs]
    nlp.initialize(lambda: examples)
    collated = pipe.spec.collator(pipe.checkpoint.tokenizer)(pipe.features(docs))
    logits = pipe.checkpoint.model(**{k: v for k, v in collated.items() if k != "labels"}).logits.detach()
    by_hand = float(torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])))  # pos, neg
    losses = pipe.update(examples, sgd=None)  # no optimizer: the loss only
    assert losses[pipe.name] == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.slow
def test_spacy_components_and_ours_train_in_one_run(ckpts, tmp_path):
    """spaCy's tok2vec + tagger beside hf_ner, and a sentencizer before hf_textcat: one `spacy train` each."""
    nlp = spacy.blank("en")
    docs = []
    for words, tags, ents in [(["Angela", "Merkel", "visited", "Paris"], ["NNP", "NNP", "VBD", "NNP"], [(0, 2, "PER"), (3, 4, "LOC")]),
                              (["John", "slept", "in", "Rome"], ["NNP", "VBD", "IN", "NNP"], [(0, 1, "PER"), (3, 4, "LOC")])]:
        doc = Doc(nlp.vocab, words=words, tags=tags)
        doc.ents = [Span(doc, s, e, label) for s, e, label in ents]
        docs.append(doc)
    DocBin(docs=docs * 4, store_user_data=True).to_disk(tmp_path / "tagged.spacy")
    config = (ROOT / "pipelines" / "train-ner.cfg").read_text().replace('pipeline = ["ner"]',
                                                                       'pipeline = ["tok2vec", "tagger", "ner"]')
    config += """
[components.tok2vec]
factory = "tok2vec"

[components.tok2vec.model]
@architectures = "spacy.HashEmbedCNN.v2"
pretrained_vectors = null
width = 32
depth = 1
embed_size = 500
window_size = 1
maxout_pieces = 2
subword_features = true

[components.tagger]
factory = "tagger"

[components.tagger.model]
@architectures = "spacy.Tagger.v2"
nO = null

[components.tagger.model.tok2vec]
@architectures = "spacy.Tok2VecListener.v1"
width = 32
upstream = "tok2vec"
"""
    (tmp_path / "mixed.cfg").write_text(config)
    done = spacy_cli("train", tmp_path / "mixed.cfg", "--paths.train", tmp_path / "tagged.spacy", "--paths.dev",
                     tmp_path / "tagged.spacy", "--output", tmp_path / "out", "--paths.model", ckpts["base"],
                     "--training.max_steps", 6, "--training.eval_frequency", 3, "--components.ner.device", "cpu",
                     "--training.score_weights", '{"ents_f": 0.5, "tag_acc": 0.5}', cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "LOSS TAGGER" in done.stdout and "LOSS NER" in done.stdout
    trained = spacy.load(tmp_path / "out" / "model-last")
    assert trained.pipe_names == ["tok2vec", "tagger", "ner"]
    doc = trained("Angela Merkel visited Paris")
    assert all(t.tag_ for t in doc) and trained.get_pipe("ner").labels == ["LOC", "PER"]

    train, dev, _ = demo_files("textcat")
    data = prepare("textcat", train, tmp_path / "tc", dev=dev)
    config = (ROOT / "pipelines" / "train-textcat.cfg").read_text().replace(
        'pipeline = ["textcat"]', 'pipeline = ["sentencizer", "textcat"]') + '\n[components.sentencizer]\nfactory = "sentencizer"\n'
    (tmp_path / "tc.cfg").write_text(config)
    done = spacy_cli("train", tmp_path / "tc.cfg", "--paths.train", data.train, "--paths.dev", data.dev, "--output",
                     tmp_path / "tc-out", "--paths.model", ckpts["base"], "--training.max_steps", 4,
                     "--training.eval_frequency", 2, "--components.textcat.device", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tc = spacy.load(tmp_path / "tc-out" / "model-last")
    assert tc.pipe_names == ["sentencizer", "textcat"] and set(tc("Lovely.").cats) == {"negative", "positive"}


def test_spacy_train_refuses_data_of_another_task_and_labels_the_config_lacks(ckpts, ner_data, tmp_path):
    train, dev, _ = demo_files("textcat")
    textcat = prepare("textcat", train, tmp_path / "tc", dev=dev)
    done = spacy_cli("train", ROOT / "pipelines" / "train-ner.cfg", "--paths.train", textcat.train, "--paths.dev",
                     textcat.dev, "--output", tmp_path / "out", "--paths.model", ckpts["base"],
                     "--training.max_steps", 2, "--components.ner.device", "cpu", cwd=tmp_path)
    assert done.returncode != 0
    assert "none of the" in done.stderr and "textcat annotation" in done.stderr and "hf_ner learns ner" in done.stderr
    done = spacy_cli("train", ROOT / "pipelines" / "train-ner.cfg", "--paths.train", ner_data.train, "--paths.dev",
                     ner_data.dev, "--output", tmp_path / "out2", "--paths.model", ckpts["base"],
                     "--training.max_steps", 2, "--components.ner.device", "cpu", "--components.ner.labels", '["PER"]',
                     cwd=tmp_path)
    assert done.returncode != 0 and "the training data has labels ['LOC']" in done.stderr
    assert not list((tmp_path / "out").glob("model-*")) and not list((tmp_path / "out2").glob("model-*"))

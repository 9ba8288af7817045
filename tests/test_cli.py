"""The `sllm` commands through typer's CliRunner: prepare -> finetune -> evaluate -> predict -> export-hf,
the fine-tuning options and their effects, CoNLL repairs, model references (models:/NAME@ALIAS and
models:/NAME/VERSION) and promotion on a test file."""

import json
import math
import shutil
from dataclasses import fields

import numpy as np
import pytest
import spacy
import torch
from conftest import assert_same_predictions, in_process_predictions, model_inputs
from test_train import NER_TRAIN
from transformers import AutoModelForTokenClassification, AutoTokenizer
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.pipeline import hf_component
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.training import FinetuneConfig

runner = CliRunner()


def invoke(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_prepare_finetune_evaluate_predict_export(ckpts, mlflow_project):
    tmp_path = mlflow_project
    (tmp_path / "train.conll").write_text(NER_TRAIN * 2)
    result = invoke("prepare", "ner", tmp_path / "train.conll", "--output", tmp_path / "data", "--dev-fraction", "0.25")
    assert "train: 9 docs" in result.output and "dev: 3 docs" in result.output
    assert {p.name for p in (tmp_path / "data").iterdir()} == {"train.spacy", "dev.spacy", "labels.json", "summary.json"}

    result = invoke("finetune", "ner", "--train", tmp_path / "data/train.spacy", "--dev", tmp_path / "data/dev.spacy",
                    "--output", tmp_path / "model", "--base-model", ckpts["base"], "--max-steps", "3",
                    "--batch-size", "4", "--device", "cpu", "--lr", "1e-3")
    assert "fine-tuned ner in" in result.output and "word pieces at" in result.output
    # tracking on: the run goes to the project's own store, not to the working directory
    assert f"in sqlite:///{tmp_path.resolve()}/mlflow.db" in result.output
    assert spacy.load(tmp_path / "model").pipe_names == ["ner"]

    result = invoke("evaluate", tmp_path / "model", tmp_path / "train.conll", "--output", tmp_path / "eval")
    assert result.output.startswith("ents_f: ")
    metrics = metrics_of(tmp_path / "eval")
    assert metrics["statistics"]["docs"] == 12 and set(metrics["per_label"]) == {"LOC", "PER"}

    records = [{"text": f"Angela Merkel visited Paris {i}"} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    invoke("predict", tmp_path / "model", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = [{**r, **p} for r, p in zip(records, in_process_predictions(tmp_path / "model", records))]
    assert_same_predictions(lines, want)

    invoke("export-hf", tmp_path / "model", "ner", tmp_path / "hf")
    exported = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    loaded = hf_component(spacy.load(tmp_path / "model")).checkpoint
    original = loaded.model
    assert exported.config.id2label == dict(enumerate(loaded.id2label))
    enc = AutoTokenizer.from_pretrained(tmp_path / "hf")(records[0]["text"], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_array_equal(exported(**enc).logits.numpy(), original(**enc).logits.numpy())


def test_bad_input_exits_2_with_the_line(tmp_path):
    (tmp_path / "bad.conll").write_text("Paris B-LOC\nbroken\n")
    result = invoke("prepare", "ner", tmp_path / "bad.conll", "--output", tmp_path / "out", code=2)
    assert "bad.conll, line 2: expected a token and a tag column" in result.output
    assert not (tmp_path / "out").exists()
    result = invoke("prepare", "pos", tmp_path / "bad.conll", "--output", tmp_path / "out", code=2)
    assert "unknown task 'pos'" in result.output


def test_skip_bad_lists_skipped_records(tmp_path):
    (tmp_path / "a.conll").write_text("".join(f"Paris{i} B-LOC\n\n" for i in range(10)) + "broken\n")
    result = invoke("prepare", "ner", tmp_path / "a.conll", "-o", tmp_path / "out", "--skip-bad")
    assert "skipped 1 bad record(s)" in result.output and "line 21" in result.output


# -- CoNLL tag sequences that break their scheme ----------------------------------------------------
IOB2_BROKEN = "Lena B-PER\nHartmann I-PER\nmet O\nAcme B-ORG\nFoods I-PER\n.\tO\n\nOslo B-LOC\nrocks O\n"
BILOU_BROKEN = "Lena U-PER\nmet O\nNew B-LOC\nYork L-LOC\n\nin O\nOstbrook L-LOC\n"


@pytest.mark.parametrize("text, line, problem, entities", [
    (IOB2_BROKEN, 5, "'I-PER' after 'B-ORG' breaks IOB2",
     [[("Lena Hartmann", "PER"), ("Acme", "ORG"), ("Foods", "PER")], [("Oslo", "LOC")]]),
    (BILOU_BROKEN, 7, "'L-LOC' after 'O' breaks BILOU",
     [[("Lena", "PER"), ("New York", "LOC")], [("Ostbrook", "LOC")]]),
])
def test_conll_repairs_are_counted_printed_and_refused_with_strict(tmp_path, text, line, problem, entities):
    src = tmp_path / "train.conll"
    src.write_text(text)
    (tmp_path / "dev.conll").write_text("Oslo B-LOC\n" if "B-" in text else "Oslo U-LOC\n")
    args = ["prepare", "ner", src, "--dev", tmp_path / "dev.conll"]
    result = invoke(*args, "--output", tmp_path / "out")
    assert "repaired 1 tag sequence(s)" in result.output
    assert f"{src}, line {line}: {problem}; read leniently, as conlleval does" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["repaired"]["count"] == 1
    assert summary["repaired"]["records"][0]["where"] == f"line {line}" and problem in \
        summary["repaired"]["records"][0]["problem"]
    docs = list(spacy.tokens.DocBin().from_disk(tmp_path / "out" / "train.spacy").get_docs(spacy.blank("en").vocab))
    assert [[(e.text, e.label_) for e in d.ents] for d in docs] == entities  # read as conlleval reads it

    strict = invoke(*args, "--output", tmp_path / "strict", "--strict", code=2)
    assert f"{src}, line {line}: {problem} (--strict refuses it)" in strict.output
    assert not (tmp_path / "strict").exists()


# -- fine-tuning options ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ner_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner-corpus")
    (root / "train.conll").write_text(NER_TRAIN)
    (root / "dev.conll").write_text("Angela B-PER\nMerkel I-PER\nvisited O\nRome B-LOC\n")
    return prepare("ner", root / "train.conll", root / "prepared", dev=root / "dev.conll")


def finetune_cli(ckpts, corpus, output, *options):
    return invoke("finetune", "ner", "--train", corpus.train, "--dev", corpus.dev, "--output", output,
                  "--base-model", ckpts["base"], "--device", "cpu", "--no-track", "--warmup-ratio", "0", *options)


def test_patience_stops_early_on_a_plateau(ckpts, ner_corpus, tmp_path):
    # learning rate 0: the dev score never improves after the first evaluation
    finetune_cli(ckpts, ner_corpus, tmp_path / "m", "--lr", "0", "--max-steps", "10", "--eval-steps", "1",
                 "--batch-size", "2", "--patience", "2")
    assert metrics_of(tmp_path / "m")["training"]["steps"] == 3  # best at 1, then 2 evaluations without gain
    log = [json.loads(line) for line in (tmp_path / "m" / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "eval_ents_f" in e] == [1, 2, 3]


def test_grad_accum_halves_the_optimizer_steps(ckpts, ner_corpus, tmp_path):
    n_docs = ner_corpus.summary["splits"]["train"]["docs"]
    assert n_docs == 6
    for accum, steps in ((1, 6), (2, 3)):  # one epoch, batch 1
        finetune_cli(ckpts, ner_corpus, tmp_path / f"m{accum}", "--epochs", "1", "--batch-size", "1",
                     "--grad-accum", accum)
        assert metrics_of(tmp_path / f"m{accum}")["training"]["steps"] == steps


def test_max_length_caps_the_model_input_and_windows_long_docs(ckpts, tmp_path):
    words = "the old mill on the river ground wheat for the town of Ostbrook until the flood came".split()
    sentences = ["".join(f"{w} O\n" for w in [f"Lena{i}"] + words + words) + "\n" for i in range(4)]
    sentences = [s.replace(f"Lena{i} O", f"Lena{i} B-PER") for i, s in enumerate(sentences)]
    (tmp_path / "train.conll").write_text("".join(sentences))
    (tmp_path / "dev.conll").write_text("Lena B-PER\nmet O\nTom B-PER\n")
    corpus = prepare("ner", tmp_path / "train.conll", tmp_path / "prepared", dev=tmp_path / "dev.conll")
    finetune_cli(ckpts, corpus, tmp_path / "m", "--epochs", "1", "--batch-size", "1", "--max-length", "16")

    # one training step per window, batch 1: 14 pieces + [CLS] [SEP], neighbours overlapping by 7 pieces
    tok = AutoTokenizer.from_pretrained(ckpts["base"])
    expected = 0
    for sentence in sentences:
        n = len(tok(" ".join(line.split()[0] for line in sentence.splitlines() if line),
                    add_special_tokens=False)["input_ids"])
        assert n > 28
        expected += 1 + math.ceil((n - 14) / 7)
    assert metrics_of(tmp_path / "m")["training"]["steps"] == expected

    nlp = spacy.load(tmp_path / "m")
    pipe = hf_component(nlp)
    assert nlp.config["components"]["ner"]["max_length"] == 16 and pipe.max_length == 16
    seen = model_inputs(pipe)
    nlp(" ".join(["Lena"] + words * 2))
    assert len(seen) > 1 and max(seen) == 16


def test_multi_label_finetune_from_a_label_separator(ckpts, tmp_path):
    rows = [("warm soup and quick delivery", "food|service"), ("rude waiter", "service"), ("bland soup", "food"),
            ("cold soup slow waiter", "food|service"), ("lovely view", ""), ("kind staff", "service")] * 3
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t} {i},{l}\n" for i, (t, l) in enumerate(rows)))
    invoke("prepare", "textcat", tmp_path / "train.csv", "--label-sep", "|", "--output", tmp_path / "data",
           "--dev-fraction", "0.3")
    labels = json.loads((tmp_path / "data" / "labels.json").read_text())
    assert labels["multi_label"] is True and labels["labels"] == ["food", "service"]
    invoke("finetune", "textcat", "--train", tmp_path / "data/train.spacy", "--dev", tmp_path / "data/dev.spacy",
           "--output", tmp_path / "m", "--base-model", ckpts["base"], "--max-steps", "2", "--batch-size", "4",
           "--device", "cpu", "--no-track")
    nlp = spacy.load(tmp_path / "m")
    pipe = hf_component(nlp)
    assert pipe.multi_label and nlp.config["components"]["textcat"]["multi_label"] is True
    cats = nlp("warm soup").cats
    # a sigmoid per label, not a softmax over them
    logits = pipe.checkpoint.model(**pipe.checkpoint.tokenizer("warm soup", return_tensors="pt")).logits[0]
    np.testing.assert_allclose([cats["food"], cats["service"]], torch.sigmoid(logits).detach().numpy(), rtol=1e-5)
    dev = metrics_of(tmp_path / "m")["dev"]
    assert metrics_of(tmp_path / "m")["primary"] == "cats_score" and dev["cats_score"] == dev["cats_macro_f"]


def test_every_finetune_setting_is_an_option_of_every_command_that_finetunes():
    for command in ("finetune", "run", "schedule"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
        assert result.exit_code == 0, result.output
        for f in fields(FinetuneConfig):
            assert f"--{f.name.replace('_', '-')}" in result.output, (command, f.name)


def test_a_finetune_that_fails_before_training_writes_nothing(ner_corpus, tmp_path):
    out = tmp_path / "model"
    result = invoke("finetune", "ner", "--train", ner_corpus.train, "--dev", ner_corpus.dev, "--output", out,
                    "--base-model", tmp_path / "no-such-model", "--no-track", code=2)
    assert "no-such-model" in result.output and "does not exist" in result.output
    assert not out.exists()  # no checkpoints/run.json, no log


# -- model references and promotion ------------------------------------------------------------------
@pytest.fixture
def registered_textcat(tiny_pipelines, mlflow_project):
    from spacy_llm_components.stages import registry

    parts = tiny_pipelines["textcat"]
    registry.register(parts["pipeline"], "tc", metrics=parts["evaluation"] / "metrics.json")
    registry.promote("tc")
    return parts


def test_evaluate_and_predict_take_registry_uris(registered_textcat, tmp_path):
    parts = registered_textcat
    invoke("evaluate", "models:/tc@champion", parts["test"], "--output", tmp_path / "eval", "--no-track")
    by_uri, by_folder = metrics_of(tmp_path / "eval"), metrics_of(parts["evaluation"])
    assert by_uri["pipeline"] == "models:/tc/1"  # the alias is recorded as the version it meant
    assert by_uri["scores"] == by_folder["scores"] and by_uri["test_sha256"] == by_folder["test_sha256"]

    records = [{"text": "The soup was cold."}, {"text": "Lovely staff, great food."}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    invoke("predict", "models:/tc/1", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = [{**r, **p} for r, p in zip(records, in_process_predictions(parts["pipeline"], records))]
    assert_same_predictions(lines, want)

    missing = invoke("evaluate", "models:/tc@nope", parts["test"], "--output", tmp_path / "e2", code=2)
    assert "has no alias 'nope'" in missing.output and not (tmp_path / "e2").exists()


def test_promote_with_a_test_file_scores_both_versions_on_it(tiny_pipelines, mlflow_project, tmp_path):
    """The tiny classifier and the same with its two classes swapped: on a binary test set of an odd
    number of docs their accuracies add up to 1, so exactly one is better, and `promote --test` must
    find which when the worse one is the champion."""
    from spacy_llm_components.stages import registry
    from spacy_llm_components.stages.evaluate import evaluate

    parts = tiny_pipelines["textcat"]
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "".join(line for line in parts["test"].read_text().splitlines(True)[1:6]))
    nlp = spacy.load(parts["pipeline"])
    head = hf_component(nlp).checkpoint.head.classifier
    with torch.no_grad():
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    nlp.to_disk(tmp_path / "swapped")
    shutil.copy(parts["pipeline"] / "metrics.json", tmp_path / "swapped")  # as fine-tuning left it
    scores = {p: evaluate(p, test).primary_score for p in (parts["pipeline"], tmp_path / "swapped")}
    assert scores[parts["pipeline"]] + scores[tmp_path / "swapped"] == pytest.approx(1.0)
    worse, better = sorted(scores, key=scores.get)
    assert scores[worse] < scores[better]

    registry.register(worse, "swap")
    invoke("promote", "swap", "--test", test)  # no champion yet: the first version becomes it
    registry.register(better, "swap")
    result = invoke("promote", "swap", "--test", test)
    assert result.output.strip() == (f"swap: champion is now version 2 (challenger cats_score {scores[better]:.4f} "
                                     f"> champion {scores[worse]:.4f})")
    from mlflow.tracking import MlflowClient

    assert str(MlflowClient().get_model_version_by_alias("swap", "champion").version) == "2"


@pytest.mark.parametrize("command,module,function", [("finetune", "spacy_llm_components.stages.finetune", "finetune"),
                                                     ("pretrain", "spacy_llm_components.stages.pretrain", "pretrain"),
                                                     ("distill", "spacy_llm_components.stages.compress.distill", "distill")])
def test_an_interrupted_training_command_says_how_to_resume(tmp_path, monkeypatch, command, module, function):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"{module}.{function}", interrupted)
    out = tmp_path / "out"
    args = {"finetune": ["finetune", "ner", "--train", "t.spacy", "--dev", "d.spacy", "-o", out],
            "pretrain": ["pretrain", "--corpus", "c.txt", "-o", out],
            "distill": ["distill", tmp_path, "--train", "t.spacy", "--dev", "d.spacy", "-o", out]}[command]
    result = invoke(*args, "--no-track", code=130)
    assert f"--resume (checkpoints in {out}/checkpoints)" in result.output


@pytest.mark.slow
def test_the_prefect_ui_on_another_port_calls_the_api_on_that_port(tmp_path):
    """`sllm ui prefect --port P`: the UI's settings (what the browser asks for first) point at P's API,
    not at the default 4200, where nothing listens."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.Popen([sys.executable, "-m", "spacy_llm_components.cli", "ui", "prefect", "--port", str(port)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, settings = time.monotonic() + 120, None
        while settings is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
            try:
                settings = requests.get(f"http://127.0.0.1:{port}/ui-settings", timeout=2).json()
            except requests.ConnectionError:
                time.sleep(0.5)
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        assert requests.get(f"{settings['api_url']}/health", timeout=5).json() is True
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

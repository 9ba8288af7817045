"""Compression on tiny checkpoints: the int8 copy, layer pruning, distillation (it tracks the teacher, it
resumes, it refuses bad input), and the word pieces/s that evaluation reports."""

import json
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from conftest import NER_TAGS, assert_same_steps, demo_files, make_ckpt, teacher_weight
from safetensors.numpy import load_file
from transformers import BertForTokenClassification, TrainerCallback
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.pipeline import doc_predictions, hf_component
from spacy_llm_components.data import DataError
from spacy_llm_components.models.encoder import keep_layers
from spacy_llm_components.stages.compress import CompressError, quantized_copy
from spacy_llm_components.stages.compress.distill import DistillConfig, distill, kept_layers
from spacy_llm_components.stages.finetune import FinetuneError, finetune
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.training import FinetuneConfig
from spacy_llm_components.tasks import load_docs

TEXTS = ["Lena Hartmann joined Brightwater Foods in Lindenfeld.", "Tomas Ekdahl visited Ostbrook on Monday.",
         "The mill in Lindenfeld was built in 1887 by Marta Veldt.", "A quiet day."]


def weights(pipeline: Path) -> dict:
    return load_file(str(next(pipeline.glob("*/model/*.safetensors"))))


def config(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"device": "cpu", "batch_size": 8, "max_steps": 4, "eval_steps": 4, "lr": 1e-3,
                             "warmup_ratio": 0.0, **kwargs})


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A 4-layer NER, textcat and QA teacher per task, fine-tuned a few steps on the demo data (so their
    outputs are no longer those of a random head), with the prepared data."""
    root = tmp_path_factory.mktemp("teachers")
    base = make_ckpt(root / "base", "base", num_hidden_layers=4)
    out = {}
    for task in ("ner", "textcat", "qa"):
        train, dev, test = demo_files(task)
        prepared = prepare(task, [train], root / task / "corpus", dev=dev)
        finetune(task, prepared.train, prepared.dev, root / task / "teacher",
                 config(base_model=str(base), max_steps=40, eval_steps=40, lr=3e-3), progress=False)
        out[task] = {"pipeline": root / task / "teacher", "train": prepared.train, "dev": prepared.dev, "test": test}
    return out


# -- int8 --------------------------------------------------------------------------------------------
def test_int8_copy_round_trips_with_float32_weights_and_int8_predictions(teachers, tmp_path):
    source = teachers["textcat"]["pipeline"]
    copy = quantized_copy(source, tmp_path / "int8")
    cfg = spacy.util.load_config(copy / "config.cfg")
    assert cfg["components"]["textcat"]["quantize"] == "int8" and cfg["components"]["textcat"]["device"] == "cpu"
    original, copied = weights(source), weights(copy)
    assert set(copied) == set(original)
    for name in original:  # the weights on disk are the source's float32 weights, unchanged
        assert copied[name].dtype == np.float32 and np.array_equal(copied[name], original[name]), name
    assert json.loads((copy / "meta.json").read_text())["sllm"]["compression"]["method"] == "int8"
    assert (copy / "metrics.json").read_bytes() == (source / "metrics.json").read_bytes()

    in_memory = spacy.load(source, config={"components": {"textcat": {"quantize": "int8", "device": "cpu"}}})
    reloaded = spacy.load(copy)
    fp32 = spacy.load(source)
    want = [doc_predictions(doc, in_memory) for doc in in_memory.pipe(TEXTS)]
    assert [doc_predictions(doc, reloaded) for doc in reloaded.pipe(TEXTS)] == want
    in_memory.to_disk(tmp_path / "again")  # an int8 pipeline saved by spaCy keeps the setting and the weights
    again = spacy.load(tmp_path / "again")
    assert hf_component(again).quantize == "int8"
    assert [doc_predictions(doc, again) for doc in again.pipe(TEXTS)] == want
    for name, value in weights(tmp_path / "again").items():
        assert np.array_equal(value, original[name]), name
    # int8 is in effect: the probabilities move a little off the float32 ones, the decisions do not much
    probs = np.array([[d["cats"][k] for k in sorted(d["cats"])] for d in want])
    fp32_probs = np.array([[d["cats"][k] for k in sorted(d["cats"])]
                           for d in (doc_predictions(doc, fp32) for doc in fp32.pipe(TEXTS))])
    assert not np.array_equal(probs, fp32_probs) and np.abs(probs - fp32_probs).max() < 0.05


def test_int8_is_torch_dynamic_quantization_sharing_the_float32_tensors(teachers):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = teachers["textcat"]["pipeline"]
    nlp = spacy.load(source, config={"components": {"textcat": {"quantize": "int8", "device": "cpu"}}})
    pipe = hf_component(nlp)
    int8, fp32 = pipe._model, pipe.checkpoint.model
    assert isinstance(int8.encoder.encoder.layer[0].output.dense, torch.ao.nn.quantized.dynamic.Linear)
    assert type(fp32.encoder.encoder.layer[0].output.dense) is torch.nn.Linear  # kept for to_disk
    shared = {id(t) for t in fp32.parameters()}  # the embeddings and norms are held once
    words = [m.encoder.embeddings.word_embeddings.weight for m in (int8, fp32)]
    assert words[0].data_ptr() == words[1].data_ptr()
    assert all(id(t) in shared for t in int8.parameters())
    # the reference: torch's own dynamic quantization of the raw checkpoint, one text at a time
    folder = next(source.glob("*/model"))
    raw = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    reference = quantize_dynamic(raw, {torch.nn.Linear: per_channel_dynamic_qconfig})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    labels = [raw.config.id2label[i] for i in range(raw.config.num_labels)]
    for text in TEXTS:
        with torch.no_grad():
            want = torch.softmax(reference(**tokenizer(text, return_tensors="pt")).logits[0], -1).numpy()
        got = nlp(text).cats
        np.testing.assert_allclose([got[label] for label in labels], want, atol=1e-5, err_msg=text)


def test_int8_ner_copy_predicts_like_the_in_memory_int8_pipeline(teachers, tmp_path):
    source = teachers["ner"]["pipeline"]
    copy = quantized_copy(source, tmp_path / "int8")
    in_memory = spacy.load(source, config={"components": {"ner": {"quantize": "int8", "device": "cpu"}}})
    reloaded = spacy.load(copy)
    want = [doc_predictions(doc, in_memory) for doc in in_memory.pipe(TEXTS)]
    assert [doc_predictions(doc, reloaded) for doc in reloaded.pipe(TEXTS)] == want


def test_quantizing_a_pipeline_without_hf_component_is_refused(tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.to_disk(tmp_path / "plain")
    with pytest.raises(CompressError, match="no hf_textcat, hf_ner or hf_qa component .*sentencizer"):
        quantized_copy(tmp_path / "plain", tmp_path / "int8")
    assert not (tmp_path / "int8").exists()
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "plain"), "-o", str(tmp_path / "int8")])
    assert result.exit_code == 2 and "nothing to quantize" in result.output


def test_quantizing_into_the_source_or_a_folder_around_it_is_refused(teachers):
    pipeline = teachers["textcat"]["pipeline"]
    before = sorted(p.name for p in pipeline.parent.iterdir())
    for output in (pipeline, pipeline.parent):
        with pytest.raises(CompressError, match="apart from its source"):
            quantized_copy(pipeline, output)
    assert sorted(p.name for p in pipeline.parent.iterdir()) == before and (pipeline / "config.cfg").is_file()


# -- ONNX Runtime ------------------------------------------------------------------------------------
def predictions(nlp, task, texts=TEXTS):
    """Each doc's predictions as data (QA: two questions per text)."""
    docs = []
    for text in texts:
        doc = nlp.make_doc(text)
        if task == "qa":
            doc._.questions = ["Who joined?", "Where is the mill?"]
        docs.append(doc)
    return [doc_predictions(doc, nlp) for doc in nlp.pipe(docs)]


def scores_of(records):
    """Every probability or score in the predictions, in order."""
    out = []
    for record in records:
        out += [record["cats"][k] for k in sorted(record.get("cats", {}))]
        out += [e["score"] for e in record.get("ents", [])]
        out += [a["score"] for group in record.get("answers", []) for a in group.get("answers", [group])]
    return np.array(out, dtype=float)


def without_scores(value):
    """The predictions with every score left out (cats: the label names only)."""
    if isinstance(value, dict):
        return {k: (sorted(v) if k == "cats" else without_scores(v)) for k, v in value.items() if k != "score"}
    if isinstance(value, list):
        return [without_scores(v) for v in value]
    return value


@pytest.mark.parametrize("task", ["ner", "textcat", "qa"])
def test_onnxruntime_float32_predicts_what_pytorch_does(teachers, task, tmp_path):
    """The ONNX export run by ONNX Runtime gives the PyTorch model's predictions (same spans, labels and
    answers; scores within float32 rounding), and it is what runs."""
    from families import make_checkpoint

    from spacy_llm_components.models.runtimes import OnnxModel

    source = teachers[task]["pipeline"]
    if task == "ner":  # a 40-step NER teacher may predict no entity at all: a random head that finds many
        nlp = spacy.blank("en")
        nlp.add_pipe("hf_ner", config={"model": str(make_checkpoint(tmp_path / "ck", "bert", "ner", NER_TAGS)),
                                       "device": "cpu"})
        nlp.initialize()
        nlp.to_disk(source := tmp_path / "ner")
    torch_nlp = spacy.load(source)
    name = hf_component(torch_nlp).name
    onnx_nlp = spacy.load(source, config={"components": {name: {"runtime": "onnxruntime", "device": "cpu"}}})
    model = hf_component(onnx_nlp)._model
    assert isinstance(model, OnnxModel) and not {"MatMulInteger", "DynamicQuantizeLinear"} & model.operators
    calls = []
    run = model.session.run
    model.session = type("Counting", (), {"run": lambda self, *a: calls.append(1) or run(*a)})()
    texts = TEXTS + [doc.text for doc in load_docs(task, teachers[task]["test"], torch_nlp).docs]  # held-out demo
    want, got = predictions(torch_nlp, task, texts), predictions(onnx_nlp, task, texts)
    assert calls, "ONNX Runtime did not run"
    assert without_scores(got) == without_scores(want)
    assert len(scores_of(want)) > 0 and np.allclose(scores_of(got), scores_of(want), atol=1e-4)


def test_onnxruntime_int8_runs_int8_operators_close_to_float32(teachers, tmp_path):
    source = teachers["textcat"]["pipeline"]
    copy = quantized_copy(source, tmp_path / "int8-onnx", runtime="onnxruntime")
    cfg = spacy.util.load_config(copy / "config.cfg")["components"]["textcat"]
    assert (cfg["quantize"], cfg["runtime"], cfg["device"]) == ("int8", "onnxruntime", "cpu")
    assert json.loads((copy / "meta.json").read_text())["sllm"]["compression"]["runtime"] == "onnxruntime"
    for name, value in weights(copy).items():  # float32 weights on disk, as for PyTorch int8
        assert value.dtype == np.float32 and np.array_equal(value, weights(source)[name]), name
    reloaded = spacy.load(copy)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & hf_component(reloaded)._model.operators
    fp32 = scores_of(predictions(spacy.load(source), "textcat"))
    int8 = scores_of(predictions(reloaded, "textcat"))
    assert not np.array_equal(int8, fp32) and np.abs(int8 - fp32).max() < 0.05
    # the references, on the same texts: ONNX Runtime's own int8 quantization of transformers' model
    # exported on its own, and PyTorch's dynamic int8 (the other int8 path, within the same noise of fp32)
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = next(source.glob("*/model"))
    raw, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(raw, (), str(tmp_path / "raw.onnx"), kwargs={n: torch.ones(1, 8, dtype=torch.long) for n in names},
                      input_names=names, output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "b", 1: "s"} for n in names})
    quantize_dynamic(str(tmp_path / "raw.onnx"), str(tmp_path / "raw-int8.onnx"), weight_type=QuantType.QInt8,
                     per_channel=True)
    session = ort.InferenceSession(str(tmp_path / "raw-int8.onnx"), providers=["CPUExecutionProvider"])
    labels = [raw.config.id2label[i] for i in range(raw.config.num_labels)]
    torch_int8 = spacy.load(source, config={"components": {"textcat": {"quantize": "int8", "device": "cpu"}}})
    for text in TEXTS:
        feed = {k: v.astype(np.int64) for k, v in tokenizer(text, return_tensors="np").items() if k in names}
        logits = session.run(["logits"], feed)[0][0]
        want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = reloaded(text).cats
        np.testing.assert_allclose([got[label] for label in labels], want, atol=2e-3, err_msg=text)
        pytorch_int8 = torch_int8(text).cats
        assert max(abs(got[label] - pytorch_int8[label]) for label in labels) < 0.05


def test_onnxruntime_setting_is_checked_when_the_component_is_made(ckpts, monkeypatch):
    from spacy_llm_components.models.runtimes import check_runtime

    nlp = spacy.blank("en")
    with pytest.raises(ValueError, match="runtime 'tensorrt': use one of"):
        nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "runtime": "tensorrt"})
    with pytest.raises(ValueError, match="runtime 'onnxruntime' starts from float32 weights"):
        nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "runtime": "onnxruntime",
                                           "dtype": "bfloat16", "device": "cpu"})
    with pytest.raises(ValueError, match="runtime 'onnxruntime' runs on the CPU"):
        check_runtime("onnxruntime", None, torch.device("cuda:0"), torch.float32)
    with pytest.raises(ValueError, match="quantize 'int8' runs on the CPU .* use dtype 'bfloat16'"):
        check_runtime("torch", "int8", torch.device("cuda:0"), torch.float32)  # no silent fallback to fp32
    with pytest.raises(ValueError, match="quantize 'int8' starts from float32 weights"):
        nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "quantize": "int8", "dtype": "bfloat16",
                                           "device": "cpu"})
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the optional package\(s\) onnxruntime: pip install"):
        nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "runtime": "onnxruntime", "device": "cpu"})
    monkeypatch.undo()
    pipe = nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "runtime": "onnxruntime", "device": "cpu"})
    from spacy.training import Example

    doc = nlp.make_doc("good")
    doc.cats = {"neg": 0.0, "pos": 1.0}
    with pytest.raises(ValueError, match="cannot be trained"):
        pipe.update([Example(nlp.make_doc("good"), doc)])


# -- layers ------------------------------------------------------------------------------------------
def test_kept_layers_default_to_every_other_and_check_their_range():
    assert kept_layers(6, DistillConfig()) == [0, 2, 4]
    assert kept_layers(6, DistillConfig(layers=3)) == [0, 2, 4]
    assert kept_layers(12, DistillConfig(layers=4)) == [0, 3, 6, 9]
    assert kept_layers(4, DistillConfig(layers=4)) == [0, 1, 2, 3]
    assert kept_layers(6, DistillConfig(keep="1, 3,5")) == [1, 3, 5]
    for bad, match in ((DistillConfig(layers=0), "--layers 0: the student needs 1 to 6"),
                       (DistillConfig(layers=7), "--layers 7: the student needs 1 to 6"),
                       (DistillConfig(keep="0,6"), "--keep '0,6': the teacher has 6 layers"),
                       (DistillConfig(keep="2,2"), "distinct"), (DistillConfig(keep="a"), "layer indices"),
                       (DistillConfig(layers=2, keep="0,1"), "not both")):
        with pytest.raises(CompressError, match=match):
            kept_layers(6, bad)


def test_keep_layers_copies_the_chosen_layers_embeddings_and_head(tmp_path):
    teacher = BertForTokenClassification.from_pretrained(
        make_ckpt(tmp_path / "t", "ner", num_hidden_layers=4, num_labels=len(NER_TAGS)))
    student = keep_layers(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    assert teacher.config.num_hidden_layers == 4 and len(teacher.bert.encoder.layer) == 4  # untouched
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        source = teacher_weight(name, [1, 3])
        assert torch.equal(value, t[source]), name
    ids = torch.tensor([[101, 7592, 2088, 102]])
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape


@pytest.mark.parametrize("options,kept", [({"keep": "1,3"}, [1, 3]), ({"layers": 2}, [0, 2])])
def test_distilled_student_starts_from_the_teachers_kept_layers(teachers, tmp_path, options, kept):
    """With a learning rate of 0 the student on disk is its initialisation: the teacher's kept layers."""
    parts = teachers["ner"]
    out = tmp_path / "student"
    distill(parts["pipeline"], parts["train"], parts["dev"], out, config(lr=0.0, max_steps=1, eval_steps=1),
            DistillConfig(**options), progress=False)
    teacher, student = weights(parts["pipeline"]), weights(out)
    assert sum(".encoder.layer.0." in n for n in student) > 0
    for name, value in student.items():
        np.testing.assert_array_equal(value, teacher[teacher_weight(name, kept)], err_msg=name)
    assert not any(f".encoder.layer.{len(kept)}." in n for n in student)
    block = json.loads((out / "meta.json").read_text())["sllm"]
    assert block["distillation"]["kept_layers"] == kept and block["distillation"]["teacher_layers"] == 4
    assert block["distillation"]["teacher"] == str(parts["pipeline"].resolve())
    nlp = spacy.load(out)  # an ordinary pipeline of this project, with the teacher's settings
    assert hf_component(nlp).labels == hf_component(spacy.load(parts["pipeline"])).labels
    assert json.loads((out / "ner" / "model" / "config.json").read_text())["num_hidden_layers"] == len(kept)
    assert (out / "metrics.json").is_file() and (out / "training_log.jsonl").is_file()


# -- the student learns the teacher ------------------------------------------------------------------
def _raw_outputs(pipeline: Path, texts, task: str):
    """The raw model's softmax outputs on texts, computed here with transformers (not with the project's
    losses): per piece for NER, per text for textcat, start and end over positions for QA."""
    import transformers

    cls = {"ner": transformers.AutoModelForTokenClassification,
           "textcat": transformers.AutoModelForSequenceClassification,
           "qa": transformers.AutoModelForQuestionAnswering}[task]
    folder = next(pipeline.glob("*/model"))
    model, tok = cls.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    if task == "qa":
        enc = tok([q for q, _ in texts], [c for _, c in texts], return_tensors="pt", padding=True,
                  truncation="only_second", max_length=64)  # the tiny model's limit: a window of each context
    else:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        out = model(**enc)
    mask = enc["attention_mask"].bool()
    if task == "ner":
        return [torch.softmax(out.logits[mask], -1)]
    if task == "textcat":
        return [torch.softmax(out.logits, -1)]
    return [torch.softmax(x.masked_fill(~mask, -1e4), -1) for x in (out.start_logits, out.end_logits)]


def _kl(teacher, student) -> float:
    return float(sum((t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1).mean()
                     for t, s in zip(teacher, student)))


def _training_inputs(train: Path, task: str):
    from spacy_llm_components.tasks import load_docs

    docs = load_docs(task, train, spacy.blank("en")).docs
    if task == "qa":
        return [(qa["question"], doc.text) for doc in docs for qa in doc._.qas]
    return [doc.text for doc in docs]


@pytest.mark.parametrize("task", ["ner", "textcat", "qa"])
def test_student_outputs_track_the_teachers_on_its_training_data(teachers, tmp_path, task):
    parts = teachers[task]
    inputs = _training_inputs(parts["train"], task)
    teacher = _raw_outputs(parts["pipeline"], inputs, task)
    settings = DistillConfig(layers=1, alpha=1.0, temperature=1.0)
    distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / "init", config(lr=0.0, max_steps=1),
            settings, progress=False)
    distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / "trained",
            config(lr=3e-3, max_steps=30, eval_steps=30), settings, progress=False)
    distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / "gold", config(lr=3e-3, max_steps=30,
            eval_steps=30), DistillConfig(layers=1, alpha=0.0, temperature=1.0), progress=False)  # the control
    before = _kl(teacher, _raw_outputs(tmp_path / "init", inputs, task))
    after = _kl(teacher, _raw_outputs(tmp_path / "trained", inputs, task))
    gold_only = _kl(teacher, _raw_outputs(tmp_path / "gold", inputs, task))
    assert before > 1e-5 and after < 0.5 * before, (before, after)
    assert after < 0.8 * gold_only, (after, gold_only)  # the teacher's outputs, not the gold labels, did that


def test_unlabelled_corpus_adds_rows_the_teacher_labels(teachers, tmp_path):
    """Every corpus text becomes training rows: one step over one batch of everything trains on exactly
    the corpus's word pieces more than without it."""
    parts = teachers["ner"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    pieces = {}
    for name, extra in (("plain", None), ("corpus", str(corpus))):
        result = distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / name,
                         config(max_steps=1, eval_steps=1, batch_size=512), DistillConfig(layers=2, corpus=extra),
                         progress=False)
        pieces[name] = result.training["word_pieces"]
    tok = hf_component(spacy.load(parts["pipeline"])).checkpoint.tokenizer
    assert pieces["corpus"] - pieces["plain"] == sum(len(ids) for ids in tok(TEXTS)["input_ids"])
    block = json.loads((tmp_path / "corpus" / "meta.json").read_text())["sllm"]
    assert block["distillation"]["corpus"] == str(corpus) and block["corpus_sha256"]


@pytest.mark.parametrize("task,multi_label", [("ner", False), ("textcat", False), ("textcat", True), ("qa", False)])
def test_distillation_losses_match_torch_references(task, multi_label):
    """The KL term (T^2-scaled) and the gold term of each task against torch's own kl_div, cross_entropy
    and a Bernoulli KL written out; rows with gold 0 (corpus text) are left out of the gold term only."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from spacy_llm_components.tasks import task_spec

    spec, T, pipe = task_spec(task), 2.0, SimpleNamespace(multi_label=multi_label)
    torch.manual_seed(0)
    gold = torch.tensor([1, 0, 1])
    kl = lambda s, t: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,  # noqa: E731
                               reduction="batchmean") * T * T
    if task == "ner":
        s, t = SimpleNamespace(logits=torch.randn(3, 5, 4)), SimpleNamespace(logits=torch.randn(3, 5, 4))
        labels = torch.randint(0, 4, (3, 5))
        labels[:, 0] = labels[1, 2] = -100
        batch = {"labels": labels, "gold": gold}
        mask = labels != -100
        soft, gold_labels = kl(s.logits[mask], t.logits[mask]), labels.clone()
        gold_labels[1] = -100
        hard = F.cross_entropy(s.logits.reshape(-1, 4), gold_labels.reshape(-1), ignore_index=-100)
    elif task == "textcat" and not multi_label:
        s, t = SimpleNamespace(logits=torch.randn(3, 4)), SimpleNamespace(logits=torch.randn(3, 4))
        batch = {"labels": torch.tensor([0, 3, 2]), "gold": gold}
        soft, hard = kl(s.logits, t.logits), F.cross_entropy(s.logits[[0, 2]], torch.tensor([0, 2]))
    elif task == "textcat":
        s, t = SimpleNamespace(logits=torch.randn(3, 4)), SimpleNamespace(logits=torch.randn(3, 4))
        labels = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
        batch = {"labels": labels, "gold": gold}
        p, q = torch.sigmoid(t.logits / T), torch.sigmoid(s.logits / T)
        soft = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean() * T * T
        hard = F.binary_cross_entropy(torch.sigmoid(s.logits[[0, 2]]), labels[[0, 2]].float())
    else:
        s = SimpleNamespace(start_logits=torch.randn(3, 6), end_logits=torch.randn(3, 6))
        t = SimpleNamespace(start_logits=torch.randn(3, 6), end_logits=torch.randn(3, 6))
        lengths = [6, 4, 5]
        batch = {"attention_mask": torch.tensor([[1] * n + [0] * (6 - n) for n in lengths]), "gold": gold,
                 "start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([2, 2, 4])}
        soft = sum(sum(kl(getattr(s, k)[i, :n][None], getattr(t, k)[i, :n][None]) for i, n in enumerate(lengths)) / 3
                   for k in ("start_logits", "end_logits")) / 2
        hard = (F.cross_entropy(s.start_logits[[0, 2]], torch.tensor([1, 3]))
                + F.cross_entropy(s.end_logits[[0, 2]], torch.tensor([2, 4]))) / 2
    assert float(spec.soft_loss(s, t, batch, T, pipe)) == pytest.approx(float(soft), rel=1e-4)
    assert float(spec.gold_loss(s, batch, pipe)) == pytest.approx(float(hard), rel=1e-4)
    assert float(spec.soft_loss(s, s, batch, T, pipe)) == pytest.approx(0.0, abs=1e-6)


# -- resume ------------------------------------------------------------------------------------------
class _Interrupt(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_distillation_resumes_to_the_uninterrupted_weights(teachers, tmp_path, trainer_steps):
    parts = teachers["ner"]
    settings = config(max_steps=6, eval_steps=2, batch_size=4, warmup_ratio=0.5)  # (a learning rate that moves)
    distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / "straight", settings, DistillConfig(layers=2),
            progress=False)
    straight_steps = list(trainer_steps)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        distill(parts["pipeline"], parts["train"], parts["dev"], out, settings, DistillConfig(layers=2),
                progress=False, callbacks=[_Interrupt(3)])
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and not (out / "meta.json").exists()
    with pytest.raises(FinetuneError, match="interrupted run"):
        distill(parts["pipeline"], parts["train"], parts["dev"], out, settings, DistillConfig(layers=2), progress=False)
    with pytest.raises(FinetuneError, match="another kept"):  # another student cannot continue these checkpoints
        distill(parts["pipeline"], parts["train"], parts["dev"], out, settings, DistillConfig(keep="1,3"),
                resume=True, progress=False)
    with pytest.raises(FinetuneError, match="another distill_loss"):  # nor another loss
        distill(parts["pipeline"], parts["train"], parts["dev"], out, settings, DistillConfig(layers=2, alpha=0.9),
                resume=True, progress=False)
    trainer_steps.clear()
    result = distill(parts["pipeline"], parts["train"], parts["dev"], out, settings, DistillConfig(layers=2),
                     resume=True, progress=False)
    assert result.steps == 6 and result.resumed_from == 2
    assert_same_steps(trainer_steps, straight_steps[2:])  # only steps 3 to 6 ran, at their learning rates
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_distillation_input_fails_before_writing(teachers, tmp_path, monkeypatch):
    ner, textcat = teachers["ner"], teachers["textcat"]
    other = tmp_path / "other.conll"
    other.write_text("Lena B-MISC\nHartmann I-MISC\nsang O\n\nTomas B-MISC\nsang O\n")
    mismatched = prepare("ner", [other], tmp_path / "mismatched", dev=other)
    textcat_train, textcat_dev, _ = demo_files("textcat")
    multi = prepare("textcat", [textcat_train], tmp_path / "multi", dev=textcat_dev, multi_label=True)
    plain = tmp_path / "plain"
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.to_disk(plain)
    cases = [
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(layers=0), CompressError, "--layers 0"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(layers=5), CompressError, "the teacher has 4"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(keep="0,4"), CompressError, "--keep '0,4'"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(keep="-1,2"), CompressError, "--keep '-1,2'"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(keep="2,0"), CompressError, "increasing order"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(keep="1,1"), CompressError, "distinct"),
        (textcat["pipeline"], multi.train, multi.dev, DistillConfig(), DataError,
         "the teacher is single-label, the data is multi-label"),
        (ner["pipeline"], mismatched.train, mismatched.dev, DistillConfig(), DataError,
         r"labels.json: the teacher's labels \[.*\] differ from the data's \['MISC'\]"),
        (ner["pipeline"], textcat["train"], textcat["dev"], DistillConfig(), DataError, "prepared for 'textcat'"),
        (plain, ner["train"], ner["dev"], DistillConfig(), CompressError, "no hf_textcat, hf_ner or hf_qa"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(alpha=1.5), CompressError, "--alpha"),
        (ner["pipeline"], ner["train"], ner["dev"], DistillConfig(corpus=str(tmp_path / "none.jsonl")), DataError,
         "none.jsonl: file does not exist"),
    ]
    for teacher, train, dev, settings, error, match in cases:
        with pytest.raises(error, match=match):
            distill(teacher, train, dev, tmp_path / "out", config(), settings, progress=False)
        assert not (tmp_path / "out").exists(), match
    with pytest.raises(CompressError, match="apart from its source"):  # replacing the folder would delete it
        distill(ner["pipeline"], ner["train"], ner["dev"], ner["pipeline"].parent, config(), progress=False)
    assert (ner["pipeline"] / "config.cfg").is_file()
    result = CliRunner().invoke(app, ["distill", str(ner["pipeline"]), "--train", str(ner["train"]), "--dev",
                                      str(ner["dev"]), "-o", str(tmp_path / "out"), "--layers", "9", "--no-track"])
    assert result.exit_code == 2 and "--layers 9: the student needs 1 to 4 layers" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["distill", str(ner["pipeline"]), "--train", str(ner["train"]), "--dev",
                                      str(ner["dev"]), "-o", str(tmp_path / "out"), "--heads-sampling", "temperature",
                                      "--no-track"])
    assert result.exit_code == 2 and "this teacher has one head" in result.output and not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["distill", str(ner["pipeline"]), "--train", str(ner["train"]), "--train",
                                      str(ner["train"]), "--dev", str(ner["dev"]), "-o", str(tmp_path / "out"),
                                      "--no-track"])
    assert result.exit_code == 2 and "one head takes one --train file; got 2" in result.output
    with monkeypatch.context() as m:  # --gpu-id is honoured: a GPU the machine lacks is named (whatever it has)
        m.setattr(torch.cuda, "is_available", lambda: False)
        result = CliRunner().invoke(app, ["distill", str(ner["pipeline"]), "--train", str(ner["train"]), "--dev",
                                          str(ner["dev"]), "-o", str(tmp_path / "out"), "--gpu-id", "0", "--no-track"])
        assert result.exit_code == 2 and "device 'cuda:0': no CUDA device" in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_distill_command_writes_a_student(teachers, tmp_path):
    parts = teachers["textcat"]
    result = CliRunner().invoke(app, ["distill", str(parts["pipeline"]), "--train", str(parts["train"]), "--dev",
                                      str(parts["dev"]), "-o", str(tmp_path / "student"), "--keep", "0,3",
                                      "--max-steps", "2", "--device", "cpu", "--no-track", "--alpha", "0.7",
                                      "--temperature", "3"])
    assert result.exit_code == 0, result.output
    assert "distilled textcat in" in result.output
    block = json.loads((tmp_path / "student" / "meta.json").read_text())["sllm"]["distillation"]
    assert (block["kept_layers"], block["alpha"], block["temperature"]) == ([0, 3], 0.7, 3.0)


# -- speed in evaluation -----------------------------------------------------------------------------
def test_evaluation_reports_word_pieces_per_second(teachers, tmp_path):
    from spacy_llm_components.stages.evaluate import evaluate

    parts = teachers["qa"]
    result = evaluate(parts["pipeline"], parts["test"])
    nlp = spacy.load(parts["pipeline"])
    tok = hf_component(nlp).checkpoint.tokenizer
    from spacy_llm_components.tasks import load_docs

    docs = load_docs("qa", parts["test"], nlp).docs
    texts = [d.text for d in docs] + [qa["question"] for d in docs for qa in d._.qas]
    expected = sum(len(tok.tokenize(t)) for t in texts)  # the slow path, text by text
    st = result.statistics
    assert st["word_pieces"] == expected > st["words"] > 0
    # `seconds` is reported to the millisecond, the rate from the unrounded time
    assert expected / (st["seconds"] + 0.0005) - 0.1 <= st["word_pieces_per_second"] <= \
        expected / max(st["seconds"] - 0.0005, 1e-9) + 0.1


def test_run_refuses_an_unknown_compression_method_before_any_step(tmp_path):
    train = demo_files("ner")[0]
    result = CliRunner().invoke(app, ["run", "ner", "--train", str(train), "--name", "x", "--workdir",
                                      str(tmp_path / "w"), "--compress", "int8,int4"])
    assert result.exit_code == 2 and "use one or more of int8, distill" in result.output
    assert not (tmp_path / "w").exists()

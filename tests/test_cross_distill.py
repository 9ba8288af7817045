"""Distillation across tokenizers (`sllm distill TEACHER --student-base FOLDER`): a RoBERTa teacher (a
byte-level BPE trained here) into a BERT student (WordPiece) of another width. References: a hand-made
alignment of two tokenizations, the raw Hugging Face teacher's logits looked up character by character,
and the agreement of an untrained student with the teacher."""

import json

import numpy as np
import pytest
import spacy
import torch
from conftest import demo_files
from families import make_checkpoint
from transformers import AutoModelForTokenClassification, AutoTokenizer
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.pipeline import build_pipeline, hf_component
from spacy_llm_components.core.align import align_words
from spacy_llm_components.core.decode import LabelSchemeError, tag_transfer, tags_for_types
from spacy_llm_components.stages.compress import CompressError
from spacy_llm_components.stages.compress.distill import DistillConfig, distill
from spacy_llm_components.stages.finetune import finetune
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.training import FinetuneConfig
from spacy_llm_components.tasks import load_docs


def config(**kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"device": "cpu", "batch_size": 8, "max_steps": 4, "eval_steps": 4, "lr": 1e-3,
                             "warmup_ratio": 0.0, **kwargs})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """NER and textcat teachers on RoBERTa (byte-level BPE) with the demo data's labels, random heads of
    large weights (confident, varied decisions no gold label explains: a student can only learn them from
    the teacher), and a BERT base (WordPiece, another vocabulary and width) for the students."""
    root = tmp_path_factory.mktemp("cross")
    make_checkpoint(root / "roberta", "roberta", "base", seed=1)
    student_base = make_checkpoint(root / "bert", "bert", "base", seed=2)
    out = {"student_base": student_base, "root": root}
    for task in ("ner", "textcat"):
        train, dev, _ = demo_files(task)
        prepared = prepare(task, [train], root / task / "corpus", dev=dev)
        labels = json.loads((prepared.output / "labels.json").read_text())["labels"]
        ckpt = make_checkpoint(root / task / "ckpt", "roberta", task,
                               tags_for_types(labels) if task == "ner" else labels, seed=3)
        build_pipeline(task, ckpt, settings={"device": "cpu"}).to_disk(root / task / "teacher")
        out[task] = {"pipeline": root / task / "teacher", "train": prepared.train, "dev": prepared.dev}
    return out


def test_align_words_by_hand():
    # text: "New-York is big , ok"; the teacher reads "New-York" as one word and has no word for ","
    teacher_start, teacher_end = np.array([0, 9, 12, 18]), np.array([8, 11, 15, 20])
    student = np.array([0, 3, 4, 9, 12, 16, 18])  # New, -, York, is, big, ",", ok
    at, continues = align_words(student, teacher_start, teacher_end)
    assert at.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert continues.tolist() == [False, True, True, False, False, False, False]
    at, continues = align_words(np.array([0, 2]), np.array([2]), np.array([4]))  # a word before the teacher's first
    assert at.tolist() == [0, 0] and continues.tolist() == [False, False]
    with pytest.raises(ValueError, match="no words"):
        align_words(np.array([0]), np.array([], dtype=int), np.array([], dtype=int))


def test_tag_transfer_moves_an_entity_start_inside_a_word_to_its_continuation():
    teacher = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    student = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # the same tags in another order
    start, inside = tag_transfer(teacher, student)
    p = np.array([[0.1, 0.6, 0.1, 0.15, 0.05]])
    assert (p @ start)[0].tolist() == pytest.approx([0.1, 0.15, 0.05, 0.6, 0.1])
    assert (p @ inside)[0].tolist() == pytest.approx([0.1, 0.0, 0.2, 0.0, 0.7])  # B-X + I-X -> I-X
    with pytest.raises(LabelSchemeError, match="differ"):
        tag_transfer(teacher, ["O", "B-PER", "I-PER"])


def test_ner_targets_are_the_teachers_logits_at_the_word_each_student_word_starts_in(setup):
    """Each student word's target is log_softmax of the raw HF teacher's logits at the first piece of the
    teacher word holding the student word's first character (found here by a loop over characters)."""
    parts = setup["ner"]
    teacher = hf_component(spacy.load(parts["pipeline"]))
    student = hf_component(spacy.load(_student(setup, "ner", tmp=setup["root"] / "ner-student-init")))
    texts = ["Lena Hartmann-Veldt joined Brightwater Foods in Lindenfeld.", "Tomas Ekdahl's mill, in Ostbrook!"]
    docs = [spacy.blank("en")(t) for t in texts]
    features = student.distillation_features(docs, teacher)
    assert len(features) == len(texts)  # short texts: one window each
    raw = AutoModelForTokenClassification.from_pretrained(setup["root"] / "ner" / "ckpt").eval()
    t_tok = AutoTokenizer.from_pretrained(setup["root"] / "ner" / "ckpt")
    s_tok = student.checkpoint.tokenizer
    order = [teacher.tags.index(tag) for tag in student.tags]
    continued = 0
    for text, feature in zip(texts, features):
        t_enc = t_tok(text, return_offsets_mapping=True)
        with torch.no_grad():
            logits = torch.log_softmax(raw(input_ids=torch.tensor([t_enc["input_ids"]])).logits[0], -1).numpy()
        word_ids, offsets = t_enc.word_ids(), t_enc["offset_mapping"]
        first_piece = {}
        for i, w in enumerate(word_ids):
            if w is not None:
                first_piece.setdefault(w, i)
        spans = {}
        for i, w in enumerate(word_ids):
            if w is not None:
                s, e = spans.get(w, (offsets[i][0], offsets[i][1]))
                spans[w] = (min(s, offsets[i][0]), max(e, offsets[i][1]))
        s_enc = s_tok(text, return_offsets_mapping=True)
        seen = set()
        checked = 0
        for position, (w, (start, _)) in enumerate(zip(s_enc.word_ids(), s_enc["offset_mapping"])):
            if w is None or w in seen:
                continue
            seen.add(w)
            owner = next(t for t in sorted(spans) if spans[t][0] <= start < spans[t][1])
            want = logits[first_piece[owner]][order]
            if spans[owner][0] < start:  # inside the teacher's word: B-X moved to I-X
                continued += 1
                p = np.exp(want)
                moved = p.copy()
                for j, tag in enumerate(student.tags):
                    if tag.startswith("B-"):
                        moved[student.tags.index("I-" + tag[2:])] += p[j]
                        moved[j] = 0.0
                want = np.log(moved + 1e-8)
            assert feature["labels"][position] != -100
            np.testing.assert_allclose(feature["teacher_logits"][position], want, atol=1e-4)
            checked += 1
        assert checked == len(seen) > 5
        unlabelled = np.array(feature["labels"]) == -100
        assert not np.asarray(feature["teacher_logits"])[unlabelled].any()
    assert continued >= 1  # the hand-made case of a word the tokenizers split differently ran


def _student(setup, task, *, tmp, steps=1, lr=0.0, alpha=1.0, corpus=None):
    parts = setup[task]
    distill(parts["pipeline"], parts["train"], parts["dev"], tmp, config(max_steps=steps, eval_steps=steps, lr=lr),
            DistillConfig(student_base=str(setup["student_base"]), alpha=alpha, temperature=1.0, corpus=corpus),
            progress=False)
    return tmp


def _agreement(task, teacher, student, texts):
    """Minus the mean KL(teacher || student): NER per word both tokenizers read as the same characters
    (matched here by their character spans, not by the alignment under test), textcat per doc."""
    a, b = spacy.load(teacher), spacy.load(student)
    if task == "ner":
        pa, pb = hf_component(a), hf_component(b)
        docs = [a.make_doc(t) for t in texts]
        (tw, tlp, _), (sw, slp, _) = pa.word_tag_log_probs(docs), pb.word_tag_log_probs(docs)
        order = [pa.tags.index(tag) for tag in pb.tags]
        kls = []
        for d in range(len(docs)):
            words = {(int(tw.start[i]), int(tw.end[i])): i for i in range(tw.bounds[d], tw.bounds[d + 1])}
            for j in range(sw.bounds[d], sw.bounds[d + 1]):
                i = words.get((int(sw.start[j]), int(sw.end[j])))
                if i is not None:
                    p = np.exp(tlp[i][order])
                    kls.append(float(np.sum(p * (tlp[i][order] - slp[j]))))
        assert len(kls) > 50  # most words are read alike
        return -float(np.mean(kls))
    pa = np.array([[d.cats[k] for k in sorted(d.cats)] for d in a.pipe(texts)])
    pb = np.array([[d.cats[k] for k in sorted(d.cats)] for d in b.pipe(texts)])
    return -float(np.mean(np.sum(pa * (np.log(pa) - np.log(pb)), axis=1)))  # minus KL(teacher || student)


@pytest.mark.parametrize("task", ["ner", "textcat"])
def test_students_agreement_with_the_teacher_rises_above_an_untrained_students(setup, tmp_path, task):
    parts = setup[task]
    texts = [d.text for d in load_docs(task, parts["train"], spacy.blank("en")).docs]
    untrained = _agreement(task, parts["pipeline"], _student(setup, task, tmp=tmp_path / "init"), texts)
    trained = _agreement(task, parts["pipeline"], _student(setup, task, tmp=tmp_path / "trained", steps=40, lr=3e-3),
                         texts)
    gold = _agreement(task, parts["pipeline"], _student(setup, task, tmp=tmp_path / "gold", steps=40, lr=3e-3,
                                                        alpha=0.0), texts)  # the control: the labels alone
    assert trained > 0.5 * untrained, (untrained, trained)  # (minus) the KL at least halved
    assert trained > gold, (trained, gold)  # the teacher's outputs, not the gold labels, did that
    student = spacy.load(tmp_path / "trained")
    pipe = hf_component(student)
    assert pipe.checkpoint.tokenizer.__class__.__name__.startswith("Bert")  # its own tokenizer
    block = json.loads((tmp_path / "trained" / "meta.json").read_text())["sllm"]
    assert block["distillation"]["student_base"] == str(setup["student_base"])
    assert block["distillation"]["teacher"] == str(parts["pipeline"]) and block["distillation"]["across_tokenizers"]
    assert block["base_model"] == str(setup["student_base"]) and block["compression"]["method"] == "distill"


def test_the_unlabelled_corpus_reaches_the_cross_tokenizer_student(setup, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = ["Marta Veldt opened a bakery in Ostbrook.", "Nothing happened here."]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pieces = {}
    for name, extra in (("plain", None), ("corpus", str(corpus))):
        parts = setup["ner"]
        result = distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / name,
                         config(max_steps=1, eval_steps=1, batch_size=512),
                         DistillConfig(student_base=str(setup["student_base"]), corpus=extra), progress=False)
        pieces[name] = result.training["word_pieces"]
    tok = AutoTokenizer.from_pretrained(setup["student_base"])
    assert pieces["corpus"] - pieces["plain"] == sum(len(ids) for ids in tok(texts)["input_ids"])


def test_bad_cross_tokenizer_input_fails_before_writing(setup, tmp_path):
    parts = setup["ner"]
    base = str(setup["student_base"])
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((setup["student_base"] / "config.json").read_text())
    cases = [
        (DistillConfig(student_base=str(tmp_path / "missing")), "does not exist"),
        (DistillConfig(student_base=str(parts["pipeline"])), "a spaCy pipeline, not an encoder"),
        (DistillConfig(student_base=str(tmp_path)), "not an encoder checkpoint.*no config.json"),
        (DistillConfig(student_base=str(weightless)), "no safetensors weights"),
        (DistillConfig(student_base=base, layers=1), "--layers / --keep"),
    ]
    for i, (settings, message) in enumerate(cases):
        with pytest.raises(CompressError, match=message):
            distill(parts["pipeline"], parts["train"], parts["dev"], tmp_path / f"out-{i}", config(), settings,
                    progress=False)
    textcat = setup["textcat"]  # a teacher of another task than the data
    with pytest.raises(ValueError, match="textcat|ner"):
        distill(textcat["pipeline"], parts["train"], parts["dev"], tmp_path / "out-task", config(),
                DistillConfig(student_base=base), progress=False)
    qa_train, qa_dev, _ = demo_files("qa")
    prepared = prepare("qa", [qa_train], tmp_path / "qa-corpus", dev=qa_dev)
    finetune("qa", prepared.train, prepared.dev, tmp_path / "qa-teacher", config(base_model=str(setup["root"] / "roberta"),
             max_steps=1, eval_steps=1), progress=False)
    with pytest.raises(CompressError, match="not supported"):
        distill(tmp_path / "qa-teacher", prepared.train, prepared.dev, tmp_path / "out-qa", config(),
                DistillConfig(student_base=base), progress=False)
    written = [p.name for p in tmp_path.iterdir() if p.name.startswith("out-")]
    assert not written, written


def test_distill_command_takes_a_student_base(setup, tmp_path):
    parts = setup["textcat"]
    result = CliRunner().invoke(app, ["distill", str(parts["pipeline"]), "--train", str(parts["train"]), "--dev",
                                      str(parts["dev"]), "-o", str(tmp_path / "student"), "--student-base",
                                      str(setup["student_base"]), "--max-steps", "2", "--eval-steps", "2",
                                      "--no-track", "--gpu-id", "-1"])
    assert result.exit_code == 0, result.output
    assert hf_component(spacy.load(tmp_path / "student")).checkpoint.encoder.model.config.model_type == "bert"
    bad = CliRunner().invoke(app, ["distill", str(parts["pipeline"]), "--train", str(parts["train"]), "--dev",
                                   str(parts["dev"]), "-o", str(tmp_path / "bad"), "--student-base",
                                   str(parts["pipeline"]), "--no-track"])
    assert bad.exit_code == 2 and "not an encoder" in bad.output and not (tmp_path / "bad").exists()


def test_model_card_names_the_teacher_of_a_cross_tokenizer_student():
    from spacy_llm_components.core.cards import model_card

    info = {"task": "ner", "labels": ["PER"], "base_model": "/m/minilm",
            "distillation": {"teacher": "models:/big/3", "teacher_base": "/m/mpnet", "student_base": "/m/minilm",
                             "across_tokenizers": True, "alpha": 0.5, "temperature": 2.0}}
    card = model_card("small", "1", info, None, {})
    assert "- **Distilled from**: `models:/big/3` (base `/m/mpnet`) into `/m/minilm` (its own tokenizer)" in card


def test_a_student_tags_in_its_teachers_scheme(setup, tmp_path):
    parts = setup["ner"]
    labels = json.loads((parts["train"].parent / "labels.json").read_text())["labels"]
    ckpt = make_checkpoint(tmp_path / "bioes", "roberta", "ner", tags_for_types(labels, "BIOES"), seed=5)
    build_pipeline("ner", ckpt, settings={"device": "cpu"}).to_disk(tmp_path / "teacher")
    distill(tmp_path / "teacher", parts["train"], parts["dev"], tmp_path / "student", config(max_steps=1, eval_steps=1),
            DistillConfig(student_base=str(setup["student_base"])), progress=False)
    student = hf_component(spacy.load(tmp_path / "student"))
    assert student.scheme == "BIOES" and sorted(student.tags) == sorted(tags_for_types(labels, "BIOES"))

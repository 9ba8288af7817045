"""Training features (same code path as inference) and fine-tuning with the HF Trainer on tiny checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import spacy
from conftest import assert_same_steps
from safetensors.numpy import load_file
from test_ner import raw_entities
from transformers import AutoTokenizer, TrainerCallback

from spacy_llm_components.components.pipeline import build_pipeline, hf_component
from spacy_llm_components.stages.finetune import FinetuneError, finetune
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.trainer import last_complete_checkpoint
from spacy_llm_components.stages.shared.training import FinetuneConfig

NER_TRAIN = "".join(
    f"{name} B-PER\n{surname} I-PER\nvisited O\n{city} B-LOC\n. O\n\n"
    for name, surname, city in [("Angela", "Merkel", "Paris"), ("John", "Smith", "Berlin"), ("Mary", "Jones", "Rome"),
                                ("Peter", "Brown", "Madrid"), ("Anna", "Schmidt", "Vienna"), ("Tom", "Miller", "Oslo")]
)


def tiny_config(**kwargs) -> FinetuneConfig:
    defaults = dict(max_steps=4, eval_steps=2, batch_size=4, lr=1e-3, device="cpu", warmup_ratio=0.0)
    return FinetuneConfig(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner-data")
    (root / "train.conll").write_text(NER_TRAIN)
    (root / "dev.conll").write_text("Angela B-PER\nMerkel I-PER\nvisited O\nRome B-LOC\n")
    return prepare("ner", root / "train.conll", root / "prepared", dev=root / "dev.conll")


# -- features --------------------------------------------------------------------------------------
def test_ner_features_label_first_piece_of_each_word(ckpts):
    nlp = build_pipeline("ner", str(ckpts["base"]), settings={"labels": ["PER", "LOC"], "device": "cpu"})
    pipe = hf_component(nlp)
    doc = nlp.make_doc("Schwarzenegger visited Paris")
    doc.ents = [doc.char_span(0, 14, "PER"), doc.char_span(23, 28, "LOC")]
    (feature,) = pipe.features([doc])
    tok = pipe.checkpoint.tokenizer
    pieces = tok.convert_ids_to_tokens(feature["input_ids"])
    tags = {p: pipe.tags[label] for p, label in zip(pieces, feature["labels"]) if label != -100}
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and feature["labels"][0] == feature["labels"][-1] == -100
    first = tok.tokenize("Schwarzenegger")
    assert len(first) > 1 and tags == {first[0]: "B-PER", "visited": "O", "paris": "B-LOC"}
    assert sum(label != -100 for label in feature["labels"]) == 3  # continuation pieces are ignored


def test_ner_features_window_long_docs_like_predict(ckpts):
    """Training features of a long doc are the windows inference runs (the same pieces, between [CLS] and
    [SEP]), and each window labels the first piece of every word it holds with the word's gold tag, and
    nothing else: checked against the raw tokenizer and the window rule, for every window."""
    from spacy.tokens import Span

    from spacy_llm_components.core.align import window_spans

    nlp = build_pipeline("ner", str(ckpts["base"]), settings={"labels": ["PER"], "device": "cpu"})
    pipe = hf_component(nlp)
    words = (["word"] * 9 + ["Schwarzenegger", "Arnold"]) * 12  # 132 words, the names in several pieces
    doc = spacy.tokens.Doc(nlp.vocab, words=words)
    doc.ents = [Span(doc, i, i + 2, "PER") for i in range(9, len(words), 11)]
    tok = AutoTokenizer.from_pretrained(ckpts["base"])
    encoded = tok(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, word_of = encoded["input_ids"], encoded.word_ids()
    tag_ids = {tag: i for i, tag in enumerate(pipe.tags)}
    gold = {}  # the tag of each piece that starts a word
    for k, w in enumerate(word_of):
        if k == 0 or word_of[k - 1] != w:
            token = doc[w]
            gold[k] = tag_ids["O" if not token.ent_type_ else f"{'B' if token.ent_iob_ == 'B' else 'I'}-PER"]
    windows = window_spans(len(ids), 64 - 2, pipe.stride)
    features = pipe.features([doc])
    assert len(ids) > len(words) and len(features) == len(windows) > 3
    for feature, (start, end) in zip(features, windows):
        assert feature["input_ids"] == [tok.cls_token_id, *ids[start:end], tok.sep_token_id]
        assert feature["labels"] == [-100, *(gold.get(k, -100) for k in range(start, end)), -100]
    assert {tag_ids["B-PER"], tag_ids["I-PER"], tag_ids["O"]} <= {label for f in features for label in f["labels"]}


def test_qa_features_point_at_the_answer(ckpts):
    nlp = build_pipeline("qa", str(ckpts["qa"]), settings={"device": "cpu"})
    pipe = hf_component(nlp)
    context = "The tower is in Paris and the river is the Seine."
    doc = nlp.make_doc(context)
    doc._.qas = [{"id": "1", "question": "Where is the tower?", "answers": [{"text": "Paris", "start": 16}],
                  "is_impossible": False},
                 {"id": "2", "question": "Who?", "answers": [], "is_impossible": True}]
    answerable, impossible = pipe.features([doc])
    tok = pipe.checkpoint.tokenizer
    span = answerable["input_ids"][answerable["start_positions"] : answerable["end_positions"] + 1]
    assert tok.decode(span) == "paris"
    assert (impossible["start_positions"], impossible["end_positions"]) == (0, 0)


def test_textcat_features(ckpts):
    nlp = build_pipeline("textcat", str(ckpts["base"]), settings={"labels": ["neg", "pos"], "device": "cpu"})
    doc = nlp.make_doc("great film")
    doc.cats = {"neg": 0.0, "pos": 1.0}
    (feature,) = hf_component(nlp).features([doc])
    assert feature["labels"] == 1
    doc.cats = {"neg": 1.0}
    with pytest.raises(ValueError, match=r"doc.cats lacks labels \['pos'\]"):
        hf_component(nlp).features([doc])


# -- fine-tuning -----------------------------------------------------------------------------------
def test_finetune_saves_a_loadable_pipeline(ner_data, ckpts, tmp_path):
    out = tmp_path / "model"
    result = finetune("ner", ner_data.train, ner_data.dev, out, tiny_config(base_model=str(ckpts["base"])),
                      progress=False)
    assert result.steps == 4
    # 6 sentences, batch 4: 2 batches an epoch, so 4 steps see every sentence twice (padding not counted)
    tok = AutoTokenizer.from_pretrained(ckpts["base"])
    sentences = [" ".join(line.split()[0] for line in block.splitlines()) for block in NER_TRAIN.strip().split("\n\n")]
    assert result.training["word_pieces"] == 2 * sum(len(tok(s)["input_ids"]) for s in sentences)
    assert not (out / "checkpoints").exists()  # removed after a finished run
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_ents_f" in e]
    assert [e["step"] for e in evals] == [2, 4] and any("loss" in e for e in log)
    best = max(evals, key=lambda e: e["eval_ents_f"])  # the first of equals: a tie does not replace the best
    assert result.best_step == best["step"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary"] == "ents_f" and metrics["dev"]["ents_f"] == best["eval_ents_f"]
    assert metrics["best_step"] == best["step"] and metrics["training"]["word_pieces_per_second"] > 0
    nlp = spacy.load(out)
    assert nlp.pipe_names == ["ner"] and hf_component(nlp).labels == ["LOC", "PER"]
    assert nlp.meta["sllm"]["base_model"] == str(ckpts["base"])
    text = "Angela Merkel visited Paris ."  # the saved pipeline predicts what its saved checkpoint does
    assert [(e.start_char, e.end_char, e.label_) for e in nlp(text).ents] == raw_entities(out / "ner" / "model", text)


class _Interrupt(TrainerCallback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt  # what Ctrl-C does mid-training


def _weights(folder: Path) -> dict:
    return load_file(str(next((folder / "ner" / "model").glob("*.safetensors"))))


def test_resume_after_interruption_matches_uninterrupted_run(ner_data, ckpts, tmp_path, trainer_steps):
    """A resumed run executes only the steps after its checkpoint, at the learning rates the uninterrupted
    run had there (the scheduler's state), and ends at its weights (the optimizer's state, the data order)."""
    # 6 sentences, batch 4: 2 steps per epoch; checkpoint-3 lies in the middle of the second epoch
    config = tiny_config(base_model=str(ckpts["base"]), max_steps=7, eval_steps=3)
    finetune("ner", ner_data.train, ner_data.dev, tmp_path / "straight", config, progress=False)
    straight_steps = list(trainer_steps)
    assert [step for step, _ in straight_steps] == list(range(1, 8))
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune("ner", ner_data.train, ner_data.dev, out, config, progress=False, callbacks=[_Interrupt(5)])
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    (out / "checkpoints" / "checkpoint-4").mkdir()  # as if killed while saving: no trainer_state.json
    assert last_complete_checkpoint(out / "checkpoints").endswith("checkpoint-3")
    with pytest.raises(FinetuneError, match="holds an interrupted run .* pass --resume"):
        finetune("ner", ner_data.train, ner_data.dev, out, config, progress=False)
    trainer_steps.clear()
    result = finetune("ner", ner_data.train, ner_data.dev, out, config, resume=True, progress=False)
    assert result.steps == 7
    assert_same_steps(trainer_steps, straight_steps[3:])  # steps 4 to 7 only, at their learning rates
    straight, resumed = _weights(tmp_path / "straight"), _weights(out)
    for name in straight:
        np.testing.assert_allclose(resumed[name], straight[name], rtol=1e-5, atol=1e-6, err_msg=name)
    steps = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # entries after the checkpoint were dropped, then logged again once


def test_resume_refuses_other_data(ner_data, ckpts, tmp_path):
    config = tiny_config(base_model=str(ckpts["base"]), max_steps=6)
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        finetune("ner", ner_data.train, ner_data.dev, out, config, progress=False, callbacks=[_Interrupt(3)])
    other = prepare("ner", ner_data.output / "../train.conll", tmp_path / "other", dev_fraction=0.5, seed=3)
    with pytest.raises(FinetuneError, match="another train"):
        finetune("ner", other.train, ner_data.dev, out, config, resume=True, progress=False)


@pytest.mark.parametrize("task", ["textcat", "qa"])
def test_textcat_and_qa_learn_a_learnable_toy_set(ckpts, tmp_path, task):
    """The loss falls and the dev score ends above a constant predictor's (textcat: the majority class,
    0.5; QA: no answer, F1 0): fine-tuning trains the head and the encoder, not only runs."""
    if task == "textcat":
        rows = "".join(f"{'good great fine' if i % 2 else 'bad awful poor'} {i},{'pos' if i % 2 else 'neg'}\n"
                       for i in range(20))
        (tmp_path / "t.csv").write_text("text,label\n" + rows)
        data, constant = prepare("textcat", tmp_path / "t.csv", tmp_path / "data"), 0.5
    else:
        qas = [{"id": str(i), "question": q, "answers": [{"text": a, "answer_start": s}]}
               for i, (q, a, s) in enumerate([("Where is the tower?", "Paris", 16), ("What is tall?", "It", 23)])]
        squad = {"data": [{"title": f"t{k}", "paragraphs": [{"context": "The tower is in Paris. It is tall.",
                                                             "qas": qas}]} for k in range(4)]}
        (tmp_path / "s.json").write_text(json.dumps(squad))
        data, constant = prepare("qa", tmp_path / "s.json", tmp_path / "data", dev_fraction=0.25), 0.0
    result = finetune(task, data.train, data.dev, tmp_path / "model",
                      tiny_config(base_model=str(ckpts["base"]), max_steps=60, eval_steps=30, lr=5e-3), progress=False)
    losses = [e["loss"] for e in result.log if "loss" in e]
    assert len(losses) >= 2 and losses[-1] < losses[0] / 5, losses
    assert result.dev_metrics[result.primary] >= constant + 0.5, result.dev_metrics


def test_finetune_textcat_and_qa(ckpts, tmp_path):
    rows = "".join(f"{'good great fine' if i % 2 else 'bad awful poor'} {i},{'pos' if i % 2 else 'neg'}\n"
                   for i in range(20))
    (tmp_path / "t.csv").write_text("text,label\n" + rows)
    data = prepare("textcat", tmp_path / "t.csv", tmp_path / "tc")
    result = finetune("textcat", data.train, data.dev, tmp_path / "tc-model",
                      tiny_config(base_model=str(ckpts["base"])), progress=False)
    assert result.primary == "cats_score"
    assert set(spacy.load(tmp_path / "tc-model")("good").cats) == {"neg", "pos"}

    qas = [{"id": str(i), "question": q, "answers": [{"text": a, "answer_start": s}]}
           for i, (q, a, s) in enumerate([("Where is the tower?", "Paris", 16), ("What is tall?", "It", 23)])]
    qas.append({"id": "x", "question": "Who built it?", "answers": [], "is_impossible": True})  # SQuAD 2.0
    squad = {"data": [{"title": f"t{k}", "paragraphs": [{"context": "The tower is in Paris. It is tall.", "qas": qas}]}
                      for k in range(4)]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    data = prepare("qa", tmp_path / "s.json", tmp_path / "qa", dev_fraction=0.25)
    result = finetune("qa", data.train, data.dev, tmp_path / "qa-model",
                      tiny_config(base_model=str(ckpts["base"])), progress=False)
    assert result.primary == "qa_f1" and "qa_exact" in result.dev_metrics and "qa_no_ans_f1" in result.dev_metrics
    qa_nlp = spacy.load(tmp_path / "qa-model")
    assert qa_nlp.get_pipe("qa").handle_impossible  # trained with unanswerable questions: it may abstain
    from transformers import pipeline

    from spacy_llm_components import ask

    # it answers, or abstains, as transformers' pipeline decides with the null answer allowed; with a
    # null threshold no null score beats, it gives the pipeline's best span
    hf = pipeline("question-answering", model=str(tmp_path / "qa-model" / "qa" / "model"), device="cpu")
    context = "The tower is in Paris."
    for question in ("Where is the tower?", "Who built it?"):
        qa_nlp.get_pipe("qa").null_threshold = 0.0
        reference = hf(question=question, context=context, handle_impossible_answer=True)
        ours = ask(qa_nlp, context, question)
        assert [(a.start_char, a.end_char) for a in ours] == \
            ([] if reference["answer"] == "" else [(reference["start"], reference["end"])]), question
        qa_nlp.get_pipe("qa").null_threshold = 1.0
        reference = hf(question=question, context=context)
        (ours,) = ask(qa_nlp, context, question)
        assert (ours.start_char, ours.end_char) == (reference["start"], reference["end"])
        assert ours._.score == pytest.approx(reference["score"], rel=1e-4)


def test_finetune_rejects_unprepared_input(ner_data, ckpts, tmp_path):
    from spacy_llm_components.data import DataError

    with pytest.raises(DataError, match="reads the .spacy files"):
        finetune("ner", ner_data.output / "../train.conll", ner_data.dev, tmp_path / "m", tiny_config())
    with pytest.raises(DataError, match="prepared for 'ner', not 'textcat'"):
        finetune("textcat", ner_data.train, ner_data.dev, tmp_path / "m", tiny_config())
    assert not (tmp_path / "m").exists()  # nothing written: no folder, no checkpoints/run.json, no log


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    import torch

    from spacy_llm_components.stages.shared.training import SeededLengthGroupedSampler

    lengths = [5, 5, 5, 5, 9, 9, 9, 9, 2, 2, 2, 2] * 30
    sampler = SeededLengthGroupedSampler(4, lengths, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(123)  # a resumed run restores the global RNG at another point: must not matter
    torch.rand(10)
    assert list(sampler) == first and sorted(first) == list(range(len(lengths)))
    sampler.set_epoch(2)
    assert list(sampler) != first


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(ner_data, ckpts, tmp_path, monkeypatch):
    """A failure the Trainer finds when it starts (here: its arguments refused) leaves no output folder,
    no checkpoints/run.json and no log; a run with a checkpoint stays, to be resumed."""
    from spacy_llm_components.stages.shared import training

    def refused(*args, **kwargs):
        raise ValueError("--bf16 needs a GPU")

    monkeypatch.setattr(training, "training_arguments", refused)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="needs a GPU"):
        finetune("ner", ner_data.train, ner_data.dev, out, tiny_config(base_model=str(ckpts["base"])), progress=False)
    assert not out.exists()
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):  # after its first checkpoint (step 2): resumable, so it stays
        finetune("ner", ner_data.train, ner_data.dev, out, tiny_config(base_model=str(ckpts["base"])), progress=False,
                 callbacks=[_Interrupt(3)])
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

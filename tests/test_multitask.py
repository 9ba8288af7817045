"""Several heads trained together on one encoder (`sllm finetune ner+textcat`), and a head added later on a
frozen encoder. References: batch counts worked out by hand, each head's own loss on its training features
computed through transformers-style encoder + head modules before and after, the optimizer steps a resumed
process runs, and the other heads' predictions bit for bit."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from conftest import assert_same_steps, demo_files, teacher_weight
from safetensors.numpy import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.pipeline import doc_predictions
from spacy_llm_components.models.collate import FeatureCollator
from spacy_llm_components.stages.finetune import FinetuneError, finetune_tasks
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.multitask import (
    MultitaskSampler,
    MultitaskSettings,
    parse_weights,
    task_batch_counts,
)
from spacy_llm_components.stages.shared.training import FinetuneConfig
from spacy_llm_components.tasks import load_docs, task_spec

TEXTS = ["Lena Hartmann joined Brightwater Foods in Lindenfeld.", "The pancakes were fluffy and the staff kind.",
         "Awful service, cold soup."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask-data")
    out = {}
    for task in ("ner", "qa"):
        train, dev, _ = demo_files(task)
        out[task] = prepare(task, [train], root / task, dev=dev).output
    rows = "".join(f"{'good great fine' if i % 2 else 'bad awful poor'} {i},{'positive' if i % 2 else 'negative'}\n"
                   for i in range(24))  # a set the tiny model can learn
    (root / "t.csv").write_text("text,label\n" + rows)
    out["textcat"] = prepare("textcat", [root / "t.csv"], root / "textcat", dev_fraction=0.25).output
    return out


def files(data, tasks):
    return [data[t] / "train.spacy" for t in tasks], [data[t] / "dev.spacy" for t in tasks]


def config(ckpts, **kwargs) -> FinetuneConfig:
    return FinetuneConfig(**{"base_model": str(ckpts["base"]), "batch_size": 4, "max_steps": 6, "eval_steps": 3,
                             "seed": 0, **kwargs})


# -- sampling (pure) -----------------------------------------------------------------------------------
def test_batch_counts_proportional_and_temperature_by_hand():
    sizes, batch = [100, 10], 4  # 25 and 3 batches of their own: 28 per epoch
    assert task_batch_counts(sizes, batch, "proportional", 2.0) == [25, 3]
    # p ~ n^(1/2): 10 : 3.162 -> 28 * 0.7597 = 21.27, 28 * 0.2403 = 6.73: floors 21 + 6, one more to the
    # larger remainder (6.73)
    assert task_batch_counts(sizes, batch, "temperature", 2.0) == [21, 7]
    assert task_batch_counts(sizes, batch, "temperature", 1.0) == [25, 3]  # T = 1 is proportional
    assert sum(task_batch_counts([7, 5, 1], 2, "temperature", 50.0)) == 4 + 3 + 1
    assert task_batch_counts([7, 5, 1], 2, "temperature", 50.0) == [3, 3, 2]  # nearly even: every task its share


def test_sampler_batches_hold_one_task_cover_the_data_and_follow_seed_and_epoch():
    tasks = [0] * 10 + [1] * 7
    lengths = [(i * 7) % 11 + 1 for i in range(17)]
    sampler = MultitaskSampler(tasks, lengths, 4, seed=3, counts=[3, 2])
    order = list(iter(sampler))
    assert len(order) == len(sampler) == 5 * 4
    batches = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(len({tasks[i] for i in b}) == 1 for b in batches)  # the DataLoader's batches never mix tasks
    assert [sum(tasks[b[0]] == t for b in batches) for t in (0, 1)] == [3, 2]
    assert set(order) == set(range(17))  # proportional counts: every feature once (short batches filled up)
    assert list(iter(sampler)) == order  # the same (seed, epoch): the same order, as a resume needs
    sampler.set_epoch(1)
    assert list(iter(sampler)) != order
    upsampled = list(iter(MultitaskSampler(tasks, lengths, 4, seed=3, counts=[1, 5])))  # task 1 goes round again
    assert sum(tasks[i] == 1 for i in upsampled) == 20 and len(set(i for i in upsampled if tasks[i] == 1)) == 7


@pytest.mark.parametrize("text, words", [("ner=x", "is not a number"), ("pos=1", "TASK=WEIGHT"), ("ner=0", "> 0"),
                                         ("ner", "TASK=WEIGHT")])
def test_bad_weights_are_refused(text, words):
    with pytest.raises(FinetuneError, match=words):
        parse_weights(text, ["ner", "textcat"], "--loss-weights")
    assert parse_weights("textcat=0.5", ["ner", "textcat"], "x") == {"ner": 1.0, "textcat": 0.5}


# -- training together --------------------------------------------------------------------------------
def head_losses(folder: Path, data) -> dict:
    """Each head's mean loss over its training features: the encoder and that head alone (TaskModel, as in
    single-task training), batches of 8, dropout off."""
    nlp = spacy.load(folder)
    out = {}
    for task in ("ner", "textcat"):
        spec, pipe = task_spec(task), nlp.get_pipe(task)
        features = pipe.features(load_docs(task, data[task] / "train.spacy", nlp).docs)
        collate = FeatureCollator(spec.collator(pipe.checkpoint.tokenizer), pipe.checkpoint.tokenizer)
        model = pipe.checkpoint.model.eval()
        with torch.no_grad():
            losses = [float(model(**collate(features[i:i + 8])).loss) for i in range(0, len(features), 8)]
        out[task] = sum(losses) / len(losses)
    return out


def test_training_together_lowers_both_heads_losses_and_keeps_the_best_weighted_checkpoint(ckpts, data, tmp_path):
    train, dev = files(data, ["ner", "textcat"])
    start = finetune_tasks(["ner", "textcat"], train, dev, tmp_path / "start", config(ckpts, lr=0.0, max_steps=1),
                           progress=False)
    # (the demo NER set has several times the toy textcat set's batches: sampled evenly, both learn in 60 steps)
    settings = MultitaskSettings(sampling="temperature", temperature=20.0, score_weights="ner=3,textcat=1",
                                 loss_weights="textcat=2")
    result = finetune_tasks(["ner", "textcat"], train, dev, tmp_path / "out",
                            config(ckpts, lr=5e-3, max_steps=60, eval_steps=20), settings, progress=False)
    before, after = head_losses(start.output, data), head_losses(result.output, data)
    assert after["ner"] < 0.7 * before["ner"] and after["textcat"] < 0.7 * before["textcat"], (before, after)
    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_weighted_score" in e]
    assert [e["step"] for e in evals] == [20, 40, 60]
    for e in evals:  # every head on its own dev set, weighed 3 : 1
        assert e["eval_weighted_score"] == pytest.approx((3 * e["eval_ner_ents_f"] + e["eval_textcat_cats_score"]) / 4)
    best = max(evals, key=lambda e: e["eval_weighted_score"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["primary"] == "weighted_score" and metrics["best_step"] == best["step"] == result.best_step
    nlp = spacy.load(tmp_path / "out")
    assert nlp.pipe_names == ["encoder", "ner", "textcat"]
    n_ner = len(load_docs("ner", train[0], nlp).docs)  # (demo sentences: one window each)
    own = [math.ceil(n_ner / 4), math.ceil(18 / 4)]
    counts = nlp.meta["sllm"]["batches_per_epoch"]
    assert sum(counts.values()) == sum(own) and abs(counts["ner"] - counts["textcat"]) <= 1, (counts, own)
    prediction = doc_predictions(nlp(TEXTS[0]), nlp)
    assert set(prediction) == {"ents", "cats"} and set(prediction["cats"]) == {"negative", "positive"}


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt


def _weights(folder: Path) -> dict:
    return {**load_file(str(folder / "encoder" / "model" / "model.safetensors")),
            **{f"{t}.{k}": v for t in ("ner", "textcat")
               for k, v in load_file(str(folder / t / "head" / "model.safetensors")).items()}}


def test_a_resumed_run_trains_only_the_remaining_steps_and_ends_at_the_same_weights(ckpts, data, tmp_path,
                                                                                    trainer_steps):
    train, dev = files(data, ["ner", "textcat"])
    settings = MultitaskSettings(sampling="temperature", temperature=3.0)
    cfg = config(ckpts, lr=1e-3, max_steps=7, eval_steps=3)
    finetune_tasks(["ner", "textcat"], train, dev, tmp_path / "straight", cfg, settings, progress=False)
    straight = list(trainer_steps)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune_tasks(["ner", "textcat"], train, dev, out, cfg, settings, progress=False, callbacks=[_Interrupt()])
    trainer_steps.clear()
    result = finetune_tasks(["ner", "textcat"], train, dev, out, cfg, settings, resume=True, progress=False)
    assert result.resumed_from == 3
    assert_same_steps(trainer_steps, straight[3:])
    want, got = _weights(tmp_path / "straight"), _weights(out)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_head_added_later_on_the_frozen_encoder_leaves_the_others_bit_identical(ckpts, data, tmp_path):
    train, dev = files(data, ["ner", "textcat"])
    first = finetune_tasks(["ner", "textcat"], train, dev, tmp_path / "deployed", config(ckpts, lr=1e-3),
                           progress=False).output
    before = spacy.load(first)
    want = [doc_predictions(doc, before) for doc in before.pipe(TEXTS)]
    qa_train, qa_dev = files(data, ["qa"])
    result = finetune_tasks(["qa"], qa_train, qa_dev, tmp_path / "with-qa",
                            config(ckpts, base_model=str(first), lr=3e-3, max_steps=8, eval_steps=4),
                            MultitaskSettings(freeze_encoder=True), progress=False)
    nlp = spacy.load(result.output)
    assert nlp.pipe_names == ["encoder", "ner", "textcat", "qa"]
    got = [{k: v for k, v in doc_predictions(doc, nlp).items() if k != "answers"} for doc in nlp.pipe(TEXTS)]
    assert got == want  # ==: bit for bit
    old, new = _weights(first), _weights(result.output)
    assert all(np.array_equal(old[k], new[k]) for k in old)  # encoder and old heads: the same tensors
    doc = nlp.make_doc(TEXTS[0])
    doc._.questions = ["Who joined Brightwater Foods?"]
    assert [s._.question for s in nlp(doc).spans["answers"]] == ["Who joined Brightwater Foods?"]


# -- bad input: refused before anything is written ----------------------------------------------------------
@pytest.mark.parametrize("tasks, pick, words", [
    (["ner", "textcat"], lambda t, d: (t[:1], d), "need as many --train and --dev files"),
    (["ner", "ner"], lambda t, d: (t, d), "each once"),
    (["ner", "textcat"], lambda t, d: (t[::-1], d[::-1]), "prepared for 'textcat', not 'ner'"),
])
def test_a_bad_multitask_run_is_refused_before_writing(ckpts, data, tmp_path, tasks, pick, words):
    train, dev = pick(*files(data, ["ner", "textcat"]))
    from spacy_llm_components.data import DataError

    with pytest.raises((FinetuneError, DataError), match=words):
        finetune_tasks(tasks, train, dev, tmp_path / "out", config(ckpts), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_base_pipeline_that_has_the_head_already_is_refused(ckpts, data, tmp_path):
    train, dev = files(data, ["ner", "textcat"])
    first = finetune_tasks(["ner", "textcat"], train, dev, tmp_path / "p", config(ckpts, max_steps=1),
                           progress=False).output
    with pytest.raises(FinetuneError, match=r"already has \['ner'\]; train the tasks it lacks"):
        finetune_tasks(["ner"], train[:1], dev[:1], tmp_path / "out", config(ckpts, base_model=str(first)),
                       progress=False)
    assert not (tmp_path / "out").exists()


def test_the_cli_trains_several_tasks_and_refuses_mismatched_files(ckpts, data, tmp_path):
    train, dev = files(data, ["ner", "textcat"])
    common = ["--base-model", str(ckpts["base"]), "--max-steps", "2", "--batch-size", "4", "--no-track"]
    bad = CliRunner().invoke(app, ["finetune", "ner+textcat", "--train", str(train[0]), "--dev", str(dev[0]),
                                   "--dev", str(dev[1]), "-o", str(tmp_path / "bad"), *common])
    assert bad.exit_code == 2 and "need as many --train and --dev files" in bad.output
    assert not (tmp_path / "bad").exists()
    good = CliRunner().invoke(app, ["finetune", "ner+textcat", "--train", str(train[0]), "--train", str(train[1]),
                                    "--dev", str(dev[0]), "--dev", str(dev[1]), "-o", str(tmp_path / "out"),
                                    "--sampling", "temperature", "--loss-weights", "ner=2", *common])
    assert good.exit_code == 0, good.output
    assert "fine-tuned ner+textcat" in good.output and spacy.load(tmp_path / "out").pipe_names == [
        "encoder", "ner", "textcat"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["sllm"]["config"]["sampling"] == "temperature"


# -- evaluate, register, promote as one ------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_versions(ckpts, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask-versions")
    train, dev = files(data, ["ner", "textcat"])
    return [finetune_tasks(["ner", "textcat"], train, dev, root / f"v{i}", config(ckpts, lr=lr, max_steps=4),
                           progress=False).output for i, lr in enumerate((1e-3, 3e-3))]


def test_each_head_is_evaluated_as_its_exported_single_task_pipeline_scores(two_versions, data, tmp_path):
    from spacy_llm_components.components.pipeline import build_pipeline, export_hf
    from spacy_llm_components.stages.evaluate import evaluate, evaluate_heads

    tests = {"ner": demo_files("ner")[2], "textcat": data["textcat"] / "dev.spacy"}
    tests["textcat"] = tmp_path / "t.csv"  # the toy set's dev split, as a file `prepare` reads
    tests["textcat"].write_text("text,label\n" + "".join(
        f"{'good great fine' if i % 2 else 'bad awful poor'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(30, 38)))
    metrics = evaluate_heads(two_versions[0], tests, tmp_path / "eval")
    nlp = spacy.load(two_versions[0])
    for head in ("ner", "textcat"):
        single = build_pipeline(head, export_hf(nlp, head, tmp_path / f"hf-{head}"), settings={"device": "cpu"})
        want = evaluate(single, tests[head])
        assert metrics["heads"][head]["scores"] == pytest.approx(want.scores), head
        assert all(metrics["scores"][f"{head}_{k}"] == pytest.approx(v) for k, v in want.scores.items())
    primaries = [metrics["heads"][h]["scores"][metrics["heads"][h]["primary"]] for h in ("ner", "textcat")]
    assert metrics["primary"] == "weighted_score" and metrics["scores"]["weighted_score"] == pytest.approx(
        sum(primaries) / 2)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["task"] == "ner+textcat" and set(written["heads"]) == {"ner", "textcat"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Head ner" in report and "## Head textcat" in report and (tmp_path / "eval" / "confusion-textcat.png").is_file()
    with pytest.raises(ValueError, match=r"give one test file for each, as HEAD=FILE; none for \['textcat'\]"):
        evaluate_heads(two_versions[0], {"ner": tests["ner"]}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _metrics(ner: float, textcat: float) -> dict:
    heads = {"ner": {"task": "ner", "primary": "ents_f", "scores": {"ents_f": ner}, "test": "n", "test_sha256": "a",
                     "statistics": {"docs": 5}},
             "textcat": {"task": "textcat", "primary": "cats_score", "scores": {"cats_score": textcat}, "test": "t",
                         "test_sha256": "b", "statistics": {"docs": 8}}}
    return {"task": "ner+textcat", "primary": "weighted_score", "test_sha256": "ab", "heads": heads,
            "scores": {"weighted_score": (ner + textcat) / 2, "ner_ents_f": ner, "textcat_cats_score": textcat},
            "statistics": {"docs": 13}}


def test_one_version_carries_every_head_and_promotion_gates_on_each(two_versions, mlflow_project):
    from mlflow.tracking import MlflowClient

    from spacy_llm_components.stages import registry

    first = registry.register(two_versions[0], "mt", metrics=_metrics(0.80, 0.70))
    assert first.tags["task"] == "ner+textcat" and first.tags["head.ner"] == "ner_ents_f"
    card = MlflowClient().get_model_version("mt", first.version).description
    assert "**ner** (ner)" in card and "**ents_f 80.00**" in card and "**cats_score 70.00**" in card
    assert registry.promote("mt").promoted
    # a better mean that costs one head more than the margin is refused, naming the head
    second = registry.register(two_versions[1], "mt", metrics=_metrics(0.78, 0.90))
    decision = registry.promote("mt", max_head_drop=1.0)
    assert not decision.promoted and "head ner ner_ents_f 78.00 is 2.00 points below the champion's 80.00" in \
        decision.reason
    assert registry.promote("mt", max_head_drop=2.5).promoted  # within a wider margin it is promoted
    assert str(registry.version_by_alias("mt", "champion").version) == second.version


# -- distillation: the student keeps every head -------------------------------------------------------
@pytest.fixture(scope="module")
def shared_teacher(data, tmp_path_factory):
    """NER + textcat fine-tuned together on a 4-layer encoder, so that a student can keep 2 of its layers."""
    from conftest import make_ckpt

    root = tmp_path_factory.mktemp("shared-teacher")
    base = make_ckpt(root / "base", "base", num_hidden_layers=4)
    train, dev = files(data, ["ner", "textcat"])
    return finetune_tasks(["ner", "textcat"], train, dev, root / "teacher",
                          FinetuneConfig(base_model=str(base), batch_size=4, max_steps=60, eval_steps=60, lr=5e-3,
                                         seed=0), MultitaskSettings(sampling="temperature", temperature=20.0),
                          progress=False).output  # (both heads confident: their outputs are worth matching)


def _softmax_outputs(pipeline: Path, head: str, texts, tmp: Path) -> torch.Tensor:
    """The head's softmax outputs on texts through transformers' own AutoModelFor* class, loaded from the
    head's export (per piece for NER, per text for textcat): a reference apart from the project's losses."""
    import transformers

    from spacy_llm_components.components.pipeline import export_hf

    folder = export_hf(spacy.load(pipeline), head, tmp / f"{pipeline.name}-{head}")
    cls = {"ner": transformers.AutoModelForTokenClassification,
           "textcat": transformers.AutoModelForSequenceClassification}[head]
    model, tok = cls.from_pretrained(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        logits = model(**enc).logits
    return torch.softmax(logits[enc["attention_mask"].bool()] if head == "ner" else logits, -1)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    return float((teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(-1).mean())


def test_a_shared_teacher_distills_into_one_shorter_encoder_with_every_head(shared_teacher, data, tmp_path):
    from spacy_llm_components.stages.compress.distill import DistillConfig, distill

    train, dev = files(data, ["ner", "textcat"])
    cfg = {"batch_size": 4, "device": "cpu", "seed": 0, "warmup_ratio": 0.0}
    init = distill(shared_teacher, train, dev, tmp_path / "init", FinetuneConfig(lr=0.0, max_steps=1, **cfg),
                   DistillConfig(keep="1,3"), progress=False).output
    # lr 0: the student on disk is its initialisation, the teacher's layers 1 and 3 and both heads as they are
    teacher_w, student_w = _weights(shared_teacher), _weights(init)
    assert sum(".layer.0." in n for n in student_w) > 0 and not any(".layer.2." in n for n in student_w)
    for name, value in student_w.items():
        np.testing.assert_array_equal(value, teacher_w[teacher_weight(name, [1, 3])], err_msg=name)
    nlp = spacy.load(init)
    assert nlp.pipe_names == ["encoder", "ner", "textcat"]
    assert json.loads((init / "encoder" / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    block = nlp.meta["sllm"]
    assert block["distillation"]["teacher"] == str(shared_teacher.resolve()) and block["kept_layers"] == [1, 3]
    assert block["compression"]["method"] == "distill" and block["heads"] == ["ner", "textcat"]

    # trained on the teacher's outputs alone, each head comes closer to its teacher head than it started, and
    # closer than the same student trained on the gold labels alone
    steps = FinetuneConfig(lr=3e-3, max_steps=40, eval_steps=20, **cfg)
    soft = distill(shared_teacher, train, dev, tmp_path / "soft", steps,
                   DistillConfig(layers=1, alpha=1.0, temperature=1.0), progress=False).output
    start = distill(shared_teacher, train, dev, tmp_path / "start", FinetuneConfig(lr=0.0, max_steps=1, **cfg),
                    DistillConfig(layers=1), progress=False).output
    gold = distill(shared_teacher, train, dev, tmp_path / "gold", steps,
                   DistillConfig(layers=1, alpha=0.0, temperature=1.0), progress=False).output
    for head in ("ner", "textcat"):
        texts = [doc.text for doc in load_docs(head, data[head] / "train.spacy", spacy.blank("en")).docs]
        want = _softmax_outputs(shared_teacher, head, texts, tmp_path)
        before, after, control = (_kl(want, _softmax_outputs(p, head, texts, tmp_path)) for p in (start, soft, gold))
        assert before > 1e-5 and after < 0.5 * before and after < 0.8 * control, (head, before, after, control)
    log = [json.loads(line) for line in (tmp_path / "soft" / "training_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_weighted_score" in e]
    assert [e["step"] for e in evals] == [20, 40]  # every head scored on its own dev set
    assert all(e["eval_weighted_score"] == pytest.approx((e["eval_ner_ents_f"] + e["eval_textcat_cats_score"]) / 2)
               for e in evals)
    prediction = doc_predictions(spacy.load(soft)(TEXTS[0]), spacy.load(soft))
    assert set(prediction) == {"ents", "cats"} and set(prediction["cats"]) == {"negative", "positive"}


def test_bad_shared_distillation_is_refused_before_writing(shared_teacher, data, tmp_path):
    from spacy_llm_components.data import DataError
    from spacy_llm_components.stages.compress import CompressError
    from spacy_llm_components.stages.compress.distill import DistillConfig, distill

    train, dev = files(data, ["ner", "textcat"])
    cfg = FinetuneConfig(device="cpu", batch_size=4, max_steps=1)
    cases = [((train[:1], dev[:1], None), CompressError, r"heads \(ner, textcat\) need as many --train and --dev"),
             ((train[::-1], dev[::-1], None), DataError, "prepared for 'textcat', not 'ner'"),
             ((train, dev, MultitaskSettings(freeze_encoder=True)), CompressError, "cannot be frozen"),
             ((train, dev, MultitaskSettings(loss_weights="qa=2")), FinetuneError, "--heads-loss-weights .*TASK=WEIGHT")]
    for (t, d, settings), error, words in cases:
        with pytest.raises(error, match=words):
            distill(shared_teacher, t, d, tmp_path / "out", cfg, DistillConfig(layers=1), settings, progress=False)
        assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["distill", str(shared_teacher), "--train", str(train[0]), "--train",
                                      str(train[1]), "--dev", str(dev[0]), "--dev", str(dev[1]), "-o",
                                      str(tmp_path / "cli"), "--layers", "1", "--max-steps", "2", "--batch-size", "4",
                                      "--heads-sampling", "temperature", "--no-track"])
    assert result.exit_code == 0, result.output
    assert "distilled ner+textcat" in result.output and spacy.load(tmp_path / "cli").pipe_names == [
        "encoder", "ner", "textcat"]


def test_the_compress_flow_refuses_a_pipeline_of_heads_and_says_what_to_run(shared_teacher, mlflow_project,
                                                                           tmp_path):
    from mlflow.tracking import MlflowClient
    from spacy_llm_components.flows.compress import compress

    from spacy_llm_components.stages import registry
    from spacy_llm_components.stages.compress import CompressError

    registry.register(shared_teacher, "mt-compress", metrics=_metrics(0.5, 0.5))
    with pytest.raises(CompressError, match=r"heads share an encoder.*sllm quantize.*sllm distill.*HEAD=FILE"):
        compress.fn("models:/mt-compress/1", str(demo_files("ner")[2]), ["int8"], workdir=str(tmp_path / "work"))
    assert [str(v.version) for v in MlflowClient().search_model_versions("name='mt-compress'")] == ["1"]
    assert not (tmp_path / "work").exists()

"""Multi-process fine-tuning: `torchrun --nproc_per_node 2 ... finetune` on CPU (gloo) trains what one
process with twice the batch size trains, and writes one pipeline."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spacy
from conftest import make_ckpt
from safetensors.numpy import load_file

import spacy_llm_components
from spacy_llm_components.stages.finetune import finetune
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.shared.training import FinetuneConfig

# Every sentence has 5 words, so 5 labelled tokens (NER labels the first piece of each word): the token
# loss is a mean per process, and DDP's mean of the two per-process means equals the mean over the global
# batch only when both processes hold as many labelled tokens. The word-piece lengths differ (7 to 13),
# so the length grouping and padding are exercised.
NER_DDP_TRAIN = "".join(
    f"{name} B-PER\n{surname} I-PER\nvisited O\n{city} B-LOC\n. O\n\n"
    for name, surname, city in [("Angela", "Merkel", "Paris"), ("John", "Wojciechowski", "Berlin"),
                                ("Mary", "Jones", "Ouagadougou"), ("Peter", "Brown", "Madrid"),
                                ("Anna", "Schmidt", "Szczecin"), ("Tom", "Quixotic", "Oslo"),
                                ("Paul", "Klein", "Lisbon"), ("Xavier", "Wojciechowski", "Ouagadougou")]
)
PER_DEVICE, WORLD = 2, 2
# float32, 4 AdamW steps at lr 3e-2 (so the dev score improves and the last checkpoint is the one
# kept): weights move by up to ~7e-2; summing the gradients in another order (all-reduce of two
# half-batch means vs one mean over the batch) leaves up to ~5e-6 here. A wrong world-size setup (other
# batches per step, unsynchronised processes) is off by 1e-3 and more.
ATOL = 1e-4


def _zero_gradient(name: str) -> bool:
    # The attention key bias adds the same q.b to every score of a query: softmax ignores it, so its
    # gradient is 0 up to float noise, which Adam's normalisation turns into ~lr-sized random steps.
    return name.endswith("attention.self.key.bias")


def _weights(folder: Path) -> dict:
    return load_file(str(next((folder / "ner" / "model").glob("*.safetensors"))))


def _log(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one_process_with_the_global_batch(tmp_path):
    base = make_ckpt(tmp_path / "base", "base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tmp_path / "train.conll").write_text(NER_DDP_TRAIN)
    (tmp_path / "dev.conll").write_text("Angela B-PER\nMerkel I-PER\nvisited O\nRome B-LOC\n. O\n")
    data = prepare("ner", tmp_path / "train.conll", tmp_path / "prepared", dev=tmp_path / "dev.conll")
    settings = dict(base_model=str(base), epochs=2.0, lr=3e-2, warmup_ratio=0.0, device="cpu", seed=0)

    ddp = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    root = str(Path(spacy_llm_components.__file__).resolve().parents[1])  # the package under test
    env.update(PYTHONPATH=os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SLLM_PROJECT_DIR=str(tmp_path / "project"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "spacy_llm_components.cli", "finetune", "ner", "--train", str(data.train), "--dev", str(data.dev),
           "--output", str(ddp), "--base-model", str(base), "--device", "cpu", "--batch-size", str(PER_DEVICE),
           "--epochs", "2", "--lr", "3e-2", "--warmup-ratio", "0", "--seed", "0", "--no-track"]
    # Output to files, not pipes: the workers run in sessions of their own and would hold pipes open.
    with open(tmp_path / "torchrun.out", "w") as out, open(tmp_path / "torchrun.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:  # a collective some process never joined
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    stdout, stderr = (tmp_path / "torchrun.out").read_text(), (tmp_path / "torchrun.err").read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert stdout.count("fine-tuned ner in") == 1  # one process reports

    # one pipeline, written once
    assert sorted(p.name for p in ddp.iterdir()) == ["config.cfg", "meta.json", "metrics.json", "ner",
                                                      "tokenizer", "training_log.jsonl", "vocab"]
    assert [p.relative_to(ddp) for p in ddp.rglob("meta.json")] == [Path("meta.json")]
    assert not (tmp_path / "project").exists() and not list(tmp_path.glob("mlruns"))  # --no-track
    nlp = spacy.load(ddp)
    assert nlp.pipe_names == ["ner"]
    nlp("Angela Merkel visited Paris .")

    # the single-process run with the global batch size (2 x 2)
    single = tmp_path / "single"
    result = finetune("ner", data.train, data.dev, single, FinetuneConfig(batch_size=PER_DEVICE * WORLD, **settings),
                      progress=False)

    # steps: ceil(features / (batch per device x grad accum x processes)) per epoch, eval once per epoch
    steps_per_epoch = math.ceil(8 / (PER_DEVICE * 1 * WORLD))
    log = _log(ddp)
    entries = [(e["step"], tuple(sorted(k for k in e if k != "time"))) for e in log]
    assert len(set(entries)) == len(entries)  # no entry written twice
    evals = [e for e in log if "eval_ents_f" in e]
    assert [(e["step"], e["epoch"]) for e in evals] == [(steps_per_epoch, 1.0), (2 * steps_per_epoch, 2.0)]
    assert sum("train_runtime" in e for e in log) == 1 and log[-1]["step"] == 2 * steps_per_epoch == result.steps
    single_log = _log(single)
    assert [(e["step"], e["epoch"]) for e in log] == [(e["step"], e["epoch"]) for e in single_log]
    for mine, theirs in zip(log, single_log):  # the logged loss is averaged over the processes
        if "loss" in mine:
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-3)
    metrics, single_metrics = (json.loads((p / "metrics.json").read_text()) for p in (ddp, single))
    assert metrics["training"]["steps"] == 2 * steps_per_epoch and metrics["training"]["world_size"] == WORLD
    # word pieces: summed over the processes (the global batches are the single run's: the same pieces)
    assert (metrics["training"]["word_pieces"] == single_metrics["training"]["word_pieces"]
            == result.training["word_pieces"])
    # both kept the same checkpoint (the one whose weights are compared below)
    assert metrics["best_step"] == single_metrics["best_step"] in (steps_per_epoch, 2 * steps_per_epoch)
    meta = json.loads((ddp / "meta.json").read_text())
    assert meta["sllm"]["config"]["batch_size"] == PER_DEVICE

    # weights: those of the single-process run, up to float error; and training moved them well beyond that
    mine, theirs = _weights(ddp), _weights(single)
    assert mine.keys() == theirs.keys()
    diff = max(float(np.abs(mine[k] - theirs[k]).max()) for k in mine if not _zero_gradient(k))
    base_weights = load_file(str(base / "model.safetensors"))
    moved = max(float(np.abs(mine[f"bert.{k}"] - v).max()) for k, v in base_weights.items() if f"bert.{k}" in mine)
    print(f"max |ddp - single| = {diff:.3g}; max |ddp - base| = {moved:.3g}")
    assert diff <= ATOL
    assert moved > 100 * ATOL


@pytest.mark.slow
def test_torchrun_trains_several_heads_together_and_writes_one_pipeline(tmp_path):
    """`torchrun --nproc_per_node 2 ... finetune ner+textcat`: each process takes whole batches of one task
    (the heads its batch does not use are unused parameters that step), one process writes and reports."""
    base = make_ckpt(tmp_path / "base", "base")
    (tmp_path / "train.conll").write_text(NER_DDP_TRAIN)
    (tmp_path / "dev.conll").write_text("Angela B-PER\nMerkel I-PER\nvisited O\nRome B-LOC\n. O\n")
    ner = prepare("ner", tmp_path / "train.conll", tmp_path / "ner", dev=tmp_path / "dev.conll")
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} day {i},"
                                                             f"{'pos' if i % 2 else 'neg'}\n" for i in range(12)))
    textcat = prepare("textcat", tmp_path / "t.csv", tmp_path / "textcat", dev_fraction=0.25)
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    root = str(Path(spacy_llm_components.__file__).resolve().parents[1])
    env.update(PYTHONPATH=os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "spacy_llm_components.cli", "finetune", "ner+textcat", "--train", str(ner.train), "--train",
           str(textcat.train), "--dev", str(ner.dev), "--dev", str(textcat.dev), "--output", str(out),
           "--base-model", str(base), "--device", "cpu", "--batch-size", str(PER_DEVICE), "--epochs", "2",
           "--lr", "1e-2", "--seed", "0", "--no-track"]
    with open(tmp_path / "torchrun.out", "w") as stdout, open(tmp_path / "torchrun.err", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    printed, errors = (tmp_path / "torchrun.out").read_text(), (tmp_path / "torchrun.err").read_text()
    assert proc.returncode == 0, printed[-3000:] + errors[-6000:]
    assert printed.count("fine-tuned ner+textcat in") == 1
    nlp = spacy.load(out)
    assert nlp.pipe_names == ["encoder", "ner", "textcat"]
    # 4 NER + 5 textcat batches of 2 per epoch (9 textcat training docs), shared out over 2 processes
    batches = json.loads((out / "meta.json").read_text())["sllm"]["batches_per_epoch"]
    assert batches == {"ner": 4, "textcat": 5}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == WORLD and metrics["training"]["steps"] == 2 * math.ceil(9 / WORLD)
    evals = [e for e in _log(out) if "eval_weighted_score" in e]
    assert len(evals) == 2 and all({"eval_ner_ents_f", "eval_textcat_cats_score"} <= set(e) for e in evals)
    base_weights = load_file(str(base / "model.safetensors"))
    trained = load_file(str(out / "encoder" / "model" / "model.safetensors"))
    assert any(not np.allclose(trained[k], base_weights[k]) for k in trained if k in base_weights)

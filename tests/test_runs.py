"""MLflow runs of fine-tunes and evaluations, against a real SQLite store."""

import json

import pytest
from mlflow.tracking import MlflowClient

from spacy_llm_components.artifacts import sha256_file
from spacy_llm_components.stages.shared import tracking


def test_finetune_run_logs_params_steps_hashes_versions_and_pipeline(tiny_pipelines, mlflow_project):
    pipeline = tiny_pipelines["ner"]["pipeline"]
    summary = json.loads((tiny_pipelines["ner"]["corpus"] / "summary.json").read_text())
    run_id = tracking.log_finetune(pipeline, data_summary=summary)
    client = MlflowClient(tracking.use_tracking())
    run = client.get_run(run_id)
    meta = json.loads((pipeline / "meta.json").read_text())["sllm"]
    assert run.data.params["max_steps"] == "2" and run.data.params["base_model"] == meta["config"]["base_model"]
    assert run.data.tags["train_sha256"] == meta["train_sha256"] and run.data.tags["task"] == "ner"
    assert run.data.tags["data_content_hash"] == summary["content_hash"]
    assert run.data.tags["version.spacy-llm-components"] and run.data.tags["version.torch"]
    assert "git.commit" in run.data.tags
    history = client.get_metric_history(run_id, "eval_ents_f")
    assert sorted(m.step for m in history) == [1, 2]  # one point per dev evaluation, at its step
    log = [json.loads(line) for line in (pipeline / "training_log.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["eval_ents_f"] for e in log if "eval_ents_f" in e}
    assert {m.step: m.value for m in history} == pytest.approx(logged)  # the values the run logged, at their steps
    finished = json.loads((pipeline / "metrics.json").read_text())
    assert run.data.metrics["best.ents_f"] == pytest.approx(finished["dev"]["ents_f"])
    assert run.data.metrics["training.steps"] == finished["training"]["steps"] == 2
    assert run.data.metrics["training.word_pieces"] == finished["training"]["word_pieces"] > 0
    from importlib.metadata import version

    assert run.data.tags["version.torch"] == version("torch") and run.data.tags["dev_sha256"] == meta["dev_sha256"]
    names = {a.path for a in client.list_artifacts(run_id, "pipeline")}
    assert {"pipeline/meta.json", "pipeline/config.cfg", "pipeline/ner", "pipeline/training_log.jsonl",
            "pipeline/metrics.json"} <= names


def test_evaluation_run_logs_metrics_per_label_and_report(tiny_pipelines, mlflow_project):
    run_id = tracking.log_evaluation(tiny_pipelines["textcat"]["evaluation"])
    client = MlflowClient(tracking.use_tracking())
    run = client.get_run(run_id)
    evaluation = json.loads((tiny_pipelines["textcat"]["evaluation"] / "metrics.json").read_text())
    for name, value in evaluation["scores"].items():  # every score as the evaluation measured it
        if isinstance(value, float):
            assert run.data.metrics[name] == pytest.approx(value), name
    per_label = evaluation["per_label"]["positive"]
    assert run.data.metrics["per_label.positive.f"] == pytest.approx(per_label["f"])
    assert run.data.metrics["per_label.positive.support"] == per_label["support"]
    assert run.data.metrics["statistics.docs"] == evaluation["statistics"]["docs"] > 0
    assert run.data.tags["test_sha256"] == sha256_file(tiny_pipelines["textcat"]["test"])
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/confusion.png"} <= names

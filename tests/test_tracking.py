"""MLflow tracking, the pyfunc model and the registry, against a real SQLite store."""

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from spacy_llm_components import project, registry, runs, serving
from spacy_llm_components.registry import RegistryError


# --------------------------------------------------------------------------------------------
# request validation (pure)


def test_request_records_accepts_rows_columns_and_questions():
    df = pd.DataFrame({"text": ["a b", "c"], "questions": [["q1?", "q2?"], None]})
    assert serving.request_records(df) == [{"text": "a b", "questions": ["q1?", "q2?"]}, {"text": "c"}]
    # {"inputs": {"text": [...]}} reaches predict as one row holding whole columns
    one_row = pd.DataFrame([{"text": np.array(["x", "y"]), "questions": np.array([np.array(["q?"]), None],
                                                                                  dtype=object)}])
    assert serving.request_records(one_row) == [{"text": "x", "questions": ["q?"]}, {"text": "y"}]
    assert serving.request_records([{"text": "t", "questions": "one?"}]) == [{"text": "t", "questions": ["one?"]}]


@pytest.mark.parametrize("rows, problem", [
    ([{"txt": "a"}], "row 0: no 'text' column"),
    ([{"text": "a"}, {"text": 3}], "row 1: 'text' must be a string, got int"),
    ([{"text": None}], "'text' must be a string"),
    ([{"text": "a", "questions": [1, 2]}], "'questions' must be a string or a list of strings"),
    ([{"text": "x" * (serving.MAX_TEXT_CHARS + 1)}], "the limit is"),
    ([{"text": "x"}] * (serving.MAX_ROWS + 1), "send at most"),
    ([{"text": "x", "questions": ["q?"] * (serving.MAX_QUESTIONS + 1)}], "questions; the limit is"),
])
def test_bad_requests_are_invalid_parameter_errors(rows, problem):
    with pytest.raises(MlflowException) as err:
        serving.request_records(rows)
    assert problem in err.value.message
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server answers 400


# --------------------------------------------------------------------------------------------
# runs


def test_default_store_is_absolute_and_under_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SLLM_PROJECT_DIR", str(tmp_path))
    assert project.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    experiment = MlflowClient(project.use_tracking()).get_experiment(project.experiment_id())
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts" / project.DEFAULT_EXPERIMENT).as_uri()
    # mlflow.set_tracking_uri exported our default: it must not pass for a user's override later
    monkeypatch.setenv("SLLM_PROJECT_DIR", str(tmp_path / "other"))
    assert project.tracking_uri() == f"sqlite:///{(tmp_path / 'other').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert project.tracking_uri() == "http://tracking.example:5000"
    for _ in range(2):  # the user's server stays the store on every later call
        assert project.use_tracking() == "http://tracking.example:5000"
    assert serving.serve_env()["MLFLOW_TRACKING_URI"] == "http://tracking.example:5000"


def test_finetune_run_logs_params_steps_hashes_versions_and_pipeline(tiny_pipelines, mlflow_project):
    pipeline = tiny_pipelines["ner"]["pipeline"]
    summary = json.loads((tiny_pipelines["ner"]["corpus"] / "summary.json").read_text())
    run_id = runs.log_finetune(pipeline, data_summary=summary)
    client = MlflowClient(project.use_tracking())
    run = client.get_run(run_id)
    meta = json.loads((pipeline / "meta.json").read_text())["sllm"]
    assert run.data.params["max_steps"] == "2" and run.data.params["base_model"] == meta["config"]["base_model"]
    assert run.data.tags["train_sha256"] == meta["train_sha256"] and run.data.tags["task"] == "ner"
    assert run.data.tags["data_content_hash"] == summary["content_hash"]
    assert run.data.tags["version.spacy-llm-components"] and run.data.tags["version.torch"]
    assert "git.commit" in run.data.tags
    history = client.get_metric_history(run_id, "eval_ents_f")
    assert sorted(m.step for m in history) == [1, 2]  # one point per dev evaluation, at its step
    names = {a.path for a in client.list_artifacts(run_id, "pipeline")}
    assert {"pipeline/meta.json", "pipeline/config.cfg", "pipeline/ner", "pipeline/training_log.jsonl",
            "pipeline/metrics.json"} <= names


def test_evaluation_run_logs_metrics_per_label_and_report(tiny_pipelines, mlflow_project):
    run_id = runs.log_evaluation(tiny_pipelines["textcat"]["evaluation"])
    client = MlflowClient(project.use_tracking())
    run = client.get_run(run_id)
    assert "cats_accuracy" in run.data.metrics and "per_label.positive.f" in run.data.metrics
    assert run.data.tags["test_sha256"]
    names = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/metrics.json", "evaluation/confusion.png"} <= names


# --------------------------------------------------------------------------------------------
# the pyfunc model


@pytest.mark.parametrize("task, key", [("textcat", "cats"), ("ner", "ents"), ("qa", "answers")])
def test_pyfunc_model_predicts_like_the_pipeline(tiny_pipelines, mlflow_project, task, key):
    import spacy

    from spacy_llm_components.predict import doc_predictions, make_input_doc

    version = registry.register(tiny_pipelines[task]["pipeline"], f"m-{task}")
    model = mlflow.pyfunc.load_model(version.uri)
    example = serving.INPUT_EXAMPLES[task]
    got = model.predict(pd.DataFrame(example))
    nlp = spacy.load(tiny_pipelines[task]["pipeline"])
    record = {k: v[0] for k, v in example.items()}
    want = doc_predictions(nlp(make_input_doc(nlp, record, "row 0", "test")), nlp)
    assert got == [want] and key in want
    info = mlflow.models.get_model_info(version.uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text", "questions"]
    assert info.saved_input_example_info is not None
    local = mlflow.artifacts.download_artifacts(version.uri)
    requirements = open(f"{local}/requirements.txt").read()
    assert "spacy-llm-components==" in requirements


# --------------------------------------------------------------------------------------------
# registry


def _metrics(evaluation, value=None, test_sha256=None):
    data = json.loads((evaluation / "metrics.json").read_text())
    if value is not None:
        data["scores"][data["primary"]] = value
    if test_sha256 is not None:
        data["test_sha256"] = test_sha256
    return data


def _copy(pipeline, tmp_path, name):
    """The same pipeline under another content hash (a different model, as far as the registry knows)."""
    target = tmp_path / name
    shutil.copytree(pipeline, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["description"] = name
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_register_tags_aliases_and_is_idempotent(tiny_pipelines, mlflow_project):
    ner = tiny_pipelines["ner"]
    first = registry.register(ner["pipeline"], "ner-model", metrics=ner["evaluation"] / "metrics.json")
    assert first.created and first.version == "1"
    client = MlflowClient(project.use_tracking())
    version = client.get_model_version("ner-model", "1")
    meta = json.loads((ner["pipeline"] / "meta.json").read_text())["sllm"]
    assert version.tags["task"] == "ner" and version.tags["train_sha256"] == meta["train_sha256"]
    assert version.tags["primary_metric"] == "ents_f" and version.tags["eval_sha256"]
    assert "metric.ents_p" in version.tags
    assert str(client.get_model_version_by_alias("ner-model", "challenger").version) == "1"
    again = registry.register(ner["pipeline"], "ner-model")
    assert (again.version, again.created) == ("1", False)
    assert len(client.search_model_versions("name = 'ner-model'")) == 1


def test_register_rejects_bad_input(tiny_pipelines, mlflow_project, tmp_path):
    with pytest.raises(ValueError, match="not a spaCy pipeline folder"):
        registry.register(tmp_path, "x")
    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="m.json: not JSON"):
        registry.register(tiny_pipelines["ner"]["pipeline"], "x", metrics=bad)
    with pytest.raises(RegistryError, match="no primary metric"):
        registry.register(tiny_pipelines["ner"]["pipeline"], "x", metrics={"scores": {}})
    with pytest.raises(RegistryError, match="no primary metric"):
        registry.register(tiny_pipelines["ner"]["pipeline"], "x", metrics=[1, 2])
    textcat_metrics = tiny_pipelines["textcat"]["evaluation"] / "metrics.json"
    with pytest.raises(RegistryError, match="textcat evaluation, the pipeline is ner"):
        registry.register(tiny_pipelines["ner"]["pipeline"], "x", metrics=textcat_metrics)
    with pytest.raises(RegistryError, match="cannot be empty or hold quotes"):
        registry.register(tiny_pipelines["ner"]["pipeline"], "it's")


def test_promotion_is_gated_on_the_same_evaluation_set(tiny_pipelines, mlflow_project, tmp_path):
    ner = tiny_pipelines["ner"]
    client = MlflowClient(project.use_tracking())
    with pytest.raises(RegistryError, match="no 'challenger' version"):
        registry.promote("gated")

    registry.register(ner["pipeline"], "gated", metrics=_metrics(ner["evaluation"], 0.50))
    first = registry.promote("gated")
    assert first.promoted and first.reason == "no champion yet"
    assert str(client.get_model_version_by_alias("gated", "champion").version) == "1"

    worse = registry.register(_copy(ner["pipeline"], tmp_path, "worse"), "gated",
                              metrics=_metrics(ner["evaluation"], 0.40))
    decision = registry.promote("gated")
    assert not decision.promoted and (decision.challenger_score, decision.champion_score) == (0.40, 0.50)
    assert str(client.get_model_version_by_alias("gated", "champion").version) == "1"
    assert client.get_model_version("gated", worse.version).tags["promotion"].startswith("not promoted")

    registry.register(_copy(ner["pipeline"], tmp_path, "other-set"), "gated",
                      metrics=_metrics(ner["evaluation"], 0.90, test_sha256="0" * 64))
    with pytest.raises(RegistryError, match="not evaluated on the same set"):
        registry.promote("gated")

    better = registry.register(_copy(ner["pipeline"], tmp_path, "better"), "gated",
                               metrics=_metrics(ner["evaluation"], 0.60))
    decision = registry.promote("gated")
    assert decision.promoted and decision.champion == "1" and decision.challenger == better.version
    assert str(client.get_model_version_by_alias("gated", "champion").version) == better.version
    assert len(client.search_model_versions("name = 'gated'")) == 4  # nothing deleted
    run = client.get_run(decision.run_id)  # the decision and both scores are logged
    assert run.data.tags["decision"] == "promoted"
    assert run.data.metrics == {"challenger_score": 0.60, "champion_score": 0.50}


def test_promotion_can_evaluate_both_versions_on_a_test_file(tiny_pipelines, mlflow_project, tmp_path):
    textcat = tiny_pipelines["textcat"]
    registry.register(textcat["pipeline"], "tc", metrics=_metrics(textcat["evaluation"], 0.0))
    registry.promote("tc")
    registry.register(_copy(textcat["pipeline"], tmp_path, "same-weights"), "tc")  # no evaluation recorded
    with pytest.raises(RegistryError, match="has no evaluation"):
        registry.promote("tc")
    decision = registry.promote("tc", test=textcat["test"])
    # same weights, same scores on the file: a tie does not beat the champion
    assert not decision.promoted and decision.challenger_score == decision.champion_score
    assert decision.metric == "cats_score"

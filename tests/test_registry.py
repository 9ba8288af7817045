"""The model registry against a real SQLite store: registering, gated promotion, and the one resolver
of model references (pipeline folders, models:/NAME@ALIAS, models:/NAME/VERSION)."""

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from spacy_llm_components.stages import registry
from spacy_llm_components.stages.shared import references, tracking
from spacy_llm_components.stages.shared.references import ModelRef, RegistryError


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
    client = MlflowClient(tracking.use_tracking())
    version = client.get_model_version("ner-model", "1")
    meta = json.loads((ner["pipeline"] / "meta.json").read_text())["sllm"]
    assert version.tags["task"] == "ner" and version.tags["train_sha256"] == meta["train_sha256"]
    assert version.tags["primary_metric"] == "ents_f" and version.tags["eval_sha256"]
    assert "metric.ents_p" in version.tags
    assert str(client.get_model_version_by_alias("ner-model", "challenger").version) == "1"
    again = registry.register(ner["pipeline"], "ner-model")
    assert (again.version, again.created) == ("1", False)
    assert len(client.search_model_versions("name = 'ner-model'")) == 1


def test_a_new_evaluation_replaces_the_old_ones_tags_whole(tiny_pipelines, mlflow_project):
    ner = tiny_pipelines["ner"]
    registry.register(ner["pipeline"], "re-evaluated", metrics=ner["evaluation"] / "metrics.json")
    client = MlflowClient(tracking.use_tracking())
    before = client.get_model_version("re-evaluated", "1").tags
    assert {"metric.ents_p", "speed.docs_per_second", "speed.device", "speed.machine"} <= set(before)
    assert before["speed.device"] == "cpu"
    later = {"task": "ner", "primary": "ents_f", "scores": {"ents_f": 0.25}, "test_sha256": "other",
             "statistics": {"docs": 3, "docs_per_second": 12.5}}
    registry.set_evaluation("re-evaluated", "1", later)
    tags = client.get_model_version("re-evaluated", "1").tags
    assert (tags["primary_value"], tags["eval_sha256"], tags["speed.docs_per_second"]) == ("0.25", "other", "12.5")
    # the earlier evaluation's other scores and its device are gone, not left to be read as this one's
    assert not [k for k in tags if k.startswith(("metric.", "speed.")) and k not in ("metric.ents_f",
                                                                                      "speed.docs_per_second")]
    assert tags["task"] == "ner" and tags["train_sha256"] == before["train_sha256"]  # the rest is kept


def test_register_rejects_bad_input(tiny_pipelines, mlflow_project, tmp_path):
    """Every refusal leaves the MLflow store, the registry and the artifacts as they were."""
    from conftest import store_state

    registry.register(tiny_pipelines["textcat"]["pipeline"], "x")  # a store with something in it
    before = store_state(mlflow_project)
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
    assert store_state(mlflow_project) == before and before["models"] == {"x": ["1"]}


def test_promotion_is_gated_on_the_same_evaluation_set(tiny_pipelines, mlflow_project, tmp_path):
    ner = tiny_pipelines["ner"]
    client = MlflowClient(tracking.use_tracking())
    with pytest.raises(RegistryError, match="no 'challenger' version"):
        registry.promote("gated")

    registry.register(ner["pipeline"], "gated", metrics=_metrics(ner["evaluation"], 0.50))
    first = registry.promote("gated")
    assert first.promoted and first.reason == "there was no champion"
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


# --------------------------------------------------------------------------------------------
# the model reference resolver


@pytest.mark.parametrize("uri, ref", [
    ("models:/ner-model@champion", ModelRef("ner-model", alias="champion")),
    ("models:/ner-model/12", ModelRef("ner-model", version="12")),
    ("models:/m_1@v2", ModelRef("m_1", alias="v2")),
])
def test_parse_model_uri(uri, ref):
    assert references.parse_model_uri(uri) == ref and ref.uri == uri


@pytest.mark.parametrize("uri, problem", [
    ("models:/", "expected models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("models:/just-a-name", "expected models:/NAME@ALIAS"),
    ("models:/a/b/3", "expected models:/NAME@ALIAS"),
    ("models:/@champion", "expected models:/NAME@ALIAS"),
    ("models:/m/latest", "must be a number"),
    ("runs:/abc/model", "expected models:/NAME@ALIAS"),
])
def test_bad_model_uris_say_what_is_expected(uri, problem):
    with pytest.raises(RegistryError, match=problem):
        references.parse_model_uri(uri)


def test_one_resolver_for_folders_aliases_and_versions(tiny_pipelines, mlflow_project, tmp_path):
    from spacy_llm_components.artifacts import sha256_tree

    ner = tiny_pipelines["ner"]
    folder = ner["pipeline"]
    assert references.pin_model(str(folder)) == str(folder.resolve())
    assert references.local_pipeline(folder) == folder.resolve()
    with pytest.raises(RegistryError, match="neither a models:/ URI nor a spaCy pipeline folder"):
        references.pin_model(str(tmp_path))

    first = registry.register(folder, "resolve", metrics=ner["evaluation"] / "metrics.json")
    registry.promote("resolve")
    assert references.pin_model("models:/resolve@champion") == "models:/resolve/1"
    assert references.pin_model("models:/resolve/7") == "models:/resolve/7"  # a version is taken as it is
    with pytest.raises(RegistryError, match="has no alias 'staging'"):
        references.pin_model("models:/resolve@staging")

    local = references.local_pipeline("models:/resolve@champion")
    assert local == references.local_pipeline("models:/resolve/1")  # downloaded once, then cached
    assert (local / "meta.json").is_file() and sha256_tree(local) == first.tags["pipeline_sha256"]
    assert not local.is_relative_to(mlflow_project)  # a download, not the store's own artifact folder

    second = registry.register(_copy(folder, tmp_path, "second"), "resolve",
                               metrics=_metrics(ner["evaluation"], 1.0))
    registry.promote("resolve")  # the alias moves: the pinned reference follows it
    assert references.pin_model("models:/resolve@champion") == f"models:/resolve/{second.version}"
    moved = references.local_pipeline("models:/resolve@champion")
    assert moved != local and json.loads((moved / "meta.json").read_text())["description"] == "second"

"""The compress flow against a real (temporary) Prefect API and a real MLflow SQLite store: variants are
registered with their method, source version, score and speed, and get their alias only within max-drop."""

import json
from pathlib import Path

import pytest
import spacy
import torch
from conftest import demo_files
from mlflow.tracking import MlflowClient
from spacy_llm_components.flows import lifecycle
from spacy_llm_components.flows.compress import _speedup, compress

from spacy_llm_components.artifacts import sha256_file
from spacy_llm_components.data import DataError
from spacy_llm_components.stages import registry
from spacy_llm_components.stages.compress import CompressError, quantized_copy
from spacy_llm_components.stages.shared import references, tracking

pytestmark = pytest.mark.slow
TRAINING = {"max_steps": 2, "batch_size": 8, "eval_steps": 2, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _client() -> MlflowClient:
    return MlflowClient(tracking.use_tracking())


def _versions(name: str) -> dict:
    return {str(v.version): v for v in _client().search_model_versions(f"name = '{name}'")}


def _alias(name: str, alias: str):
    version = references.version_by_alias(name, alias)
    return None if version is None else str(version.version)


def test_compress_registers_gated_variants_with_their_tags(tiny_pipelines, mlflow_project):
    parts = tiny_pipelines["ner"]
    teacher = registry.register(parts["pipeline"], "small-ner", metrics=parts["evaluation"] / "metrics.json")
    corpus = parts["corpus"]
    result = compress("models:/small-ner@challenger", str(parts["test"]), ["int8", "distill"], max_drop=100.0,
                      train=str(corpus / "train.spacy"), dev=str(corpus / "dev.spacy"), finetune_config=TRAINING,
                      progress=False)
    assert result["source"] == "models:/small-ner/1"
    versions = _versions("small-ner")
    assert sorted(versions) == ["1", "2", "3"]
    test_hash = sha256_file(parts["test"])
    for variant, method, alias in zip(result["variants"], ("int8", "distill"), ("int8", "distilled")):
        tags = versions[variant["version"]].tags
        evaluation = json.loads((Path(variant["pipeline"]).parent / "evaluation" / "metrics.json").read_text())
        assert tags["compression"] == method and tags["compression.source_version"] == "1"
        assert float(tags["compression.source_score"]) == float(teacher.tags["primary_value"])
        assert float(tags["primary_value"]) == evaluation["scores"]["ents_f"] == variant["score"]
        assert tags["eval_sha256"] == test_hash == teacher.tags["eval_sha256"]  # the teacher's test file
        for key in ("docs_per_second", "words_per_second", "word_pieces_per_second"):
            assert float(tags[f"speed.{key}"]) == evaluation["statistics"][key] > 0
        assert tags["speed.device"] == "cpu" and tags["speed.machine"] == evaluation["statistics"]["machine"]
        assert variant["gate"]["promoted"] and _alias("small-ner", alias) == variant["version"]
        assert tags["promotion"].startswith(f"promoted to {alias}: ents_f")
    assert versions[result["variants"][1]["version"]].tags["compression.kept_layers"] == "0"
    cards = [versions[v["version"]].description for v in result["variants"]]
    source_score = f"(its score {100 * float(teacher.tags['primary_value']):.2f})"
    assert f"**Compression**: int8 of version 1 {source_score}" in cards[0]
    assert f"**Compression**: distill of version 1, keeping encoder layers 0 {source_score}" in cards[1]
    speedup = float(versions[result["variants"][0]["version"]].tags["compression.speedup"])
    assert f"; {speedup:.2f}x its docs/s" in cards[0]
    # champion and challenger rank full models: compression leaves them alone
    assert _alias("small-ner", "challenger") == "1" and _alias("small-ner", "champion") is None
    int8 = spacy.load(references.local_pipeline("models:/small-ner@int8"))
    assert int8.get_pipe("ner").quantize == "int8"
    student = json.loads((references.local_pipeline("models:/small-ner@distilled") / "meta.json").read_text())["sllm"]
    assert student["distillation"]["teacher"] == "models:/small-ner/1"

    again = compress("models:/small-ner/1", str(parts["test"]), ["int8", "distill"], max_drop=100.0,
                     train=str(corpus / "train.spacy"), dev=str(corpus / "dev.spacy"), finetune_config=TRAINING,
                     progress=False)  # cached steps, same pipelines: the same versions
    assert [v["version"] for v in again["variants"]] == ["2", "3"] and sorted(_versions("small-ner")) == ["1", "2", "3"]


def _variant(pipeline: Path, folder: Path, description: str) -> Path:
    """An int8 copy made distinct (another description) so that it registers as its own version."""
    copy = quantized_copy(pipeline, folder)
    meta = json.loads((copy / "meta.json").read_text())
    meta["description"] = description
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def _metrics(score: float, test_sha256: str = "abc") -> dict:
    return {"task": "ner", "primary": "ents_f", "scores": {"ents_f": score}, "test_sha256": test_sha256,
            "statistics": {"docs": 10, "docs_per_second": 100.0}}


def test_the_gate_moves_the_alias_only_within_max_drop(tiny_pipelines, mlflow_project, tmp_path):
    source = tiny_pipelines["ner"]["pipeline"]
    registry.register(source, "gated", metrics=_metrics(0.80))
    source_tags = {"compression": "int8", "compression.source_version": "1"}
    close = registry.register(_variant(source, tmp_path / "a", "a"), "gated", metrics=_metrics(0.796),
                              tags=source_tags, alias=None)
    decision = registry.gate_variant("gated", close.version, "int8", max_drop=0.5)
    assert decision.promoted and _alias("gated", "int8") == close.version == "2"
    assert "0.40 points below version 1" in decision.reason

    far = registry.register(_variant(source, tmp_path / "b", "b"), "gated", metrics=_metrics(0.79),
                            tags=source_tags, alias=None)
    decision = registry.gate_variant("gated", far.version, "int8", max_drop=0.5)
    assert not decision.promoted and _alias("gated", "int8") == "2"  # the alias stays on the close variant
    assert _client().get_model_version("gated", far.version).tags["promotion"].startswith("not promoted to int8")
    assert registry.gate_variant("gated", far.version, "int8", max_drop=1.0).promoted  # exactly 1.0 point lost
    assert _alias("gated", "challenger") == "1"  # registering variants moved no challenger

    other_set = registry.register(_variant(source, tmp_path / "c", "c"), "gated", metrics=_metrics(0.85, "other"),
                                  tags=source_tags, alias=None)
    with pytest.raises(references.RegistryError, match="not evaluated on the same set"):
        registry.gate_variant("gated", other_set.version, "int8", max_drop=0.5)
    with pytest.raises(references.RegistryError, match="no compressed variant"):
        registry.gate_variant("gated", "1", "int8", max_drop=0.5)


def test_bad_compress_input_writes_no_version(tiny_pipelines, mlflow_project, tmp_path, monkeypatch):
    parts = tiny_pipelines["ner"]
    registry.register(parts["pipeline"], "refused", metrics=parts["evaluation"] / "metrics.json")
    workdir = tmp_path / "work"
    textcat_test = demo_files("textcat")[2]
    with pytest.raises(DataError, match=r"test.csv: cannot read \.csv for ner"):
        compress("models:/refused/1", str(textcat_test), ["int8"], workdir=str(workdir))
    squad_test = demo_files("qa")[2]
    with pytest.raises(DataError, match=r"test.json: cannot read \.json for ner"):
        compress("models:/refused/1", str(squad_test), ["int8"], workdir=str(workdir))
    with pytest.raises(CompressError, match="register the pipeline first"):
        compress(str(parts["pipeline"]), str(parts["test"]), ["int8"], workdir=str(workdir))
    with pytest.raises(CompressError, match="use one or more of int8, distill"):
        compress("models:/refused/1", str(parts["test"]), ["int4"], workdir=str(workdir))
    with pytest.raises(CompressError, match="distillation needs the prepared training data"):
        compress("models:/refused/1", str(parts["test"]), ["distill"], workdir=str(workdir))
    with pytest.raises(CompressError, match="max_drop -1"):
        compress("models:/refused/1", str(parts["test"]), ["int8"], max_drop=-1, workdir=str(workdir))
    corpus = parts["corpus"]
    data = {"train": str(corpus / "train.spacy"), "dev": str(corpus / "dev.spacy"), "workdir": str(workdir)}
    for settings, message in (({"layers": 0}, "--layers 0: must be >= 1"),
                              ({"layers": 3}, "--layers 3: the student needs 1 to 2 layers"),
                              ({"keep": "0,2"}, "--keep '0,2': the teacher has 2 layers"),
                              ({"alpha": 1.5}, "--alpha 1.5"), ({"temperature": 0}, "--temperature 0")):
        # int8 is listed first: the distillation settings are refused before any variant is made
        with pytest.raises(CompressError, match=message):
            compress("models:/refused/1", str(parts["test"]), ["int8", "distill"], distill_config=settings, **data)
    with monkeypatch.context() as m:  # distillation's device is checked before any variant too (on a machine
        m.setattr(torch.cuda, "is_available", lambda: False)  # without a GPU, whatever this one has)
        with pytest.raises(ValueError, match="device 'cuda:0': no CUDA device"):
            compress("models:/refused/1", str(parts["test"]), ["int8", "distill"],
                     finetune_config={**TRAINING, "device": "cuda:0"}, **data)
    other = tiny_pipelines["textcat"]["corpus"]  # another task's prepared data
    with pytest.raises(DataError, match="teacher's task"):
        compress("models:/refused/1", str(parts["test"]), ["int8", "distill"], train=str(other / "train.spacy"),
                 dev=str(other / "dev.spacy"), workdir=str(workdir))
    assert sorted(_versions("refused")) == ["1"] and not workdir.exists()


def test_speedup_is_recorded_only_between_evaluations_on_one_device_and_machine():
    statistics = {"docs_per_second": 300.0, "device": "cpu", "machine": "AMD EPYC (2 cores)"}
    source = {"speed.docs_per_second": "100.0", "speed.device": "cpu", "speed.machine": "AMD EPYC (2 cores)"}
    assert _speedup(statistics, source) == 3.0
    assert _speedup(statistics, {**source, "speed.device": "cuda:0", "speed.machine": "NVIDIA H100"}) is None
    assert _speedup(statistics, {**source, "speed.machine": "Intel Xeon (2 cores)"}) is None
    assert _speedup(statistics, {"speed.docs_per_second": "100.0"}) is None  # registered before devices were tagged


def test_run_refuses_bad_compression_settings_before_preparing_anything(ckpts, mlflow_project):
    train, dev, test = demo_files("textcat")
    params = dict(task="textcat", train=[str(train)], name="run-refused", dev=str(dev), test=str(test),
                  finetune_config={"base_model": str(ckpts["base"]), **TRAINING}, progress=False)
    layers = json.loads((Path(ckpts["base"]) / "config.json").read_text())["num_hidden_layers"]
    for extra, message in (({"max_drop": -0.5}, "max_drop -0.5"),
                           ({"distill_config": {"layers": 0}}, "--layers 0"),
                           ({"distill_config": {"layers": layers + 1}}, f"--layers {layers + 1}"),
                           ({"distill_config": {"alpha": -1}}, "--alpha -1"),
                           ({"gate": "closest"}, "gate 'closest'")):
        with pytest.raises(ValueError, match=message):  # (CompressError, RegistryError for the gate)
            lifecycle.train_pipeline(**params, compress_methods=["int8", "distill"], **extra)
    assert not (mlflow_project / "training" / "run-refused").exists()
    assert _versions("run-refused") == {}


def test_run_with_compress_registers_the_teacher_then_its_int8_variant(ckpts, mlflow_project):
    train, dev, test = demo_files("textcat")
    result = lifecycle.train_pipeline("textcat", [str(train)], "run-tc", dev=str(dev), test=str(test),
                                      finetune_config={"base_model": str(ckpts["base"]), **TRAINING},
                                      compress_methods=["int8"], max_drop=100.0, progress=False, gate="no-worse")
    assert result["version"] == "1"
    (variant,) = result["compression"]["variants"]
    assert "(no-worse)" in variant["gate"]["reason"] and "CI [" in variant["gate"]["reason"]  # the paired gate
    assert (variant["version"], variant["source_version"], variant["method"]) == ("2", "1", "int8")
    assert variant["source_score"] == result["score"]  # the teacher's registered evaluation, on the same file
    root = mlflow_project / "training" / "run-tc"
    assert not (root / "compressed" / "v1-evaluation").exists()  # so it was not evaluated again
    assert (root / "compressed" / "v1-int8" / "model" / "config.cfg").is_file()
    assert _alias("run-tc", "int8") == "2" and _alias("run-tc", "challenger") == "1"


def test_compress_command_prints_each_variant_and_its_gate(tiny_pipelines, mlflow_project):
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    parts = tiny_pipelines["textcat"]
    registry.register(parts["pipeline"], "cli-tc", metrics=parts["evaluation"] / "metrics.json")
    result = CliRunner().invoke(app, ["compress", "models:/cli-tc@challenger", "--test", str(parts["test"]),
                                      "--methods", "int8", "--max-drop", "0.5"])
    assert result.exit_code == 0, result.output
    version = _versions("cli-tc")["2"]
    drop = 100 * (float(version.tags["compression.source_score"]) - float(version.tags["primary_value"]))
    promoted = drop <= 0.5 + 1e-9
    assert f"int8: cli-tc version 2, cats_score {100 * float(version.tags['primary_value']):.2f}" in result.output
    assert ("alias int8" in result.output) == promoted and (_alias("cli-tc", "int8") == "2") == promoted
    result = CliRunner().invoke(app, ["compress", "models:/cli-tc/1", "--test", str(parts["test"]), "--methods",
                                      "int8,prune"])
    assert result.exit_code == 2 and "use one or more of int8, distill" in result.output


def test_the_no_worse_gate_compares_the_variant_with_its_source_document_by_document(tiny_pipelines,
                                                                                     mlflow_project):
    from spacy_llm_components.stages.shared.scoring import compare_pipelines

    parts = tiny_pipelines["textcat"]
    registry.register(parts["pipeline"], "nw", metrics=parts["evaluation"] / "metrics.json")
    with pytest.raises(references.RegistryError, match="gate 'strict': use one of drop, no-worse"):
        compress("models:/nw/1", str(parts["test"]), ["int8"], gate="strict", progress=False)
    assert sorted(_versions("nw")) == ["1"]
    corpus = parts["corpus"]
    result = compress("models:/nw/1", str(parts["test"]), ["int8", "distill"], max_drop=0.5, gate="no-worse",
                      train=str(corpus / "train.spacy"), dev=str(corpus / "dev.spacy"), finetune_config=TRAINING,
                      progress=False)
    assert [v["method"] for v in result["variants"]] == ["int8", "distill"]  # (every method gated, not only the first)
    for variant in result["variants"]:
        want = compare_pipelines(references.local_pipeline("models:/nw/1"), variant["pipeline"], parts["test"])
        low = want.primary_difference.interval[0]
        assert variant["gate"]["promoted"] == (100 * low > -0.5)
        assert f"CI [{100 * low:+.2f}," in variant["gate"]["reason"] and "(no-worse)" in variant["gate"]["reason"]

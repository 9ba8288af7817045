"""Prefect flows against a real (temporary) Prefect API: caching, retries, resume, artifacts,
batch annotation on threads and on a local Dask cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import demo_files
from mlflow.tracking import MlflowClient
from spacy_llm_components.flows import lifecycle, steps
from spacy_llm_components.flows.annotate import annotate_with, shard_path

from spacy_llm_components.data import DataError
from spacy_llm_components.stages import registry
from spacy_llm_components.stages.shared import tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    """One temporary Prefect server for the whole session (its first start migrates a database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _runs(step):
    client = MlflowClient(tracking.use_tracking())
    return client.search_runs([tracking.experiment_id()], f"tags.`sllm.step` = '{step}'")


def _config(ckpts, **kwargs):
    return {"base_model": str(ckpts["base"]), "max_steps": 4, "batch_size": 8, "eval_steps": 2, **kwargs}


def test_train_pipeline_caches_finished_steps(ckpts, mlflow_project):
    train, dev, test = demo_files("ner")
    params = dict(task="ner", train=[str(train)], name="flow-ner", dev=str(dev), test=str(test),
                  finetune_config=_config(ckpts))
    first = lifecycle.train_pipeline(**params)
    assert first["version"] == "1" and first["primary"] == "ents_f"
    model = Path(first["pipeline"])
    assert model == mlflow_project / "training" / "flow-ner" / "model"
    mtime = (model / "meta.json").stat().st_mtime_ns
    counts = {step: len(_runs(step)) for step in ("finetune", "evaluate", "register")}
    assert counts == {"finetune": 1, "evaluate": 1, "register": 1}

    again = lifecycle.train_pipeline(**params)  # same data, settings, base model: nothing is redone
    assert again["version"] == "1" and again["scores"] == first["scores"]
    assert (model / "meta.json").stat().st_mtime_ns == mtime
    assert {step: len(_runs(step)) for step in counts} == counts

    changed = lifecycle.train_pipeline(**{**params, "finetune_config": _config(ckpts, max_steps=6)})
    assert changed["version"] == "2"  # another config: fine-tuned and registered anew
    assert len(_runs("finetune")) == 2

    import shutil

    shutil.rmtree(model.parent / "evaluation")  # a deleted output is rebuilt, not trusted from the cache
    rebuilt = lifecycle.train_pipeline(**{**params, "finetune_config": _config(ckpts, max_steps=6)})
    assert (model.parent / "evaluation" / "metrics.json").is_file() and rebuilt["version"] == "2"


def test_a_cache_hit_on_overwritten_outputs_runs_again(mlflow_project, tmp_path):
    """A, then B, then A again into one folder: the third run must not trust A's cache entry,
    whose files now hold B."""
    rows = {"a": "text,label\nfine day,pos\nbad day,neg\ngood one,pos\nawful one,neg\n",
            "b": "text,label\nlovely,pos\nterrible,neg\nsplendid,pos\ndreadful,neg\n"}
    files = {}
    for key, text in rows.items():
        files[key] = tmp_path / f"{key}.csv"
        files[key].write_text(text)
    out = str(tmp_path / "corpus")
    runs = [steps.prepare_data("textcat", [str(files[k])], out, dev_fraction=0.5) for k in "aba"]
    assert runs[0]["content_hash"] == runs[2]["content_hash"] != runs[1]["content_hash"]
    summary = json.loads((tmp_path / "corpus" / "summary.json").read_text())
    assert summary["content_hash"] == runs[0]["content_hash"]  # the files on disk are A's again


def test_evaluate_publishes_table_and_markdown_artifacts(tiny_pipelines, mlflow_project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    parts = tiny_pipelines["textcat"]
    steps.evaluate(str(parts["pipeline"]), str(parts["test"]), str(mlflow_project / "eval"), name="My Model_1")
    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["my-model-1-textcat-metrics"])))
        report = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["my-model-1-textcat-report"])))
    rows = json.loads(table[0].data)
    assert table[0].type == "table" and {row["label"] for row in rows} == {"negative", "positive"}
    assert {"p", "r", "f", "support"} <= set(rows[0])
    assert report[0].type == "markdown" and "cats_accuracy" in report[0].data


def _locked_sqlite_error(tmp_path):
    import sqlite3

    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("create table t (x)")
    holder.execute("begin exclusive")
    try:
        sqlite3.connect(tmp_path / "locked.db", timeout=0).execute("insert into t values (1)")
    except sqlite3.OperationalError as err:
        return err
    finally:
        holder.close()


@pytest.mark.parametrize("error", ["network", "sqlite-locked", "mlflow-unavailable"])
def test_transient_errors_are_retried_and_bad_input_is_not(tmp_path, mlflow_project, error):
    from mlflow.exceptions import RestException
    from prefect import flow, task

    attempts = tmp_path / "attempts"
    first_error = {"network": lambda: ConnectionError("tracking server restarting"),
                   "sqlite-locked": lambda: _locked_sqlite_error(tmp_path),
                   "mlflow-unavailable": lambda: RestException({"error_code": "TEMPORARILY_UNAVAILABLE",
                                                                "message": "try again"})}[error]

    @task(**{**steps.RETRIES, "retry_delay_seconds": 0})
    def flaky():
        attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
        if len(attempts.read_text()) < 2:
            raise first_error()
        return "done"

    @flow
    def uses_flaky():
        return flaky()

    state = uses_flaky(return_state=True)
    assert state.is_completed() and attempts.read_text() == "xx"
    assert [r.run_count for r in _task_runs(state.state_details.flow_run_id)] == [2]


def test_bad_input_is_not_retried(tmp_path, mlflow_project):
    bad = tmp_path / "bad.conll"
    bad.write_text("Lena\tB-PER\nHartmann\n")
    state = steps.prepare_data("ner", [str(bad)], str(tmp_path / "corpus"), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match="bad.conll, line 2"):
        state.result()
    assert [r.run_count for r in _task_runs(state.state_details.flow_run_id)] == [1]  # no retry on bad input
    assert not (tmp_path / "corpus").exists()


def test_a_killed_finetune_resumes_from_its_checkpoint(ckpts, mlflow_project, tmp_path, trainer_steps):
    """A real kill (SIGKILL of `sllm run` mid-training), then the same run again."""
    train, dev, _ = demo_files("ner")
    workdir = tmp_path / "work"
    args = [sys.executable, "-m", "spacy_llm_components.cli", "run", "ner", "--train", str(train), "--dev", str(dev),
            "--name", "killed", "--workdir", str(workdir), "--base-model", str(ckpts["base"]), "--max-steps", "300",
            "--eval-steps", "5", "--batch-size", "4"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the child runs on its own temporary server, as a user would
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = workdir / "model" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, "the run ended before a checkpoint was written"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (workdir / "model" / "meta.json").exists()

    result = lifecycle.train_pipeline("ner", [str(train)], "killed", dev=str(dev), workdir=str(workdir),
                                      finetune_config={"base_model": str(ckpts["base"]), "max_steps": 300,
                                                       "eval_steps": 5, "batch_size": 4})
    training = json.loads((workdir / "model" / "metrics.json").read_text())["training"]
    assert training["resumed_from"] >= 5 and training["steps"] == 300
    # this process ran only the steps after the checkpoint the killed one left
    assert [step for step, _ in trainer_steps] == list(range(training["resumed_from"] + 1, 301))
    assert result["version"] == "1"


def _corpus(path: Path, n: int) -> Path:
    names = ["Lena Hartmann", "Brightwater Foods", "Lindenfeld", "Tomas Ekdahl"]
    path.write_text("".join(json.dumps({"id": i, "text": f"{names[i % 4]} visited Ostbrook on day {i}."}) + "\n"
                            for i in range(n)))
    return path


def _lines(folder: Path) -> list:
    return [json.loads(line) for shard in sorted(folder.glob("shard-*.jsonl")) for line in shard.open()]


def test_annotate_shards_a_corpus_and_skips_finished_shards(tiny_pipelines, mlflow_project, tmp_path):
    parts = tiny_pipelines["ner"]
    registry.register(parts["pipeline"], "annotator", metrics=parts["evaluation"] / "metrics.json")
    registry.promote("annotator")
    corpus, out = _corpus(tmp_path / "corpus.jsonl", 25), tmp_path / "out"

    result = annotate_with("threads")("models:/annotator@champion", str(corpus), str(out), lines_per_shard=10)
    assert (result["shards"], result["done_before"], result["written"]) == (3, 0, 25)
    assert result["model"] == "models:/annotator/1"  # the alias is pinned for the whole job
    lines = _lines(out)
    assert [r["id"] for r in lines] == list(range(25)) and all("ents" in r for r in lines)

    shard_path(out, 1).unlink()
    again = annotate_with("threads")("models:/annotator@champion", str(corpus), str(out), lines_per_shard=10)
    assert (again["done_before"], again["written"]) == (2, 10)
    assert _lines(out) == lines

    with pytest.raises(ValueError, match="different lines_per_shard"):
        annotate_with("threads")("models:/annotator@champion", str(corpus), str(out), lines_per_shard=5)


def test_annotate_on_a_local_dask_cluster(tiny_pipelines, mlflow_project, tmp_path):
    corpus, out = _corpus(tmp_path / "corpus.jsonl", 12), tmp_path / "out"
    pipeline = str(tiny_pipelines["ner"]["pipeline"])
    result = annotate_with("dask", workers=2)(pipeline, str(corpus), str(out), lines_per_shard=4)
    assert (result["shards"], result["written"]) == (3, 12)
    threads = annotate_with("threads")(pipeline, str(corpus), str(tmp_path / "threads"), lines_per_shard=4)
    assert threads["written"] == 12 and _lines(out) == _lines(tmp_path / "threads")


def test_annotate_names_the_bad_line(tiny_pipelines, mlflow_project, tmp_path):
    corpus = _corpus(tmp_path / "corpus.jsonl", 6)
    with corpus.open("a") as f:
        f.write('{"text": 5}\n')
    pipeline = str(tiny_pipelines["ner"]["pipeline"])
    with pytest.raises(DataError, match=r"corpus.jsonl, line 7: \"text\" must be a string"):
        annotate_with("threads")(pipeline, str(corpus), str(tmp_path / "out"), lines_per_shard=4)
    assert not shard_path(tmp_path / "out", 1).exists()  # the failed shard wrote nothing
    skipped = annotate_with("threads")(pipeline, str(corpus), str(tmp_path / "out2"), lines_per_shard=4,
                                       skip_bad=True)
    assert skipped["written"] == 6 and skipped["skipped"][0]["where"] == "line 7"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout} s")


def test_schedule_serves_train_pipeline_on_a_real_prefect_server(ckpts, mlflow_project, tmp_path):
    """`prefect server start` (schedules need a real server), then `sllm schedule --interval`: the
    scheduled train_pipeline runs, registers and promotes a model."""
    import requests

    train, dev, test = demo_files("ner")
    port, bin_dir = _free_port(), Path(sys.executable).parent
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**base_env, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_UI_ENABLED": "false",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler = None

    def healthy():
        try:
            return requests.get(f"{api}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def completed_runs():
        body = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        runs = requests.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()
        return [r for r in runs if r.get("deployment_id")]

    try:
        _wait(healthy, 180, "the Prefect server did not answer")
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "spacy_llm_components.cli", "schedule", "ner", "--train", str(train), "--dev",
             str(dev), "--test", str(test), "--name", "nightly", "--interval", "5", "--base-model", str(ckpts["base"]), "--max-steps", "2",
             "--workdir", str(tmp_path / "work")],
            env={**base_env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "runner-home"),
                 "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: scheduler.poll() is None and completed_runs(), 300, "no scheduled run completed")
    finally:
        for proc in (scheduler, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
    client = MlflowClient(tracking.use_tracking())
    assert str(client.get_model_version_by_alias("nightly", "champion").version) == "1"


def test_schedule_without_a_server_says_how_to_start_one(monkeypatch):
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    train, _, _ = demo_files("ner")
    result = CliRunner().invoke(app, ["schedule", "ner", "--train", str(train), "--name", "x", "--cron", "0 3 * * *",
                                      "--no-promote"])
    assert result.exit_code == 2 and "sllm ui prefect" in result.output


def test_run_command_reports_bad_input_and_writes_nothing(mlflow_project, tmp_path):
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood,pos\n,neg\n")
    result = CliRunner().invoke(app, ["run", "textcat", "--train", str(bad), "--name", "bad",
                                      "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "bad.csv, line 3" in result.output and "empty" in result.output
    assert not (tmp_path / "work" / "corpus").exists()


def test_run_strict_refuses_broken_tag_sequences_and_the_lenient_run_warns(mlflow_project, tmp_path, caplog):
    """`sllm run --strict` refuses a CoNLL sequence that breaks its scheme before any step writes; without
    it, preparing warns with the file, the count and the line of each repair (summary.json lists them all)."""
    from test_cli import IOB2_BROKEN
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app
    from spacy_llm_components.stages.prepare import prepare

    train = tmp_path / "train.conll"
    train.write_text(IOB2_BROKEN)
    (tmp_path / "dev.conll").write_text("Oslo B-LOC\n")
    result = CliRunner().invoke(app, ["run", "ner", "--train", str(train), "--dev", str(tmp_path / "dev.conll"),
                                      "--name", "strict", "--workdir", str(tmp_path / "work"), "--strict"])
    assert result.exit_code == 2, result.output
    assert f"{train}, line 5: 'I-PER' after 'B-ORG' breaks IOB2 (--strict refuses it)" in result.output
    assert not (tmp_path / "work" / "corpus").exists()
    with caplog.at_level("WARNING", logger="spacy_llm_components"):
        prepare("ner", train, tmp_path / "lenient", dev=tmp_path / "dev.conll")
    assert f"{train}: 1 tag sequence(s) broke their scheme" in caplog.text and "line 5: 'I-PER' after" in caplog.text


def test_sllm_annotate_writes_what_the_pipeline_predicts(tiny_pipelines, mlflow_project, tmp_path):
    from conftest import assert_same_predictions, in_process_predictions
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    pipeline = tiny_pipelines["ner"]["pipeline"]
    corpus, out = _corpus(tmp_path / "corpus.jsonl", 10), tmp_path / "out"
    result = CliRunner().invoke(app, ["annotate", str(pipeline), str(corpus), "-o", str(out), "--lines-per-shard", "4"])
    assert result.exit_code == 0, result.output
    assert f"3 shards in {out} (0 done before, 10 records annotated now, 0 skipped)" in result.output
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    want = [{**r, **p} for r, p in zip(records, in_process_predictions(pipeline, records))]
    assert_same_predictions(_lines(out), want)
    assert any(r["ents"] for r in want)

    again = CliRunner().invoke(app, ["annotate", str(pipeline), str(corpus), "-o", str(out), "--lines-per-shard", "4"])
    assert "(3 done before, 0 records annotated now" in again.output


def test_sllm_run_with_promote_registers_and_makes_the_champion(ckpts, mlflow_project, tmp_path):
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    train, dev, test = demo_files("textcat")
    args = ["run", "textcat", "--train", str(train), "--dev", str(dev), "--test", str(test), "--name", "cli-run",
            "--workdir", str(tmp_path / "work"), "--base-model", str(ckpts["base"]), "--max-steps", "2", "--promote"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    score = json.loads((tmp_path / "work" / "evaluation" / "metrics.json").read_text())["scores"]["cats_score"]
    assert f"cli-run version 1: cats_score {100 * score:.2f}" in result.output
    assert "promotion: there was no champion" in result.output
    client = MlflowClient(tracking.use_tracking())
    assert str(client.get_model_version_by_alias("cli-run", "champion").version) == "1"


# -- domain-adaptive pre-training in the pipeline ------------------------------------------------------
def test_train_pipeline_pretrains_the_encoder_first_and_caches_it(ckpts, mlflow_project, tmp_path):
    from spacy_llm_components.artifacts import sha256_model

    corpus = tmp_path / "domain.txt"
    corpus.write_text("".join(f"Lena Hartmann joined Brightwater Foods in Lindenfeld in {1990 + i} .\n"
                              for i in range(40)))
    train, dev, test = demo_files("ner")
    params = dict(task="ner", train=[str(train)], name="adapted-ner", dev=str(dev), test=str(test),
                  finetune_config=_config(ckpts), pretrain_corpus=[str(corpus)],
                  pretrain_config={"max_steps": 2, "eval_steps": 2, "batch_size": 8, "max_length": 32})
    first = lifecycle.train_pipeline(**params)
    encoder = mlflow_project / "training" / "adapted-ner" / "encoder"
    assert first["encoder"]["encoder"] == str(encoder)
    pretrained = json.loads((encoder / "metrics.json").read_text())
    assert pretrained["base_model"] == str(ckpts["base"])  # the fine-tune's base model, adapted
    assert first["encoder"]["perplexity_after"] == pretrained["perplexity_after"]
    meta = json.loads((Path(first["pipeline"]) / "meta.json").read_text())["sllm"]
    assert meta["base_model"] == str(encoder) and meta["encoder"]["encoder_sha256"] == sha256_model(encoder)
    tags = MlflowClient(tracking.use_tracking()).get_model_version("adapted-ner", first["version"]).tags
    assert tags["encoder_sha256"] == sha256_model(encoder) and tags["encoder_path"] == str(encoder)
    counts = {step: len(_runs(step)) for step in ("pretrain", "finetune", "evaluate", "register")}
    assert counts == {"pretrain": 1, "finetune": 1, "evaluate": 1, "register": 1}
    mtime = (encoder / "model.safetensors").stat().st_mtime_ns

    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    # the same through `sllm run`: same corpus, data and settings, so nothing is redone
    again = CliRunner().invoke(app, [
        "run", "ner", "--train", str(train), "--dev", str(dev), "--test", str(test), "--name", "adapted-ner",
        *(f"--{k.replace('_', '-')}={v}" for k, v in _config(ckpts).items()), "--pretrain-corpus", str(corpus),
        "--pretrain-max-steps", "2", "--pretrain-eval-steps", "2", "--pretrain-batch-size", "8",
        "--pretrain-max-length", "32"])
    assert again.exit_code == 0, again.output
    assert f"adapted-ner version {first['version']}:" in again.output
    assert (encoder / "model.safetensors").stat().st_mtime_ns == mtime
    assert {step: len(_runs(step)) for step in counts} == counts

    corpus.write_text(corpus.read_text() + "Brightwater Foods opened a mill in Lindenfeld .\n")  # new domain text
    changed = lifecycle.train_pipeline(**params)
    assert len(_runs("pretrain")) == 2 and len(_runs("finetune")) == 2 and changed["version"] != first["version"]


@pytest.mark.slow
def test_the_demo_reports_what_the_registry_holds_and_its_progress(ckpts, mlflow_project):
    """`sllm demo` (one task, two training steps on the tiny base): each stage line says where the run is,
    and the summary names the champion and its score as the registry has them after the promotion."""
    import socket

    from spacy_llm_components.cli.demo import run_demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = []
    results = run_demo(port, echo=lines.append, tasks=["textcat"],
                       overrides={"base_model": str(ckpts["base"]), "max_steps": 2, "epochs": 1})
    text = "\n".join(lines)
    from spacy_llm_components.stages.shared.references import version_by_alias

    champion = version_by_alias("demo-textcat", "champion")
    assert str(champion.version) == str(results["textcat"]["version"]) == "1"
    score = 100 * float(champion.tags["primary_value"])
    assert f"promoted (there was no champion); champion: version 1, cats_score {score:.1f}" in text
    assert "=== textcat (1 of 1)" in text and "textcat took " in text and "next: serving the champions" in text
    assert '"cats"' in text  # the served champion answered


def test_the_finetune_tasks_flow_trains_heads_together_caches_and_logs_one_run(ckpts, mlflow_project, tmp_path):
    from spacy_llm_components.stages.prepare import prepare

    data = {}
    for task in ("ner", "textcat"):
        train, dev, _ = demo_files(task)
        data[task] = prepare(task, [train], tmp_path / task, dev=dev).output
    params = dict(tasks=["ner", "textcat"], train=[str(data[t] / "train.spacy") for t in ("ner", "textcat")],
                  dev=[str(data[t] / "dev.spacy") for t in ("ner", "textcat")], output=str(tmp_path / "model"),
                  config=_config(ckpts), multitask={"sampling": "temperature"}, progress=False)
    first = steps.finetune_tasks(**params)
    assert first["primary"] == "weighted_score" and {"ner_ents_f", "textcat_cats_score"} <= set(first["dev"])
    again = steps.finetune_tasks(**params)  # cached: no second training, no second MLflow run
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    (run,) = _runs("finetune")
    assert run.data.tags["task"] == "ner+textcat" and run.data.params["sampling"] == "temperature"
    assert run.data.metrics["best.weighted_score"] == pytest.approx(first["dev"]["weighted_score"])

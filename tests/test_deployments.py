"""The shipped prefect.yaml the way Prefect users run it: a real `prefect server start`, a `process` work
pool, `prefect deploy`, `prefect worker start`, and runs triggered with `prefect deployment run`."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import assert_same_predictions, in_process_predictions
from mlflow.tracking import MlflowClient

from spacy_llm_components.artifacts import sha256_tree

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free port, with its own home."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env={**env, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                 "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy():
        try:
            return requests.get(f"{api}/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        _wait(healthy, 180, "the Prefect server did not answer")
        yield api
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """A project folder (prefect.yaml + the demo data), its deployments registered on the server and a
    worker of the process pool running; yields (folder, environment)."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "prefect.yaml", folder)
    shutil.copytree(ROOT / "demo", folder / "demo")
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SLLM_PROJECT_DIR")},
           "PREFECT_API_URL": server, "PREFECT_HOME": str(folder / ".prefect-client"),
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    prefect = [str(BIN / "prefect")]
    for args in (["work-pool", "create", "sllm-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        done = subprocess.run(prefect + args, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    worker = subprocess.Popen(prefect + ["worker", "start", "--pool", "sllm-process"], cwd=folder, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield folder, env
    finally:
        _stop(worker)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group; on a busy machine a Prefect process can miss that for a minute (seen
    once as a teardown error), so then SIGKILL."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def _run(deployed, deployment: str, params: dict) -> dict:
    """`prefect deployment run NAME --params ...`, then the flow run once it ends (its API record)."""
    folder, env = deployed
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    match = re.search(r"UUID:?\s*([0-9a-f-]{36})", done.stdout)
    assert match, done.stdout[-2000:]
    run_id = match.group(1)
    api = env["PREFECT_API_URL"]

    def finished():
        run = requests.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return _wait(finished, 600, f"flow run {run_id} of {deployment} did not finish")


def test_prefect_yaml_declares_both_deployments_on_the_process_pool():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly-ner", "annotate-corpus"}
    nightly = deployments["nightly-ner"]
    assert nightly["entrypoint"] == "spacy_llm_components.flows.lifecycle.train_pipeline"
    assert nightly["schedules"][0]["cron"] == "0 3 * * *" and nightly["concurrency_limit"] == 1
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"sllm-process"}
    for path in (*nightly["parameters"]["train"], nightly["parameters"]["dev"], nightly["parameters"]["test"]):
        assert (ROOT / path).is_file(), path  # the shipped parameters point at the repository's demo data


def test_a_deployed_run_trains_registers_and_promotes(deployed, ckpts):
    folder, _ = deployed
    run = _run(deployed, "train-pipeline/nightly-ner",
               {"finetune_config": {"base_model": str(ckpts["base"]), "max_steps": 2, "batch_size": 8}})
    assert run["state"]["type"] == "COMPLETED", run["state"]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")  # the worker ran in the project folder
    champion = client.get_model_version_by_alias("ner-model", "champion")
    assert str(champion.version) == "1" and champion.tags["task"] == "ner"
    assert (folder / "training" / "ner-model" / "evaluation" / "metrics.json").is_file()


def test_a_deployed_run_on_a_missing_file_fails_naming_it_and_writes_nothing(deployed):
    folder, _ = deployed

    def written():  # the project's outputs and its registry, as files with sizes and times, and versions
        files = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
                 for p in folder.rglob("*") if p.is_file() and p.parts[len(folder.parts)] in ("training", "mlartifacts")}
        versions = []
        if (folder / "mlflow.db").exists():
            client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
            versions = sorted((v.name, str(v.version)) for m in client.search_registered_models()
                              for v in client.search_model_versions(f"name = '{m.name}'"))
        return files, versions

    before = written()
    run = _run(deployed, "train-pipeline/nightly-ner", {"train": ["demo/ner/no-such-file.conll"]})
    assert run["state"]["type"] == "FAILED"
    assert "no-such-file.conll" in run["state"]["message"] and "does not exist" in run["state"]["message"]
    assert written() == before


def test_the_annotation_deployment_uses_the_champion(deployed):
    folder, _ = deployed
    (folder / "corpus").mkdir(exist_ok=True)
    (folder / "corpus" / "unlabelled.jsonl").write_text(
        "".join(json.dumps({"text": f"Lena Hartmann visited Lindenfeld on day {i}."}) + "\n" for i in range(5)))
    run = _run(deployed, "annotate/annotate-corpus", {"lines_per_shard": 2})
    assert run["state"]["type"] == "COMPLETED", run["state"]
    lines = [json.loads(line) for shard in sorted((folder / "annotated" / "ner-model").glob("shard-*.jsonl"))
             for line in shard.read_text().splitlines()]
    assert len(lines) == 5 and all("ents" in line for line in lines)
    # what the champion predicts, loaded here from the folder it was registered from
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("ner-model", "champion")
    records = [{"text": line["text"]} for line in lines]
    want = in_process_predictions(folder / "training" / "ner-model" / "model", records)
    assert champion.tags["pipeline_sha256"] == sha256_tree(folder / "training" / "ner-model" / "model")
    assert_same_predictions([{"ents": line["ents"]} for line in lines], want)

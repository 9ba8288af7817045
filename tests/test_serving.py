"""The real `mlflow models serve` on loopback, serving registered champions of all three tasks, and
`sllm serve` on a registered model and on a pipeline folder. Answers are compared with what the same
pipeline predicts in-process (spacy.load + doc_predictions)."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import requests
from conftest import assert_same_predictions, in_process_predictions

from spacy_llm_components.cli.demo import wait_until_ready
from spacy_llm_components.stages import registry, serve

pytestmark = pytest.mark.slow

LIMIT_CHARS = 2_000  # the servers run with a small request limit, to test it cheaply
QA_TEXT = "The Korvell mill was built in 1887 by Tomas Ekdahl on the river Sarn."
TEXTS = {"textcat": "The pancakes were fluffy and the staff were kind.",
         "ner": "Lena Hartmann joined Brightwater Foods in Lindenfeld."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (so `sllm serve` cleans up its temporary model), then wait."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def store(tiny_pipelines, tmp_path_factory):
    """A project whose registry holds models:/serve-TASK@champion for each task."""
    root = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLLM_PROJECT_DIR", str(root))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for task, parts in tiny_pipelines.items():
            registry.register(parts["pipeline"], f"serve-{task}", metrics=parts["evaluation"] / "metrics.json")
            registry.promote(f"serve-{task}")
        yield root


@pytest.fixture(scope="module")
def servers(store):
    """Each champion behind its own `mlflow models serve` process."""
    procs, urls = [], {}
    try:
        for task in ("textcat", "ner", "qa"):
            port = _free_port()
            args = serve.serve_command(f"models:/serve-{task}@champion", port=port)
            env = {**serve.serve_env({"SLLM_MAX_REQUEST_CHARS": str(LIMIT_CHARS)}),
                   "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
            with open(store / f"{task}.log", "wb") as log:
                procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            urls[task] = f"http://127.0.0.1:{port}"
        for proc, url in zip(procs, urls.values()):
            wait_until_ready(url, proc)
        yield urls
    finally:
        for proc in procs:
            _stop(proc)


def _post(url, body, **kwargs):
    return requests.post(f"{url}/invocations", timeout=60, **kwargs, **({"json": body} if body is not None else {}))


def _rows(task):
    if task == "qa":
        return [{"text": QA_TEXT, "questions": ["Who built the mill?", "When was it built?"]},
                {"text": QA_TEXT, "questions": ["Where is the mill?"]}]
    return [{"text": TEXTS[task]}, {"text": "Nothing much happened in Ostbrook."}]


@pytest.mark.parametrize("task, key", [("textcat", "cats"), ("ner", "ents"), ("qa", "answers")])
def test_every_request_format_answers_what_the_pipeline_predicts_in_process(servers, tiny_pipelines, task, key):
    rows = _rows(task)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    bodies = {
        "dataframe_records": {"dataframe_records": rows},
        "dataframe_split": {"dataframe_split": {"columns": list(columns), "data": [list(r.values()) for r in rows]}},
        "inputs_records": {"inputs": rows},
        "inputs_columns": {"inputs": columns},
    }
    if task == "qa":  # MLflow's parser cannot read a column of question lists: QA takes `inputs` as records
        del bodies["inputs_columns"]
    want = in_process_predictions(tiny_pipelines[task]["pipeline"], rows)
    assert all(key in row for row in want)
    for fmt, body in bodies.items():
        response = _post(servers[task], body)
        assert response.status_code == 200, (fmt, response.text)
        assert_same_predictions(response.json()["predictions"], want)
    if task == "ner":
        assert want[0]["ents"], "entities in the text, so that their offsets are checked"
        for ent in want[0]["ents"]:  # offsets point into the text sent
            assert TEXTS["ner"][ent["start_char"]:ent["end_char"]] == ent["text"]
            assert set(ent) == {"text", "start_char", "end_char", "label", "score"}
    if task == "qa":
        assert [a["question"] for a in want[0]["answers"]] == rows[0]["questions"]
        for answer in want[0]["answers"]:
            assert QA_TEXT[answer["start_char"]:answer["end_char"]] == answer["text"]
    if task == "textcat":
        assert set(want[0]["cats"]) == {"negative", "positive"}


@pytest.mark.parametrize("body, words", [
    ({"dataframe_records": [{"txt": "no text column"}]}, "missing inputs ['text']"),
    ({"dataframe_records": [{"text": "fine"}, {"text": 42}]}, "'text' must be a string, got int"),
    ({"dataframe_records": [{"text": None}]}, "row 0: 'text' must be a string, got NoneType"),
    ({"inputs": {"text": None}}, "row 0: 'text' must be a string, got NoneType"),
    ({"inputs": [{"text": None}]}, "row 0: 'text' must be a string, got NoneType"),
    ({"inputs": {"text": ["fine", None]}}, "row 1: 'text' must be a string, got NoneType"),
    ({"dataframe_records": [{"text": "x" * (LIMIT_CHARS + 1)}]}, "the limit is 2,000"),
    ({"dataframe_records": [{"text": "x" * 800}] * 3}, "the limit is 2,000"),
    ({"dataframe_records": [{"text": "a", "questions": [1, 2]}]}, "Failed to convert column questions"),  # MLflow's check
    ("{not json", "Invalid input"),
    ({"something": "else"}, "dataframe_split"),
])
def test_bad_requests_get_a_400_json_error_and_the_server_keeps_serving(servers, body, words):
    url = servers["ner"]
    if isinstance(body, str):
        response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                 timeout=60)
    else:
        response = _post(url, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert words in error["message"], error["message"]
    ok = _post(url, {"dataframe_records": [{"text": TEXTS["ner"]}]})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["ents"]


@pytest.mark.parametrize("what", ["registered", "folder"])
def test_sllm_serve_a_registered_model_or_a_pipeline_folder(store, tiny_pipelines, tmp_path, what):
    """`sllm serve NAME` (the champion) and `sllm serve FOLDER`, as a user runs them; one request each."""
    task = "ner" if what == "registered" else "textcat"
    model = f"serve-{task}" if what == "registered" else str(tiny_pipelines[task]["pipeline"])
    port = _free_port()
    env = {**os.environ, "SLLM_PROJECT_DIR": str(store), "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "TMPDIR": str(tmp_path)}  # where a folder's temporary MLflow model goes
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spacy_llm_components.cli", "serve", model, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc)
        rows = _rows(task)
        response = _post(url, {"dataframe_records": rows})
        assert response.status_code == 200, response.text
        assert_same_predictions(response.json()["predictions"], in_process_predictions(
            tiny_pipelines[task]["pipeline"], rows))
    finally:
        _stop(proc)
    output = (tmp_path / "serve.log").read_text()
    expected = f"models:/serve-{task}@champion" if what == "registered" else model
    assert f"serving {expected} on http://127.0.0.1:{port}/invocations" in output
    assert not list(tmp_path.glob("sllm-served-*"))  # the temporary MLflow model is gone after Ctrl-C


def test_sllm_serve_refuses_what_it_cannot_serve(store, tmp_path):
    from typer.testing import CliRunner

    from spacy_llm_components.cli import app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLLM_PROJECT_DIR", str(store))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        no_alias = CliRunner().invoke(app, ["serve", "serve-ner", "--alias", "staging"])
        not_a_pipeline = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert no_alias.exit_code == 2 and "has no alias 'staging'" in no_alias.output
    assert not_a_pipeline.exit_code == 2 and "nor a spaCy pipeline folder (no meta.json)" in not_a_pipeline.output

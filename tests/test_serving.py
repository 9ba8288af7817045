"""The real `mlflow models serve` on loopback, serving registered champions of all three tasks."""

import socket
import subprocess

import pytest
import requests

from spacy_llm_components import registry, serving
from spacy_llm_components.demo import wait_until_ready

pytestmark = pytest.mark.slow

LIMIT_CHARS = 2_000  # the servers run with a small request limit, to test it cheaply
QA_TEXT = "The Korvell mill was built in 1887 by Tomas Ekdahl on the river Sarn."
TEXTS = {"textcat": "The pancakes were fluffy and the staff were kind.",
         "ner": "Lena Hartmann joined Brightwater Foods in Lindenfeld."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_pipelines, tmp_path_factory):
    """models:/serve-TASK@champion for each task, each behind its own server process."""
    root = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLLM_PROJECT_DIR", str(root))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for task, parts in tiny_pipelines.items():
            registry.register(parts["pipeline"], f"serve-{task}", metrics=parts["evaluation"] / "metrics.json")
            registry.promote(f"serve-{task}")
        procs, urls = [], {}
        try:
            for task in tiny_pipelines:
                port = _free_port()
                args = serving.serve_command(f"models:/serve-{task}@champion", port=port)
                log = open(root / f"{task}.log", "wb")
                procs.append(subprocess.Popen(args, env=serving.serve_env({"SLLM_MAX_REQUEST_CHARS": str(LIMIT_CHARS)}),
                                              stdout=log, stderr=subprocess.STDOUT))
                urls[task] = f"http://127.0.0.1:{port}"
            for proc, url in zip(procs, urls.values()):
                wait_until_ready(url, proc)
            yield urls
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)


def _post(url, body, **kwargs):
    return requests.post(f"{url}/invocations", timeout=60, **kwargs, **({"json": body} if body is not None else {}))


def _rows(task):
    if task == "qa":
        return [{"text": QA_TEXT, "questions": ["Who built the mill?", "When was it built?"]},
                {"text": QA_TEXT, "questions": ["Where is the mill?"]}]
    return [{"text": TEXTS[task]}, {"text": "Nothing much happened."}]


@pytest.mark.parametrize("task, key", [("textcat", "cats"), ("ner", "ents"), ("qa", "answers")])
def test_all_request_formats_give_the_same_answers(servers, task, key):
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
    answers = {}
    for fmt, body in bodies.items():
        response = _post(servers[task], body)
        assert response.status_code == 200, (fmt, response.text)
        answers[fmt] = response.json()["predictions"]
    first = answers["dataframe_records"]
    assert all(a == first for a in answers.values()), answers
    assert len(first) == 2 and all(key in row for row in first)
    if task == "ner":
        for ent in first[0]["ents"]:  # offsets point into the text sent
            assert TEXTS["ner"][ent["start_char"]:ent["end_char"]] == ent["text"]
            assert set(ent) == {"text", "start_char", "end_char", "label", "score"}
    if task == "qa":
        assert [a["question"] for a in first[0]["answers"]] == rows[0]["questions"]
        for answer in first[0]["answers"]:
            assert QA_TEXT[answer["start_char"]:answer["end_char"]] == answer["text"]
    if task == "textcat":
        assert set(first[0]["cats"]) == {"negative", "positive"}


@pytest.mark.parametrize("body, status, words", [
    ({"dataframe_records": [{"txt": "no text column"}]}, 400, "missing inputs ['text']"),
    ({"dataframe_records": [{"text": "fine"}, {"text": 42}]}, 400, "'text' must be a string, got int"),
    ({"dataframe_records": [{"text": None}]}, 400, "'text' must be a string"),
    ({"dataframe_records": [{"text": "x" * (LIMIT_CHARS + 1)}]}, 400, "the limit is 2,000"),
    ({"dataframe_records": [{"text": "x" * 800}] * 3}, 400, "the limit is 2,000"),
    ({"dataframe_records": [{"text": "a", "questions": [1, 2]}]}, 400, ""),
    ("{not json", 400, ""),
    ({"something": "else"}, 400, ""),
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(servers, body, status, words):
    url = servers["ner"]
    if isinstance(body, str):
        response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"},
                                 timeout=60)
    else:
        response = _post(url, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert words in error["message"]
    ok = _post(url, {"dataframe_records": [{"text": TEXTS["ner"]}]})
    assert ok.status_code == 200 and "ents" in ok.json()["predictions"][0]

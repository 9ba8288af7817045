"""The pyfunc model that serves every pipeline of this project, and the checks each request passes
(pure: no server; the real `mlflow models serve` is in test_serving.py)."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_predictions, in_process_predictions
from mlflow.exceptions import MlflowException

from spacy_llm_components.stages import registry
from spacy_llm_components.stages.shared import pyfunc
from spacy_llm_components.tasks import task_spec


def test_request_records_accepts_rows_columns_and_questions():
    df = pd.DataFrame({"text": ["a b", "c"], "questions": [["q1?", "q2?"], None]})
    assert pyfunc.request_records(df) == [{"text": "a b", "questions": ["q1?", "q2?"]}, {"text": "c"}]
    # {"inputs": {"text": [...]}} reaches predict as one row holding whole columns
    one_row = pd.DataFrame([{"text": np.array(["x", "y"]), "questions": np.array([np.array(["q?"]), None],
                                                                                  dtype=object)}])
    assert pyfunc.request_records(one_row) == [{"text": "x", "questions": ["q?"]}, {"text": "y"}]
    assert pyfunc.request_records([{"text": "t", "questions": "one?"}]) == [{"text": "t", "questions": ["one?"]}]


@pytest.mark.parametrize("rows, problem", [
    ([{"txt": "a"}], "row 0: no 'text' column"),
    ([{"text": "a"}, {"text": 3}], "row 1: 'text' must be a string, got int"),
    ([{"text": None}], "'text' must be a string"),
    ([{"text": "a", "questions": [1, 2]}], "'questions' must be a string or a list of strings"),
    ([{"text": "x" * (pyfunc.MAX_TEXT_CHARS + 1)}], "the limit is"),
    ([{"text": "x"}] * (pyfunc.MAX_ROWS + 1), "send at most"),
    ([{"text": "x", "questions": ["q?"] * (pyfunc.MAX_QUESTIONS + 1)}], "questions; the limit is"),
])
def test_bad_requests_are_invalid_parameter_errors(rows, problem):
    with pytest.raises(MlflowException) as err:
        pyfunc.request_records(rows)
    assert problem in err.value.message
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # the scoring server answers 400


@pytest.mark.parametrize("model_input", [
    pd.DataFrame([{"text": None}]),
    [{"text": None}],
    {"text": None},
    pd.DataFrame([{"text": np.array([None, "y"], dtype=object)}]),  # {"inputs": {"text": [null, "y"]}}
])
def test_a_null_text_is_a_bad_request(model_input):
    with pytest.raises(MlflowException) as err:
        pyfunc.request_records(model_input)
    assert "'text' must be a string, got NoneType" in err.value.message
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("task, key", [("textcat", "cats"), ("ner", "ents"), ("qa", "answers")])
def test_pyfunc_model_predicts_like_the_pipeline(tiny_pipelines, mlflow_project, task, key):
    version = registry.register(tiny_pipelines[task]["pipeline"], f"m-{task}")
    model = mlflow.pyfunc.load_model(version.uri)
    example = task_spec(task).input_example
    got = model.predict(pd.DataFrame(example))
    want = in_process_predictions(tiny_pipelines[task]["pipeline"], [{k: v[0] for k, v in example.items()}])
    assert_same_predictions(got, want)
    assert key in want[0]
    info = mlflow.models.get_model_info(version.uri)
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["text", "questions"]
    local = mlflow.artifacts.download_artifacts(version.uri)
    logged = mlflow.models.Model.load(local).load_input_example(local)  # what a request for the task looks like
    assert list(logged["text"]) == example["text"]
    if task == "qa":
        assert [list(q) for q in logged["questions"]] == example["questions"]
    requirements = open(f"{local}/requirements.txt").read()
    assert "spacy-llm-components==" in requirements



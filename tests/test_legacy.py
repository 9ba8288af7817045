"""Pipelines and served models written by a released version load and predict what that version predicted.

The folders in tests/fixtures/legacy/VERSION were written by that version (make_legacy.py says how),
with its predictions in expected.json: entity, category and answer texts, offsets and labels must
match exactly, scores within 1e-5 (float32) or 1e-3 (int8, whose kernels round differently).
"""

import json
from pathlib import Path

import pytest
import spacy
from conftest import assert_same_predictions, in_process_predictions

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
VERSIONS = sorted(p.name for p in LEGACY.iterdir() if (p / "expected.json").is_file())


def _expected(version: str) -> dict:
    return json.loads((LEGACY / version / "expected.json").read_text(encoding="utf8"))


CASES = [(version, name) for version in VERSIONS for name in _expected(version)["pipelines"]]


@pytest.mark.parametrize("version,name", CASES)
def test_saved_pipeline_predicts_as_when_written(version, name):
    expected = _expected(version)
    want = expected["pipelines"][name]
    assert_same_predictions(in_process_predictions(LEGACY / version / name, expected["texts"]), want["float32"])
    assert any(want["float32"]), "the fixture predicts something"


@pytest.mark.parametrize("version,name", [(v, n) for v, n in CASES if "int8" in _expected(v)["pipelines"][n]])
def test_saved_pipeline_predicts_as_when_written_in_int8(version, name):
    expected = _expected(version)
    task = name.split("-")[-1].replace("multilabel", "textcat")
    nlp = spacy.load(LEGACY / version / name, config={"components": {task: {"quantize": "int8"}}})
    from spacy_llm_components.components.pipeline import doc_predictions, make_input_doc

    got = [doc_predictions(nlp(make_input_doc(nlp, r, f"text {i}", "test")), nlp)
           for i, r in enumerate(expected["texts"])]
    assert_same_predictions(got, expected["pipelines"][name]["int8"], tol=1e-3)


@pytest.mark.parametrize("version", VERSIONS)
def test_served_model_of_a_released_version_loads_and_predicts(version):
    import mlflow
    import pandas as pd

    expected = _expected(version)
    model = mlflow.pyfunc.load_model(str(LEGACY / version / "served"))
    records = [{"text": r["text"]} for r in expected["texts"]]
    got = model.predict(pd.DataFrame(records))
    assert_same_predictions(list(got), expected["pipelines"]["bert-ner"]["float32"])

"""The MLflow pyfunc model that serves any pipeline of this project (what `register` logs and
`mlflow models serve` runs), and the checks every request passes before it reaches the model.

Bad requests raise an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server
answers with a 400 JSON error; the server keeps serving.
"""

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ...components.pipeline import doc_predictions, make_input_doc
from ...data.errors import DataError
from ...tasks import TASKS, input_example
from .tracking import PIPELINE_ARTIFACT

# Request limits of the served model (environment variables override them): a request over a
# limit gets a 400 JSON error rather than minutes of CPU. `mlflow models serve` reads the whole
# body first and has no byte limit of its own: put a proxy in front for that.
MAX_ROWS = int(os.environ.get("SLLM_MAX_ROWS", 1_000))
MAX_TEXT_CHARS = int(os.environ.get("SLLM_MAX_TEXT_CHARS", 100_000))
MAX_REQUEST_CHARS = int(os.environ.get("SLLM_MAX_REQUEST_CHARS", 1_000_000))  # texts and questions
MAX_QUESTIONS = int(os.environ.get("SLLM_MAX_QUESTIONS", 64))  # per row


class SpacyPipelineModel(mlflow.pyfunc.PythonModel):
    """Any pipeline of this project as an MLflow pyfunc model.

    Input: a DataFrame with a `text` column and, for QA, an optional `questions` column (a list
    of strings, or one string, per row). Output: one dict per row with `cats`, `ents` and/or
    `answers`, as `sllm predict` writes them. Bad rows raise an MlflowException that the
    scoring server answers with a 400 JSON error.
    """

    def load_context(self, context) -> None:
        import threading

        import spacy

        import spacy_llm_components  # noqa: F401  (registers the factories and Doc extensions)

        self.nlp = spacy.load(context.artifacts[PIPELINE_ARTIFACT])
        self.lock = threading.Lock()  # the scoring server calls predict from a thread pool

    def predict(self, context, model_input: pd.DataFrame, params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        records = request_records(model_input)  # checked before waiting for the model
        with self.lock:  # make_doc touches the shared vocab too
            docs = list(request_docs(self.nlp, records))
            return [doc_predictions(doc, self.nlp) for doc in self.nlp.pipe(docs)]


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def request_records(model_input: Any) -> List[Dict[str, Any]]:
    """The rows of a request (DataFrame, list of records or dict of columns) as dicts, checked:
    a missing `text`, a text that is not a string or is too long, or too many rows is a 400."""
    if isinstance(model_input, pd.DataFrame):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = [model_input]
    elif isinstance(model_input, list):
        records = model_input
    else:
        raise _bad_request(f"expected a table with a 'text' column, got {type(model_input).__name__}")
    if len(records) == 1 and isinstance(records[0], dict) and _is_column(records[0].get("text")):
        records = _columns_to_rows(records[0])  # {"inputs": {"text": [...], ...}} arrives as one row of columns
    if len(records) > MAX_ROWS:
        raise _bad_request(f"{len(records)} rows in one request; send at most {MAX_ROWS}")
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "text" not in record:
            raise _bad_request(f"row {number}: no 'text' column")
        text = record["text"]
        if not isinstance(text, str):
            raise _bad_request(f"row {number}: 'text' must be a string, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise _bad_request(f"row {number}: text has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
        questions = record.get("questions")
        if hasattr(questions, "tolist"):  # a numpy array after schema enforcement
            questions = questions.tolist()
        if questions is None or (isinstance(questions, float) and questions != questions):  # absent / NaN
            record.pop("questions", None)
            continue
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise _bad_request(f"row {number}: 'questions' must be a string or a list of strings")
        if len(questions) > MAX_QUESTIONS:
            raise _bad_request(f"row {number}: {len(questions)} questions; the limit is {MAX_QUESTIONS}")
        record["questions"] = questions
    total = sum(len(r["text"]) + sum(map(len, r.get("questions", []))) for r in records)
    if total > MAX_REQUEST_CHARS:
        raise _bad_request(f"the request holds {total:,} characters of text; the limit is {MAX_REQUEST_CHARS:,}")
    return records


def _is_column(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1)


def _columns_to_rows(columns: Dict[str, Any]) -> List[Dict[str, Any]]:
    lists = {k: (v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, (list, tuple)) else v)
             for k, v in columns.items() if v is not None}
    n = len(lists["text"])
    if any(not isinstance(v, list) or len(v) != n for v in lists.values()):
        raise _bad_request("columns of the request have different lengths")
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def request_docs(nlp, records: List[Dict[str, Any]]) -> Iterator:
    """Input docs for the checked rows of a request (see `request_records`)."""
    for number, record in enumerate(records):
        try:
            yield make_input_doc(nlp, record, f"row {number}", "request")
        except DataError as err:
            raise _bad_request(str(err)) from None


def model_signature():
    """Input: `text` and optional `questions` (list of strings); output: what each task's component
    records (cats, ents, answers: the specs' `output_columns`), each column optional.

    `text` is declared Any, not string: for the `inputs` request format MLflow casts values to the
    declared type before the model sees them, which turns a null into the text "None". The model
    checks that each text is a string itself (`request_records`), so a null gets a 400."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Map, Object, Property, Schema

    span = [Property("text", "string"), Property("start_char", "long"), Property("end_char", "long"),
            Property("score", "double")]
    inputs = Schema([ColSpec(AnyType(), "text"), ColSpec(Array("string"), "questions", required=False)])
    columns = {name: kind for spec in TASKS.values() for name, kind in spec.output_columns.items()}
    outputs = Schema([ColSpec(Map("double") if kind == "map" else
                              Array(Object([*span, *(Property(k, t) for k, t in extra.items())])), name, required=False)
                      for name, (kind, extra) in columns.items()])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pyfunc_model(pipeline: Path, task: str) -> Dict[str, Any]:
    """(`task`: the pipeline's task, or its heads' joined by +.) The arguments of `mlflow.pyfunc.log_model` / `save_model` that make `pipeline` a served model."""
    return dict(python_model=SpacyPipelineModel(), artifacts={PIPELINE_ARTIFACT: str(pipeline)},
                signature=model_signature(), input_example=pd.DataFrame(input_example(task)),
                pip_requirements=requirements())


def requirements() -> List[str]:
    """The served model's pip requirements: this plugin and the versions it was logged with."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("spacy-llm-components", "spacy", "transformers", "torch", "mlflow",
                    "pandas"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out

"""Where a project's state lives: its folder, the tracking URI, the experiment."""

from mlflow.tracking import MlflowClient

from spacy_llm_components.stages import serve
from spacy_llm_components.stages.shared import tracking


def test_default_store_is_absolute_and_under_the_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SLLM_PROJECT_DIR", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    experiment = MlflowClient(tracking.use_tracking()).get_experiment(tracking.experiment_id())
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts" / tracking.DEFAULT_EXPERIMENT).as_uri()
    # mlflow.set_tracking_uri exported our default: it must not pass for a user's override later
    monkeypatch.setenv("SLLM_PROJECT_DIR", str(tmp_path / "other"))
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'other').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"
    for _ in range(2):  # the user's server stays the store on every later call
        assert tracking.use_tracking() == "http://tracking.example:5000"
    assert serve.serve_env()["MLFLOW_TRACKING_URI"] == "http://tracking.example:5000"


def test_the_experiment_is_created_once_as_a_model_development_experiment(mlflow_project):
    client = MlflowClient(tracking.use_tracking())
    first = tracking.experiment_id()
    assert tracking.experiment_id() == first
    experiment = client.get_experiment(first)
    assert experiment.name == tracking.DEFAULT_EXPERIMENT
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made elsewhere (the MLflow UI, say) gets the tag on first use
    other = client.create_experiment("made-elsewhere")
    assert "mlflow.experimentKind" not in client.get_experiment(other).tags
    assert tracking.experiment_id("made-elsewhere") == other
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_suite_tracks_into_a_throwaway_store_not_the_users():
    """conftest points MLflow at a temporary project for the whole session: a test without the
    mlflow_project fixture still never writes into ./mlflow.db or a user's tracking server."""
    import tempfile
    from pathlib import Path

    uri = tracking.tracking_uri()
    assert uri.startswith("sqlite:///")
    store = Path(uri[len("sqlite:///"):])
    assert Path(tempfile.gettempdir()) in store.parents and store.parent == tracking.project_dir()
    assert Path(__file__).resolve().parents[1] not in store.parents  # not the checkout

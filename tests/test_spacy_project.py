"""`spacy project run all` (weasel) on a copy of project.yml and the demo data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(project: Path, *args: str) -> str:
    # as a user would: no tracking settings inherited from other tests, the project folder is the store
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SLLM_PROJECT_DIR")}
    result = subprocess.run([sys.executable, "-m", "spacy", "project", "run", *args], cwd=project,
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_project_workflow_all_runs_and_skips_unchanged_steps(ckpts, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "project.yml", project)
    shutil.copytree(ROOT / "demo", project / "demo")
    overrides = ["--vars.base_model", str(ckpts["base"]), "--vars.max_steps", "2"]

    out = _run(project, "all", ".", *overrides)
    assert "champion is now version 1" in out
    assert (project / "training" / "ner-model" / "evaluation" / "report.md").is_file()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # absolute, inside the project folder
    assert str(client.get_model_version_by_alias("ner-model", "champion").version) == "1"
    assert (project / "mlartifacts").is_dir()

    again = _run(project, "all", ".", *overrides)
    for step in ("prepare", "finetune", "evaluate"):
        assert f"Skipping '{step}': nothing changed" in again
    assert "already registered as ner-model version 1" in again
    assert "the challenger already is the champion" in again


def test_project_workflow_all_pretrain_fine_tunes_the_adapted_encoder(ckpts, tmp_path):
    import json

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "project.yml", project)
    shutil.copytree(ROOT / "demo", project / "demo")
    out = _run(project, "all-pretrain", ".", "--vars.base_model", str(ckpts["base"]), "--vars.max_steps", "2",
               "--vars.pretrain_max_steps", "2", "--vars.name", "adapted")
    assert "held-out perplexity" in out and "champion is now version 1" in out
    encoder = project / "training" / "adapted" / "encoder"
    assert (encoder / "model.safetensors").is_file()
    meta = json.loads((project / "training" / "adapted" / "model" / "meta.json").read_text())["sllm"]
    assert meta["base_model"] == "training/adapted/encoder" and meta["encoder"]["encoder_path"] == str(encoder)


def test_project_workflow_all_together_registers_one_model_of_two_heads(ckpts, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "project.yml", project)
    shutil.copytree(ROOT / "demo", project / "demo")
    out = _run(project, "all-together", ".", "--vars.base_model", str(ckpts["base"]), "--vars.max_steps", "2")
    assert "fine-tuned ner+textcat" in out and "champion is now version 1" in out
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("ner-textcat", "champion")
    assert version.tags["task"] == "ner+textcat" and {"head.ner", "head.textcat"} <= set(version.tags)

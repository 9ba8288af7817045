"""Model cards: what a registered version's description says, against the files it was written from."""

import json

from mlflow.tracking import MlflowClient

from spacy_llm_components.stages import registry
from spacy_llm_components.stages.shared import tracking


def test_a_registered_version_describes_itself(tiny_pipelines, mlflow_project):
    ner = tiny_pipelines["ner"]
    version = registry.register(ner["pipeline"], "carded", metrics=ner["evaluation"] / "metrics.json")
    card = MlflowClient(tracking.use_tracking()).get_model_version("carded", version.version).description
    meta = json.loads((ner["pipeline"] / "meta.json").read_text())["sllm"]
    evaluation = json.loads((ner["evaluation"] / "metrics.json").read_text())
    finetune = json.loads((ner["pipeline"] / "metrics.json").read_text())
    assert card.startswith(f"# carded, version {version.version}\n")
    assert "named-entity recognition (hf_ner); labels: " + ", ".join(meta["labels"]) in card
    assert f"`{meta['base_model']}`" in card and f"content `{version.tags['base_model_sha256'][:12]}`" in card
    assert f"train `{meta['train_sha256'][:12]}`, dev `{meta['dev_sha256'][:12]}`" in card
    assert f"({meta['train_docs']:,} docs / {meta['dev_docs']:,} docs)" in card
    assert f"{finetune['training']['steps']} steps (batch {meta['config']['batch_size']}" in card
    primary = evaluation["primary"]
    assert f"**{primary} {100 * evaluation['scores'][primary]:.2f}**" in card
    assert f"ents_p {100 * evaluation['scores']['ents_p']:.2f}" in card
    assert f"`{evaluation['test_sha256'][:12]}`" in card and f"{evaluation['statistics']['docs']:,} docs" in card
    assert f"{evaluation['statistics']['docs_per_second']:,} docs/s" in card
    assert evaluation["statistics"]["machine"] in card
    assert f"sllm serve models:/carded/{version.version}" in card


def test_a_version_without_evaluation_says_so(tiny_pipelines, mlflow_project):
    version = registry.register(tiny_pipelines["textcat"]["pipeline"], "uncarded")
    card = MlflowClient(tracking.use_tracking()).get_model_version("uncarded", version.version).description
    assert "text classification (hf_textcat)" in card and "Evaluation**: none recorded" in card
    again = registry.register(tiny_pipelines["textcat"]["pipeline"], "uncarded",
                              metrics=tiny_pipelines["textcat"]["evaluation"] / "metrics.json")
    refreshed = MlflowClient(tracking.use_tracking()).get_model_version("uncarded", again.version).description
    assert again.version == version.version and "none recorded" not in refreshed and "cats_score" in refreshed

"""Fixtures: tiny random BERT checkpoints with a real WordPiece vocab, so the suite runs in seconds.

Nothing here needs ../shared or the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect reads its settings once, at import: a throwaway home (never the user's ~/.prefect), and
# no user server. The flows' own defaults (ephemeral server, analytics off) come on top of these.
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sllm-test-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
import spacy  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
)

from spacy_llm_components.hf import DEFAULT_MODEL, resolve_source  # noqa: E402

# No per-example deadline: on a loaded 2-core machine a slow example is noise, not a bug.
settings.register_profile("sllm", deadline=None)
settings.load_profile("sllm")

MINILM = DEFAULT_MODEL
NER_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def minilm_path() -> Path:
    return Path(resolve_source(MINILM))


def tiny_config(**kwargs) -> BertConfig:
    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    return BertConfig(**{**settings, **kwargs})


def save_tiny(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    BertTokenizerFast(vocab_file=str(minilm_path() / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return path


def make_ckpt(path: Path, head: str, seed: int = 0, **config) -> Path:
    torch.manual_seed(seed)
    cls = {
        "ner": BertForTokenClassification,
        "textcat": BertForSequenceClassification,
        "qa": BertForQuestionAnswering,
        "base": BertModel,
    }[head]
    return save_tiny(cls(tiny_config(**config)).eval(), path)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpts")
    ner_labels = dict(enumerate(NER_TAGS))
    return {
        "ner": make_ckpt(root / "ner", "ner", num_labels=len(NER_TAGS), id2label=ner_labels,
                         label2id={v: k for k, v in ner_labels.items()}),
        "textcat": make_ckpt(root / "textcat", "textcat", num_labels=2, id2label={0: "neg", 1: "pos"},
                             label2id={"neg": 0, "pos": 1}),
        "multilabel": make_ckpt(root / "multilabel", "textcat", num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                label2id={"a": 0, "b": 1, "c": 2}, problem_type="multi_label_classification"),
        "qa": make_ckpt(root / "qa", "qa"),
        "base": make_ckpt(root / "base", "base"),
    }


@pytest.fixture
def nlp():
    return spacy.blank("en")


DEMO = Path(__file__).resolve().parents[1] / "demo"  # the repository's hand-written demo data
DEMO_FILES = {"textcat": ("train.csv", "dev.csv", "test.csv"), "ner": ("train.conll", "dev.conll", "test.conll"),
              "qa": ("train.json", "dev.json", "test.json")}


def demo_files(task: str) -> tuple:
    return tuple(DEMO / task / name for name in DEMO_FILES[task])


@pytest.fixture
def mlflow_project(tmp_path, monkeypatch) -> Path:
    """A fresh project folder: its own MLflow SQLite store and artifact root."""
    monkeypatch.setenv("SLLM_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_pipelines(ckpts, tmp_path_factory) -> dict:
    """Per task: a pipeline fine-tuned (2 steps) from the tiny base on the demo data, and its
    evaluation on the demo test file ({"pipeline", "evaluation", "test"})."""
    from spacy_llm_components.data import prepare
    from spacy_llm_components.evaluate import evaluate
    from spacy_llm_components.train import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("tiny-pipelines")
    out = {}
    for task in DEMO_FILES:
        train, dev, test = demo_files(task)
        prepared = prepare(task, [train], root / task / "corpus", dev=dev)
        config = FinetuneConfig(base_model=str(ckpts["base"]), max_steps=2, batch_size=8, eval_steps=1)
        finetune(task, prepared.output / "train.spacy", prepared.output / "dev.spacy", root / task / "model", config,
                 progress=False)
        evaluate(root / task / "model", test, root / task / "evaluation")
        out[task] = {"pipeline": root / task / "model", "evaluation": root / task / "evaluation", "test": test,
                     "corpus": prepared.output}
    return out

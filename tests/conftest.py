"""Fixtures: tiny random BERT checkpoints with a real WordPiece vocab, so the suite runs in seconds.

Nothing here needs ../shared or the network.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect reads its settings once, at import: a throwaway home (never the user's ~/.prefect), and
# no user server. The flows' own defaults (ephemeral server, analytics off) come on top of these.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sllm-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # not one folder per run in /tmp
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
# The suite never writes into the user's own MLflow store (their ./mlflow.db, or a server in
# MLFLOW_TRACKING_URI): a throwaway project folder and store for the session, which tests that need a
# store of their own replace with the `mlflow_project` fixture.
_SESSION_PROJECT = tempfile.mkdtemp(prefix="sllm-test-project-")
atexit.register(shutil.rmtree, _SESSION_PROJECT, ignore_errors=True)
os.environ["SLLM_PROJECT_DIR"] = _SESSION_PROJECT
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_PROJECT}/mlflow.db"

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import spacy  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
)

from spacy_llm_components.models.checkpoint import DEFAULT_MODEL, resolve_source  # noqa: E402

# No per-example deadline: on a loaded 2-core machine a slow example is noise, not a bug.
settings.register_profile("sllm", deadline=None)
settings.load_profile("sllm")

REPO = Path(__file__).resolve().parents[1]
# what a test run may leave in the checkout: the environment and the tools' own caches
NOT_OURS = (".venv", ".pytest_cache", ".hypothesis", "**/__pycache__", "*.egg-info")


def checkout_files() -> dict:
    """Untracked and ignored files of the repository (each listed, none hidden in a folder), with their
    size and modification time, so a test that writes into the checkout is caught even where a file of
    that name was already there."""
    listing = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--no-renames", "-z", "--", ".",
         *(f":(exclude,glob){pattern}" for pattern in NOT_OURS),
         *(f":(exclude,glob){pattern}/**" for pattern in NOT_OURS)],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = {}
    for entry in filter(None, listing.split("\0")):
        status, path = entry[:2], entry[3:]
        if status in ("??", "!!"):
            stat = (REPO / path).lstat()
            files[path] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests leave no files in the checkout: fail the session if one appeared or changed."""
    if not (REPO / ".git").exists():  # not a git checkout (an unpacked sdist): nothing to compare with
        yield
        return
    before = checkout_files()
    yield
    after = checkout_files()
    written = sorted(path for path, signature in after.items() if before.get(path) != signature)
    if written:
        pytest.fail(f"tests wrote into the checkout {REPO}: {written[:20]}", pytrace=False)


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
    from spacy_llm_components.stages.evaluate import evaluate
    from spacy_llm_components.stages.finetune import finetune
    from spacy_llm_components.stages.prepare import prepare
    from spacy_llm_components.stages.shared.training import FinetuneConfig

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


def assert_same_predictions(got, want, tol: float = 1e-5) -> None:
    """Predictions (cats / ents / answers, as `doc_predictions` writes them) equal: every key, text,
    offset and label exactly, scores within `tol` (another process or batch may differ in the last bits)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (got, want)
        for key in want:
            assert_same_predictions(got[key], want[key], tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for a, b in zip(got, want):
            assert_same_predictions(a, b, tol)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=tol), (got, want)
    else:
        assert got == want, (got, want)


def in_process_predictions(pipeline, records) -> list:
    """What `spacy.load(pipeline)` predicts for input records ({"text", "questions"}), one at a time."""
    from spacy_llm_components.components.pipeline import doc_predictions, make_input_doc

    nlp = spacy.load(pipeline)
    return [doc_predictions(nlp(make_input_doc(nlp, record, f"record {i}", "test")), nlp)
            for i, record in enumerate(records)]


def model_inputs(pipe) -> list:
    """The length (special tokens included) of every sequence the component's model runs from now on, in
    the order the model sees them (length-sorted batches): a forward hook on the model, whatever code
    path feeds it."""
    seen: list = []

    def record(module, args, kwargs, output):
        seen.extend(kwargs["attention_mask"].sum(dim=1).tolist())

    pipe.checkpoint.model.register_forward_hook(record, with_kwargs=True)
    return seen


@pytest.fixture
def trainer_steps(monkeypatch) -> list:
    """(step, learning rate) of every optimizer step a Hugging Face Trainer runs in this process from now on
    (gradient accumulation 1): what only a real resume changes, as the final weights cannot tell."""
    from transformers import Trainer

    seen: list = []
    original = Trainer.training_step

    def counting(self, model, inputs, *args, **kwargs):
        seen.append((self.state.global_step + 1, float(self.lr_scheduler.get_last_lr()[0])))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counting)
    return seen


def assert_same_steps(got: list, want: list) -> None:
    """The same optimizer steps (`trainer_steps` entries), at the same learning rates."""
    assert [step for step, _ in got] == [step for step, _ in want], (got, want)
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in want], rel=1e-6), (got, want)


def store_state(project: Path) -> dict:
    """What an MLflow project holds: registered models and their versions, runs per experiment, and the
    artifact files: compared before and after an operation that must write nothing."""
    from mlflow.tracking import MlflowClient

    from spacy_llm_components.stages.shared.tracking import use_tracking

    client = MlflowClient(use_tracking())
    models = {m.name: sorted(str(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
              for m in client.search_registered_models()}
    runs = {e.name: len(client.search_runs([e.experiment_id])) for e in client.search_experiments()}
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*")
                   if p.is_file() and "mlartifacts" in p.parts)
    return {"models": models, "runs": runs, "artifacts": files}


def teacher_weight(name: str, kept) -> str:
    """The teacher's name of a student weight: `.layer.i.` of the student is `.layer.kept[i].` of the teacher
    (layer dropping keeps every other weight's name)."""
    if ".layer." not in name:
        return name
    index = int(name.split(".layer.")[1].split(".")[0])
    return name.replace(f".layer.{index}.", f".layer.{kept[index]}.", 1)

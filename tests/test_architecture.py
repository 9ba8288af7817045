"""The shape of the house, checked from the source: imports (lazy ones included) point one way, from a
layer to the layers below it, never in a circle; a stage never imports another stage; inference imports
no training code; no module is overly long; nothing outside the task specs branches on a task name."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "spacy_llm_components"
ROOT = "spacy_llm_components"
# bottom to top: a module imports only from its own layer or a lower one
LAYERS = ["core", "artifacts", "data", "models", "tasks", "components", "stages", "flows", "cli"]
# modules outside the layers: the package's face and the name old registered models unpickle
OUTSIDE = {ROOT, f"{ROOT}.serving"}


def _sources():
    """(module name, path) of every module of the package, flows/ and pipelines/ installed inside it."""
    found = {}
    for base, prefix in ((PACKAGE, ROOT), (REPO / "flows", f"{ROOT}.flows"), (REPO / "pipelines", f"{ROOT}.pipelines")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


SOURCES = _sources()


def _is_package(module: str) -> bool:
    return SOURCES[module].name == "__init__.py"


def _resolve(importer: str, node: ast.AST):
    """The package modules an import statement (anywhere in a file) loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = importer if _is_package(importer) else importer.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base for alias in node.names]
    out = set()
    for name in names:
        if name == ROOT or name.startswith(ROOT + "."):
            if name not in SOURCES:
                raise AssertionError(f"{importer} imports {name}, which does not exist")
            out.add(name)
    return out


def import_graph():
    graph = {}
    for module, path in SOURCES.items():
        tree = ast.parse(path.read_text(encoding="utf8"))
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _resolve(module, node) - {module}
    return graph


def _layer(module: str) -> int:
    part = module.split(".")[1]
    return LAYERS.index("core") if part == "pipelines" else LAYERS.index(part)


def test_every_import_resolves_and_points_down_the_layers():
    wrong = []
    for module, imported in import_graph().items():
        if module in OUTSIDE:
            continue
        for other in imported:
            if other in OUTSIDE:
                if other == ROOT and module.startswith(f"{ROOT}.stages.shared.pyfunc"):
                    continue  # the served model imports the package to register the factories in its process
                wrong.append(f"{module} -> {other}")
            elif _layer(other) > _layer(module):
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports that run back up the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, circles


def _stage(module: str):
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_stages_stand_side_by_side():
    """A stage imports `stages.shared` and the layers below, never another stage; shared imports no stage."""
    wrong = [f"{module} -> {other}" for module, imported in import_graph().items() for other in imported
             if _stage(module) and _stage(other) and _stage(other) not in ("shared", _stage(module))]
    assert not wrong, wrong


def test_the_folders_are_the_layers_and_every_package_is_installed():
    listed = re.search(r"packages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.S).group(1)
    packages = set(re.findall(r'"([\w.]+)"', listed))
    on_disk = {module for module in SOURCES if _is_package(module)}
    assert on_disk == packages, (sorted(on_disk - packages), sorted(packages - on_disk))
    top = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("__")}
    assert top <= set(LAYERS) | {"serving"}, sorted(top - set(LAYERS))


def test_no_module_is_overly_long():
    long = {module: n for module, path in SOURCES.items()
            if (n := len(path.read_text(encoding="utf8").splitlines())) > 420}
    assert not long, long


TASK_NAMES = r"""["'](?:ner|textcat|qa|token-classification|text-classification|question-answering)["']"""


def test_only_the_task_specs_branch_on_a_task():
    pattern = re.compile(rf"(?:==|!=)\s*{TASK_NAMES}|{TASK_NAMES}\s*(?:==|!=)|\bin\s*\(\s*{TASK_NAMES}|"
                         rf"^\s*{TASK_NAMES}\s*:", re.M)
    found = []
    for module, path in SOURCES.items():
        if module.startswith(f"{ROOT}.tasks"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf8").splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, found


INFERENCE = """
import importlib.metadata, json, sys
if {hide_accelerate}:
    sys.modules["accelerate"] = None  # as if it were not installed (transformers then does without it)
# spaCy imports every package's factories when it loads a pipeline: as if the benchmark peers (the test
# environment has them) were not installed, as in a serving image
import catalogue
catalogue.AVAILABLE_ENTRY_POINTS = importlib.metadata.EntryPoints(
    ep for group in importlib.metadata.entry_points().values() for ep in group
    if not ep.value.startswith("spacy_huggingface_pipelines"))
before = set(sys.modules)
import spacy
from spacy_llm_components.components.pipeline import doc_predictions
nlp = spacy.load({pipeline!r})
doc = nlp.make_doc("Lena Hartmann joined Brightwater Foods in Lindenfeld.")
doc._.questions = ["Who joined?"]
out = [doc_predictions(nlp(doc), nlp)] + [doc_predictions(d, nlp) for d in nlp.pipe(["a b", "c d e"])]
new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("accelerate", "mlflow", "prefect", "datasets")
             or m.startswith(("transformers.trainer", "transformers.training_args", "spacy_llm_components.stages")))
print(json.dumps({{"new": new, "predictions": out}}))
"""


def _infer(pipeline: Path, hide_accelerate: bool) -> dict:
    code = INFERENCE.format(pipeline=str(pipeline), hide_accelerate=hide_accelerate)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["bert-ner", "bert-textcat", "bert-qa"])
def test_inference_imports_no_training_code(name):
    """spacy.load + nlp() + nlp.pipe() in a fresh interpreter load neither the Trainer (nor its arguments and
    utilities), any lifecycle stage, MLflow, Prefect nor datasets; and they run, with the same predictions,
    where accelerate is not installed: transformers' own modelling code imports accelerate whenever it is
    installed, so a serving image leaves it out."""
    pipeline = REPO / "tests" / "fixtures" / "legacy" / "0.1.0" / name
    plain, without = _infer(pipeline, False), _infer(pipeline, True)
    assert [m for m in plain["new"] if m.split(".")[0] != "accelerate"] == [], plain["new"]  # (transformers' own)
    assert without["new"] == [], without["new"]
    assert plain["predictions"] == without["predictions"] and any(plain["predictions"][0].values())


def test_the_inference_check_sees_training_imports():
    code = "import sys, spacy_llm_components.stages.shared.trainer; print('transformers.trainer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "True"


def test_only_models_load_checkpoints():
    """One way to load a checkpoint: `from_pretrained` is called in models/ only."""
    calls = [f"{path.relative_to(REPO)}:{node.lineno}" for module, path in SOURCES.items()
             if not module.startswith(f"{ROOT}.models")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf8")))
             if isinstance(node, ast.Attribute) and node.attr == "from_pretrained"]
    assert not calls, calls

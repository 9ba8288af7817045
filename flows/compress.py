"""The compress stage: smaller, faster variants of a registered version, gated on accuracy.

For each method (`int8`: the same pipeline with quantize = "int8"; `distill`: a student with fewer
encoder layers) the flow makes the variant (a cached task), evaluates it on the test file its source
was evaluated on, registers it as a new version of the same model (tagged with its method, source
version and score; its evaluation adds score and speed), and moves the method's alias (`int8`,
`distilled`) to it only if it lost at most `max_drop` points: by its primary metric's point estimate
(gate `drop`), or by the lower bound of the paired bootstrap interval of its difference to the source on
the test file (gate `no-worse`). `champion` and `challenger` are never moved here: they rank full models;
a variant is served by its own alias.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

from prefect import flow, get_run_logger, task
from spacy_llm_components.flows.steps import CACHE, RETRIES, cached, evaluate, existing_file, output_hashes

from spacy_llm_components.artifacts import METRICS, read_json, sha256_file, sha256_tree
from spacy_llm_components.stages import registry
from spacy_llm_components.stages.compress import (
    CompressError,
    check_max_drop,
    check_methods,
    quantized_copy,
    shared_encoders,
)
from spacy_llm_components.stages.compress.distill import DistillConfig, check_distillation
from spacy_llm_components.stages.compress.distill import distill as distill_pipeline
from spacy_llm_components.stages.shared import references, tracking
from spacy_llm_components.stages.shared.tracking import project_dir
from spacy_llm_components.stages.shared.training import FinetuneConfig
from spacy_llm_components.tasks import load_docs, task_spec

ALIASES = {"int8": "int8", "distill": "distilled"}  # the alias each method's gated variants get


@task(name="quantize", cache_policy=CACHE, **RETRIES)
def quantize_task(source: str, output: str, source_sha256: str, code_version: str) -> Dict[str, Any]:
    path = quantized_copy(source, output)
    return {"pipeline": str(path), "files": output_hashes(path / "meta.json", path / "config.cfg")}


@task(name="distill", cache_policy=CACHE, **RETRIES)
def distill_task(source: str, train: str, dev: str, output: str, config: Dict[str, Any],
                 distill_config: Dict[str, Any], source_sha256: str, train_sha256: str, dev_sha256: str,
                 corpus_sha256: Optional[str], code_version: str, progress: bool = True) -> Dict[str, Any]:
    result = distill_pipeline(source, train, dev, output, FinetuneConfig(**config), DistillConfig(**distill_config),
                              resume=True, progress=progress)
    run_id = tracking.log_finetune(output, run_name=f"distill-{result.task}")
    get_run_logger().info(result.summary())
    return {"pipeline": str(Path(output)), "dev": result.dev_metrics, "mlflow_run_id": run_id,
            "files": output_hashes(Path(output) / "meta.json", Path(output) / METRICS)}


@task(name="register-variant", **RETRIES)
def register_variant_task(pipeline: str, name: str, metrics_file: str, tags: Dict[str, str], alias: str,
                          max_drop: float, gate: str = "drop", test: Optional[str] = None) -> Dict[str, Any]:
    version = registry.register(pipeline, name, metrics=metrics_file, tags=tags, alias=None)  # idempotent
    decision = registry.gate_variant(name, version.version, alias, max_drop=max_drop, gate=gate, test=test)
    return {**version.to_json(), "gate": decision.to_json()}


@flow(name="compress")
def compress(model: str, test: str, methods: List[str], max_drop: float = 0.5, train: Optional[str] = None,
             dev: Optional[str] = None, workdir: Optional[str] = None,
             finetune_config: Optional[Dict[str, Any]] = None, distill_config: Optional[Dict[str, Any]] = None,
             progress: bool = True, gate: str = "drop") -> Dict[str, Any]:
    """Variants of the registered version `model` (models:/NAME/VERSION or models:/NAME@ALIAS) by
    `methods`, each evaluated on `test`, registered, and gated on `max_drop` points. Distillation
    trains on `train` / `dev` (prepared .spacy files) with `finetune_config` and `distill_config`.
    Outputs go to `workdir/compressed/vVERSION-METHOD` (default workdir: `<project>/training/NAME`)."""
    methods = check_methods(methods)
    check_max_drop(max_drop)
    registry.check_gate(gate, test)
    test = existing_file(test)
    if "distill" in methods and not (train and dev):
        raise CompressError("distillation needs the prepared training data: pass train and dev (.spacy files)")
    train, dev = existing_file(train), existing_file(dev)
    source = references.pin_model(model)
    if not references.is_model_uri(source):
        raise CompressError(f"{model}: compress a registered version (models:/NAME/VERSION or models:/NAME@ALIAS); "
                            "register the pipeline first")
    ref = references.parse_model_uri(source)
    folder = references.local_pipeline(source)
    if shared_encoders(folder):
        raise CompressError(f"{model}: its heads share an encoder, and this flow gates a variant on one test file; "
                            "make the variants with `sllm quantize` and `sllm distill` (every head kept), score "
                            "them with `sllm evaluate VARIANT HEAD=FILE ...`, and register them with `sllm register`")
    spec = task_spec(tracking.pipeline_info(folder)["task"])
    import spacy

    load_docs(spec.name, test, spacy.blank("en"))  # a test file of another task fails here, before any variant
    config, dconfig = _filled(FinetuneConfig, finetune_config), _filled(DistillConfig, distill_config)
    if "distill" in methods:  # bad settings or data fail now, before any variant is made or registered
        dconfig["corpus"] = existing_file(dconfig.get("corpus"))
        check_distillation(source, train, dev, DistillConfig(**dconfig), FinetuneConfig(**config))
    root = Path(workdir).resolve() if workdir else project_dir() / "training" / ref.name
    source_tags = _source_evaluation(ref, folder, test, root, spec.primary)
    source_sha = sha256_tree(folder)
    variants = []
    for method in methods:
        out = root / "compressed" / f"v{ref.version}-{ALIASES[method]}"
        if method == "int8":
            made = cached(quantize_task, source=source, output=str(out / "model"), source_sha256=source_sha)
        else:
            corpus = dconfig["corpus"]
            made = cached(distill_task, source=source, train=train, dev=dev, output=str(out / "model"),
                           config=config, distill_config=dconfig, source_sha256=source_sha,
                           train_sha256=sha256_file(Path(train)), dev_sha256=sha256_file(Path(dev)),
                           corpus_sha256=sha256_file(Path(corpus)) if corpus else None, progress=progress)
        scored = evaluate(made["pipeline"], test, str(out / "evaluation"), name=f"{ref.name}-v{ref.version}-{method}")
        tags = {"compression": method, "compression.source_version": ref.version,
                "compression.source_score": source_tags["primary_value"], "compression.max_drop": repr(max_drop)}
        speedup = _speedup(scored["statistics"], source_tags)
        if speedup is not None:
            tags["compression.speedup"] = f"{speedup:.3f}"
        else:
            get_run_logger().info("%s: no speed-up recorded: the source was timed on %s (%s), the variant on %s (%s)",
                                  method, source_tags.get("speed.device"), source_tags.get("speed.machine"),
                                  scored["statistics"].get("device"), scored["statistics"].get("machine"))
        if method == "distill":
            block = read_json(Path(made["pipeline"]) / "meta.json").get("sllm", {})
            tags["compression.kept_layers"] = ",".join(map(str, block.get("kept_layers", [])))
        version = register_variant_task(made["pipeline"], ref.name, scored["metrics_file"], tags, ALIASES[method],
                                        max_drop, gate, test)
        decision = version["gate"]
        get_run_logger().info("%s version %s (%s): %s (%s)", ref.name, version["version"], method,
                              "alias " + decision["alias"] if decision["promoted"] else "no alias", decision["reason"])
        variants.append({"method": method, "name": ref.name, "version": version["version"], "uri": version["uri"],
                         "pipeline": made["pipeline"], "primary": scored["primary"], "score": scored["score"],
                         "source_version": ref.version, "source_score": float(source_tags["primary_value"]),
                         "speedup": speedup, "statistics": scored["statistics"], "gate": decision})
    return {"source": source, "variants": variants}


def _filled(config_class: type, values: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A config's fields with defaults filled in (part of the cache key)."""
    from dataclasses import asdict

    return asdict(config_class(**(values or {})))


def _source_evaluation(ref, folder: Path, test: str, root: Path, primary: str) -> Dict[str, str]:
    """The source version's evaluation tags on `test`: as registered when they are of this file, else
    from evaluating it now (and recording that on the version)."""
    tags = registry.version_tags(ref.name, ref.version)
    if tags.get("eval_sha256") == sha256_file(Path(test)) and tags.get("primary_metric") == primary:
        return tags
    scored = evaluate(str(folder), test, str(root / "compressed" / f"v{ref.version}-evaluation"),
                      name=f"{ref.name}-v{ref.version}")
    return {**tags, **registry.set_evaluation(ref.name, ref.version, scored["metrics_file"])}


def _speedup(statistics: Dict[str, Any], source_tags: Dict[str, str]) -> Optional[float]:
    """The variant's docs/s over its source's, as each evaluation measured them; None unless both ran on
    the same device of the same machine (a source evaluated on a GPU says nothing of a CPU int8 variant)."""
    source_rate = source_tags.get("speed.docs_per_second")
    rate = statistics.get("docs_per_second")
    same = all(source_tags.get(f"speed.{k}") == str(statistics.get(k)) for k in ("device", "machine"))
    return rate / float(source_rate) if rate and source_rate and same else None

"""The lifecycle of one model as one flow: prepare data -> (pre-train the encoder on domain text ->)
fine-tune -> evaluate -> register (-> promote) (-> compress), each stage its flow in `steps`.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

from prefect import flow
from spacy_llm_components.flows.compress import compress
from spacy_llm_components.flows.steps import (
    evaluate,
    existing_file,
    finetune,
    prepare_data,
    pretrain,
    promote,
    register,
)

from spacy_llm_components.stages.shared.tracking import project_dir
from spacy_llm_components.stages.shared.training import FinetuneConfig


@flow(name="train-pipeline")
def train_pipeline(task: str, train: List[str], name: str, dev: Optional[str] = None, test: Optional[str] = None,
                   workdir: Optional[str] = None, finetune_config: Optional[Dict[str, Any]] = None,
                   promote_if_better: bool = False, text_column: str = "text", label_column: str = "label",
                   label_sep: Optional[str] = None, pretrain_corpus: Optional[List[str]] = None,
                   pretrain_dev: Optional[List[str]] = None, pretrain_config: Optional[Dict[str, Any]] = None,
                   progress: bool = True, compress_methods: Optional[List[str]] = None,
                   max_drop: float = 0.5, distill_config: Optional[Dict[str, Any]] = None,
                   strict: bool = False, gate: str = "drop") -> Dict[str, Any]:
    """prepare -> (pretrain ->) finetune -> evaluate (on `test`, else the dev split) -> register (-> promote)
    (-> compress: `compress_methods` variants of the new version, gated on `max_drop` points: by `gate`
    drop, the point estimates, or no-worse, the paired bootstrap interval of the difference on the test file).
    With a `pretrain_corpus`, the fine-tune's base model is first pre-trained on it, and the fine-tune
    starts from that encoder. Returns the registered version and its metrics. Outputs go to `workdir`
    (default `<project>/training/<name>`)."""
    for path in [*train, dev, test, *(pretrain_corpus or []), *(pretrain_dev or [])]:
        existing_file(path)  # a missing test file fails now, not after fine-tuning
    if compress_methods:  # bad compression settings fail now, not after fine-tuning and registering
        from spacy_llm_components.stages.compress import check_max_drop, check_methods
        from spacy_llm_components.stages.compress.distill import DistillConfig, check_distill_config
        from spacy_llm_components.stages.registry import check_gate

        check_methods(compress_methods)
        check_max_drop(max_drop)
        check_gate(gate, test or "the dev split")
        if "distill" in compress_methods:  # the teacher will have its base model's layers
            from spacy_llm_components.models.checkpoint import peek_config

            base = FinetuneConfig(**(finetune_config or {})).base_model
            check_distill_config(DistillConfig(**(distill_config or {})), peek_config(base).get("num_hidden_layers"))
    root = Path(workdir) if workdir else project_dir() / "training" / name
    read = dict(text_column=text_column, label_column=label_column, label_sep=label_sep, strict=strict)
    prepared = prepare_data(task, train, str(root / "corpus"), dev=dev, **read)
    finetune_config = dict(finetune_config or {})
    encoder = None
    if pretrain_corpus:
        base = FinetuneConfig(**finetune_config)  # the encoder starts from the fine-tune's base, on its device
        encoder = pretrain(pretrain_corpus, str(root / "encoder"), dev=pretrain_dev, progress=progress,
                           config={**(pretrain_config or {}), "base_model": base.base_model, "device": base.device})
        finetune_config["base_model"] = encoder["encoder"]
    tuned = finetune(task, prepared["train"], prepared["dev"], str(root / "model"), config=finetune_config,
                     data_summary=prepared["summary"], progress=progress)
    scored = evaluate(tuned["pipeline"], test or prepared["dev"], str(root / "evaluation"), name=name, **read)
    version = register(tuned["pipeline"], name, metrics=scored["metrics_file"])
    result = {"name": name, "version": version["version"], "uri": version["uri"], "task": task,
              "primary": scored["primary"], "score": scored["score"], "scores": scored["scores"],
              "statistics": scored["statistics"], "pipeline": tuned["pipeline"]}
    if encoder is not None:
        result["encoder"] = {k: encoder[k] for k in ("encoder", "perplexity_before", "perplexity_after")}
    if promote_if_better:  # with a test file, both versions are scored on it now: comparable whatever changed
        from spacy_llm_components.stages.registry import promotion_rule

        paired = promotion_rule(name)[0] != "better"  # the model's rule compares the versions on one file
        result["promotion"] = promote(name, test=test or (prepared["dev"] if paired else None))
    if compress_methods:
        result["compression"] = compress(version["uri"], test or prepared["dev"], compress_methods, max_drop=max_drop,
                                         train=prepared["train"], dev=prepared["dev"], workdir=str(root),
                                         finetune_config=finetune_config, distill_config=distill_config,
                                         progress=progress, gate=gate)
    return result

"""Batch annotation of a large JSONL corpus: shards as Prefect tasks, on threads or a Dask cluster.

The corpus is cut into line ranges (no copies); each shard task runs one model version over its
range and writes `shard-NNNNN.jsonl` whole or not at all, so a re-run skips the shards already
written. `annotate.json` in the output folder records the input and model version the shards
belong to: a re-run with another input or model is refused rather than mixed in.
"""

import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner
from spacy_llm_components.flows.settings import is_transient

from spacy_llm_components.artifacts import read_json, sha256_file, sha256_tree, write_json
from spacy_llm_components.data import DataError
from spacy_llm_components.data.jsonl import LineRange, line_ranges
from spacy_llm_components.stages.annotate import predict_file
from spacy_llm_components.stages.shared.references import is_model_uri, local_pipeline, pin_model

MANIFEST = "annotate.json"


_LOADING = threading.Lock()  # from_pretrained patches torch globally while it loads: one load at a time


def _loaded(model: str):
    """One pipeline per (worker process, model version), and a lock so threads take turns on it."""
    with _LOADING:
        return _load(model)


@lru_cache(maxsize=4)
def _load(model: str):
    import spacy

    return spacy.load(local_pipeline(model)), threading.Lock()


def shard_path(output: Path, index: int) -> Path:
    return output / f"shard-{index:05d}.jsonl"


@task(name="annotate-shard", retries=2, retry_delay_seconds=5,
      retry_condition_fn=lambda task, run, state: is_transient(state.result(raise_on_failure=False)))
def annotate_shard(model: str, corpus: str, shard: Dict[str, int], output: str, batch_size: Optional[int],
                   skip_bad: bool) -> Dict[str, Any]:
    lines = LineRange(**shard)
    target = shard_path(Path(output), lines.index)
    if target.exists():
        return {"shard": lines.index, "written": None, "skipped_records": [], "done_before": True}
    nlp, lock = _loaded(model)
    with lock:
        report = predict_file(nlp, corpus, target, batch_size=batch_size, skip_bad=skip_bad, show_progress=False,
                              lines=lines)
    return {"shard": lines.index, "written": report["written"], "skipped_records": report["skipped"],
            "done_before": False}


@flow(name="annotate")
def annotate(model: str, corpus: str, output: str, lines_per_shard: int = 10_000, batch_size: Optional[int] = None,
             skip_bad: bool = False) -> Dict[str, Any]:
    """Run `model` (`models:/NAME@champion`, `models:/NAME/3` or a pipeline folder) over every line of
    `corpus` (JSONL, {"text": ..., "questions": [...]}) into `output/shard-NNNNN.jsonl`."""
    logger = get_run_logger()
    corpus_path, out = Path(corpus).resolve(), Path(output).resolve()
    shards = line_ranges(corpus_path, lines_per_shard)  # checks the corpus and shard size first
    if not shards:
        raise DataError(corpus_path, None, "file is empty")
    pinned = pin_model(model)
    manifest = {"corpus": str(corpus_path), "corpus_sha256": sha256_file(corpus_path), "model": pinned,
                # a pipeline folder retrained in place is another model
                "model_sha256": None if is_model_uri(pinned) else sha256_tree(pinned),
                "lines_per_shard": lines_per_shard}
    previous = out / MANIFEST
    if previous.is_file() and any(out.glob("shard-*.jsonl")):
        before = read_json(previous)
        if before != manifest:
            changed = sorted(k for k in manifest if before.get(k) != manifest[k])
            raise ValueError(f"{out} holds shards of another annotation (different {', '.join(changed)}); "
                             f"choose another output folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(previous, manifest)
    logger.info("%s: %d lines in %d shards, model %s", corpus_path, sum(s.lines for s in shards), len(shards), pinned)
    futures = [annotate_shard.submit(pinned, str(corpus_path), vars(s), str(out), batch_size, skip_bad)
               for s in shards]
    results = [f.result() for f in futures]
    done_before = sum(r["done_before"] for r in results)
    written = sum(r["written"] or 0 for r in results)
    skipped = [rec for r in results for rec in r["skipped_records"]]
    logger.info("%d shards annotated now (%d records), %d done before", len(results) - done_before, written,
                done_before)
    return {"output": str(out), "shards": len(results), "done_before": done_before, "written": written,
            "skipped": skipped, "model": pinned}


def annotate_with(task_runner: str = "threads", address: Optional[str] = None, workers: Optional[int] = None):
    """The annotate flow on a task runner: `threads` (this machine: threads share one model and take
    turns on it, torch already uses every core), or `dask` through prefect-dask: an existing
    scheduler at `address`, else a local cluster of `workers` processes (one model each)."""
    if task_runner == "threads":
        return annotate.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers or 2))
    if task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError("--task-runner dask needs prefect-dask: pip install 'spacy-llm-components[dask]'") from None
        if address:
            return annotate.with_options(task_runner=DaskTaskRunner(address=address))
        return annotate.with_options(task_runner=DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True}))
    raise ValueError(f"unknown task runner {task_runner!r}; use threads or dask")

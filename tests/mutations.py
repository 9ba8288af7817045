"""Mutations: each breaks what some tests claim to check, and those tests must then fail. Run by hand (not
in CI); it runs each mutation's tests in a pytest of its own, the mutation applied at the start of that
interpreter and of every process it starts (a sitecustomize on their PYTHONPATH):

    .venv/bin/python tests/mutations.py                    # all of them
    .venv/bin/python tests/mutations.py resume-ignored     # one

A mutation whose tests still pass is a test that cannot fail: the script says so and exits 1.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = "SLLM_MUTATION"


def _resume_ignored():
    """An interrupted run silently starts again from step 0 (and ends at the same weights, being seeded)."""
    from transformers import Trainer

    train = Trainer.train
    Trainer.train = lambda self, resume_from_checkpoint=None, **kwargs: train(self, None, **kwargs)


def _snap_stops_short():
    """Snapping a span to tokens drops the last token it overlaps."""
    from spacy_llm_components.core import align

    snap = align.snap_to_tokens

    def short(span, starts, ends):
        found = snap(span, starts, ends)
        return (found[0], found[1] - 1) if found and found[1] - found[0] > 1 else found

    align.snap_to_tokens = short


def _onnx_int8_unquantized():
    """ONNX Runtime "int8" runs the float32 graph."""
    import shutil

    from onnxruntime import quantization

    quantization.quantize_dynamic = lambda source, target, **kwargs: shutil.copy(source, target)


def _no_learning():
    """The optimizer's step does nothing: training runs, logs, checkpoints, and learns nothing."""
    import torch

    torch.optim.AdamW.step = lambda self, closure=None: None


def _perplexity_of_batch_means():
    """Held-out perplexity as exp of the mean of batch means (batches with fewer masked pieces weigh more)."""
    import math

    from spacy_llm_components.stages.pretrain import lm

    def batch_means(model, batches, device):
        head, means = lm.mlm_head(model), []
        import torch

        with torch.no_grad():
            for batch in batches:
                total, count = lm.masked_loss_sum(model, head, {k: v.to(device) for k, v in batch.items()})
                means.append(float(total) / int(count))
        loss = sum(means) / len(means)
        return lm.Perplexity(math.exp(loss), loss, sum(int((b["labels"] != -100).sum()) for b in batches),
                             sum(len(b["input_ids"]) for b in batches))

    lm.perplexity = batch_means


def _features_drift_from_predict():
    """NER training features are windowed with another stride than inference uses."""
    from spacy_llm_components.components.ner import HFEntityRecognizer
    from spacy_llm_components.core.align import window_spans

    HFEntityRecognizer._windows = lambda self, n: window_spans(n, self.max_length - self.specials.n_single,
                                                               1) if n else []


def _ddp_mean_of_means():
    """Under torchrun, each process' mean loss over its own masked pieces, averaged: a block with few
    masked pieces weighs more than in one process."""
    from transformers import Trainer

    from spacy_llm_components.stages.pretrain import MaskedLMTrainer

    original = MaskedLMTrainer.compute_loss

    def mean_of_means(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self.model:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    MaskedLMTrainer.compute_loss = mean_of_means


def _runs_lose_their_steps():
    """An MLflow run gets no per-step metrics (only its final ones)."""
    from spacy_llm_components.stages.shared import tracking

    tracking.log_steps = lambda run_id, folder: None


def _register_writes_before_checking():
    """`register` creates the registered model before it checks the pipeline folder and the metrics."""
    from mlflow.tracking import MlflowClient

    from spacy_llm_components.stages import registry
    from spacy_llm_components.stages.shared.tracking import use_tracking

    check, calls = registry.pipeline_info, []

    def early(pipeline):
        calls.append(pipeline)
        MlflowClient(use_tracking()).create_registered_model(f"written-early-{len(calls)}")
        return check(pipeline)

    registry.pipeline_info = early


MUTATIONS = {
    "resume-ignored": (_resume_ignored, [
        "test_train.py::test_resume_after_interruption_matches_uninterrupted_run",
        "test_compress.py::test_distillation_resumes_to_the_uninterrupted_weights",
        "test_pretrain.py::test_pretraining_is_deterministic_and_resumes_as_if_never_interrupted",
        "test_flows.py::test_a_killed_finetune_resumes_from_its_checkpoint"]),
    "snap-stops-short": (_snap_stops_short, ["test_align.py"]),
    "onnx-int8-unquantized": (_onnx_int8_unquantized, [
        "test_compress.py::test_onnxruntime_int8_runs_int8_operators_close_to_float32"]),
    "no-learning": (_no_learning, ["test_train.py::test_textcat_and_qa_learn_a_learnable_toy_set"]),
    "perplexity-of-batch-means": (_perplexity_of_batch_means, [
        "test_pretrain.py::test_perplexity_is_exp_of_the_mean_over_every_masked_piece_by_hand"]),
    "features-drift-from-predict": (_features_drift_from_predict, [
        "test_train.py::test_ner_features_window_long_docs_like_predict"]),
    "ddp-mean-of-means": (_ddp_mean_of_means, ["test_pretrain.py::test_torchrun_pretrains_on_two_cpu_processes"]),
    "runs-lose-their-steps": (_runs_lose_their_steps, [
        "test_runs.py::test_finetune_run_logs_params_steps_hashes_versions_and_pipeline"]),
    "register-writes-before-checking": (_register_writes_before_checking, [
        "test_registry.py::test_register_rejects_bad_input"]),
}

if os.environ.get(ENV) and not globals().get("_APPLIED"):  # imported at interpreter start (sitecustomize)
    _APPLIED = True
    MUTATIONS[os.environ[ENV]][0]()


def run(name: str) -> tuple:
    """The mutation's tests in a pytest of their own; processes they start (torchrun, `sllm` commands) get
    the mutation too, through a sitecustomize on their PYTHONPATH."""
    import tempfile

    tests = MUTATIONS[name][1]
    with tempfile.TemporaryDirectory(prefix="sllm-mutation-") as site:
        Path(site, "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport mutations\n")
        env = {**os.environ, ENV: name, "PYTHONPATH": os.pathsep.join([site, str(HERE), os.environ.get("PYTHONPATH", "")])}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=HERE, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return proc.returncode != 0, summary, time.perf_counter() - start


def main() -> int:
    names = sys.argv[1:] or list(MUTATIONS)
    survived = []
    print("| mutation | tests | caught | pytest says | seconds |\n| --- | ---: | --- | --- | ---: |")
    for name in names:
        caught, summary, seconds = run(name)
        print(f"| {name} | {len(MUTATIONS[name][1])} | {'yes' if caught else 'NO'} | {summary} | {seconds:.0f} |",
              flush=True)
        if not caught:
            survived.append(name)
    if survived:
        print(f"tests that could not fail: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

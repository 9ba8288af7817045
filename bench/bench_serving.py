"""Serving benchmark: a fine-tuned NER pipeline behind `mlflow models serve`, through this
project's pyfunc model vs MLflow's own transformers flavor (the same weights, exported with
`sllm export-hf`, in a `token-classification` pipeline with aggregation "simple").

Both servers get the same requests, one at a time, from CoNLL-2003 dev sentences. Reported:
latency per request (p50 / p95), sentences per second, and entity F1 of the served answers
against the gold entities (exact character offsets and label). The transformers flavor answers
with a comma-joined string of labels and no offsets, so its answers cannot be scored.

    .venv/bin/python bench/bench_serving.py --pipeline bench/out/accuracy/conll2003/model \
        --conll ../shared/data/conll2003/dev.conll --sentences 1024 --batch 32
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import spacy

from spacy_llm_components import tracking
from spacy_llm_components.data import load_docs
from spacy_llm_components.demo import wait_until_ready
from spacy_llm_components.export import export_hf


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args, env) -> tuple:
    port = free_port()
    proc = subprocess.Popen([*args, "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, proc, timeout=300)
    return proc, url


def measure(url: str, bodies) -> tuple:
    """Latency of every request, the answers (None for a failed request) and the error of the first failure."""
    requests.post(f"{url}/invocations", json=bodies[0], timeout=600)  # warm-up
    latencies, answers, first_error = [], [], None
    for body in bodies:
        start = time.perf_counter()
        response = requests.post(f"{url}/invocations", json=body, timeout=600)
        latencies.append(time.perf_counter() - start)
        if response.status_code == 200:
            answers.append(response.json()["predictions"])
        else:
            answers.append(None)
            if first_error is None:
                trace = response.json().get("stack_trace", response.text).strip().splitlines()
                first_error = f"{response.status_code}: {trace[-1][:120]}"
    return latencies, answers, first_error


def entity_f1(answers, gold_docs) -> float:
    tp = fp = fn = 0
    for answer, gold in zip(answers, gold_docs):
        predicted = {(e["start_char"], e["end_char"], e["label"]) for e in answer.get("ents", [])}
        truth = {(e.start_char, e.end_char, e.label_) for e in gold.ents}
        tp, fp, fn = tp + len(predicted & truth), fp + len(predicted - truth), fn + len(truth - predicted)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="fine-tuned NER pipeline folder")
    parser.add_argument("--conll", type=Path, required=True)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    nlp = spacy.load(args.pipeline)
    gold = [d for d in load_docs("ner", args.conll, nlp).docs if len(d.text) > 0][: args.sentences]
    rows = [{"text": d.text} for d in gold]
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        os.environ["SLLM_PROJECT_DIR"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        version = tracking.register(args.pipeline, "bench-ner")
        ours_cmd = tracking.serve_command("bench-ner", alias="challenger")[:-4]  # without -p PORT -w N

        import mlflow
        import transformers

        hf_dir = export_hf(nlp, "ner", Path(tmp) / "hf")
        peer = transformers.pipeline("token-classification", model=str(hf_dir), aggregation_strategy="simple")
        import torch

        mlflow.transformers.save_model(peer, f"{tmp}/peer", pip_requirements=[  # (its defaults want torchvision)
            f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
        peer_cmd = [ours_cmd[0], "models", "serve", "-m", f"{tmp}/peer", "--env-manager", "local", "-h", "127.0.0.1"]

        results = {}
        ours_bodies = [{"dataframe_records": batch} for batch in batches]
        peer_bodies = [{"inputs": [row["text"] for row in batch]} for batch in batches]  # its signature: strings
        for name, command, bodies in (("sllm pyfunc (hf_ner)", ours_cmd, ours_bodies),
                                      ("mlflow transformers flavor", peer_cmd, peer_bodies)):
            proc, url = serve(command, tracking.serve_env())
            try:
                results[name] = measure(url, bodies)
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    print(f"\n{len(rows)} CoNLL-2003 dev sentences in requests of {args.batch}, one client, "
          f"model {args.pipeline} (registered as version {version.version})\n")
    print("| server | failed requests | p50 latency (s) | p95 latency (s) | sentences/s | entity F1 of served answers "
          "| answer looks like |")
    print("|---|---|---|---|---|---|---|")
    speeds, errors = {}, {}
    for name, (latencies, answers, first_error) in results.items():
        speeds[name] = len(rows) / sum(latencies)
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
        failed = sum(a is None for a in answers)
        flat = [row for batch in answers if batch is not None for row in batch]
        scorable = not failed and isinstance(flat[0], dict) and "ents" in flat[0]
        f1 = f"{100 * entity_f1(flat, gold):.2f}" if scorable else "n/a"
        example = json.dumps(flat[0])[:70] if flat else "-"
        print(f"| {name} | {failed} of {len(answers)} | {statistics.median(latencies):.3f} | {p95:.3f} | "
              f"{speeds[name]:.1f} | {f1} | `{example}` |")
        if first_error:
            errors[name] = first_error
    for name, error in errors.items():
        print(f"\n{name}, first failure: {error}")
    names = list(speeds)
    print(f"\nthroughput ratio {names[0]} / {names[1]}: {speeds[names[0]] / speeds[names[1]]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: a fine-tuned NER pipeline behind `mlflow models serve`, through this project's
pyfunc model, against MLflow's own transformers flavor on the same weights (exported with
`export_hf`, in a `token-classification` pipeline with the same word aggregation, "first").

Both servers get the same requests (CoNLL-2003 dev sentences, --batch per request) from --clients
concurrent clients on loopback, after one warm-up request each. Throughput counts the sentences of
successful requests only, over the wall time of the run; latencies (p50 / p99) are those of
successful requests; failures are counted beside them. Our server runs with each of --workers
(`mlflow models serve -w N`); the peer with the first. Entity F1 of the served answers is scored
against the gold entities (exact character offsets and label) where the answers carry offsets.

    .venv/bin/python bench/bench_serving.py --pipeline bench/out/accuracy/conll2003/model \\
        --conll ../shared/data/conll2003/dev.conll --sentences 1024 --batch 32 --clients 1
    .venv/bin/python bench/bench_serving.py ... --clients 32 --workers 1,2 --no-peer
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import numpy as np
import requests
import spacy

from spacy_llm_components.cli.demo import wait_until_ready
from spacy_llm_components.components.pipeline import export_hf
from spacy_llm_components.stages.registry import register
from spacy_llm_components.stages.serve import serve_command, serve_env
from spacy_llm_components.tasks import load_docs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_uri: str, workers: int):
    port = free_port()
    proc = subprocess.Popen(serve_command(model_uri, port=port, workers=workers), env=serve_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, proc, timeout=300)
    return proc, url


def post(url: str, body) -> tuple:
    start = time.perf_counter()
    response = requests.post(f"{url}/invocations", json=body, timeout=600)
    seconds = time.perf_counter() - start
    if response.status_code == 200:
        return seconds, response.json()["predictions"], None
    trace = response.json().get("stack_trace", response.text).strip().splitlines()
    return seconds, None, f"{response.status_code}: {trace[-1][:120] if trace else ''}"


def measure(url: str, bodies: List, clients: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda b: post(url, b), bodies[:clients]))  # one warm-up request per client
        start = time.perf_counter()
        results = list(pool.map(lambda b: post(url, b), bodies))
        wall = time.perf_counter() - start
    ok = [(seconds, answer) for seconds, answer, _ in results if answer is not None]
    errors = [error for _, _, error in results if error]
    return {"wall": wall, "latencies": [s for s, _ in ok], "answers": [answer for _, answer, _ in results],
            "failed": len(errors), "first_error": errors[0] if errors else None}


def entity_f1(answers, gold_docs) -> Optional[float]:
    tp = fp = fn = 0
    for answer, gold in zip(answers, gold_docs):
        if answer is None or not isinstance(answer, dict) or "ents" not in answer:
            return None
        predicted = {(e["start_char"], e["end_char"], e["label"]) for e in answer["ents"]}
        truth = {(e.start_char, e.end_char, e.label_) for e in gold.ents}
        tp, fp, fn = tp + len(predicted & truth), fp + len(predicted - truth), fn + len(truth - predicted)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="fine-tuned NER pipeline folder")
    parser.add_argument("--conll", type=Path, required=True)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32, help="sentences per request")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients")
    parser.add_argument("--workers", default="1", type=lambda s: [int(w) for w in s.split(",")])
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    nlp = spacy.load(args.pipeline)
    gold = [d for d in load_docs("ner", args.conll, nlp).docs if len(d.text) > 0][: args.sentences]
    rows = [{"text": d.text} for d in gold]
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        os.environ["SLLM_PROJECT_DIR"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        version = register(args.pipeline, "bench-ner")
        contenders = [(f"sllm pyfunc (hf_ner), {w} worker(s)", version.uri, w,
                       [{"dataframe_records": b} for b in batches]) for w in args.workers]
        if args.peer:
            import mlflow
            import torch
            import transformers

            hf_dir = export_hf(nlp, "ner", Path(tmp) / "hf")
            peer = transformers.pipeline("token-classification", model=str(hf_dir), aggregation_strategy="first")
            mlflow.transformers.save_model(peer, f"{tmp}/peer", pip_requirements=[  # (its defaults want torchvision)
                f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
            contenders.append((f"MLflow transformers flavor, {args.workers[0]} worker(s)", f"{tmp}/peer",
                               args.workers[0], [{"inputs": [row["text"] for row in b]} for b in batches]))
        for name, uri, workers, bodies in contenders:
            proc, url = serve(uri, workers)
            try:
                results[name] = measure(url, bodies, args.clients)
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    print(f"\n{len(rows)} CoNLL-2003 dev sentences in {len(batches)} requests of {args.batch}, {args.clients} "
          f"concurrent client(s), model {args.pipeline} (registered as version {version.version})\n")
    print("| server | failed requests | sentences/s (successful requests) | p50 latency (s) | p99 latency (s) "
          "| entity F1 of served answers | answer looks like |")
    print("|---|---|---|---|---|---|---|")
    speeds = {}
    for name, r in results.items():
        served = sum(len(b) for b, a in zip(batches, r["answers"]) if a is not None)
        speeds[name] = served / r["wall"] if served else 0.0
        lat = np.array(r["latencies"]) if r["latencies"] else np.array([float("nan")])
        flat = [row for batch, a in zip(batches, r["answers"]) for row in (a or [None] * len(batch))]
        f1 = entity_f1(flat, gold) if not r["failed"] else None
        example = json.dumps(next((x for x in flat if x is not None), "-"))[:70]
        print(f"| {name} | {r['failed']} of {len(batches)} | {speeds[name]:.1f} | {np.percentile(lat, 50):.3f} | "
              f"{np.percentile(lat, 99):.3f} | {'n/a' if f1 is None else f'{100 * f1:.2f}'} | `{example}` |")
    for name, r in results.items():
        if r["first_error"]:
            print(f"\n{name}, first failure: {r['first_error']}")
    names = list(speeds)
    if len(names) > 1 and speeds[names[-1]]:
        print(f"\nthroughput ratio over successful requests, {names[0]} / {names[-1]}: "
              f"{speeds[names[0]] / speeds[names[-1]]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

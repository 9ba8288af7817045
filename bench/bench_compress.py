"""Compression on real data: accuracy and CPU docs/s of fp32, bf16, int8, a 3-layer student and the
student in int8, against `transformers.pipeline` fp32 on the same inputs, in one process; and each
variant's resident memory (step `memory`, a fresh process per variant).

Step `train` (nice -n 19: the machine is shared) runs the real CLI per dataset: `sllm prepare`, then
`sllm finetune` (the teacher) and `sllm distill --layers 3` (the student), skipping what exists. Step
`measure` waits until the 1-minute load average is below --quiet-load (polled every 30 s, for up to
--max-wait minutes; the load is printed either way), then evaluates every variant on the dev file with
`evaluate.score_pipeline` (nlp.pipe, the path `sllm evaluate` takes), timing each --repeats times and
keeping the best run. Data is read from ../shared/data; outputs go to bench/out/compress/.

    .venv/bin/python bench/bench_compress.py train                 # teachers and students (long)
    .venv/bin/python bench/bench_compress.py measure               # the table
    .venv/bin/python bench/bench_compress.py memory                # resident memory
"""

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "compress"
SLLM = str(Path(sys.executable).parent / "sllm")

# A budget that fits a 2-core CPU (bench_accuracy.py's recipes take 12-40 min per dataset on a quiet machine).
# Teachers: CoNLL 1 epoch, SST-2 300 steps, SQuAD 1 epoch (bench_accuracy.py's first SQuAD epoch reached
# 60.73 F1). Students are distilled longer than their teacher was fine-tuned (CoNLL 2 epochs, SST-2 600
# steps, SQuAD 2 epochs; 1-epoch / 150-step / 1-epoch students lost 2.50 / 3.33 / 10.15 points in int8).
DATASETS = {
    "conll2003": dict(task="ner", train=["conll2003/train.conll"], dev="conll2003/dev.conll", prepare=[],
                      teacher=["--epochs", "1", "--batch-size", "32", "--lr", "1e-4"],
                      student=["--epochs", "2", "--batch-size", "32", "--lr", "1e-4"]),
    "sst2": dict(task="textcat", train=["sst2/train.tsv"], dev="sst2/dev.tsv", prepare=["--text-column", "sentence"],
                 teacher=["--max-steps", "300", "--eval-steps", "150", "--batch-size", "32", "--lr", "5e-5"],
                 student=["--max-steps", "600", "--eval-steps", "300", "--batch-size", "32", "--lr", "1e-4"]),
    "squad": dict(task="qa", train=["squad/train-v1.1.partial.json", "squad/train-extra-v1.1.json"],
                  dev="squad/dev.json", prepare=[],
                  teacher=["--epochs", "1", "--batch-size", "16", "--lr", "1e-4", "--max-length", "256"],
                  student=["--epochs", "2", "--batch-size", "16", "--lr", "1e-4", "--max-length", "256"]),
}
STUDENT_LAYERS = 3


def run(cmd: List) -> None:
    print("$", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    if subprocess.run(["nice", "-n", "19", *map(str, cmd)], cwd=ROOT).returncode:
        raise SystemExit("command failed")


def train(name: str) -> None:
    d, out = DATASETS[name], OUT / name
    if not (out / "data" / "train.spacy").is_file():
        run([SLLM, "prepare", d["task"], *[DATA / t for t in d["train"]], "--dev", DATA / d["dev"],
             "--output", out / "data", *d["prepare"]])
    data = ["--train", out / "data" / "train.spacy", "--dev", out / "data" / "dev.spacy"]
    if not (out / "teacher" / "metrics.json").is_file():
        run([SLLM, "finetune", d["task"], *data, "--output", out / "teacher", *d["teacher"], "--device", "cpu",
             "--no-track", "--resume"])
    if not (out / "student" / "metrics.json").is_file():
        run([SLLM, "distill", out / "teacher", *data, "--output", out / "student", "--layers", STUDENT_LAYERS,
             *d["student"], "--device", "cpu", "--no-track", "--resume"])


# ---------------------------------------------------------------------------------------------
# measure


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, max_minutes: float) -> float:
    start = time.monotonic()
    while load1() >= threshold and time.monotonic() - start < 60 * max_minutes:
        print(f"load average {load1():.2f} >= {threshold}: waiting ({(time.monotonic() - start) / 60:.0f} min)",
              flush=True)
        time.sleep(30)
    return load1()


def best_of(repeats: int, timed: Callable[[], float]) -> float:
    return min(timed() for _ in range(repeats))


def variants(name: str) -> Dict[str, tuple]:
    """Variant -> (pipeline folder, component overrides)."""
    out = OUT / name
    return {"fp32": (out / "teacher", {}), "bf16": (out / "teacher", {"dtype": "bfloat16"}),
            "int8": (out / "teacher", {"quantize": "int8"}),
            f"student-{STUDENT_LAYERS}L fp32": (out / "student", {}),
            f"student-{STUDENT_LAYERS}L int8": (out / "student", {"quantize": "int8"}),
            **({"int8 onnxruntime": (out / "teacher", {"quantize": "int8", "runtime": "onnxruntime"}),
                f"student-{STUDENT_LAYERS}L int8 onnxruntime": (out / "student", {"quantize": "int8",
                                                                                  "runtime": "onnxruntime"})}
               if importlib.util.find_spec("onnxruntime") else {})}


def measure_ours(folder: Path, overrides: dict, references, repeats: int) -> dict:
    import spacy

    from spacy_llm_components.stages.compress import hf_components
    from spacy_llm_components.stages.shared.scoring import score_pipeline

    nlp = spacy.load(folder, config={"components": {hf_components(folder)[0]: {"device": "cpu", **overrides}}})
    score_pipeline(nlp, references[:64])  # warm-up
    runs = [score_pipeline(nlp, references) for _ in range(repeats)]
    best = min(runs, key=lambda r: r.statistics["seconds"])
    return {"score": best.primary_score, "primary": best.primary, "seconds": best.statistics["seconds"],
            "docs": best.statistics["docs"], "docs_per_second": len(references) / best.statistics["seconds"],
            "word_pieces_per_second": best.statistics["word_pieces_per_second"]}


def hf_pipeline_seconds(name: str, folder: Path, references, repeats: int, batch_size: int) -> float:
    """transformers.pipeline fp32 on the exported teacher, the same texts (and questions)."""
    import spacy
    import torch
    import transformers

    from spacy_llm_components import export_hf
    from spacy_llm_components.components.pipeline import hf_component
    from spacy_llm_components.stages.compress import hf_components

    nlp = spacy.load(folder, config={"components": {hf_components(folder)[0]: {"device": "cpu"}}})
    pipe = hf_component(nlp)
    hf_dir = OUT / name / "teacher-hf"
    if not hf_dir.is_dir():
        export_hf(nlp, pipe.name, hf_dir)
    task = pipe.spec.hf_task
    kwargs = {"aggregation_strategy": "first"} if task == "token-classification" else {}
    hf = transformers.pipeline(task, model=str(hf_dir), device=torch.device("cpu"), batch_size=batch_size,
                               torch_dtype=torch.float32, **kwargs)
    if task == "question-answering":
        inputs = [{"question": qa["question"], "context": ref.text} for ref in references for qa in ref._.qas]
        call = lambda items: hf(items, max_seq_len=pipe.max_length, doc_stride=pipe.doc_stride)  # noqa: E731
    else:
        inputs = [ref.text for ref in references]
        call = hf
    call(inputs[:64])  # warm-up

    def timed() -> float:
        start = time.perf_counter()
        list(call(inputs))
        return time.perf_counter() - start

    return best_of(repeats, timed)


def measure(name: str, args) -> List[dict]:
    import spacy

    from spacy_llm_components.tasks import load_docs

    d, out = DATASETS[name], OUT / name
    nlp = spacy.blank("en")
    from spacy_llm_components.data import ReadOptions

    options = ReadOptions(text_column="sentence") if d["task"] == "textcat" else ReadOptions()
    loaded = load_docs(d["task"], DATA / d["dev"], nlp, options=options)
    teacher = spacy.load(out / "teacher")
    from spacy_llm_components.components.pipeline import hf_component

    hf_component(teacher).spec.gold_for(loaded, hf_component(teacher))
    references = loaded.docs
    rows = []
    load = wait_for_quiet(args.quiet_load, args.max_wait)
    print(f"{name}: timing with load average {load:.2f}", flush=True)
    hf_seconds = hf_pipeline_seconds(name, out / "teacher", references, args.repeats, args.hf_batch_size)
    for variant, (folder, overrides) in variants(name).items():
        row = {"dataset": name, "variant": variant, "load_before": round(load1(), 2),
               **measure_ours(folder, overrides, references, args.repeats)}
        row["x_hf_pipeline"] = hf_seconds / row["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp32 = rows[0]
    for row in rows:
        row["x_fp32"] = fp32["seconds"] / row["seconds"]
        row["points_lost"] = 100 * (fp32["score"] - row["score"])
    rows.append({"dataset": name, "variant": "transformers.pipeline fp32", "seconds": hf_seconds,
                 "docs_per_second": len(references) / hf_seconds, "x_hf_pipeline": 1.0,
                 "x_fp32": fp32["seconds"] / hf_seconds, "load_before": round(load1(), 2)})
    if d["task"] == "qa":  # a QA doc is one context with several questions
        questions = sum(len(ref._.qas) for ref in references)
        for row in rows:
            row["questions_per_second"] = questions / row["seconds"]
    return rows


MEMORY_PROBE = """
import gc, json, sys
import psutil, spacy
from spacy_llm_components.stages.compress import hf_components
folder, overrides = sys.argv[1], json.loads(sys.argv[2])
process = psutil.Process()
before = process.memory_info().rss
nlp = spacy.load(folder, config={"components": {hf_components(folder)[0]: {"device": "cpu", **overrides}}})
list(nlp.pipe(sys.argv[3:]))
gc.collect()
after = process.memory_info().rss
print(json.dumps({"rss_mib": after / 2**20, "loaded_mib": (after - before) / 2**20}))
"""


def memory(name: str) -> List[dict]:
    """Resident memory of each variant, each in a fresh process: after `spacy.load` and one batch of dev texts."""
    import spacy

    from spacy_llm_components.data import ReadOptions
    from spacy_llm_components.tasks import load_docs

    d = DATASETS[name]
    options = ReadOptions(text_column="sentence") if d["task"] == "textcat" else ReadOptions()
    texts = [doc.text for doc in load_docs(d["task"], DATA / d["dev"], spacy.blank("en"), options=options).docs[:32]]
    rows = []
    for variant, (folder, overrides) in variants(name).items():
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder), json.dumps(overrides), *texts],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
        rows.append({"dataset": name, "variant": variant, **json.loads(out)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: List[dict]) -> str:
    lines = ["| dataset | variant | metric | dev score | points lost | docs/s | x fp32 | x transformers.pipeline | "
             "load avg before |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        score = f"{100 * r['score']:.2f}" if "score" in r else "-"
        lost = f"{r['points_lost']:.2f}" if "points_lost" in r else "-"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r.get('primary', '-')} | {score} | {lost} | "
                     f"{r['docs_per_second']:,.1f} | {r['x_fp32']:.2f} | {r['x_hf_pipeline']:.2f} | "
                     f"{r['load_before']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "measure", "memory"])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender (the best counts)")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="transformers.pipeline batch size")
    parser.add_argument("--quiet-load", type=float, default=0.5, help="1-minute load average to wait for")
    parser.add_argument("--max-wait", type=float, default=60, help="minutes to wait for it at most")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmarks read the shared data folder")
    if args.step == "train":
        for name in args.datasets:
            train(name)
        return
    if args.step == "memory":
        rows = [row for name in args.datasets for row in memory(name)]
        print("| dataset | variant | resident MiB | of which the loaded pipeline |\n| --- | --- | ---: | ---: |")
        for r in rows:
            print(f"| {r['dataset']} | {r['variant']} | {r['rss_mib']:.0f} | {r['loaded_mib']:.0f} |")
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU:", flush=True)
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Flags:")[0], flush=True)
    rows = [row for name in args.datasets for row in measure(name, args)]
    results = OUT / "results.json"  # other datasets' rows from earlier runs are kept
    earlier = json.loads(results.read_text()) if results.is_file() else []
    kept = [r for r in earlier if r["dataset"] not in args.datasets]
    results.write_text(json.dumps(kept + rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()

"""Accuracy on the shared real data: `sllm prepare` -> `sllm finetune` -> `sllm evaluate`, per dataset.

Runs the real CLI commands (printed as they run), then prints one table row per
dataset from the metrics they wrote. Data is read from ../shared/data (never
copied); outputs go to bench/out/accuracy/<dataset>/.

    .venv/bin/python bench/bench_accuracy.py conll2003 sst2 squad wnut17 banking77
    .venv/bin/python bench/bench_accuracy.py sst2 --fraction 0.25   # a stated fraction of train
"""

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "accuracy"
SLLM = str(Path(sys.executable).parent / "sllm")

# dataset -> task, train file(s), dev file (None: carved from train), prepare options, finetune options
DATASETS = {
    "conll2003": ("ner", ["conll2003/train.conll"], "conll2003/dev.conll", [],
                  ["--epochs", "3", "--batch-size", "32", "--lr", "1e-4"]),
    "wnut17": ("ner", ["wnut17/wnut17train.conll"], "wnut17/emerging.dev.conll", [],
               ["--epochs", "5", "--batch-size", "16", "--lr", "1e-4"]),
    "sst2": ("textcat", ["sst2/train.tsv"], "sst2/dev.tsv", ["--text-column", "sentence"],
             ["--epochs", "1", "--batch-size", "32", "--lr", "5e-5", "--eval-steps", "700"]),
    "banking77": ("textcat", ["banking77/train.csv"], None, ["--label-column", "category"],
                  ["--epochs", "5", "--batch-size", "32", "--lr", "2e-4"]),
    "squad": ("qa", ["squad/train-v1.1.partial.json", "squad/train-extra-v1.1.json"], "squad/dev.json", [],
              ["--epochs", "3", "--batch-size", "16", "--lr", "1e-4"]),
}


def run(cmd) -> str:
    print("$", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return proc.stdout


def subset(path: Path, fraction: float, out: Path) -> Path:
    """A seeded fraction of a line/sentence-based training file (header kept), written under bench/out."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".conll":
        blocks = [b for b in text.split("\n\n") if b.strip()]
        keep = sorted(random.Random(0).sample(range(len(blocks)), int(len(blocks) * fraction)))
        out.write_text("\n\n".join(blocks[i] for i in keep) + "\n", encoding="utf8")
    else:
        header, *rows = text.splitlines()
        keep = sorted(random.Random(0).sample(range(len(rows)), int(len(rows) * fraction)))
        out.write_text("\n".join([header, *(rows[i] for i in keep)]) + "\n", encoding="utf8")
    return out


def bench(name: str, fraction: float, extra: list) -> dict:
    task, trains, dev, prep_opts, ft_opts = DATASETS[name]
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    train_paths = [DATA / t for t in trains]
    if fraction < 1.0:
        if task == "qa":
            raise SystemExit("--fraction is not supported for SQuAD files")
        train_paths = [subset(p, fraction, out / f"train-{fraction:g}{p.suffix}") for p in train_paths]
    cmd = [SLLM, "prepare", task, *train_paths, "--output", out / "data", *prep_opts]
    if dev:
        cmd += ["--dev", DATA / dev]
    run(cmd)
    start = time.time()
    run([SLLM, "finetune", task, "--train", out / "data/train.spacy", "--dev", out / "data/dev.spacy",
         "--output", out / "model", *ft_opts, *extra])
    dev_eval = DATA / dev if dev else out / "data/dev.spacy"
    run([SLLM, "evaluate", out / "model", dev_eval, "--output", out / "eval", *prep_opts])
    evaluation = json.loads((out / "eval/metrics.json").read_text())
    training = json.loads((out / "model/metrics.json").read_text())["training"]
    row = {"dataset": name, "task": task, "fraction": fraction, "primary": evaluation["primary"],
           "score": evaluation["scores"][evaluation["primary"]],
           "eval_words_per_second": evaluation["statistics"]["words_per_second"],
           **{f"train_{k}": v for k, v in training.items()}, "total_seconds": round(time.time() - start, 1)}
    (out / "result.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", choices=sorted(DATASETS))
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the training file to use")
    parser.add_argument("--finetune-args", default="", help="extra `sllm finetune` options, e.g. '--max-steps 200'")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmarks read the shared data folder")
    rows = [bench(name, args.fraction, shlex.split(args.finetune_args)) for name in args.datasets]
    print("\n| dataset | task | train fraction | metric | dev score | train time | word pieces/s (train) | eval words/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['task']} | {r['fraction']:g} | {r['primary']} | {100 * r['score']:.2f} | "
              f"{r['train_wall_seconds'] / 60:.1f} min | {r['train_word_pieces_per_second']:,.0f} | "
              f"{r['eval_words_per_second']:,.0f} |")


if __name__ == "__main__":
    main()

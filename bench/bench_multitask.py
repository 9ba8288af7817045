"""Accuracy of two heads trained together on one encoder against each trained alone, with the same budget.

CoNLL-2003 NER and SST-2 sentiment (../shared/data, dev splits; the test splits stay held out). Each task
gets the same training examples, steps, batch size and learning rate alone and together:

  * NER alone:      `sllm finetune ner` on CoNLL-2003 train, 1 epoch;
  * SST-2 alone:    `sllm finetune textcat` on the first --sst2-train sentences of SST-2 train, 1 epoch;
  * together:       `sllm finetune ner+textcat` on both, 1 epoch with proportional sampling, which gives
                    each task exactly its batches of the runs alone (and the sum of their steps);

then `sllm evaluate` of each head on its dev file. The commands are printed and run as a user runs them;
outputs go to bench/out/multitask/ (the SST-2 subset is written there, outside the repository's files).

    .venv/bin/python bench/bench_multitask.py                       # MiniLM, CPU
    .venv/bin/python bench/bench_multitask.py --model ~/.cache/sllm-models/all-mpnet-base-v2 --gpu-id 0
"""

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out" / "multitask"
SLLM = str(Path(sys.executable).parent / "sllm")


def run(args) -> float:
    print("$ " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    start = time.perf_counter()
    subprocess.run([str(a) for a in args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--sst2-train", type=int, default=9600, help="SST-2 training sentences (300 batches of 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gpu-id", type=int, default=-1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    subset = out / "sst2-train-subset.tsv"
    with open(DATA / "sst2" / "train.tsv", encoding="utf8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:args.sst2_train]
    with open(subset, "w", encoding="utf8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t")
        writer.writeheader()
        writer.writerows({"sentence": r["sentence"], "label": r["label"]} for r in rows)
    corpus = {"ner": out / "corpus-ner", "textcat": out / "corpus-sst2"}
    dev = {"ner": DATA / "conll2003" / "dev.conll", "textcat": DATA / "sst2" / "dev.tsv"}
    run([SLLM, "prepare", "ner", DATA / "conll2003" / "train.conll", "--dev", dev["ner"], "-o", corpus["ner"]])
    run([SLLM, "prepare", "textcat", subset, "--dev", dev["textcat"], "--text-column", "sentence", "-o",
         corpus["textcat"]])
    common = ["--base-model", args.model, "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--gpu-id", str(args.gpu_id), "--no-track"]
    seconds = {}
    for task in ("ner", "textcat"):
        seconds[task] = run([SLLM, "finetune", task, "--train", corpus[task] / "train.spacy", "--dev",
                             corpus[task] / "dev.spacy", "-o", out / f"alone-{task}", *common])
    seconds["together"] = run([SLLM, "finetune", "ner+textcat", "--train", corpus["ner"] / "train.spacy", "--train",
                               corpus["textcat"] / "train.spacy", "--dev", corpus["ner"] / "dev.spacy", "--dev",
                               corpus["textcat"] / "dev.spacy", "-o", out / "together", *common])
    scores = {}
    for task in ("ner", "textcat"):
        run([SLLM, "evaluate", out / f"alone-{task}", dev[task], "--text-column", "sentence", "-o",
             out / f"eval-alone-{task}", "--no-track"])
        scores[("alone", task)] = json.loads((out / f"eval-alone-{task}" / "metrics.json").read_text())
    run([SLLM, "evaluate", out / "together", f"ner={dev['ner']}", f"textcat={dev['textcat']}", "--text-column",
         "sentence", "-o", out / "eval-together", "--no-track"])
    together = json.loads((out / "eval-together" / "metrics.json").read_text())["heads"]
    meta = json.loads((out / "together" / "meta.json").read_text())["sllm"]
    print(f"\nbatches per epoch together: {meta['batches_per_epoch']}")
    print("| head | metric | alone (dev) | together (dev) | difference | train time alone | train time together |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for task, head in (("ner", "ner"), ("textcat", "textcat")):
        alone = scores[("alone", task)]
        primary = alone["primary"]
        a, t = 100 * alone["scores"][primary], 100 * together[head]["scores"][primary]
        print(f"| {head} | {primary} | {a:.2f} | {t:.2f} | {t - a:+.2f} | {seconds[task] / 60:.1f} min | "
              f"{seconds['together'] / 60:.1f} min (both) |")


if __name__ == "__main__":
    main()

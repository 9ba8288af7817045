"""Accuracy of two heads trained together on one encoder against each trained alone, with the same budget.

CoNLL-2003 NER and SST-2 sentiment (../shared/data, dev splits; the test splits stay held out). Each task
gets the same training examples, steps, batch size and learning rate alone and together:

  * NER alone:      `sllm finetune ner` on CoNLL-2003 train, 1 epoch;
  * SST-2 alone:    `sllm finetune textcat` on the first --sst2-train sentences of SST-2 train, 1 epoch;
  * together:       `sllm finetune ner+textcat` on both, 1 epoch with proportional sampling, which gives
                    each task exactly its batches of the runs alone (and the sum of their steps);

then `sllm evaluate` of each head on its dev file; and, with --student-layers, `sllm distill` of the
pipeline trained together into a student that keeps both heads on an encoder of that many of its layers
(the same data and epoch, soft targets mixed with the gold labels), evaluated the same way. The commands
are printed and run as a user runs them; outputs go to bench/out/multitask/seed-N/ (the SST-2 subset is
written there, outside the repository's files). A step whose output is complete is not run again.

    .venv/bin/python bench/bench_multitask.py --seed 0 --student-layers 3     # MiniLM, CPU
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


def run(args, done: Path) -> float:
    """Run the command unless `done` (its output's last file) exists; its seconds (the run before's, read
    back from `done`'s folder, when it is not run again)."""
    timing = done.parent / "bench-seconds.txt"
    if done.exists() and timing.exists():
        print(f"(done: {done})", flush=True)
        return float(timing.read_text())
    print("$ " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    start = time.perf_counter()
    subprocess.run([str(a) for a in args], check=True)
    seconds = time.perf_counter() - start
    timing.write_text(f"{seconds:.1f}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--sst2-train", type=int, default=9600, help="SST-2 training sentences (300 batches of 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gpu-id", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=0, help="of every run (the head's initialisation, the order)")
    parser.add_argument("--student-layers", type=int, default=0, help="also distill the pipeline trained together "
                                                                     "into a student of this many layers")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out = args.out / f"seed-{args.seed}"
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
    run([SLLM, "prepare", "ner", DATA / "conll2003" / "train.conll", "--dev", dev["ner"], "-o", corpus["ner"]],
        corpus["ner"] / "dev.spacy")
    run([SLLM, "prepare", "textcat", subset, "--dev", dev["textcat"], "--text-column", "sentence", "-o",
         corpus["textcat"]], corpus["textcat"] / "dev.spacy")
    steps = ["--epochs", "1", "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--gpu-id",
             str(args.gpu_id), "--seed", str(args.seed), "--no-track"]
    common = ["--base-model", args.model, *steps]
    both = ["--train", corpus["ner"] / "train.spacy", "--train", corpus["textcat"] / "train.spacy", "--dev",
            corpus["ner"] / "dev.spacy", "--dev", corpus["textcat"] / "dev.spacy"]
    seconds = {}
    for task in ("ner", "textcat"):
        seconds[task] = run([SLLM, "finetune", task, "--train", corpus[task] / "train.spacy", "--dev",
                             corpus[task] / "dev.spacy", "-o", out / f"alone-{task}", *common],
                            out / f"alone-{task}" / "metrics.json")
    seconds["together"] = run([SLLM, "finetune", "ner+textcat", *both, "-o", out / "together", *common],
                              out / "together" / "metrics.json")
    pipelines = ["together"]
    if args.student_layers:
        seconds["student"] = run([SLLM, "distill", out / "together", *both, "-o", out / "student", "--layers",
                                  str(args.student_layers), *steps], out / "student" / "metrics.json")
        pipelines.append("student")
    scores = {}
    for task in ("ner", "textcat"):
        run([SLLM, "evaluate", out / f"alone-{task}", dev[task], "--text-column", "sentence", "-o",
             out / f"eval-alone-{task}", "--no-track"], out / f"eval-alone-{task}" / "report.md")
        scores[("alone", task)] = json.loads((out / f"eval-alone-{task}" / "metrics.json").read_text())
    for name in pipelines:
        run([SLLM, "evaluate", out / name, f"ner={dev['ner']}", f"textcat={dev['textcat']}", "--text-column",
             "sentence", "-o", out / f"eval-{name}", "--no-track"], out / f"eval-{name}" / "report.md")
        for head, evaluation in json.loads((out / f"eval-{name}" / "metrics.json").read_text())["heads"].items():
            scores[(name, head)] = evaluation
    meta = json.loads((out / "together" / "meta.json").read_text())["sllm"]
    print(f"\nseed {args.seed}; batches per epoch together: {meta['batches_per_epoch']}")
    print("| head | metric | alone (dev) | together (dev) | difference | train time alone | train time together |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for head in ("ner", "textcat"):
        alone = scores[("alone", head)]
        primary = alone["primary"]
        a, t = 100 * alone["scores"][primary], 100 * scores[("together", head)]["scores"][primary]
        print(f"| {head} | {primary} | {a:.2f} | {t:.2f} | {t - a:+.2f} | {seconds[head] / 60:.1f} min | "
              f"{seconds['together'] / 60:.1f} min (both) |")
    if args.student_layers:
        print(f"\nstudent: both heads on {args.student_layers} layers, distilled in {seconds['student'] / 60:.1f} min")
        print("| head | metric | together (dev) | student (dev) | difference | docs/s together | docs/s student | "
              "speed-up |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for head in ("ner", "textcat"):
            t, st = scores[("together", head)], scores[("student", head)]
            primary = t["primary"]
            a, b = 100 * t["scores"][primary], 100 * st["scores"][primary]
            ta, tb = t["statistics"]["docs_per_second"], st["statistics"]["docs_per_second"]
            print(f"| {head} | {primary} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f}x |")


if __name__ == "__main__":
    main()

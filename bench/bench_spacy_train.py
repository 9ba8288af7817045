"""`spacy train` against `sllm finetune` on CoNLL-2003: dev entity F1 and training speed at the same number
of steps, batch size (sentences) and learning rate (peak, after warmup, then linear decay), from the
offline MiniLM base with a new head. Both evaluate once, at the end, on the full dev set.

Runs the real commands (printed), reads ../shared/data, writes under bench/out/spacy-train/.

    .venv/bin/python bench/bench_spacy_train.py --steps 440 --batch-size 32 --lr 1e-4
    .venv/bin/python bench/bench_spacy_train.py --steps 40 --dev-limit 32 --out bench/out/spacy-train-speed
        # speed only: with a 32-sentence dev set, evaluation (spacy train evaluates at step 0 too) costs
        # next to nothing, so each wall time is loading plus training

`--arms spacy` runs one arm only (the other's earlier output in --out is read for the table), so the two
long runs can be made at different times; their speed figures are comparable only from one quiet run.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "conll2003"
OUT = ROOT / "bench" / "out" / "spacy-train"
BIN = Path(sys.executable).parent


def run(cmd) -> float:
    print("$", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"command failed with exit code {done.returncode}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=440)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--arms", default="finetune,spacy", help="which to run: finetune, spacy or both")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev sentences only")
    args = parser.parse_args()
    out, arms = args.out.resolve(), args.arms.split(",")
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmarks read the shared data folder")
    out.mkdir(parents=True, exist_ok=True)
    warmup = max(1, round(0.1 * args.steps))
    data = OUT / "data"
    if not (data / "train.spacy").is_file():
        run([BIN / "sllm", "prepare", "ner", DATA / "train.conll", "--dev", DATA / "dev.conll", "-o", data])
    dev = data / "dev.spacy"
    if args.dev_limit:
        import spacy
        from spacy.tokens import DocBin

        docs = list(DocBin().from_disk(dev).get_docs(spacy.blank("en").vocab))[:args.dev_limit]
        dev = out / f"dev-{args.dev_limit}.spacy"
        DocBin(docs=docs, store_user_data=True).to_disk(dev)
    walls = {}
    if "finetune" in arms:
        walls["finetune"] = run([BIN / "sllm", "finetune", "ner", "--train", data / "train.spacy", "--dev", dev,
                                 "--output", out / "finetune", "--max-steps", args.steps, "--eval-steps", args.steps,
                                 "--batch-size", args.batch_size, "--lr", args.lr, "--warmup-ratio", 0.1,
                                 "--device", "cpu", "--no-track"])
    if "spacy" in arms:
        walls["spacy"] = run([sys.executable, "-m", "spacy", "train", ROOT / "pipelines" / "train-ner.cfg",
                              "--paths.train", data / "train.spacy", "--paths.dev", dev,
                              "--output", out / "spacy", "--training.max_steps", args.steps,
                              "--training.eval_frequency", args.steps, "--training.batcher.size", args.batch_size,
                              "--training.optimizer.learn_rate.initial_rate", args.lr,
                              "--training.optimizer.learn_rate.warmup_steps", warmup, "--components.ner.device", "cpu"])
    finetune = json.loads((out / "finetune" / "metrics.json").read_text())
    if finetune["training"]["steps"] != args.steps:
        raise SystemExit(f"{out / 'finetune'} ran {finetune['training']['steps']} steps, not {args.steps}")
    spacy_f = json.loads((out / "spacy" / "model-last" / "meta.json").read_text())["performance"]["ents_f"]
    wall = {arm: f"{walls[arm]:.0f} s" if arm in walls else "(earlier run)" for arm in ("finetune", "spacy")}
    rate = {arm: f"{args.steps / walls[arm]:.2f}" if arm in walls else "-" for arm in ("finetune", "spacy")}
    print(f"\nCoNLL-2003, MiniLM + new head, {args.steps} steps x {args.batch_size} sentences, peak lr {args.lr}, "
          f"warmup {warmup} steps then linear decay, CPU\n")
    print("| trainer | dev entity F1 | wall time (prepare excluded) | steps/s (wall) | train word pieces/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    t = finetune["training"]
    print(f"| sllm finetune (HF Trainer, AdamW) | {100 * finetune['dev']['ents_f']:.2f} | {wall['finetune']} | "
          f"{rate['finetune']} | {t['word_pieces_per_second']:,.0f} |")
    print(f"| spacy train (thinc Adam, L2 0.01 as weight decay) | {100 * spacy_f:.2f} | {wall['spacy']} | "
          f"{rate['spacy']} | n/a |")
    print(f"\ndifference: {100 * (spacy_f - finetune['dev']['ents_f']):+.2f} points")


if __name__ == "__main__":
    main()

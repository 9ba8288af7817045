"""Task-adaptive pre-training on the shared data: does adapting MiniLM to a task's own text help its fine-tune?

Per dataset, with the real CLI commands (printed as they run):
1. `sllm prepare` the labelled train/dev files (as bench_accuracy.py does);
2. `sllm pretrain` MiniLM on the text of the training file only (never dev text); perplexity before
   and after on a seeded 5% of those documents, held out;
3. `sllm finetune` twice with the same recipe and seed: from MiniLM (the baseline) and from the adapted
   encoder; `sllm evaluate` both on the dev file.
Data is read from ../shared/data (never copied); outputs go to bench/out/pretrain/<dataset>/. A step
whose output is complete is not run again, so an interrupted benchmark continues where it stopped.

    .venv/bin/python bench/bench_pretrain.py wnut17 conll2003 sst2 squad
    .venv/bin/python bench/bench_pretrain.py wnut17 --pretrain-steps 400 --tag -400   # another budget, beside
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import DATA, DATASETS, ROOT, SLLM, run  # noqa: E402  (the fine-tuning recipes)

OUT = ROOT / "bench" / "out" / "pretrain"

# Pre-training, fixed before any dev score was seen: blocks of 128 pieces (the tasks' texts are short),
# batch 16, lr 1e-4 with 6% warmup, 5% of the documents held out, 200 steps (3,200 blocks, about 400k
# word pieces: about what one fine-tune below costs). The corpus is the training file(s) of the task.
PRETRAIN = ["--max-length", "128", "--batch-size", "16", "--lr", "1e-4", "--warmup-ratio", "0.06",
            "--dev-fraction", "0.05", "--seed", "0", "--eval-steps", "50"]
STEPS = {"wnut17": 200, "conll2003": 200, "sst2": 200, "squad": 200}
CORPUS_OPTIONS = {"sst2": ["--text-column", "sentence"]}
# The fine-tuning recipes of bench_accuracy.py (batch size, learning rate, seed 0), cut to fit a shared
# 2-core CPU, both arms alike: WNUT-17 3 epochs instead of 5; CoNLL-2003 1 epoch instead of 3; SST-2 500
# steps (16,000 sentences) of its one epoch; SQuAD 150 steps (2,400 windows) at max length 256 instead of
# 2 epochs.
FINETUNE_OVERRIDES = {"wnut17": ["--epochs", "3"], "conll2003": ["--epochs", "1"],
                      "sst2": ["--max-steps", "500", "--eval-steps", "250"],
                      "squad": ["--max-steps", "150", "--eval-steps", "75", "--max-length", "256"]}


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def step(done: Path, cmd) -> None:
    """Run `cmd` unless `done` (the last file it writes) exists."""
    if done.is_file():
        print(f"# {done.relative_to(ROOT)} exists: skipping {' '.join(shlex.quote(str(c)) for c in cmd[:3])} ...")
        return
    run(cmd)


def bench(name: str, steps: int, tag: str) -> dict:
    task, trains, dev, prep_opts, ft_opts = DATASETS[name]
    ft_opts = [*ft_opts, *FINETUNE_OVERRIDES.get(name, [])]
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    train_paths = [DATA / t for t in trains]
    step(out / "data" / "summary.json",
         [SLLM, "prepare", task, *train_paths, "--output", out / "data", "--dev", DATA / dev, *prep_opts])
    encoder = out / f"encoder{tag}"
    corpus = [arg for p in train_paths for arg in ("--corpus", p)]
    step(encoder / "metrics.json", [SLLM, "pretrain", *corpus, "--output", encoder, *PRETRAIN, "--max-steps", str(steps),
                                    *CORPUS_OPTIONS.get(name, []), "--no-track"])
    scores = {}
    for arm, base in (("baseline", []), (f"adapted{tag}", ["--base-model", encoder])):
        model, evaluation = out / f"{arm}-model", out / f"{arm}-eval"
        step(model / "metrics.json", [SLLM, "finetune", task, "--train", out / "data/train.spacy", "--dev",
                                      out / "data/dev.spacy", "--output", model, *ft_opts, *base, "--no-track"])
        step(evaluation / "metrics.json", [SLLM, "evaluate", model, DATA / dev, "--output", evaluation, *prep_opts,
                                           "--no-track"])
        scores[arm] = {"dev": metrics(evaluation / "metrics.json"), "training": metrics(model / "metrics.json")}
    pre = metrics(encoder / "metrics.json")
    base_eval, adapted_eval = scores["baseline"]["dev"], scores[f"adapted{tag}"]["dev"]
    primary = base_eval["primary"]
    row = {"dataset": name, "task": task, "metric": primary,
           "baseline": base_eval["scores"][primary], "adapted": adapted_eval["scores"][primary],
           "perplexity_before": pre["perplexity_before"], "perplexity_after": pre["perplexity_after"],
           "pretrain_steps": pre["training"]["steps"], "pretrain_word_pieces": pre["training"]["word_pieces"],
           "pretrain_minutes": pre["training"]["wall_seconds"] / 60,
           "pretrain_word_pieces_per_second": pre["training"]["word_pieces_per_second"],
           "corpus": {k: pre["corpus"][k] for k in ("documents", "word_pieces", "blocks")},
           "heldout": {k: pre["heldout"][k] for k in ("documents", "masked_pieces")},
           "finetune_minutes": {arm: s["training"]["training"]["wall_seconds"] / 60 for arm, s in scores.items()},
           "finetune_options": ft_opts}
    (out / f"result{tag}.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", choices=sorted(STEPS))
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the per-dataset pre-training steps")
    parser.add_argument("--tag", default="", help="suffix of the encoder and adapted-model folders (another budget)")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmarks read the shared data folder")
    rows = [bench(name, args.pretrain_steps or STEPS[name], args.tag) for name in args.datasets]
    print("\n| dataset | metric | held-out perplexity before -> after | pre-training | dev: MiniLM | dev: adapted | "
          "difference |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['dataset']} | {r['metric']} | {r['perplexity_before']:,.0f} -> {r['perplexity_after']:,.1f} | "
              f"{r['pretrain_steps']} steps, {r['pretrain_word_pieces']:,} pieces, "
              f"{r['pretrain_minutes']:.1f} min, {r['pretrain_word_pieces_per_second']:,.0f} pieces/s | "
              f"{100 * r['baseline']:.2f} | {100 * r['adapted']:.2f} | {100 * (r['adapted'] - r['baseline']):+.2f} |")


if __name__ == "__main__":
    main()

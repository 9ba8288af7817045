"""Calibration on held-out data: each dev set split in two halves (seeded, by document); `sllm calibrate` fits
on one, `sllm evaluate` scores the pipeline before and after calibration on the other, so the expected
calibration error after is not measured on the data it was fitted on. Also prints the NER entity score
threshold for precision 0.95 and what it costs in recall on the held-out half.

    .venv/bin/python bench/bench_calibration.py sst2=PIPELINE conll2003=PIPELINE squad=PIPELINE [--seed 0]

PIPELINE: a fine-tuned pipeline folder of the dataset's task (e.g. from bench_multitask.py's alone-* or
bench_accuracy.py). Outputs go to bench/out/calibration/<dataset>/seed-S/ (or --out); one Markdown table
row per dataset. Held-out ECE on a few hundred decisions moves by about 0.01 between splits: run two seeds.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import spacy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "calibration"
SLLM = str(Path(sys.executable).parent / "sllm")

DEV = {"sst2": ("textcat", "sst2/dev.tsv", ["--text-column", "sentence"]),
       "conll2003": ("ner", "conll2003/dev.conll", []),
       "squad": ("qa", "squad/dev.json", [])}


def run(cmd) -> str:
    print("$", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"command failed with exit code {proc.returncode}")
    return proc.stdout


def halves(name: str, pipeline: Path, out: Path, seed: int):
    """The dev set's gold docs (as the pipeline reads them) in two seeded halves, as DocBin files."""
    from spacy_llm_components.components.pipeline import hf_component
    from spacy_llm_components.data import ReadOptions
    from spacy_llm_components.data.docbin import docbin_bytes
    from spacy_llm_components.tasks import load_docs

    task, dev, options = DEV[name]
    nlp = spacy.load(pipeline)
    pipe = hf_component(nlp)
    loaded = load_docs(task, DATA / dev, nlp, options=ReadOptions(text_column="sentence") if options else ReadOptions())
    pipe.spec.gold_for(loaded, pipe)
    order = np.random.default_rng(seed).permutation(len(loaded.docs))
    parts = {"fit": order[: len(order) // 2], "heldout": order[len(order) // 2:]}
    paths = {}
    for part, index in parts.items():
        paths[part] = out / f"{part}.spacy"
        paths[part].write_bytes(docbin_bytes([loaded.docs[i] for i in sorted(index)]))
    return paths


def bench(name: str, pipeline: Path, seed: int, root: Path = OUT) -> dict:
    out = root / name / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    paths = halves(name, pipeline, out, seed)
    run([SLLM, "calibrate", pipeline, "--dev", paths["fit"], "-o", out / "calibrated"])
    variants = {"before": pipeline, "after": out / "calibrated"}
    if DEV[name][0] == "ner":  # the entity threshold apart: it changes which entities the ECE is taken over
        run([SLLM, "calibrate", pipeline, "--dev", paths["fit"], "-o", out / "thresholded", "--ner-precision", "0.95"])
        variants["thresholded"] = out / "thresholded"
    metrics = {}
    for which, model in variants.items():
        run([SLLM, "evaluate", model, paths["heldout"], "-o", out / f"eval-{which}", "--bootstrap-replicates", "0",
             "--no-track"])
        metrics[which] = json.loads((out / f"eval-{which}" / "metrics.json").read_text())
    fitted = next(iter(json.loads((out / "calibrated" / "calibration" / "calibration.json").read_text()).values()))
    before, after = metrics["before"], metrics["after"]
    row = {"dataset": name, "seed": seed, "temperature": fitted["temperature"], "kind": fitted["kind"],
           "fit_decisions": fitted["rows"], "heldout_decisions": after["calibration"]["decisions"],
           "ece_before": before["calibration"]["ece"], "ece_after": after["calibration"]["ece"],
           "brier_before": before["calibration"]["brier"], "brier_after": after["calibration"]["brier"],
           "ece_fit_half_before": fitted["before"]["ece"], "ece_fit_half_after": fitted["after"]["ece"],
           "primary": before["primary"], "score_before": before["scores"][before["primary"]],
           "score_after": after["scores"][after["primary"]], "of": after["calibration"]["of"]}
    if "thresholded" in metrics:
        thresholded = json.loads((out / "thresholded" / "calibration" / "calibration.json").read_text())
        row.update({k: metrics["thresholded"]["scores"][k] for k in ("ents_p", "ents_r", "ents_f")},
                   threshold=next(iter(thresholded.values()))["settings"]["threshold"],
                   precision_before=before["scores"]["ents_p"], recall_before=before["scores"]["ents_r"])
    (out / "result.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="DATASET=PIPELINE, DATASET one of " + ", ".join(DEV))
    parser.add_argument("--seed", type=int, default=0, help="which documents go to each half")
    parser.add_argument("--out", type=Path, default=OUT, help="where the halves, pipelines and evaluations go")
    args = parser.parse_args()
    rows = []
    for item in args.pipelines:
        name, _, pipeline = item.partition("=")
        if name not in DEV or not pipeline:
            raise SystemExit(f"{item!r}: write DATASET=PIPELINE with DATASET one of {', '.join(DEV)}")
        rows.append(bench(name, Path(pipeline).resolve(), args.seed, args.out.resolve()))
    print("\n| dataset | scores of | T (fitted on half A) | held-out decisions | ECE before | ECE after | "
          "Brier before | Brier after | primary before -> after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['of']} | {r['temperature']:.3f} | {r['heldout_decisions']:,} | "
              f"{r['ece_before']:.4f} | {r['ece_after']:.4f} | {r['brier_before']:.4f} | {r['brier_after']:.4f} | "
              f"{r['primary']} {100 * r['score_before']:.2f} -> {100 * r['score_after']:.2f} |")
    for r in rows:
        if "ents_p" in r:
            print(f"\n{r['dataset']}: entity threshold {r['threshold']:.3f} (precision 0.95 on half A): "
                  f"held-out P {100 * r['precision_before']:.2f} -> {100 * r['ents_p']:.2f}, "
                  f"R {100 * r['recall_before']:.2f} -> {100 * r['ents_r']:.2f}")


if __name__ == "__main__":
    main()

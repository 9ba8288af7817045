"""What a serving process pays to start: a fresh interpreter that loads a pipeline and annotates one text
(`spacy.load(PIPELINE)` + `nlp(text)`), timed from interpreter start, with its peak resident memory and
whether the Trainer was imported. Contenders are code roots (this checkout, and an older one given with
--before) run alternately, `--runs` times each; the medians are reported.

The benchmark peers installed by the `bench` extra register spaCy factories that spaCy imports at every
load; they are hidden here (as in a serving image, which does not have them) for every contender alike,
and so are this package's entry points (they name this checkout's modules): each contender registers its
factories by being imported.

    git worktree add /tmp/before 4d42a2a
    .venv/bin/python bench/bench_startup.py --pipeline /tmp/ner-minilm --before /tmp/before --runs 7
(the pipeline: `.venv/bin/python -m spacy assemble pipelines/ner.cfg /tmp/ner-minilm`)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import time, sys
start = time.perf_counter()
import importlib.metadata, resource
import catalogue
catalogue.AVAILABLE_ENTRY_POINTS = importlib.metadata.EntryPoints(
    ep for group in importlib.metadata.entry_points().values() for ep in group
    if not ep.value.startswith(("spacy_huggingface_pipelines", "spacy_llm_components")))
import spacy
import spacy_llm_components  # registers its factories (the installed entry points name this checkout's modules)
nlp = spacy.load(sys.argv[1])
loaded = time.perf_counter() - start
nlp("Lena Hartmann joined Brightwater Foods in Lindenfeld last spring.")
import json
print(json.dumps({"seconds": time.perf_counter() - start, "load_seconds": loaded,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "modules": len(sys.modules), "trainer": "transformers.trainer" in sys.modules,
                  "accelerate": "accelerate" in sys.modules, "code": spacy_llm_components.__file__}))
"""


def run(pipeline: Path, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(pipeline)], capture_output=True, text=True, env=env,
                         check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--before", type=Path, help="an older checkout to compare with")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    roots = {"this checkout": REPO, **({"before": args.before.resolve()} if args.before else {})}
    results = {name: [] for name in roots}
    for _ in range(args.runs):
        for name, root in roots.items():
            results[name].append(run(args.pipeline.resolve(), root))
    print("| code | start to first doc (s) | spacy.load (s) | peak RSS (MiB) | modules | Trainer imported |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "load_seconds", "rss_mib", "modules")}
        assert len({r["code"] for r in runs}) == 1
        print(f"| {name} ({Path(runs[0]['code']).parents[1].name}) | {med['seconds']:.2f} | {med['load_seconds']:.2f} "
              f"| {med['rss_mib']:.0f} | {med['modules']:.0f} | {'yes' if runs[0]['trainer'] else 'no'} |")


if __name__ == "__main__":
    main()

"""One encoder for several heads against one pipeline per head, in one process, on the same weights.

Contenders, over the same CoNLL-2003 dev sentences (../shared/data), float32, each warmed up the same way
(one pass over --warmup texts) and timed --repeats times (best run kept):

  * ner + textcat:   hf_ner's pipeline, then hf_textcat's (run one after the other), against
                     pipelines/ner-textcat.cfg's shape (hf_encoder + both heads);
  * three heads:     NER, sentiment (2 labels) and intent (BANKING77's 77 labels): three pipelines against
                     one encoder with three heads;
  * ner + textcat + qa (--qa): hf_qa runs its own pass on the shared weights (question + context is one
                     sequence), so its share of the time is not saved.

The heads are seeded random heads on the base (--model; the offline MiniLM by default): the computation,
and so the speed, is that of fine-tuned ones. The separate pipelines load each head exported from the
shared pipeline (`export_hf`), so both sides run the same weights; the benchmark checks that they
predict the same (entities exactly, categories within 1e-4) before it reports.

With --memory, the peak resident memory instead: each contender (the NER pipeline alone, NER + textcat on
one encoder, the two pipelines) loaded from its folder in a fresh process that runs the texts through it.

    .venv/bin/python bench/bench_shared.py                                   # MiniLM
    .venv/bin/python bench/bench_shared.py --model ~/.cache/sllm-models/all-mpnet-base-v2 --qa
    .venv/bin/python bench/bench_shared.py --memory
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import spacy  # noqa: E402
import torch  # noqa: E402
from bench_inference import best_time, conll_sentences  # noqa: E402

import spacy_llm_components  # noqa: E402,F401
from spacy_llm_components.components.pipeline import doc_predictions, export_hf  # noqa: E402
from spacy_llm_components.models.checkpoint import DEFAULT_MODEL  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NER_TYPES = ["PER", "LOC", "ORG", "MISC"]
QUESTION = "Who is mentioned?"


def intents() -> List[str]:
    import json

    return sorted(json.loads((DATA / "banking77" / "categories.json").read_text()))


HEADS = {"ner": ("hf_ner", {"labels": NER_TYPES}),
         "sentiment": ("hf_textcat", {"labels": ["negative", "positive"]}),
         "intent": ("hf_textcat", {"labels": None}),
         "qa": ("hf_qa", {"questions": [QUESTION]})}


def shared(model: str, heads: List[str], device: str) -> spacy.language.Language:
    torch.manual_seed(0)
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_encoder", name="encoder", config={"model": model, "device": device})
    for head in heads:
        factory, config = HEADS[head]
        config = {**config, "encoder": "encoder"}
        if head == "intent":
            config["labels"] = intents()
        nlp.add_pipe(factory, name=head, config=config)
    nlp.initialize()
    return nlp


def alone(folder: Path, head: str, device: str) -> spacy.language.Language:
    factory, config = HEADS[head]
    nlp = spacy.blank("en")
    nlp.add_pipe(factory, name=head, config={"model": str(folder), "device": device,
                                              **({"questions": [QUESTION]} if head == "qa" else {})})
    nlp.initialize()
    return nlp


def predict(pipelines: List[spacy.language.Language], texts: List[str], batch_size: int = 1000) -> List[Dict]:
    """Every pipeline over all texts, one after the other; the predictions merged per text."""
    out = [dict() for _ in texts]
    for nlp in pipelines:
        for merged, doc in zip(out, nlp.pipe(texts, batch_size=batch_size)):
            merged.update(doc_predictions(doc, nlp))
    return out


def check_same(got: List[Dict], want: List[Dict]) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        assert set(a) == set(b), (i, set(a), set(b))
        for key in a:
            if key == "cats":
                assert a[key].keys() == b[key].keys() and all(abs(a[key][k] - b[key][k]) < 1e-4 for k in a[key]), i
            else:
                strip = lambda spans: [{k: v for k, v in s.items() if k != "score"} for s in spans]  # noqa: E731
                assert strip(a[key]) == strip(b[key]), (i, a[key], b[key])


def weights_mib(pipelines: List[spacy.language.Language]) -> float:
    seen, total = set(), 0
    for nlp in pipelines:
        for _, pipe in nlp.pipeline:
            modules = [pipe.encoder.model] if hasattr(pipe, "readers") else [pipe.checkpoint.model]
            for module in modules:
                for p in module.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel() * p.element_size()
    return total / 2 ** 20


def compare(name: str, heads: List[str], texts: List[str], args, tmp: Path) -> None:
    one = shared(args.model, heads, args.device)
    several = [alone(export_hf(one, head, tmp / head), head, args.device) for head in heads]
    for contender in ([one], several):  # the same warm-up for both
        predict(contender, texts[:args.warmup])
    t_shared, got = best_time(lambda: predict([one], texts), args.repeats)
    t_several, want = best_time(lambda: predict(several, texts), args.repeats)
    check_same(got, want)
    n = len(texts)
    print(f"| {name} | {n} | {n / t_several:.1f} | {n / t_shared:.1f} | **{t_several / t_shared:.2f}x** | "
          f"{weights_mib(several):.0f} | {weights_mib([one]):.0f} |", flush=True)


MEMORY_CONTENDERS = {"NER pipeline alone": ["ner"], "NER + textcat on one encoder": ["shared"],
                     "NER and textcat pipelines": ["ner", "sentiment"]}


def memory(texts: List[str], args, tmp: Path) -> None:
    """Peak resident memory of a fresh process per contender, each loading its folders and annotating the
    texts (after the same warm-up)."""
    import json
    import subprocess
    import sys

    one = shared(args.model, ["ner", "sentiment"], args.device)
    one.to_disk(tmp / "shared")
    for head in ("ner", "sentiment"):
        export_hf(one, head, tmp / head)
    print(f"nlp.pipe batch size {args.batch_size}")
    print("| process | peak RSS (MiB) | ratio to the NER pipeline alone |")
    print("| --- | ---: | ---: |")
    base = None
    for name, parts in MEMORY_CONTENDERS.items():
        out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(parts), "--memory-dir", str(tmp),
                              "--docs", str(args.docs), "--warmup", str(args.warmup), "--device", args.device,
                              "--batch-size", str(args.batch_size)],
                             check=True, capture_output=True, text=True).stdout
        peak = float(out.strip().splitlines()[-1])
        base = base or peak
        print(f"| {name} | {peak:.0f} | {peak / base:.3f} |", flush=True)


def memory_child(parts: List[str], folder: Path, texts: List[str], args) -> None:
    import resource

    pipelines = [spacy.load(folder / "shared") if part == "shared" else alone(folder / part, part, args.device)
                 for part in parts]
    predict(pipelines, texts[:args.warmup], args.batch_size)
    predict(pipelines, texts, args.batch_size)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def wait_for_quiet(max_wait: float) -> None:
    deadline = time.time() + max_wait * 60
    while os.getloadavg()[0] > 0.5 and time.time() < deadline:
        time.sleep(10)
    print(f"(1-minute load average at start: {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--qa", action="store_true", help="also ner + textcat + qa (QA runs its own pass)")
    parser.add_argument("--max-wait", type=float, default=5, help="minutes to wait for a quiet machine")
    parser.add_argument("--memory", action="store_true", help="peak resident memory, a fresh process per contender")
    parser.add_argument("--batch-size", type=int, default=1000, help="--memory: nlp.pipe's batch size")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    texts = conll_sentences(DATA / "conll2003" / "dev.conll", args.docs)
    assert len(texts) == args.docs, f"only {len(texts)} sentences"
    if args.memory_child:
        import json

        return memory_child(json.loads(args.memory_child), Path(args.memory_dir), texts, args)
    if args.memory:
        tmp = Path(tempfile.mkdtemp(prefix="bench-shared-memory-"))
        try:
            return memory(texts, args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    wait_for_quiet(args.max_wait)
    print(f"model {args.model}, {torch.get_num_threads()} threads, device {args.device}, torch {torch.__version__}")
    print("| heads | docs | separate pipelines (docs/s) | one encoder (docs/s) | speed-up | weights separate (MiB) "
          "| weights shared (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    try:
        compare("ner + textcat", ["ner", "sentiment"], texts, args, tmp)
        compare("ner + sentiment + intent", ["ner", "sentiment", "intent"], texts, args, tmp)
        if args.qa:
            compare("ner + textcat + qa", ["ner", "sentiment", "qa"], texts, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

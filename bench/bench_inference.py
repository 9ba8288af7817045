"""Inference speed, agreement and memory: hf_ner / hf_textcat against the peers, in one process.

Peers, on the same checkpoint and texts:
  * transformers.pipeline (token-classification, aggregation_strategy="first";
    text-classification), at its best batch size from --hf-batch-sizes;
  * spacy-huggingface-pipelines 0.0.4 (hf_token_pipe, hf_text_pipe) at that batch size.
Texts: the sentences of ../shared/data/conll2003/dev.conll joined to text, and
../shared/data/sst2/dev.tsv. The checkpoints are the offline MiniLM encoder with a
seeded random head (speed does not depend on the head's training), unless
--ner-model / --textcat-model name fine-tuned ones.

    .venv/bin/python bench/bench_inference.py                 # speed + agreement
    .venv/bin/python bench/bench_inference.py --memory 100000 # + RSS while piping 100k docs
"""

import argparse
import csv
import gc
import os
import time
import warnings
from pathlib import Path
from typing import Callable, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import spacy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer  # noqa: E402

import spacy_llm_components  # noqa: E402,F401
from spacy_llm_components.decode import tags_for_types  # noqa: E402
from spacy_llm_components.hf import resolve_source  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def conll_sentences(path: Path) -> List[str]:
    sentences, words = [], []
    for line in path.read_text(encoding="utf8").splitlines():
        if not line.strip():
            if words:
                sentences.append(" ".join(words))
            words = []
        elif not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
    if words:
        sentences.append(" ".join(words))
    return sentences


def sst2_sentences(path: Path) -> List[str]:
    with path.open(encoding="utf8", newline="") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t")]


def random_head_checkpoint(kind: str) -> Path:
    """MiniLM encoder + seeded random head, saved once under bench/out."""
    path = OUT / f"minilm-random-{kind}"
    if (path / "model.safetensors").exists():
        return path
    base = resolve_source(MINILM)
    torch.manual_seed(0)
    if kind == "ner":
        tags = tags_for_types(["PER", "LOC", "ORG", "MISC"])
        model = AutoModelForTokenClassification.from_pretrained(
            base, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def timed(fn: Callable[[], list]) -> tuple:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def report(name: str, seconds: float, n_docs: int, n_pieces: int, reference: float = None) -> float:
    ratio = f"  x{reference / seconds:5.2f} vs HF pipeline" if reference else ""
    print(f"  {name:<44} {n_docs / seconds:8.1f} docs/s {n_pieces / seconds:9.0f} pieces/s{ratio}")
    return seconds


def ner_bench(texts: List[str], model: Path, batch_sizes: List[int], ours_batch: int) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    n_pieces = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    print(f"\nNER: {len(texts)} CoNLL-2003 dev sentences, {n_pieces} word pieces, checkpoint {model.name}")

    hf_times = {}
    for bs in batch_sizes:
        pipe = transformers.pipeline("token-classification", model=str(model), aggregation_strategy="first",
                                     device=-1, batch_size=bs)
        hf_out, hf_times[bs] = timed(lambda: list(pipe(texts)))
        report(f"transformers.pipeline batch_size={bs}", hf_times[bs], len(texts), n_pieces)
    best_bs = min(hf_times, key=hf_times.get)
    pipe = transformers.pipeline("token-classification", model=str(model), aggregation_strategy="first",
                                 device=-1, batch_size=best_bs)
    hf_out = list(pipe(texts))
    hf_spans = [{(e["start"], e["end"], e["entity_group"]) for e in ents} for ents in hf_out]
    best = hf_times[best_bs]

    peer = spacy.blank("en")
    peer.add_pipe("hf_token_pipe", config={"model": str(model), "aggregation_strategy": "first",
                                           "kwargs": {"batch_size": best_bs}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer_docs, t = timed(lambda: list(peer.pipe(texts)))
    report(f"spacy-huggingface-pipelines batch_size={best_bs}", t, len(texts), n_pieces, best)
    peer_spans = [{(e.start_char, e.end_char, e.label_) for e in d.ents} for d in peer_docs]
    print(f"    entities dropped by the peer (unalignable or overlapping): "
          f"{sum(len(h) - len(p) for h, p in zip(hf_spans, peer_spans))}")

    for decoder, dtype in (("greedy", "float32"), ("viterbi", "float32"), ("greedy", "bfloat16")):
        nlp = spacy.blank("en")
        nlp.add_pipe("hf_ner", config={"model": str(model), "batch_size": ours_batch, "decoder": decoder,
                                       "dtype": dtype})
        nlp(texts[0])  # load
        docs, t = timed(lambda: list(nlp.pipe(texts)))
        report(f"hf_ner decoder={decoder} {dtype} batch_size={ours_batch}", t, len(texts), n_pieces, best)
        ours = [{(e.start_char, e.end_char, e.label_) for e in d.ents} for d in docs]
        same_docs = sum(a == b for a, b in zip(ours, hf_spans))
        inter = sum(len(a & b) for a, b in zip(ours, hf_spans))
        union = sum(len(a | b) for a, b in zip(ours, hf_spans))
        print(f"    agreement with HF pipeline: {same_docs}/{len(texts)} docs with identical entity char spans "
              f"({100 * same_docs / len(texts):.2f}%), entity overlap {inter}/{union} "
              f"({100 * inter / max(union, 1):.2f}%); snapped to spaCy tokens: {nlp.get_pipe('hf_ner').snapped}")
        snapped_hf = [{_snap(d, s, e, label) for s, e, label in h} for d, h in zip(docs, hf_spans)]
        same_snapped = sum(a == b for a, b in zip(ours, snapped_hf))
        print(f"    with HF's entities snapped to spaCy tokens too: {same_snapped}/{len(texts)} docs identical "
              f"({100 * same_snapped / len(texts):.2f}%)")


def _snap(doc, start: int, end: int, label: str) -> tuple:
    span = doc.char_span(start, end, label=label, alignment_mode="expand")
    return (span.start_char, span.end_char, label) if span is not None else (start, end, label)


def textcat_bench(texts: List[str], model: Path, batch_sizes: List[int], ours_batch: int) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    n_pieces = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    print(f"\nTextcat: {len(texts)} SST-2 dev sentences, {n_pieces} word pieces, checkpoint {model.name}")
    hf_times, hf_labels = {}, {}
    for bs in batch_sizes:
        pipe = transformers.pipeline("text-classification", model=str(model), device=-1, batch_size=bs)
        out, hf_times[bs] = timed(lambda: list(pipe(texts)))
        hf_labels[bs] = [o["label"] for o in out]
        report(f"transformers.pipeline batch_size={bs}", hf_times[bs], len(texts), n_pieces)
    best_bs = min(hf_times, key=hf_times.get)
    best = hf_times[best_bs]

    peer = spacy.blank("en")
    peer.add_pipe("hf_text_pipe", config={"model": str(model), "kwargs": {"batch_size": best_bs}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, t = timed(lambda: list(peer.pipe(texts)))
    report(f"spacy-huggingface-pipelines batch_size={best_bs}", t, len(texts), n_pieces, best)

    for dtype in ("float32", "bfloat16"):
        nlp = spacy.blank("en")
        nlp.add_pipe("hf_textcat", config={"model": str(model), "batch_size": ours_batch, "dtype": dtype})
        nlp(texts[0])
        docs, t = timed(lambda: list(nlp.pipe(texts)))
        report(f"hf_textcat {dtype} batch_size={ours_batch}", t, len(texts), n_pieces, best)
        ours = [max(d.cats, key=d.cats.get) for d in docs]
        same = sum(a == b for a, b in zip(ours, hf_labels[best_bs]))
        print(f"    agreement with HF pipeline: same argmax label for {same}/{len(texts)} docs "
              f"({100 * same / len(texts):.2f}%)")


def memory_bench(texts: List[str], model: Path, n_docs: int, batch: int) -> None:
    print(f"\nMemory: hf_ner over {n_docs} short docs (CoNLL dev sentences, cycled), resident set size")
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(model), "batch_size": batch})
    proc = psutil.Process()
    stream = (texts[i % len(texts)] for i in range(n_docs))
    step = max(n_docs // 10, 1)
    start = time.perf_counter()
    first = None
    for i, doc in enumerate(nlp.pipe(stream), 1):
        if i % step == 0 or i == 2000:
            rss = proc.memory_info().rss / 2**20
            first = first or rss
            print(f"  after {i:>7} docs: RSS {rss:7.1f} MiB ({rss - first:+6.1f} MiB vs after 2000 docs), "
                  f"{i / (time.perf_counter() - start):6.1f} docs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ner-model", type=Path, default=None)
    parser.add_argument("--textcat-model", type=Path, default=None)
    parser.add_argument("--hf-batch-sizes", default="1,8,32,64")
    parser.add_argument("--batch-size", type=int, default=64, help="hf_ner / hf_textcat batch_size")
    parser.add_argument("--limit", type=int, default=None, help="first N texts only (quick check)")
    parser.add_argument("--memory", type=int, default=0, help="also pipe this many docs and print RSS")
    parser.add_argument("--skip", choices=["ner", "textcat"], action="append", default=[])
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA} (see ../shared/data/SOURCES.md)")
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, spaCy {spacy.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    conll = conll_sentences(DATA / "conll2003" / "dev.conll")[: args.limit]
    ner_model = args.ner_model or random_head_checkpoint("ner")
    if "ner" not in args.skip:
        ner_bench(conll, ner_model, batch_sizes, args.batch_size)
    if "textcat" not in args.skip:
        sst2 = sst2_sentences(DATA / "sst2" / "dev.tsv")[: args.limit]
        textcat_bench(sst2, args.textcat_model or random_head_checkpoint("textcat"), batch_sizes, args.batch_size)
    if args.memory:
        memory_bench(conll, ner_model, args.memory, args.batch_size)


if __name__ == "__main__":
    main()

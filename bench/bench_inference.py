"""Inference speed, agreement and memory: hf_ner / hf_textcat against the peers, in one process.

Modes:
  peers     (default) on the same checkpoint, texts and precision:
            * transformers.pipeline (token-classification, aggregation_strategy="first";
              text-classification) at its best batch size from --hf-batch-sizes, each size timed
              --repeats times (best run kept);
            * spacy-huggingface-pipelines 0.0.4 (hf_token_pipe, hf_text_pipe) at that batch size;
            * hf_ner (greedy and viterbi decoders) and hf_textcat.
            Texts: CoNLL-2003 dev sentences and SST-2 dev (../shared/data). Checkpoints: the offline
            MiniLM with a seeded random head, unless --ner-model / --textcat-model name fine-tuned ones.
  overhead  the CPU proxy of a GPU: a one-layer, 32-wide BERT over the MiniLM vocabulary (the forward
            pass costs little), on --overhead-docs CoNLL-2003 train sentences, against the two
            tokenizers any such pipeline must run: spaCy's, then the HF fast tokenizer with offsets,
            timed one after the other. Reports each component's rate as a share of theirs, the time
            inside the model's forward pass, and the share without it (what overlaps on a GPU).
  nprocess  nlp.pipe(n_process=1 and 2) for hf_ner (MiniLM) on CoNLL-2003 dev.
Every contender is warmed up the same way (one pass over --warmup texts) and timed --repeats times;
the best run counts. --device cuda:0 runs every contender on the GPU.

    .venv/bin/python bench/bench_inference.py                    # peers, float32 and bfloat16
    .venv/bin/python bench/bench_inference.py --mode overhead
    .venv/bin/python bench/bench_inference.py --memory 100000    # + RSS while piping 100k docs
"""

import argparse
import csv
import gc
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the same single-threaded tokenizer for every contender

import psutil  # noqa: E402
import spacy  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
)

import spacy_llm_components  # noqa: E402,F401
from spacy_llm_components.core.decode import tags_for_types  # noqa: E402
from spacy_llm_components.models.checkpoint import DEFAULT_MODEL, resolve_source  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out"
NER_TYPES = ["PER", "LOC", "ORG", "MISC"]
TEXTCAT_LABELS = {0: "negative", 1: "positive"}


def conll_sentences(path: Path, limit: Optional[int] = None) -> List[str]:
    sentences, words = [], []
    for line in path.read_text(encoding="utf8").splitlines():
        if not line.strip():
            if words:
                sentences.append(" ".join(words))
                if limit and len(sentences) >= limit:
                    return sentences
            words = []
        elif not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])
    if words:
        sentences.append(" ".join(words))
    return sentences[:limit]


def sst2_sentences(path: Path) -> List[str]:
    with path.open(encoding="utf8", newline="") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t")]


def checkpoint(kind: str, size: str) -> Path:
    """A seeded random head over the MiniLM encoder (size "minilm") or over a one-layer, 32-wide BERT with
    the MiniLM vocabulary (size "tiny"), saved once under bench/out."""
    path = OUT / f"{size}-random-{kind}"
    if (path / "model.safetensors").exists():
        return path
    base = resolve_source(DEFAULT_MODEL)
    torch.manual_seed(0)
    tags = tags_for_types(NER_TYPES)
    labels = dict(enumerate(tags)) if kind == "ner" else TEXTCAT_LABELS
    head = dict(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    if size == "minilm":
        auto = AutoModelForTokenClassification if kind == "ner" else AutoModelForSequenceClassification
        model = auto.from_pretrained(base, **head)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, **head)
        model = (BertForTokenClassification if kind == "ner" else BertForSequenceClassification)(config)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def best_time(run: Callable[[], object], repeats: int) -> tuple:
    """(best seconds, result of the last run) over `repeats` timed runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def line(name: str, seconds: float, n_docs: int, n_pieces: int, reference: Optional[float] = None) -> None:
    ratio = f"  x{reference / seconds:5.2f} vs HF pipeline" if reference else ""
    print(f"  {name:<52} {n_docs / seconds:9.1f} docs/s {n_pieces / seconds:10.0f} pieces/s{ratio}", flush=True)


def ours(factory: str, model: Path, device: str, dtype: str, **config) -> spacy.language.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe(factory, config={"model": str(model), "device": device, "dtype": dtype, **config})
    return nlp


def peer_pipeline(factory: str, device: str, config: Dict) -> spacy.language.Language:
    """spacy-huggingface-pipelines takes its device from thinc's default (spacy.require_gpu)."""
    if device.startswith("cuda"):
        spacy.require_gpu(int(device.split(":")[1]) if ":" in device else 0)
    try:
        nlp = spacy.blank("en")
        nlp.add_pipe(factory, config=config)
    finally:
        spacy.require_cpu()
    return nlp


def hf_pipeline(task: str, model: Path, device: str, dtype: str, batch_size: int):
    kwargs = {"aggregation_strategy": "first"} if task == "token-classification" else {}
    return transformers.pipeline(task, model=str(model), device=torch.device(device), batch_size=batch_size,
                                 torch_dtype=getattr(torch, dtype), **kwargs)


def hf_best(task: str, texts: List[str], model: Path, device: str, dtype: str, batch_sizes: List[int], args,
            n_pieces: int) -> tuple:
    """The HF pipeline at each batch size (warmed up, best of --repeats runs): (best batch size, its
    seconds, its outputs)."""
    times, outputs = {}, {}
    for bs in batch_sizes:
        pipe = hf_pipeline(task, model, device, dtype, bs)
        list(pipe(texts[:args.warmup]))
        times[bs], outputs[bs] = best_time(lambda: list(pipe(texts)), args.repeats)
        line(f"transformers.pipeline {dtype} batch_size={bs}", times[bs], len(texts), n_pieces)
    best = min(times, key=times.get)
    return best, times[best], outputs[best]


def ner_peers(texts: List[str], model: Path, args, dtype: str) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    n_pieces = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    print(f"\nNER ({dtype}): {len(texts)} CoNLL-2003 dev sentences, {n_pieces} word pieces, {model.name}, {args.device}")
    best_bs, best, hf_out = hf_best("token-classification", texts, model, args.device, dtype, args.hf_batch_sizes,
                                    args, n_pieces)
    hf_spans = [{(e["start"], e["end"], e["entity_group"]) for e in ents} for ents in hf_out]
    peer = peer_pipeline("hf_token_pipe", args.device, {"model": str(model), "aggregation_strategy": "first",
                                                        "kwargs": {"batch_size": best_bs, "torch_dtype": dtype}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(peer.pipe(texts[:args.warmup]))
        t, peer_docs = best_time(lambda: list(peer.pipe(texts)), args.repeats)
    line(f"spacy-huggingface-pipelines batch_size={best_bs}", t, len(texts), n_pieces, best)
    peer_spans = [{(e.start_char, e.end_char, e.label_) for e in d.ents} for d in peer_docs]
    print(f"    entities the peer dropped (unalignable or overlapping): "
          f"{sum(len(h) - len(p) for h, p in zip(hf_spans, peer_spans))}")
    for decoder in ("greedy", "viterbi"):
        nlp = ours("hf_ner", model, args.device, dtype, batch_size=args.batch_size, decoder=decoder)
        list(nlp.pipe(texts[:args.warmup]))
        t, docs = best_time(lambda: list(nlp.pipe(texts)), args.repeats)
        line(f"hf_ner decoder={decoder} batch_size={args.batch_size}", t, len(texts), n_pieces, best)
        mine = [{(e.start_char, e.end_char, e.label_) for e in d.ents} for d in docs]
        same = sum(a == b for a, b in zip(mine, hf_spans))
        inter = sum(len(a & b) for a, b in zip(mine, hf_spans))
        union = sum(len(a | b) for a, b in zip(mine, hf_spans))
        snapped_hf = [{_snap(d, s, e, label) for s, e, label in h} for d, h in zip(docs, hf_spans)]
        same_snapped = sum(a == b for a, b in zip(mine, snapped_hf))
        print(f"    agreement with the HF pipeline: {same}/{len(texts)} docs with identical entity char spans "
              f"({100 * same / len(texts):.2f}%), {same_snapped} ({100 * same_snapped / len(texts):.2f}%) with HF's "
              f"entities snapped to spaCy tokens too; entity overlap {inter}/{union} ({100 * inter / max(union, 1):.2f}%)")


def _snap(doc, start: int, end: int, label: str) -> tuple:
    span = doc.char_span(start, end, label=label, alignment_mode="expand")
    return (span.start_char, span.end_char, label) if span is not None else (start, end, label)


def textcat_peers(texts: List[str], model: Path, args, dtype: str) -> None:
    tok = AutoTokenizer.from_pretrained(model)
    n_pieces = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
    print(f"\nTextcat ({dtype}): {len(texts)} SST-2 dev sentences, {n_pieces} word pieces, {model.name}, {args.device}")
    best_bs, best, hf_out = hf_best("text-classification", texts, model, args.device, dtype, args.hf_batch_sizes,
                                    args, n_pieces)
    hf_labels = [o["label"] for o in hf_out]
    peer = peer_pipeline("hf_text_pipe", args.device, {"model": str(model),
                                                       "kwargs": {"batch_size": best_bs, "torch_dtype": dtype}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(peer.pipe(texts[:args.warmup]))
        t, _ = best_time(lambda: list(peer.pipe(texts)), args.repeats)
    line(f"spacy-huggingface-pipelines batch_size={best_bs}", t, len(texts), n_pieces, best)
    nlp = ours("hf_textcat", model, args.device, dtype, batch_size=args.batch_size)
    list(nlp.pipe(texts[:args.warmup]))
    t, docs = best_time(lambda: list(nlp.pipe(texts)), args.repeats)
    line(f"hf_textcat batch_size={args.batch_size}", t, len(texts), n_pieces, best)
    same = sum(max(d.cats, key=d.cats.get) == label for d, label in zip(docs, hf_labels))
    print(f"    agreement with the HF pipeline: same argmax label for {same}/{len(texts)} docs "
          f"({100 * same / len(texts):.2f}%)")


def overhead(args) -> None:
    texts = conll_sentences(DATA / "conll2003" / "train.conll", args.overhead_docs)
    blank = spacy.blank("en")
    tok = AutoTokenizer.from_pretrained(checkpoint("ner", "tiny"))

    def spacy_tokenizer():
        return list(blank.tokenizer.pipe(texts, batch_size=1000))

    def hf_tokenizer():
        for i in range(0, len(texts), 1000):
            tok(texts[i:i + 1000], add_special_tokens=False, return_offsets_mapping=True)

    spacy_tokenizer(), hf_tokenizer()
    t_spacy, _ = best_time(spacy_tokenizer, args.repeats)
    t_hf, _ = best_time(hf_tokenizer, args.repeats)
    both = len(texts) / (t_spacy + t_hf)
    print(f"\nOverhead: {len(texts)} CoNLL-2003 train sentences, one-layer 32-wide BERT, {args.device}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  spaCy tokenizer {len(texts) / t_spacy:,.0f} docs/s; HF fast tokenizer with offsets "
          f"{len(texts) / t_hf:,.0f} docs/s; the two one after the other {both:,.0f} docs/s")
    contenders = [("hf_ner greedy", "hf_ner", "ner", {"decoder": "greedy"}),
                  ("hf_ner viterbi", "hf_ner", "ner", {"decoder": "viterbi"}),
                  ("hf_textcat", "hf_textcat", "textcat", {})]
    for dtype in args.dtypes:
        for name, factory, kind, config in contenders:
            nlp = ours(factory, checkpoint(kind, "tiny"), args.device, dtype, **config)
            list(nlp.pipe(texts[:args.warmup]))
            forward = ForwardClock(nlp.get_pipe(factory)._model)
            runs = []
            for _ in range(args.repeats):
                gc.collect()
                forward.seconds, start = 0.0, time.perf_counter()
                list(nlp.pipe(texts))
                runs.append((time.perf_counter() - start, forward.seconds))
            t, in_model = min(runs)
            print(f"  {name + ' ' + dtype:<28} {len(texts) / t:9,.0f} docs/s = {len(texts) / t / both:.2f} of the "
                  f"two tokenizers' rate; the model's forward pass {1e6 * in_model / len(texts):.1f} us/doc, "
                  f"{len(texts) / (t - in_model) / both:.2f} without it", flush=True)
            forward.remove()


class ForwardClock:
    """Adds up the seconds spent inside the model's forward pass (on CUDA, the host-side launch time)."""

    def __init__(self, model) -> None:
        self.seconds, self._start = 0.0, 0.0
        self.hooks = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave)]

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def n_process(args) -> None:
    texts = conll_sentences(DATA / "conll2003" / "dev.conll")[:args.limit]
    nlp = ours("hf_ner", args.ner_model or checkpoint("ner", "minilm"), "cpu", "float32")
    list(nlp.pipe(texts[:args.warmup]))
    print(f"\nnlp.pipe(n_process=N): hf_ner (MiniLM) on {len(texts)} CoNLL-2003 dev sentences, CPU")
    for n in (1, 2):
        t, _ = best_time(lambda: list(nlp.pipe(texts, n_process=n, batch_size=256)), args.repeats)
        print(f"  n_process={n}: {len(texts) / t:8.1f} docs/s", flush=True)


def memory(texts: List[str], model: Path, n_docs: int, args) -> None:
    print(f"\nMemory: hf_ner over {n_docs} short docs (CoNLL dev sentences, cycled), resident set size")
    nlp = ours("hf_ner", model, args.device, "float32", batch_size=args.batch_size)
    proc = psutil.Process()
    stream = (texts[i % len(texts)] for i in range(n_docs))
    marks = sorted({min(2000, n_docs), *range(max(n_docs // 10, 1), n_docs + 1, max(n_docs // 10, 1))})
    start, first = time.perf_counter(), None
    for i, _ in enumerate(nlp.pipe(stream), 1):
        if i in marks:
            rss = proc.memory_info().rss / 2**20
            first = first if first is not None else rss
            print(f"  after {i:>7} docs: RSS {rss:7.1f} MiB ({rss - first:+6.1f} MiB vs after {marks[0]} docs), "
                  f"{i / (time.perf_counter() - start):6.1f} docs/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["peers", "overhead", "nprocess"], default="peers")
    parser.add_argument("--ner-model", type=Path, default=None)
    parser.add_argument("--textcat-model", type=Path, default=None)
    parser.add_argument("--hf-batch-sizes", default="1,8,32,64", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--batch-size", type=int, default=64, help="hf_ner / hf_textcat batch_size")
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (every contender runs there)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender (the best counts)")
    parser.add_argument("--warmup", type=int, default=200, help="texts of the untimed warm-up pass")
    parser.add_argument("--limit", type=int, default=None, help="first N texts only (quick check)")
    parser.add_argument("--overhead-docs", type=int, default=10_000)
    parser.add_argument("--memory", type=int, default=0, help="also pipe this many docs and print RSS")
    parser.add_argument("--skip", choices=["ner", "textcat"], action="append", default=[])
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA} (see ../shared/data/SOURCES.md)")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, spaCy {spacy.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {args.device}")
    if args.mode == "overhead":
        return overhead(args)
    if args.mode == "nprocess":
        return n_process(args)
    conll = conll_sentences(DATA / "conll2003" / "dev.conll")[:args.limit]
    ner_model = args.ner_model or checkpoint("ner", "minilm")
    for dtype in args.dtypes:
        if "ner" not in args.skip:
            ner_peers(conll, ner_model, args, dtype)
        if "textcat" not in args.skip:
            textcat_peers(sst2_sentences(DATA / "sst2" / "dev.tsv")[:args.limit],
                          args.textcat_model or checkpoint("textcat", "minilm"), args, dtype)
    if args.memory:
        memory(conll, ner_model, args.memory, args)


if __name__ == "__main__":
    main()

"""int8 runtimes for MiniLM on this CPU: PyTorch dynamic quantization (what `quantize = "int8"` runs)
against ONNX Runtime (fp32 and dynamic int8) and torchao's int8 dynamic quantization, forward pass only.

The same CoNLL-2003 dev sentences for every contender, tokenized once, in length-sorted batches padded to
their longest row (as the components batch them). Each contender is warmed up, then timed --repeats
times (the best run counts); agreement is the share of word pieces whose argmax tag equals PyTorch
fp32's. Optional packages: `pip install onnxruntime onnx torchao`.

    .venv/bin/python bench/bench_runtimes.py                          # MiniLM with a seeded random NER head
    .venv/bin/python bench/bench_runtimes.py --model bench/out/compress/conll2003/teacher/ner/model
"""

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_compress import load1, wait_for_quiet  # noqa: E402
from bench_inference import DATA, conll_sentences  # noqa: E402
from transformers import AutoModelForTokenClassification, AutoTokenizer  # noqa: E402

from spacy_llm_components.models.checkpoint import DEFAULT_MODEL, resolve_source  # noqa: E402
from spacy_llm_components.models.runtimes import inference_model  # noqa: E402

warnings.filterwarnings("ignore")


def batches(tokenizer, texts: List[str], batch_size: int) -> List[Dict[str, np.ndarray]]:
    encoded = tokenizer(texts)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = []
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start:start + batch_size]]
        width = max(map(len, rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


def torch_runner(model) -> Callable:
    def run(batch):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()
    return run


def onnx_runners(model, folder: Path, threads: int) -> Dict[str, Callable]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, int8_path = folder / "model.onnx", folder / "model-int8.onnx"
    dummy = {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long),
             "token_type_ids": torch.zeros(2, 16, dtype=torch.long)}
    axes = {name: {0: "batch", 1: "sequence"} for name in (*dummy, "logits")}
    torch.onnx.export(model, (), str(fp32_path), kwargs=dummy, input_names=list(dummy), output_names=["logits"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    runners = {}
    for name, path in (("onnxruntime fp32", fp32_path), ("onnxruntime int8 (dynamic)", int8_path)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runners[name] = (lambda s: (lambda batch: s.run(["logits"], batch)[0]))(session)
    return runners


def torchao_runner(model) -> Callable:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return torch_runner(quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="token-classification checkpoint (default: MiniLM, seeded random head)")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quiet-load", type=float, default=0.5)
    parser.add_argument("--max-wait", type=float, default=60)
    args = parser.parse_args()
    if args.model:
        model = AutoModelForTokenClassification.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        base = resolve_source(DEFAULT_MODEL)
        model = AutoModelForTokenClassification.from_pretrained(base, num_labels=9).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
    texts = conll_sentences(DATA / "conll2003" / "dev.conll", args.sentences)
    data = batches(tokenizer, texts, args.batch_size)
    pieces = int(sum(b["attention_mask"].sum() for b in data))
    contenders: Dict[str, Callable] = {
        "pytorch fp32": torch_runner(model),
        "pytorch int8 (quantize_dynamic, ours)": torch_runner(inference_model(
            model, quantize="int8", runtime="torch", input_names=("input_ids", "attention_mask"), output_names=("logits",)))}
    tmp = Path(tempfile.mkdtemp(prefix="sllm-onnx-"))
    try:
        contenders.update(onnx_runners(model, tmp, torch.get_num_threads()))
    except ImportError as err:
        print(f"onnxruntime not measured: {err}")
    try:
        contenders["torchao int8 dynamic (eager)"] = torchao_runner(model)
    except Exception as err:  # noqa: BLE001  (an optional package: report why it is missing)
        print(f"torchao not measured: {type(err).__name__}: {err}")
    load = wait_for_quiet(args.quiet_load, args.max_wait)
    print(f"{len(texts)} sentences, {pieces:,} word pieces, batch {args.batch_size}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load:.2f} before timing", flush=True)
    reference = [contenders["pytorch fp32"](b) for b in data]
    results = {}
    for name, run in contenders.items():
        run(data[-1])  # warm-up on the longest batch
        outputs, best = None, float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = [run(b) for b in data]
            best = min(best, time.perf_counter() - start)
        agree = np.mean(np.concatenate([(o.argmax(-1) == r.argmax(-1))[b["attention_mask"] == 1]
                                        for o, r, b in zip(outputs, reference, data)]))
        results[name] = best
        print(f"{name}: {best:.2f} s, {pieces / best:,.0f} word pieces/s, argmax agreement with fp32 "
              f"{100 * agree:.2f}% (load {load1():.2f})", flush=True)
    ours = results["pytorch int8 (quantize_dynamic, ours)"]
    print("\n| runtime | word pieces/s | x pytorch fp32 | x pytorch int8 |\n| --- | --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| {name} | {pieces / seconds:,.0f} | {results['pytorch fp32'] / seconds:.2f} | {ours / seconds:.2f} |")


if __name__ == "__main__":
    main()

"""Training throughput: `finetune` against a plain Hugging Face `Trainer` script on the same data and model.

Same CoNLL-2003 training sentences, same MiniLM base, same batch size, learning
rate and number of optimizer steps. The plain script is what the HF token
classification example does (tokenize pre-split words, label first pieces,
DataCollatorForTokenClassification, random batches), run once as is and once
with `group_by_length=True`. Throughput counts real (non-padding) word pieces
per second of training; our figure excludes the dev evaluations and checkpoint
saving (the plain script saves nothing). `--repeats N` runs the plain+grouped
and sllm pair N times, alternating, and reports each run and the median ratio.

    .venv/bin/python bench/bench_training.py --steps 150 --repeats 3
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "conll2003"
sys.path.insert(0, str(ROOT))

from transformers import DataCollatorForTokenClassification  # noqa: E402

from spacy_llm_components.models.checkpoint import DEFAULT_MODEL, resolve_source  # noqa: E402
from spacy_llm_components.models.collate import FeatureCollator  # noqa: E402
from spacy_llm_components.models.devices import precision_for, resolve_device  # noqa: E402
from spacy_llm_components.stages.finetune import finetune  # noqa: E402
from spacy_llm_components.stages.prepare import prepare  # noqa: E402
from spacy_llm_components.stages.shared.training import FinetuneConfig

BASE = DEFAULT_MODEL
DEVICE = resolve_device("auto")
PRECISION = precision_for(DEVICE)  # what `sllm finetune` picks on this device: the plain script gets the same


def read_conll(path: Path):
    sentences, words, tags = [], [], []
    for line in path.read_text().splitlines() + [""]:
        if not line.strip():
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        cols = line.split()
        words.append(cols[0])
        tags.append(cols[-1])
    return sentences


def plain_trainer(steps: int, batch: int, lr: float, group_by_length: bool) -> dict:
    """The HF example recipe, written out as a user would."""
    sentences = read_conll(DATA / "train.conll")
    tag_list = sorted({t for _, tags in sentences for t in tags}, key=lambda t: (t != "O", t))
    tag_id = {t: i for i, t in enumerate(tag_list)}
    source = resolve_source(BASE)
    tokenizer = AutoTokenizer.from_pretrained(source)
    set_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(
        source, num_labels=len(tag_list), id2label=dict(enumerate(tag_list)), label2id=tag_id)
    features = []
    for words, tags in sentences:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=512)
        labels, previous = [], None
        for wid in enc.word_ids():
            labels.append(-100 if wid is None or wid == previous else tag_id[tags[wid]])
            previous = wid
        features.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"], "labels": labels})
    collator = FeatureCollator(DataCollatorForTokenClassification(tokenizer), tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                                 warmup_ratio=0.1, weight_decay=0.01, save_strategy="no", eval_strategy="no",
                                 logging_steps=50, report_to="none", use_cpu=DEVICE.type == "cpu",
                                 bf16=PRECISION == "bf16", fp16=PRECISION == "fp16",
                                 group_by_length=group_by_length, seed=0, data_seed=0, disable_tqdm=True)
        trainer = PiecesCounted(model=model, args=args, train_dataset=features, data_collator=collator)
        out = trainer.train()
    seconds = out.metrics["train_runtime"]
    return {"seconds": seconds, "word_pieces": trainer.pieces, "word_pieces_per_second": trainer.pieces / seconds}


class PiecesCounted(Trainer):
    """The plain Trainer, counting the real (unpadded) word pieces it trains on, as sllm finetune does."""

    pieces = 0

    def training_step(self, model, inputs, *args, **kwargs):
        self.pieces += int(inputs["attention_mask"].sum())
        return super().training_step(model, inputs, *args, **kwargs)


def ours(steps: int, batch: int, lr: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare("ner", DATA / "train.conll", Path(tmp) / "data", dev=DATA / "dev.conll")
        # one evaluation at the end (a dev slice keeps it short; its time is excluded anyway)
        config = FinetuneConfig(max_steps=steps, batch_size=batch, lr=lr, eval_steps=steps, device="auto")
        result = finetune("ner", data.train, data.dev, Path(tmp) / "model", config, progress=False)
    t = result.training
    return {"seconds": t["train_seconds"], "word_pieces": t["word_pieces"],
            "word_pieces_per_second": t["word_pieces_per_second"], "precision": t["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = {"plain Trainer (HF example recipe)": plain_trainer(args.steps, args.batch_size, args.lr, False)}
    pair_ratios = []
    for i in range(args.repeats):
        grouped = plain_trainer(args.steps, args.batch_size, args.lr, True)
        mine = ours(args.steps, args.batch_size, args.lr)
        rows[f"plain Trainer + group_by_length (run {i + 1})"] = grouped
        rows[f"sllm finetune (run {i + 1})"] = mine
        pair_ratios.append(mine["word_pieces_per_second"] / grouped["word_pieces_per_second"])
    base = rows["plain Trainer (HF example recipe)"]["word_pieces_per_second"]
    print(f"\n{args.steps} steps x batch {args.batch_size}, CoNLL-2003 train, MiniLM, {DEVICE}, {PRECISION} on both "
          f"sides, torch threads {torch.get_num_threads()}")
    print("| run | train seconds | real word pieces | word pieces/s | ratio vs plain |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['word_pieces']:,} | {r['word_pieces_per_second']:,.0f} | "
              f"{r['word_pieces_per_second'] / base:.2f}x |")
    pair_ratios.sort()
    print(f"sllm finetune / plain Trainer + group_by_length, per run: {', '.join(f'{r:.2f}' for r in pair_ratios)}; "
          f"median {pair_ratios[len(pair_ratios) // 2]:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

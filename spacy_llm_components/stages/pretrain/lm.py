"""Masked language modelling, shared by pre-training and `sllm evaluate-lm`.

Corpus files -> documents (`data.corpus`) -> Hugging Face `datasets` backed by memory-mapped Arrow
files in a folder removed afterwards (a corpus larger than memory streams through) -> word pieces, packed
into blocks as `run_mlm.py`'s `group_texts` does, keeping the remainder -> masked by Hugging Face's
`DataCollatorForLanguageModeling` (or `DataCollatorForWholeWordMask`), each block under a seed of its
own -> perplexity, exp(mean cross-entropy over the masked pieces).

A block's masking depends only on the seed and the block's key, never on the batch, the process or
the global random state: held-out text is masked once and scored on the same positions before and
after training, and a resumed run masks as the uninterrupted run did.
"""

import copy
import hashlib
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from transformers import DataCollatorForLanguageModeling, DataCollatorForWholeWordMask

from ...core.settings import check_settings as check_config
from ...core.settings import setting
from ...data import DataError
from ...models.masked_lm import MaskedLM, load_masked_lm
from ..shared.trainer import TrainingError
from .corpus import TEXT_UNITS, corpus_texts

PathLike = Union[str, Path]
MIN_BLOCK = 8  # word pieces; shorter blocks would be mostly special tokens


@dataclass
class LMDataConfig:
    """How text becomes masked blocks; each is also an option of `sllm pretrain` and `sllm evaluate-lm`."""

    max_length: int = setting(256, "block length in word pieces: documents are packed into blocks, and one longer "
                                   "than a block is split, never truncated (capped by the model)", ge=MIN_BLOCK)
    mlm_probability: float = setting(0.15, "share of word pieces masked", gt=0, lt=1)
    whole_word_mask: bool = setting(False, "mask all pieces of a word together (WordPiece tokenizers such as BERT's)")
    text_unit: str = setting("line", "plain-text files: one document per 'line', or per 'paragraph' (blank-line "
                                     "separated)", choices=TEXT_UNITS)
    text_column: str = setting("text", "JSONL field or CSV/TSV column holding the text")
    seed: int = setting(0, "random seed of the masking", ge=0)
    eval_batch_size: int = setting(32, "blocks per forward pass when scoring perplexity", ge=1)
    device: str = setting("auto", "auto, cpu or cuda:N")


def check_settings(config: LMDataConfig) -> None:
    """Every setting in its range (`sllm pretrain`'s and `evaluate-lm`'s options have checked them already)."""
    check_config(config, error=TrainingError)


def block_length(lm: MaskedLM, config: LMDataConfig) -> int:
    """`max_length`, capped by the longest input the model takes."""
    return min(config.max_length, lm.max_length)


# -- corpus -> blocks -------------------------------------------------------------------------------------------
@contextmanager
def corpus_cache(beside: Optional[PathLike] = None) -> Iterator[Path]:
    """A folder for a corpus' Arrow files, removed afterwards: `.NAME.corpus-RANK` beside the output
    folder `beside` (its file system is the one meant for big files; one left by a killed run is cleared
    when the next starts), or a temporary folder of the system."""
    if beside is None:
        folder = Path(tempfile.mkdtemp(prefix="sllm-corpus-"))
    else:
        parent = Path(beside).resolve().parent
        while not parent.exists():
            parent = parent.parent
        folder = parent / f".{Path(beside).name}.corpus-{os.environ.get('RANK', '0')}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _documents(paths: List[str], text_unit: str, text_column: str) -> Iterator[Dict[str, str]]:
    for path in paths:
        for text in corpus_texts(Path(path), text_unit=text_unit, text_column=text_column):
            yield {"text": text}


def read_documents(paths: Sequence[PathLike], config: LMDataConfig, cache: Path):
    """The documents of the corpus files, in order, as a `datasets.Dataset` of {"text"} written to
    Arrow files in `cache` (streamed: the corpus is never held in memory)."""
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    for path in paths:  # before anything is read
        if not Path(path).is_file():
            raise DataError(path, None, "file does not exist" if not Path(path).exists() else "not a file")
    try:
        return Dataset.from_generator(
            _documents, features=Features({"text": Value("string")}), cache_dir=str(cache),
            gen_kwargs={"paths": [str(Path(p).resolve()) for p in paths], "text_unit": config.text_unit,
                        "text_column": config.text_column})
    except DatasetGenerationError as err:  # the reader's own error names the file and line
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def pack_blocks(batch: Dict[str, List[List[int]]], block_length: int) -> Dict[str, List[List[int]]]:
    """`run_mlm.py`'s `group_texts`: the documents' pieces (each with the tokenizer's special tokens)
    concatenated and cut into blocks of `block_length`. Unlike it, the remainder is kept as a last,
    shorter block: no piece is lost."""
    joined = {key: list(chain.from_iterable(values)) for key, values in batch.items()}
    total = len(next(iter(joined.values()), []))
    return {key: [seq[i:i + block_length] for i in range(0, total, block_length)] for key, seq in joined.items()}


def _tokenize(batch: Dict[str, List[str]], tokenizer) -> Dict[str, List[List[int]]]:
    # no truncation (a long document is split by pack_blocks), and no warning about the model's limit
    encoded = tokenizer(batch["text"], return_attention_mask=False, return_token_type_ids=False, verbose=False)
    return {"input_ids": encoded["input_ids"]}


def to_blocks(documents, tokenizer, length: int):
    """Tokenized and packed documents: a Dataset of {"input_ids"} blocks, in Arrow files beside the
    documents'."""
    fingerprint = hashlib.sha256(f"{documents._fingerprint}|{tokenizer.name_or_path}|{length}".encode()).hexdigest()
    pieces = documents.map(_tokenize, batched=True, fn_kwargs={"tokenizer": tokenizer},
                           remove_columns=documents.column_names, new_fingerprint=f"{fingerprint[:16]}-pieces",
                           desc="tokenizing")
    return pieces.map(pack_blocks, batched=True, fn_kwargs={"block_length": length},
                      new_fingerprint=f"{fingerprint[:16]}-blocks", desc="packing")


def count_pieces(blocks) -> int:
    """Word pieces in a Dataset of blocks, counted in Arrow (not loaded into Python lists)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(blocks.data.column("input_ids"))).as_py() or 0)


@contextmanager
def datasets_progress(show: bool) -> Iterator[None]:
    """`datasets`' progress bars on or off for the block (and as they were after it)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if show else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


# -- masking ----------------------------------------------------------------------------------------------------
def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (a run's seed, a purpose, a block's key)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """torch's CPU generator and Python's `random` seeded for the block, and restored after it (CUDA's
    generators are not touched)."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class BlockMasking:
    """A collator: masks each block with Hugging Face's MLM collator under a seed made from `seed` and
    the block's `key` (80% [MASK], 10% a random piece, 10% unchanged), then pads them into one batch."""

    def __init__(self, lm: MaskedLM, config: LMDataConfig, seed: int) -> None:
        make = DataCollatorForWholeWordMask if config.whole_word_mask else DataCollatorForLanguageModeling
        self.collator = make(_with_fixed_length(lm.tokenizer), mlm=True, mlm_probability=config.mlm_probability,
                             return_tensors="pt")
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.seed = seed

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = []
        for feature in features:
            with seeded_rng(derived_seed(self.seed, feature["key"])):
                row = self.collator([{"input_ids": feature["input_ids"]}])
            row.setdefault("attention_mask", torch.ones_like(row["input_ids"]))  # (the whole-word collator has none)
            rows.append({k: row[k] for k in ("input_ids", "attention_mask", "labels")})
        return pad_rows(rows, self.pad_id)


def _with_fixed_length(tokenizer):
    """A shallow copy of the tokenizer whose len() is counted once: the collator asks for it (the range of
    random replacement pieces) on every call, and a fast tokenizer counts its vocabulary anew each time
    (~10 ms for BERT's, more than masking a block takes)."""
    size = len(tokenizer)
    sized = copy.copy(tokenizer)
    sized.__class__ = type(type(tokenizer).__name__, (type(tokenizer),), {"__len__": lambda self: size})
    return sized


def pad_rows(rows: List[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, torch.Tensor]:
    """One batch of [1, length] rows: input ids padded with `pad_id`, labels with -100, the rest with 0."""
    length = max(row["input_ids"].shape[1] for row in rows)
    fill = {"input_ids": pad_id, "labels": -100}
    return {key: torch.cat([F.pad(row[key], (0, length - row[key].shape[1]), value=fill.get(key, 0)) for row in rows])
            for key in rows[0]}


def check_whole_word_tokenizer(lm: MaskedLM) -> None:
    """Whole-word masking finds words by WordPiece's `##` continuation pieces."""
    model_type = lm.tokenizer.backend_tokenizer.model.__class__.__name__
    if model_type != "WordPiece":
        raise TrainingError(f"{lm.source}: --whole-word-mask finds words by WordPiece's '##' pieces, and this "
                            f"tokenizer is {model_type}; leave the option out")


def heldout_masking(lm: MaskedLM, config: LMDataConfig) -> BlockMasking:
    """The masking of held-out text: one seed for pre-training's evaluations and `evaluate-lm`."""
    return BlockMasking(lm, config, derived_seed(config.seed, "held-out"))


def masked_batches(blocks, masking: BlockMasking, batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """The blocks masked once, in batches kept for every scoring: the same masked positions each time."""
    batches = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]["input_ids"]
        batches.append(masking([{"input_ids": x, "key": start + i} for i, x in enumerate(ids)]))
    return batches


# -- loss and perplexity ----------------------------------------------------------------------------------------
def mlm_head(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that maps the encoder's hidden states to vocabulary logits, position by position,
    when the model has exactly one besides its encoder (BERT's `cls`, RoBERTa's `lm_head`); else None."""
    heads = [module for name, module in model.named_children()
             if name != model.base_model_prefix and any(True for _ in module.parameters())]
    return heads[0] if len(heads) == 1 else None


def masked_loss_sum(model: torch.nn.Module, head: Optional[torch.nn.Module],
                    batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the masked pieces, their number). With `head`, vocabulary logits are
    computed for the masked positions only: the loss of the model's own forward pass, without the
    logits of the ~85% of positions that carry none (about half of MiniLM's compute)."""
    labels = batch["labels"]
    masked = labels != -100
    count = masked.sum()
    if head is None:
        output = model(**batch)
        return output.loss * count if int(count) else output.logits.sum() * 0.0, count
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = model.base_model(**inputs)[0]
    logits = head(hidden[masked])
    return F.cross_entropy(logits.float(), labels[masked], reduction="sum"), count


@dataclass
class Perplexity:
    perplexity: float  # exp(loss)
    loss: float  # mean cross-entropy per masked word piece (nats)
    masked_pieces: int
    blocks: int

    def scores(self) -> Dict[str, float]:
        return {"perplexity": self.perplexity, "loss": self.loss}


def perplexity(model: torch.nn.Module, batches: Sequence[Dict[str, torch.Tensor]], device: torch.device) -> Perplexity:
    """exp of the mean cross-entropy over every masked piece of `batches` (summed over all, not a mean
    of batch means, so the batch size does not matter), in float32 whatever precision trains."""
    head = mlm_head(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss_sum, n = masked_loss_sum(model, head, {k: v.to(device) for k, v in batch.items()})
            total += float(loss_sum)
            count += int(n)
    if not count:
        raise ValueError("no word piece was masked: the held-out text is too short to score")
    loss = total / count
    return Perplexity(math.exp(loss), loss, count, sum(len(b["input_ids"]) for b in batches))


@dataclass
class LMScore:
    """What `evaluate_lm` measured."""

    encoder: str
    texts: List[str]
    documents: int
    word_pieces: int
    block_length: int
    result: Perplexity

    def summary(self) -> str:
        r = self.result
        return (f"perplexity {r.perplexity:,.2f} (mean loss {r.loss:.4f} per masked piece) on {r.masked_pieces:,} "
                f"masked of {self.word_pieces:,} word pieces ({self.documents:,} documents in {r.blocks:,} blocks "
                f"of {self.block_length})")


def evaluate_lm(encoder: PathLike, texts: Union[PathLike, Sequence[PathLike]], config: Optional[LMDataConfig] = None,
                *, progress: bool = False) -> LMScore:
    """The masked-LM perplexity of any encoder on any text files, with the masking pre-training uses
    for its held-out text (same settings, same positions)."""
    config = config or LMDataConfig()
    check_settings(config)
    paths = [Path(texts)] if isinstance(texts, (str, Path)) else [Path(t) for t in texts]
    if not paths:
        raise ValueError("no text file given")
    lm = load_masked_lm(encoder, device=config.device)
    if config.whole_word_mask:
        check_whole_word_tokenizer(lm)
    length = block_length(lm, config)
    with corpus_cache() as cache, datasets_progress(progress):
        documents = read_documents(paths, config, cache)
        blocks = to_blocks(documents, lm.tokenizer, length)
        batches = masked_batches(blocks, heldout_masking(lm, config), config.eval_batch_size)
        pieces = count_pieces(blocks)
    try:
        result = perplexity(lm.model, batches, lm.device)
    except ValueError as err:
        raise DataError(paths[0], None, str(err)) from None
    return LMScore(lm.source, [str(p) for p in paths], len(documents), pieces, length, result)

"""Tiny random checkpoints of the encoder families the components support, built offline.

BERT, DistilBERT and ELECTRA share a WordPiece vocabulary of a few hundred entries (the special tokens,
single characters and MiniLM's most frequent words), MPNet the same pieces with its own special tokens,
and RoBERTa a byte-level BPE trained here on the demo data with `tokenizers`. Each model has 2 layers of
width 16 and 64 usable positions, so long documents are windowed and a checkpoint weighs a few hundred KB.
"""

import json
import string
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertTokenizerFast,
    ElectraConfig,
    ElectraTokenizerFast,
    MPNetConfig,
    MPNetTokenizerFast,
    RobertaConfig,
    RobertaTokenizerFast,
)

FAMILIES = ("bert", "distilbert", "electra", "mpnet", "roberta")
HEADS = {"ner": AutoModelForTokenClassification, "textcat": AutoModelForSequenceClassification,
         "qa": AutoModelForQuestionAnswering, "base": AutoModel}
DEMO = Path(__file__).resolve().parents[1] / "demo"
POSITIONS = 64  # usable positions of every family


def _minilm_vocab() -> List[str]:
    from spacy_llm_components.models.checkpoint import DEFAULT_MODEL, resolve_source

    return (Path(resolve_source(DEFAULT_MODEL)) / "vocab.txt").read_text(encoding="utf8").split("\n")


def wordpiece_vocab(specials: Sequence[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                    words: int = 400) -> List[str]:
    """Special tokens, printable lowercase characters (alone and as ## continuations) and MiniLM's first
    `words` whole words: every text tokenizes, common words in one piece."""
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    common = [w for w in _minilm_vocab()[1996:] if w.isalpha() and not w.startswith("##")][:words]
    return list(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars if c.isalnum()), *common]))


def _demo_texts() -> List[str]:
    texts = []
    for line in (DEMO / "textcat" / "train.csv").read_text(encoding="utf8").splitlines()[1:]:
        texts.append(line.rsplit(",", 1)[0].strip('"'))
    for context in json.loads((DEMO / "qa" / "train.json").read_text(encoding="utf8"))["data"]:
        texts += [p["context"] for p in context["paragraphs"]]
    return texts


def tokenizer(family: str, folder: Path):
    """The family's fast tokenizer over a tiny vocabulary, files written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(_demo_texts(), vocab_size=600, min_frequency=2, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.save_model(str(folder))
        return RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    if family == "mpnet":
        vocab = ["<s>", "<pad>", "</s>", "<unk>", *wordpiece_vocab(specials=("[UNK]",))[1:], "<mask>"]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf8")
        return MPNetTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    (folder / "vocab.txt").write_text("\n".join(wordpiece_vocab()) + "\n", encoding="utf8")
    cls = {"bert": BertTokenizerFast, "distilbert": DistilBertTokenizerFast, "electra": ElectraTokenizerFast}[family]
    return cls(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def config(family: str, vocab_size: int, **head):
    """A 2-layer, width-16 config of the family with `POSITIONS` usable positions."""
    if family == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                max_position_embeddings=POSITIONS, **head)
    common = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, **head)
    if family == "bert":
        return BertConfig(max_position_embeddings=POSITIONS, **common)
    if family == "electra":
        return ElectraConfig(embedding_size=16, max_position_embeddings=POSITIONS, **common)
    if family == "mpnet":  # positions start after the padding index, as in RoBERTa
        return MPNetConfig(max_position_embeddings=POSITIONS + 2, relative_attention_num_buckets=32, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, **common)
    return RobertaConfig(max_position_embeddings=POSITIONS + 2, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, **common)


def make_checkpoint(folder: Path, family: str, head: str, labels: Optional[Sequence[str]] = None,
                    seed: int = 0, problem_type: Optional[str] = None) -> Path:
    """A random `AutoModelFor*` checkpoint (`head`: ner, textcat, qa or base) of `family`, saved with its
    tokenizer by `save_pretrained` into `folder`."""
    tok = tokenizer(family, folder)
    extra: Dict = {}
    if labels is not None:
        extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={label: i for i, label in enumerate(labels)})
    if problem_type:
        extra["problem_type"] = problem_type
    torch.manual_seed(seed)
    model = HEADS[head].from_config(config(family, len(tok), **extra)).eval()
    with torch.no_grad():  # weights larger than the init's, so random heads make varied decisions
        for name, parameter in model.named_parameters():
            if "LayerNorm" not in name and "layer_norm" not in name and parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder

"""Domain-adaptive pre-training on tiny random checkpoints: corpus reading, packing, seeded masking,
perplexity against the model's own loss, determinism, resume, the encoder as a base model (with
lineage), the MLflow run, the CLI, and every bad input."""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from conftest import make_ckpt, minilm_path, save_tiny
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file
from test_train import _Interrupt
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizerFast, GPT2Config, GPT2Model, set_seed
from typer.testing import CliRunner

from spacy_llm_components.artifacts import encoder_lineage, sha256_model
from spacy_llm_components.cli import app
from spacy_llm_components.data import DataError
from spacy_llm_components.models.masked_lm import load_masked_lm
from spacy_llm_components.stages.pretrain import PretrainConfig, pretrain
from spacy_llm_components.stages.pretrain.corpus import corpus_texts
from spacy_llm_components.stages.pretrain.lm import (
    BlockMasking,
    LMDataConfig,
    corpus_cache,
    evaluate_lm,
    heldout_masking,
    masked_batches,
    pack_blocks,
    perplexity,
    read_documents,
    to_blocks,
)
from spacy_llm_components.stages.shared.trainer import TrainingError, last_complete_checkpoint

runner = CliRunner()
ANIMALS, PLACES = ["cat", "dog", "bird", "horse"], ["mat", "roof", "chair", "table", "bed"]
# a small, repetitive language: a tiny model learns it within a few dozen steps
CORPUS = "".join(f"the {ANIMALS[i % 4]} sat on the {PLACES[i % 5]} and looked at the {ANIMALS[(i + 1) % 4]} .\n"
                 for i in range(120))
DEV = "".join(f"the {ANIMALS[i % 4]} sat on the {PLACES[(i + 2) % 5]} and looked at the {ANIMALS[i % 4]} .\n"
              for i in range(12))


def tiny(base, **kwargs) -> PretrainConfig:
    settings = dict(base_model=str(base), max_length=32, batch_size=8, lr=2e-3, warmup_ratio=0.0, max_steps=24,
                    eval_steps=8, device="cpu", eval_batch_size=256)
    return PretrainConfig(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    (root / "corpus.txt").write_text(CORPUS)
    (root / "dev.txt").write_text(DEV)
    return root


@pytest.fixture(scope="module")
def encoder(ckpts, texts, tmp_path_factory):
    """One finished pre-training run of the tiny base (a BertModel: no masked-LM head, as MiniLM)."""
    out = tmp_path_factory.mktemp("encoder") / "enc"
    result = pretrain(texts / "corpus.txt", out, tiny(ckpts["base"]), dev=[texts / "dev.txt"], progress=False)
    return out, result


def heldout_batch(folder, dev_file, config) -> dict:
    """The held-out text masked as pre-training masks it, in one batch."""
    lm = load_masked_lm(folder, device="cpu")
    with corpus_cache() as cache:
        blocks = to_blocks(read_documents([dev_file], config, cache), lm.tokenizer, config.max_length)
        (batch,) = masked_batches(blocks, heldout_masking(lm, config), batch_size=10_000)
    return batch


# -- corpus files ------------------------------------------------------------------------------------
def test_corpus_texts_of_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("\ufefffirst line\n\n  \nsecond line\r\nthird\n", encoding="utf8")
    assert list(corpus_texts(tmp_path / "a.txt")) == ["first line", "second line", "third"]
    assert list(corpus_texts(tmp_path / "a.txt", text_unit="paragraph")) == ["first line", "second line\nthird"]
    (tmp_path / "b.jsonl").write_text('{"body": "one", "label": "x"}\n\n{"body": "two"}\n')
    assert list(corpus_texts(tmp_path / "b.jsonl", text_column="body")) == ["one", "two"]
    (tmp_path / "c.csv").write_text('id,text\n1,"a, quoted text"\n2,plain\n')  # no label column needed
    assert list(corpus_texts(tmp_path / "c.csv")) == ["a, quoted text", "plain"]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nit 's \"good\"\t1\n")
    assert list(corpus_texts(tmp_path / "d.tsv", text_column="sentence")) == ['it \'s "good"']
    (tmp_path / "e.conll").write_text("EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n")
    assert list(corpus_texts(tmp_path / "e.conll")) == ["EU rejects", "Peter Blackburn"]
    squad = {"data": [{"title": "t", "paragraphs": [
        {"context": "The tower is in Paris.", "qas": [{"id": "1", "question": "Where?",
                                                        "answers": [{"text": "Paris", "answer_start": 16}]}]},
        {"context": "It is tall.", "qas": [{"id": "2", "question": "What?",
                                             "answers": [{"text": "tall", "answer_start": 6}]}]}]}]}
    (tmp_path / "f.json").write_text(json.dumps(squad))
    assert list(corpus_texts(tmp_path / "f.json")) == ["The tower is in Paris.", "It is tall."]
    from spacy.tokens import DocBin

    nlp = spacy.blank("en")
    DocBin(docs=[nlp("one doc"), nlp("another")]).to_disk(tmp_path / "g.spacy")
    assert list(corpus_texts(tmp_path / "g.spacy")) == ["one doc", "another"]


@pytest.mark.parametrize("content, problem", [
    (b"", "no text: the file is empty"),
    (b"\n   \n\r\n\n", "no text: the file is empty or holds only blank lines"),
    (b"fine\nalso fine\nbad \xff byte\n", "line 3: not UTF-8 (byte 0xff at column 5)"),
])
def test_corpus_texts_refuse_empty_and_non_utf8_files(tmp_path, content, problem):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(DataError, match=re.escape(problem)) as err:
        list(corpus_texts(tmp_path / "c.txt"))
    assert str(tmp_path / "c.txt") in str(err.value)


# -- packing -----------------------------------------------------------------------------------------
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=40), min_size=1, max_size=12),
       st.integers(1, 16))
def test_pack_blocks_keeps_every_piece_in_order(docs, length):
    blocks = pack_blocks({"input_ids": docs}, length)["input_ids"]
    assert [x for b in blocks for x in b] == [x for d in docs for x in d]
    assert all(len(b) == length for b in blocks[:-1]) and 0 < len(blocks[-1]) <= length


def test_a_long_line_is_split_into_blocks_and_no_piece_is_lost(ckpts, tmp_path):
    long_line = " ".join(f"word{i} and more" for i in range(60))  # far longer than a block of 32
    lines = [long_line] + [f"short line {i} ." for i in range(2_500)]  # several `datasets` map batches
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(ckpts["base"])
    expected = [piece for line in lines for piece in tokenizer(line)["input_ids"]]  # with [CLS] and [SEP]
    config = LMDataConfig(max_length=32)
    with corpus_cache(tmp_path / "out") as cache:
        blocks = to_blocks(read_documents([tmp_path / "c.txt"], config, cache), tokenizer, 32)["input_ids"]
        assert cache == tmp_path / ".out.corpus-0"
    assert not cache.exists()  # the Arrow files are gone
    assert [piece for block in blocks for piece in block] == expected  # in order, none lost, none added
    assert len(tokenizer(long_line)["input_ids"]) > 3 * 32 and all(len(b) <= 32 for b in blocks)
    assert sum(len(b) < 32 for b in blocks) <= 3  # a remainder per map batch of 1,000 documents, at most


# -- masking -----------------------------------------------------------------------------------------
def test_a_blocks_masking_depends_on_the_seed_and_its_key_only(ckpts):
    lm = load_masked_lm(ckpts["base"], device="cpu")
    masking = BlockMasking(lm, LMDataConfig(mlm_probability=0.3), seed=7)
    ids = [lm.tokenizer.cls_token_id, *range(2000, 2060), lm.tokenizer.sep_token_id]
    short = ids[:20]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    alone = masking([{"input_ids": ids, "key": 5}])
    assert torch.equal(torch.rand(3), expected_next)  # the global random state is not touched
    together = masking([{"input_ids": short, "key": 9}, {"input_ids": ids, "key": 5}])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(together[key][1], alone[key][0])  # the same, whatever the batch
    assert together["labels"][0, 20:].eq(-100).all() and together["attention_mask"][0, 20:].eq(0).all()
    assert together["input_ids"][0, 20:].eq(lm.tokenizer.pad_token_id).all()
    other = masking([{"input_ids": ids, "key": 6}])
    assert not torch.equal(other["labels"], alone["labels"])
    labels, inputs = alone["labels"][0], alone["input_ids"][0]
    masked = labels != -100
    assert labels[0] == labels[-1] == -100  # special tokens are never masked
    assert torch.equal(labels[masked], torch.tensor(ids)[masked])  # labels are the original pieces
    assert torch.equal(inputs[~masked], torch.tensor(ids)[~masked])
    assert (inputs[masked] == lm.tokenizer.mask_token_id).float().mean() > 0.5  # 80% [MASK], 10% random, 10% kept


def test_whole_word_masking_masks_every_piece_of_a_word(ckpts):
    lm = load_masked_lm(ckpts["base"], device="cpu")
    tok = lm.tokenizer
    text = " ".join(["schwarzenegger unbelievably photosynthesis"] * 8)
    ids = tok(text)["input_ids"]
    words = tok(text).word_ids()
    masking = BlockMasking(lm, LMDataConfig(whole_word_mask=True, mlm_probability=0.3), seed=0)
    batch = masking([{"input_ids": ids, "key": k} for k in range(4)])
    assert max(sum(1 for w in words if w == i) for i in set(words) - {None}) > 1  # multi-piece words
    for row in batch["labels"]:
        masked = (row != -100).tolist()
        for word in set(words) - {None}:
            assert len({masked[i] for i, w in enumerate(words) if w == word}) == 1, word
        assert any(masked)


# -- pre-training ------------------------------------------------------------------------------------
def test_perplexity_falls_and_equals_the_models_own_loss(encoder, ckpts, texts):
    out, result = encoder
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity_before"] == result.perplexity_before
    assert metrics["perplexity_after"] == result.perplexity_after < 0.5 * result.perplexity_before
    assert [p["step"] for p in metrics["curve"]] == [0, 8, 16, 24]
    assert metrics["curve"][0]["perplexity"] == result.perplexity_before
    assert min(p["perplexity"] for p in metrics["curve"]) == result.perplexity_after  # the best is kept
    assert metrics["best_step"] == result.best_step and result.training["steps"] == 24
    assert metrics["heldout"]["from"] == "file" and metrics["heldout"]["masked_pieces"] > 0
    assert metrics["corpus"]["documents"] == 120 and metrics["new_head_weights"]  # the base had no MLM head
    # independently: exp of the Hugging Face model's own loss (all logits, its own cross-entropy) on the same
    # masked held-out batch, for the encoder written and for the base with its head initialised as pre-training did
    config = tiny(ckpts["base"])
    batch = heldout_batch(out, texts / "dev.txt", config)
    assert int((batch["labels"] != -100).sum()) == metrics["heldout"]["masked_pieces"]
    written = AutoModelForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert math.exp(written(**batch).loss) == pytest.approx(result.perplexity_after, rel=1e-4)
        set_seed(config.seed)
        base = AutoModelForMaskedLM.from_pretrained(ckpts["base"]).eval()
        assert math.exp(base(**batch).loss) == pytest.approx(result.perplexity_before, rel=1e-4)
    # the held-out batch is the dev text packed and masked: unmasked pieces and labels are the original pieces
    tokenizer = AutoTokenizer.from_pretrained(out)
    pieces = [p for line in DEV.splitlines() for p in tokenizer(line)["input_ids"]]
    original = torch.tensor(pieces + [tokenizer.pad_token_id] * (batch["input_ids"].numel() - len(pieces)))
    original = original.view_as(batch["input_ids"])
    masked, real = batch["labels"] != -100, batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["input_ids"][real & ~masked], original[real & ~masked])
    assert 0.05 < masked.sum() / real.sum() < 0.3  # ~15% of the real pieces


def test_evaluate_lm_scores_the_same_positions(encoder, ckpts, texts):
    out, result = encoder
    config = LMDataConfig(max_length=32, device="cpu", eval_batch_size=3)  # another batch size: same figure
    score = evaluate_lm(out, texts / "dev.txt", config)
    assert score.result.perplexity == pytest.approx(result.perplexity_after, rel=1e-5)
    assert score.documents == 12 and score.block_length == 32
    cli = runner.invoke(app, ["evaluate-lm", str(out), str(texts / "dev.txt"), "--max-length", "32", "--device", "cpu"])
    assert cli.exit_code == 0, cli.output
    assert f"perplexity {result.perplexity_after:,.2f}" in cli.output
    missing = runner.invoke(app, ["evaluate-lm", str(out), str(texts / "nothing.txt")])
    assert missing.exit_code == 2 and f"{texts / 'nothing.txt'}: file does not exist" in missing.output


def test_the_encoder_is_a_plain_hf_folder_that_keeps_the_bases_unused_weights(encoder, ckpts):
    out, _ = encoder
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.txt", "metrics.json", "training_log.jsonl"])
    assert AutoTokenizer.from_pretrained(out).is_fast
    weights, base = load_file(str(out / "model.safetensors")), load_file(str(ckpts["base"] / "model.safetensors"))
    for name in ("pooler.dense.weight", "pooler.dense.bias"):  # not trained, saved back as they were
        np.testing.assert_array_equal(weights[f"bert.{name}"], base[name])
    assert not np.array_equal(weights["bert.embeddings.word_embeddings.weight"],
                              base["embeddings.word_embeddings.weight"])  # trained


def test_pretraining_is_deterministic_and_resumes_as_if_never_interrupted(encoder, ckpts, texts, tmp_path,
                                                                          trainer_steps):
    out, result = encoder
    config = tiny(ckpts["base"])
    again = pretrain(texts / "corpus.txt", tmp_path / "again", config, dev=[texts / "dev.txt"], progress=False)
    assert again.perplexity_after == result.perplexity_after and again.perplexity_before == result.perplexity_before
    assert sha256_model(tmp_path / "again") == sha256_model(out)  # the same bytes
    other_seed = pretrain(texts / "corpus.txt", tmp_path / "seed1", tiny(ckpts["base"], seed=1),
                          dev=[texts / "dev.txt"], progress=False)
    assert other_seed.perplexity_after != result.perplexity_after

    # 120 lines of 14 pieces pack into 53 blocks of 32: 7 batches of 8 an epoch; checkpoint-16 lies in the
    # third epoch, and the run is stopped at step 19
    assert result.corpus["blocks"] == 53
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        pretrain(texts / "corpus.txt", interrupted, config, dev=[texts / "dev.txt"], progress=False,
                 callbacks=[_Interrupt(19)])
    assert last_complete_checkpoint(interrupted / "checkpoints").endswith("checkpoint-16")
    assert not (interrupted / "model.safetensors").exists() and not (tmp_path / ".interrupted.corpus-0").exists()
    with pytest.raises(TrainingError, match="holds an interrupted run .* pass --resume"):
        pretrain(texts / "corpus.txt", interrupted, config, dev=[texts / "dev.txt"], progress=False)
    with pytest.raises(TrainingError, match="another corpus"):
        pretrain(texts / "dev.txt", interrupted, config, dev=[texts / "dev.txt"], resume=True, progress=False)
    trainer_steps.clear()
    resumed = pretrain(texts / "corpus.txt", interrupted, config, dev=[texts / "dev.txt"], resume=True, progress=False)
    assert resumed.training["resumed_from"] == 16 and resumed.perplexity_before == result.perplexity_before
    assert [step for step, _ in trainer_steps] == list(range(17, resumed.training["steps"] + 1))
    straight, continued = load_file(str(out / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    for name in straight:
        np.testing.assert_allclose(continued[name], straight[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert resumed.perplexity_after == pytest.approx(result.perplexity_after, rel=1e-5)
    steps = [json.loads(line)["step"] for line in (interrupted / "training_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(0) == 1  # the base model's score is logged once


def test_a_seeded_share_of_the_corpus_is_held_out(ckpts, texts, tmp_path):
    config = tiny(ckpts["base"], max_steps=2, eval_steps=2, dev_fraction=0.1)
    result = pretrain(texts / "corpus.txt", tmp_path / "enc", config, progress=False)
    metrics = json.loads((tmp_path / "enc" / "metrics.json").read_text())
    assert metrics["heldout"]["documents"] == 12 and metrics["corpus"]["documents"] == 108
    assert metrics["heldout"]["from"] == "0.1 of the corpus documents, seed 0" and result.perplexity_after > 0


# -- the encoder downstream: fine-tuning, lineage, registry, MLflow -----------------------------------
def test_the_encoder_is_a_base_model_for_finetune_and_its_lineage_is_recorded(encoder, mlflow_project, tmp_path):
    from mlflow.tracking import MlflowClient
    from test_train import NER_TRAIN

    from spacy_llm_components.components.pipeline import build_pipeline, hf_component
    from spacy_llm_components.stages import registry
    from spacy_llm_components.stages.finetune import finetune
    from spacy_llm_components.stages.prepare import prepare
    from spacy_llm_components.stages.shared import tracking
    from spacy_llm_components.stages.shared.training import FinetuneConfig

    out, result = encoder
    nlp = build_pipeline("ner", str(out), settings={"labels": ["PER", "LOC"], "device": "cpu"})
    loaded = hf_component(nlp).checkpoint.encoder.model.state_dict()  # the shipped config over the encoder's
    weights = load_file(str(out / "model.safetensors"))
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        np.testing.assert_array_equal(loaded[name].numpy(), weights[f"bert.{name}"])

    (tmp_path / "train.conll").write_text(NER_TRAIN)
    data = prepare("ner", tmp_path / "train.conll", tmp_path / "data", dev_fraction=0.34)
    config = FinetuneConfig(base_model=str(out), max_steps=2, batch_size=4, eval_steps=2, device="cpu")
    finetune("ner", data.train, data.dev, tmp_path / "model", config, progress=False)
    lineage = spacy.load(tmp_path / "model").meta["sllm"]["encoder"]
    assert lineage == {"encoder_path": str(out.resolve()), "encoder_sha256": sha256_model(out),
                       "encoder_perplexity": pytest.approx(result.perplexity_after, rel=1e-12),
                       "encoder_corpus_sha256": result.corpus["sha256"]}
    assert encoder_lineage(str(out))["encoder_perplexity"] == result.perplexity_after
    assert encoder_lineage("sentence-transformers/all-MiniLM-L6-v2") == {}  # a hub name: nothing to trace

    version = registry.register(tmp_path / "model", "adapted")
    client = MlflowClient()
    tags = client.get_model_version("adapted", version.version).tags
    assert {k: tags[k] for k in lineage} == {k: str(v) for k, v in lineage.items()}  # as meta.json has them
    card = client.get_model_version("adapted", version.version).description
    assert (f"**Encoder lineage**: `{out.resolve()}` (content `{sha256_model(out)[:12]}`); pre-trained by "
            f"`sllm pretrain` on corpus `{result.corpus['sha256'][:12]}`, held-out perplexity "
            f"{result.perplexity_after:.2f}") in card
    finetune_run = client.get_run(tracking.log_finetune(tmp_path / "model"))
    assert finetune_run.data.tags["encoder_sha256"] == sha256_model(out)

    run = client.get_run(tracking.log_pretrain(out))
    assert run.data.tags["sllm.step"] == "pretrain" and run.data.tags["corpus_sha256"] == result.corpus["sha256"]
    assert run.data.tags["corpus_sha256.0"] == result.corpus["files"][0]["sha256"]
    assert run.data.params["max_length"] == "32" and run.data.metrics["perplexity_after"] == result.perplexity_after
    curve = json.loads((out / "metrics.json").read_text())["curve"]
    history = sorted(client.get_metric_history(run.info.run_id, "eval_perplexity"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(p["step"], p["perplexity"]) for p in curve]
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "encoder")}
    assert {"encoder/model.safetensors", "encoder/metrics.json", "encoder/tokenizer.json"} <= logged


# -- the command line and bad input ------------------------------------------------------------------
def test_sllm_pretrain_writes_an_encoder(ckpts, texts, mlflow_project):
    out = mlflow_project / "enc"
    result = runner.invoke(app, ["pretrain", "--corpus", str(texts / "corpus.txt"), "--corpus", str(texts / "dev.txt"),
                                 "--output", str(out), "--base-model", str(ckpts["base"]), "--max-length", "32",
                                 "--max-steps", "2", "--batch-size", "8", "--whole-word-mask", "--gpu-id", "-1"])
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output and "MLflow run" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["corpus"]["files"]) == 2 and metrics["corpus"]["documents"] + metrics["heldout"]["documents"] == 132
    assert metrics["config"]["whole_word_mask"] and metrics["training"]["device"] == "cpu"
    assert not (out / "checkpoints").exists()


def test_every_pretrain_setting_is_an_option_of_run_and_schedule():
    for command in ("run", "schedule"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
        assert "--pretrain-corpus" in result.output and "--pretrain-dev" in result.output
        for f in fields(PretrainConfig):
            option = f"--pretrain-{f.name.replace('_', '-')}"
            assert (option in result.output) == (f.name not in ("base_model", "device")), (command, option)


def _no_mlm_architecture(root: Path) -> Path:
    return save_tiny(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522)), root / "gpt2")


def _slow_tokenizer_only(root: Path) -> Path:
    folder = make_ckpt(root / "slow", "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (folder / name).unlink()
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<unk>": 2}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CTRLTokenizer"}))
    return folder


def _no_mask_token(root: Path) -> Path:
    folder = make_ckpt(root / "nomask", "base")
    BertTokenizerFast(vocab_file=str(minilm_path() / "vocab.txt"), mask_token=None).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, message", [
    ("empty", "empty.txt: no text: the file is empty"),
    ("blank", "blank.txt: no text: the file is empty or holds only blank lines"),
    ("latin1", "latin1.txt, line 2: not UTF-8 (byte 0xe9 at column 4)"),
    ("missing", "missing.txt: file does not exist"),
    ("one document", "one.txt: 1 document: too few to hold out"),
    ("no MLM architecture", "gpt2: a 'gpt2' model has no masked-language-model architecture"),
    ("slow tokenizer", "slow: needs a fast tokenizer (tokenizer.json) to pack the corpus into blocks"),
    ("no mask token", "nomask: the tokenizer has no mask token"),
    ("bad setting", "--mlm-probability 1.5"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(ckpts, texts, tmp_path, case, message):
    corpus, base = texts / "corpus.txt", ckpts["base"]
    extra = []
    if case == "empty":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("")
    elif case == "blank":
        corpus = tmp_path / "blank.txt"
        corpus.write_text("\n \n\t\n")
    elif case == "latin1":
        corpus = tmp_path / "latin1.txt"
        corpus.write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    elif case == "missing":
        corpus = tmp_path / "missing.txt"
    elif case == "one document":
        corpus = tmp_path / "one.txt"
        corpus.write_text("just one line\n")
    elif case == "no MLM architecture":
        base = _no_mlm_architecture(tmp_path)
    elif case == "slow tokenizer":
        base = _slow_tokenizer_only(tmp_path)
    elif case == "no mask token":
        base = _no_mask_token(tmp_path)
    elif case == "bad setting":
        extra = ["--mlm-probability", "1.5"]
    out = tmp_path / "out" / "encoder"
    there = sorted(tmp_path.iterdir())
    result = runner.invoke(app, ["pretrain", "--corpus", str(corpus), "--output", str(out), "--base-model", str(base),
                                 "--max-steps", "2", "--no-track", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sorted(tmp_path.iterdir()) == there  # no output folder, no corpus cache: nothing half-written


@pytest.mark.slow
def test_torchrun_pretrains_on_two_cpu_processes(texts, tmp_path):
    """Two processes of 4 blocks each train as one process of 8 does (the same weights, within the float
    noise of summing gradients in another order): each rank trained on its own half of every batch. The
    control, one process of 4 blocks (what two ranks on the same shard would amount to), ends elsewhere."""
    base = make_ckpt(tmp_path / "base", "base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    out = tmp_path / "enc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = ["--max-length", "32", "--lr", "2e-3", "--max-steps", "6", "--eval-steps", "3", "--warmup-ratio",
                "0", "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "spacy_llm_components.cli", "pretrain", "--corpus", str(texts / "corpus.txt"), "--dev",
           str(texts / "dev.txt"), "--output", str(out), "--base-model", str(base), "--batch-size", "4",
           *settings, "--no-track"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    assert training["world_size"] == 2 and training["steps"] == 6
    assert metrics["perplexity_after"] < metrics["perplexity_before"]
    assert (out / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "enc"]  # both processes' corpus caches are gone

    config = dict(base_model=str(base), max_length=32, lr=2e-3, max_steps=6, eval_steps=3, warmup_ratio=0.0,
                  device="cpu")
    single = pretrain(texts / "corpus.txt", tmp_path / "single", PretrainConfig(batch_size=8, **config),
                      dev=[texts / "dev.txt"], progress=False)
    pretrain(texts / "corpus.txt", tmp_path / "half", PretrainConfig(batch_size=4, **config),
             dev=[texts / "dev.txt"], progress=False)
    assert single.training["word_pieces"] == training["word_pieces"]  # the ranks' pieces, summed: the same blocks
    ddp, one, control = (load_file(str(p / "model.safetensors")) for p in (out, tmp_path / "single", tmp_path / "half"))
    diff = max(float(np.abs(ddp[k] - one[k]).max()) for k in one if not k.endswith("attention.self.key.bias"))
    apart = max(float(np.abs(control[k] - one[k]).max()) for k in one)
    assert diff < 1e-4 < apart, (diff, apart)
    assert metrics["perplexity_after"] == pytest.approx(single.perplexity_after, rel=1e-3)


def test_perplexity_is_exp_of_the_mean_over_every_masked_piece_by_hand(ckpts):
    """Two batches with 1 and 6 masked pieces: the perplexity is exp(sum of their cross-entropies / 7),
    computed here from the model's full logits with a plain log-softmax, not a mean of batch means."""
    lm = load_masked_lm(ckpts["base"], device="cpu")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for rows, masked in ((1, [(0, 3)]), (2, [(0, 1), (0, 2), (0, 5), (1, 1), (1, 4), (1, 6)])):
        ids = torch.randint(1000, 2000, (rows, 8), generator=generator)
        labels = torch.full_like(ids, -100)
        for r, c in masked:
            labels[r, c] = ids[r, c]
            ids[r, c] = lm.tokenizer.mask_token_id
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            log_probs = logits.log_softmax(-1)
            picked = [-float(log_probs[r, c, batch["labels"][r, c]]) for r, c in (batch["labels"] != -100).nonzero()]
            total, count = total + sum(picked), count + len(picked)
            batch_means.append(sum(picked) / len(picked))
    result = perplexity(lm.model, batches, torch.device("cpu"))
    assert result.masked_pieces == 7 and result.blocks == 3
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert abs(math.exp(total / count) - math.exp(sum(batch_means) / 2)) > 1e-3 * math.exp(total / count)

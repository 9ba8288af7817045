"""The `sllm` commands end to end through typer's CliRunner: prepare -> finetune -> evaluate -> predict."""

import json

import spacy
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from test_train import NER_TRAIN

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_prepare_finetune_evaluate_predict(ckpts, tmp_path):
    (tmp_path / "train.conll").write_text(NER_TRAIN * 2)
    result = invoke("prepare", "ner", tmp_path / "train.conll", "--output", tmp_path / "data", "--dev-fraction", "0.25")
    assert result.exit_code == 0, result.output
    assert "train: 9 docs" in result.output and "dev: 3 docs" in result.output
    assert {p.name for p in (tmp_path / "data").iterdir()} == {"train.spacy", "dev.spacy", "labels.json", "summary.json"}

    result = invoke("finetune", "ner", "--train", tmp_path / "data/train.spacy", "--dev", tmp_path / "data/dev.spacy",
                    "--output", tmp_path / "model", "--base-model", ckpts["base"], "--max-steps", "3",
                    "--batch-size", "4", "--device", "cpu", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    assert "fine-tuned ner in" in result.output and "word pieces at" in result.output
    assert spacy.load(tmp_path / "model").pipe_names == ["ner"]

    result = invoke("evaluate", tmp_path / "model", tmp_path / "train.conll", "--output", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ents_f: ")
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["statistics"]["docs"] == 12 and set(metrics["per_label"]) == {"LOC", "PER"}

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"Angela Merkel visited Paris {i}"}) + "\n"
                                               for i in range(5)))
    result = invoke("predict", tmp_path / "model", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all("ents" in line for line in lines)

    result = invoke("export-hf", tmp_path / "model", "ner", tmp_path / "hf")
    assert result.exit_code == 0 and (tmp_path / "hf/config.json").is_file()


def test_bad_input_exits_2_with_the_line(tmp_path):
    (tmp_path / "bad.conll").write_text("Paris B-LOC\nbroken\n")
    result = runner.invoke(app, ["prepare", "ner", str(tmp_path / "bad.conll"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "bad.conll, line 2: expected a token and a tag column" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["prepare", "pos", str(tmp_path / "bad.conll"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown task 'pos'" in result.output


def test_skip_bad_lists_skipped_records(tmp_path):
    (tmp_path / "a.conll").write_text("".join(f"Paris{i} B-LOC\n\n" for i in range(10)) + "broken\n")
    result = runner.invoke(app, ["prepare", "ner", str(tmp_path / "a.conll"), "-o", str(tmp_path / "out"), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad record(s)" in result.output and "line 21" in result.output

"""Settings declared once (component settings, Trainer and stage settings, their ranges), and strategies
chosen by registered name."""

import inspect
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import spacy
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.encoder import EncoderSettings
from spacy_llm_components.components.ner import NerSettings
from spacy_llm_components.components.qa import QASettings
from spacy_llm_components.components.strategies import MeanWindows, WindowPooling, strategies
from spacy_llm_components.components.textcat import TextcatSettings
from spacy_llm_components.core.settings import defaults

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"hf_ner": NerSettings, "hf_textcat": TextcatSettings, "hf_qa": QASettings, "hf_encoder": EncoderSettings}


@pytest.mark.parametrize("factory", SETTINGS)
def test_each_factory_is_made_from_its_settings(factory):
    """The default config and the signature spaCy validates come from the one dataclass."""
    from spacy.language import Language

    meta = Language.get_factory_meta(factory)
    assert meta.default_config == defaults(SETTINGS[factory])
    parameters = list(inspect.signature(spacy.util.registry.factories.get(factory)).parameters)
    assert parameters == ["nlp", "name", *(f.name for f in fields(SETTINGS[factory]))]
    assert all(f.metadata["help"] for f in fields(SETTINGS[factory]))  # every option says what it does


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.cfg")), ids=lambda p: p.name)
def test_shipped_configs_state_only_what_they_choose(path):
    config = spacy.util.load_config(path, interpolate=False)
    for name, block in config["components"].items():
        if block["factory"] in SETTINGS:
            assert set(block) <= {"factory", "model", "labels", "encoder"}, (name, sorted(block))


def _nlp(ckpts, **config):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "device": "cpu", "max_length": 12, **config})
    return nlp


LONG = " ".join(["The soup was hot and the staff were friendly.", "Awful mess, never again!", "A quiet day."] * 3)


def test_a_strategy_is_chosen_by_its_registered_name_and_a_new_one_needs_no_change(ckpts):
    by_name = _nlp(ckpts, pooling={"@sllm_strategies": "sllm.max_windows.v1"})(LONG).cats
    by_legacy_string = _nlp(ckpts, pooling="max")(LONG).cats  # as configs of 0.1.0 say it
    assert by_name == by_legacy_string
    assert by_name != _nlp(ckpts)(LONG).cats  # the default (mean) pools otherwise: several windows ran

    seen = []

    class Recording(MeanWindows):
        def __call__(self, window_logits):
            seen.append(window_logits.shape)
            return super().__call__(window_logits)

    strategies.register("test.recording_mean.v1", func=lambda: Recording("test.recording_mean.v1"))
    try:
        got = _nlp(ckpts, pooling={"@sllm_strategies": "test.recording_mean.v1"})(LONG).cats
    finally:
        strategies.get_all().pop("test.recording_mean.v1", None)
    assert seen and seen[0][0] > 1 and seen[0][1] == 2  # windows x labels
    assert got == pytest.approx(_nlp(ckpts)(LONG).cats, abs=1e-7)


def test_an_unknown_or_misplaced_strategy_fails_at_build_with_the_known_ones(ckpts):
    with pytest.raises(Exception, match="sllm.nope.v1.*sllm_strategies"):
        _nlp(ckpts, pooling={"@sllm_strategies": "sllm.nope.v1"})
    with pytest.raises(ValueError, match="pooling 'median' is not a registered strategy; known: sllm.max_windows.v1, "
                                         "sllm.mean_windows.v1"):
        _nlp(ckpts, pooling="median")
    with pytest.raises(ValueError, match="decoder strategy, where a pooling strategy is needed"):
        _nlp(ckpts, pooling={"@sllm_strategies": "sllm.viterbi.v1"})
    assert issubclass(MeanWindows, WindowPooling)


@pytest.mark.parametrize("factory,setting,value,message", [
    ("hf_ner", "stride", -1, "ner: stride -1: must be >= 0"),
    ("hf_qa", "top_k", 0, "qa: top_k 0: must be >= 1"),
    ("hf_textcat", "threshold", 1.5, "textcat: threshold 1.5: must be >= 0 and <= 1"),
    ("hf_textcat", "batch_size", 0, "textcat: batch_size 0: must be >= 1"),
    ("hf_ner", "runtime", "tensorrt", "ner: runtime 'tensorrt': use one of torch, onnxruntime"),
    ("hf_ner", "scheme", "IOX", "ner: scheme 'IOX': use one of auto, "),
])
def test_a_component_setting_out_of_range_is_refused_by_name(ckpts, factory, setting, value, message):
    nlp = spacy.blank("en")
    with pytest.raises(ValueError, match=message):
        nlp.add_pipe(factory, name=factory[3:], config={"model": str(ckpts["base"]), setting: value})


@pytest.mark.parametrize("option,value,message", [
    ("--batch-size", "0", "--batch-size 0: must be >= 1"), ("--lr", "-1", "--lr -1.0: must be >= 0"),
    ("--epochs", "0", "--epochs 0.0: must be > 0"), ("--max-length", "4", "--max-length 4: must be >= 8"),
    ("--max-steps", "0", "--max-steps 0: must be -1 or >= 1"), ("--warmup-ratio", "1", "must be >= 0 and < 1"),
])
def test_numeric_options_are_checked_before_any_work(tmp_path, option, value, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["finetune", "ner", "--train", str(tmp_path / "no.spacy"), "--dev",
                                      str(tmp_path / "no.spacy"), "-o", str(out), option, value, "--no-track"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("command", [["pretrain", "--corpus", "c.txt", "-o", "OUT"],
                                     ["run", "ner", "--train", "t.conll", "--name", "m", "--workdir", "OUT"]])
def test_every_command_checks_its_settings(tmp_path, command):
    """A group of options added to a command by prefix is checked under its prefixed names too."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    option = "--pretrain-mlm-probability" if command[0] == "run" else "--mlm-probability"
    result = CliRunner().invoke(app, [*args, option, "1.5"])
    assert result.exit_code == 2 and f"{option} 1.5: must be > 0 and < 1" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_max_length_beyond_the_model_is_capped_and_said(ckpts, tmp_path, caplog):
    from spacy_llm_components.stages.finetune import finetune
    from spacy_llm_components.stages.prepare import prepare
    from spacy_llm_components.stages.shared.training import FinetuneConfig

    (tmp_path / "t.conll").write_text("Angela B-PER\nMerkel I-PER\nvisited O\nParis B-LOC\n\n" * 4)
    data = prepare("ner", tmp_path / "t.conll", tmp_path / "data", dev_fraction=0.5)
    with caplog.at_level("WARNING", logger="spacy_llm_components"):
        result = finetune("ner", data.train, data.dev, tmp_path / "m", FinetuneConfig(
            base_model=str(ckpts["base"]), max_steps=1, max_length=100_000, device="cpu"), progress=False)
    assert "--max-length 100000 is capped to 64" in caplog.text
    assert json.loads((result.output / "meta.json").read_text())["sllm"]["config"]["max_length"] == 100_000
    assert np.isfinite(result.dev_metrics["ents_f"])

"""Pipelines as users ship them: to_disk/spacy.load offline, entry points, assemble, package, export, CLI."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from conftest import minilm_path
from spacy.tokens import DocBin
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer
from typer.testing import CliRunner

from spacy_llm_components import export_hf
from spacy_llm_components.cli import app
from spacy_llm_components.components.pipeline import hf_component
from spacy_llm_components.core.decode import tags_for_types

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Angela Merkel visited Paris. Was the visit long? It was short."
BIN = Path(sys.executable).parent


def full_pipeline(ckpts, tmp_path):
    """All three components, built from copies of the checkpoints (which the tests then delete)."""
    nlp = spacy.blank("en")
    for factory, key in (("hf_ner", "ner"), ("hf_textcat", "textcat"), ("hf_qa", "qa")):
        src = shutil.copytree(ckpts[key], tmp_path / "orig" / key)
        config = {"model": str(src), "device": "cpu"}
        if factory == "hf_qa":
            config["questions"] = ["Who visited Paris?"]
        nlp.add_pipe(factory, config=config)
    return nlp


def outputs(doc):
    return (
        [(e.start_char, e.end_char, e.label_, round(e._.score, 5)) for e in doc.ents],
        {k: round(v, 5) for k, v in doc.cats.items()},
        [(s.start_char, s.end_char, s._.question, round(s._.score, 5)) for s in doc.spans["answers"]],
    )


def test_round_trip_offline_with_the_original_checkpoints_deleted(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    before = outputs(nlp(TEXT))
    nlp.to_disk(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "orig")
    for name in ("hf_ner", "hf_textcat", "hf_qa"):
        folder = tmp_path / "pipe" / name / "model"
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert (folder / "config.json").is_file()
        assert not list(folder.glob("*.bin"))
    loaded = spacy.load(tmp_path / "pipe")
    assert outputs(loaded(TEXT)) == before
    assert loaded.get_pipe("hf_ner").labels == ["PER", "LOC", "ORG"]


def test_to_bytes_round_trip(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    before = outputs(nlp(TEXT))
    data = nlp.to_bytes()
    shutil.rmtree(tmp_path / "orig")
    fresh = spacy.blank("en")
    for name in nlp.pipe_names:
        fresh.add_pipe(name, config={"model": "/gone", "device": "cpu", **(
            {"questions": ["Who visited Paris?"]} if name == "hf_qa" else {})})
    fresh.from_bytes(data)
    assert outputs(fresh(TEXT)) == before


def test_factories_need_no_import_thanks_to_entry_points(ckpts):
    code = (
        # a fresh process whose code never imports spacy_llm_components: spaCy finds the factory by entry point
        "import spacy; nlp = spacy.blank('en');"
        f"nlp.add_pipe('hf_ner', config={{'model': {str(ckpts['ner'])!r}}});"
        "doc = nlp('Angela Merkel');"
        "print(type(nlp.get_pipe('hf_ner')).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "HFEntityRecognizer"


def test_export_to_a_plain_hf_folder_loads_in_transformers(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    out = export_hf(nlp, "hf_ner", tmp_path / "hf")
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    reference = AutoModelForTokenClassification.from_pretrained(ckpts["ner"]).eval()
    enc = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(model(**enc).logits.numpy(), reference(**enc).logits.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="no component"):
        export_hf(nlp, "nope", tmp_path / "x")


def test_cli_export_hf(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    nlp.to_disk(tmp_path / "pipe")
    runner = CliRunner()
    result = runner.invoke(app, ["export-hf", str(tmp_path / "pipe"), "hf_textcat", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    reference = AutoModelForSequenceClassification.from_pretrained(ckpts["textcat"]).eval()
    enc = AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_array_equal(exported(**enc).logits.numpy(), reference(**enc).logits.numpy())
    assert exported.config.id2label == {0: "neg", 1: "pos"}
    bad = runner.invoke(app, ["export-hf", str(tmp_path / "pipe"), "missing", str(tmp_path / "hf2")])
    assert bad.exit_code == 2 and "no component" in bad.output
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("factory", ["hf_ner", "hf_textcat", "hf_qa"])
def test_an_exported_folder_is_a_checkpoint_for_the_component_again(ckpts, tmp_path, factory):
    """export_hf -> a new hf_* component built from the exported folder predicts exactly as the original."""
    nlp = full_pipeline(ckpts, tmp_path)
    original = nlp(TEXT)
    export_hf(nlp, factory, tmp_path / "hf")
    again = spacy.blank("en")
    again.add_pipe(factory, config={"model": str(tmp_path / "hf"), "device": "cpu",
                                    **({"questions": ["Who visited Paris?"]} if factory == "hf_qa" else {})})
    assert again.get_pipe(factory).record(again(TEXT)) == nlp.get_pipe(factory).record(nlp(TEXT)) == \
        nlp.get_pipe(factory).record(original)
    assert any(nlp.get_pipe(factory).record(original).values()), "the component predicts something to compare"


def test_to_disk_without_the_model_writes_no_checkpoint(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    nlp.to_disk(tmp_path / "pipe", exclude=["hf_ner"])
    assert not (tmp_path / "pipe" / "hf_ner").exists()
    pipe = nlp.get_pipe("hf_ner")
    pipe.to_disk(tmp_path / "component", exclude=["model"])
    assert list((tmp_path / "component").iterdir()) == []  # no checkpoint written
    pipe.to_disk(tmp_path / "full")
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    # and from_disk with the model excluded keeps the loaded one
    assert pipe.from_disk(tmp_path / "component", exclude=["model"]) is pipe and pipe.labels == ["PER", "LOC", "ORG"]


@pytest.mark.slow
@pytest.mark.parametrize("name,probe", [("ner", "ents"), ("textcat", "cats"), ("qa", "answers")])
def test_spacy_assemble_the_shipped_configs_on_the_real_minilm(tmp_path, name, probe):
    out = tmp_path / name
    subprocess.run([str(BIN / "spacy"), "assemble", str(ROOT / "pipelines" / f"{name}.cfg"), str(out)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    nlp = spacy.load(out)
    doc = nlp.make_doc("Angela Merkel visited Paris. It rained.")
    doc._.questions = ["Who visited Paris?"]
    doc = nlp(doc)
    pipe = hf_component(nlp)
    checks = {
        "ents": lambda: (pipe.checkpoint.id2label == tags_for_types(["PER", "LOC", "ORG", "MISC"], "IOB2")
                         and all(e.label_ in {"PER", "LOC", "ORG", "MISC"} for e in doc.ents)),
        "cats": lambda: pipe.labels == ["negative", "positive"] and set(doc.cats) == {"negative", "positive"}
                        and sum(doc.cats.values()) == pytest.approx(1.0) and nlp.pipe_names == ["sentencizer", name],
        "answers": lambda: [s._.question for s in doc.spans["answers"]] == ["Who visited Paris?"],
    }
    assert checks[probe]()
    # the new head sits on MiniLM's own encoder weights, unchanged, and its model is MiniLM's size
    from safetensors.numpy import load_file

    minilm = load_file(str(minilm_path() / "model.safetensors"))
    encoder = {k: v.numpy() for k, v in pipe.checkpoint.encoder.model.state_dict().items()}
    weights = {k for k in minilm if k != "embeddings.position_ids"  # (a buffer, rebuilt at load)
               and (probe == "cats" or not k.startswith("pooler."))}  # (only BERT's sequence head reads the pooler)
    assert encoder.keys() >= weights and all(np.array_equal(encoder[k], minilm[k]) for k in weights if k in encoder)
    assert pipe.checkpoint.max_length == 512 and pipe.checkpoint.encoder.config.num_hidden_layers == 6


@pytest.mark.slow
def test_spacy_package_builds_a_wheel_that_installs_and_loads(ckpts, tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    nlp.meta["name"] = "hfner"
    nlp.to_disk(tmp_path / "pipe")
    dist = tmp_path / "dist"
    dist.mkdir()
    subprocess.run([str(BIN / "spacy"), "package", str(tmp_path / "pipe"), str(dist), "--build", "wheel",
                    "--name", "hfner", "--version", "0.0.1"], check=True, capture_output=True)
    wheel = next(dist.rglob("*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    with zipfile.ZipFile(wheel) as zf:
        requirements = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
    assert "spacy-llm-components" in requirements
    texts = [TEXT, "Macron met Merkel in Berlin.", ""]
    code = ("import json, sys, spacy; nlp = spacy.load('en_hfner'); print(json.dumps([[(e.start_char, e.end_char, "
            "e.label_, e._.score) for e in doc.ents] for doc in nlp.pipe(json.loads(sys.argv[1]))]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    installed = json.loads(out.stdout.strip().splitlines()[-1])
    original = [[[e.start_char, e.end_char, e.label_, e._.score] for e in doc.ents] for doc in nlp.pipe(texts)]
    assert original[0], "the random head tags something in this sentence"
    assert [[e[:3] for e in doc] for doc in installed] == [[e[:3] for e in doc] for doc in original]
    assert [e[3] for doc in installed for e in doc] == pytest.approx([e[3] for doc in original for e in doc], abs=1e-6)


def test_multiprocess_pipe_matches_single_process(ckpts, tmp_path):
    """n_process forks workers; torch's OpenMP pool must not hang them."""
    nlp = full_pipeline(ckpts, tmp_path)
    texts = [TEXT, "Berlin is big.", "", "Macron met Merkel."] * 2
    single = [outputs(d) for d in nlp.pipe(texts)]
    assert [outputs(d) for d in nlp.pipe(texts, n_process=2, batch_size=2)] == single


def test_docbin_keeps_scores_and_questions(ckpts, tmp_path):
    nlp = full_pipeline(ckpts, tmp_path)
    docs = list(nlp.pipe([TEXT, "Macron met Merkel."]))
    data = DocBin(store_user_data=True, docs=docs).to_bytes()
    restored = list(DocBin().from_bytes(data).get_docs(nlp.vocab))
    assert [outputs(d) for d in restored] == [outputs(d) for d in docs]

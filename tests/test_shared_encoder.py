"""One encoder, several heads: hf_ner, hf_textcat and hf_qa reading one hf_encoder component.

References: the same heads run alone, each in its own pipeline, on checkpoints that hold the same encoder
weights (each head's output must be the same); a forward hook counting what the encoder runs; the
checkpoints' own tensors for what a pipeline folder and an export hold; transformers' model on each
window for a long doc's pooled categories.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import spacy
import torch
from conftest import assert_same_predictions, in_process_predictions
from families import HEADS, make_checkpoint
from safetensors import safe_open
from test_serving import _free_port, _stop

from spacy_llm_components.cli.demo import wait_until_ready
from spacy_llm_components.components.pipeline import doc_predictions, export_hf
from spacy_llm_components.core.align import window_spans
from spacy_llm_components.models.checkpoint import CheckpointError

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
FAMILIES = ("bert", "roberta", "distilbert")  # the three ways a sequence head pools
TEXTS = ["Marta Kowalczyk opened a bakery in Lindenfeld.", "The soup was still hot", "", "a",
         " ".join(["The river Sarn runs past the old mill of Tomas Ekdahl."] * 12)]  # several windows
ROOT = Path(__file__).resolve().parents[1]
WINDOW = dict(max_length=24, stride=6)  # small windows: the long text takes several


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: NER, textcat and QA checkpoints whose encoder weights are the same tensors, and an NER
    checkpoint with other encoder weights."""
    root = tmp_path_factory.mktemp("shared")
    out = {}
    for family in FAMILIES:
        ner = make_checkpoint(root / family / "ner", family, "ner", TAGS, seed=1)
        encoder = HEADS["ner"].from_pretrained(ner)
        prefix = encoder.base_model_prefix
        found = {"ner": ner}
        for task, labels, seed in (("textcat", ["neg", "pos"], 2), ("qa", None, 3)):
            folder = make_checkpoint(root / family / task, family, task, labels, seed=seed)
            model = HEADS[task].from_pretrained(folder)
            missing, _ = getattr(model, prefix).load_state_dict(getattr(encoder, prefix).state_dict(), strict=False)
            assert all(k.startswith("pooler.") for k in missing)  # BERT's sequence model keeps its own pooler
            model.save_pretrained(folder, safe_serialization=True)
            found[task] = folder
        found["other"] = make_checkpoint(root / family / "other", family, "ner", TAGS, seed=9)
        out[family] = found
    return out


def shared_pipeline(ckpts, heads=("ner", "textcat", "qa")):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_encoder", name="encoder", config={"model": str(ckpts["ner"]), "device": "cpu", **WINDOW})
    for task in heads:
        config = {"encoder": "encoder"}
        if task != "ner":
            config["model"] = str(ckpts[task])
        if task == "qa":
            config.update(questions=["Who opened it?"], max_length=24, doc_stride=6)
        nlp.add_pipe(f"hf_{task}", name=task, config=config)
    nlp.initialize()
    return nlp


def alone(ckpts, task):
    nlp = spacy.blank("en")
    config = {"model": str(ckpts[task]), "device": "cpu", "max_length": 24}
    config.update({"ner": {"stride": 6}, "textcat": {}, "qa": {"questions": ["Who opened it?"], "doc_stride": 6}}[task])
    nlp.add_pipe(f"hf_{task}", name=task, config=config)
    nlp.initialize()
    return nlp


def encoder_rows(encoder_model) -> list:
    """Sequences the encoder module runs from now on (a forward hook)."""
    seen: list = []
    encoder_model.register_forward_hook(lambda m, args, kwargs, out: seen.extend(kwargs["input_ids"].shape[:1]),
                                        with_kwargs=True)
    return seen


def predictions(nlp, texts=TEXTS):
    return [doc_predictions(doc, nlp) for doc in nlp.pipe(texts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_head_predicts_what_it_predicts_alone_on_the_same_weights(checkpoints, family):
    ckpts = checkpoints[family]
    nlp = shared_pipeline(ckpts)
    got = predictions(nlp)
    want = {task: predictions(alone(ckpts, task)) for task in ("ner", "textcat", "qa")}
    assert any(p["ents"] for p in got)  # (random heads still find entities, so the comparison has content)
    pieces = [len(ids) for ids in nlp.get_pipe("encoder").encoder.tokenizer(TEXTS, add_special_tokens=False)["input_ids"]]
    fits = [n <= 24 - 2 for n in pieces]
    assert fits.count(False) >= 1 and fits.count(True) >= 3
    for i, prediction in enumerate(got):
        assert_same_predictions(prediction["ents"], want["ner"][i]["ents"])
        assert_same_predictions(prediction["answers"], want["qa"][i]["answers"])
        if fits[i]:  # a longer doc's categories: see the test below
            assert_same_predictions(prediction["cats"], want["textcat"][i]["cats"])


def test_a_long_doc_is_categorised_over_the_encoders_windows(checkpoints):
    """hf_textcat alone windows a long doc on sentence/token boundaries; on a shared encoder it pools its
    logits over the encoder's piece windows (the hidden states already there): the mean of transformers'
    logits over those windows."""
    ckpts = checkpoints["roberta"]
    nlp = shared_pipeline(ckpts, heads=("ner", "textcat"))
    text = TEXTS[-1]
    reference = HEADS["textcat"].from_pretrained(ckpts["textcat"]).eval()
    tokenizer = nlp.get_pipe("encoder").encoder.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = window_spans(len(ids), 24 - 2, 6)
    assert len(windows) >= 3
    with torch.no_grad():
        logits = np.stack([reference(torch.tensor([tokenizer.build_inputs_with_special_tokens(ids[s:e])])).logits[0].numpy()
                           for s, e in windows])
    mean = logits.mean(axis=0)
    want = np.exp(mean) / np.exp(mean).sum()
    got = nlp(text).cats
    assert [got["neg"], got["pos"]] == pytest.approx(want.tolist(), abs=1e-5)


def test_each_doc_runs_through_the_encoder_once_for_all_heads(checkpoints):
    ckpts = checkpoints["bert"]
    nlp = shared_pipeline(ckpts, heads=("ner", "textcat"))
    shared = encoder_rows(nlp.get_pipe("encoder").encoder.model)
    head_models = [encoder_rows(nlp.get_pipe(task).checkpoint.model) for task in ("ner", "textcat")]
    texts = TEXTS[1:4] * 5  # docs that fit one window
    list(nlp.pipe(texts, batch_size=7))
    assert sum(shared) == len(texts)  # one sequence per (short) doc, for both heads
    assert head_models == [[], []]  # the heads' own encoder+head modules never ran
    separate = [alone(ckpts, task) for task in ("ner", "textcat")]
    counts = [encoder_rows(p.get_pipe(task).checkpoint.model) for p, task in zip(separate, ("ner", "textcat"))]
    for p in separate:
        list(p.pipe(texts))
    assert [sum(c) for c in counts] == [len([t for t in texts if t]), len(texts)]  # (NER alone skips empty docs)
    assert not nlp.get_pipe("encoder")._encoded  # the hidden states went once the last head had read them


def test_disabled_heads_do_not_make_the_encoder_run_or_keep_hidden_states(checkpoints):
    nlp = shared_pipeline(checkpoints["bert"], heads=("ner", "textcat"))
    encoder = nlp.get_pipe("encoder")
    rows = encoder_rows(encoder.encoder.model)
    with nlp.select_pipes(disable=["textcat"]):
        docs = list(nlp.pipe(TEXTS[1:3]))
    assert sum(rows) == 2 and not encoder._encoded and docs[0].cats == {}
    with nlp.select_pipes(disable=["ner", "textcat"]):
        list(nlp.pipe(TEXTS[1:3]))
    assert sum(rows) == 2  # no reader: nothing ran


def test_a_head_called_on_its_own_encodes_the_doc_itself(checkpoints):
    nlp = shared_pipeline(checkpoints["bert"], heads=("ner", "textcat"))
    want = doc_predictions(nlp(TEXTS[0]), nlp)
    doc = nlp.make_doc(TEXTS[0])
    for name in ("ner", "textcat"):
        doc = nlp.get_pipe(name)(doc)
    assert_same_predictions(doc_predictions(doc, nlp), want)


def test_adding_a_head_later_leaves_the_other_heads_outputs_bit_identical(checkpoints):
    ckpts = checkpoints["bert"]
    nlp = shared_pipeline(ckpts, heads=("ner", "textcat"))
    before = predictions(nlp)
    nlp.add_pipe("hf_qa", name="qa", config={"encoder": "encoder", "model": str(ckpts["qa"]),
                                             "questions": ["Who?"], "max_length": 24})
    nlp.get_pipe("qa").initialize()
    after = predictions(nlp)
    assert [{k: v for k, v in p.items() if k != "answers"} for p in after] == before  # ==: bit for bit
    assert any(p["answers"] for p in after)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_holds_the_encoder_once_and_loads_to_the_same_predictions(checkpoints, family, tmp_path):
    ckpts = checkpoints[family]
    nlp = shared_pipeline(ckpts)
    want = predictions(nlp)
    nlp.to_disk(tmp_path / "p")
    head_files = {task: tmp_path / "p" / task / "head" / "model.safetensors" for task in ("ner", "textcat", "qa")}
    for task, path in head_files.items():
        with safe_open(str(path), "pt") as stored, safe_open(str(ckpts[task] / "model.safetensors"), "pt") as source:
            names = set(stored.keys())
            prefix = HEADS[task].from_pretrained(ckpts[task]).base_model_prefix
            assert names and all(not n.startswith(f"{prefix}.") or ".pooler." in n for n in names), names
            for name in names:  # the head's tensors are the checkpoint's
                assert torch.equal(stored.get_tensor(name), source.get_tensor(name)), name
    assert not list((tmp_path / "p").glob("*/model"))[1:]  # one model folder: the encoder's
    loaded = spacy.load(tmp_path / "p")
    assert predictions(loaded) == want  # the same weights, the same computation: bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_each_head_exports_as_the_checkpoint_it_came_from(checkpoints, family, tmp_path):
    ckpts = checkpoints[family]
    nlp = shared_pipeline(ckpts)
    for task in ("ner", "textcat", "qa"):
        folder = export_hf(nlp, task, tmp_path / task)
        exported, info = HEADS[task].from_pretrained(folder, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        original = HEADS[task].from_pretrained(ckpts[task]).state_dict()
        state = exported.state_dict()
        assert set(state) == set(original)
        assert all(torch.equal(state[k], original[k]) for k in original)


def test_served_answers_are_the_in_process_ones(checkpoints, tmp_path):
    """`sllm serve FOLDER` on a pipeline of three heads: one request asks for entities, categories and
    answers at once."""
    nlp = shared_pipeline(checkpoints["bert"])
    nlp.to_disk(tmp_path / "p")
    port = _free_port()
    env = {**os.environ, "SLLM_PROJECT_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "TMPDIR": str(tmp_path)}
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "spacy_llm_components.cli", "serve", str(tmp_path / "p"),
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rows = [{"text": TEXTS[0], "questions": ["Who opened a bakery?"]}, {"text": TEXTS[4], "questions": []}]
    try:
        wait_until_ready(url, proc)
        response = requests.post(f"{url}/invocations", json={"dataframe_records": rows}, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
    finally:
        _stop(proc)
    want = in_process_predictions(tmp_path / "p", rows)
    assert all(set(p) == {"ents", "cats", "answers"} for p in want) and want[0]["answers"]
    assert_same_predictions(served, want)


# -- bad input -----------------------------------------------------------------------------------------
def _build(ckpts, pipes):
    nlp = spacy.blank("en")
    for factory, name, config in pipes:
        nlp.add_pipe(factory, name=name, config=config)
    nlp.initialize()
    return nlp


@pytest.mark.parametrize("pipes, words", [
    ([("hf_ner", "ner", {"encoder": "enc"})], ["ner: encoder = 'enc'", "no component of that name", "add an hf_encoder"]),
    ([("hf_ner", "ner", {"encoder": "enc"}), ("hf_encoder", "enc", {})], ["comes after 'ner'", "put the encoder first"]),
    ([("hf_encoder", "enc", {}), ("hf_ner", "ner1", {"encoder": "enc"}), ("hf_ner", "ner2", {"encoder": "enc"})],
     ["ner2 and ner1 both read the encoder 'enc' and write doc.ents", "spans_key"]),
    ([("hf_encoder", "enc", {}), ("hf_textcat", "a", {"encoder": "enc", "labels": ["x", "y"]}),
      ("hf_textcat", "b", {"encoder": "enc", "labels": ["y", "z"]})], ["b and a", "doc.cats['y']"]),
])
def test_a_pipeline_that_cannot_share_is_refused_when_built(checkpoints, pipes, words):
    ckpts = checkpoints["bert"]
    for _, _, config in pipes:
        config.setdefault("model", str(ckpts["ner"])) if "encoder" not in config else None
        if "labels" not in config and "encoder" in config:
            config["labels"] = ["PER", "LOC"]
    with pytest.raises(ValueError) as err:
        _build(ckpts, pipes)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_head_trained_on_other_encoder_weights_is_refused(checkpoints):
    ckpts = checkpoints["bert"]
    with pytest.raises(CheckpointError, match="its encoder weights differ from the shared encoder 'encoder'"):
        _build(ckpts, [("hf_encoder", "encoder", {"model": str(ckpts["ner"])}),
                       ("hf_ner", "ner", {"encoder": "encoder", "model": str(ckpts["other"])})])


def test_a_shared_head_cannot_be_quantized_alone(checkpoints):
    with pytest.raises(ValueError, match="ner: a head on the shared encoder 'encoder' runs in PyTorch"):
        _build(checkpoints["bert"], [("hf_encoder", "encoder", {}),
                                     ("hf_ner", "ner", {"encoder": "encoder", "quantize": "int8"})])


@pytest.mark.parametrize("missing, words", [("ner/head", "ner: no head folder at"),
                                            ("encoder/model", "encoder: no encoder folder at")])
def test_a_folder_missing_a_part_fails_to_load_naming_it(checkpoints, tmp_path, missing, words):
    import shutil

    shared_pipeline(checkpoints["bert"], heads=("ner", "textcat")).to_disk(tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / missing)
    with pytest.raises(FileNotFoundError, match=words):
        spacy.load(tmp_path / "p")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ner-textcat", "ner-textcat-qa"])
def test_spacy_assemble_the_shared_configs_on_the_real_minilm(tmp_path, name):
    from conftest import minilm_path
    from safetensors.numpy import load_file

    bin_dir = Path(sys.executable).parent
    out = tmp_path / name
    subprocess.run([str(bin_dir / "spacy"), "assemble", str(ROOT / "pipelines" / f"{name}.cfg"), str(out)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    nlp = spacy.load(out)
    doc = nlp.make_doc("Angela Merkel visited Paris. It rained.")
    doc._.questions = ["Who visited Paris?"]
    doc = nlp(doc)
    assert nlp.get_pipe("ner").labels == ["PER", "LOC", "ORG", "MISC"]
    assert all(e.label_ in {"PER", "LOC", "ORG", "MISC"} for e in doc.ents)
    assert set(doc.cats) == {"negative", "positive"} and sum(doc.cats.values()) == pytest.approx(1.0)
    assert [s._.question for s in doc.spans.get("answers", [])] == (["Who visited Paris?"] if "qa" in name else [])
    # one encoder in the folder, MiniLM's weights unchanged; the heads hold only their own layers
    minilm = load_file(str(minilm_path() / "model.safetensors"))
    saved = load_file(str(out / "encoder" / "model" / "model.safetensors"))
    assert all(np.array_equal(saved[k], minilm[k]) for k in saved) and len(saved) >= len(minilm) - 3
    heads = {p.parent.parent.name: set(load_file(str(p))) for p in out.glob("*/head/model.safetensors")}
    assert heads == {"ner": {"classifier.weight", "classifier.bias"},
                     "textcat": {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                 "bert.pooler.dense.bias"},
                     **({"qa": {"qa_outputs.weight", "qa_outputs.bias"}} if "qa" in name else {})}


def test_int8_of_a_shared_pipeline_quantizes_the_encoder_once_for_every_head(checkpoints, tmp_path):
    """`sllm quantize` (quantized_copy) of a shared pipeline: the encoder runs int8, exactly torch's dynamic
    quantization (one scale per channel) of the checkpoint's own encoder; every head reads it, QA's own
    pass too; the folder keeps the float32 weights."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from spacy_llm_components.stages.compress import quantized_copy

    ckpts = checkpoints["bert"]
    shared_pipeline(ckpts).to_disk(tmp_path / "fp32")
    quantized_copy(tmp_path / "fp32", tmp_path / "int8")
    nlp = spacy.load(tmp_path / "int8")
    encoder = nlp.get_pipe("encoder")
    assert nlp.config["components"]["encoder"]["quantize"] == "int8"
    assert nlp.get_pipe("qa")._model.encoder is encoder.runner  # QA's pass runs the int8 encoder
    raw = HEADS["base"].from_pretrained(ckpts["ner"]).eval()
    reference = quantize_dynamic(copy.deepcopy(raw), {torch.nn.Linear: per_channel_dynamic_qconfig})
    doc = nlp.make_doc(TEXTS[1])
    encoder.encode([doc], needed=True)
    (key, got), = encoder._encoded[doc].rows.items()
    ids = encoder.specials.single(encoder._backend.encode(TEXTS[1], add_special_tokens=False).ids).input_ids
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).last_hidden_state[0]
        full = raw(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, full, atol=1e-4)
    with safe_open(str(tmp_path / "int8" / "encoder" / "model" / "model.safetensors"), "pt") as stored:
        assert all(torch.equal(stored.get_tensor(k), v) for k, v in raw.state_dict().items() if k in stored.keys())
    assert predictions(nlp)  # every head runs on it

"""Checkpoint loading: what works, and the error every bad checkpoint gets."""

import json
import shutil

import pytest
import torch

from spacy_llm_components.models.checkpoint import CheckpointError
from spacy_llm_components.models.devices import resolve_device, resolve_dtype
from spacy_llm_components.models.task_model import load_task_checkpoint as load_checkpoint
from spacy_llm_components.models.task_model import save_task_checkpoint as save_checkpoint


def test_loads_head_labels_and_limits(ckpts):
    ck = load_checkpoint(ckpts["ner"], "token", device="cpu")
    assert ck.id2label[:3] == ["O", "B-PER", "I-PER"]
    assert ck.max_length == 64 and not ck.head_is_new and ck.tokenizer.is_fast


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does-not-exist.*does not exist"):
        load_checkpoint(tmp_path / "does-not-exist", "token")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path, "token")


def test_pickle_weights_are_refused(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["ner"], tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(CheckpointError, match="only safetensors.*pytorch_model.bin"):
        load_checkpoint(folder, "token")


def test_corrupt_weights_name_the_path(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["ner"], tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=f"{folder}.*cannot load the model weights"):
        load_checkpoint(folder, "token")


def test_corrupt_config_names_the_path(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["ner"], tmp_path / "badcfg")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="badcfg.*config"):
        load_checkpoint(folder, "token")


def test_wrong_head_type(ckpts):
    with pytest.raises(CheckpointError, match="BertForSequenceClassification head.*TokenClassification"):
        load_checkpoint(ckpts["textcat"], "token")


def test_base_encoder_needs_labels_for_a_new_head(ckpts):
    with pytest.raises(CheckpointError, match="no TokenClassification head.*labels"):
        load_checkpoint(ckpts["base"], "token")
    ck = load_checkpoint(ckpts["base"], "token", labels=["O", "B-X", "I-X"])
    assert ck.head_is_new and ck.id2label == ["O", "B-X", "I-X"]


def test_labels_that_contradict_the_head(ckpts):
    with pytest.raises(CheckpointError, match="labels to null"):
        load_checkpoint(ckpts["textcat"], "sequence", labels=["x", "y"])


def test_hub_name_without_network_is_a_clear_error():
    with pytest.raises(CheckpointError, match="some-org/no-such-model: no local folder.*hub"):
        load_checkpoint("some-org/no-such-model", "token")


def test_device_and_dtype_rules(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="float16.*CUDA"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="use 'auto'"):
        resolve_device("tpu")
    with monkeypatch.context() as m:  # on a machine without a GPU (whatever this one has)
        m.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")


def test_save_writes_a_plain_safetensors_folder(ckpts, tmp_path):
    ck = load_checkpoint(ckpts["ner"], "token", device="cpu")
    out = save_checkpoint(ck, tmp_path / "out")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["id2label"]["1"] == "B-PER"
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_a_failed_save_leaves_the_previous_checkpoint_whole(ckpts, tmp_path, monkeypatch):
    checkpoint = load_checkpoint(ckpts["textcat"], "sequence", device="cpu")
    target = save_checkpoint(checkpoint, tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def half_written(*args, **kwargs):  # the tokenizer's save fails after the weights were written
        raise OSError("disk full")

    monkeypatch.setattr(type(checkpoint.tokenizer), "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(checkpoint, tmp_path / "saved")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folder left behind

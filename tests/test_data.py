"""Readers, splits and `prepare`: happy paths, and every bad input named by file, line or record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import spacy
from hypothesis import given, settings
from hypothesis import strategies as st

from spacy_llm_components.data import DataError, ReadOptions, read_docbin
from spacy_llm_components.data.split import split_indices
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.tasks import load_docs

CONLL_4COL = """-DOCSTART- -X- -X- O

Acme NNP B-NP B-ORG
hires VBZ B-VP O
Danish JJ B-NP B-MISC
cooks NNS I-NP O
. . O O

Mira NNP B-NP B-PER
Okonkwo NNP I-NP I-PER
"""


def write(path: Path, text: str, encoding: str = "utf8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def ents(doc):
    return [(e.text, e.label_) for e in doc.ents]


# -- NER -------------------------------------------------------------------------------------------
def test_conll_four_columns_with_docstart(tmp_path, nlp):
    docs = load_docs("ner", write(tmp_path / "a.conll", CONLL_4COL), nlp).docs
    assert [d.text for d in docs] == ["Acme hires Danish cooks .", "Mira Okonkwo"]
    assert ents(docs[0]) == [("Acme", "ORG"), ("Danish", "MISC")]
    assert ents(docs[1]) == [("Mira Okonkwo", "PER")]


def test_conll_two_tab_columns_iob1(tmp_path, nlp):
    # IOB1: I- opens an entity; B- only splits two adjacent entities of one type
    text = "New\tI-LOC\nYork\tI-LOC\nBoston\tB-LOC\nrocks\tO\n\nCRLF\tI-ORG\r\n"
    docs = load_docs("ner", write(tmp_path / "a.conll", text), nlp).docs
    assert ents(docs[0]) == [("New York", "LOC"), ("Boston", "LOC")]
    assert ents(docs[1]) == [("CRLF", "ORG")]


@pytest.mark.parametrize("line,problem", [("lonely", "expected a token and a tag"), ("word X-PER", "not 'O' or PREFIX")])
def test_conll_bad_line_names_line(tmp_path, nlp, line, problem):
    path = write(tmp_path / "bad.conll", f"ok O\n\nfine O\n{line}\n")
    with pytest.raises(DataError, match=rf"bad\.conll, line 4: .*{problem}"):
        load_docs("ner", path, nlp)
    loaded = load_docs("ner", path, nlp, skip_bad=True)
    assert [d.text for d in loaded.docs] == ["ok"]  # the sentence with the bad line is dropped whole
    assert [(r.where, r.path) for r in loaded.skipped] == [("line 4", str(path))]


def test_ner_jsonl(tmp_path, nlp):
    rec = {"text": "Angela Merkel visited Paris.", "spans": [{"start": 22, "end": 27, "label": "LOC"},
                                                              {"start": 0, "end": 13, "label": "PER"}]}
    docs = load_docs("ner", write(tmp_path / "a.jsonl", json.dumps(rec) + "\n\n"), nlp).docs
    assert ents(docs[0]) == [("Angela Merkel", "PER"), ("Paris", "LOC")]


@pytest.mark.parametrize("record,problem", [
    ({"text": "Angela Merkel", "spans": [{"start": 0, "end": 9, "label": "PER"}]}, "token boundaries"),
    ({"text": "Angela Merkel", "spans": [{"start": 0, "end": 13, "label": "PER"},
                                         {"start": 7, "end": 13, "label": "PER"}]}, "overlap"),
    ({"text": "Angela", "spans": [{"start": 0, "end": 60, "label": "PER"}]}, "inside the text"),
    ({"text": "Angela", "spans": [{"start": 0, "end": 6}]}, "start, end and label"),
    ({"txt": "Angela"}, "no 'text' field"),
    ({"text": ""}, "empty"),
])
def test_ner_jsonl_bad_records(tmp_path, nlp, record, problem):
    good = json.dumps({"text": "fine", "spans": []})
    path = write(tmp_path / "a.jsonl", f"{good}\n{json.dumps(record)}\n")
    with pytest.raises(DataError, match=rf"a\.jsonl, line 2: .*{problem}"):
        load_docs("ner", path, nlp)


@pytest.mark.parametrize("name,content,task,message", [
    ("a.jsonl", b'{"text": "ok", "spans": []}\n{"text": \n', "ner", r"a\.jsonl, line 2: not valid JSON"),
    ("empty.conll", b"\n  \n", "ner", r"empty\.conll: file is empty"),
    ("empty.jsonl", b"\n\n", "textcat", r"empty\.jsonl: file is empty"),
    ("latin.conll", "ok O\n\nM\u00fcnchen B-LOC\n".encode("latin-1"), "ner",
     r"latin\.conll, line 3: not UTF-8 \(byte 0xfc at column 2\)"),
    ("latin.jsonl", '{"text": "ok", "label": "a"}\n{"text": "M\u00fcnchen", "label": "b"}\n'.encode("latin-1"),
     "textcat", r"latin\.jsonl, line 2: not UTF-8 \(byte 0xfc"),
    ("a.xlsx", b"x", "textcat", r"cannot read \.xlsx for textcat"),
])
def test_unreadable_files_name_file_and_line(tmp_path, nlp, name, content, task, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_docs(task, path, nlp)


def test_missing_file(tmp_path, nlp):
    with pytest.raises(DataError, match="file does not exist"):
        load_docs("ner", tmp_path / "nope.conll", nlp)


# -- classification --------------------------------------------------------------------------------
def test_csv_tsv_jsonl_classification(tmp_path, nlp):
    csv_path = write(tmp_path / "a.csv", 'text,category\r\n"Hello, world",greet\r\nbye now,leave\r\n')
    tsv_path = write(tmp_path / "a.tsv", 'sentence\tlabel\nit \'s "great"\t1\nawful\t0\n')
    jsonl_path = write(tmp_path / "a.jsonl", '{"text": "a", "labels": ["x", "y"]}\n{"text": "b", "labels": []}\n')
    csv = load_docs("textcat", csv_path, nlp, options=ReadOptions(label_column="category"))
    assert [d.text for d in csv.docs] == ["Hello, world", "bye now"] and [r[0] for r in csv.cat_rows] == [["greet"], ["leave"]]
    tsv = load_docs("textcat", tsv_path, nlp, options=ReadOptions(text_column="sentence"))
    assert tsv.docs[0].text == 'it \'s "great"'  # TSV: quotes are text
    multi = load_docs("textcat", jsonl_path, nlp)
    assert [r[0] for r in multi.cat_rows] == [["x", "y"], []]


def test_prepare_multilabel_csv_with_separator(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\n" + "".join(f"doc {i},{'a|b' if i % 2 else 'b'}\n" for i in range(10)))
    result = prepare("textcat", path, tmp_path / "out", options=ReadOptions(label_sep="|"))
    assert result.multi_label and result.labels == ["a", "b"]
    docs = read_docbin(result.train, spacy.blank("en").vocab) + read_docbin(result.dev, spacy.blank("en").vocab)
    assert {d.text: d.cats for d in docs}["doc 1"] == {"a": 1.0, "b": 1.0}


def test_missing_label_column_names_columns(tmp_path, nlp):
    path = write(tmp_path / "a.csv", "text,category\nhi,x\n")
    with pytest.raises(DataError, match=r"a\.csv, line 1: no column 'label' in the header \(columns: text, category\)"):
        load_docs("textcat", path, nlp)


@pytest.mark.parametrize("row,problem", [("only-one-field", "expected 2 fields"), ("hi,", "empty 'label'"),
                                         (",x", "empty 'text'")])
def test_bad_csv_rows(tmp_path, nlp, row, problem):
    path = write(tmp_path / "a.csv", f"text,label\nfine,x\n{row}\n")
    with pytest.raises(DataError, match=rf"line 3: {problem}"):
        load_docs("textcat", path, nlp)


def test_exclusive_needs_one_label(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "labels": ["x", "y"]}\n'
                 '{"text": "c", "label": "y"}\n')
    with pytest.raises(DataError, match=r"line 2: exclusive classification needs exactly one label"):
        prepare("textcat", path, tmp_path / "out", multi_label=False)


# -- QA --------------------------------------------------------------------------------------------
def squad(qas, version="1.1", context="The tower is in Paris. It is tall."):
    return json.dumps({"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]})


def test_squad_v1_and_v2(tmp_path, nlp):
    v1 = [{"id": "q1", "question": "Where is the tower?", "answers": [{"text": "Paris", "answer_start": 16}]}]
    doc = load_docs("qa", write(tmp_path / "v1.json", squad(v1)), nlp).docs[0]
    assert doc._.questions == ["Where is the tower?"]
    assert doc._.qas[0]["answers"] == [{"text": "Paris", "start": 16}]
    v2 = v1 + [{"id": "q2", "question": "Who built it?", "answers": [], "is_impossible": True}]
    doc = load_docs("qa", write(tmp_path / "v2.json", squad(v2, "v2.0")), nlp).docs[0]
    assert [qa["is_impossible"] for qa in doc._.qas] == [False, True]


def test_squad_answer_not_at_start(tmp_path, nlp):
    qas = [{"id": "abc", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 4}]}]
    with pytest.raises(DataError, match=r"record data\[0\]\.paragraphs\[0\]\.qas\[0\] \(id abc\): answer 0 'Paris' "
                                        r"is not at answer_start 4: the context there reads 'tower'"):
        load_docs("qa", write(tmp_path / "s.json", squad(qas)), nlp)


def test_squad_v1_without_answers_and_bad_json(tmp_path, nlp):
    with pytest.raises(DataError, match=r"no answers \(SQuAD v1.1 has no unanswerable"):
        load_docs("qa", write(tmp_path / "s.json", squad([{"id": "x", "question": "Q?", "answers": []}])), nlp)
    with pytest.raises(DataError, match=r"s2\.json, line 2: not valid JSON"):
        load_docs("qa", write(tmp_path / "s2.json", '{"data":\n [,]}'), nlp)


# -- splits ----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abc"), min_size=2, max_size=60), st.integers(0, 5))
def test_split_is_a_stratified_partition(strata, seed):
    train, dev = split_indices(len(strata), 0.25, seed, strata=strata)
    assert sorted(train + dev) == list(range(len(strata))) and not set(train) & set(dev)
    assert (train, dev) == split_indices(len(strata), 0.25, seed, strata=strata)
    assert 1 <= len(dev) <= max(1, round(len(strata) * 0.25))
    for label in set(strata):
        n = strata.count(label)
        in_dev = sum(strata[i] == label for i in dev)
        assert in_dev in (int(n * 0.25), int(n * 0.25) + 1) and in_dev <= max(n - 1, 1)  # proportional


def test_split_does_not_inflate_dev_with_many_small_strata():
    strata = [i % 250 for i in range(1000)]  # 250 label combinations of 4 records each
    train, dev = split_indices(1000, 0.1, 0, strata=strata)
    assert len(dev) == 100


def test_split_keeps_groups_together():
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    train, dev = split_indices(len(groups), 0.5, 1, groups=groups)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in dev})


# -- prepare ---------------------------------------------------------------------------------------
def _prepare_in_subprocess(task, src, out, hashseed):
    code = ("import sys; from spacy_llm_components.stages.prepare import prepare; "
            "prepare(sys.argv[1], sys.argv[2], sys.argv[3])")
    env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
    subprocess.run([sys.executable, "-c", code, task, str(src), str(out)], check=True, env=env)


def test_prepare_is_deterministic_across_processes(tmp_path):
    rows = "".join(f"sentence number {i} about {'cats' if i % 3 else 'dogs'},{'pos' if i % 3 else 'neg'}\n"
                   for i in range(40))
    src = write(tmp_path / "a.csv", "text,label\n" + rows)
    _prepare_in_subprocess("textcat", src, tmp_path / "one", 1)
    _prepare_in_subprocess("textcat", src, tmp_path / "two", 2)
    for name in ("train.spacy", "dev.spacy", "labels.json", "summary.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    summary = json.loads((tmp_path / "one/summary.json").read_text())
    assert summary["splits"]["dev"]["per_label"] == {"neg": 1, "pos": 3}  # stratified 10%
    assert len(summary["content_hash"]) == 64


def test_prepare_with_dev_file_and_counts(tmp_path):
    result = prepare("ner", write(tmp_path / "train.conll", CONLL_4COL), tmp_path / "out",
                     dev=write(tmp_path / "dev.conll", "Paris B-LOC\n"))
    assert result.labels == ["LOC", "MISC", "ORG", "PER"]
    assert result.summary["splits"]["train"]["per_label"] == {"MISC": 1, "ORG": 1, "PER": 1}
    assert result.summary["splits"]["dev"] == {"docs": 1, "tokens": 1, "entities": 1, "per_label": {"LOC": 1}}
    assert json.loads((tmp_path / "out/labels.json").read_text())["labels"] == result.labels
    dev_docs = read_docbin(result.dev, spacy.blank("en").vocab)
    assert ents(dev_docs[0]) == [("Paris", "LOC")]


def test_prepare_writes_nothing_on_bad_input(tmp_path):
    out = tmp_path / "out"
    good = write(tmp_path / "train.conll", CONLL_4COL)
    with pytest.raises(DataError, match=r"dev\.conll, line 2"):
        prepare("ner", good, out, dev=write(tmp_path / "dev.conll", "Paris B-LOC\nbroken\n"))
    assert not out.exists()
    prepare("ner", good, out, dev=write(tmp_path / "dev2.conll", "Paris B-LOC\n"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        prepare("ner", good, out, dev=tmp_path / "dev.conll")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier output is untouched


def test_prepare_skip_bad_reports_which(tmp_path):
    lines = [json.dumps({"text": f"text {i}", "label": "a" if i % 2 else "b"}) for i in range(10)]
    lines[3] = '{"text": 5, "label": "a"}'
    result = prepare("textcat", write(tmp_path / "a.jsonl", "\n".join(lines)), tmp_path / "out", skip_bad=True)
    assert result.summary["skipped"]["count"] == 1
    assert result.summary["skipped"]["records"][0]["where"] == "line 4"
    assert sum(result.summary["splits"][s]["docs"] for s in ("train", "dev")) == 9


def test_prepare_concatenates_squad_files_and_splits_by_article(tmp_path):
    qas = lambda i: [{"id": f"q{i}", "question": f"Where {i}?", "answers": [{"text": "Paris", "answer_start": 16}]}]  # noqa: E731
    files = [write(tmp_path / f"s{i}.json", squad(qas(i))) for i in range(4)]
    result = prepare("qa", files, tmp_path / "out", dev_fraction=0.25)
    assert result.summary["splits"]["train"]["questions"] == 3 and result.summary["splits"]["dev"]["questions"] == 1
    dev_docs = read_docbin(result.dev, spacy.blank("en").vocab)
    assert list(dev_docs[0]._.qas[0]["answers"]) == [{"text": "Paris", "start": 16}]  # user data survives the DocBin


def test_prepare_too_small_to_split(tmp_path):
    with pytest.raises(DataError, match="too few to carve a dev split"):
        prepare("ner", write(tmp_path / "a.conll", "Paris B-LOC\n"), tmp_path / "out")


def test_docbin_input_round_trip(tmp_path, nlp):
    result = prepare("ner", write(tmp_path / "train.conll", CONLL_4COL), tmp_path / "out",
                     dev=write(tmp_path / "dev.conll", "Paris B-LOC\n"))
    again = load_docs("ner", result.train, nlp).docs
    assert [ents(d) for d in again] == [[("Acme", "ORG"), ("Danish", "MISC")], [("Mira Okonkwo", "PER")]]
    with pytest.raises(DataError, match="not a readable spaCy DocBin"):
        load_docs("ner", write(tmp_path / "bad.spacy", "nope"), nlp)

"""The batched inference path against the one-sequence reference functions it replaces: the same
entities, paths, words and snapped spans, whatever the batch holds."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers import AutoTokenizer

from spacy_llm_components.components.inputs import Pieces, Rows, SpecialTokens, padded_batches
from spacy_llm_components.core.align import group_words, snap_many, snap_to_tokens
from spacy_llm_components.core.decode import (
    TagTable,
    log_softmax,
    read_entities,
    segment_means,
    tags_for_types,
    tags_to_entities,
    transitions,
    viterbi,
    viterbi_batch,
)

SCHEMES = ["IOB1", "IOB2", "BILOU", "BIOES", "IO"]


@settings(max_examples=60)
@given(st.sampled_from(SCHEMES), st.lists(st.integers(0, 12), min_size=1, max_size=6), st.data())
def test_entities_of_many_sequences_read_like_each_alone(scheme, lengths, data):
    tags = tags_for_types(["PER", "LOC"], scheme)
    seqs = [data.draw(st.lists(st.integers(0, len(tags) - 1), min_size=n, max_size=n)) for n in lengths]
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    first = np.zeros(len(flat), dtype=bool)
    offsets = np.cumsum([0] + lengths)
    first[offsets[:-1][np.array(lengths) > 0]] = True
    start, end, type_id = read_entities(flat, first, TagTable.of(tags))
    table = TagTable.of(tags)
    expected = [(s + offsets[i], e + offsets[i], label) for i, seq in enumerate(seqs)
                for s, e, label in tags_to_entities([tags[t] for t in seq])]
    assert list(zip(start.tolist(), end.tolist(), [table.types[t] for t in type_id.tolist()])) == expected


@settings(max_examples=60)
@given(st.sampled_from(["IOB1", "IOB2", "BILOU", "BIOES"]), st.lists(st.integers(0, 9), min_size=1, max_size=5),
       st.data())
def test_viterbi_over_a_batch_gives_each_sequence_its_own_path(scheme, lengths, data):
    tags = tags_for_types(["PER", "LOC"], scheme)
    trans = transitions(tags, scheme)
    width = max(lengths)
    logits = data.draw(arrays(np.float32, (len(lengths), width, len(tags)), elements=st.floats(-4, 4, width=32)))
    lp = log_softmax(logits)
    paths = viterbi_batch(lp, np.array(lengths), trans)
    for i, n in enumerate(lengths):
        assert paths[i, :n].tolist() == viterbi(lp[i, :n], trans).tolist()
        assert not paths[i, n:].any()


@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-10, 10)), st.data())
def test_segment_means_are_the_means_of_their_slices(values, data):
    n = len(values)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=8)))
    pairs = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, n)]
    starts = np.array([a for a, _ in pairs], dtype=np.int64)
    ends = np.array([b for _, b in pairs], dtype=np.int64)
    np.testing.assert_allclose(segment_means(values, starts, ends), [values[a:b].mean() for a, b in pairs])
    matrix = np.stack([values, -values], axis=1)
    np.testing.assert_allclose(segment_means(matrix, starts, ends), [matrix[a:b].mean(axis=0) for a, b in pairs])


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=12), st.data())
def test_snapping_many_spans_at_once_equals_one_at_a_time(layout, data):
    """Tokens of (length, gap) laid out in one text; random spans snap as `snap_to_tokens` snaps them."""
    starts, ends, pos = [], [], 0
    for length, gap in layout:
        starts.append(pos)
        ends.append(pos + length)
        pos += length + gap
    spans = data.draw(st.lists(st.tuples(st.integers(0, pos), st.integers(0, pos)), min_size=1, max_size=10))
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:
        return
    first, last, found = snap_many(np.array([a for a, _ in spans]), np.array([b for _, b in spans]),
                                   np.array(starts), np.array(ends))
    for (a, b), f, l, ok in zip(spans, first.tolist(), last.tolist(), found.tolist()):
        expected = snap_to_tokens((a, b), starts, ends)
        assert (ok, (f, l) if ok else None) == (expected is not None, expected)


@pytest.fixture(scope="module")
def tokenizer(ckpts):
    return AutoTokenizer.from_pretrained(ckpts["ner"])


TEXTS = ["Angela Merkel visited Paris.", "", "   ", "Schwarzenegger's co-op, U.S.-based (1996-08-30)!", "x",
         "😀 café naïve \u200b Москва"]


def test_pieces_and_words_of_many_texts_match_each_encoding(tokenizer):
    encodings = tokenizer(TEXTS, add_special_tokens=False, return_offsets_mapping=True).encodings
    pieces = Pieces.of(encodings)
    words = pieces.words()
    for i, enc in enumerate(encodings):
        a, b = pieces.bounds[i], pieces.bounds[i + 1]
        assert pieces.ids[a:b].tolist() == enc.ids
        assert list(zip(pieces.start[a:b].tolist(), pieces.end[a:b].tolist())) == [tuple(o) for o in enc.offsets]
        expected = group_words(enc.word_ids)
        got = list(zip((words.first[words.bounds[i]:words.bounds[i + 1]] - a).tolist(),
                       (words.last[words.bounds[i]:words.bounds[i + 1]] - a + 1).tolist()))
        assert got == expected


def test_padded_batches_hold_each_row_between_its_special_tokens(tokenizer):
    specials = SpecialTokens.of(tokenizer)
    pieces = Pieces.of(tokenizer(TEXTS * 3, add_special_tokens=False).encodings)
    lengths = pieces.lengths
    rows = Rows(pieces.bounds[:-1], lengths)
    seen = []
    for batch in padded_batches(pieces.ids, rows, specials, batch_size=4, pad_id=tokenizer.pad_token_id):
        assert len(batch.rows) <= 4
        for k, j in enumerate(batch.rows.tolist()):
            a = pieces.bounds[j]
            expected = specials.single_prefix + pieces.ids[a:a + lengths[j]].tolist() + specials.single_suffix
            n = len(expected)
            assert batch.input_ids[k, :n].tolist() == expected
            assert batch.attention_mask[k].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            assert (batch.input_ids[k, n:] == tokenizer.pad_token_id).all()
            seen.append(j)
        assert (batch.input_ids[batch.row, batch.col] == pieces.ids[batch.piece]).all()
    assert sorted(seen) == list(range(len(lengths)))


TEXTS = ["Alice Smith lives in Paris.", "Bob went to Berlin yesterday with Carol.", "No names here.",
         "The United Nations met in New York City on Monday.", "Dave", "Eve and Frank work at Acme Corp in Rome."]


@pytest.mark.parametrize("factory,task", [("hf_ner", "ner"), ("hf_textcat", "textcat")])
def test_tokenizing_the_next_buffer_ahead_changes_no_output_and_no_order(ckpts, nlp, monkeypatch, factory, task):
    """On a GPU the next buffer is tokenized in a thread while this one is on the model: forced on here,
    several buffers through `pipe` give each doc what it gets alone, in input order."""
    import threading

    from spacy_llm_components.components.base import HFPipe

    pipe = nlp.add_pipe(factory, config={"model": str(ckpts[task]), "device": "cpu"})
    alone = [nlp(text) for text in TEXTS]
    threads = []
    prepare = type(pipe)._prepare

    def recording(self, docs):
        threads.append(threading.current_thread().name)
        return prepare(self, docs)

    monkeypatch.setattr(HFPipe, "_run_ahead", lambda self: True)
    monkeypatch.setattr(type(pipe), "_prepare", recording)
    docs = list(nlp.pipe(TEXTS, batch_size=2))
    assert len(threads) == 3 and all(name.startswith(f"{factory}-prepare") for name in threads)
    assert [d.text for d in docs] == TEXTS
    for got, want in zip(docs, alone):
        assert [(e.start_char, e.end_char, e.label_) for e in got.ents] == \
               [(e.start_char, e.end_char, e.label_) for e in want.ents]
        assert got.cats.keys() == want.cats.keys()
        assert all(abs(got.cats[k] - want.cats[k]) < 1e-5 for k in want.cats)


def test_a_failing_buffer_tokenized_ahead_goes_to_the_error_handler(ckpts, nlp, monkeypatch):
    from spacy_llm_components.components.base import HFPipe

    pipe = nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    alone = [[(e.start_char, e.end_char, e.label_) for e in nlp(text).ents] for text in TEXTS]
    prepare = type(pipe)._prepare

    def failing(self, docs):
        if any(d.text == "Dave" for d in docs):
            raise ValueError("cannot tokenize Dave")
        return prepare(self, docs)

    monkeypatch.setattr(HFPipe, "_run_ahead", lambda self: True)
    monkeypatch.setattr(type(pipe), "_prepare", failing)
    with pytest.raises(ValueError, match="Dave"):
        list(nlp.pipe(TEXTS, batch_size=2))
    failed = []
    pipe.set_error_handler(lambda name, proc, docs, err: failed.extend(d.text for d in docs))
    docs = list(nlp.pipe(TEXTS, batch_size=2))
    assert failed == TEXTS[4:6] and [d.text for d in docs] == TEXTS
    assert [[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in docs[:4]] == alone[:4]
    assert sum(map(len, alone[:4])) > 0  # the random checkpoint does tag something

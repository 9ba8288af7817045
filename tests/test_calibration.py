"""Calibration: temperature scaling, ECE and Brier, tuned thresholds. References: the NLL minimised on a
dense grid, calibration error and Brier score computed by hand, thresholds by trying every cut, the raw
Hugging Face model's logits, and a head whose last layer is divided by T (which must score as a
temperature T does)."""

import json

import numpy as np
import pytest
import spacy
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from typer.testing import CliRunner

from spacy_llm_components.cli import app
from spacy_llm_components.components.qa import ask
from spacy_llm_components.core.calibration import (
    CalibrationError,
    best_f1_threshold,
    best_null_threshold,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    precision_recall,
    reliability,
    temperature_nll,
)
from spacy_llm_components.stages.calibrate import calibrate

GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 40001))


def _grid_minimum(logits, targets, kind):
    """The temperature of least NLL on a dense grid, the NLL written out here (not the module's)."""
    nll = []
    for chunk in np.array_split(GRID, 40):
        z = logits[None, :, :] / chunk[:, None, None]
        if kind == "softmax":
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            nll.append((lse - z[:, np.arange(len(targets)), targets]).mean(-1))
        else:
            nll.append((np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - targets[None] * z).mean((-1, -2)))
    return GRID[int(np.argmin(np.concatenate(nll)))]


def _overconfident(n=400, k=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 4
    targets = np.where(rng.random(n) < 0.6, logits.argmax(1), rng.integers(0, k, n))
    return logits, targets


def test_temperature_is_the_nll_minimum_found_on_a_grid():
    logits, targets = _overconfident()
    fitted = fit_temperature(logits, targets)
    reference = _grid_minimum(logits, targets, "softmax")
    assert 1.2 < reference < 19  # overconfident logits: softened, away from the search bounds
    assert fitted == pytest.approx(reference, rel=2e-4)
    assert temperature_nll(logits, targets, fitted) <= temperature_nll(logits, targets, reference) + 1e-12
    underconfident = logits / 10
    assert fit_temperature(underconfident, targets) == pytest.approx(fitted / 10, rel=1e-3)  # sharpened as much


def test_sigmoid_temperature_is_the_grid_minimum_too():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(300, 4)) * 3
    targets = (rng.random((300, 4)) < 1 / (1 + np.exp(-logits / 2.5))).astype(float)  # true temperature 2.5
    fitted = fit_temperature(logits, targets, "sigmoid")
    assert fitted == pytest.approx(_grid_minimum(logits, targets, "sigmoid"), rel=2e-4)
    assert 1.8 < fitted < 3.5


def test_ece_and_brier_by_hand():
    confidence = np.array([0.05, 0.10, 0.55, 0.60, 0.62, 0.95, 1.0, 0.0])
    correct = np.array([0, 1, 1, 0, 1, 1, 1, 0])
    # 3 bins of width 1/3 (low, high], 0 in the first: {0.05, 0.10, 0.0}, {0.55, 0.60, 0.62}, {0.95, 1.0}
    gaps = [abs(1 / 3 - 0.05), abs(2 / 3 - (0.55 + 0.60 + 0.62) / 3), abs(1 - 0.975)]
    expected = (3 * gaps[0] + 3 * gaps[1] + 2 * gaps[2]) / 8
    assert expected_calibration_error(confidence, correct, bins=3) == pytest.approx(expected, abs=1e-12)
    bins = reliability(confidence, correct, bins=3)
    assert bins.count.tolist() == [3, 3, 2] and bins.accuracy.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert brier_score(confidence, correct) == pytest.approx(np.mean((confidence - correct) ** 2))
    edge = reliability(np.array([1 / 3]), np.array([1]), bins=3)  # a bin's upper edge belongs to it
    assert edge.count.tolist() == [1, 0, 0]


def test_f1_threshold_is_the_best_cut():
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(60), 2)  # ties too
    gold = rng.random(60) < scores
    threshold, f1 = best_f1_threshold(scores, gold)

    def f1_at(t):
        decided = scores >= t
        tp = (decided & gold).sum()
        return 2 * tp / (decided.sum() + gold.sum())

    best = max(f1_at(t) for t in np.unique(scores))
    assert f1 == pytest.approx(best) and f1_at(threshold) == pytest.approx(best)
    with pytest.raises(CalibrationError, match="no gold positive"):
        best_f1_threshold(scores, np.zeros(60, dtype=bool))


def test_precision_curve_and_threshold_for_a_precision():
    scores = np.array([0.99, 0.95, 0.95, 0.9, 0.8, 0.7, 0.6])
    right = np.array([1, 1, 0, 1, 1, 0, 0], dtype=bool)
    curve = precision_recall(scores, right, n_gold=6)
    assert curve.thresholds.tolist() == [0.99, 0.95, 0.9, 0.8, 0.7, 0.6]
    assert curve.precision.tolist() == pytest.approx([1, 2 / 3, 3 / 4, 4 / 5, 4 / 6, 4 / 7])
    assert curve.recall.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 4 / 6, 4 / 6])
    assert curve.threshold_for(0.75) == 0.8  # the lowest threshold still at 75%: most recall
    assert curve.threshold_for(1.0) == 0.99 and curve.threshold_for(1.01) is None


def test_null_threshold_is_the_best_cut_of_squad2_scoring():
    rng = np.random.default_rng(2)
    margin = np.round(rng.normal(size=50), 1)
    impossible = rng.random(50) < 0.4
    f1 = np.where(impossible, 0.0, rng.random(50))
    threshold, best = best_null_threshold(margin, f1, impossible)

    def total(t):
        abstain = margin > t
        return np.where(abstain, impossible, np.where(impossible, 0.0, f1)).mean()

    brute = max(total(t) for t in [margin.min() - 1, *np.unique(margin)])
    assert best == pytest.approx(brute) and total(threshold) == pytest.approx(brute)
    with pytest.raises(CalibrationError, match="no unanswerable"):
        best_null_threshold(margin, f1, np.zeros(50, dtype=bool))


@pytest.mark.parametrize("logits,targets,kind,message", [
    (np.zeros((0, 2)), np.zeros(0, dtype=int), "softmax", "no predictions"),
    (np.ones((4, 2)), np.array([1, 1, 1, 1]), "softmax", "one class only"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), "softmax", "not all finite"),
    (np.ones((3, 2)), np.ones((3, 2)), "sigmoid", "one class only"),
    (np.ones((3, 2)), np.array([0, 1, 2]), "softmax", "class indices"),
])
def test_data_temperature_cannot_be_fitted_on_is_refused(logits, targets, kind, message):
    with pytest.raises(CalibrationError, match=message):
        fit_temperature(logits, targets, kind)


# -- the components apply the temperature ------------------------------------------------------------------
def _scaled_head(source, target, head: str, divide_by: float):
    """A copy of a checkpoint whose last layer (weights and bias) is divided: its logits are the source's / T."""
    cls = {"classifier": AutoModelForSequenceClassification, "qa_outputs": AutoModelForQuestionAnswering}[head]
    model = cls.from_pretrained(source)
    with torch.no_grad():
        getattr(model, head).weight /= divide_by
        getattr(model, head).bias /= divide_by
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def _sharpened(ckpts, tmp_path, name="textcat"):
    """The tiny textcat checkpoint made decisive: a random tiny encoder gives nearly the same logits for
    every text, so its last layer is scaled up and centred on the demo texts (logit gaps of a few units,
    either sign), for a temperature to matter."""
    model = AutoModelForSequenceClassification.from_pretrained(ckpts[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpts[name])
    with torch.no_grad():
        model.classifier.weight *= 1e5
        model.classifier.bias *= 1e5
        logits = model(**tokenizer(_texts(), padding=True, return_tensors="pt")).logits
        model.classifier.bias -= logits.mean(0)
    model.save_pretrained(tmp_path / f"sharp-{name}")
    tokenizer.save_pretrained(tmp_path / f"sharp-{name}")
    return tmp_path / f"sharp-{name}"


def test_textcat_temperature_divides_the_logits(ckpts, tmp_path):
    sharp = _sharpened(ckpts, tmp_path)
    hot = spacy.blank("en")
    hot.add_pipe("hf_textcat", config={"model": str(sharp), "device": "cpu", "temperature": 2.5})
    reference = spacy.blank("en")
    reference.add_pipe("hf_textcat", config={"model": str(_scaled_head(sharp, tmp_path / "div", "classifier", 2.5)),
                                              "device": "cpu"})
    plain = spacy.blank("en")
    plain.add_pipe("hf_textcat", config={"model": str(sharp), "device": "cpu"})
    long_text = " ".join(["the room was clean and the staff kind"] * 20)  # several windows, pooled
    for text in ["a quiet night", "terrible service, never again", long_text]:
        got, want, base = hot(text).cats, reference(text).cats, plain(text).cats
        assert got == pytest.approx(want, abs=2e-4)  # (float32 logits of a scaled-up layer)
        assert max(base.values()) > max(got.values()) + 1e-3  # softer than at T = 1
    hot.get_pipe("hf_textcat").max_length_cfg = 16
    reference.get_pipe("hf_textcat").max_length_cfg = 16
    assert hot(long_text).cats == pytest.approx(reference(long_text).cats, abs=2e-4)


def test_qa_temperature_divides_the_start_and_end_logits(ckpts, tmp_path):
    sharp = _scaled_head(ckpts["qa"], tmp_path / "sharp", "qa_outputs", 1 / 50)
    hot = spacy.blank("en")
    hot.add_pipe("hf_qa", config={"model": str(sharp), "device": "cpu", "temperature": 3.0, "top_k": 3})
    reference = spacy.blank("en")
    reference.add_pipe("hf_qa", config={"model": str(_scaled_head(sharp, tmp_path / "div", "qa_outputs", 3.0)),
                                        "device": "cpu", "top_k": 3})
    context = "Marta opened a bakery in Lindenfeld in 1998 and sold it to Brightwater Foods in 2011."
    got = [(s.text, s._.score) for s in ask(hot, context, ["Who opened a bakery?", "When was it sold?"])]
    want = [(s.text, s._.score) for s in ask(reference, context, ["Who opened a bakery?", "When was it sold?"])]
    assert [t for t, _ in got] == [t for t, _ in want] and len(got) == 6
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)


def test_ner_temperature_changes_entity_scores_not_entities(ckpts, tmp_path):
    sharp = tmp_path / "sharp"
    model = AutoModelForTokenClassification.from_pretrained(ckpts["ner"])
    with torch.no_grad():
        model.classifier.weight *= 30
    model.save_pretrained(sharp)
    tokenizer = AutoTokenizer.from_pretrained(ckpts["ner"])
    tokenizer.save_pretrained(sharp)
    texts = ["Ann Lee met Bo in Oslo and Rome today", "Marta Kowalczyk opened a bakery in Lindenfeld"]
    pipes = {}
    for t in (1.0, 2.0):
        nlp = spacy.blank("en")
        nlp.add_pipe("hf_ner", config={"model": str(sharp), "device": "cpu", "temperature": t})
        pipes[t] = [nlp(text) for text in texts]
    seen = 0
    for text, cold, hot in zip(texts, pipes[1.0], pipes[2.0]):
        assert [(e.start, e.end, e.label_) for e in cold.ents] == [(e.start, e.end, e.label_) for e in hot.ents]
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].numpy()
        word_ids = enc.word_ids()
        first = {w: i for i, w in reversed(list(enumerate(word_ids))) if w is not None}  # word -> first piece
        for ent in hot.ents:  # IOB2: B- on its first word, I- on the rest (words are spaCy's tokens here)
            tags = [f"B-{ent.label_}"] + [f"I-{ent.label_}"] * (len(ent) - 1)
            ids = [model.config.label2id[tag] for tag in tags]
            probs = [np.exp(logits[first[w]] / 2.0 - np.logaddexp.reduce(logits[first[w]] / 2.0))[i]
                     for w, i in zip(range(ent.start, ent.end), ids)]
            assert ent._.score == pytest.approx(float(np.mean(probs)), abs=1e-5)
            seen += 1
    assert seen >= 2


def test_ner_threshold_drops_low_scored_entities(ckpts):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu"})
    text = "Ann Lee met Bo in Oslo and Rome today with Marta Kowalczyk of Brightwater Foods"
    scores = sorted(e._.score for e in nlp(text).ents)
    assert len(scores) >= 2
    cut = (scores[0] + scores[1]) / 2
    strict = spacy.blank("en")
    strict.add_pipe("hf_ner", config={"model": str(ckpts["ner"]), "device": "cpu", "threshold": cut})
    kept = [e for e in nlp(text).ents if e._.score >= cut]
    assert [(e.start, e.end, e.label_) for e in strict(text).ents] == [(e.start, e.end, e.label_) for e in kept]
    assert len(kept) == len(scores) - 1


# -- the calibrate stage -------------------------------------------------------------------------------------
def _textcat_dev(tmp_path, nlp, texts, agree=0.75, seed=0):
    """Dev labels that agree with the model's own choice on `agree` of the docs (so a finite temperature
    fits), as JSONL."""
    rng = np.random.default_rng(seed)
    rows = []
    for text in texts:
        cats = nlp(text).cats
        best = max(cats, key=cats.get)
        other = min(cats, key=cats.get)
        rows.append({"text": text, "label": best if rng.random() < agree else other})
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _texts():
    from conftest import demo_files

    return [line.split(",")[0] for line in demo_files("textcat")[0].read_text().splitlines()[1:80]]


def test_calibrate_fits_the_raw_models_nll_and_stores_it(ckpts, tmp_path):
    sharp = _sharpened(ckpts, tmp_path)
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(sharp), "device": "cpu"})
    nlp.to_disk(tmp_path / "pipeline")
    dev, rows = _textcat_dev(tmp_path, nlp, _texts())
    # the reference: the raw Hugging Face model's logits on the dev texts, the NLL minimised on a grid
    model = AutoModelForSequenceClassification.from_pretrained(sharp).eval()
    tokenizer = AutoTokenizer.from_pretrained(sharp)
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits.numpy()
    targets = np.array([model.config.label2id[r["label"]] for r in rows])
    reference = _grid_minimum(logits.astype(np.float64), targets, "softmax")
    assert 0.1 < reference < 15

    fitted = calibrate(tmp_path / "pipeline", dev, tmp_path / "calibrated")["hf_textcat"]
    assert fitted.temperature == pytest.approx(reference, rel=1e-3)
    assert fitted.nll_after < fitted.nll_before
    # what users get: spacy.load applies it (config.cfg), meta.json records it, the report is there
    loaded = spacy.load(tmp_path / "calibrated")
    pipe = loaded.get_pipe("hf_textcat")
    assert pipe.temperature == pytest.approx(reference, rel=1e-3)
    probs = np.array([[loaded(r["text"]).cats[label] for label in pipe.labels] for r in rows[:5]])
    z = logits[:5] / fitted.temperature
    assert probs == pytest.approx(np.exp(z) / np.exp(z).sum(1, keepdims=True), abs=2e-4)
    block = json.loads((tmp_path / "calibrated" / "meta.json").read_text())["sllm"]["calibration"]
    assert block["hf_textcat"]["temperature"] == fitted.temperature and block["hf_textcat"]["dev"] == str(dev)
    # ECE before and after, as computed by hand from the predictions
    conf_before = np.exp(logits).max(1) / np.exp(logits).sum(1)
    right = logits.argmax(1) == targets
    assert fitted.before["ece"] == pytest.approx(expected_calibration_error(conf_before, right), abs=1e-3)
    report = tmp_path / "calibrated" / "calibration"
    assert (report / "reliability-hf_textcat.png").read_bytes()[:4] == b"\x89PNG"
    assert "ECE" in (report / "calibration.md").read_text()
    # calibrating again, in place, starts from the stored temperature and finds the same one
    again = calibrate(tmp_path / "calibrated", dev)["hf_textcat"]
    assert again.temperature_before == fitted.temperature and again.temperature == pytest.approx(reference, rel=1e-3)


def test_calibrate_tunes_multilabel_thresholds_for_f1(ckpts, tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(_sharpened(ckpts, tmp_path, "multilabel")), "device": "cpu"})
    nlp.to_disk(tmp_path / "pipeline")
    rng = np.random.default_rng(1)
    rows = []
    for text in _texts()[:40]:
        cats = nlp(text).cats
        rows.append({"text": text, "label": [k for k, v in cats.items() if rng.random() < v]})
    assert all(any(k in r["label"] for r in rows) for k in "abc")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fitted = calibrate(tmp_path / "pipeline", dev, tmp_path / "out")["hf_textcat"]
    thresholds = fitted.settings["thresholds"]
    loaded = spacy.load(tmp_path / "out")
    assert loaded.get_pipe("hf_textcat").cfg["thresholds"] == thresholds
    # each label's threshold gives the best F1 any cut of its calibrated probabilities gives
    probs = {k: np.array([loaded(r["text"]).cats[k] for r in rows]) for k in "abc"}
    for label in "abc":
        gold = np.array([label in r["label"] for r in rows])

        def f1(t, label=label, gold=gold):
            d = probs[label] >= t
            return 2 * (d & gold).sum() / (d.sum() + gold.sum())

        assert f1(thresholds[label]) == pytest.approx(max(f1(t) for t in np.unique(probs[label])), abs=1e-9)
    assert fitted.scores_after["cats_macro_f"] >= fitted.scores_before["cats_macro_f"] - 1e-9

    rows_without_c = [{"text": r["text"], "label": [k for k in r["label"] if k != "c"]} for r in rows]
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows_without_c))
    with pytest.raises(CalibrationError, match=r"no dev doc has the labels \['c'\]"):
        calibrate(tmp_path / "pipeline", dev, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_calibrate_ner_sets_the_threshold_for_a_precision(tiny_pipelines, tmp_path):
    from conftest import demo_files

    pipeline = tiny_pipelines["ner"]["pipeline"]
    dev = demo_files("ner")[1]
    fitted = calibrate(pipeline, dev, tmp_path / "out")["ner"]
    assert "threshold" not in fitted.settings and fitted.curve is not None
    curve = fitted.curve
    target = float(np.median(curve.precision))
    strict = calibrate(pipeline, dev, tmp_path / "strict", ner_precision=target)["ner"]
    threshold = strict.settings["threshold"]
    assert threshold == curve.threshold_for(target)
    # the stored threshold: entities of the dev data below it are gone
    loaded = spacy.load(tmp_path / "strict")
    assert loaded.get_pipe("ner").threshold == threshold
    docs = [loaded(line) for line in ("Ann Lee met Bo in Oslo", "Marta Kowalczyk opened a bakery in Lindenfeld")]
    assert all(e._.score >= threshold for d in docs for e in d.ents)
    assert (tmp_path / "strict" / "calibration" / "precision-recall-ner.png").is_file()
    assert curve.precision.max() < 1.0  # (the tiny model is wrong on its most confident entity too)
    with pytest.raises(CalibrationError, match="no entity score threshold reaches precision"):
        calibrate(pipeline, dev, tmp_path / "never", ner_precision=1.0)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("precision", [0.0, 1.5, -0.1])
def test_calibrate_refuses_a_precision_outside_0_1(tiny_pipelines, tmp_path, precision):
    from conftest import demo_files

    with pytest.raises(CalibrationError, match="lies in"):
        calibrate(tiny_pipelines["ner"]["pipeline"], demo_files("ner")[1], tmp_path / "out", ner_precision=precision)


def test_calibrate_refuses_dev_data_of_one_class(ckpts, tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_textcat", config={"model": str(ckpts["textcat"]), "device": "cpu"})
    nlp.to_disk(tmp_path / "pipeline")
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"text number {i},pos\n" for i in range(8)))
    with pytest.raises(ValueError, match="one class only"):
        calibrate(tmp_path / "pipeline", one_class, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    before = (tmp_path / "pipeline" / "config.cfg").read_text()
    with pytest.raises(ValueError, match="one class only"):
        calibrate(tmp_path / "pipeline", one_class)  # in place: the pipeline stays as it was
    assert (tmp_path / "pipeline" / "config.cfg").read_text() == before


def test_calibrate_command_and_evaluation_report(tiny_pipelines, tmp_path):
    from conftest import demo_files

    pipeline = tiny_pipelines["textcat"]["pipeline"]
    _, dev, test = demo_files("textcat")
    result = CliRunner().invoke(app, ["calibrate", str(pipeline), "--dev", str(dev), "-o", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    assert "temperature" in result.output and "ECE" in result.output
    stored = spacy.load(tmp_path / "cal").get_pipe("textcat").temperature
    assert f"temperature {stored:.4f}" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "cal"), str(test), "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["decisions"] == metrics["statistics"]["docs"] and calibration["bins"] == 15
    assert sum(b["count"] for b in calibration["reliability"]) == calibration["decisions"]
    assert (tmp_path / "eval" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Calibration" in (tmp_path / "eval" / "report.md").read_text()
    bad = CliRunner().invoke(app, ["calibrate", str(pipeline), "--dev", str(dev), "-o", str(tmp_path / "x"),
                                   "--ner-precision", "0.9"])
    assert bad.exit_code == 2 and "hf_ner" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("product", [False, True])
def test_segment_temperature_is_the_grid_minimum_of_the_entities_nll(product):
    """Mean (an entity's words) or product (an answer's start and end) of the chosen probabilities."""
    from spacy_llm_components.core.calibration import fit_segment_temperature

    rng = np.random.default_rng(4)
    n_entities, n_tags = 120, 5
    lengths = rng.integers(1, 4, n_entities)
    segment = np.repeat(np.arange(n_entities), lengths)
    logits = rng.normal(size=(len(segment), n_tags)) * 5
    chosen = logits.argmax(1)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    right = rng.random(n_entities) < (0.6 if not product else 0.3)
    fitted = fit_segment_temperature(log_probs, chosen, segment, right, product=product)

    def nll(t):  # written out: a segment's score is the mean (or product) of its rows' chosen probabilities
        p = np.exp(logits / t) / np.exp(logits / t).sum(1, keepdims=True)
        pick = np.prod if product else np.mean
        s = np.array([pick(p[segment == e, chosen[segment == e]]) for e in range(n_entities)])
        return -np.mean(np.where(right, np.log(s), np.log1p(-np.minimum(s, 1 - 1e-12))))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 3001))
    values = [nll(t) for t in grid]
    reference = grid[int(np.argmin(values))]
    assert 0.06 < reference < 19 and abs(np.log(reference)) > 0.05  # inside the range, away from 1
    assert fitted == pytest.approx(reference, rel=3e-3) and nll(fitted) <= min(values) + 1e-9
    with pytest.raises(CalibrationError, match="every scored prediction on the dev data is right"):
        fit_segment_temperature(log_probs, chosen, segment, np.ones(n_entities, dtype=bool), product=product)


def test_calibrated_ner_temperature_minimises_the_entities_nll_through_the_pipeline(ckpts, tmp_path):
    """Run the calibrated pipeline at its temperature and 10% either side: the NLL of "this entity is exactly
    a gold one" under `ent._.score` (matched by hand here) is least at the fitted temperature. The gold
    data keeps about two thirds of a decisive model's own entities, so the fit lies inside its range."""
    from conftest import demo_files

    sharp = tmp_path / "sharp"
    model = AutoModelForTokenClassification.from_pretrained(ckpts["ner"])
    with torch.no_grad():
        model.classifier.weight *= 30
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(ckpts["ner"]).save_pretrained(sharp)
    nlp = spacy.blank("en")
    nlp.add_pipe("hf_ner", config={"model": str(sharp), "device": "cpu"})
    nlp.to_disk(tmp_path / "pipeline")
    texts = [" ".join(line.split()[0] for line in block.splitlines() if line.strip())
             for block in demo_files("ner")[1].read_text().split("\n\n") if block.strip()]
    rng = np.random.default_rng(0)
    rows = [{"text": doc.text, "spans": [{"start": e.start_char, "end": e.end_char, "label": e.label_}
                                         for e in doc.ents if rng.random() < 0.65]} for doc in nlp.pipe(texts)]
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fitted = calibrate(tmp_path / "pipeline", dev, tmp_path / "out")["hf_ner"]
    assert fitted.kind == "segments" and fitted.rows > 10
    assert 1.0 < fitted.temperature < 19  # (a decisive model right on two thirds of its entities: softened)
    calibrated = spacy.load(tmp_path / "out")

    def entity_nll(temperature):
        calibrated.get_pipe("hf_ner").temperature = temperature
        scores, right = [], []
        for row, doc in zip(rows, calibrated.pipe(r["text"] for r in rows)):
            gold = {(s["start"], s["end"], s["label"]) for s in row["spans"]}
            for ent in doc.ents:
                scores.append(ent._.score)
                right.append((ent.start_char, ent.end_char, ent.label_) in gold)
        s, y = np.array(scores), np.array(right)
        assert 0 < y.sum() < len(y)
        return -np.mean(np.where(y, np.log(s), np.log(1 - s)))

    t = fitted.temperature
    at = entity_nll(t)
    assert at <= entity_nll(t * 1.1) and at <= entity_nll(t / 1.1)
    # (the fit leaves out the few entities whose words do not give their score: grown to token edges)
    assert at == pytest.approx(fitted.nll_after, rel=0.01)
    assert fitted.after["ece"] < fitted.before["ece"]


def _squad2(path, contexts):
    """A SQuAD 2.0-style file: each context with answerable questions (answers found in it) and unanswerable ones."""
    data = []
    for c, (context, answerable, impossible) in enumerate(contexts):
        qas = [{"id": f"{c}-a{i}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}],
                "is_impossible": False} for i, (q, a) in enumerate(answerable)]
        qas += [{"id": f"{c}-n{i}", "question": q, "answers": [], "is_impossible": True}
                for i, q in enumerate(impossible)]
        data.append({"title": f"t{c}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def test_calibrate_tunes_the_no_answer_threshold_to_the_best_of_every_cut(ckpts, tmp_path):
    """The tuned null threshold's dev F1, from the stored pipeline through `sllm evaluate`'s scorer, equals the
    best F1 of pipelines run at every threshold the dev margins allow (and the margins stored per question
    are the null score minus the best answer's, as answer_candidates scores them)."""
    from spacy_llm_components.stages.evaluate import evaluate

    nlp = spacy.blank("en")
    nlp.add_pipe("hf_qa", config={"model": str(_scaled_head(ckpts["qa"], tmp_path / "sharp", "qa_outputs", 1 / 40)),
                                  "device": "cpu", "handle_impossible": True})
    nlp.to_disk(tmp_path / "pipeline")
    texts = {"Marta opened a bakery in Lindenfeld in 1998 and sold it in 2011.":
             ["Who opened a bakery?", "Where was the bakery?", "Who bought the bakery?", "What did Marta bake?"],
             "The river Wend floods every spring, and the town of Brock built a wall against it.":
             ["Which river floods?", "What did Brock build?", "When was the wall finished?", "Who designed it?",
              "How high is the wall?"],
             "Lena Hartmann joined Brightwater Foods as a chemist.":
             ["Who joined Brightwater Foods?", "What is Lena's job?", "Where does Lena live?"]}
    # gold: the model's own best answer for some questions (right), another word for some (wrong), none for
    # the rest (unanswerable), so both the temperature and the no-answer threshold have something to fit
    open_answers = spacy.blank("en")
    open_answers.add_pipe("hf_qa", config={"model": nlp.get_pipe("hf_qa").model_name, "device": "cpu"})
    contexts = []
    for k, (context, questions) in enumerate(texts.items()):
        doc = open_answers(_with_questions(open_answers, context, questions))
        best = {}
        for span in doc.spans["answers"]:
            best.setdefault(span._.question, span.text)
        answerable = [(q, best[q] if (j + k) % 3 else context.split()[j]) for j, q in enumerate(questions[:2])]
        answerable += [(questions[2], best[questions[2]])] if k == 1 else []
        contexts.append((context, answerable, questions[len(answerable):]))
    dev = _squad2(tmp_path / "dev.json", contexts)
    fitted = calibrate(tmp_path / "pipeline", dev, tmp_path / "out")["hf_qa"]
    threshold = fitted.settings["null_threshold"]
    assert spacy.load(tmp_path / "out").get_pipe("hf_qa").null_threshold == threshold
    tuned = evaluate(tmp_path / "out", dev, bootstrap=None).scores["qa_f1"]
    assert fitted.scores_after["qa_f1"] == pytest.approx(tuned)

    margins = []
    for doc in spacy.load(tmp_path / "pipeline").get_pipe("hf_qa").pipe(
            [_with_questions(nlp, context, [q for q, _ in a] + n) for context, a, n in contexts]):
        margins.extend(doc.spans["answers"].attrs["null_margin"].values())
    assert len(margins) == 12
    cuts = [min(margins) - 1, *sorted(set(margins))]
    best = 0.0
    for cut in cuts:
        at = spacy.load(tmp_path / "pipeline", config={"components": {"hf_qa": {"null_threshold": cut}}})
        best = max(best, evaluate(at, dev, bootstrap=None).scores["qa_f1"])
    assert tuned == pytest.approx(best)
    plain = spacy.load(tmp_path / "pipeline")
    assert evaluate(plain, dev, bootstrap=None).scores["qa_f1"] <= tuned


def _with_questions(nlp, text, questions):
    doc = nlp.make_doc(text)
    doc._.questions = questions
    return doc


def test_calibration_reaches_the_mlflow_metrics_and_the_model_card():
    from spacy_llm_components.core.cards import model_card
    from spacy_llm_components.stages.shared.tracking import calibration_metrics

    measured = {"ece": 0.031, "brier": 0.11, "decisions": 872, "of": "each doc's probability"}
    evaluation = {"primary": "cats_score", "scores": {"cats_score": 0.85}, "statistics": {"docs": 872},
                  "calibration": measured, "test": "dev.tsv"}
    assert calibration_metrics(evaluation) == {"calibration.ece": 0.031, "calibration.brier": 0.11}
    heads = {"primary": "weighted_score", "scores": {}, "heads": {"textcat": evaluation}}
    assert calibration_metrics(heads) == {"textcat_calibration.ece": 0.031, "textcat_calibration.brier": 0.11}
    info = {"task": "textcat", "calibration": {"source": "x", "textcat": {
        "temperature": 1.25, "dev": "dev.tsv", "before": {"ece": 0.05}, "after": {"ece": 0.02}, "settings": {}}}}
    card = model_card("m", "1", info, evaluation, {})
    assert "temperature 1.25 fitted on `dev.tsv`; ECE there 0.0500 -> 0.0200" in card
    assert "ECE 0.0310, Brier 0.1100 over 872 decisions" in card

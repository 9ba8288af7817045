"""Calibrate a pipeline's heads on dev data: temperature scaling (one scalar per head, fitted by the NLL
of the head's gold decisions, `core.calibration`) and the decision thresholds that hang on its scores
(multi-label textcat: per label, for F1; NER: an entity score threshold for a precision asked for). The
calibrated pipeline is an ordinary pipeline folder: the values are settings in its config.cfg (so
`spacy.load` applies them, `to_disk` keeps them), and meta.json records how they were fitted. The
expected calibration error, Brier score and reliability diagram before and after go to `calibration/`
inside it, with the precision-recall curve of NER entities."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import spacy

from .. import artifacts
from ..components.base import HFPipe
from ..core.calibration import (
    CalibrationError,
    PrecisionRecall,
)
from ..data import ReadOptions
from ..tasks import load_docs
from ..tasks.base import ThresholdRequest
from ..tasks.ner import NER
from .shared.plots import precision_recall_png, reliability_png
from .shared.references import is_model_uri, local_pipeline, pin_model
from .shared.scoring import Evaluation, score_pipeline

CALIBRATION = "calibration"  # key of the `sllm` meta block, and the report folder inside the pipeline


@dataclass
class HeadCalibration:
    """What calibration fitted for one head, and its scores' calibration before and after."""

    head: str
    task: str
    dev: str
    kind: str  # what the temperature was fitted on: softmax or sigmoid logits, or (NER) entity scores
    rows: int  # gold decisions it was fitted on
    temperature_before: float
    temperature: float
    nll_before: float
    nll_after: float
    before: Dict[str, Any]  # calibration_summary of the scores users read, at the old temperature
    after: Dict[str, Any]
    settings: Dict[str, Any]  # what goes into the head's config: temperature, thresholds
    scores_before: Dict[str, float]
    scores_after: Dict[str, float]  # the headline scores with the new settings (thresholds change decisions)
    curve: Optional[PrecisionRecall] = None  # NER: entities' precision-recall as the score threshold falls
    evaluations: List[Evaluation] = field(default_factory=list)  # before, after (not serialized)

    def to_json(self) -> Dict[str, Any]:
        drop = ("reliability",)
        return {"head": self.head, "task": self.task, "dev": self.dev, "kind": self.kind, "rows": self.rows,
                "temperature_before": self.temperature_before, "temperature": self.temperature,
                "nll_before": self.nll_before, "nll_after": self.nll_after,
                "before": {k: v for k, v in self.before.items() if k not in drop},
                "after": {k: v for k, v in self.after.items() if k not in drop},
                "settings": self.settings, "scores_before": self.scores_before, "scores_after": self.scores_after}


def calibrate_head(nlp, head: str, dev: Union[str, Path], *, options: ReadOptions = ReadOptions(),
                   skip_bad: bool = False, batch_size: Optional[int] = None,
                   request: ThresholdRequest = ThresholdRequest()) -> HeadCalibration:
    """Fit one head's temperature (and thresholds) on `dev`; the pipeline's other heads are off while it
    is scored. `nlp` is left with the head at its old settings."""
    pipe = nlp.get_pipe(head)
    spec = pipe.spec
    loaded = load_docs(spec.name, dev, nlp, options=options, skip_bad=skip_bad)
    spec.gold_for(loaded, pipe)
    others = [name for name, p in nlp.pipeline if isinstance(p, HFPipe) and p is not pipe]
    old_temperature = pipe.temperature
    try:
        with nlp.select_pipes(disable=others):
            pipe.temperature = 1.0
            plain = score_pipeline(nlp, loaded.docs, batch_size=batch_size, component=head)
            try:
                problem = spec.temperature_problem(pipe, plain.examples())
                temperature = problem.fit()
            except CalibrationError as err:
                raise CalibrationError(f"{dev}: {head}: {err}") from err
            settings: Dict[str, Any] = {"temperature": round(temperature, 6)}
            pipe.temperature = old_temperature
            before = plain if old_temperature == 1.0 else score_pipeline(nlp, loaded.docs, batch_size=batch_size,
                                                                         component=head)
            pipe.temperature = settings["temperature"]
            after = score_pipeline(nlp, loaded.docs, batch_size=batch_size, component=head)
        if not after.calibration:
            raise CalibrationError(f"{dev}: {head} made no scored decision on the dev data")
        try:
            tuned = spec.tune_thresholds(pipe, after.examples(), request)
        except CalibrationError as err:
            raise CalibrationError(f"{dev}: {head}: {err}") from err
        settings.update(tuned.settings)
    finally:
        pipe.temperature = old_temperature
    return HeadCalibration(head, spec.name, str(dev), problem.kind, problem.decisions, old_temperature,
                           settings["temperature"], problem.nll(old_temperature), problem.nll(settings["temperature"]),
                           before.calibration, after.calibration, settings, before.scores,
                           {**after.scores, **{k: float(v) for k, v in (tuned.scores or {}).items() if k in after.scores}},
                           tuned.curve, [before, after])


def calibrate(pipeline: Union[str, Path], dev: Union[str, Path, Dict[str, Union[str, Path]]],
              output: Optional[Union[str, Path]] = None, *, options: ReadOptions = ReadOptions(),
              skip_bad: bool = False, batch_size: Optional[int] = None, tune_thresholds: bool = True,
              ner_precision: Optional[float] = None) -> Dict[str, HeadCalibration]:
    """Calibrate every hf_* head of `pipeline` (a folder or models:/ reference) on its dev file (`dev`: one
    file for a one-head pipeline, else head name -> file) and write the calibrated pipeline to `output`
    (default: the folder itself, replaced whole; nothing is written if any head fails)."""
    if ner_precision is not None and not 0.0 < ner_precision <= 1.0:
        raise CalibrationError(f"--ner-precision {ner_precision}: a precision lies in (0, 1]")
    reference = pin_model(pipeline)
    folder = local_pipeline(pipeline)
    if output is None:
        if is_model_uri(str(pipeline)):
            raise CalibrationError(f"{pipeline}: give --output for the calibrated copy of a registered model")
        output = folder
    nlp = spacy.load(folder)
    heads = [name for name, pipe in nlp.pipeline if isinstance(pipe, HFPipe)]
    if not heads:
        raise CalibrationError(f"{folder}: the pipeline has no hf_* head to calibrate")
    if ner_precision is not None and not any(nlp.get_pipe(h).spec is NER for h in heads):
        raise CalibrationError(f"--ner-precision is for hf_ner heads; the pipeline's heads are {heads}")
    files = dev if isinstance(dev, dict) else {heads[0]: dev} if len(heads) == 1 else None
    if files is None or sorted(files) != sorted(heads):
        raise CalibrationError(f"the pipeline's heads are {heads}: give one dev file for each, as HEAD=FILE")
    request = ThresholdRequest(f1=tune_thresholds, min_precision=ner_precision)
    fitted = {head: calibrate_head(nlp, head, files[head], options=options, skip_bad=skip_bad,
                                   batch_size=batch_size, request=request) for head in heads}
    calibrated = spacy.load(folder, config={"components": {h: c.settings for h, c in fitted.items()}})
    block = dict(calibrated.meta.get(artifacts.META_BLOCK) or {})
    block[CALIBRATION] = {"source": str(reference), **{h: {k: v for k, v in c.to_json().items() if k != "head"}
                                                       for h, c in fitted.items()}}
    calibrated.meta[artifacts.META_BLOCK] = block
    report = report_files(fitted)

    def fill(tmp: Path) -> None:
        artifacts.save_pipeline_copy(calibrated, folder, tmp)
        (tmp / CALIBRATION).mkdir()
        for name, data in report.items():
            (tmp / CALIBRATION / name).write_bytes(data)

    artifacts.replace_folder(output, fill)
    return fitted


def report_files(fitted: Dict[str, HeadCalibration]) -> Dict[str, bytes]:
    """calibration.json, calibration.md, and per head its reliability diagram (and NER's PR curve)."""
    files = {"calibration.json": artifacts.json_bytes({h: c.to_json() for h, c in fitted.items()})}
    lines = ["# Calibration", ""]
    for head, c in fitted.items():
        before, after = (e.reliability for e in c.evaluations)
        files[f"reliability-{head}.png"] = reliability_png(
            {f"T = {c.temperature_before:g}": before, f"T = {c.temperature:.3g}": after}, f"{head}: reliability on dev")
        lines += [f"## {head} ({c.task})", "", f"- dev data: `{c.dev}`; {c.rows:,} gold decisions ({c.kind})",
                  f"- temperature {c.temperature_before:g} -> **{c.temperature:.4f}**; NLL {c.nll_before:.4f} -> "
                  f"{c.nll_after:.4f}", f"- scores: {c.after['of']}", "",
                  "| | ECE | Brier | mean score | share right |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, s in (("before", c.before), ("after", c.after)):
            lines.append(f"| {name} | {s['ece']:.4f} | {s['brier']:.4f} | {s['mean_confidence']:.3f} | "
                         f"{s['accuracy']:.3f} |")
        lines += ["", f"![reliability](reliability-{head}.png)"]
        extra = {k: v for k, v in c.settings.items() if k != "temperature"}
        if extra:
            lines += ["", f"Thresholds set: `{extra}`; scores before -> after: "
                      + ", ".join(f"{k} {100 * c.scores_before.get(k, 0):.2f} -> {100 * v:.2f}"
                                  for k, v in c.scores_after.items() if k in c.scores_before)]
        if c.curve is not None:
            files[f"precision-recall-{head}.png"] = precision_recall_png(
                c.curve, f"{head}: entities by score threshold", c.settings.get("threshold"))
            lines += ["", f"![precision-recall](precision-recall-{head}.png)"]
        lines.append("")
    files["calibration.md"] = "\n".join(lines).encode()
    return files

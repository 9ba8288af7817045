"""The model registry: register a pipeline as a model version (with its model card), promote the
challenger when it beats the champion on the same evaluation set, and gate a compressed variant on
the points it lost. Model references resolve in `shared.references`."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..artifacts import read_json, sha256_tree
from ..core.cards import model_card
from ..tasks import task_specs
from .shared.pyfunc import pyfunc_model
from .shared.references import RegistryError, local_pipeline, version_by_alias
from .shared.scoring import compare_pipelines, score_file
from .shared.tracking import environment_tags, experiment_id, pipeline_info, use_tracking, without_checkpoints

CHAMPION, CHALLENGER = "champion", "challenger"
RULES = ("better", "significant", "no-worse")  # how promotion decides; a registered model's tag `promotion.rule`
RULE_TAG, MARGIN_TAG = "promotion.rule", "promotion.margin"
DEFAULT_MARGIN = 0.5  # points (no-worse)
MODEL_NAME = "model"  # the logged model's name inside its run


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    run_id: Optional[str]
    tags: Dict[str, str]
    created: bool  # False when this very pipeline was registered before

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def evaluation_tags(metrics: Any, task: str) -> Dict[str, str]:
    """Registry tags from an evaluation's metrics.json: the primary metric, its value, the test
    set's hash (what promotion compares on), every score and the measured speed."""
    scores = metrics.get("scores") if isinstance(metrics, dict) else None
    primary = metrics.get("primary") if isinstance(metrics, dict) else None
    if not isinstance(scores, dict) or not isinstance(primary, str) or not isinstance(scores.get(primary), (int, float)):
        raise RegistryError("the metrics JSON has no primary metric: pass the metrics.json `sllm evaluate -o` writes")
    if metrics.get("task") not in (None, task):
        raise RegistryError(f"the metrics are of a {metrics['task']} evaluation, the pipeline is {task}")
    statistics = metrics.get("statistics") or {}
    tags = {"primary_metric": primary, "primary_value": repr(float(scores[primary])),
            "eval_sha256": str(metrics.get("test_sha256") or ""), "eval_docs": str(statistics.get("docs", ""))}
    tags.update({f"metric.{k}": repr(v) for k, v in scores.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tags.update({f"speed.{k}": repr(statistics[k]) for k in ("docs_per_second", "words_per_second",
                                                               "word_pieces_per_second") if statistics.get(k)})
    tags.update({f"speed.{k}": str(statistics[k]) for k in ("device", "machine") if statistics.get(k)})
    for head, evaluation in (metrics.get("heads") or {}).items():  # several heads: each one's own primary
        tags[f"head.{head}"] = f"{head}_{evaluation['primary']}"
    return tags


def head_scores(version) -> Dict[str, tuple]:
    """{head: (its primary metric, its score)} of a version evaluated head by head ({} otherwise)."""
    out = {}
    for key, metric in version.tags.items():
        if key.startswith("head.") and f"metric.{metric}" in version.tags:
            out[key[len("head."):]] = (metric, float(version.tags[f"metric.{metric}"]))
    return out


def head_regressions(challenger, champion, max_drop: float) -> List[str]:
    """The heads the challenger has lost more than `max_drop` points on against the champion."""
    mine, theirs = head_scores(challenger), head_scores(champion)
    return [f"{head} {metric} {100 * mine[head][1]:.2f} is {100 * (score - mine[head][1]):.2f} points below the "
            f"champion's {100 * score:.2f}" for head, (metric, score) in theirs.items()
            if head in mine and 100 * (score - mine[head][1]) > max_drop + 1e-9]


def register(pipeline: Union[str, Path], name: str, *, metrics: Optional[Union[str, Path, Dict]] = None,
             experiment: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
             alias: Optional[str] = CHALLENGER) -> ModelVersionInfo:
    """Log `pipeline` as a pyfunc model and make it a new version of registered model `name`,
    tagged with its task, data hashes, the encoder it was fine-tuned from (a local one: path, content
    hash, perplexity), `tags` and (given an evaluation's metrics.json) its scores; the version gets
    `alias` (`challenger`; None for none) and a model card as its description. The same pipeline
    registered again returns its existing version (its metric tags and `tags` refreshed) instead of a
    duplicate."""
    pipeline = Path(pipeline).resolve()
    if not name or any(c in name for c in "'\"\\/@"):
        raise RegistryError(f"{name!r}: a registered model name cannot be empty or hold quotes, slashes or @")
    info = pipeline_info(pipeline)
    if isinstance(metrics, (str, Path)):
        metrics = read_json(metrics, written_by="`sllm evaluate -o FOLDER`")
    metrics = metrics or None
    eval_tags = {**(evaluation_tags(metrics, info["task"]) if metrics else {}), **(tags or {})}
    fingerprint = sha256_tree(pipeline)
    base = str(info.get("base_model") or "")
    tags = {"task": info["task"], "base_model": base,
            **({"base_model_sha256": sha256_tree(base)} if base and Path(base).is_dir() else {}),
            "train_sha256": str(info.get("train_sha256", "")), "dev_sha256": str(info.get("dev_sha256", "")),
            "pipeline_sha256": fingerprint, **{k: str(v) for k, v in (info.get("encoder") or {}).items()}, **eval_tags}
    use_tracking()
    client = MlflowClient()
    existing = _version_with_tag(client, name, "pipeline_sha256", fingerprint)
    if existing is not None:
        for key, value in eval_tags.items():
            client.set_model_version_tag(name, existing.version, key, value)
        if alias:
            client.set_registered_model_alias(name, alias, existing.version)
        all_tags = {**existing.tags, **eval_tags}
        client.update_model_version(name, existing.version, description=model_card(
            name, str(existing.version), info, metrics, all_tags, **_card_task(info)))
        return ModelVersionInfo(name, str(existing.version), existing.run_id, all_tags, False)

    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"register-{name}",
                          tags={"sllm.step": "register", **tags, **environment_tags()}) as run:
        if eval_tags:
            mlflow.log_metrics({k[len("metric."):]: float(v) for k, v in eval_tags.items() if k.startswith("metric.")})
        with without_checkpoints(pipeline) as folder:
            logged = mlflow.pyfunc.log_model(name=MODEL_NAME, **pyfunc_model(folder, info["task"]))
    version = mlflow.register_model(logged.model_uri, name, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    client.update_model_version(name, version.version, description=model_card(
        name, str(version.version), info, metrics, {**tags, **environment_tags()}, **_card_task(info)))
    return ModelVersionInfo(name, str(version.version), run.info.run_id, tags, True)


def _card_task(info: Dict[str, Any]) -> Dict[str, str]:
    """What the model card says of the pipeline's task (or its heads' tasks), from their specs."""
    specs = task_specs(info["task"])
    notes = dict.fromkeys(spec.request_note for spec in specs if spec.request_note)
    return {"task_description": "; ".join(spec.description for spec in specs), "request_note": "".join(notes)}


def version_tags(name: str, version: str) -> Dict[str, str]:
    use_tracking()
    return dict(MlflowClient().get_model_version(name, version).tags)


def set_evaluation(name: str, version: str, metrics: Union[str, Path, Dict]) -> Dict[str, str]:
    """Record an evaluation (metrics.json of `sllm evaluate -o`) on an existing version: its evaluation
    tags (primary metric, scores, test set hash, speed) are replaced by this one's."""
    if isinstance(metrics, (str, Path)):
        metrics = read_json(metrics, written_by="`sllm evaluate -o FOLDER`")
    use_tracking()
    client = MlflowClient()
    existing = client.get_model_version(name, version).tags
    tags = evaluation_tags(metrics, existing.get("task", metrics.get("task")))
    for key in existing:  # the previous evaluation's scores and speed go with it
        if key.startswith(("metric.", "speed.")) and key not in tags:
            client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return tags


def _version_with_tag(client: MlflowClient, name: str, key: str, value: str):
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    return min(found, key=lambda v: int(v.version)) if found else None


@dataclass
class PromotionDecision:
    name: str
    promoted: bool
    reason: str
    metric: Optional[str]
    challenger: Optional[str]
    challenger_score: Optional[float]
    champion: Optional[str]  # the champion before the decision (for a compressed variant: its source version)
    champion_score: Optional[float]
    run_id: Optional[str] = None
    alias: str = CHAMPION  # the alias the decision moves

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def check_rule(rule: str, margin: Optional[float]) -> float:
    """The margin (points) of a promotion rule, both checked: a rule of RULES, a margin >= 0."""
    if rule not in RULES:
        raise RegistryError(f"promotion rule {rule!r}: use one of {', '.join(RULES)}")
    margin = DEFAULT_MARGIN if margin is None else margin
    if not margin >= 0:
        raise RegistryError(f"--margin {margin}: give the points the challenger may lose, >= 0")
    return float(margin)


def promotion_rule(name: str, rule: Optional[str] = None, margin: Optional[float] = None) -> tuple:
    """(rule, margin) for the registered model: those given, else those it was last promoted with (its
    `promotion.rule` / `promotion.margin` tags), else `better`."""
    if rule is None:
        tags = MlflowClient().get_registered_model(name).tags
        rule = tags.get(RULE_TAG, "better")
        margin = float(tags[MARGIN_TAG]) if margin is None and MARGIN_TAG in tags else margin
    return rule, check_rule(rule, margin)


def promote(name: str, *, test: Optional[Union[str, Path]] = None, experiment: Optional[str] = None,
            max_head_drop: float = 0.5, rule: Optional[str] = None, margin: Optional[float] = None
            ) -> PromotionDecision:
    """Move `champion` to the `challenger` version if it is better than the champion by `rule` on the
    same evaluation set (or there is no champion):

    - `better` (the default): a higher primary metric. Scores come from the versions' evaluation tags,
      or, with `test`, from evaluating both versions on that file now. Versions evaluated head by head
      (several heads on one encoder) compare their mean, and no head may lose more than `max_head_drop`
      points against the champion's.
    - `significant`: both run on `test` and compared document by document; the paired bootstrap interval
      of the difference lies above 0.
    - `no-worse`: the same comparison; the interval's lower bound lies above -`margin` points.

    A rule given is kept as the registered model's (tags `promotion.rule`, `promotion.margin`) for the
    promotions after it. Versions are never deleted; the decision and both scores are logged as an MLflow
    run and as tags on the challenger."""
    use_tracking()
    client = MlflowClient()
    challenger = version_by_alias(name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"registered model {name!r} has no {CHALLENGER!r} version: register one with "
                            f"`sllm register PIPELINE --name {name}`")
    given = rule is not None
    rule, margin = promotion_rule(name, rule, margin)
    if rule != "better" and test is None:
        raise RegistryError(f"promotion rule {rule!r} compares the two versions document by document: pass --test "
                            "FILE to run both on it")
    decision = _promote(client, name, challenger, test, experiment, max_head_drop, rule, margin)
    if given:
        client.set_registered_model_tag(name, RULE_TAG, rule)
        client.set_registered_model_tag(name, MARGIN_TAG, repr(margin))
    return decision


def _promote(client: MlflowClient, name: str, challenger, test, experiment, max_head_drop: float, rule: str,
             margin: float) -> PromotionDecision:
    champion = version_by_alias(name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return _decide(client, name, False, "the challenger already is the champion", challenger, champion,
                       _tag_score(challenger), _tag_score(challenger), experiment)
    if champion is not None and rule != "better":
        return _paired_decision(client, name, challenger, champion, test, rule, margin, experiment)
    if test is not None:
        scores = {v.version: _evaluate_version(name, v.version, test) for v in filter(None, (challenger, champion))}
        metric = scores[challenger.version][0]
        ch_score = scores[challenger.version][1]
        cp_score = scores[champion.version][1] if champion is not None else None
    else:
        metric, ch_score = _tag_score(challenger)
        if metric is None:
            raise RegistryError(f"{name} version {challenger.version} has no evaluation: register it with "
                                f"--metrics EVAL/metrics.json, or pass --test FILE to evaluate it now")
        cp_score = None
        if champion is not None:
            cp_metric, cp_score = _tag_score(champion)
            same_set = champion.tags.get("eval_sha256") and \
                champion.tags.get("eval_sha256") == challenger.tags.get("eval_sha256")
            if cp_metric != metric or not same_set:
                raise RegistryError(
                    f"{name} versions {champion.version} (champion) and {challenger.version} (challenger) were not "
                    f"evaluated on the same set with the same metric; pass --test FILE to evaluate both on it")
    if champion is None:
        return _decide(client, name, True, "there was no champion", challenger, None, (metric, ch_score), (metric, None),
                       experiment)
    lost = head_regressions(challenger, champion, max_head_drop) if test is None else []
    if lost:
        return _decide(client, name, False, f"challenger {metric} {ch_score:.4f} vs champion {cp_score:.4f}, but head "
                       + "; head ".join(lost) + f" (allowed {max_head_drop:g})", challenger, champion,
                       (metric, ch_score), (metric, cp_score), experiment)
    if ch_score > cp_score:
        return _decide(client, name, True, f"challenger {metric} {ch_score:.4f} > champion {cp_score:.4f}",
                       challenger, champion, (metric, ch_score), (metric, cp_score), experiment)
    return _decide(client, name, False, f"challenger {metric} {ch_score:.4f} does not beat champion {cp_score:.4f}",
                   challenger, champion, (metric, ch_score), (metric, cp_score), experiment)


def paired_verdict(comparison, rule: str, margin: float, who: tuple = ("challenger", "champion's")) -> tuple:
    """(passed, reason) of a paired comparison (A the incumbent, B the candidate) by `rule`: `significant`,
    the interval of B - A above 0; `no-worse`, its lower bound above -`margin` points."""
    d, metric = comparison.primary_difference, comparison.primary
    low, high = d.interval
    said = (f"{who[0]} {metric} {100 * d.b:.2f} vs {who[1]} {100 * d.a:.2f}: difference {100 * d.difference:+.2f} "
            f"points, {100 * comparison.settings.level:g}% CI [{100 * low:+.2f}, {100 * high:+.2f}], "
            f"p = {d.p_value:.4f}")
    if rule == "significant":
        passed = low > 0
        return passed, f"{said}; {'the interval lies above 0' if passed else 'the interval reaches 0 or below'}"
    passed = 100 * low > -margin - 1e-9
    return passed, f"{said}; its lower bound is {'above' if passed else 'at or below'} -{margin:g} points (no-worse)"


def _paired_decision(client: MlflowClient, name: str, challenger, champion, test, rule: str, margin: float,
                     experiment: Optional[str]) -> PromotionDecision:
    """`significant` / `no-worse`: champion (A) and challenger (B) on the same documents of `test`."""
    comparison = compare_pipelines(local_pipeline(f"models:/{name}/{champion.version}"),
                                   local_pipeline(f"models:/{name}/{challenger.version}"), test)
    promoted, reason = paired_verdict(comparison, rule, margin)
    d = comparison.primary_difference
    return _decide(client, name, promoted, reason, challenger, champion, (comparison.primary, d.b),
                   (comparison.primary, d.a), experiment)


GATES = ("drop", "no-worse")  # how a compressed variant is gated: its point estimate, or a paired comparison


def check_gate(gate: str, test: Optional[Union[str, Path]] = None) -> str:
    if gate not in GATES:
        raise RegistryError(f"gate {gate!r}: use one of {', '.join(GATES)}")
    if gate == "no-worse" and test is None:
        raise RegistryError("gate 'no-worse' compares the variant with its source document by document: give the "
                            "test file")
    return gate


def gate_variant(name: str, version: str, alias: str, *, max_drop: float, gate: str = "drop",
                 test: Optional[Union[str, Path]] = None, experiment: Optional[str] = None) -> PromotionDecision:
    """Move `alias` (`int8`, `distilled`) to the compressed `version` if it lost at most `max_drop` points
    (percentage points: 0.5 = 0.005 of F1 or accuracy) against the version it was made from (its
    `compression.source_version` tag): by `gate` `drop`, its primary metric's point estimate, both evaluated
    on the same set; by `no-worse`, both run on `test` and compared document by document, the paired
    bootstrap interval's lower bound above -`max_drop`. `champion` and `challenger` are left alone. Logged
    like a promotion: an MLflow run and a `promotion` tag on the variant."""
    check_gate(gate, test)
    use_tracking()
    client = MlflowClient()
    variant = client.get_model_version(name, version)
    source_version = variant.tags.get("compression.source_version")
    if not source_version:
        raise RegistryError(f"{name} version {version} is no compressed variant (no compression.source_version tag)")
    source = client.get_model_version(name, source_version)
    if gate == "no-worse":
        comparison = compare_pipelines(local_pipeline(f"models:/{name}/{source_version}"),
                                       local_pipeline(f"models:/{name}/{version}"), test)
        passed, reason = paired_verdict(comparison, "no-worse", max_drop, ("variant", f"version {source_version}'s"))
        d = comparison.primary_difference
        return _decide(client, name, passed, reason, variant, source, (comparison.primary, d.b),
                       (comparison.primary, d.a), experiment, alias=alias)
    (metric, score), (source_metric, source_score) = _tag_score(variant), _tag_score(source)
    if metric is None or metric != source_metric or not variant.tags.get("eval_sha256") \
            or variant.tags.get("eval_sha256") != source.tags.get("eval_sha256"):
        raise RegistryError(f"{name} versions {version} and {source_version} were not evaluated on the same set "
                            "with the same metric: evaluate both on one test file before gating")
    drop = 100 * (source_score - score)
    passed = drop <= max_drop + 1e-9
    reason = (f"{metric} {100 * score:.2f} is {drop:.2f} points below version {source_version} "
              f"({100 * source_score:.2f}); allowed {max_drop:g}")
    return _decide(client, name, passed, reason, variant, source, (metric, score), (metric, source_score),
                   experiment, alias=alias)


def _tag_score(version) -> tuple:
    metric, value = version.tags.get("primary_metric"), version.tags.get("primary_value")
    return (metric, float(value)) if metric and value is not None else (None, None)


def _evaluate_version(name: str, version: str, test: Union[str, Path]) -> tuple:
    result = score_file(local_pipeline(f"models:/{name}/{version}"), test)[0]
    return result.primary, result.primary_score


def _decide(client: MlflowClient, name: str, promoted: bool, reason: str, challenger, champion,
            ch: tuple, cp: tuple, experiment: Optional[str], alias: str = CHAMPION) -> PromotionDecision:
    decision = PromotionDecision(name, promoted, reason, ch[0], str(challenger.version), ch[1],
                                 str(champion.version) if champion is not None else None, cp[1], alias=alias)
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"promote-{name}",
                          tags={"sllm.step": "promote", "decision": "promoted" if promoted else "kept",
                                "reason": reason, "alias": alias}) as run:
        mlflow.log_params({"model": name, "metric": decision.metric, "challenger_version": decision.challenger,
                           "champion_version": decision.champion})
        mlflow.log_metrics({k: v for k, v in (("challenger_score", decision.challenger_score),
                                               ("champion_score", decision.champion_score)) if v is not None})
    decision.run_id = run.info.run_id
    client.set_model_version_tag(name, challenger.version, "promotion",
                                 f"{'promoted' if promoted else 'not promoted'} to {alias}: {reason}")
    if promoted:
        client.set_registered_model_alias(name, alias, challenger.version)
    return decision

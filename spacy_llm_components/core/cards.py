"""Model cards: the description a registered model version shows in the MLflow UI, written from what
fine-tuning recorded in the pipeline folder and what the evaluation measured (pure: dicts in, text out)."""

from datetime import datetime, timezone
from typing import Any, Dict, Optional


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "n/a"


def _short(digest: Any) -> str:
    return f"`{str(digest)[:12]}`" if digest else "unknown"


def _ci(evaluation: Dict[str, Any], metric: Any) -> str:
    """` (95% CI low–high)` of an evaluation's metric, if it drew one."""
    drawn = evaluation.get("intervals") or {}
    bounds = (drawn.get("scores") or {}).get(metric)
    return f" ({100 * drawn['level']:g}% CI {_pct(bounds[0])}–{_pct(bounds[1])})" if bounds else ""


def model_card(name: str, version: str, info: Dict[str, Any], evaluation: Optional[Dict[str, Any]],
               tags: Dict[str, str], created: Optional[datetime] = None, *, task_description: Optional[str] = None,
               request_note: str = "") -> str:
    """Markdown for version `version` of registered model `name`. `info` is `runs.pipeline_info` (meta.json's
    `sllm` block and the fine-tune's metrics.json), `evaluation` an evaluation's metrics.json (or None);
    `task_description` and `request_note` are what the task's spec says of it."""
    created = created or datetime.now(timezone.utc)
    task = info.get("task", "?")
    labels = info.get("labels") or []
    lines = [f"# {name}, version {version}", "",
             f"- **Task**: {task_description or task}" + (f"; labels: {', '.join(labels)}" if labels else "")
             + (" (multi-label)" if info.get("multi_label") else "")]
    base = info.get("base_model")
    if base:
        lines.append(f"- **Base model**: `{base}`" + (f" (content {_short(tags['base_model_sha256'])})"
                                                       if tags.get("base_model_sha256") else ""))
    encoder = info.get("encoder") or {}  # artifacts.encoder_lineage: a local encoder, ours or not
    if encoder:
        ppl = encoder.get("encoder_perplexity")
        pretrained = (f"; pre-trained by `sllm pretrain` on corpus {_short(encoder.get('encoder_corpus_sha256'))}, "
                      f"held-out perplexity {ppl:.2f}" if isinstance(ppl, (int, float)) else "")
        lines.append(f"- **Encoder lineage**: `{encoder.get('encoder_path', '?')}` (content "
                     f"{_short(encoder.get('encoder_sha256'))}){pretrained}")
    if info.get("train_sha256"):
        sizes = (f" ({info['train_docs']:,} docs / {info['dev_docs']:,} docs)"
                 if isinstance(info.get("train_docs"), int) and isinstance(info.get("dev_docs"), int) else "")
        lines.append(f"- **Training data**: train {_short(info['train_sha256'])}, dev {_short(info.get('dev_sha256'))}"
                     f"{sizes}")
    finetune = info.get("finetune_metrics") or {}
    training = finetune.get("training") or {}
    config = info.get("config") or {}
    if training:
        lines.append(f"- **Fine-tuning**: {training.get('steps')} steps (batch {config.get('batch_size')}, lr "
                     f"{config.get('lr')}), best dev {finetune.get('primary')} {_pct((finetune.get('dev') or {}).get(finetune.get('primary')))} "
                     f"at step {finetune.get('best_step')}; {training.get('precision')} on {training.get('device')}")
    if tags.get("compression"):  # a variant the compress flow registered
        kept, score, speedup = (tags.get(f"compression.{k}") for k in ("kept_layers", "source_score", "speedup"))
        source = tags.get("compression.source_version", "?")
        lines.append(f"- **Compression**: {tags['compression']} of version {source}"
                     + (f", keeping encoder layers {kept}" if kept else "")
                     + (f" (its score {_pct(float(score))})" if score else "")
                     + (f"; {float(speedup):.2f}x its docs/s" if speedup else ""))
    distillation = info.get("distillation") or {}  # a student: `sllm distill`'s record
    if distillation:
        how = (f"into `{distillation['student_base']}` (its own tokenizer)" if distillation.get("student_base")
               else f"keeping teacher layers {distillation.get('kept_layers')}")
        lines.append(f"- **Distilled from**: `{distillation.get('teacher', '?')}`"
                     + (f" (base `{distillation['teacher_base']}`)" if distillation.get("teacher_base") else "")
                     + f" {how}; alpha {distillation.get('alpha')}, temperature {distillation.get('temperature')}")
    calibration = {h: c for h, c in (info.get("calibration") or {}).items() if isinstance(c, dict)}
    for head, c in calibration.items():  # `sllm calibrate`'s record, per head
        extra = {k: v for k, v in (c.get("settings") or {}).items() if k != "temperature"}
        lines.append(f"- **Calibration** ({head}): temperature {c.get('temperature', 1.0):.4g} fitted on `{c.get('dev')}`; "
                     f"ECE there {(c.get('before') or {}).get('ece', 0):.4f} -> {(c.get('after') or {}).get('ece', 0):.4f}"
                     + (f"; thresholds {extra}" if extra else ""))
    if evaluation:
        scores, stats = evaluation.get("scores") or {}, evaluation.get("statistics") or {}
        primary = evaluation.get("primary")
        others = ", ".join(f"{k} {_pct(v)}" for k, v in scores.items() if k != primary and not k.endswith("_desc"))
        heads = evaluation.get("heads") or {}
        if heads:  # several heads on one encoder, each evaluated on its own test set
            lines.append(f"- **Evaluation**: {len(heads)} heads, **{primary} {_pct(scores.get(primary))}** (the mean "
                         "of their primary scores)")
            for head, ev in heads.items():
                head_scores = ev.get("scores") or {}
                rest = ", ".join(f"{k} {_pct(v)}" for k, v in head_scores.items() if k != ev.get("primary"))
                lines.append(f"  - **{head}** ({ev.get('task')}) on `{ev.get('test')}` (content "
                             f"{_short(ev.get('test_sha256'))}, {(ev.get('statistics') or {}).get('docs', '?'):,} "
                             f"docs): **{ev.get('primary')} {_pct(head_scores.get(ev.get('primary')))}**"
                             f"{_ci(ev, ev.get('primary'))}; {rest}")
        else:
            lines.append(f"- **Evaluation**: `{evaluation.get('test')}` (content {_short(evaluation.get('test_sha256'))}, "
                         f"{stats.get('docs', '?'):,} docs): **{primary} {_pct(scores.get(primary))}**"
                         f"{_ci(evaluation, primary)}; {others}")
        measured = evaluation.get("calibration") or {}
        if measured:
            lines.append(f"- **Scores' calibration** on that test data: ECE {measured['ece']:.4f}, Brier "
                         f"{measured['brier']:.4f} over {measured['decisions']:,} decisions ({measured.get('of', '')})")
        if stats.get("docs_per_second"):
            lines.append(f"- **Measured speed**: {stats['docs_per_second']:,} docs/s, "
                         f"{stats.get('words_per_second', 0):,} words/s on {stats.get('machine') or stats.get('device')}")
    else:
        lines.append("- **Evaluation**: none recorded (register with `--metrics EVAL/metrics.json`)")
    lines += [f"- **Registered**: {created:%Y-%m-%d %H:%M} UTC"
              + (f" from commit `{tags['git.commit'][:12]}`" if tags.get("git.commit") else ""), "",
              "Serve it:", "", "```bash", f"sllm serve models:/{name}/{version} --port 5000",
              f"# or: mlflow models serve -m models:/{name}/{version} --env-manager local", "```", "",
              "Request: `{\"dataframe_records\": [{\"text\": \"...\"}]}`"
              + request_note]
    return "\n".join(lines) + "\n"

"""The accuracy/speed picture of one task's variants in one table and one picture: MiniLM fine-tuned
directly, MPNet-base fine-tuned directly, MPNet int8, and MiniLM distilled from the MPNet model
(`sllm distill --student-base`, float32 and int8), each run by `sllm evaluate` on the dev file in a fresh
process: dev score with its 95% bootstrap interval, docs/s (nlp.pipe over the whole dev set, the
statistics `sllm evaluate` reports), the weights' MiB on disk, and the process's peak resident memory
(`os.wait4`). The int8 copies are made here with `sllm quantize`. Variants run one after another on the
same machine; rerun it when the machine is busy (the load average is printed).

Writes OUT/pareto-TASK.md (the rows, with the machine and the command) and OUT/pareto.png (accuracy
against docs/s, one panel per task, the Pareto front drawn). Train the pipelines first, e.g. with the
commands in BENCHMARKS.md; give each as NAME=FOLDER:

    .venv/bin/python bench/bench_pareto.py --task ner --dev ../shared/data/conll2003/dev.conll \\
        minilm=M mpnet=P student=S --out /tmp/pareto
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

SLLM = str(Path(sys.executable).parent / "sllm")
LABELS = {"minilm": "MiniLM direct", "mpnet": "MPNet direct", "mpnet-int8": "MPNet int8",
          "student": "MiniLM from MPNet", "student-int8": "MiniLM from MPNet, int8"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields.get('Model name', '?').strip()} ({os.cpu_count()} cores)"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "?"


def run(args) -> dict:
    """Run a command; its seconds and peak resident MiB."""
    print("$ " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen([str(a) for a in args])
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {args}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def weights_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2 ** 20


def pareto(points):
    """Indices of the points no other point beats on both score and speed."""
    return [i for i, (s, v) in enumerate(points)
            if not any(s2 >= s and v2 >= v and (s2, v2) != (s, v) for s2, v2 in points)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="the task's name, for the table (ner, textcat)")
    parser.add_argument("--dev", required=True, type=Path)
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("pipelines", nargs="+", help="minilm=FOLDER mpnet=FOLDER student=FOLDER")
    args = parser.parse_args()
    given = dict(p.split("=", 1) for p in args.pipelines)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name in ("minilm", "mpnet", "student"):
        if name in given:
            folders[name] = Path(given[name])
            if name != "minilm":
                copy = out / f"{args.task}-{name}-int8"
                if not (copy / "config.cfg").exists():
                    run([SLLM, "quantize", given[name], "-o", copy])
                folders[f"{name}-int8"] = copy
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for name in LABELS:
        if name not in folders:
            continue
        target = out / f"eval-{args.task}-{name}"
        usage = run([SLLM, "evaluate", folders[name], args.dev, "-o", target, "--text-column", args.text_column,
                     "--no-track"])
        metrics = json.loads((target / "metrics.json").read_text())
        primary = metrics["primary"]
        low, high = ((metrics.get("intervals") or {}).get("scores") or {}).get(primary, (None, None))
        weights = folders[name] if not name.endswith("int8") else folders[name.replace("-int8", "")]
        rows.append({"variant": name, "label": LABELS[name], "primary": primary, "score": metrics["scores"][primary],
                     "low": low, "high": high, "docs_per_second": metrics["statistics"]["docs_per_second"],
                     "weights_mib": weights_mib(Path(weights)), **usage})
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    machine = cpu_name()
    base = next((r for r in rows if r["variant"] == "minilm"), rows[0])
    lines = [f"{args.task} on `{args.dev.name}`, {machine}, {time.strftime('%Y-%m-%d')}; "
             f"`{' '.join(shlex.quote(a) for a in sys.argv)}`", "",
             f"| variant | dev {base['primary']} (95% CI) | docs/s | vs MiniLM direct | weights MiB | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ci = f" ({100 * r['low']:.2f}–{100 * r['high']:.2f})" if r["low"] is not None else ""
        lines.append(f"| {r['label']} | {100 * r['score']:.2f}{ci} | {r['docs_per_second']:.1f} | "
                     f"{r['docs_per_second'] / base['docs_per_second']:.2f}x | {r['weights_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    (out / f"pareto-{args.task}.md").write_text("\n".join(lines) + "\n")
    (out / f"pareto-{args.task}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print("\n".join(lines))
    draw(out)


def draw(out: Path) -> None:
    """pareto.png from every pareto-TASK.json in `out`: score against docs/s, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = sorted(out.glob("pareto-*.json"))
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    for ax, path in zip(axes[0], tables):
        data = json.loads(path.read_text())
        rows = data["rows"]
        points = [(100 * r["score"], r["docs_per_second"]) for r in rows]
        for r, (s, v) in zip(rows, points):
            ax.scatter(v, s, s=30 + r["weights_mib"] / 2, alpha=0.7)
            ax.annotate(r["label"], (v, s), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = sorted((points[i] for i in pareto(points)), key=lambda p: p[1])
        ax.plot([v for _, v in front], [s for s, _ in front], "k--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("docs/s (log)")
        ax.set_ylabel(f"dev {rows[0]['primary']}")
        ax.set_title(f"{path.stem.split('-', 1)[1]} ({data['machine']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    print(f"wrote {out / 'pareto.png'}")


if __name__ == "__main__":
    main()

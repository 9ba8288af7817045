"""`sllm demo`: the main job end to end on the repository's demo data (demo/, written by hand for
this project): for each task, the train_pipeline flow (prepare, fine-tune on CPU, evaluate,
register, promote), then the champion served by `mlflow models serve` and asked one question.
"""

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import requests

from ..stages.registry import CHAMPION
from ..stages.serve import serve_command, serve_env
from ..stages.shared.references import version_by_alias
from ..stages.shared.tracking import project_dir, tracking_uri
from ..stages.shared.trainer import duration
from ..tasks import TASKS

DEMO_DATA = Path(__file__).resolve().parents[2] / "demo"


def run_demo(port: int = 5151, echo: Callable[[str], None] = print, *, tasks: Optional[Sequence[str]] = None,
             overrides: Optional[Dict[str, Any]] = None) -> Dict[str, dict]:
    """The demo for `tasks` (default: every task), each with its spec's demo settings (and `overrides`,
    which tests use to train a few steps only)."""
    if not DEMO_DATA.is_dir():
        raise FileNotFoundError(f"{DEMO_DATA}: the demo data is in the repository; run the demo from a clone")
    # the demo's own lines and the fine-tuning's progress bar: Prefect's INFO lines would bury them
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from ..flows.lifecycle import train_pipeline

    chosen = list(tasks or TASKS)
    results, started = {}, time.perf_counter()
    for n, task in enumerate(chosen, start=1):  # (small data: each spec's demo settings train longer than defaults)
        spec = TASKS[task]
        train, dev, test = (str(DEMO_DATA / task / name) for name in spec.demo.files)
        echo(f"\n=== {task} ({n} of {len(chosen)}): prepare, fine-tune (its progress below), evaluate, register, "
             f"promote; demo data in {DEMO_DATA / task}")
        task_start = time.perf_counter()
        result = train_pipeline(task, [train], f"demo-{task}", dev=dev, test=test,
                                finetune_config={**spec.demo.config, **(overrides or {})}, promote_if_better=True,
                                progress=True)
        left = ", ".join(chosen[n:]) or "serving the champions"
        echo(f"{result['name']} version {result['version']}: test {result['primary']} {100 * result['score']:.1f}; "
             f"{'promoted' if result['promotion']['promoted'] else 'not promoted'} ({result['promotion']['reason']}); "
             f"{champion_line(result['name'])}")
        echo(f"{task} took {duration(time.perf_counter() - task_start)}, {duration(time.perf_counter() - started)} "
             f"so far; next: {left}")
        results[task] = result

    echo("\n=== serving each champion with `mlflow models serve` and sending one request")
    servers: List[subprocess.Popen] = []
    try:
        urls = {}
        for i, task in enumerate(chosen):
            args = serve_command(f"models:/demo-{task}@champion", port=port + i)
            servers.append(subprocess.Popen(args, env=serve_env(), stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT))
            urls[task] = f"http://127.0.0.1:{port + i}"
        for server, (task, url) in zip(servers, urls.items()):
            wait_until_ready(url, server)
            body = TASKS[task].demo.request
            answer = requests.post(f"{url}/invocations", json=body, timeout=60)
            answer.raise_for_status()
            echo(f"\n{task}: models:/demo-{task}@champion at {url}/invocations")
            echo(f"  request:  {json.dumps(body, ensure_ascii=False)}")
            echo(f"  response: {json.dumps(answer.json(), ensure_ascii=False)}")
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)

    echo(f"""
=== what was recorded
MLflow runs and registered models: {tracking_uri()}
  open the MLflow UI:  .venv/bin/sllm ui mlflow    then http://127.0.0.1:5000
Prefect flow runs and artifacts: {project_dir() / '.prefect'}
  open the Prefect UI: .venv/bin/sllm ui prefect   then http://127.0.0.1:4200
Serve a champion yourself: .venv/bin/sllm serve demo-ner --port 5000""")
    return results


def champion_line(name: str) -> str:
    """What the registry holds for `name` now: its champion's version and score, read back from it."""
    champion = version_by_alias(name, CHAMPION)
    if champion is None:
        return "no champion"
    metric, value = champion.tags.get("primary_metric"), champion.tags.get("primary_value")
    score = f", {metric} {100 * float(value):.1f}" if metric and value else ""
    return f"champion: version {champion.version}{score}"


def wait_until_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll `url`/ping until the server answers; fail early if its process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the model server for {url} exited with code {server.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the model server at {url} did not answer within {timeout:.0f} s")

"""Cold start: a fresh process handling its first webhook through the app, against the same calls made bare.

Alternates, RUNS times each after one discarded warm-up pair, (a) a fresh interpreter that imports ``app`` and
handles one valid pending Job Hook through ``app.app(event, context)`` (SSM GetParameters, TransactWriteItems,
GetQueueUrl, SendMessage against moto server), and (b) a fresh interpreter that imports boto3 and makes those
four calls on plain clients. Each whole subprocess is timed, interpreter start included. Target: the median of
(a) at most TARGET_RATIO times the median of (b). Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/cold_start.py`` (or ``make bench``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _common import (
    PROJECT_DIR,
    PYTHON,
    MotoProcess,
    handler_environment,
    load_average,
    median,
    ms,
    report,
    run_benchmark,
    run_child,
    webhook_event,
)

RUNS = 11
WARMUP_PAIRS = 1
TARGET_RATIO = 1.3
TOP_IMPORTS = 8
_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_profile(env: dict[str, str]) -> tuple[list[tuple[str, float]], list[str]]:
    """``python -X importtime -c "import app"``: self time summed per top-level package (ours per module),
    and the project's own modules that were imported."""
    finished = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", "import app"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_DIR,
        check=False,
    )
    groups: dict[str, float] = defaultdict(float)
    ours: list[str] = []
    for line in finished.stderr.splitlines():
        match = _IMPORTTIME.match(line)
        if match is None:
            continue
        module = match.group(4)
        top = module.split(".")[0]
        if top in ("app", "chalicelib"):
            ours.append(module)
        groups[module if top in ("app", "chalicelib") else top] += int(match.group(1)) / 1e6
    return sorted(groups.items(), key=lambda item: item[1], reverse=True), ours


def compile_seconds(modules: list[str]) -> tuple[float, bool]:
    """Time to compile our imported modules from source, and whether .pyc files exist for them.

    Without .pyc files every cold start compiles them, in Lambda too: the bundle holds the sources and
    /var/task is read-only.
    """
    total = 0.0
    cached = True
    for module in modules:
        path = PROJECT_DIR / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PROJECT_DIR / module.replace(".", "/") / "__init__.py"
        source = path.read_text(encoding="utf-8")
        cached = cached and Path(importlib.util.cache_from_source(str(path))).exists()
        before = time.perf_counter()
        compile(source, str(path), "exec")
        total += time.perf_counter() - before
    return total, cached


def main() -> None:
    started = time.perf_counter()
    load_before = load_average()
    walls: dict[str, list[float]] = {"app": [], "bare": []}
    inner: dict[str, list[dict[str, Any]]] = {"app": [], "bare": []}
    failures: list[str] = []
    with MotoProcess() as stack:
        env = handler_environment(stack)
        target = {
            "table": stack.target.table,
            "jobs_queue": stack.target.jobs_queue,
            "token_parameter": stack.target.token_parameter,
        }
        for n in range(WARMUP_PAIRS + RUNS):
            # Alternate which goes first, so neither always follows the other's page-cache and CPU state.
            order = ("app", "bare") if n % 2 == 0 else ("bare", "app")
            for path in order:
                event = webhook_event(stack.webhook_token)
                if path == "app":
                    wall, figures = run_child("app-cold", {"event": event}, env)
                    if figures["status"] != 200 or figures["body"] != '{"queued":true}':
                        failures.append(f"run {n}: {figures['status']} {figures['body']}")
                else:
                    wall, figures = run_child("bare-cold", {"event": event, "target": target}, env)
                if n >= WARMUP_PAIRS:
                    walls[path].append(wall)
                    inner[path].append(figures)
        groups, ours = import_profile(env)
    compiling, cached = compile_seconds(ours)

    app_wall, bare_wall = median(walls["app"]), median(walls["bare"])
    ratio = app_wall / bare_wall
    app_import = median([f["import_s"] for f in inner["app"]])
    bare_import = median([f["import_s"] for f in inner["bare"]])
    app_handle = median([f["handle_s"] for f in inner["app"]])
    bare_handle = median([f["handle_s"] for f in inner["bare"]])
    start_app = median([w - f["in_process_s"] for w, f in zip(walls["app"], inner["app"], strict=True)])
    start_bare = median([w - f["in_process_s"] for w, f in zip(walls["bare"], inner["bare"], strict=True)])
    met = ratio <= TARGET_RATIO and not failures
    lines = [
        f"cold start: {RUNS} fresh processes each (after {WARMUP_PAIRS} warm-up pair), medians",
        f"  app  (import app + first webhook via app.app)  {ms(app_wall):>10}",
        f"  bare (import boto3 + same 4 AWS calls)          {ms(bare_wall):>10}",
        f"  ratio app/bare {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if met else 'MISSED'}",
        f"  import only:  app {ms(app_import)}  boto3 {ms(bare_import)}  (+{ms(app_import - bare_import)})",
        f"  first call:   app {ms(app_handle)}  bare {ms(bare_handle)}  (clients, SSM, DynamoDB, SQS)",
        f"  interpreter start and exit, outside the child's clock: app {ms(start_app)}  bare {ms(start_bare)}",
        f"  compiling app.py + {len(ours) - 1} chalicelib modules from source: {ms(compiling)}"
        + ("" if cached else " (no .pyc for them: paid by every cold start)"),
        "  import app, self time by package (python -X importtime, one run):",
        *(f"    {name:<28} {ms(seconds):>9}" for name, seconds in groups[:TOP_IMPORTS]),
    ]
    if failures:
        lines.append(f"  INVALID: {len(failures)} app runs did not queue the job: {failures[:3]}")
    load_after = load_average()
    lines.append(
        f"  ({time.perf_counter() - started:.0f} s; load average {load_before} before, {load_after} after,"
        f" {os.cpu_count()} CPUs: figures from a busy machine are not comparable)"
    )
    figures = {
        "benchmark": "cold_start",
        "runs": RUNS,
        "app_wall_ms": round(app_wall * 1000, 1),
        "bare_wall_ms": round(bare_wall * 1000, 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "app_import_ms": round(app_import * 1000, 1),
        "boto3_import_ms": round(bare_import * 1000, 1),
        "app_first_call_ms": round(app_handle * 1000, 1),
        "bare_first_call_ms": round(bare_handle * 1000, 1),
        "project_compile_ms": round(compiling * 1000, 1),
        "project_pyc_cached": cached,
        "min_ratio": round(min(walls["app"]) / min(walls["bare"]), 3),
        "load_average": [load_before, load_after],
        "valid": not failures,
        "met": met,
    }
    report(lines, figures)


if __name__ == "__main__":
    sys.exit(run_benchmark("cold_start", main))

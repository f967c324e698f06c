"""Cold start: a fresh process handling its first webhook through the app, against the same calls made bare.

Alternates, RUNS times each after one discarded warm-up pair, (a) a fresh interpreter that imports ``app`` and
handles one valid pending Job Hook through ``app.app(event, context)`` (SSM GetParameters, DynamoDB UpdateItem,
SQS GetQueueUrl and SendMessage against moto server), and (b) a fresh interpreter that imports boto3 and makes
those four calls, in that order, on plain clients (``webhook_cost.py`` checks that they are the app's calls).
Every app run must answer 200 {"queued": true}, or the run is reported invalid. Each whole subprocess is
timed, interpreter start included. Target: the median of (a) at most TARGET_RATIO times the median of (b).
Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/cold_start.py`` (or ``make bench``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    CHILD_SCRIPT,
    PROJECT_DIR,
    PYTHON,
    MotoProcess,
    footer,
    handler_environment,
    load_average,
    median,
    ms,
    report,
    run_benchmark,
    run_child,
    webhook_event,
)

RUNS = 21  # pairs: on a shared machine, eleven left the median at the mercy of a few busy moments
WARMUP_PAIRS = 1
TARGET_RATIO = 1.10
TOP_IMPORTS = 8
_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


@dataclass(frozen=True)
class ImportProfile:
    """One app-cold child run under ``python -X importtime``."""

    by_package: list[tuple[str, float]]  # import app: self time per top-level package (ours per module)
    first_call: list[tuple[str, float]]  # imported by the first webhook: cumulative time per top-level import
    ours: list[str]  # the project's modules ``import app`` loads


def import_profile(env: dict[str, str], event: dict[str, Any]) -> ImportProfile:
    finished = subprocess.run(
        [PYTHON, "-X", "importtime", str(CHILD_SCRIPT), "app-cold"],
        input=json.dumps({"event": event}) + "\n",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_DIR,
        check=False,
    )
    # (self us, cumulative us, depth, module); a module's line follows those of what it imported.
    rows = [
        (int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4))
        for m in map(_IMPORTTIME.match, finished.stderr.splitlines())
        if m is not None
    ]
    app_at = next(i for i, row in enumerate(rows) if row[2] == 1 and row[3] == "app")
    first = app_at
    while first > 0 and rows[first - 1][2] > 1:
        first -= 1
    groups: dict[str, float] = defaultdict(float)
    ours: list[str] = []
    for self_us, _, _, module in rows[first : app_at + 1]:
        top = module.split(".")[0]
        if top in ("app", "chalicelib"):
            ours.append(module)
        groups[module if top in ("app", "chalicelib") else top] += self_us / 1e6
    first_call = [(module, cumulative / 1e6) for _, cumulative, depth, module in rows[app_at + 1 :] if depth == 1]
    return ImportProfile(
        by_package=sorted(groups.items(), key=lambda item: item[1], reverse=True),
        first_call=sorted(first_call, key=lambda item: item[1], reverse=True),
        ours=ours,
    )


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
        target = stack.target.to_dict()
        for n in range(WARMUP_PAIRS + RUNS):
            # Alternate which goes first, so neither always follows the other's page-cache and CPU state.
            order = ("app", "bare") if n % 2 == 0 else ("bare", "app")
            stack.clear()
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
        stack.clear()
        profile = import_profile(env, webhook_event(stack.webhook_token))
    compiling, cached = compile_seconds(profile.ours)

    app_wall, bare_wall = median(walls["app"]), median(walls["bare"])
    ratio = app_wall / bare_wall
    app_import = median([f["import_s"] for f in inner["app"]])
    bare_import = median([f["import_s"] for f in inner["bare"]])
    app_handle = median([f["handle_s"] for f in inner["app"]])
    bare_handle = median([f["handle_s"] for f in inner["bare"]])
    start_app = median([f["startup_s"] for f in inner["app"]])
    start_bare = median([f["startup_s"] for f in inner["bare"]])
    exit_app = median([f["exit_s"] for f in inner["app"]])
    exit_bare = median([f["exit_s"] for f in inner["bare"]])
    # Lambda freezes a finished invocation rather than ending the interpreter: spawn to response is its part.
    app_response = median([w - f["exit_s"] for w, f in zip(walls["app"], inner["app"], strict=True)])
    bare_response = median([w - f["exit_s"] for w, f in zip(walls["bare"], inner["bare"], strict=True)])
    met = ratio <= TARGET_RATIO and not failures
    lines = [
        f"cold start: {RUNS} fresh processes each (after {WARMUP_PAIRS} warm-up pair), medians",
        f"  app  (import app + first webhook via app.app)  {ms(app_wall):>10}",
        f"  bare (import boto3 + same 4 AWS calls)          {ms(bare_wall):>10}",
        f"  ratio app/bare {ratio:.2f} (target <= {TARGET_RATIO}): {'met' if met else 'MISSED'}",
        f'  app runs answered 200 {{"queued": true}}: {WARMUP_PAIRS + RUNS - len(failures)}'
        f" of {WARMUP_PAIRS + RUNS} (warm-up included)",
        f"  spawn to first response (no exit): app {ms(app_response)}  bare {ms(bare_response)}"
        f"  ratio {app_response / bare_response:.2f}",
        f"  import only:  app {ms(app_import)}  boto3 {ms(bare_import)}  (+{ms(app_import - bare_import)})",
        f"  first call:   app {ms(app_handle)}  bare {ms(bare_handle)}  (clients, SSM, DynamoDB, SQS)",
        f"  interpreter start-up:  app {ms(start_app)}  bare {ms(start_bare)}",
        f"  interpreter exit:      app {ms(exit_app)}  bare {ms(exit_bare)}  (module teardown; Lambda freezes instead)",
        f"  compiling app.py + {len(profile.ours) - 1} chalicelib modules from source: {ms(compiling)}"
        + ("" if cached else " (no .pyc for them: paid by every cold start)"),
        "  one run under python -X importtime (inflates times):",
        "    import app, self time by package:",
        *(f"      {name:<28} {ms(seconds):>9}" for name, seconds in profile.by_package[:TOP_IMPORTS]),
        "    imported by the first webhook, cumulative:",
        *(f"      {name:<28} {ms(seconds):>9}" for name, seconds in profile.first_call[:TOP_IMPORTS]),
    ]
    if failures:
        lines.append(f"  INVALID: {len(failures)} app runs did not queue the job: {failures[:3]}")
    lines.append(footer(started, load_before))
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
        "response_ratio": round(app_response / bare_response, 3),
        "app_exit_ms": round(exit_app * 1000, 1),
        "bare_exit_ms": round(exit_bare * 1000, 1),
        "project_compile_ms": round(compiling * 1000, 1),
        "project_pyc_cached": cached,
        "min_ratio": round(min(walls["app"]) / min(walls["bare"]), 3),
        "load_average": [load_before, load_average()],
        "valid": not failures,
        "met": met,
    }
    report(lines, figures)


if __name__ == "__main__":
    sys.exit(run_benchmark("cold_start", main))

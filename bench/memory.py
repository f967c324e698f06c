"""Memory of a warm webhook process: resident set size over WEBHOOKS webhooks, against a bare boto3 process.

This process imports ``app`` and handles WEBHOOKS valid pending Job Hooks for distinct jobs through
``app.app(event, context)``, reading VmRSS after the EARLY-th and the last. Targets: RSS under TARGET_RSS_MIB and
growth between the two under TARGET_GROWTH_MIB. moto runs in another process, so only the handler's memory is
counted. The baseline is a fresh process that imports boto3 and makes the same AWS calls bare, read at the same
points. Reports, never fails: exit status 0 whatever the figures.

Run: ``.venv/bin/python bench/memory.py`` (or ``make bench``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from _child import LambdaContext, rss_mib, vary
from _common import (
    CHILD_SCRIPT,
    PROJECT_DIR,
    PYTHON,
    LocalStack,
    MotoProcess,
    child_result,
    footer,
    handler_environment,
    load_average,
    queued,
    quiet_stdout,
    report,
    run_benchmark,
    use_handler_environment,
    webhook_event,
)

WEBHOOKS = 1000
EARLY = 100
MARKS = (1, EARLY, WEBHOOKS)
CLEAR_EVERY = 50  # webhooks between emptying the table and the queue (see LocalStack.clear)
TARGET_RSS_MIB = 160.0
TARGET_GROWTH_MIB = 5.0
FIRST_JOB_ID = 100_000


def run_bare_baseline(stack: LocalStack, job: dict[str, Any]) -> dict[str, Any]:
    """The bare-memory child, whose requests to empty the table and queue this process carries out."""
    with tempfile.TemporaryFile(mode="w+") as errors:
        child = subprocess.Popen(
            [PYTHON, str(CHILD_SCRIPT), "bare-memory"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=handler_environment(stack),
            cwd=PROJECT_DIR,
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(job) + "\n")
        child.stdin.flush()
        for request in child.stdout:
            if request.strip() == "clear":
                stack.clear()
                child.stdin.write("ok\n")
                child.stdin.flush()
        child.stdin.close()
        returncode = child.wait()
        errors.seek(0)
        return child_result("bare-memory", returncode, errors.read())


def main() -> None:
    started, load_before = time.perf_counter(), load_average()
    rss_start = rss_mib()
    rss_at: dict[int, float] = {}
    valid = True
    with MotoProcess() as stack:
        template = webhook_event(stack.webhook_token)
        with quiet_stdout():
            use_handler_environment(stack)
            import app

            rss_imported = rss_mib()
            for n in range(1, WEBHOOKS + 1):
                if n % CLEAR_EVERY == 0:
                    stack.clear()
                response = app.app(vary(template, FIRST_JOB_ID + n), LambdaContext())
                valid = valid and queued(response)
                if n in MARKS:
                    rss_at[n] = rss_mib()
        job: dict[str, Any] = {
            "target": stack.target.to_dict(),
            "template": template,
            "count": WEBHOOKS,
            "first_job_id": FIRST_JOB_ID + 2 * WEBHOOKS,
            "marks": list(MARKS),
            "clear_every": CLEAR_EVERY,
        }
        baseline = run_bare_baseline(stack, job)
    bare_at = {int(k): v for k, v in baseline["rss_at"].items()}

    rss_last = rss_at[WEBHOOKS]
    growth = rss_last - rss_at[EARLY]
    bare_growth = bare_at[WEBHOOKS] - bare_at[EARLY]
    rss_met = rss_last < TARGET_RSS_MIB
    growth_met = growth < TARGET_GROWTH_MIB
    lines = [
        f"memory: VmRSS over {WEBHOOKS} webhooks in one process (moto in another), MiB",
        f"  {'':<32}{'app':>9}{'bare':>9}",
        f"  {'interpreter + harness':<32}{rss_start:>9.1f}{baseline['rss_start_mib']:>9.1f}",
        f"  {'after import (app / boto3)':<32}{rss_imported:>9.1f}{baseline['rss_imported_mib']:>9.1f}",
        *(f"  {f'after webhook {n}':<32}{rss_at[n]:>9.1f}{bare_at[n]:>9.1f}" for n in MARKS),
        f"  {f'growth {EARLY} -> {WEBHOOKS}':<32}{growth:>9.1f}{bare_growth:>9.1f}",
        f"  RSS after {WEBHOOKS}: {rss_last:.1f} MiB (target < {TARGET_RSS_MIB:.0f}): {_verdict(rss_met)};"
        f" growth {growth:+.1f} MiB (target < {TARGET_GROWTH_MIB:.0f}): {_verdict(growth_met)}",
        f"  app over bare after {WEBHOOKS}: {rss_last - bare_at[WEBHOOKS]:+.1f} MiB",
    ]
    if not valid:
        lines.append("  INVALID: some webhooks were not answered 200 {'queued': true}")
    lines.append(footer(started, load_before))
    figures = {
        "benchmark": "memory",
        "webhooks": WEBHOOKS,
        "rss_after_import_mib": round(rss_imported, 1),
        f"rss_after_{EARLY}_mib": round(rss_at[EARLY], 1),
        f"rss_after_{WEBHOOKS}_mib": round(rss_last, 1),
        "growth_mib": round(growth, 2),
        f"bare_rss_after_{WEBHOOKS}_mib": round(bare_at[WEBHOOKS], 1),
        "bare_growth_mib": round(bare_growth, 2),
        "target_rss_mib": TARGET_RSS_MIB,
        "target_growth_mib": TARGET_GROWTH_MIB,
        "rss_met": rss_met,
        "growth_met": growth_met,
        "load_average": [load_before, load_average()],
        "valid": valid,
        "met": rss_met and growth_met and valid,
    }
    report(lines, figures)


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


if __name__ == "__main__":
    sys.exit(run_benchmark("memory", main))

"""The demo scenario, run the way a user runs it (``fleetctl sandbox demo``), judged by its summary line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_launches_one_spot_runner_per_runnable_job_and_says_ok() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_FLEET_", "GITLAB_"))}
    result = subprocess.run(
        [sys.executable, "-m", "fleetctl.cli", "sandbox", "demo", "--jobs", "8"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    # 8 runnable jobs (tags cycle docker+linux, docker+dind, untagged, docker) and one gpu job no pool runs
    assert summary["pipeline_jobs"] == 9
    assert summary["jobs_launched"] == 8
    assert summary["jobs_unmatched"] == 1
    assert summary["instances_by_pool"] == {"build": 2, "docker": 6}
    assert summary["instances_by_lifecycle"] == {"spot": 8}
    assert summary["gitlab_runners"] == 8
    # created + pending for every job, all answered 200
    assert summary["webhooks_by_status"] == {"200": 18}

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
def test_demo_runs_a_pipeline_to_success_on_runners_that_leave_nothing_behind() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_FLEET_", "GITLAB_"))}
    result = subprocess.run(
        [sys.executable, "-m", "fleetctl.cli", "sandbox", "demo"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True, result.stdout[-3000:]
    # 6 runnable jobs in two stages (2 docker-in-docker on the ephemeral build pool, 4 on docker) and a gpu job
    assert summary["pipeline_jobs"] == 7
    assert summary["jobs_succeeded"] == 6
    assert summary["jobs_unmatched"] == 1
    # one instance per docker-in-docker job; the test stage's docker jobs find the build stage's runners idle
    assert summary["instances_by_pool"]["build"] == 2
    assert summary["instances_by_pool"]["docker"] < 4
    assert summary["instances_terminated"] == summary["instances_launched"]
    assert summary["instances_by_lifecycle"] == {"spot": summary["instances_launched"]}
    assert summary["left_behind"] == {"live_instances": 0, "leases": 0, "gitlab_runners": 0, "tokens": 0}
    assert summary["invariant_violations"] == []
    # the pipeline's 6, then the image story's: one on the old image, one on the new
    assert summary["agents"]["jobs"] == {"success": 8}
    image = summary["image_rotation"]
    assert image["refused_digest"] is not None
    assert image["old_image_job"] != image["new_image_job"]
    # created, pending, running and success for every runnable job (the image story's two included), created and
    # pending for the gpu job
    assert summary["webhooks_by_status"] == {"200": 34}
    # every pool that launched reported how long its instances took to boot and its jobs waited
    assert set(summary["median_BootSeconds"]) == {"build", "docker"}
    assert set(summary["median_QueueWaitSeconds"]) == {"build", "docker"}

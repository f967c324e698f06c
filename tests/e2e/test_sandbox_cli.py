"""``fleetctl sandbox up --detach`` / ``status`` / ``sandbox pipeline`` / ``sandbox down``, driven as a user would.

Each command runs in a subprocess of its own from the project directory, with none of the test process's AWS,
runner-fleet or GitLab settings: everything the later commands need comes from the export lines ``up`` prints.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.payloads import gitlab_headers, job_hook, next_job_id

PROJECT_DIR = Path(__file__).resolve().parents[2]
SANDBOX_DIR = PROJECT_DIR / ".sandbox"
STATE_FILE = SANDBOX_DIR / "state.json"
LOG_FILE = SANDBOX_DIR / "sandbox.log"
REQUIRED_EXPORTS = {
    "RUNNER_FLEET_WEBHOOK_URL",
    "RUNNER_FLEET_WEBHOOK_SECRET",
    "AWS_ENDPOINT_URL",
    "GITLAB_URL",
    "GITLAB_TOKEN",
    "RUNNER_FLEET_CONFIG",
}
POOL_KEYS = {"name", "tags", "max_runners", "runners", "leases", "image_digest"}
LOCAL_AWS_MODULE = "fleetctl.sandbox.local_aws"


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RUNNER_FLEET_", "GITLAB_"))}


def _fleetctl(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetctl.cli", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _log_tail(chars: int = 4000) -> str:
    try:
        text = LOG_FILE.read_text(errors="replace")
    except FileNotFoundError:
        return "(no sandbox log)"
    return f"\n--- {LOG_FILE} (tail) ---\n{text[-chars:]}"


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}{_log_tail()}"


def _parse_exports(stdout: str) -> dict[str, str]:
    exports: dict[str, str] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        words = shlex.split(line)
        assert len(words) == 2 and words[0] == "export", f"not an export line: {line!r}"
        name, sep, value = words[1].partition("=")
        assert sep, f"not an export line: {line!r}"
        exports[name] = value
    return exports


def _status(env: dict[str, str]) -> dict[str, Any]:
    result = _fleetctl("status", "--json", env=env)
    assert result.returncode == 0, _explain(result)
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def _pool(summary: dict[str, Any], name: str) -> dict[str, Any]:
    [pool] = [p for p in summary["pools"] if p["name"] == name]
    return pool


def _local_aws_children(parent: int) -> set[int]:
    """Processes running local AWS whose parent is ``parent``, from /proc."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may contain spaces, so split after its ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if LOCAL_AWS_MODULE in cmdline and ppid == parent:
            found.add(int(entry.name))
    return found


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` no longer exists (waiting briefly for init to reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.mark.e2e
def test_sandbox_up_status_pipeline_webhook_and_down_like_a_user() -> None:
    base_env = _clean_environment()
    # A state file left by an earlier aborted run would make `up` refuse; `down` clears it (or stops that sandbox).
    leftover = _fleetctl("sandbox", "down", env=base_env)
    assert leftover.returncode == 0, _explain(leftover)
    assert not STATE_FILE.exists()

    pid = 0
    local_aws: set[int] = set()
    try:
        # up --detach: export lines for a shell
        up = _fleetctl("sandbox", "up", "--detach", env=base_env, timeout=90)
        assert up.returncode == 0, _explain(up)
        exports = _parse_exports(up.stdout)
        assert exports.keys() >= REQUIRED_EXPORTS, f"missing {REQUIRED_EXPORTS - exports.keys()}\n{up.stdout}"
        pid = int(json.loads(STATE_FILE.read_text())["pid"])
        local_aws = _local_aws_children(pid)
        assert local_aws, f"no {LOCAL_AWS_MODULE} child of sandbox pid {pid}{_log_tail()}"
        env = {**base_env, **exports}

        # status --json: jobs, runners, pools
        summary = _status(env)
        assert {"jobs", "runners", "pools"} <= summary.keys()
        assert summary["pools"], summary
        for pool in summary["pools"]:
            assert pool.keys() >= POOL_KEYS, pool
        assert _pool(summary, "docker")["runners"] == {}
        assert _pool(summary, "docker")["leases"] == 0

        # sandbox pipeline: three docker,linux jobs become three runners in the docker pool
        pipeline = _fleetctl("sandbox", "pipeline", "--jobs", "3", "--tags", "docker,linux", env=env)
        assert pipeline.returncode == 0, _explain(pipeline)
        assert "created pipeline" in pipeline.stdout
        deadline = time.monotonic() + 30
        while True:
            docker = _pool(_status(env), "docker")
            if sum(docker["runners"].values()) == 3 and docker["leases"] == 3:
                break
            assert time.monotonic() < deadline, f"docker pool after 30 s: {docker}{_log_tail()}"
            time.sleep(0.5)

        # the printed webhook URL and secret: GitLab's Job Hook is accepted, a wrong secret refused
        url = exports["RUNNER_FLEET_WEBHOOK_URL"]
        secret = exports["RUNNER_FLEET_WEBHOOK_SECRET"]
        body = job_hook("running", build_id=next_job_id(), project_id=int(exports["RUNNER_FLEET_SANDBOX_PROJECT"]))
        accepted = requests.post(url, json=body, headers=gitlab_headers(secret), timeout=15)
        assert accepted.status_code == 200, accepted.text + _log_tail()
        refused = requests.post(url, json=body, headers=gitlab_headers(secret + "-wrong"), timeout=15)
        assert refused.status_code == 401, refused.text + _log_tail()
    finally:
        down = _fleetctl("sandbox", "down", env=base_env, timeout=60)

    # down: everything the sandbox started is gone
    assert down.returncode == 0, _explain(down)
    assert "sandbox stopped" in down.stdout, _explain(down)
    assert not STATE_FILE.exists()
    assert _gone(pid), f"sandbox pid {pid} still running{_log_tail()}"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert all(_gone(child) for child in local_aws), f"local AWS {local_aws} outlived the sandbox"
    assert _local_aws_children(pid) == set()

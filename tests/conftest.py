"""Shared fixtures. The environment is set before anything imports ``app``: Chalice and boto3 read it early."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
os.environ["POWERTOOLS_LOG_LEVEL"] = "WARNING"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

PROJECT_DIR = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.iam_recorder", "tests.secret_scan"]


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The whole local stack (moto server, GitLab emulator, served webhook), once per test session. Without
    runner agents: the tests drive scale-up themselves and look at instances and tokens as it left them."""
    from fleetctl.sandbox.stack import Sandbox

    stack = Sandbox(workdir=tmp_path_factory.mktemp("sandbox"), run_pump=False, agents=False)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def fresh_sandbox(sandbox: object) -> object:
    """The session sandbox with AWS state wiped, resources bootstrapped again and a new connected project."""
    sandbox.reset()  # type: ignore[attr-defined]
    return sandbox

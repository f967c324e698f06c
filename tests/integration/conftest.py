"""Peers the integration tests share: a local AWS per test module, GitLab emulators per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from fleetctl.sandbox.local_aws import LocalAws

EMULATOR_ADMIN_TOKEN = "glpat-test-admin"


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAws]:
    """moto behind the AWS shim, with this process's AWS environment pointed at it for the module's tests."""
    aws = LocalAws().start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in aws.environment().items():
            env.setenv(key, value)
        yield aws
    aws.stop()


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., GitLabEmulator]]:
    """Start GitLab emulators (keyword arguments as ``GitLabEmulator`` takes them); all stop after the test."""
    started: list[GitLabEmulator] = []

    def make(**kwargs: Any) -> GitLabEmulator:
        emulator = GitLabEmulator(admin_token=EMULATOR_ADMIN_TOKEN, **kwargs).start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emu(emulator_factory: Callable[..., GitLabEmulator]) -> GitLabEmulator:
    return emulator_factory()

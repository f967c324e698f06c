"""What a new operator sees when fleetctl cannot do its work: one line on stderr naming the problem and what to do,
exit status 1, no traceback; and the traceback with ``fleetctl --debug``.

Each case runs the real command line in a process of its own, with an environment as a person's shell would have
it: no AWS credentials at all, an AWS endpoint nothing listens on, a GitLab nothing listens on, a token the
GitLab emulator refuses, a local AWS where the stage was never bootstrapped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from fleetctl.sandbox.local_aws import LocalAws

PROJECT_DIR = Path(__file__).resolve().parents[2]
STAGE_FILE = PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def shell_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment less anything AWS or GitLab, credential files pointed at nothing, and the
    instance metadata service off (botocore would otherwise ask it for credentials)."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "GITLAB_", "RUNNER_FLEET_", "FLEETCTL_"))
    }
    return {
        **kept,
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONPATH": str(PROJECT_DIR),
        **extra,
    }


def fleetctl(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetctl.cli", *args],
        env=dict(env),
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """The command failed with one line on stderr naming each of ``named``, and no traceback anywhere."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for words in named:
        assert words in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        ["bootstrap", "--config", str(STAGE_FILE)],
        ["status", "--config", str(STAGE_FILE)],
        ["gitlab", "connect", "--config", str(STAGE_FILE), "--project", "demo/app", "--url", "https://x.example/"],
        ["doctor", "--config", str(STAGE_FILE)],
    ],
    ids=["bootstrap", "status", "gitlab connect", "doctor"],
)
def test_no_aws_credentials(tmp_path: Path, emu: GitLabEmulator, command: list[str]) -> None:
    # given: for gitlab connect, a GitLab that takes the operator's token, so that only AWS's credentials are missing
    # (bootstrap checks a GITLAB_TOKEN with the stage's own GitLab, so it gets none)
    emu.add_token("glpat-operator", scopes=("api",))
    gitlab = {"GITLAB_TOKEN": "glpat-operator", "GITLAB_URL": emu.url} if command[0] == "gitlab" else {}
    env = shell_environment(tmp_path, **gitlab)

    # when
    result = fleetctl(env, *command)

    # then
    assert_one_line(result, "no AWS credentials found", "AWS_PROFILE", "aws configure")


def test_an_aws_endpoint_nobody_answers(tmp_path: Path) -> None:
    # given
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = shell_environment(
        tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint
    )

    # when
    result = fleetctl(env, "bootstrap", "--config", str(STAGE_FILE))

    # then
    assert_one_line(result, f"cannot reach AWS at {endpoint}", "AWS_ENDPOINT_URL")


def test_a_gitlab_nobody_answers(tmp_path: Path) -> None:
    # given
    gitlab = f"http://127.0.0.1:{closed_port()}"
    env = shell_environment(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")

    # when
    result = fleetctl(
        env,
        *("gitlab", "connect", "--config", str(STAGE_FILE), "--project", "demo/app", "--url", "https://x.example/"),
        *("--gitlab-url", gitlab, "--gitlab-token", "glpat-operator"),
    )

    # then
    assert_one_line(result, f"GitLab at {gitlab} unreachable", "gitlab.url")


def test_a_token_gitlab_refuses(tmp_path: Path, emu: GitLabEmulator) -> None:
    # given
    env = shell_environment(tmp_path, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")

    # when
    result = fleetctl(
        env,
        *("gitlab", "connect", "--config", str(STAGE_FILE), "--project", "demo/app", "--url", "https://x.example/"),
        *("--gitlab-url", emu.url, "--gitlab-token", "glpat-nobody-knows-this"),
    )

    # then
    line = assert_one_line(result, "GitLab refuses the token", "401")
    assert "glpat-nobody-knows-this" not in line


def test_a_stage_never_bootstrapped(tmp_path: Path, local_aws: LocalAws) -> None:
    # given: an account with nothing of the stage in it
    env = shell_environment(tmp_path, **local_aws.environment())

    # when
    result = fleetctl(env, "status", "--config", str(STAGE_FILE), "--gitlab-token", "glpat-unused")

    # then
    assert_one_line(result, "not found in AWS", "ResourceNotFoundException", "fleetctl bootstrap")


@pytest.mark.parametrize("flag", [["--debug"], []], ids=["--debug", "FLEETCTL_DEBUG"])
def test_debug_shows_the_traceback(tmp_path: Path, flag: list[str]) -> None:
    # given
    env = shell_environment(tmp_path, **({} if flag else {"FLEETCTL_DEBUG": "1"}))

    # when
    result = fleetctl(env, *flag, "bootstrap", "--config", str(STAGE_FILE))

    # then
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "botocore.exceptions.NoCredentialsError" in result.stderr

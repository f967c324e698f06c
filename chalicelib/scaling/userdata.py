"""The user data of a pool's runner instances: a ``#cloud-config`` with the pool's settings, never a secret.

CreateFleet cannot override user data, and one CreateFleet call starts many instances, so user data belongs to
the pool's launch template and says only what every instance of the pool shares. cloud-init writes three files
and starts the AMI's boot service (``runner_ami/README.md`` specifies the boot; ``/opt/runner-fleet/boot``):

* ``/etc/runner-fleet/runner.env``: the settings the boot script reads (shell assignments, each value quoted);
* ``/etc/runner-fleet/config.toml``: gitlab-runner's configuration for the pool, rendered here: the docker
  executor, the pool's CI image (pinned by digest once one is known), pull policy ``if-not-present``, privileged
  only where the pool says, and the fleet's S3 cache with IAM authentication, shared by the pool's runners under a
  per-pool path. It has no ``token``: the boot script adds the instance's own token to a root-only copy in
  ``/run``, having read it from the fleet-table item ``TOKEN#<aws:userid>`` (see ``chalicelib.scaling.tokens``);
* ``/root/.docker/config.json``: ``credHelpers`` sending the pool's ECR registry to ``ecr-login``, the
  amazon-ecr-credential-helper, for the boot's pre-pull and the runner's image pulls. Not ``credsStore``: with it,
  gitlab-runner lists the credentials without a region and the pull fails with "no basic auth credentials". Job
  images named in ``.gitlab-ci.yml`` from the same registry authenticate through ``DOCKER_AUTH_CONFIG`` in the
  runner's environment, which carries the same mapping.

An AMI without the boot script powers the instance off rather than idle at our expense.

User data runs as root on every instance, and the settings file is sourced by bash, so the renderer does not trust
config validation alone: a value with a line break or any other control character is refused with
``UnsafeUserDataError``, naming the setting, and nothing is rendered. Everything else is escaped by the YAML, TOML
and JSON serialisers themselves.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import unicodedata
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import ConfigError
from chalicelib.store import token_key

CLOUD_CONFIG_HEADER = "#cloud-config"
BOOT_SCRIPT = "/opt/runner-fleet/boot"
BOOT_SERVICE = "runner-fleet-boot.service"
SETTINGS_FILE = "/etc/runner-fleet/runner.env"
RUNNER_CONFIG_FILE = "/etc/runner-fleet/config.toml"
DOCKER_CONFIG_FILE = "/root/.docker/config.json"
CACHE_VOLUME = "/cache"
# docker:dind with TLS shares its client certificates with the job through this volume (GitLab's dind docs).
DIND_CERTS_VOLUME = "/certs/client"
ECR_CREDENTIAL_HELPER = "ecr-login"

_ECR_HOST = re.compile(r"(?P<account>[0-9]{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?")


class UnsafeUserDataError(ConfigError):
    """A setting would break out of its quoting in the user data."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        super().__init__("user data", [f"{setting}: {reason}"])


def _unsafe_character(value: str) -> str | None:
    for char in value:
        # Cc covers newline, carriage return, NUL, escape, DEL and the C1 controls; the Unicode line and
        # paragraph separators are refused too, as some tools split lines on them.
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return char
    return None


def _check_value(setting: str, value: str) -> None:
    char = _unsafe_character(value)
    if char is not None:
        raise UnsafeUserDataError(setting, f"must not contain control characters, found {char!r}")


def _pool_path(config: FleetConfig, pool: PoolConfig) -> str:
    """``pools[1](build)``, as config errors name a pool; without the name when the name itself is unsafe."""
    index = next((str(i) for i, candidate in enumerate(config.pools) if candidate is pool), "?")
    return f"pools[{index}]" if _unsafe_character(pool.name) else f"pools[{index}]({pool.name})"


def image_reference(pool: PoolConfig, registry: str, digest: str | None = None) -> str:
    """``registry/repository@digest`` once a digest is pinned, else ``registry/repository:tag``."""
    base = f"{registry}/{pool.image.repository}"
    return f"{base}@{digest}" if digest else f"{base}:{pool.image.tag}"


def registry_of(image: str) -> str:
    """The registry host of an image reference (``<account>.dkr.ecr.<region>.amazonaws.com/repo:tag``)."""
    return image.split("/", 1)[0]


def runner_name(config: FleetConfig, pool: PoolConfig) -> str:
    """The name of the one ``[[runners]]`` entry of the pool's config.toml, which run-single is told to run."""
    return f"{config.fleet}/{pool.name}"


def _cache_region(config: FleetConfig, registry: str) -> str:
    """The cache bucket's region: the fleet's, else the region of its ECR registry (both are the fleet's)."""
    if config.region:
        return config.region
    found = _ECR_HOST.fullmatch(registry)
    return found.group("region") if found else ""


def docker_auth_config(registry: str) -> dict[str, Any]:
    """Docker's client configuration sending ``registry`` to the ECR credential helper."""
    return {"credHelpers": {registry: ECR_CREDENTIAL_HELPER}}


def render_runner_config(config: FleetConfig, pool: PoolConfig, image: str) -> str:
    """The pool's gitlab-runner ``config.toml``: one docker runner, no token (the boot script adds it)."""
    import tomlkit

    registry = registry_of(image)
    region = _cache_region(config, registry)
    s3: dict[str, Any] = {"BucketName": config.cache_bucket, "AuthenticationType": "iam"}
    if region:
        s3["BucketLocation"] = region
    volumes = [DIND_CERTS_VOLUME, CACHE_VOLUME] if pool.privileged else [CACHE_VOLUME]
    runner: dict[str, Any] = {
        "name": runner_name(config, pool),
        "url": config.gitlab.url,
        "executor": "docker",
        "request_concurrency": 1,
        # Job images from the fleet's registry authenticate through the same helper as the runner's own pulls.
        "environment": [f"DOCKER_AUTH_CONFIG={json.dumps(docker_auth_config(registry), separators=(',', ':'))}"],
        "cache": {
            "Type": "s3",
            # Shared: each instance has a runner (and token) of its own, and an unshared cache would be keyed by it.
            "Shared": True,
            "Path": pool.name,
            "s3": s3,
        },
        "docker": {
            "image": image,
            "pull_policy": ["if-not-present"],
            "privileged": pool.privileged,
            "tls_verify": False,
            "disable_cache": False,
            "volumes": volumes,
            "shm_size": 0,
        },
    }
    # Only the [[runners]] section: `gitlab-runner run-single --runner NAME` reads that section and nothing of the
    # global settings (concurrent, check_interval, shutdown_timeout belong to `gitlab-runner run`); it runs one job
    # at a time by itself (gitlab-runner commands/single.go).
    document = {"runners": [runner]}
    return tomlkit.dumps(document)


def render_docker_config(registry: str) -> str:
    return json.dumps(docker_auth_config(registry), indent=2) + "\n"


def _settings(config: FleetConfig, pool: PoolConfig, image: str) -> list[tuple[str, str, str]]:
    """(variable, where its value comes from, value) of the settings file."""
    at = _pool_path(config, pool)
    return [
        ("RUNNER_FLEET", "fleet", config.fleet),
        ("RUNNER_FLEET_POOL", f"{at}.name", pool.name),
        ("RUNNER_NAME", f"{at}.name", runner_name(config, pool)),
        ("GITLAB_URL", "gitlab.url", config.gitlab.url),
        ("RUNNER_IMAGE", f"{at}.image", image),
        ("RUNNER_MAX_BUILDS", f"{at}.max_builds", str(pool.max_builds)),
        ("RUNNER_IDLE_WAIT_SECONDS", f"{at}.idle_wait_seconds", str(pool.idle_wait_seconds)),
        ("RUNNER_MAX_LIFETIME_MINUTES", f"{at}.max_lifetime_minutes", str(pool.max_lifetime_minutes)),
        ("RUNNER_BOOT_DEADLINE_SECONDS", f"{at}.boot_deadline_seconds", str(pool.boot_deadline_seconds)),
        ("RUNNER_FLEET_TOKEN_TABLE", "state.table", config.state.table),
        ("RUNNER_FLEET_TOKEN_KEY_PREFIX", "fleet", token_key("")),
    ]


def render_settings(config: FleetConfig, pool: PoolConfig, image: str) -> str:
    """``/etc/runner-fleet/runner.env``: ``NAME=value`` lines, each value shell-quoted; raises
    ``UnsafeUserDataError`` for a value with a control character."""
    settings = _settings(config, pool, image)
    for variable, source, value in settings:
        _check_value(f"{source} ({variable})", value)
    return "".join(f"{variable}={shlex.quote(value)}\n" for variable, _, value in settings)


def _boot_command() -> list[str]:
    missing = f"runner-fleet: {BOOT_SCRIPT} missing from this AMI; powering off"
    script = (
        f"if [ -x {BOOT_SCRIPT} ]; then exec systemctl start --no-block {BOOT_SERVICE}; fi; "
        f"echo {shlex.quote(missing)} >&2; exec systemctl poweroff"
    )
    return ["/bin/sh", "-c", script]


def render_user_data(config: FleetConfig, pool: PoolConfig, image: str) -> str:
    """The pool's ``#cloud-config``; raises ``UnsafeUserDataError`` for a value that could escape its quoting."""
    import yaml

    # Every value is checked (the settings file's by render_settings), the ones only the TOML carries included: no
    # setting of a runner has a reason to hold a control character.
    for source, value in (("cache_bucket", config.cache_bucket), ("region", config.region or "")):
        _check_value(source, value)
    settings = render_settings(config, pool, image)
    document = {
        "write_files": [
            _file(SETTINGS_FILE, settings, "0644"),
            _file(RUNNER_CONFIG_FILE, render_runner_config(config, pool, image), "0644"),
            _file(DOCKER_CONFIG_FILE, render_docker_config(registry_of(image)), "0600"),
        ],
        "runcmd": [_boot_command()],
    }
    body = yaml.dump(document, Dumper=_literal_dumper(), sort_keys=False, width=1_000_000)
    header = f"# runner-fleet {config.fleet}/{pool.name}: the pool's runner settings. No secrets here."
    return f"{CLOUD_CONFIG_HEADER}\n{header}\n{body}"


def _file(path: str, content: str, permissions: str) -> dict[str, str]:
    return {"path": path, "owner": "root:root", "permissions": permissions, "content": content}


@functools.cache
def _literal_dumper() -> type[Any]:
    import yaml

    class LiteralDumper(yaml.SafeDumper):
        """Multi-line strings as ``|`` blocks, so the files read in the launch template as they will on disk."""

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    LiteralDumper.add_representer(str, represent_str)
    return LiteralDumper

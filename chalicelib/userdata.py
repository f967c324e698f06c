"""The user data of a pool's runner instances: settings only, never a secret and never per launch.

CreateFleet cannot override user data, and one CreateFleet call starts many instances, so user data belongs to
the pool's launch template and says only what every instance of the pool shares: where GitLab is, which image
to run, how many builds and how long to idle. Each instance finds its own token from its own identity: the
fleet-table item ``TOKEN#<aws:userid>``, its role session's user id as ``sts:GetCallerIdentity`` answers it
(see ``chalicelib.runner_tokens``). The boot logic itself lives in the runner AMI
(``/opt/runner-fleet/boot``); an AMI without it powers the instance off rather than idle at our expense.

User data runs as root on every instance, so the renderer does not trust config validation alone: a value that
could end its quoting or the settings heredoc (a line break, any control character) is refused with
``UnsafeUserDataError``, naming the setting, and nothing is rendered.
"""

from __future__ import annotations

import shlex
import unicodedata

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import ConfigError
from chalicelib.store import token_key

BOOT_SCRIPT = "/opt/runner-fleet/boot"
SETTINGS_FILE = "/etc/runner-fleet/runner.env"
HEREDOC_TERMINATOR = "SETTINGS"


class UnsafeUserDataError(ConfigError):
    """A setting would break out of its quoting or the heredoc of the user data."""

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


def render_user_data(config: FleetConfig, pool: PoolConfig, image: str) -> str:
    """The pool's user data script; raises ``UnsafeUserDataError`` for a value that could escape its quoting."""
    at = _pool_path(config, pool)
    # (variable, where its value comes from, value)
    settings = (
        ("RUNNER_FLEET", "fleet", config.fleet),
        ("RUNNER_FLEET_POOL", f"{at}.name", pool.name),
        ("RUNNER_FLEET_TOKEN_TABLE", "state.table", config.state.table),
        ("RUNNER_FLEET_TOKEN_KEY_PREFIX", "fleet", token_key("")),
        ("GITLAB_URL", "gitlab.url", config.gitlab.url),
        ("RUNNER_IMAGE", f"{at}.image", image),
        ("RUNNER_MAX_BUILDS", f"{at}.max_builds", str(pool.max_builds)),
        ("RUNNER_IDLE_WAIT_SECONDS", f"{at}.idle_wait_seconds", str(pool.idle_wait_seconds)),
        ("RUNNER_PRIVILEGED", f"{at}.privileged", "true" if pool.privileged else "false"),
        ("RUNNER_CACHE_BUCKET", "cache_bucket", config.cache_bucket),
        ("RUNNER_CACHE_REGION", "region", config.region or ""),
    )
    # Every value is checked, the fleet and pool names included: they also appear unquoted in the header comment.
    for variable, source, value in settings:
        _check_value(f"{source} ({variable})", value)
    lines = [f"{variable}={shlex.quote(value)}" for variable, _, value in settings]
    # Without line breaks each settings line holds "=", so none can equal the terminator; this is the last guard.
    if HEREDOC_TERMINATOR in lines:
        raise UnsafeUserDataError(HEREDOC_TERMINATOR, "a settings line equals the heredoc terminator")
    body = "\n".join(lines)
    return f"""#!/bin/bash
# runner-fleet {config.fleet}/{pool.name}: settings for the runner AMI's boot script. No secrets here.
set -euo pipefail
install -d -m 0755 /etc/runner-fleet
cat > {SETTINGS_FILE} <<'{HEREDOC_TERMINATOR}'
{body}
{HEREDOC_TERMINATOR}
if [ -x {BOOT_SCRIPT} ]; then
  exec {BOOT_SCRIPT} {SETTINGS_FILE}
fi
echo "runner-fleet: {BOOT_SCRIPT} missing from this AMI; powering off" >&2
shutdown -h now
"""

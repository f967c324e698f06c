"""The user data of a pool's runner instances: settings only, never a secret and never per launch.

CreateFleet cannot override user data, and one CreateFleet call starts many instances, so user data belongs to
the pool's launch template and says only what every instance of the pool shares: where GitLab is, which image
to run, how many builds and how long to idle. Each instance finds its own token from its own identity (the SSM
parameter named after its instance id, read through IMDSv2). The boot logic itself lives in the runner AMI
(``/opt/runner-fleet/boot``); an AMI without it powers the instance off rather than idle at our expense.
"""

from __future__ import annotations

import shlex

from chalicelib.config import FleetConfig, PoolConfig

BOOT_SCRIPT = "/opt/runner-fleet/boot"
SETTINGS_FILE = "/etc/runner-fleet/runner.env"


def image_reference(pool: PoolConfig, registry: str, digest: str | None = None) -> str:
    """``registry/repository@digest`` once a digest is pinned, else ``registry/repository:tag``."""
    base = f"{registry}/{pool.image.repository}"
    return f"{base}@{digest}" if digest else f"{base}:{pool.image.tag}"


def render_user_data(config: FleetConfig, pool: PoolConfig, image: str) -> str:
    settings = {
        "RUNNER_FLEET": config.fleet,
        "RUNNER_FLEET_POOL": pool.name,
        "RUNNER_FLEET_TOKEN_PREFIX": f"/runner-fleet/{config.fleet}/runners/",
        "GITLAB_URL": config.gitlab.url,
        "RUNNER_IMAGE": image,
        "RUNNER_MAX_BUILDS": str(pool.max_builds),
        "RUNNER_IDLE_WAIT_SECONDS": str(pool.idle_wait_seconds),
        "RUNNER_PRIVILEGED": "true" if pool.privileged else "false",
        "RUNNER_CACHE_BUCKET": config.cache_bucket,
        "RUNNER_CACHE_REGION": config.region or "",
    }
    lines = "\n".join(f"{key}={shlex.quote(value)}" for key, value in settings.items())
    return f"""#!/bin/bash
# runner-fleet {config.fleet}/{pool.name}: settings for the runner AMI's boot script. No secrets here.
set -euo pipefail
install -d -m 0755 /etc/runner-fleet
cat > {SETTINGS_FILE} <<'SETTINGS'
{lines}
SETTINGS
if [ -x {BOOT_SCRIPT} ]; then
  exec {BOOT_SCRIPT} {SETTINGS_FILE}
fi
echo "runner-fleet: {BOOT_SCRIPT} missing from this AMI; powering off" >&2
shutdown -h now
"""

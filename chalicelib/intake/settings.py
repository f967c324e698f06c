"""The few settings the webhook Lambda needs, from its environment, with no configuration parsing at all.

The webhook answers GitLab from a cold start in a few hundred milliseconds only if it imports little: it needs
the fleet table, the jobs queue and the names of its secret parameters, not the pools. Chalice sets these per
stage (``environment_variables`` in ``.chalice/config.json``), from the same values as the stage file. They
cannot drift apart unnoticed: ``fleetctl validate`` compares them with the stage file, and every Lambda that
loads the stage file (scale-up, instance events) refuses to start when they disagree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chalicelib.errors import ConfigError

if TYPE_CHECKING:
    from chalicelib.config import FleetConfig

TABLE = "RUNNER_FLEET_TABLE"
JOBS_QUEUE = "RUNNER_FLEET_JOBS_QUEUE"
WEBHOOK_TOKEN_PARAMETER = "RUNNER_FLEET_WEBHOOK_TOKEN_PARAMETER"  # noqa: S105 - a variable name
WEBHOOK_SIGNING_PARAMETER = "RUNNER_FLEET_WEBHOOK_SIGNING_PARAMETER"


@dataclass(frozen=True)
class WebhookSettings:
    table: str
    jobs_queue: str
    token_parameter: str
    signing_parameter: str | None


def webhook_settings(environ: Mapping[str, str] | None = None) -> WebhookSettings:
    env = os.environ if environ is None else environ
    missing = [name for name in (TABLE, JOBS_QUEUE, WEBHOOK_TOKEN_PARAMETER) if not env.get(name)]
    if missing:
        problems = [f"{name}: not set; set it per stage in .chalice/config.json" for name in missing]
        raise ConfigError("environment", problems)
    return WebhookSettings(
        table=env[TABLE],
        jobs_queue=env[JOBS_QUEUE],
        token_parameter=env[WEBHOOK_TOKEN_PARAMETER],
        signing_parameter=env.get(WEBHOOK_SIGNING_PARAMETER) or None,
    )


def jobs_queue_name(environ: Mapping[str, str] | None = None) -> str:
    return webhook_settings(environ).jobs_queue


def settings_environment(config: FleetConfig) -> dict[str, str]:
    """The environment variables a stage's Lambdas need, derived from its stage file."""
    env = {
        TABLE: config.state.table,
        JOBS_QUEUE: config.state.jobs_queue,
        WEBHOOK_TOKEN_PARAMETER: config.webhook.token_parameter,
    }
    if config.webhook.signing_secret_parameter:
        env[WEBHOOK_SIGNING_PARAMETER] = config.webhook.signing_secret_parameter
    return env


def settings_drift(config: FleetConfig, environ: Mapping[str, str]) -> list[str]:
    """One ``NAME: ...`` problem per variable that disagrees with the stage file (or is missing, or extra)."""
    wanted = settings_environment(config)
    problems = []
    for name in (TABLE, JOBS_QUEUE, WEBHOOK_TOKEN_PARAMETER, WEBHOOK_SIGNING_PARAMETER):
        have, want = environ.get(name) or None, wanted.get(name)
        if have != want:
            problems.append(f"{name}: is {have!r} but the stage file says {want!r}")
    return problems

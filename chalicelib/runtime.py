"""Process-wide wiring: the configuration, AWS clients and services each handler uses, built on first use.

Each Lambda imports the whole ``app.py``, so building anything at import would be paid by every function's cold
start. Here each piece is built once, lazily, and ``reset()`` lets tests and the sandbox start afresh after
changing the environment.
"""

from __future__ import annotations

import functools

from chalicelib.aws import AwsClients
from chalicelib.config import get_config, reset_config_cache
from chalicelib.jobs_queue import JobQueue
from chalicelib.secrets import WebhookSecretSource
from chalicelib.store import FleetStore
from chalicelib.webhook import WebhookIntake


@functools.cache
def aws() -> AwsClients:
    return AwsClients(region=get_config().region)


@functools.cache
def store() -> FleetStore:
    return FleetStore(get_config().state.table, aws().dynamodb)


@functools.cache
def jobs_queue() -> JobQueue:
    return JobQueue(aws().sqs, get_config().state.jobs_queue)


@functools.cache
def webhook_intake() -> WebhookIntake:
    config = get_config()
    secrets = WebhookSecretSource(aws().ssm, config.webhook.token_parameter, config.webhook.signing_secret_parameter)
    return WebhookIntake(secrets, store(), jobs_queue())


def reset() -> None:
    """Forget every built piece and the loaded configuration (tests, the sandbox)."""
    for built in (aws, store, jobs_queue, webhook_intake):
        built.cache_clear()
    reset_config_cache()

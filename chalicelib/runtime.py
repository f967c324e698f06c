"""Process-wide wiring: the configuration, AWS clients and services each handler uses, built on first use.

Each Lambda imports the whole ``app.py``, so building anything at import would be paid by every function's cold
start. Here each piece is built once, lazily, and ``reset()`` lets tests and the sandbox start afresh after
changing the environment.

Two environment variables tune scale-up's re-queue delays (seconds): ``RUNNER_FLEET_RETRY_BASE_SECONDS`` (first
retry step, default 4, doubling per attempt) and ``RUNNER_FLEET_LEASE_WAIT_SECONDS`` (how long a job whose pool
is full waits before asking again, default 20). The sandbox shortens both.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from chalicelib.aws import AwsClients
from chalicelib.config import FleetConfig, get_config, reset_config_cache
from chalicelib.jobs_queue import JobQueue
from chalicelib.secrets import WebhookSecretSource
from chalicelib.store import FleetStore, ScaleStore
from chalicelib.webhook import WebhookIntake

if TYPE_CHECKING:
    from chalicelib.gitlab_api import GitLabApi
    from chalicelib.instances import InstanceEvents
    from chalicelib.runner_tokens import RunnerTokens
    from chalicelib.scale_up import ScaleUp

GITLAB_TOKEN_MAX_AGE_SECONDS = 300


def config() -> FleetConfig:
    return get_config()


@functools.cache
def aws() -> AwsClients:
    return AwsClients(region=config().region)


@functools.cache
def store() -> ScaleStore:
    return ScaleStore(config().state.table, aws().dynamodb)


def fleet_store() -> FleetStore:
    return store()


@functools.cache
def jobs_queue() -> JobQueue:
    return JobQueue(aws().sqs, config().state.jobs_queue)


@functools.cache
def dead_letter_queue() -> JobQueue:
    return JobQueue(aws().sqs, config().state.dead_letter_queue)


@functools.cache
def webhook_intake() -> WebhookIntake:
    webhook = config().webhook
    secrets = WebhookSecretSource(aws().ssm, webhook.token_parameter, webhook.signing_secret_parameter)
    return WebhookIntake(secrets, store(), jobs_queue())


@functools.cache
def gitlab_api() -> GitLabApi:
    from aws_lambda_powertools.utilities.parameters import SSMProvider

    from chalicelib.gitlab_api import GitLabApi

    gitlab = config().gitlab
    provider = SSMProvider(boto3_client=aws().ssm)

    def token() -> str:
        return str(provider.get(gitlab.token_parameter, decrypt=True, max_age=GITLAB_TOKEN_MAX_AGE_SECONDS))

    return GitLabApi(gitlab.url, token, runner_type=gitlab.runner_type, owner_id=gitlab.runner_owner_id)


@functools.cache
def runner_tokens(account_id: str) -> RunnerTokens:
    from chalicelib.runner_tokens import RunnerTokens

    return RunnerTokens(aws().ssm, config().fleet, str(aws().ssm.meta.region_name), account_id)


@functools.cache
def scale_up(account_id: str) -> ScaleUp:
    from chalicelib.fleet import FleetLauncher
    from chalicelib.scale_up import ScaleUp
    from chalicelib.scaling import RetryPolicy

    policy = RetryPolicy(
        base_delay=float(os.environ.get("RUNNER_FLEET_RETRY_BASE_SECONDS", "4")),
        lease_wait=float(os.environ.get("RUNNER_FLEET_LEASE_WAIT_SECONDS", "20")),
    )
    return ScaleUp(
        config(),
        store(),
        gitlab_api(),
        FleetLauncher(aws().ec2, config().fleet),
        runner_tokens(account_id),
        jobs_queue(),
        dead_letter_queue(),
        policy=policy,
    )


@functools.cache
def instance_events(account_id: str) -> InstanceEvents:
    from chalicelib.instances import InstanceEvents

    return InstanceEvents(store(), gitlab_api(), runner_tokens(account_id))


def account_of(context: object) -> str:
    """The AWS account id, from the Lambda context's function ARN (arn:aws:lambda:region:account:function:name)."""
    parts = str(getattr(context, "invoked_function_arn", "")).split(":")
    return parts[4] if len(parts) > 4 else ""


def reset() -> None:
    """Forget every built piece and the loaded configuration (tests, the sandbox)."""
    for built in (
        aws,
        store,
        jobs_queue,
        dead_letter_queue,
        webhook_intake,
        gitlab_api,
        runner_tokens,
        scale_up,
        instance_events,
    ):
        built.cache_clear()
    reset_config_cache()

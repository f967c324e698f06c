"""Process-wide wiring: the configuration, AWS clients and services each handler uses, built on first use.

Each Lambda imports the whole ``app.py``, so building anything at import would be paid by every function's cold
start. Here each piece is built once, lazily, and ``reset()`` lets tests and the sandbox start afresh after
changing the environment.

Two environment variables tune scale-up's re-queue delays (seconds): ``RUNNER_FLEET_RETRY_BASE_SECONDS`` (first
retry step, default 4, doubling per attempt) and ``RUNNER_FLEET_LEASE_WAIT_SECONDS`` (how long a job whose pool
is full waits before asking again, default 20). ``RUNNER_FLEET_IDLE_GRACE_SECONDS`` (default 5) is how long a job
is left to an idle runner of its pool before a launch is considered. The sandbox shortens the first two.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from chalicelib.aws import AwsClients
from chalicelib.errors import ConfigError
from chalicelib.intake.secrets import WebhookSecretSource
from chalicelib.intake.settings import settings_drift, webhook_settings
from chalicelib.intake.webhook import WebhookIntake
from chalicelib.jobs_queue import JobQueue
from chalicelib.store import FleetStore

if TYPE_CHECKING:
    from chalicelib.config import FleetConfig
    from chalicelib.gitlab_api import GitLabApi
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.lifecycle.instances import InstanceEvents
    from chalicelib.lifecycle.interruptions import Interruptions
    from chalicelib.lifecycle.reconcile import Reconciler
    from chalicelib.scaling.scale_up import ScaleUp
    from chalicelib.scaling.store import ScaleStore
    from chalicelib.scaling.tokens import RunnerTokens

GITLAB_TOKEN_MAX_AGE_SECONDS = 300


@functools.cache
def config() -> FleetConfig:
    """The stage file, validated; also checked against the environment the webhook runs on."""
    from chalicelib.config import CONFIG_ENV_VAR, get_config

    loaded = get_config()
    drift = settings_drift(loaded, os.environ)
    if drift:
        raise ConfigError(os.environ.get(CONFIG_ENV_VAR, "environment"), drift)
    return loaded


@functools.cache
def aws() -> AwsClients:
    # The region is the Lambda's own (AWS_REGION); the stage file's region is for fleetctl.
    return AwsClients()


@functools.cache
def fleet_store() -> FleetStore:
    """The table as the webhook uses it; the webhook's cold start never loads scale-up's half of the store."""
    return FleetStore(webhook_settings().table, aws().dynamodb)


@functools.cache
def store() -> ScaleStore:
    from chalicelib.scaling.store import ScaleStore

    return ScaleStore(webhook_settings().table, aws().dynamodb)


@functools.cache
def jobs_queue() -> JobQueue:
    return JobQueue(aws().sqs, webhook_settings().jobs_queue)


@functools.cache
def dead_letter_queue() -> JobQueue:
    return JobQueue(aws().sqs, config().state.dead_letter_queue)


@functools.cache
def webhook_intake() -> WebhookIntake:
    settings = webhook_settings()
    secrets = WebhookSecretSource(aws().ssm, settings.token_parameter, settings.signing_parameter)
    return WebhookIntake(secrets, fleet_store(), jobs_queue())


@functools.cache
def gitlab_api() -> GitLabApi:
    from aws_lambda_powertools.utilities.parameters import SSMProvider

    from chalicelib.gitlab_api import GitLabApi

    gitlab = config().gitlab
    provider = SSMProvider(boto3_client=aws().ssm)

    def token() -> str:
        return str(provider.get(gitlab.token_parameter, decrypt=True, max_age=GITLAB_TOKEN_MAX_AGE_SECONDS))

    def fresh_token() -> str:
        # After a 401: the token was rotated (or revoked) within the cache's age, so read past the cache.
        return str(provider.get(gitlab.token_parameter, decrypt=True, force_fetch=True))

    return GitLabApi(
        gitlab.url,
        token,
        runner_type=gitlab.runner_type,
        owner_id=gitlab.runner_owner_id,
        fresh_token=fresh_token,
        token_max_age=GITLAB_TOKEN_MAX_AGE_SECONDS,
    )


@functools.cache
def runner_tokens() -> RunnerTokens:
    """The token store as the instance-state handler uses it: deleting by the key a runner record names."""
    from chalicelib.scaling.tokens import RunnerTokens

    return RunnerTokens(aws().dynamodb, webhook_settings().table)


@functools.cache
def scale_up() -> ScaleUp:
    from chalicelib.scaling.policy import RetryPolicy
    from chalicelib.scaling.scale_up import build_scale_up

    policy = RetryPolicy(
        base_delay=float(os.environ.get("RUNNER_FLEET_RETRY_BASE_SECONDS", "4")),
        lease_wait=float(os.environ.get("RUNNER_FLEET_LEASE_WAIT_SECONDS", "20")),
        idle_grace=int(os.environ.get("RUNNER_FLEET_IDLE_GRACE_SECONDS", "5")),
    )
    return build_scale_up(config(), aws(), gitlab_api(), policy=policy)


@functools.cache
def instance_events() -> InstanceEvents:
    from chalicelib.lifecycle.instances import InstanceEvents

    return InstanceEvents(store(), gitlab_api(), runner_tokens())


@functools.cache
def interruptions() -> Interruptions:
    from chalicelib.lifecycle.interruptions import Interruptions

    return Interruptions(store(), gitlab_api())


@functools.cache
def reconciler() -> Reconciler:
    from chalicelib.lifecycle.reconcile import build_reconciler

    return build_reconciler(config(), aws(), gitlab_api(), scale_up)


@functools.cache
def image_rotation() -> ImageRotation:
    from chalicelib.images.rotation import ImageRotation
    from chalicelib.images.store import ImageStore

    clients = aws()

    def account() -> str:
        # Asked once per container, and only when an event's registry must be compared with the fleet's own:
        # GetCallerIdentity needs no permission.
        return str(clients.client("sts").get_caller_identity()["Account"])

    return ImageRotation(
        config(),
        ImageStore(webhook_settings().table, clients.dynamodb),
        clients.ec2,
        account=account,
        region=clients.ec2.meta.region_name,
        ecr=lambda: clients.client("ecr"),
    )


def reset() -> None:
    """Forget every built piece and the loaded configuration (tests, the sandbox)."""
    from chalicelib.config import reset_config_cache

    for built in (
        config,
        aws,
        fleet_store,
        store,
        jobs_queue,
        dead_letter_queue,
        webhook_intake,
        gitlab_api,
        runner_tokens,
        scale_up,
        instance_events,
        reconciler,
        interruptions,
        image_rotation,
    ):
        built.cache_clear()
    reset_config_cache()

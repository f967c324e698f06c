"""The fleet's state resources, described once: the DynamoDB table and the jobs queue and its dead-letter queue.

Either ``fleetctl bootstrap`` creates them (through the AWS APIs) or the deployment stack does (through
CloudFormation), as the stage file's ``state.owner`` says; ``fleetctl doctor`` judges them against the same
settings. Each owner's form is rendered here from one description, so the table the stack makes has the key, the
indexes, the TTL, the encryption and the billing bootstrap's has, and the queues the same timeouts and redrive.
"""

from __future__ import annotations

import json
from typing import Any

from chalicelib.store import FLEET_RECORDS_INDEX, IDLE_RUNNERS_INDEX, LIVE_ATTRIBUTE, TOKEN_DEADLINES_INDEX

TABLE_KEY = "pk"
TTL_ATTRIBUTE = "ttl"
BILLING_MODE = "PAY_PER_REQUEST"
DLQ_RETENTION_SECONDS = 14 * 24 * 3600
# SQS must keep a message invisible longer than the consuming Lambda may run (AWS advises six times).
JOBS_VISIBILITY_TIMEOUT_SECONDS = 360
JOBS_MAX_RECEIVE_COUNT = 5
# The tag bootstrap puts on everything it creates; the stack tags the state resources it owns alike.
FLEET_TAG_KEY = "runner-fleet"


def _index(
    name: str, keys: tuple[tuple[str, str], ...], projection: str
) -> tuple[tuple[dict[str, str], ...], dict[str, Any]]:
    """A global secondary index: the attribute definitions its ``keys`` ((name, type), hash first) add to the
    table's (all but the table's own key), and the index itself."""
    attributes = tuple({"AttributeName": key, "AttributeType": kind} for key, kind in keys if key != TABLE_KEY)
    schema = [{"AttributeName": key, "KeyType": role} for (key, _), role in zip(keys, ("HASH", "RANGE"), strict=True)]
    index = {"IndexName": name, "KeySchema": schema, "Projection": {"ProjectionType": projection}}
    return attributes, index


# Each global secondary index by name: the attributes it adds to the table's definitions, and the index itself.
# * Scale-up counts a pool's idle runners in the idle index: only idle runner records carry idle_pool.
# * Reconcile reads the fleet's live records (runners, launches, pools, unfinished jobs, connected hooks, image
#   records awaiting a scan) from the fleet-records index: only they carry ``live``, so a run reads pages of the
#   fleet, not of the table's job history. Token items never carry it, so no token is copied into the index.
# * Reconcile finds runner tokens past their boot deadline in the token index; keys only, so no token value is
#   copied into it.
INDEXES: dict[str, tuple[tuple[dict[str, str], ...], dict[str, Any]]] = {
    IDLE_RUNNERS_INDEX: _index(IDLE_RUNNERS_INDEX, (("idle_pool", "S"), ("idle_since", "N")), "KEYS_ONLY"),
    FLEET_RECORDS_INDEX: _index(FLEET_RECORDS_INDEX, ((LIVE_ATTRIBUTE, "S"), (TABLE_KEY, "S")), "ALL"),
    TOKEN_DEADLINES_INDEX: _index(TOKEN_DEADLINES_INDEX, (("token_index", "S"), ("token_due", "N")), "KEYS_ONLY"),
}


def fleet_tags(fleet: str) -> dict[str, str]:
    return {FLEET_TAG_KEY: fleet}


def _tag_list(fleet: str) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in fleet_tags(fleet).items()]


def _table_schema() -> dict[str, Any]:
    """What DynamoDB's CreateTable and CloudFormation's table share: the key, the attributes and the indexes."""
    return {
        "AttributeDefinitions": [
            {"AttributeName": TABLE_KEY, "AttributeType": "S"},
            *(dict(attribute) for attributes, _ in INDEXES.values() for attribute in attributes),
        ],
        "KeySchema": [{"AttributeName": TABLE_KEY, "KeyType": "HASH"}],
        "GlobalSecondaryIndexes": [json.loads(json.dumps(index)) for _, index in INDEXES.values()],
        "BillingMode": BILLING_MODE,
    }


def create_table_arguments(name: str, fleet: str) -> dict[str, Any]:
    """DynamoDB ``CreateTable``'s arguments; TTL is switched on by a separate ``UpdateTimeToLive``."""
    return {
        "TableName": name,
        **_table_schema(),
        "SSESpecification": {"Enabled": True},
        "Tags": _tag_list(fleet),
    }


def ttl_specification() -> dict[str, Any]:
    return {"Enabled": True, "AttributeName": TTL_ATTRIBUTE}


def table_properties(name: str, fleet: str) -> dict[str, Any]:
    """An ``AWS::DynamoDB::Table``'s properties: the table :func:`create_table_arguments` creates, TTL included."""
    return {
        "TableName": name,
        **_table_schema(),
        "SSESpecification": {"SSEEnabled": True},
        "TimeToLiveSpecification": ttl_specification(),
        "Tags": _tag_list(fleet),
    }


def dead_letter_queue_attributes() -> dict[str, str]:
    """The jobs dead-letter queue's SQS attributes (CreateQueue's strings)."""
    return {"SqsManagedSseEnabled": "true", "MessageRetentionPeriod": str(DLQ_RETENTION_SECONDS)}


def jobs_queue_attributes() -> dict[str, str]:
    """The jobs queue's SQS attributes besides its redrive policy, which names the dead-letter queue's ARN."""
    return {"SqsManagedSseEnabled": "true", "VisibilityTimeout": str(JOBS_VISIBILITY_TIMEOUT_SECONDS)}


def redrive_policy(dead_letter_arn: Any) -> dict[str, Any]:
    """The jobs queue's redrive policy; ``dead_letter_arn`` is the ARN, or CloudFormation's reference to it."""
    return {"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": JOBS_MAX_RECEIVE_COUNT}


def _queue_properties(name: str, fleet: str, attributes: dict[str, str]) -> dict[str, Any]:
    properties: dict[str, Any] = {"QueueName": name}
    for key, value in attributes.items():
        properties[key] = value == "true" if value in ("true", "false") else int(value)
    return {**properties, "Tags": _tag_list(fleet)}


def dead_letter_queue_properties(name: str, fleet: str) -> dict[str, Any]:
    """An ``AWS::SQS::Queue``'s properties for the jobs dead-letter queue."""
    return _queue_properties(name, fleet, dead_letter_queue_attributes())


def jobs_queue_properties(name: str, fleet: str, dead_letter_arn: Any) -> dict[str, Any]:
    """An ``AWS::SQS::Queue``'s properties for the jobs queue, redriving to ``dead_letter_arn``."""
    return {
        **_queue_properties(name, fleet, jobs_queue_attributes()),
        "RedrivePolicy": redrive_policy(dead_letter_arn),
    }

"""ECR's image events, which the AWS shim puts for every push and delete that succeeds
(``fleetctl/sandbox/aws_rules/ecr_events.py``): Amazon ECR User Guide, "Amazon ECR events and EventBridge"."""

from __future__ import annotations

import calendar
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from chalicelib.aws import AwsClients
from fleetctl.sandbox.local_aws import LocalAws

IMAGE_ACTION = "ECR Image Action"
REPOSITORY = "ci/job-image"
DEADLINE_SECONDS = 20.0


@dataclass(frozen=True)
class World:
    clients: AwsClients
    queue: str
    region: str
    account: str

    @property
    def ecr(self) -> Any:
        return self.clients.client("ecr")


@pytest.fixture
def world(local_aws: LocalAws) -> Iterator[World]:
    """A repository, and a rule on the default bus sending ECR's image actions to a queue."""
    local_aws.reset()
    clients = AwsClients()
    queue = clients.sqs.create_queue(QueueName="image-actions")["QueueUrl"]
    arn = clients.sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events = clients.client("events")
    events.put_rule(Name="images", EventPattern=json.dumps({"source": ["aws.ecr"], "detail-type": [IMAGE_ACTION]}))
    events.put_targets(Rule="images", Targets=[{"Id": "q", "Arn": arn}])
    clients.client("ecr").create_repository(repositoryName=REPOSITORY)
    account = clients.client("sts").get_caller_identity()["Account"]
    yield World(clients, queue, clients.client("ecr").meta.region_name, account)
    local_aws.reset()


def _manifest(layer: str) -> tuple[str, str]:
    """A small image manifest and its digest (moto does not hash manifests; ECR's digest is the manifest's)."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": 2,
                "digest": "sha256:" + hashlib.sha256(f"config {layer}".encode()).hexdigest(),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": 10,
                    "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest(),
                }
            ],
        }
    )
    return manifest, "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


def _push(world: World, layer: str, tag: str | None = None) -> str:
    manifest, digest = _manifest(layer)
    tagged = {"imageTag": tag} if tag else {}
    answer = world.ecr.put_image(repositoryName=REPOSITORY, imageManifest=manifest, imageDigest=digest, **tagged)
    assert answer["image"]["imageId"]["imageDigest"] == digest
    return digest


def _events(world: World, wanted: int, timeout: float = DEADLINE_SECONDS) -> list[dict[str, Any]]:
    """The events delivered to the queue, in arrival order, once ``wanted`` arrived (or the deadline passed)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(found) < wanted and time.monotonic() < deadline:
        answer = world.clients.sqs.receive_message(QueueUrl=world.queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            found.append(json.loads(message["Body"]))
            world.clients.sqs.delete_message(QueueUrl=world.queue, ReceiptHandle=message["ReceiptHandle"])
    return found


def _put(local_aws: LocalAws, wanted: int, timeout: float = DEADLINE_SECONDS) -> list[dict[str, str]]:
    """What the rule put, once ``wanted`` events were put and none is still due (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while True:
        put: list[dict[str, str]] = local_aws.shim("ecr-events", "put")
        if (len(put) >= wanted and local_aws.shim("ecr-events", "status")["due"] == 0) or time.monotonic() > deadline:
            return put
        time.sleep(0.05)


def _account(event: dict[str, Any], world: World) -> str:
    """The event's ``account``. moto's EventBridge leaves it out of what it sends an SQS target (its default input
    template has no ``account``; AWS always sends it, and the sandbox's pump fills it in), so an event without one
    counts as the account the rule put it on, which ``put`` reports and the tests check there."""
    return str(event.get("account", world.account))


def _seconds(stamp: str) -> int:
    """EventBridge's ``time`` (``2019-11-16T01:54:34Z``) as Unix seconds."""
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def test_a_push_puts_an_image_action_with_the_documented_shape_stamped_with_the_push_time(
    world: World, local_aws: LocalAws
) -> None:
    # a lag well over a second, so an event stamped when it was put would show a later time than the push
    local_aws.shim("ecr-events", "set", lag_seconds=2.0)
    before = time.time()

    digest = _push(world, "a", tag="latest")
    pushed = time.time()

    [event] = _events(world, 1)
    assert event["source"] == "aws.ecr"
    assert event["detail-type"] == IMAGE_ACTION
    assert _account(event, world) == world.account
    assert event["region"] == world.region
    assert event["resources"] == []
    assert event["detail"] == {
        "result": "SUCCESS",
        "repository-name": REPOSITORY,
        "image-digest": digest,
        "action-type": "PUSH",
        "image-tag": "latest",
    }
    assert int(before) <= _seconds(event["time"]) <= pushed
    assert local_aws.shim("ecr-events", "put") == [
        {
            "repository": REPOSITORY,
            "digest": digest,
            "action": "PUSH",
            "tag": "latest",
            "account": world.account,
            "region": world.region,
        }
    ]


def test_a_push_without_a_tag_puts_no_image_tag(world: World) -> None:
    digest = _push(world, "untagged")

    [event] = _events(world, 1)

    assert event["detail"] == {
        "result": "SUCCESS",
        "repository-name": REPOSITORY,
        "image-digest": digest,
        "action-type": "PUSH",
    }


def test_a_push_ecr_refuses_puts_nothing(world: World, local_aws: LocalAws) -> None:
    first = _push(world, "a", tag="v1")
    manifest, digest = _manifest("a")

    # when the same image is pushed again under the tag it has
    with pytest.raises(world.ecr.exceptions.ImageAlreadyExistsException):
        world.ecr.put_image(repositoryName=REPOSITORY, imageManifest=manifest, imageDigest=digest, imageTag="v1")
    # and a later push succeeds: the refused one would have been put before it
    second = _push(world, "b", tag="v2")

    # then only the two pushes that succeeded put an event
    assert [(p["digest"], p["tag"]) for p in _put(local_aws, 2)] == [(first, "v1"), (second, "v2")]
    events = _events(world, 2)
    assert sorted(e["detail"]["image-tag"] for e in events) == ["v1", "v2"]
    assert _events(world, 1, timeout=1.5) == []


def test_a_batch_delete_puts_a_delete_event_per_image_deleted(world: World, local_aws: LocalAws) -> None:
    kept = _push(world, "kept", tag="kept")
    gone = _push(world, "gone", tag="gone")
    _put(local_aws, 2)
    _events(world, 2)

    # when one image is deleted by tag, alongside one that does not exist
    answer = world.ecr.batch_delete_image(
        repositoryName=REPOSITORY, imageIds=[{"imageTag": "gone"}, {"imageTag": "never-pushed"}]
    )
    assert [failure["imageId"] for failure in answer["failures"]] == [{"imageTag": "never-pushed"}]

    # then one DELETE event, for the image deleted
    [event] = _events(world, 1)
    assert event["source"] == "aws.ecr" and event["detail-type"] == IMAGE_ACTION
    assert (_account(event, world), event["region"], event["resources"]) == (world.account, world.region, [])
    assert event["detail"] == {
        "result": "SUCCESS",
        "repository-name": REPOSITORY,
        "image-digest": gone,
        "action-type": "DELETE",
        "image-tag": "gone",
    }
    assert [(p["action"], p["digest"], p["account"]) for p in _put(local_aws, 3)] == [
        ("PUSH", kept, world.account),
        ("PUSH", gone, world.account),
        ("DELETE", gone, world.account),
    ]
    assert _events(world, 1, timeout=1.5) == []


def test_an_image_action_put_with_put_events_reaches_the_same_rule(world: World) -> None:
    """How an operator tries a rule from the AWS CLI in the sandbox (``aws events put-events``). moto takes an
    ``aws.`` source from PutEvents; AWS's EventBridge keeps those sources to AWS services."""
    detail = {
        "result": "SUCCESS",
        "repository-name": REPOSITORY,
        "image-digest": "sha256:" + "ab" * 32,
        "action-type": "PUSH",
        "image-tag": "latest",
    }

    answer = world.clients.client("events").put_events(
        Entries=[{"Source": "aws.ecr", "DetailType": IMAGE_ACTION, "Detail": json.dumps(detail), "Resources": []}]
    )

    assert answer["FailedEntryCount"] == 0
    [event] = _events(world, 1)
    assert (event["source"], event["detail-type"], event["detail"]) == ("aws.ecr", IMAGE_ACTION, detail)
    assert (_account(event, world), event["region"]) == (world.account, world.region)


def test_the_lag_is_settable_and_checked(local_aws: LocalAws) -> None:
    local_aws.reset()
    assert local_aws.shim("ecr-events", "set", lag_seconds=1.5) == {"lag_seconds": 1.5}
    assert local_aws.shim("ecr-events", "status") == {"lag_seconds": 1.5, "due": 0, "put": 0}
    with pytest.raises(ValueError, match="unknown settings"):
        local_aws.shim("ecr-events", "set", seconds=2)
    with pytest.raises(ValueError, match="not negative"):
        local_aws.shim("ecr-events", "set", lag_seconds=-1)
    local_aws.reset()
    assert local_aws.shim("ecr-events", "status")["lag_seconds"] == 0.3

"""CI image rotation against the whole sandbox: a push to the local ECR puts its "ECR Image Action" on the default
bus (the AWS shim's ``ecr-events`` rule), EventBridge's rule routes it to the images handler through the event
pump, the pool gets a new launch template version naming the digest, and reconcile moves the runners over.

Moto does not hash manifests, so each push names its digest (``put_image`` with ``imageDigest``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib import runtime
from chalicelib.images.store import ImageStore
from chalicelib.lifecycle.rules import RETIRE_GRACE_SECONDS
from chalicelib.naming import described_instance, launch_template_name
from fleetctl.sandbox.stack import Sandbox
from tests.integration.test_reconcile import OPTIONS, Fleet, stage_config
from tests.integration.test_runner_agents import wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.scenario]


def manifest(image: str) -> str:
    """A manifest of its own per image: moto tells images apart by their manifest, whatever digest is given."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "layers": [],
            "annotations": {"org.opencontainers.image.revision": image},
        }
    )


LONG_JOB = {"name": "build", "tags": ["docker"], "script": ["sleep 4"]}
SHORT_JOB = {"name": "test", "tags": ["docker"], "script": ["sleep 0.3"]}


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def gated_config(workdir: Path, threshold: str | None) -> Path:
    path = stage_config(workdir, "images-stage.yaml")
    document = yaml.safe_load(path.read_text())
    for pool in document["pools"]:
        if pool["name"] == "docker":
            if threshold:
                pool["scan"] = {"severity_threshold": threshold, "timeout_minutes": 5}
            else:
                pool.pop("scan", None)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def images_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("images")
    stack = Sandbox(config_path=gated_config(workdir, None), workdir=workdir, agent_options=OPTIONS)
    stack.start()
    yield stack
    stack.stop()


class Images(Fleet):
    """The sandbox as an image's publisher and its pools see it."""

    @property
    def pool(self) -> Any:
        return self.config.pool("docker")

    def push(self, image: str, tag: str | None = None) -> None:
        """A ``docker push`` of ``image`` to the pool's repository, under the pool's tag; its event follows."""
        ecr = runtime.aws().client("ecr")
        if not ecr.describe_repositories()["repositories"]:
            ecr.create_repository(repositoryName=self.pool.image.repository)
        ecr.put_image(
            repositoryName=self.pool.image.repository,
            imageManifest=manifest(image),
            imageTag=tag or self.pool.image.tag,
            imageDigest=image,
        )

    def scanned(self, image: str, **counts: int) -> None:
        """The "ECR Image Scan" basic scanning puts when it finishes: put on the default bus as a person tries it
        with ``aws events put-events``."""
        detail = {
            "scan-status": "COMPLETE",
            "repository-name": self.pool.image.repository,
            "finding-severity-counts": counts,
            "image-digest": image,
            "image-tags": [],
        }
        runtime.aws().client("events").put_events(
            Entries=[{"Source": "aws.ecr", "DetailType": "ECR Image Scan", "Detail": json.dumps(detail)}]
        )

    def deliver(self) -> None:
        """Let EventBridge deliver what ECR put so far (its events follow a push by a lag, and each delivery by up
        to the pump's reorder window)."""
        self.sandbox.aws.settle()
        self.sandbox.pump.drain(timeout=10)

    def until(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        self.deliver()
        assert wait_until(condition, timeout), "the image events did not get there in time"

    def promoted(self, digest: str) -> None:
        """Until the pool runs ``digest`` and its promotion has moved the template's default, its last step."""
        self.until(lambda: self.current() == digest)
        assert wait_until(lambda: self.default_version() == self.image_record().template_version, 20)

    def current(self) -> str | None:
        record = self.image_record()
        return record.current.digest if record.current else None

    def image_record(self) -> Any:
        return ImageStore(self.config.state.table, runtime.aws().dynamodb).read("docker")

    def default_version(self) -> int:
        name = launch_template_name(self.config.fleet, "docker")
        found = self.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
        return int(found["DefaultVersionNumber"])

    def runner_image(self, instance_id: str) -> str:
        """The CI image an instance's config.toml names (its user data, as cloud-init writes it)."""
        answer = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        cloud_config = yaml.safe_load(base64.b64decode(answer["UserData"]["Value"]).decode())
        [toml] = [f["content"] for f in cloud_config["write_files"] if f["path"].endswith("config.toml")]
        [line] = [line for line in toml.splitlines() if line.strip().startswith("image")]
        return line.split("=", 1)[1].strip().strip('"')


@pytest.fixture
def images(images_sandbox: Sandbox) -> Iterator[Images]:
    images_sandbox.reset(gated_config(images_sandbox.workdir, None))
    fleet = Images(images_sandbox)
    yield fleet
    for job_id in fleet.pipelines_jobs:
        if fleet.job(job_id)["status"] in ("created", "pending", "running"):
            fleet.gitlab.set_job_status(fleet.sandbox.project_id, job_id, "canceled")


def gated(images: Images, threshold: str) -> Images:
    images.sandbox.reset(gated_config(images.sandbox.workdir, threshold))
    return Images(images.sandbox)


def test_a_push_whose_scan_passes_moves_the_pool_while_a_job_on_the_old_digest_finishes(images: Images) -> None:
    images = gated(images, "HIGH")
    old, new = digest("base-1"), digest("base-2")
    images.agents.options = replace(OPTIONS, wait_timeout_seconds=20.0)
    try:
        # given a pool gated on scans on digest 1, with a runner busy on it
        images.push(old)
        images.scanned(old, LOW=1)
        images.promoted(old)
        (long_job,) = images.pipeline(LONG_JOB)
        assert wait_until(lambda: images.job(long_job)["status"] == "running", 30)
        old_runner = int(images.job(long_job)["runner"]["id"])
        old_instance = str(described_instance(images.job(long_job)["runner"]["description"]))
        assert images.runner_image(old_instance).endswith(f"@{old}")
        before = images.default_version()

        # when digest 2 is pushed and its scan passes, and reconcile runs while the job runs
        images.push(new)
        images.until(lambda: images.image_record().candidate is not None)
        assert images.default_version() == before  # held for its scan
        images.scanned(new, MEDIUM=2)
        assert wait_until(lambda: images.default_version() > before, 10), "no new launch template version"
        paused = images.reconcile()

        # then the pool's new version names digest 2, the busy runner is paused (not killed) and finishes its job
        record = images.image_record()
        assert record.current.digest == new and record.template_version == images.default_version()
        assert [v.digest for v in record.history][:2] == [new, old]
        assert paused.metrics.get("RunnersPaused") == 1
        assert (images.gitlab_runner(old_runner) or {}).get("paused") is True
        assert wait_until(lambda: images.job(long_job)["status"] == "success", 30)

        # and the next job runs on a runner launched on digest 2
        (next_job,) = images.pipeline(SHORT_JOB)
        assert wait_until(lambda: images.job(next_job)["status"] == "success", 40)
        new_instance = str(described_instance(images.job(next_job)["runner"]["description"]))
        assert new_instance != old_instance
        assert images.runner_image(new_instance).endswith(f"@{new}")

        # and once idle and past the grace, the old runner is retired
        assert wait_until(lambda: images.record(old_instance).get("state") == "idle", 30)
        retired = images.reconcile(offset=RETIRE_GRACE_SECONDS + 1)
        assert retired.metrics.get("RunnersRetired", 0) >= 1
        assert images.state(old_instance) == "terminated"
    finally:
        images.agents.options = OPTIONS
    images.assert_invariants()


def test_a_push_to_an_unrelated_repository_or_tag_changes_nothing(images: Images) -> None:
    images.push(digest("base-1"))
    images.until(lambda: images.current() == digest("base-1"))
    # the promotion moves the template's default last, just after the record names the version
    assert wait_until(lambda: images.default_version() == images.image_record().template_version, 10)
    version, record = images.default_version(), images.image_record()
    invoked = images.sandbox.pump.invocations.started.get("images", 0)
    ecr = runtime.aws().client("ecr")
    ecr.create_repository(repositoryName="ci/unrelated")
    ecr.put_image(
        repositoryName="ci/unrelated", imageManifest=manifest("x"), imageTag="latest", imageDigest=digest("x")
    )
    images.push(digest("base-other-tag"), tag="nightly")
    # both events reached the images function, and it is done with them
    images.until(lambda: images.sandbox.pump.invocations.started.get("images", 0) >= invoked + 2)
    assert wait_until(lambda: images.sandbox.pump.running("images") == 0, 20)
    assert images.default_version() == version
    assert images.image_record() == record


def test_the_same_push_twice_and_an_older_push_arriving_late_change_nothing(images: Images) -> None:
    from chalicelib.images.events import parse_image_event

    rotation = runtime.image_rotation()
    pool = images.pool

    def event(image: str, at: str, event_id: str) -> dict[str, Any]:
        return {
            "version": "0",
            "id": event_id,
            "detail-type": "ECR Image Action",
            "source": "aws.ecr",
            "account": "123456789012",
            "time": at,
            "region": images.ec2.meta.region_name,
            "resources": [],
            "detail": {
                "result": "SUCCESS",
                "repository-name": pool.image.repository,
                "image-digest": image,
                "action-type": "PUSH",
                "image-tag": pool.image.tag,
            },
        }

    newer = parse_image_event(event(digest("new"), "2026-12-06T10:00:05Z", "e-2"))
    older = parse_image_event(event(digest("old"), "2026-12-06T10:00:01Z", "e-1"))

    def docker(outcomes: list[Any]) -> Any:
        (outcome,) = [o for o in outcomes if o.pool == "docker"]
        return outcome

    first = docker(rotation.handle(newer))
    version = images.default_version()
    again = docker(rotation.handle(newer))
    late = docker(rotation.handle(older))
    assert (first.verdict.value, again.verdict.value, late.verdict.value) == ("promoted", "duplicate", "superseded")
    assert images.default_version() == version
    assert images.image_record().current.digest == digest("new")


def test_a_gated_pool_promotes_a_push_only_once_its_scan_passes_and_refuses_a_critical_one(images: Images) -> None:
    images = gated(images, "HIGH")
    good, bad = digest("gated-good"), digest("gated-bad")
    before = images.default_version()

    images.push(good)
    images.until(lambda: images.image_record().candidate is not None)
    assert images.image_record().candidate.digest == good
    assert images.default_version() == before  # held for its scan

    images.scanned(good, MEDIUM=3)
    images.promoted(good)
    promoted = images.default_version()
    assert promoted > before

    images.push(bad)
    images.scanned(bad, CRITICAL=1, HIGH=2)
    images.until(lambda: bool(images.image_record().history) and images.image_record().history[0].digest == bad)
    record = images.image_record()
    assert record.current.digest == good and record.candidate is None
    assert record.history[0].digest == bad and record.history[0].outcome.value == "rejected"
    assert images.default_version() == promoted


def test_a_scan_that_never_comes_is_reported_by_reconcile_as_scan_timeout(images: Images) -> None:
    images = gated(images, "HIGH")
    images.push(digest("never-scanned"))
    images.until(lambda: images.image_record().candidate is not None)
    assert images.reconcile().metrics.get("ImageScanTimeout") is None
    report = images.reconcile(offset=5 * 60 + 1)
    assert report.done.get("ExpireScan") == 1
    assert images.image_record().candidate.state.value == "scan_timeout"
    # reported once: the next run has nothing to do for it
    assert images.reconcile(offset=5 * 60 + 2).done.get("ExpireScan") is None


def test_reconcile_makes_the_recorded_version_the_default_when_a_promotion_stopped_before(images: Images) -> None:
    images.push(digest("base-1"))
    images.promoted(digest("base-1"))
    recorded = images.image_record().template_version
    name = launch_template_name(images.config.fleet, "docker")
    images.ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion="1")
    report = images.reconcile()
    assert report.done.get("SetDefaultVersion") == 1
    assert images.default_version() == recorded


def test_rollback_pins_the_earlier_digest_and_a_push_waits_for_unpin(images: Images) -> None:
    first, second, third = digest("r-1"), digest("r-2"), digest("r-3")
    for image in (first, second):
        images.push(image)
        images.until(lambda image=image: images.current() == image)
    rotation = runtime.image_rotation()
    back = rotation.rollback("docker")
    assert back.digest == first and back.verdict.value == "promoted"
    images.push(third)
    images.until(lambda: images.image_record().deferred is not None)
    record = images.image_record()
    assert record.pinned and record.current.digest == first and record.deferred.digest == third
    unpinned = rotation.unpin("docker")
    assert unpinned.digest == third
    assert images.image_record().current.digest == third


def test_scale_up_launches_from_the_version_the_pools_record_names_not_the_templates_default(images: Images) -> None:
    """A promotion records the pool's new version before it moves the template's default; a launch in between (or
    after a promotion that stopped there) must already run the new image."""
    images.push(digest("named-1"))
    images.promoted(digest("named-1"))
    recorded = images.image_record().template_version
    name = launch_template_name(images.config.fleet, "docker")
    images.ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion="1")
    (job,) = images.pipeline(SHORT_JOB)
    assert wait_until(lambda: images.job(job)["status"] == "success", 40)
    instance = str(described_instance(images.job(job)["runner"]["description"]))
    tags = images.ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]["Tags"]
    assert {t["Key"]: t["Value"] for t in tags}["aws:ec2launchtemplate:version"] == str(recorded)
    assert images.runner_image(instance).endswith("@" + digest("named-1"))


def test_two_pushes_in_the_same_second_end_on_the_digest_the_tag_names_whatever_order_their_events_arrive(
    images: Images,
) -> None:
    """EventBridge gives event times to the second: for two pushes of one tag in the same second, the images
    function asks ECR which digest the tag names now (DescribeImages), so the push made last wins."""
    from chalicelib.images.handler import handle_image_event

    first, last = sorted([digest("same-second-a"), digest("same-second-b")], reverse=True)
    images.push(first)
    images.push(last)  # the tag now names ``last``, the smaller digest
    rotation = runtime.image_rotation()
    region = images.ec2.meta.region_name
    # One second for both, after the events the local ECR put for these pushes (which the pump delivers too, and
    # which these therefore supersede, whatever their order).
    same_second = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))

    def event(image: str) -> dict[str, Any]:
        return {
            "version": "0",
            "id": f"same-second-{image[-6:]}",
            "detail-type": "ECR Image Action",
            "source": "aws.ecr",
            "account": "123456789012",
            "time": same_second,
            "region": region,
            "resources": [],
            "detail": {
                "result": "SUCCESS",
                "repository-name": images.pool.image.repository,
                "image-digest": image,
                "action-type": "PUSH",
                "image-tag": images.pool.image.tag,
            },
        }

    # the last push's event arrives first, then the first push's: the first is the larger digest, which the
    # digest order alone would let win
    handle_image_event(event(last), rotation)
    handle_image_event(event(first), rotation)
    assert images.current() == last

"""CI image rotation from the operator's side, against a moto server: bootstrap records each pool's first digest,
a push promotes a new launch template version that a bootstrap rerun keeps, and ``fleetctl image history``,
``rollback``, ``pin`` and ``unpin`` and ``fleetctl status`` show and move each pool's image.

ECR's push events are built as ECR sends them (tests/fixtures/aws/ecr-image-action-push.json) and handed to
:class:`ImageRotation` as the images handler does; moto's ECR does not hash manifests, so each push names its
digest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from chalicelib.aws import AwsClients
from chalicelib.config import FleetConfig, parse_config
from chalicelib.images.decisions import Verdict
from chalicelib.images.events import ImageEvent, parse_image_event
from chalicelib.images.record import PromotedBy
from chalicelib.images.rotation import ImageRotation
from chalicelib.images.store import ImageStore
from chalicelib.naming import launch_template_name
from chalicelib.scaling.userdata import RUNNER_CONFIG_FILE
from fleetctl.bootstrap import Bootstrapper, Verb
from fleetctl.cli import main
from fleetctl.images import image_rotation
from fleetctl.sandbox.local_aws import SANDBOX_REGION, LocalAws
from fleetctl.sandbox.network import SandboxNetwork, create_sandbox_network, register_sandbox_amis
from tests.integration.test_bootstrap import AMI_PARAMETER, FLEET, config_document

ACCOUNT = "123456789012"  # moto's
TABLE = "bootstrap-test"
DOCKER, BUILD = "docker", "build"
PUSH_EVENT = Path(__file__).parents[1] / "fixtures" / "aws" / "ecr-image-action-push.json"


def digest_of(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


UNKNOWN = digest_of("never pushed")


# ---- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture
def clients(local_aws: LocalAws) -> AwsClients:
    local_aws.reset()
    return AwsClients(region=SANDBOX_REGION)


@pytest.fixture
def network(clients: AwsClients) -> SandboxNetwork:
    register_sandbox_amis(clients.ssm, clients.ec2, AMI_PARAMETER)
    return create_sandbox_network(clients.ec2)


@pytest.fixture
def config(network: SandboxNetwork) -> FleetConfig:
    return parse_config(config_document(network))


@pytest.fixture
def stage(config: FleetConfig, tmp_path: Path) -> Path:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    return path


@pytest.fixture
def rotation(config: FleetConfig, clients: AwsClients) -> ImageRotation:
    return image_rotation(config, clients)


def bootstrap(config: FleetConfig, clients: AwsClients) -> tuple[list[Any], list[str]]:
    """One ``fleetctl bootstrap``: its plan and what recording the images said."""
    subject = Bootstrapper(config, clients, token_factory=lambda: "webhook-token-value-0123456789abcdef")
    plan = subject.plan()
    return plan, subject.execute(plan)


class Registry:
    """The sandbox's ECR, pushed to as ``docker push`` ends (PutImage). Each push is stamped a second after the
    one before: ECR's events give their time to the second, and two pushes in one second would be ordered by
    digest (chalicelib/images/decisions.py), not by the order a test makes them in."""

    def __init__(self, clients: AwsClients) -> None:
        self._ecr = clients.client("ecr")
        self._last = 0.0

    def push(self, repository: str, tag: str, name: str) -> tuple[str, float]:
        """A new image under ``tag``, creating the repository if need be; returns its digest and push time."""
        with contextlib.suppress(self._ecr.exceptions.RepositoryAlreadyExistsException):
            self._ecr.create_repository(repositoryName=repository)
        digest = digest_of(f"{repository}/{name}")
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7, "digest": digest},
            "layers": [],
        }
        self._ecr.put_image(
            repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=tag, imageDigest=digest
        )
        [detail] = self._ecr.describe_images(repositoryName=repository, imageIds=[{"imageDigest": digest}])[
            "imageDetails"
        ]
        self._last = max(math.floor(detail["imagePushedAt"].timestamp()), self._last) + 1.0
        return digest, self._last


@pytest.fixture
def registry(clients: AwsClients) -> Registry:
    return Registry(clients)


def push_event(repository: str, tag: str, digest: str, pushed_at: float) -> ImageEvent:
    """ECR's "ECR Image Action" event for the push, in the sandbox's account and region."""
    raw = json.loads(PUSH_EVENT.read_text())
    raw |= {
        "id": f"push-{digest[-12:]}",
        "account": ACCOUNT,
        "region": SANDBOX_REGION,
        "time": datetime.fromtimestamp(pushed_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    raw["detail"] |= {"repository-name": repository, "image-digest": digest, "image-tag": tag}
    return parse_image_event(raw)


def template(clients: AwsClients, pool: str) -> dict[str, Any]:
    found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[launch_template_name(FLEET, pool)])
    return dict(found["LaunchTemplates"][0])


def runner_config(clients: AwsClients, pool: str, version: int | None = None) -> str:
    """The config.toml the template's user data (a base64 #cloud-config) writes, of its default version or
    ``version``."""
    found = template(clients, pool)
    number = version if version is not None else found["DefaultVersionNumber"]
    [described] = clients.ec2.describe_launch_template_versions(
        LaunchTemplateId=found["LaunchTemplateId"], Versions=[str(number)]
    )["LaunchTemplateVersions"]
    cloud_config = yaml.safe_load(base64.b64decode(described["LaunchTemplateData"]["UserData"]).decode())
    [toml] = [entry["content"] for entry in cloud_config["write_files"] if entry["path"] == RUNNER_CONFIG_FILE]
    return str(toml)


def fleetctl(stage: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(stage)])


def promoted(rotation: ImageRotation, registry: Registry, repository: str, name: str) -> str:
    """A push to the docker pool's tag, handled as the images Lambda does; returns its digest."""
    digest, pushed_at = registry.push(repository, "latest", name)
    [outcome] = rotation.handle(push_event(repository, "latest", digest, pushed_at))
    assert outcome.verdict is Verdict.PROMOTED, outcome
    return digest


# ---- bootstrap and promotion -------------------------------------------------------------------------------


def test_bootstrap_records_each_pools_first_digest_and_a_rerun_keeps_everything(
    clients: AwsClients, config: FleetConfig, rotation: ImageRotation, registry: Registry
) -> None:
    # given both pools' images pushed, in a fresh account (the table is created by the same bootstrap)
    first = {
        DOCKER: registry.push("ci/build-base", "latest", "one")[0],
        BUILD: registry.push("ci/dind", "latest", "a")[0],
    }

    # when
    _, recorded = bootstrap(config, clients)

    # then each pool's record names its digest, by bootstrap, with the template's first version
    images = ImageStore(TABLE, clients.dynamodb)
    for pool, digest in first.items():
        record = rotation.history(pool)
        assert record.current is not None
        assert (record.current.digest, record.current.tag, record.current.by) == (
            digest,
            "latest",
            PromotedBy.BOOTSTRAP,
        )
        assert record.current.pushed_at > 0
        assert (record.template_version, images.template_version(pool)) == (1, 1)
        assert not record.pinned and record.candidate is None
        assert f"@{digest}" in runner_config(clients, pool)
    assert recorded == [
        f"recorded image {first[DOCKER]} for pool docker, launch template version 1",
        f"recorded image {first[BUILD]} for pool build, launch template version 1",
    ]

    # and a rerun keeps everything: no new version, the records untouched (the GitLab token is left unset here)
    revisions = {pool: rotation.history(pool).revision for pool in first}
    plan, again = bootstrap(config, clients)
    assert [change.describe() for change in plan if change.verb not in (Verb.KEEP, Verb.MISSING)] == []
    assert [change.kind for change in plan if change.verb is Verb.MISSING] == ["parameter"]
    assert again == []
    for pool in first:
        assert template(clients, pool)["LatestVersionNumber"] == 1
        assert rotation.history(pool).revision == revisions[pool]


def test_a_push_promotes_a_new_template_version_that_a_bootstrap_rerun_keeps(
    clients: AwsClients, config: FleetConfig, rotation: ImageRotation, registry: Registry
) -> None:
    # given the docker pool bootstrapped on its first digest
    first, _ = registry.push("ci/build-base", "latest", "one")
    bootstrap(config, clients)

    # when a new image is pushed to its tag and ECR's event handled
    second, pushed_at = registry.push("ci/build-base", "latest", "two")
    [outcome] = rotation.handle(push_event("ci/build-base", "latest", second, pushed_at))

    # then a new default version names the new digest in config.toml, and the record and counter item name it
    assert (outcome.verdict, outcome.digest, outcome.template_version) == (Verdict.PROMOTED, second, 2)
    assert template(clients, DOCKER)["DefaultVersionNumber"] == 2
    toml = runner_config(clients, DOCKER)
    assert f'"{ACCOUNT}.dkr.ecr.{SANDBOX_REGION}.amazonaws.com/ci/build-base@{second}"' in toml
    assert f"@{first}" not in toml
    assert f"@{first}" in runner_config(clients, DOCKER, version=1)
    record = rotation.history(DOCKER)
    assert record.current is not None and (record.current.digest, record.current.by) == (second, PromotedBy.PUSH)
    assert ImageStore(TABLE, clients.dynamodb).template_version(DOCKER) == 2

    # and a bootstrap rerun keeps the promoted version: no drift back to anything else
    plan, recorded = bootstrap(config, clients)
    [change] = [c for c in plan if c.name == launch_template_name(FLEET, DOCKER)]
    assert change.verb is Verb.KEEP, change.describe()
    assert change.detail.endswith(
        f"version 2; image ci/build-base@{second} (tag latest; the pool's image record, promoted by push)"
    )
    assert recorded == []
    assert template(clients, DOCKER)["LatestVersionNumber"] == 2
    assert rotation.history(DOCKER).revision == record.revision


# ---- the operator's commands -------------------------------------------------------------------------------


def test_history_rollback_pin_and_unpin(
    clients: AwsClients, config: FleetConfig, rotation: ImageRotation, registry: Registry, stage: Path
) -> None:
    # given the docker pool bootstrapped on one digest, then promoted to a second
    first, _ = registry.push("ci/build-base", "latest", "one")
    bootstrap(config, clients)
    second = promoted(rotation, registry, "ci/build-base", "two")

    # when the operator looks: both digests, newest first, each with how it came
    shown = fleetctl(stage, "image", "history", DOCKER)
    assert shown.exit_code == 0, shown.output
    assert f"current:   {second} (tag latest), promoted " in shown.output
    assert "pinned:    no" in shown.output
    assert "launch template version: 2" in shown.output
    assert shown.output.index(second) < shown.output.rindex(first)
    assert " by push" in shown.output and "bootstrap" in shown.output
    document = json.loads(fleetctl(stage, "image", "history", DOCKER, "--json").output)
    assert [(v["digest"], v["outcome"], v["by"]) for v in document["history"]] == [
        (second, "promoted", "push"),
        (first, "promoted", "bootstrap"),
    ]
    assert (document["current"]["digest"], document["pinned"], document["template_version"]) == (second, False, 2)
    assert document["current"]["promoted_at"].endswith("Z")

    # when the operator rolls back
    rolled = fleetctl(stage, "image", "rollback", DOCKER)

    # then the first digest runs again, in a new default version, and the pool is pinned
    assert rolled.exit_code == 0, rolled.output
    assert f"pool docker rolled back from {second} to {first}: launch template version 3" in rolled.output
    assert "pool docker is pinned: pushes wait until 'fleetctl image unpin docker'" in rolled.output
    record = rotation.history(DOCKER)
    assert record.current is not None
    assert (record.current.digest, record.current.by, record.pinned) == (first, PromotedBy.OPERATOR, True)
    assert template(clients, DOCKER)["DefaultVersionNumber"] == 3
    assert f"@{first}" in runner_config(clients, DOCKER)

    # when a push comes while pinned: nothing moves, the push waits
    third, pushed_at = registry.push("ci/build-base", "latest", "three")
    [outcome] = rotation.handle(push_event("ci/build-base", "latest", third, pushed_at))
    assert outcome.verdict is Verdict.DEFERRED_PINNED
    assert template(clients, DOCKER)["LatestVersionNumber"] == 3
    waiting = rotation.history(DOCKER)
    assert waiting.current is not None and waiting.current.digest == first
    assert waiting.deferred is not None and waiting.deferred.digest == third
    assert f"a push of {third} (tag latest, " in fleetctl(stage, "image", "history", DOCKER).output

    # when a digest ECR does not have is pinned: refused, naming the repository, and nothing changes
    refused = fleetctl(stage, "image", "pin", DOCKER, UNKNOWN)
    assert refused.exit_code == 1
    assert f"Error: ECR repository ci/build-base has no image {UNKNOWN}; nothing was changed" in refused.output
    assert rotation.history(DOCKER) == waiting
    assert template(clients, DOCKER)["LatestVersionNumber"] == 3
    # and so is a rollback to a digest the pool never ran
    never = fleetctl(stage, "image", "rollback", DOCKER, "--to", UNKNOWN)
    assert never.exit_code == 1
    assert f"pool docker has no digest {UNKNOWN} in its history to roll back to" in never.output
    assert rotation.history(DOCKER) == waiting

    # when the operator unpins: the push that waited is promoted now
    unpinned = fleetctl(stage, "image", "unpin", DOCKER)
    assert unpinned.exit_code == 0, unpinned.output
    assert f"pool docker unpinned: the push of {third} (tag latest, " in unpinned.output
    assert "is promoted, launch template version 4" in unpinned.output
    record = rotation.history(DOCKER)
    assert record.current is not None
    assert (record.current.digest, record.pinned, record.deferred) == (third, False, None)
    assert template(clients, DOCKER)["DefaultVersionNumber"] == 4
    assert f"@{third}" in runner_config(clients, DOCKER)
    assert "is not pinned; nothing changed" in fleetctl(stage, "image", "unpin", DOCKER).output

    # when the operator pins an image ECR has under another tag: it runs, by the operator, under that tag
    tagged, _ = registry.push("ci/build-base", "release-7", "seven")
    pinned = fleetctl(stage, "image", "pin", DOCKER, tagged)
    assert pinned.exit_code == 0, pinned.output
    assert f"pool docker pinned from {third} to {tagged}: launch template version 5" in pinned.output
    record = rotation.history(DOCKER)
    assert record.current is not None
    assert (record.current.digest, record.current.tag, record.current.by) == (tagged, "release-7", PromotedBy.OPERATOR)
    assert record.pinned
    assert f"@{tagged}" in runner_config(clients, DOCKER)

    # and a pool the stage does not have is refused by name
    missing = fleetctl(stage, "image", "history", "nope")
    assert missing.exit_code == 1 and f"no pool 'nope' in the {FLEET} configuration" in missing.output


# ---- status ------------------------------------------------------------------------------------------------


def launch(clients: AwsClients, network: SandboxNetwork, pool: str, count: int) -> None:
    """Instances launched from the pool's template default version, as CreateFleet would (EC2 tags each with
    the version, ``aws:ec2launchtemplate:version``)."""
    clients.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": launch_template_name(FLEET, pool), "Version": "$Default"},
        InstanceType="m7i.large",
        SubnetId=network.subnet_ids[0],
        MinCount=count,
        MaxCount=count,
    )


def test_status_shows_each_pools_image_pin_and_rollout(
    clients: AwsClients,
    config: FleetConfig,
    network: SandboxNetwork,
    rotation: ImageRotation,
    registry: Registry,
    stage: Path,
) -> None:
    # given the docker pool on its first digest with two runners, then promoted, with one runner of the new version
    registry.push("ci/build-base", "latest", "one")
    bootstrap(config, clients)
    launch(clients, network, DOCKER, 2)
    second = promoted(rotation, registry, "ci/build-base", "two")
    launch(clients, network, DOCKER, 1)

    # when
    shown = fleetctl(stage, "status", "--json")

    # then the docker pool shows its digest, not pinned, and one of its three runners on the pool's version
    assert shown.exit_code == 0, shown.output
    pools = {pool["name"]: pool for pool in json.loads(shown.stdout.strip().splitlines()[-1])["pools"]}
    docker = pools[DOCKER]
    assert (docker["image"], docker["image_digest"], docker["image_pinned"]) == (
        "ci/build-base:latest",
        second,
        False,
    )
    assert (docker["image_candidate"], docker["image_deleted"], docker["template_version"]) == (None, False, 2)
    assert docker["rollout"] == {"version": 2, "on_version": 1, "on_other": 2, "unknown": 0, "total": 3}
    # the build pool has no image in ECR: nothing recorded, its template's default version
    build = pools[BUILD]
    assert (build["image_digest"], build["image_pinned"], build["template_version"]) == (None, False, 1)
    assert build["rollout"] == {"version": 1, "on_version": 0, "on_other": 0, "unknown": 0, "total": 0}

    # and once rolled back, the table says so in one line per pool
    assert fleetctl(stage, "image", "rollback", DOCKER).exit_code == 0
    first = rotation.history(DOCKER).current
    assert first is not None and first.digest != second
    table = fleetctl(stage, "status").output
    docker_table = table[table.index("pool docker") : table.index("pool build")]
    assert f"  image         ci/build-base@{first.digest[:15]}… (pinned) rollout 0/3 on version 3\n" in docker_table
    build_table = table[table.index("pool build") :]
    assert "  image         ci/dind:latest (no digest recorded) rollout 0/0 on version 1\n" in build_table

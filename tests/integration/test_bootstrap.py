"""``fleetctl bootstrap`` against a real moto server: what a first run creates, that a second changes nothing,
that drift becomes an update, and that the plan alone (``--dry-run``) touches nothing and never shows a secret.

The runner instance policy is checked at the end without AWS: it is a pure function of the config.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from chalicelib.aws import AwsClients
from chalicelib.config import FleetConfig, parse_config
from chalicelib.images.record import PromotedBy
from chalicelib.images.store import ImageStore
from chalicelib.naming import (
    FLEET_TAG,
    POOL_TAG,
    launch_template_name,
    runner_role_name,
    runner_role_path,
)
from fleetctl.bootstrap import Bootstrapper, Change, PlanRefusedError, Verb
from fleetctl.doctor import Doctor
from fleetctl.iam_policies import RUNNER_POLICY_NAME, ec2_trust_policy, runner_instance_policy
from fleetctl.lambda_policies import CHALICE_CONFIG
from fleetctl.sandbox.local_aws import SANDBOX_REGION, LocalAws
from fleetctl.sandbox.network import (
    SANDBOX_ROOT_DEVICE,
    SandboxNetwork,
    create_sandbox_network,
    register_sandbox_amis,
)
from fleetctl.state_resources import (
    JOBS_MAX_RECEIVE_COUNT,
    create_table_arguments,
    dead_letter_queue_attributes,
    jobs_queue_attributes,
    redrive_policy,
    ttl_specification,
)

FLEET = "bootstrap-test"
AMI_PARAMETER = "/runner-fleet/test/runner-ami"
X86_PARAMETER = f"{AMI_PARAMETER}/x86_64"
ARM_PARAMETER = f"{AMI_PARAMETER}/arm64"
CACHE_BUCKET = "bootstrap-test-cache"
WEBHOOK_TOKEN = "webhook-token-value-0123456789abcdef"
SIGNING_SECRET = "whsec_c2lnbmluZy1zZWNyZXQtdmFsdWUtMDEyMzQ1Njc4OQ=="
GITLAB_TOKEN = "glpat-bootstrap-test-token"
SECRETS = (WEBHOOK_TOKEN, SIGNING_SECRET, GITLAB_TOKEN)
# Amazon Linux 2023 images moto knows: their root device is /dev/xvda, unlike the sandbox's stand-in AMI.
AMAZON_LINUX = ({"Name": "name", "Values": ["al2023-ami-2023*"]}, {"Name": "architecture", "Values": ["x86_64"]})


def config_document(network: SandboxNetwork | None = None, *, build_disk: int = 80) -> dict[str, Any]:
    subnets = list(network.subnet_ids) if network else ["subnet-0a1b2c3d4e5f60718"]
    groups = [network.security_group_id] if network else ["sg-0a1b2c3d4e5f60718"]
    pool = {
        "instance_types": ["m7i.large", "m6i.large"],
        "subnets": subnets,
        "security_groups": groups,
        "max_runners": 5,
    }
    return {
        "fleet": FLEET,
        "region": SANDBOX_REGION,
        "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/runner-fleet/test/gitlab-token"},
        "webhook": {
            "token_parameter": "/runner-fleet/test/webhook-token",
            "signing_secret_parameter": "/runner-fleet/test/signing-secret",
        },
        "state": {
            "table": "bootstrap-test",
            "jobs_queue": "bootstrap-test-jobs",
            "dead_letter_queue": "bootstrap-test-jobs-dlq",
        },
        "cache_bucket": CACHE_BUCKET,
        "ami_parameter": AMI_PARAMETER,
        "pools": [
            {**pool, "name": "docker", "tags": ["docker"], "image": {"repository": "ci/build-base"}},
            {
                **pool,
                "name": "build",
                "tags": ["dind"],
                "image": {"repository": "ci/dind", "push": True},
                "privileged": True,
                "ephemeral": True,
                "access_level": "ref_protected",
                "disk_gib": build_disk,
            },
        ],
    }


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def clients(local_aws: LocalAws) -> AwsClients:
    local_aws.reset()
    return AwsClients(region=SANDBOX_REGION)


@pytest.fixture
def network(clients: AwsClients) -> SandboxNetwork:
    return create_sandbox_network(clients.ec2)


@pytest.fixture
def amis(clients: AwsClients) -> dict[str, str]:
    return register_sandbox_amis(clients.ssm, clients.ec2, AMI_PARAMETER)


@pytest.fixture
def ami(amis: dict[str, str]) -> str:
    """The x86_64 runner AMI: the test config's pools run Intel types."""
    return amis["x86_64"]


@pytest.fixture
def config(network: SandboxNetwork, ami: str) -> FleetConfig:
    return parse_config(config_document(network))


def bootstrapper(config: FleetConfig, clients: AwsClients, gitlab_token: str | None = GITLAB_TOKEN) -> Bootstrapper:
    return Bootstrapper(
        config,
        clients,
        gitlab_token=gitlab_token,
        token_factory=lambda: WEBHOOK_TOKEN,
    )


def run(config: FleetConfig, clients: AwsClients) -> list[Change]:
    subject = bootstrapper(config, clients)
    plan = subject.plan()
    subject.execute(plan)
    return plan


def by_name(plan: list[Change]) -> dict[str, Change]:
    return {change.name: change for change in plan}


def change_of(plan: list[Change], kind: str, name: str) -> Change:
    [found] = [change for change in plan if (change.kind, change.name) == (kind, name)]
    return found


def default_template_data(clients: AwsClients, name: str) -> dict[str, Any]:
    found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    versions = clients.ec2.describe_launch_template_versions(
        LaunchTemplateId=found["LaunchTemplateId"], Versions=[str(found["DefaultVersionNumber"])]
    )["LaunchTemplateVersions"]
    return dict(versions[0]["LaunchTemplateData"])


def template_tags(clients: AwsClients, name: str) -> dict[str, str]:
    found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    tags = clients.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [found["LaunchTemplateId"]]}])["Tags"]
    return {tag["Key"]: tag["Value"] for tag in tags}


def spot_roles(clients: AwsClients) -> list[dict[str, Any]]:
    return list(clients.client("iam").list_roles(PathPrefix="/aws-service-role/spot.amazonaws.com/")["Roles"])


# ---- the sandbox network -----------------------------------------------------------------------------------


def test_sandbox_network_ids_pass_config_validation(clients: AwsClients, network: SandboxNetwork, ami: str) -> None:
    # given a network and AMI made in moto
    subnets = clients.ec2.describe_subnets(SubnetIds=list(network.subnet_ids))["Subnets"]
    group = clients.ec2.describe_security_groups(GroupIds=[network.security_group_id])["SecurityGroups"][0]

    # when the config names them
    config = parse_config({**config_document(network), "pools": [{**config_document(network)["pools"][0], "ami": ami}]})

    # then they validate, the subnets sit in distinct zones and the group allows egress only
    assert config.pools[0].subnets == network.subnet_ids
    assert len({subnet["AvailabilityZone"] for subnet in subnets}) == 2
    assert {subnet["VpcId"] for subnet in subnets} == {network.vpc_id}
    assert group["IpPermissions"] == []
    assert group["IpPermissionsEgress"]
    stored = clients.ssm.get_parameter(Name=X86_PARAMETER)["Parameter"]
    assert (stored["Type"], stored["DataType"], stored["Value"]) == ("String", "aws:ec2:image", ami)


# ---- first run, second run --------------------------------------------------------------------------------


def test_first_run_creates_everything(clients: AwsClients, config: FleetConfig, ami: str) -> None:
    # when
    plan = run(config, clients)

    # then every change was a creation, in dependency order
    assert [(change.kind, change.verb) for change in plan] == [
        ("table", Verb.CREATE),
        ("queue", Verb.CREATE),
        ("queue", Verb.CREATE),
        ("parameter", Verb.CREATE),
        ("parameter", Verb.CREATE),
        ("role", Verb.CREATE),
        ("policy", Verb.CREATE),
        ("profile", Verb.CREATE),
        ("role", Verb.CREATE),
        ("policy", Verb.CREATE),
        ("profile", Verb.CREATE),
        ("spot_role", Verb.CREATE),
        ("template", Verb.CREATE),
        ("template", Verb.CREATE),
        ("bucket", Verb.CREATE),
    ]
    docker = launch_template_name(FLEET, "docker")
    assert by_name(plan)[docker].describe() == (
        f"create   template   {docker} ({ami} (x86_64), 1 version; "
        "image ci/build-base:latest, not pinned: no repository ci/build-base in ECR)"
    )

    # the state side
    ddb, sqs, ssm = clients.dynamodb, clients.sqs, clients.ssm
    table = ddb.describe_table(TableName="bootstrap-test")["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    # the sparse indexes: scale-up counts a pool's idle runners in one, reconcile reads the live records in the other
    indexes = {index["IndexName"]: index for index in table["GlobalSecondaryIndexes"]}
    assert sorted(indexes) == ["fleet-records", "idle-runners", "token-deadlines"]
    assert [k["AttributeName"] for k in indexes["idle-runners"]["KeySchema"]] == ["idle_pool", "idle_since"]
    assert [k["AttributeName"] for k in indexes["fleet-records"]["KeySchema"]] == ["live", "pk"]
    # the token index holds keys only: no runner token value is ever copied into it
    assert [k["AttributeName"] for k in indexes["token-deadlines"]["KeySchema"]] == ["token_index", "token_due"]
    assert indexes["token-deadlines"]["Projection"]["ProjectionType"] == "KEYS_ONLY"
    ttl = ddb.describe_time_to_live(TableName="bootstrap-test")["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "ttl"
    dlq_url = sqs.get_queue_url(QueueName="bootstrap-test-jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    jobs_url = sqs.get_queue_url(QueueName="bootstrap-test-jobs")["QueueUrl"]
    redrive = json.loads(
        sqs.get_queue_attributes(QueueUrl=jobs_url, AttributeNames=["RedrivePolicy"])["Attributes"]["RedrivePolicy"]
    )
    assert redrive["deadLetterTargetArn"] == dlq_arn
    assert int(redrive["maxReceiveCount"]) == JOBS_MAX_RECEIVE_COUNT
    for name, value in (
        ("/runner-fleet/test/webhook-token", WEBHOOK_TOKEN),
        ("/runner-fleet/test/gitlab-token", GITLAB_TOKEN),
    ):
        stored = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
        assert (stored["Type"], stored["Value"]) == ("SecureString", value)
    # the signing secret is left to `gitlab connect`, which writes it once GitLab signs the hook
    signing = ssm.get_parameters(Names=["/runner-fleet/test/signing-secret"])
    assert signing["InvalidParameters"] == ["/runner-fleet/test/signing-secret"]

    # each pool's role, its policy and the profile holding it, under the fleet's path
    iam = clients.client("iam")
    for pool in config.pools:
        role_name = runner_role_name(FLEET, pool.name)
        role = iam.get_role(RoleName=role_name)["Role"]
        assert role["Path"] == runner_role_path(FLEET) == f"/runner-fleet/{FLEET}/"
        trust = role["AssumeRolePolicyDocument"]["Statement"]
        assert [(s["Principal"], s["Action"]) for s in trust] == [({"Service": "ec2.amazonaws.com"}, "sts:AssumeRole")]
        assert {"Key": POOL_TAG, "Value": pool.name} in role["Tags"]
        document = iam.get_role_policy(RoleName=role_name, PolicyName=RUNNER_POLICY_NAME)["PolicyDocument"]
        assert document == runner_instance_policy(config, pool)
        profile = iam.get_instance_profile(InstanceProfileName=role_name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role_name]
        assert profile["Path"] == runner_role_path(FLEET)
    assert len({runner_role_name(FLEET, pool.name) for pool in config.pools}) == len(config.pools)

    # one hardened template per pool, read back from EC2 (moto ignores these settings when it launches, so the
    # template data is where they are checked), its root volume under the AMI's own root device name
    root_device = clients.ec2.describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
    assert root_device == SANDBOX_ROOT_DEVICE == "/dev/sda1"
    for pool in config.pools:
        data = default_template_data(clients, launch_template_name(FLEET, pool.name))
        assert data["ImageId"] == ami
        assert data["IamInstanceProfile"] == {"Name": runner_role_name(FLEET, pool.name)}
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        # job containers reach the role's credentials only in the pool that pushes its image (build)
        assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == (2 if pool.image.push else 1)
        assert data["MetadataOptions"]["HttpEndpoint"] == "enabled"
        [root] = data["BlockDeviceMappings"]
        assert root["DeviceName"] == root_device
        assert root["Ebs"] == {
            "VolumeType": "gp3",
            "VolumeSize": pool.disk_gib,
            "Encrypted": True,
            "DeleteOnTermination": True,
        }
        assert "KeyName" not in data
        # user data: the pool's settings for the AMI's boot script, and never a secret
        user_data = base64.b64decode(data["UserData"]).decode()
        assert user_data.startswith("#cloud-config\n")
        assert f"RUNNER_FLEET_POOL={pool.name}" in user_data
        assert f"RUNNER_MAX_BUILDS={pool.max_builds}" in user_data
        assert f".dkr.ecr.us-east-1.amazonaws.com/{pool.image.repository}:{pool.image.tag}" in user_data
        assert not [secret for secret in SECRETS if secret in user_data]
        assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
        assert data["SecurityGroupIds"] == list(pool.security_groups)
        assert data["Monitoring"] == {"Enabled": False}
        tagged = {
            spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]} for spec in data["TagSpecifications"]
        }
        assert tagged == {kind: {FLEET_TAG: FLEET, POOL_TAG: pool.name} for kind in ("instance", "volume")}
        # the template itself carries the fleet's tag: scale-up's policy launches from no other template
        assert template_tags(clients, launch_template_name(FLEET, pool.name)) == {FLEET_TAG: FLEET}
    assert (
        default_template_data(clients, launch_template_name(FLEET, "build"))["BlockDeviceMappings"][0]["Ebs"][
            "VolumeSize"
        ]
        == 80
    )

    # the cache bucket: private, encrypted, expiring
    s3 = clients.client("s3")
    block = s3.get_public_access_block(Bucket=CACHE_BUCKET)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    [encryption] = s3.get_bucket_encryption(Bucket=CACHE_BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert encryption["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    [rule] = s3.get_bucket_lifecycle_configuration(Bucket=CACHE_BUCKET)["Rules"]
    assert (rule["Status"], rule["Expiration"]) == ("Enabled", {"Days": 14})


def stack_owned(network: SandboxNetwork) -> FleetConfig:
    """The test fleet with ``state.owner: stack``: the deployment stack owns its table and queues."""
    document = config_document(network)
    document["state"]["owner"] = "stack"
    return parse_config(document)


def deploy_state_as_the_stack_does(config: FleetConfig, clients: AwsClients) -> None:
    """The table and queues with the settings the stack's template gives them (``fleetctl.state_resources``)."""
    state = config.state
    clients.dynamodb.create_table(**create_table_arguments(state.table, config.fleet))
    clients.dynamodb.update_time_to_live(TableName=state.table, TimeToLiveSpecification=ttl_specification())
    sqs = clients.sqs
    dlq_url = sqs.create_queue(QueueName=state.dead_letter_queue, Attributes=dead_letter_queue_attributes())["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.create_queue(
        QueueName=state.jobs_queue,
        Attributes={**jobs_queue_attributes(), "RedrivePolicy": json.dumps(redrive_policy(dlq_arn))},
    )


def test_with_the_state_owned_by_the_stack_bootstrap_creates_no_table_or_queue(
    clients: AwsClients, network: SandboxNetwork, ami: str
) -> None:
    # given: a stage whose stack owns the state, not deployed yet
    config = stack_owned(network)

    # when
    plan = run(config, clients)

    # then: the plan says the table and queues are the stack's, and bootstrap made none of them
    stack_says = "owned by the stack (state.owner: stack), not created here: deploy the stack make package builds"
    assert [change.describe() for change in plan[:3]] == [
        f"missing  table      bootstrap-test ({stack_says})",
        f"missing  queue      bootstrap-test-jobs-dlq ({stack_says})",
        f"missing  queue      bootstrap-test-jobs ({stack_says})",
    ]
    assert clients.dynamodb.list_tables()["TableNames"] == []
    assert clients.sqs.list_queues().get("QueueUrls", []) == []
    # what bootstrap owns it still made
    assert [change.verb for change in plan[3:]] == [Verb.CREATE] * (len(plan) - 3)
    assert clients.ssm.get_parameter(Name="/runner-fleet/test/webhook-token", WithDecryption=True)
    assert clients.ec2.describe_launch_templates(LaunchTemplateNames=[launch_template_name(FLEET, "docker")])


def test_a_pinned_image_waits_for_the_stacks_table_to_be_recorded(
    clients: AwsClients, network: SandboxNetwork, ami: str
) -> None:
    # given: the docker pool's CI image is in ECR, and the stack that owns the table is not deployed yet
    config = stack_owned(network)
    digest = push_image(clients, "ci/build-base", "latest")
    subject = bootstrapper(config, clients)

    # when
    lines = subject.execute(subject.plan())

    # then: the template names the image by digest, and bootstrap says the record waits for the table
    user_data = base64.b64decode(default_template_data(clients, launch_template_name(FLEET, "docker"))["UserData"])
    assert f"@{digest}" in user_data.decode()
    assert lines == [
        "image records not written: table bootstrap-test does not exist yet; bootstrap again once the stack is deployed"
    ]

    # when the stack made its table, the next bootstrap records the image
    deploy_state_as_the_stack_does(config, clients)
    subject.execute(subject.plan())

    # then
    assert ImageStore("bootstrap-test", clients.dynamodb).read_many(["docker"])["docker"].current.digest == digest


def test_the_stacks_table_and_queues_are_left_to_it_and_doctor_names_the_stack_as_the_fix(
    clients: AwsClients, network: SandboxNetwork, ami: str
) -> None:
    # given: the stack made the table and queues, and someone shortened the jobs queue's visibility timeout
    config = stack_owned(network)
    deploy_state_as_the_stack_does(config, clients)
    jobs_url = clients.sqs.get_queue_url(QueueName=config.state.jobs_queue)["QueueUrl"]
    clients.sqs.set_queue_attributes(QueueUrl=jobs_url, Attributes={"VisibilityTimeout": "30"})

    # when
    plan = run(config, clients)

    # then: bootstrap found them and changed nothing of the stack's
    assert [change.describe() for change in plan[:3]] == [
        "exists   table      bootstrap-test (owned by the stack)",
        "exists   queue      bootstrap-test-jobs-dlq (owned by the stack)",
        "exists   queue      bootstrap-test-jobs (owned by the stack)",
    ]
    timeout = clients.sqs.get_queue_attributes(QueueUrl=jobs_url, AttributeNames=["VisibilityTimeout"])
    assert timeout["Attributes"]["VisibilityTimeout"] == "30"

    # and doctor judges them by the same settings: the table passes, the jobs queue differs, and its fix is the
    # stack's deployment, not bootstrap
    doctor = Doctor(config, Path("stage.yaml"), clients, drift=list, chalice_config=CHALICE_CONFIG, stage="dev")
    [table] = doctor.check_table()
    assert (table.ok, table.detail) == (True, "bootstrap-test (owned by the stack)")
    dlq, jobs = doctor.check_queues()
    assert dlq.ok
    assert (jobs.ok, jobs.detail) == (False, "bootstrap-test-jobs: differs (set VisibilityTimeout)")
    assert jobs.fix == "state.owner is stack: make package STAGE=dev, then deploy the stack (docs/deploy.md)"


def test_second_run_changes_nothing(clients: AwsClients, config: FleetConfig) -> None:
    # given
    run(config, clients)

    # when
    second = run(config, clients)

    # then
    assert [change.describe() for change in second if change.verb is not Verb.KEEP] == []
    for pool in config.pools:
        found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[launch_template_name(FLEET, pool.name)])
        assert found["LaunchTemplates"][0]["LatestVersionNumber"] == 1


def test_a_fresh_account_gets_the_spot_service_linked_role_once(clients: AwsClients, config: FleetConfig) -> None:
    # given a fresh account: no spot service-linked role, so EC2 would refuse every spot launch
    assert spot_roles(clients) == []

    # when bootstrap runs twice
    first = run(config, clients)
    second = run(config, clients)

    # then the role for spot.amazonaws.com exists, made once and then kept
    [role] = spot_roles(clients)
    assert role["Path"] == "/aws-service-role/spot.amazonaws.com/"
    assert by_name(first)["AWSServiceRoleForEC2Spot"].verb is Verb.CREATE
    assert by_name(second)["AWSServiceRoleForEC2Spot"].verb is Verb.KEEP


def test_a_spot_role_created_between_plan_and_execution_is_fine(clients: AwsClients, config: FleetConfig) -> None:
    # given a plan made while the role was missing
    subject = bootstrapper(config, clients)
    plan = subject.plan()
    assert by_name(plan)["AWSServiceRoleForEC2Spot"].verb is Verb.CREATE

    # when someone else creates it before the plan runs
    clients.client("iam").create_service_linked_role(AWSServiceName="spot.amazonaws.com")
    subject.execute(plan)

    # then executing the plan does not fail on "already exists", and there is one role
    assert len(spot_roles(clients)) == 1


def test_an_untagged_template_is_tagged_without_a_new_version(clients: AwsClients, config: FleetConfig) -> None:
    # given templates made before bootstrap tagged them
    run(config, clients)
    docker = launch_template_name(FLEET, "docker")
    found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[docker])["LaunchTemplates"][0]
    clients.ec2.delete_tags(Resources=[found["LaunchTemplateId"]], Tags=[{"Key": FLEET_TAG}])

    # when
    plan = run(config, clients)

    # then the tag is back and the default version is the same
    assert by_name(plan)[docker].describe() == f"update   template   {docker} (tag {FLEET_TAG})"
    assert template_tags(clients, docker) == {FLEET_TAG: FLEET}
    again = clients.ec2.describe_launch_templates(LaunchTemplateNames=[docker])["LaunchTemplates"][0]
    assert again["LatestVersionNumber"] == 1


# ---- drift -------------------------------------------------------------------------------------------------


def test_changed_disk_size_makes_a_new_default_version(
    clients: AwsClients, config: FleetConfig, network: SandboxNetwork
) -> None:
    # given
    run(config, clients)
    bigger = parse_config(config_document(network, build_disk=120))
    build = launch_template_name(FLEET, "build")

    # when
    plan = run(bigger, clients)

    # then only the build template changed, to a new default version; the old version stays for rollback
    changed = [change.describe() for change in plan if change.verb is not Verb.KEEP]
    assert changed == [
        f"update   template   {build} (new default version 2: BlockDeviceMappings; "
        "image ci/dind:latest, not pinned: no repository ci/dind in ECR)"
    ]
    assert default_template_data(clients, build)["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 120
    found = clients.ec2.describe_launch_templates(LaunchTemplateNames=[build])["LaunchTemplates"][0]
    assert (found["DefaultVersionNumber"], found["LatestVersionNumber"]) == (2, 2)
    first = clients.ec2.describe_launch_template_versions(LaunchTemplateName=build, Versions=["1"])
    assert first["LaunchTemplateVersions"][0]["LaunchTemplateData"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 80
    assert all(change.verb is Verb.KEEP for change in bootstrapper(bigger, clients).plan())


def test_new_ami_in_the_parameter_updates_every_template(clients: AwsClients, config: FleetConfig, ami: str) -> None:
    # given
    run(config, clients)
    other = next(
        image["ImageId"]
        for image in clients.ec2.describe_images(Owners=["amazon"], Filters=list(AMAZON_LINUX))["Images"]
        if image["ImageId"] != ami
    )
    clients.ssm.put_parameter(Name=X86_PARAMETER, Value=other, Type="String", Overwrite=True)

    # when
    plan = run(config, clients)

    # then the templates follow the new image, and its root device name (Amazon Linux: /dev/xvda)
    updates = {change.name: change.detail.split(";")[0] for change in plan if change.verb is Verb.UPDATE}
    assert updates == {
        launch_template_name(FLEET, "docker"): "new default version 2: ImageId, BlockDeviceMappings",
        launch_template_name(FLEET, "build"): "new default version 2: ImageId, BlockDeviceMappings",
    }
    data = default_template_data(clients, launch_template_name(FLEET, "docker"))
    assert data["ImageId"] == other
    assert [m["DeviceName"] for m in data["BlockDeviceMappings"]] == ["/dev/xvda"]


def test_a_key_pair_added_by_hand_is_removed(clients: AwsClients, config: FleetConfig) -> None:
    # given someone made a version with an SSH key the default
    run(config, clients)
    docker = launch_template_name(FLEET, "docker")
    data = default_template_data(clients, docker)
    version = clients.ec2.create_launch_template_version(
        LaunchTemplateName=docker, LaunchTemplateData={**data, "KeyName": "someones-key"}
    )["LaunchTemplateVersion"]["VersionNumber"]
    clients.ec2.modify_launch_template(LaunchTemplateName=docker, DefaultVersion=str(version))

    # when
    plan = run(config, clients)

    # then
    assert by_name(plan)[docker].detail.startswith("new default version 3: KeyName; image ci/build-base:latest")
    assert "KeyName" not in default_template_data(clients, docker)


def test_widened_role_policy_and_unencrypted_bucket_are_put_back(clients: AwsClients, config: FleetConfig) -> None:
    # given
    run(config, clients)
    iam, s3 = clients.client("iam"), clients.client("s3")
    role_name = runner_role_name(FLEET, "docker")
    wide = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_role_policy(RoleName=role_name, PolicyName=RUNNER_POLICY_NAME, PolicyDocument=json.dumps(wide))
    s3.delete_bucket_encryption(Bucket=CACHE_BUCKET)

    # when
    plan = run(config, clients)

    # then
    updates = {(change.kind, change.name): change.detail for change in plan if change.verb is Verb.UPDATE}
    assert updates == {
        ("policy", f"{role_name}/{RUNNER_POLICY_NAME}"): "inline, 5 statements, changed",
        ("bucket", CACHE_BUCKET): "set encryption",
    }
    document = iam.get_role_policy(RoleName=role_name, PolicyName=RUNNER_POLICY_NAME)["PolicyDocument"]
    assert document == runner_instance_policy(config, config.pool("docker"))
    assert s3.get_bucket_encryption(Bucket=CACHE_BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]


# ---- the pools' roles over time ------------------------------------------------------------------------------


def _roles_at_fleet_path(clients: AwsClients) -> list[str]:
    return sorted(r["RoleName"] for r in clients.client("iam").list_roles(PathPrefix=runner_role_path(FLEET))["Roles"])


def _run_instance_with_profile(clients: AwsClients, network: SandboxNetwork, ami: str, profile: str) -> str:
    instance = clients.ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        SubnetId=network.subnet_ids[0],
        IamInstanceProfile={"Name": profile},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": FLEET_TAG, "Value": FLEET}]}],
    )["Instances"][0]
    return str(instance["InstanceId"])


def test_the_role_of_a_pool_no_longer_configured_is_deleted_once_no_instance_runs_with_it(
    clients: AwsClients, config: FleetConfig, network: SandboxNetwork, ami: str
) -> None:
    # given both pools bootstrapped, then the build pool removed from the config while one of its instances runs
    run(config, clients)
    build_role = runner_role_name(FLEET, "build")
    instance = _run_instance_with_profile(clients, network, ami, build_role)
    document = config_document(network)
    document["pools"] = document["pools"][:1]
    smaller = parse_config(document)

    # when bootstrap runs: the role stays while the instance runs with it, and the plan says so
    kept = change_of(run(smaller, clients), "role", build_role)
    assert (kept.kind, kept.verb) == ("role", Verb.KEEP)
    assert kept.detail == f"retired, kept while {instance} run with it; bootstrap again later"
    assert build_role in _roles_at_fleet_path(clients)

    # and once the instance is gone, the next run deletes role, policy and profile
    clients.ec2.terminate_instances(InstanceIds=[instance])
    deleted = change_of(run(smaller, clients), "role", build_role)
    assert (deleted.kind, deleted.verb) == ("role", Verb.DELETE)
    assert _roles_at_fleet_path(clients) == [runner_role_name(FLEET, "docker")]
    profiles = clients.client("iam").list_instance_profiles(PathPrefix=runner_role_path(FLEET))["InstanceProfiles"]
    assert [p["InstanceProfileName"] for p in profiles] == [runner_role_name(FLEET, "docker")]
    # and a run after that has nothing left to do
    assert [c for c in run(smaller, clients) if c.verb is not Verb.KEEP] == []


def test_the_role_all_pools_shared_before_is_deleted_once_unused(
    clients: AwsClients, config: FleetConfig, network: SandboxNetwork, ami: str
) -> None:
    # given the one runner role and profile every pool used before each pool had its own, tagged with the fleet
    iam = clients.client("iam")
    shared = f"{FLEET}-runner"
    login = {"Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*"}
    iam.create_role(
        RoleName=shared,
        AssumeRolePolicyDocument=json.dumps(ec2_trust_policy()),
        Tags=[{"Key": "runner-fleet", "Value": FLEET}],
    )
    iam.put_role_policy(
        RoleName=shared,
        PolicyName=RUNNER_POLICY_NAME,
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [login]}),
    )
    iam.create_instance_profile(InstanceProfileName=shared)
    iam.add_role_to_instance_profile(InstanceProfileName=shared, RoleName=shared)
    # and a role of that kind's name belonging to someone else (not tagged with this fleet)
    iam.create_role(RoleName="someone-else-runner", AssumeRolePolicyDocument=json.dumps(ec2_trust_policy()))
    instance = _run_instance_with_profile(clients, network, ami, shared)

    # when
    plan = run(config, clients)

    # then it is kept while an instance runs with it, then deleted with its policy and profile
    assert change_of(plan, "role", shared).verb is Verb.KEEP
    clients.ec2.terminate_instances(InstanceIds=[instance])
    assert change_of(run(config, clients), "role", shared).verb is Verb.DELETE
    names = [role["RoleName"] for role in iam.list_roles()["Roles"]]
    assert shared not in names and "someone-else-runner" in names
    assert shared not in [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]]


def test_a_role_of_a_pools_name_outside_the_fleets_path_refuses_the_plan(
    clients: AwsClients, config: FleetConfig
) -> None:
    # given a role someone made with the name the docker pool's role would have, at another path
    clients.client("iam").create_role(
        RoleName=runner_role_name(FLEET, "docker"), AssumeRolePolicyDocument=json.dumps(ec2_trust_policy())
    )
    subject = bootstrapper(config, clients)

    # when / then nothing is made: the role is not bootstrap's to change
    plan = subject.plan()
    refused = change_of(plan, "role", runner_role_name(FLEET, "docker"))
    assert refused.verb is Verb.INVALID
    assert refused.detail == f"a role of this name exists at path /, not /runner-fleet/{FLEET}/: rename or delete it"
    with pytest.raises(PlanRefusedError):
        subject.execute(plan)


def test_role_names_fit_iam_and_stay_distinct_for_long_fleet_and_pool_names() -> None:
    fleet, pools = "f" * 40, ["p" * 32, "p" * 31 + "q"]

    names = [runner_role_name(fleet, pool) for pool in pools]

    assert all(len(name) <= 64 for name in names)
    assert len(set(names)) == 2
    assert runner_role_name("runner-fleet-dev", "docker") == "runner-fleet-dev-docker-runner"


# ---- missing inputs ----------------------------------------------------------------------------------------


def test_without_a_published_ami_the_plan_is_refused(clients: AwsClients, network: SandboxNetwork) -> None:
    # given no runner AMI published, and one pool naming its own AMI
    pinned = next(
        image["ImageId"]
        for image in clients.ec2.describe_images(Owners=["amazon"], Filters=list(AMAZON_LINUX))["Images"]
    )
    document = config_document(network)
    document["pools"][1]["ami"] = pinned
    config = parse_config(document)

    # when
    plan = bootstrapper(config, clients).plan()

    # then the pool without an AMI is invalid, naming the parameter of its architecture and the fix
    [invalid] = [change for change in plan if change.verb is Verb.INVALID]
    assert (invalid.kind, invalid.name) == ("arch", "pools[0](docker).ami")
    assert invalid.detail == (
        f"no AMI: the pool's instance types are x86_64 and SSM parameter {X86_PARAMETER} does not exist: "
        "publish the runner AMI with 'fleetctl ami publish', or set the pool's ami"
    )
    # and the pool with its own AMI would get its template
    assert by_name(plan)[launch_template_name(FLEET, "build")].verb is Verb.CREATE
    with pytest.raises(PlanRefusedError):
        bootstrapper(config, clients).execute(plan)
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []


def test_an_ami_the_region_does_not_have_gets_no_template(clients: AwsClients, network: SandboxNetwork) -> None:
    # given a pool naming an AMI that is not in the region (its root device name cannot be known)
    document = config_document(network)
    document["pools"][0]["ami"] = "ami-0123456789abcdef0"
    config = parse_config(document)
    register_sandbox_amis(clients.ssm, clients.ec2, AMI_PARAMETER)

    # when
    plan = run(config, clients)

    # then that pool's template is reported missing, naming the AMI; the other pool's is made
    docker, build = launch_template_name(FLEET, "docker"), launch_template_name(FLEET, "build")
    assert by_name(plan)[docker].verb is Verb.MISSING
    assert by_name(plan)[docker].detail == "no AMI: ami-0123456789abcdef0 not found in us-east-1"
    names = [t["LaunchTemplateName"] for t in clients.ec2.describe_launch_templates()["LaunchTemplates"]]
    assert names == [build]


# ---- the pools' subnets -------------------------------------------------------------------------------------


def second_subnet_in_zone_of(clients: AwsClients, network: SandboxNetwork, subnet: str) -> tuple[str, str]:
    """Another subnet in the zone of ``subnet``; returns (new subnet, zone)."""
    zone = clients.ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["AvailabilityZone"]
    made = clients.ec2.create_subnet(VpcId=network.vpc_id, CidrBlock="10.42.240.0/20", AvailabilityZone=zone)
    return str(made["Subnet"]["SubnetId"]), str(zone)


def test_a_pool_with_two_subnets_in_one_zone_is_refused_and_nothing_is_made(
    clients: AwsClients, network: SandboxNetwork, ami: str, tmp_path: Path
) -> None:
    """EC2 refuses a fleet naming an instance type twice in one zone (InvalidFleetConfig, see
    tests/integration/test_aws_ec2_rules.py): every launch of such a pool would fail, so bootstrap refuses it."""
    from click.testing import CliRunner

    from fleetctl.cli import main

    # given the docker pool with a second subnet in the zone of its first
    first = network.subnet_ids[0]
    extra, zone = second_subnet_in_zone_of(clients, network, first)
    document = config_document(network)
    document["pools"][0]["subnets"] = [*network.subnet_ids, extra]
    config = parse_config(document)

    # when
    plan = bootstrapper(config, clients).plan()

    # then the plan names the pool, both subnets and their zone
    [invalid] = [change for change in plan if change.verb is Verb.INVALID]
    assert (invalid.kind, invalid.name) == ("subnets", "docker")
    assert invalid.detail.startswith(f"{first}, {extra} are all in {zone}: ")
    assert "InvalidFleetConfig" in invalid.detail

    # and executing it changes nothing
    with pytest.raises(PlanRefusedError):
        bootstrapper(config, clients).execute(plan)
    assert clients.dynamodb.list_tables()["TableNames"] == []

    # and the command fails the same way, with or without --dry-run
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    for extra_args in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["bootstrap", "--config", str(path), *extra_args])
        assert result.exit_code == 1
        assert f"invalid  subnets    docker ({first}, {extra} are all in {zone}" in result.output
        assert "nothing was changed" in result.output
    assert clients.dynamodb.list_tables()["TableNames"] == []
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []


def test_a_subnet_the_account_does_not_have_is_reported_missing(clients: AwsClients, ami: str) -> None:
    # given the placeholder subnet of a config nobody adapted
    config = parse_config(config_document())

    # when
    plan = run(config, clients)

    # then each pool says which subnet is missing, and the rest of the plan still ran
    missing = [(change.name, change.detail) for change in plan if change.kind == "subnets"]
    assert missing == [
        ("docker", "subnet-0a1b2c3d4e5f60718 not found in us-east-1"),
        ("build", "subnet-0a1b2c3d4e5f60718 not found in us-east-1"),
    ]
    assert {change.verb for change in plan if change.kind == "subnets"} == {Verb.MISSING}
    assert clients.dynamodb.list_tables()["TableNames"] == ["bootstrap-test"]


def test_validate_aws_checks_the_live_account(
    clients: AwsClients, network: SandboxNetwork, ami: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from fleetctl.cli import main

    def validate(document: dict[str, Any]) -> Any:
        path = tmp_path / "stage.json"
        path.write_text(json.dumps(document))
        return CliRunner().invoke(main, ["validate", str(path), "--aws"])

    # given an account never bootstrapped: no spot service-linked role
    result = validate(config_document(network))
    assert result.exit_code == 1
    assert "AWSServiceRoleForEC2Spot is missing: every spot launch (docker, build) fails with " in result.output
    assert "AuthFailure.ServiceLinkedRoleCreationNotPermitted" in result.output

    # given a bootstrapped account, and the build pool with two subnets in one zone
    run(parse_config(config_document(network)), clients)
    assert validate(config_document(network)).exit_code == 0
    extra, zone = second_subnet_in_zone_of(clients, network, network.subnet_ids[1])
    document = config_document(network)
    document["pools"][1]["subnets"] = [*network.subnet_ids, extra]

    # when
    result = validate(document)

    # then the pool, its subnets and the zone are named
    assert result.exit_code == 1
    assert (
        f"pools[1](build).subnets: {network.subnet_ids[1]}, {extra} are all in {zone}: EC2 refuses a fleet "
        "naming an instance type twice in one zone (InvalidFleetConfig); keep one subnet per zone"
    ) in result.output
    assert "docker" not in result.output.split("problem(s)")[1]


# ---- dry run and secrets -----------------------------------------------------------------------------------


def test_plan_alone_changes_nothing(clients: AwsClients, config: FleetConfig) -> None:
    # when
    plan = bootstrapper(config, clients).plan()

    # then
    assert {change.verb for change in plan} == {Verb.CREATE}
    assert clients.dynamodb.list_tables()["TableNames"] == []
    assert clients.sqs.list_queues().get("QueueUrls", []) == []
    assert sorted(p["Name"] for p in clients.ssm.describe_parameters()["Parameters"]) == [ARM_PARAMETER, X86_PARAMETER]
    assert clients.client("iam").list_roles()["Roles"] == []
    assert clients.client("iam").list_instance_profiles()["InstanceProfiles"] == []
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert clients.client("s3").list_buckets()["Buckets"] == []


def test_dry_run_prints_the_plan_and_changes_nothing(clients: AwsClients, config: FleetConfig, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fleetctl.cli import main
    from fleetctl.sandbox.gitlab_emulator import GitLabEmulator

    # given an instance-runner stage and an administrator's token (the token is checked with GitLab first)
    path = tmp_path / "stage.json"
    with GitLabEmulator(admin_token=GITLAB_TOKEN) as gitlab:
        document = config.model_dump(mode="json")
        document["gitlab"]["url"] = gitlab.url
        path.write_text(json.dumps(document))

        # when
        result = CliRunner().invoke(
            main, ["bootstrap", "--config", str(path), "--dry-run"], env={"GITLAB_TOKEN": GITLAB_TOKEN}
        )

    # then
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 15
    assert all(line.startswith("would create ") for line in lines)
    assert GITLAB_TOKEN not in result.output
    assert clients.ec2.describe_launch_templates()["LaunchTemplates"] == []
    assert clients.dynamodb.list_tables()["TableNames"] == []


def test_the_plan_never_shows_a_secret(clients: AwsClients, config: FleetConfig) -> None:
    # given plans that create, keep and replace the secrets
    first = run(config, clients)
    second = run(config, clients)
    subject = bootstrapper(config, clients, gitlab_token="glpat-rotated-token-value")
    rotated = subject.plan()
    subject.execute(rotated)

    # then no printed line, nor a Change's repr, carries a secret value
    printed = "\n".join(change.describe() + repr(change) for change in first + second + rotated)
    for secret in (*SECRETS, "glpat-rotated-token-value"):
        assert secret not in printed
    assert by_name(rotated)["/runner-fleet/test/gitlab-token"].verb is Verb.UPDATE


# ---- the runner instance policies, no AWS -------------------------------------------------------------------


def _statements(config: FleetConfig, pool: str) -> dict[str, dict[str, Any]]:
    return {statement["Sid"]: statement for statement in runner_instance_policy(config, config.pool(pool))["Statement"]}


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def test_policy_token_statement_is_bound_to_the_calling_instance() -> None:
    token = _statements(parse_config(config_document()), "docker")["OwnRunnerTokenOnly"]

    document = config_document()
    assert sorted(_as_list(token["Action"])) == ["dynamodb:DeleteItem", "dynamodb:GetItem"]
    assert token["Resource"] == f"arn:aws:dynamodb:*:*:table/{document['state']['table']}"
    assert token["Condition"] == {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["TOKEN#${aws:userid}"]}}


def test_each_pools_policy_names_its_own_repository_and_cache_prefix() -> None:
    config = parse_config(config_document())
    docker, build = _statements(config, "docker"), _statements(config, "build")

    assert docker["PullCiImage"]["Resource"] == "arn:aws:ecr:*:*:repository/ci/build-base"
    assert build["PullCiImage"]["Resource"] == "arn:aws:ecr:*:*:repository/ci/dind"
    assert "PushBuiltImage" not in docker
    assert build["PushBuiltImage"]["Resource"] == "arn:aws:ecr:*:*:repository/ci/dind"
    assert "ecr:PutImage" in build["PushBuiltImage"]["Action"]
    assert docker["EcrLogin"] == {
        "Sid": "EcrLogin",
        "Effect": "Allow",
        "Action": "ecr:GetAuthorizationToken",
        "Resource": "*",
    }
    assert docker["OwnCacheObjects"]["Resource"] == f"arn:aws:s3:::{CACHE_BUCKET}/docker/*"
    assert build["OwnCacheObjects"]["Resource"] == f"arn:aws:s3:::{CACHE_BUCKET}/build/*"
    assert docker["OwnCacheListing"]["Resource"] == f"arn:aws:s3:::{CACHE_BUCKET}"
    assert docker["OwnCacheListing"]["Condition"] == {"StringLike": {"s3:prefix": ["docker/*"]}}


def test_policy_grants_no_push_to_a_privileged_pool_that_does_not_push() -> None:
    document = config_document()
    document["pools"][1]["image"]["push"] = False

    statements = _statements(parse_config(document), "build")

    assert "PushBuiltImage" not in statements
    actions = {action for s in statements.values() for action in _as_list(s["Action"])}
    assert not actions & {"ecr:PutImage", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload"}


@pytest.mark.parametrize("pool", ["docker", "build"])
def test_policy_has_no_wildcard_action_and_nothing_on_ec2(pool: str) -> None:
    config = parse_config(config_document())
    policy = runner_instance_policy(config, config.pool(pool))

    actions = [action for s in policy["Statement"] for action in _as_list(s["Action"])]
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert not [action for action in actions if "*" in action]
    assert not [action for action in actions if action.startswith(("ec2:", "iam:", "sts:"))]
    # "*" as a resource only where AWS offers no resource-level permission.
    assert [s["Sid"] for s in policy["Statement"] if "*" in _as_list(s["Resource"])] == ["EcrLogin"]


def test_a_table_made_before_the_indexes_gets_them_and_keeps_its_items(
    clients: AwsClients, config: FleetConfig
) -> None:
    # given a fleet table as an earlier bootstrap made it: no index, TTL on, one item in it
    ddb = clients.dynamodb
    ddb.create_table(
        TableName=config.state.table,
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    ddb.update_time_to_live(
        TableName=config.state.table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"}
    )
    ddb.put_item(TableName=config.state.table, Item={"pk": {"S": "POOL#docker"}, "leases": {"N": "2"}})

    # when bootstrap runs
    plan = run(config, clients)

    # then the table is updated with the indexes alone, and nothing in it is lost
    assert by_name(plan)[config.state.table].describe() == (
        f"update   table      {config.state.table} (add index idle-runners, add index fleet-records, add index "
        "token-deadlines)"
    )
    indexes = ddb.describe_table(TableName=config.state.table)["Table"]["GlobalSecondaryIndexes"]
    assert sorted(i["IndexName"] for i in indexes) == ["fleet-records", "idle-runners", "token-deadlines"]
    assert ddb.get_item(TableName=config.state.table, Key={"pk": {"S": "POOL#docker"}})["Item"]["leases"] == {"N": "2"}
    # and a second run keeps it
    assert by_name(run(config, clients))[config.state.table].verb is Verb.KEEP


# ---- architectures -------------------------------------------------------------------------------------------


def test_a_pool_mixing_architectures_is_refused_naming_its_instance_types(
    clients: AwsClients, network: SandboxNetwork, ami: str, tmp_path: Path
) -> None:
    """An instance type runs the architectures of its ``ProcessorInfo.SupportedArchitectures``
    (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_ProcessorInfo.html); a launch template boots one
    AMI, whose ``Architecture`` is one of them, so a pool of Graviton and Intel types cannot boot everywhere."""
    from click.testing import CliRunner

    from fleetctl.cli import main

    # given the docker pool with an arm64 (Graviton) type among its Intel ones
    document = config_document(network)
    document["pools"][0]["instance_types"] = ["m7i.large", "m7g.large", "m6i.large"]
    config = parse_config(document)

    # when
    plan = bootstrapper(config, clients).plan()

    # then the plan names the pool's field and which type runs what
    [invalid] = [change for change in plan if change.verb is Verb.INVALID]
    assert invalid.describe() == (
        "invalid  arch       pools[0](docker).instance_types (no architecture common to all (m7i.large, "
        "m6i.large: x86_64; m7g.large: arm64); a launch template boots one AMI, built for one of x86_64, arm64: "
        "keep a pool's instance types to one architecture)"
    )
    with pytest.raises(PlanRefusedError):
        bootstrapper(config, clients).execute(plan)
    assert clients.dynamodb.list_tables()["TableNames"] == []

    # and validate --aws says the same
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(document))
    result = CliRunner().invoke(main, ["validate", str(path), "--aws"])
    assert result.exit_code == 1
    assert "pools[0](docker).instance_types: no architecture common to all" in result.output


def test_an_instance_type_the_region_does_not_know_is_refused(
    clients: AwsClients, network: SandboxNetwork, ami: str
) -> None:
    """DescribeInstanceTypes describes the types of the region; a type it does not list cannot be launched
    (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_DescribeInstanceTypes.html)."""
    # given a pool with a mistyped instance type (config validation checks the shape only)
    document = config_document(network)
    document["pools"][1]["instance_types"] = ["c7i.xlarge", "c7i.xlargee"]
    config = parse_config(document)

    # when
    plan = bootstrapper(config, clients).plan()

    # then
    [invalid] = [change for change in plan if change.verb is Verb.INVALID]
    assert (invalid.name, invalid.detail) == (
        "pools[1](build).instance_types",
        "unknown instance type(s) in the region: c7i.xlargee",
    )


def test_an_arm64_pool_gets_the_arm64_ami(clients: AwsClients, network: SandboxNetwork, amis: dict[str, str]) -> None:
    # given the build pool on Graviton types, the docker pool on Intel ones
    document = config_document(network)
    document["pools"][1]["instance_types"] = ["c7g.xlarge", "c6g.xlarge"]
    config = parse_config(document)

    # when
    plan = run(config, clients)

    # then each template boots the runner AMI of its pool's architecture
    docker, build = launch_template_name(FLEET, "docker"), launch_template_name(FLEET, "build")
    assert default_template_data(clients, build)["ImageId"] == amis["arm64"]
    assert default_template_data(clients, docker)["ImageId"] == amis["x86_64"]
    assert by_name(plan)[build].detail.startswith(f"{amis['arm64']} (arm64), 1 version")

    # and a new arm64 AMI published later moves only the arm64 pool
    other = next(
        image["ImageId"]
        for image in clients.ec2.describe_images(
            Owners=["amazon"],
            Filters=[
                {"Name": "name", "Values": ["al2023-ami-2023*"]},
                {"Name": "architecture", "Values": ["arm64"]},
            ],
        )["Images"]
    )
    clients.ssm.put_parameter(Name=ARM_PARAMETER, Value=other, Type="String", Overwrite=True)
    updates = [change.name for change in run(config, clients) if change.verb is Verb.UPDATE]
    assert updates == [build]
    assert default_template_data(clients, build)["ImageId"] == other


def test_a_pool_ami_of_another_architecture_is_refused(
    clients: AwsClients, network: SandboxNetwork, amis: dict[str, str]
) -> None:
    """An image's ``Architecture`` (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_Image.html) must be
    one the instance types run, even when the pool names its AMI itself."""
    # given the Intel docker pool naming the arm64 image
    document = config_document(network)
    document["pools"][0]["ami"] = amis["arm64"]
    config = parse_config(document)

    # when
    plan = bootstrapper(config, clients).plan()

    # then
    [invalid] = [change for change in plan if change.verb is Verb.INVALID]
    assert (invalid.name, invalid.detail) == (
        "pools[0](docker).ami",
        f"{amis['arm64']} is an arm64 image; the instance types (m7i.large, m6i.large) run x86_64",
    )


def test_a_type_running_several_architectures_fits_either(
    clients: AwsClients, network: SandboxNetwork, amis: dict[str, str]
) -> None:
    """t2 types run i386 and x86_64 (their SupportedArchitectures lists both): with an x86_64 type the pool is
    x86_64."""
    # given
    document = config_document(network)
    document["pools"][0]["instance_types"] = ["t2.large", "m6i.large"]
    config = parse_config(document)

    # when
    run(config, clients)

    # then
    assert default_template_data(clients, launch_template_name(FLEET, "docker"))["ImageId"] == amis["x86_64"]


# ---- the CI image pinned by digest ---------------------------------------------------------------------------


def push_image(clients: AwsClients, repository: str, tag: str) -> str:
    """Pushes an image manifest to ECR as ``docker push`` ends (PutImage); returns the image's digest."""
    ecr = clients.client("ecr")
    ecr.create_repository(repositoryName=repository)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 1469,
            "digest": "sha256:" + "1" * 64,
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": 3370706,
                "digest": "sha256:" + "2" * 64,
            }
        ],
    }
    pushed = ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=tag)
    return str(pushed["image"]["imageId"]["imageDigest"])


def test_the_ci_image_is_pinned_by_digest_when_ecr_has_the_tag(
    clients: AwsClients, config: FleetConfig, ami: str
) -> None:
    """ECR DescribeImages with an ``imageTag`` answers the tag's ``imageDigest``, or ImageNotFoundException /
    RepositoryNotFoundException (https://docs.aws.amazon.com/AmazonECR/latest/APIReference/API_DescribeImages.html)."""
    # given the docker pool's image pushed, the build pool's not
    digest = push_image(clients, "ci/build-base", "latest")
    assert digest.startswith("sha256:")
    registry = f"{clients.client('sts').get_caller_identity()['Account']}.dkr.ecr.us-east-1.amazonaws.com"

    # when
    plan = run(config, clients)

    # then the docker pool's user data runs the digest, and the plan says so for both pools
    docker, build = launch_template_name(FLEET, "docker"), launch_template_name(FLEET, "build")
    user_data = base64.b64decode(default_template_data(clients, docker)["UserData"]).decode()
    assert f"{registry}/ci/build-base@{digest}" in user_data
    assert f"{registry}/ci/build-base:latest" not in user_data
    assert by_name(plan)[docker].detail.endswith(f"; image ci/build-base@{digest} (tag latest)")
    assert by_name(plan)[build].detail.endswith("; image ci/dind:latest, not pinned: no repository ci/dind in ECR")
    build_data = base64.b64decode(default_template_data(clients, build)["UserData"]).decode()
    assert f"{registry}/ci/dind:latest" in build_data

    # and the docker pool's image record names the digest, as bootstrap's, with the template's version (the table
    # was created in the same run); the build pool, with nothing pinned, has no record
    images = ImageStore("bootstrap-test", clients.dynamodb)
    record = images.read("docker")
    assert record.current is not None
    assert (record.current.digest, record.current.tag, record.current.by) == (digest, "latest", PromotedBy.BOOTSTRAP)
    assert (record.template_version, images.template_version("docker")) == (1, 1)
    assert [version.digest for version in record.history] == [digest]
    assert images.read("build").revision == 0

    # and once the tag moves to a new image, bootstrap keeps the digest the record names: moving the pool is image
    # rotation's, which gates the push by its scan
    clients.client("ecr").create_repository(repositoryName="ci/dind")
    again = run(config, clients)
    assert by_name(again)[build].detail.endswith("; image ci/dind:latest, not pinned: no such tag in ECR")
    newer = push_image_again(clients, "ci/build-base", "latest")
    third = run(config, clients)
    assert by_name(third)[docker].verb is Verb.KEEP
    assert by_name(third)[docker].detail.endswith(
        f"; image ci/build-base@{digest} (tag latest; the pool's image record, promoted by bootstrap)"
    )
    user_data = base64.b64decode(default_template_data(clients, docker)["UserData"]).decode()
    assert f"@{digest}" in user_data and f"@{newer}" not in user_data
    assert images.read("docker").revision == record.revision


def push_image_again(clients: AwsClients, repository: str, tag: str) -> str:
    """Pushes another image under ``tag`` of an existing repository; returns its digest."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 1470,
            "digest": "sha256:" + "3" * 64,
        },
        "layers": [],
    }
    pushed = clients.client("ecr").put_image(
        repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=tag
    )
    return str(pushed["image"]["imageId"]["imageDigest"])

"""The runner instances' policy, as a pure function of the config: its own token only, pull on the pools'
repositories only, push only where a pool opts in with ``image.push`` on a repository of its own, never because a
pool is privileged."""

from __future__ import annotations

from typing import Any

import pytest

from chalicelib.config import parse_config
from chalicelib.errors import ConfigError
from chalicelib.runner_tokens import session_user_id
from chalicelib.store import token_key
from fleetctl.iam_policies import ECR_PULL_ACTIONS, ECR_PUSH_ACTIONS, runner_instance_policy
from tests.iam_recorder import Request, allowing_statements

ROLE_ID = "AROAEXAMPLEROLEID0001"
TABLE = "arn:aws:dynamodb:us-east-1:123456789012:table/policy-test"

SUBNET = "subnet-0123456789abcdef0"
SG = "sg-0123456789abcdef0"


def pool(name: str, repository: str, **settings: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tags": [name],
        "instance_types": ["m7i.large"],
        "subnets": [SUBNET],
        "security_groups": [SG],
        "max_runners": 5,
        "image": {"repository": repository},
        **settings,
    }


def config(*pools: dict[str, Any]) -> dict[str, Any]:
    return {
        "fleet": "policy-test",
        "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/policy-test/gitlab-token"},
        "webhook": {"token_parameter": "/policy-test/webhook-token"},
        "state": {"table": "policy-test", "jobs_queue": "policy-test-jobs", "dead_letter_queue": "policy-test-dlq"},
        "cache_bucket": "policy-test-cache",
        "ami_parameter": "/policy-test/runner-ami",
        "pools": list(pools),
    }


def granted(document: dict[str, Any]) -> dict[str, set[str]]:
    """action -> the resources the runner policy allows it on."""
    found: dict[str, set[str]] = {}
    for statement in runner_instance_policy(parse_config(document))["Statement"]:
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            found.setdefault(action, set()).update([resources] if isinstance(resources, str) else resources)
    return found


def repo(name: str) -> str:
    return f"arn:aws:ecr:*:*:repository/{name}"


def test_runners_pull_every_pools_image_and_push_nowhere_by_default() -> None:
    # given two pools, one of them privileged (docker-in-docker) and ephemeral
    document = config(pool("docker", "ci/base"), pool("build", "ci/dind", privileged=True, ephemeral=True))

    # when
    grants = granted(document)

    # then
    for action in ECR_PULL_ACTIONS:
        assert grants[action] == {repo("ci/base"), repo("ci/dind")}
    assert not set(ECR_PUSH_ACTIONS) & set(grants)


def test_push_is_granted_only_on_the_repository_of_the_pool_that_pushes() -> None:
    document = config(
        pool("docker", "ci/base"),
        pool("build", "ci/dind", privileged=True, ephemeral=True, image={"repository": "ci/dind", "push": True}),
    )

    grants = granted(document)

    for action in ECR_PUSH_ACTIONS:
        assert grants[action] == {repo("ci/dind")}
    for action in ECR_PULL_ACTIONS:
        assert grants[action] == {repo("ci/base"), repo("ci/dind")}


def test_a_pool_that_is_not_privileged_may_push_too() -> None:
    document = config(pool("images", "ci/images", image={"repository": "ci/images", "push": True}))

    assert granted(document)["ecr:PutImage"] == {repo("ci/images")}


def test_no_policy_can_let_a_pool_push_to_an_image_another_pool_runs() -> None:
    # given a privileged pool asking to push to the repository the docker pool runs its jobs in
    document = config(
        pool("docker", "ci/base"),
        pool("build", "ci/base", privileged=True, ephemeral=True, image={"repository": "ci/base", "push": True}),
    )

    # when / then the config is refused, naming both pools, so no policy is ever generated from it
    with pytest.raises(ConfigError) as refused:
        runner_instance_policy(parse_config(document))
    assert refused.value.problems == [
        "pools[1](build).image.push: pool build may not push to ci/base, which pool(s) docker also run; "
        "give it a repository of its own"
    ]


def instance_may(action: str, instance_id: str, *keys: str) -> bool:
    """Whether the runner policy lets ``instance_id``'s role session make ``action`` on the table's ``keys``.

    The request context is what IAM gives a call signed with an EC2 instance's role credentials: ``aws:userid``
    is "<role id>:<instance id>" (IAM User Guide, "IAM policy elements: Variables and tags", "Request information
    that you can use for policy variables"), and ``dynamodb:LeadingKeys`` the partition keys the call touches
    (DynamoDB developer guide, "Using IAM policy conditions for fine-grained access control").
    """
    policy = runner_instance_policy(parse_config(config(pool("docker", "ci/base"))))
    context = [("aws:userid", (session_user_id(ROLE_ID, instance_id),))]
    if keys:
        context.append(("dynamodb:LeadingKeys", keys))
    request = Request("runner", "", action, action, TABLE, tuple(context))
    return bool(allowing_statements(policy, request)[0])


def test_an_instance_reads_and_deletes_its_own_token_item_and_no_other_item() -> None:
    own = token_key(session_user_id(ROLE_ID, "i-0aaaaaaaaaaaaaaaa"))
    other = token_key(session_user_id(ROLE_ID, "i-0bbbbbbbbbbbbbbbb"))
    # its own token: read, then delete
    assert instance_may("dynamodb:GetItem", "i-0aaaaaaaaaaaaaaaa", own)
    assert instance_may("dynamodb:DeleteItem", "i-0aaaaaaaaaaaaaaaa", own)
    # another instance's token, any other item of the table, or its own and another's at once: refused
    for keys in ((other,), ("RUNNER#i-0aaaaaaaaaaaaaaaa",), ("POOL#docker",), (own, other)):
        assert not instance_may("dynamodb:GetItem", "i-0aaaaaaaaaaaaaaaa", *keys), keys
        assert not instance_may("dynamodb:DeleteItem", "i-0aaaaaaaaaaaaaaaa", *keys), keys
    # a token keyed by the same instance id under another role (a role made again, or another fleet's): refused
    assert not instance_may("dynamodb:GetItem", "i-0aaaaaaaaaaaaaaaa", "TOKEN#AROAOTHERROLE0000001:i-0aaaaaaaaaaaaaaaa")
    # it may not write a token, nor read without naming a key (Scan, Query by another key)
    assert not instance_may("dynamodb:PutItem", "i-0aaaaaaaaaaaaaaaa", own)
    assert not instance_may("dynamodb:UpdateItem", "i-0aaaaaaaaaaaaaaaa", own)
    assert not instance_may("dynamodb:Scan", "i-0aaaaaaaaaaaaaaaa")


def test_the_token_statement_is_keyed_by_the_calling_session() -> None:
    statements = runner_instance_policy(parse_config(config(pool("docker", "ci/base"))))["Statement"]
    [token] = [s for s in statements if s["Sid"] == "OwnRunnerTokenOnly"]

    assert token["Resource"] == "arn:aws:dynamodb:*:*:table/policy-test"
    assert sorted(token["Action"]) == ["dynamodb:DeleteItem", "dynamodb:GetItem"]
    assert token["Condition"] == {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["TOKEN#${aws:userid}"]}}

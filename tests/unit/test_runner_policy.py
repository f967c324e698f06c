"""The runner roles' policies, one per pool, as a pure function of the config: a pool's role reaches its own
instances' tokens, its own repository and its own cache prefix, and nothing of another pool's; push only where the
pool opts in with ``image.push`` on a repository of its own, never because it is privileged. Judged by the same
evaluator as the Lambdas' recorded calls (``tests/iam_recorder.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from chalicelib.config import parse_config
from chalicelib.errors import ConfigError
from chalicelib.scaling.tokens import session_user_id
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


def granted(document: dict[str, Any], pool_name: str) -> dict[str, set[str]]:
    """action -> the resources the pool's runner policy allows it on."""
    fleet = parse_config(document)
    found: dict[str, set[str]] = {}
    for statement in runner_instance_policy(fleet, fleet.pool(pool_name))["Statement"]:
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            found.setdefault(action, set()).update([resources] if isinstance(resources, str) else resources)
    return found


def repo(name: str) -> str:
    return f"arn:aws:ecr:*:*:repository/{name}"


PUSHER = {"access_level": "ref_protected", "ephemeral": True}


def test_a_pool_pulls_only_its_own_image_and_pushes_nowhere_by_default() -> None:
    # given two pools, one of them privileged (docker-in-docker) and ephemeral
    document = config(pool("docker", "ci/base"), pool("build", "ci/dind", privileged=True, ephemeral=True))

    # then each pulls its own repository only, and neither may push, privileged or not
    for name, repository in (("docker", "ci/base"), ("build", "ci/dind")):
        grants = granted(document, name)
        for action in ECR_PULL_ACTIONS:
            assert grants[action] == {repo(repository)}
        assert not set(ECR_PUSH_ACTIONS) & set(grants)


def test_push_is_granted_only_to_the_pool_that_pushes_on_its_own_repository() -> None:
    document = config(
        pool("docker", "ci/base"),
        pool("build", "ci/dind", privileged=True, image={"repository": "ci/dind", "push": True}, **PUSHER),
    )

    for action in ECR_PUSH_ACTIONS:
        assert granted(document, "build")[action] == {repo("ci/dind")}
    assert not set(ECR_PUSH_ACTIONS) & set(granted(document, "docker"))


def test_no_policy_can_let_a_pool_push_to_an_image_another_pool_runs() -> None:
    # given a privileged pool asking to push to the repository the docker pool runs its jobs in
    document = config(
        pool("docker", "ci/base"),
        pool("build", "ci/base", privileged=True, image={"repository": "ci/base", "push": True}, **PUSHER),
    )

    # when / then the config is refused, naming both pools, so no policy is ever generated from it
    with pytest.raises(ConfigError) as refused:
        parse_config(document)
    assert refused.value.problems == [
        "pools[1](build).image.push: pool build may not push to ci/base, which pool(s) docker also run; "
        "give it a repository of its own"
    ]


# -- what one pool's role may do, judged by the evaluator that judges the Lambdas' calls -------------------------

ACCOUNT = "123456789012"
TWO_POOLS = config(
    pool("docker", "ci/base"),
    pool("build", "ci/dind", privileged=True, image={"repository": "ci/dind", "push": True}, **PUSHER),
)
ROLE_IDS = {"docker": "AROADOCKERPOOLROLE001", "build": "AROABUILDPOOLROLE0001"}


def role_may(pool_name: str, action: str, resource: str, *context: tuple[str, tuple[str, ...]]) -> bool:
    """Whether ``pool_name``'s runner role allows ``action`` on ``resource`` with the request's ``context``."""
    fleet = parse_config(TWO_POOLS)
    policy = runner_instance_policy(fleet, fleet.pool(pool_name))
    request = Request("runner", "", action, action, resource, tuple(context))
    return bool(allowing_statements(policy, request)[0])


def session(pool_name: str, instance_id: str) -> tuple[str, tuple[str, ...]]:
    """``aws:userid`` of a call signed with the credentials EC2 gives an instance of the pool's role (IAM User
    Guide, "Request information that you can use for policy variables")."""
    return ("aws:userid", (session_user_id(ROLE_IDS[pool_name], instance_id),))


def test_a_pools_role_reads_only_its_own_cache_prefix() -> None:
    bucket = "arn:aws:s3:::policy-test-cache"
    own = f"{bucket}/docker/project/7/default-protected"
    others = (f"{bucket}/build/project/7/default-protected", f"{bucket}/docker-build/x", f"{bucket}/top-level")
    for action in ("s3:GetObject", "s3:PutObject"):
        assert role_may("docker", action, own)
        for other in others:
            assert not role_may("docker", action, other), other
            assert not role_may("build", action, own)
    # listing: the pool's prefix only (S3 puts the request's prefix in s3:prefix)
    assert role_may("docker", "s3:ListBucket", bucket, ("s3:prefix", ("docker/project/7/",)))
    assert not role_may("docker", "s3:ListBucket", bucket, ("s3:prefix", ("build/",)))
    assert not role_may("docker", "s3:ListBucket", bucket, ("s3:prefix", ("",)))
    assert not role_may("docker", "s3:DeleteObject", own)


def test_a_pools_role_pulls_and_pushes_only_its_own_repository() -> None:
    base = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/ci/base"
    dind = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/ci/dind"
    for action in ECR_PULL_ACTIONS:
        assert role_may("docker", action, base) and role_may("build", action, dind)
        assert not role_may("docker", action, dind) and not role_may("build", action, base)
    for action in ECR_PUSH_ACTIONS:
        assert role_may("build", action, dind)
        assert not role_may("build", action, base) and not role_may("docker", action, base)


def test_a_pools_role_reads_only_its_own_instances_token_never_another_pools() -> None:
    # A call is judged by the policy of the role whose credentials signed it, with aws:userid naming that role.
    table = f"arn:aws:dynamodb:us-east-1:{ACCOUNT}:table/policy-test"
    instance = "i-0aaaaaaaaaaaaaaaa"
    for own, other in (("docker", "build"), ("build", "docker")):
        caller = session(own, instance)
        own_token = token_key(session_user_id(ROLE_IDS[own], instance))
        assert role_may(own, "dynamodb:GetItem", table, caller, ("dynamodb:LeadingKeys", (own_token,)))
        # the other pool's token items, of any instance, the same instance id included
        for other_instance in (instance, "i-0bbbbbbbbbbbbbbbb"):
            other_token = token_key(session_user_id(ROLE_IDS[other], other_instance))
            for action in ("dynamodb:GetItem", "dynamodb:DeleteItem"):
                assert not role_may(own, action, table, caller, ("dynamodb:LeadingKeys", (other_token,)))


def instance_may(action: str, instance_id: str, *keys: str) -> bool:
    """Whether the runner policy lets ``instance_id``'s role session make ``action`` on the table's ``keys``.

    The request context is what IAM gives a call signed with an EC2 instance's role credentials: ``aws:userid``
    is "<role id>:<instance id>" (IAM User Guide, "IAM policy elements: Variables and tags", "Request information
    that you can use for policy variables"), and ``dynamodb:LeadingKeys`` the partition keys the call touches
    (DynamoDB developer guide, "Using IAM policy conditions for fine-grained access control").
    """
    fleet = parse_config(config(pool("docker", "ci/base")))
    policy = runner_instance_policy(fleet, fleet.pool("docker"))
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
    fleet = parse_config(config(pool("docker", "ci/base")))
    statements = runner_instance_policy(fleet, fleet.pool("docker"))["Statement"]
    [token] = [s for s in statements if s["Sid"] == "OwnRunnerTokenOnly"]

    assert token["Resource"] == "arn:aws:dynamodb:*:*:table/policy-test"
    assert sorted(token["Action"]) == ["dynamodb:DeleteItem", "dynamodb:GetItem"]
    assert token["Condition"] == {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["TOKEN#${aws:userid}"]}}


def test_a_pool_on_another_accounts_registry_pulls_only_that_accounts_repository() -> None:
    # given a pool whose CI image lives in a central registry account
    document = config(pool("docker", "ci/base", image={"repository": "ci/base", "account": "210987654321"}))
    fleet = parse_config(document)
    policy = runner_instance_policy(fleet, fleet.pool("docker"))

    def may(action: str, resource: str) -> bool:
        return bool(allowing_statements(policy, Request("runner", "", action, action, resource, ()))[0])

    # then it pulls that account's repository of that name, and the same name in no other account
    for action in ECR_PULL_ACTIONS:
        assert may(action, "arn:aws:ecr:us-east-1:210987654321:repository/ci/base")
        assert not may(action, f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/ci/base")


def test_a_pool_may_not_push_to_another_accounts_registry() -> None:
    document = config(
        pool(
            "build",
            "ci/dind",
            image={"repository": "ci/dind", "account": "210987654321", "push": True},
            max_builds=1,
            access_level="ref_protected",
        )
    )
    with pytest.raises(ConfigError, match=r"image\.push.*fleet's own registry"):
        parse_config(document)

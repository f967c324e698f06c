"""The runner instances' IAM policies, written by hand from the config: least privilege, no wildcard action.

An instance can read and delete only its own token item, pull only its pools' CI images (push only to the
repositories of pools whose config says ``image.push: true``, each run by that pool alone), and use the cache
bucket. It gets nothing on EC2: it leaves by powering off, and the
launch template makes an instance-initiated shutdown terminate it.
"""

from __future__ import annotations

from typing import Any

from chalicelib.config import FleetConfig
from chalicelib.store import token_key

POLICY_VERSION = "2012-10-17"
# IAM resolves this policy variable to the calling role session's unique id: "<role id>:<instance id>" for the
# role of an EC2 instance (see chalicelib/runner_tokens.py).
SESSION_USER_ID = "${aws:userid}"
RUNNER_POLICY_NAME = "runner-instance"

ECR_PULL_ACTIONS = ("ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
ECR_PUSH_ACTIONS = (
    "ecr:CompleteLayerUpload",
    "ecr:InitiateLayerUpload",
    "ecr:PutImage",
    "ecr:UploadLayerPart",
)

Policy = dict[str, Any]


def ec2_trust_policy() -> Policy:
    """Lets EC2 hand the role's credentials to instances launched with the instance profile."""
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def runner_instance_policy(config: FleetConfig) -> Policy:
    """The inline policy of the runner role."""
    pulled = sorted({pool.image.repository for pool in config.pools})
    # Push is a per-pool opt-in, never implied by privileged: config validation refuses push to a repository
    # another pool runs, so no pool's jobs can replace the image another pool's jobs run in.
    pushed = sorted({pool.image.repository for pool in config.pools if pool.image.push})
    statements: list[dict[str, Any]] = [
        {
            "Sid": "OwnRunnerTokenOnly",
            "Effect": "Allow",
            "Action": ["dynamodb:DeleteItem", "dynamodb:GetItem"],
            "Resource": f"arn:aws:dynamodb:*:*:table/{config.state.table}",
            # dynamodb:LeadingKeys is the partition key of the item the request touches (DynamoDB developer
            # guide, "Using IAM policy conditions for fine-grained access control"). ForAllValues:StringEquals
            # on TOKEN#${aws:userid} matches only the item keyed by the calling session's own user id, which
            # for an instance is "<role id>:<its instance id>": no instance reaches another's token, nor any
            # other item of the table. The table's server-side encryption uses the AWS-managed aws/dynamodb key,
            # whose key policy already allows its use through DynamoDB.
            "Condition": {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [token_key(SESSION_USER_ID)]}},
        },
        {
            # GetAuthorizationToken has no resource-level permission; the token grants only what the other
            # statements allow.
            "Sid": "EcrLogin",
            "Effect": "Allow",
            "Action": "ecr:GetAuthorizationToken",
            "Resource": "*",
        },
        {
            "Sid": "PullCiImages",
            "Effect": "Allow",
            "Action": list(ECR_PULL_ACTIONS),
            "Resource": [_repository_arn(name) for name in pulled],
        },
    ]
    if pushed:
        statements.append(
            {
                "Sid": "PushBuiltImages",
                "Effect": "Allow",
                "Action": list(ECR_PUSH_ACTIONS),
                "Resource": [_repository_arn(name) for name in pushed],
            }
        )
    statements += [
        {
            "Sid": "CacheObjects",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{config.cache_bucket}/*",
        },
        {
            "Sid": "CacheListing",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{config.cache_bucket}",
        },
    ]
    return {"Version": POLICY_VERSION, "Statement": statements}


def _repository_arn(name: str) -> str:
    return f"arn:aws:ecr:*:*:repository/{name}"

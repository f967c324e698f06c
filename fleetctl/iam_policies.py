"""The runner instances' IAM policies, one role per pool, written by hand from the config: least privilege.

A pool is the trust boundary: a privileged job is root on its instance and holds the instance role's credentials,
so each pool's role reaches nothing of another pool's. It can read and delete only its instance's own token item,
pull only the repository its pool runs (and push to it only when the pool's ``image.push`` says so: a repository
no other pool runs, from ephemeral ``ref_protected`` runners), and read and write only its pool's prefix of the
cache bucket. It gets nothing on EC2: it leaves by powering off, and the launch template makes an
instance-initiated shutdown terminate it.
"""

from __future__ import annotations

from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.store import token_key

POLICY_VERSION = "2012-10-17"
# IAM resolves this policy variable to the calling role session's unique id: "<role id>:<instance id>" for the
# role of an EC2 instance (see chalicelib/scaling/tokens.py).
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


def cache_prefix(pool: PoolConfig) -> str:
    """The pool's key prefix in the cache bucket: gitlab-runner's ``[runners.cache] Path``, under which a shared
    cache keeps every object (``<Path>/project/<id>/<key>``)."""
    return f"{pool.name}/"


def runner_instance_policy(config: FleetConfig, pool: PoolConfig) -> Policy:
    """The inline policy of ``pool``'s runner role."""
    repository = repository_arn(pool.image.repository, pool.image.account, pool.image.region)
    statements: list[dict[str, Any]] = [
        {
            "Sid": "OwnRunnerTokenOnly",
            "Effect": "Allow",
            "Action": ["dynamodb:DeleteItem", "dynamodb:GetItem"],
            "Resource": f"arn:aws:dynamodb:*:*:table/{config.state.table}",
            # dynamodb:LeadingKeys is the partition key of the item the request touches (DynamoDB developer
            # guide, "Using IAM policy conditions for fine-grained access control"). ForAllValues:StringEquals
            # on TOKEN#${aws:userid} matches only the item keyed by the calling session's own user id, which
            # for an instance is "<this pool's role id>:<its instance id>": no instance reaches another's token,
            # another pool's included, nor any other item of the table. The table's server-side encryption uses
            # the AWS-managed aws/dynamodb key, whose key policy already allows its use through DynamoDB.
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
            "Sid": "PullCiImage",
            "Effect": "Allow",
            "Action": list(ECR_PULL_ACTIONS),
            "Resource": repository,
        },
    ]
    if pool.image.push:
        # Config validation keeps push to a repository no other pool runs, from ephemeral ref_protected pools
        # (chalicelib.config), so no pool's jobs can replace the image another pool's jobs run in.
        statements.append(
            {"Sid": "PushBuiltImage", "Effect": "Allow", "Action": list(ECR_PUSH_ACTIONS), "Resource": repository}
        )
    prefix = cache_prefix(pool)
    statements += [
        {
            "Sid": "OwnCacheObjects",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{config.cache_bucket}/{prefix}*",
        },
        {
            # Listing, of the pool's own prefix only. S3 answers a GetObject of a missing key (a cache miss) with
            # 404 only to a caller that may list the bucket, and with 403 otherwise (S3 API reference, GetObject).
            "Sid": "OwnCacheListing",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:aws:s3:::{config.cache_bucket}",
            "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}},
        },
    ]
    return {"Version": POLICY_VERSION, "Statement": statements}


def repository_arn(name: str, account: str | None = None, region: str | None = None) -> str:
    """The repository's ARN; another account's registry (``image.account``) is named exactly, the fleet's own by
    name, in whatever account and region the role is used."""
    return f"arn:aws:ecr:{region or '*'}:{account or '*'}:repository/{name}"

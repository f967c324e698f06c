"""The runner instances' IAM policies, written by hand from the config: least privilege, no wildcard action.

An instance can read and delete only its own token parameter, pull only its pools' CI images (push only to the
repositories of pools whose config says ``image.push: true``, each run by that pool alone), and use the cache
bucket. It gets nothing on EC2: it leaves by powering off, and the
launch template makes an instance-initiated shutdown terminate it.
"""

from __future__ import annotations

from typing import Any

from chalicelib.config import FleetConfig
from chalicelib.naming import INSTANCE_ARN_TAG, runner_token_parameter

POLICY_VERSION = "2012-10-17"
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
    token_parameters = "arn:aws:ssm:*:*:parameter" + runner_token_parameter(config.fleet, "*")
    pulled = sorted({pool.image.repository for pool in config.pools})
    # Push is a per-pool opt-in, never implied by privileged: config validation refuses push to a repository
    # another pool runs, so no pool's jobs can replace the image another pool's jobs run in.
    pushed = sorted({pool.image.repository for pool in config.pools if pool.image.push})
    statements: list[dict[str, Any]] = [
        {
            "Sid": "OwnRunnerTokenOnly",
            "Effect": "Allow",
            "Action": ["ssm:DeleteParameter", "ssm:GetParameter"],
            "Resource": token_parameters,
            # ec2:SourceInstanceARN is the ARN of the instance whose role credentials sign the request, so an
            # instance matches only the parameter scale-up tagged with its own ARN. AWS documents the key in the
            # Amazon EC2 User Guide, "Identity-based policies for Amazon EC2", section "ec2:SourceInstanceARN
            # condition key": it specifies "the ARN of the instance from which a request is made" and is "an
            # AWS global condition key", usable with services other than EC2 (here SSM). SecureStrings use the
            # AWS-managed aws/ssm key, whose key policy already allows decryption through SSM.
            "Condition": {"StringEquals": {f"ssm:resourceTag/{INSTANCE_ARN_TAG}": "${ec2:SourceInstanceARN}"}},
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

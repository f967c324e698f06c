"""A pool's launch template data: what bootstrap writes as the template and what an image promotion writes as a new
version of it, from one function, so the two never disagree (bootstrap would otherwise call a promoted version
drift, and a promotion would drop what bootstrap set).

Pure: the AMI and its root device come from the caller (bootstrap resolves them from the AMI parameter; a
promotion keeps those of the version it starts from), and the CI image reference names a digest.
"""

from __future__ import annotations

import base64
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.naming import FLEET_TAG, POOL_TAG, runner_role_name
from chalicelib.scaling.userdata import render_user_data


def metadata_hop_limit(pool: PoolConfig) -> int:
    """The instance metadata service's hop limit in the pool's launch template: who on the instance may reach the
    role's credentials. 1 keeps them from job containers (one hop further, through Docker's bridge); a pool that
    pushes its image gets 2, since its jobs' ``docker push`` needs them, and config validation allows that only
    for an ephemeral ``ref_protected`` pool whose role holds nothing but its own repository and cache."""
    return 2 if pool.image.push else 1


def template_data(config: FleetConfig, pool: PoolConfig, image_id: str, root_device: str, image: str) -> dict[str, Any]:
    """The pool's ``LaunchTemplateData``, its user data naming the CI image ``image``."""
    tags = [{"Key": FLEET_TAG, "Value": config.fleet}, {"Key": POOL_TAG, "Value": pool.name}]
    # User data is the pool's settings only (no secret, nothing per launch: CreateFleet cannot override it).
    # No KeyName: nobody logs in to a runner.
    user_data = render_user_data(config, pool, image)
    return {
        "ImageId": image_id,
        "UserData": base64.b64encode(user_data.encode()).decode("ascii"),
        # The pool's own instance profile and role (fleetctl/iam_policies.py).
        "IamInstanceProfile": {"Name": runner_role_name(config.fleet, pool.name)},
        # IMDSv2 only. A hop limit of 1 keeps job containers (one hop further) from the role's credentials;
        # a pool that pushes its image gets 2, so its jobs can log in to ECR (runner_ami/README.md, "Pushing
        # images").
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": metadata_hop_limit(pool),
            "HttpEndpoint": "enabled",
            "InstanceMetadataTags": "disabled",
        },
        "BlockDeviceMappings": [
            {
                "DeviceName": root_device,
                "Ebs": {
                    "VolumeType": "gp3",
                    "VolumeSize": pool.disk_gib,
                    "Encrypted": True,
                    "DeleteOnTermination": True,
                },
            }
        ],
        "SecurityGroupIds": list(pool.security_groups),
        # Runners leave by powering off; terminate makes that the end of the instance, not a stopped one.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "Monitoring": {"Enabled": False},
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
    }

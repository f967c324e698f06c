"""The AWS shim's rules (see ``fleetctl.sandbox.aws_shim``): one module per service, each rule citing the AWS
documentation it encodes. ``default_rules`` is the chain every local AWS runs, outermost first."""

from __future__ import annotations

from fleetctl.sandbox.aws_rules.dynamodb import TransactionConflicts, TransactionTokens
from fleetctl.sandbox.aws_rules.ec2_idempotency import ClientTokens
from fleetctl.sandbox.aws_rules.ec2_images import RegisteredImageArchitecture
from fleetctl.sandbox.aws_rules.ecr import AuthorizationTokenValidity
from fleetctl.sandbox.aws_rules.ssm import ParameterStoreThroughput
from fleetctl.sandbox.aws_shim import Rule


def default_rules() -> list[Rule]:
    from fleetctl.sandbox.aws_rules.ec2_fleet import FleetConfigRule, SpotServiceLinkedRoleRule

    return [
        ParameterStoreThroughput(),
        # A repeated token is answered before anything else looks at the call: it changes nothing.
        TransactionTokens(),
        TransactionConflicts(),
        ClientTokens(),
        # A fleet EC2 finds malformed is refused before any launch is tried, spot or not.
        FleetConfigRule(),
        SpotServiceLinkedRoleRule(),
        RegisteredImageArchitecture(),
        AuthorizationTokenValidity(),
    ]

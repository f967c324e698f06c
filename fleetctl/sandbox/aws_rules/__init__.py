"""The AWS shim's rules (see ``fleetctl.sandbox.aws_shim``): one module per service, each rule citing the AWS
documentation it encodes. ``default_rules`` is the chain every local AWS runs, outermost first."""

from __future__ import annotations

from fleetctl.sandbox.aws_rules.ssm import ParameterStoreThroughput
from fleetctl.sandbox.aws_shim import Rule


def default_rules() -> list[Rule]:
    from fleetctl.sandbox.aws_rules.ec2_fleet import FleetConfigRule, SpotServiceLinkedRoleRule

    rules: list[Rule] = [ParameterStoreThroughput()]
    # A fleet EC2 finds malformed is refused before any launch is tried, spot or not.
    rules += [FleetConfigRule(), SpotServiceLinkedRoleRule()]
    return rules

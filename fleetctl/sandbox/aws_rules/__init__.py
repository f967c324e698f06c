"""The AWS shim's rules (see ``fleetctl.sandbox.aws_shim``): one module per service, each rule citing the AWS
documentation it encodes. ``default_rules`` is the chain every local AWS runs, outermost first."""

from __future__ import annotations

from fleetctl.sandbox.aws_rules.dynamodb import TransactionConflicts, TransactionTokens
from fleetctl.sandbox.aws_rules.dynamodb_index_lag import GlobalIndexLag
from fleetctl.sandbox.aws_rules.dynamodb_throttling import DynamoDbThrottling
from fleetctl.sandbox.aws_rules.dynamodb_unprocessed import BatchGetUnprocessedKeys
from fleetctl.sandbox.aws_rules.ec2_describe_lag import DescribeInstancesLag
from fleetctl.sandbox.aws_rules.ec2_idempotency import ClientTokens
from fleetctl.sandbox.aws_rules.ec2_images import RegisteredImageArchitecture
from fleetctl.sandbox.aws_rules.ecr import AuthorizationTokenValidity
from fleetctl.sandbox.aws_rules.ssm import ParameterStoreThroughput
from fleetctl.sandbox.aws_shim import Rule


def default_rules() -> list[Rule]:
    from fleetctl.sandbox.aws_rules.ec2_fleet import FleetConfigRule, LaunchTemplateTags, SpotServiceLinkedRoleRule
    from fleetctl.sandbox.aws_rules.ec2_state_events import InstanceStateEvents
    from fleetctl.sandbox.aws_rules.ecr_events import EcrImageEvents

    return [
        ParameterStoreThroughput(),
        # A throttled request never reaches the table, nor any rule that would answer it (a transaction's token
        # is not spent by it).
        DynamoDbThrottling(),
        # A repeated token is answered before anything else looks at the call: it changes nothing.
        TransactionTokens(),
        TransactionConflicts(),
        # The read lags sit behind every rule that answers a write itself (a replayed token, a conflict): only
        # a write moto applied, or a launch moto made, starts a lag.
        GlobalIndexLag(),
        BatchGetUnprocessedKeys(),
        ClientTokens(),
        # A fleet EC2 finds malformed is refused before any launch is tried, spot or not.
        FleetConfigRule(),
        SpotServiceLinkedRoleRule(),
        RegisteredImageArchitecture(),
        DescribeInstancesLag(),
        AuthorizationTokenValidity(),
        LaunchTemplateTags(),
        # Innermost: only a state change moto carried out puts its events, and only a push or delete moto carried
        # out puts ECR's.
        InstanceStateEvents(),
        EcrImageEvents(),
    ]

"""The CloudFormation merge template for ``chalice package``: what the stack adds to the SAM template Chalice writes.

Chalice generates the functions, their roles, the REST API, the EventBridge rules and the jobs queue's event
source mapping; ``chalice package --merge-template`` deep-merges this template into that one. It adds what Chalice
cannot express, generated from the stage file so that every name is the one the Lambdas and ``fleetctl
bootstrap`` use:

* the scale-up event source mapping's maximum concurrency (its batch size and window are app.py's);
* the API stage's throttling (rate and burst);
* for the EventBridge-invoked handlers (instance-state, instance-interruption, images): the rule target's retry
  policy and dead-letter queue (events EventBridge could not deliver) and Lambda's on-failure destination (events
  whose invocation still failed after Lambda's two retries), both the events dead-letter queue this stack owns, so
  no event is dropped;
* each function's name, the one ``chalice deploy`` gives it (``<app>-<stage>-<function>``): CloudFormation would
  otherwise make up names, and each function's policy grants its logs (and so its EMF metrics) by that name;
* a CloudWatch dashboard of the fleet's EMF metrics and the alarms ``docs/operations-runbook.md`` explains, sent
  to an SNS topic of the stack's.

Ownership: the stack owns what is listed above (and what Chalice generates). The table, the jobs queue and its
dead-letter queue are the stage file's ``state.owner``'s: by default ``fleetctl bootstrap`` creates them and this
template only names them (alarms, the event source mapping); with ``state.owner: stack`` this template defines
them too, as :mod:`fleetctl.state_resources` describes them for both owners, kept when the stack is deleted or
would replace them (the fleet's records, queued jobs and runner tokens outlive the stack), and bootstrap only
looks them up. No resource is created by both (``docs/deploy.md``, "What owns what").

The logical ids merged into (``ScaleUp``, ``ScaleUpSqsEventSource``, ``RestAPI``, ``InstanceStateEvent`` ...) are
the ones Chalice 1.34 gives the functions of ``app.py``; a misspelt one would add a resource (or an event) without
a type, which ``fleetctl.package`` refuses in the merged template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chalicelib.config import FleetConfig, StateOwner
from chalicelib.lifecycle.rules import Kind
from chalicelib.naming import FLEET_TAG, events_dead_letter_queue_name
from chalicelib.observability import NAMESPACE, SERVICE
from fleetctl.lambda_policies import LambdaFunction, function_name
from fleetctl.state_resources import dead_letter_queue_properties, jobs_queue_properties, table_properties

Template = dict[str, Any]

# The scale-up trigger: its batch size (50 jobs) and batching window (1 s) are app.py's decorator's, which Chalice
# writes into the mapping and the sandbox's pump reads too, so they have one source; the stack adds at most five
# batches at once. Five is the concurrency the sandbox runs scale-up at and the suite, the bursts and the soak hold
# at: concurrent batches meet on each pool's lease counter, whose transaction conflicts are retried (up to 8
# attempts), and each batch makes one CreateFleet per pool and one GitLab runner per instance, which EC2's and
# GitLab's request rates bound. Lambda's smallest maximum concurrency is 2.
SCALE_UP_MAX_CONCURRENCY = 5

# API Gateway throttling of the webhook stage. GitLab counts a 429 as a failed delivery and disables a hook after
# four in a row, so the limit sits well above any GitLab's Job Hook rate (a 1,000-job pipeline sends about three
# hooks a job, spread over its stages) and only stops a flood; HooksDisabled alarms if it ever bites.
API_RATE_LIMIT = 100
API_BURST_LIMIT = 200

# EventBridge's delivery to a Lambda target, stated explicitly (AWS's defaults and maxima): up to 185 retries over
# a day, then the events dead-letter queue.
EVENTBRIDGE_RETRY_ATTEMPTS = 185
EVENTBRIDGE_MAX_EVENT_AGE_SECONDS = 24 * 3600
# Lambda's asynchronous invocation: the handlers are written for two retries (one, then two minutes later), and
# an event is kept for them up to six hours (Lambda's defaults); after that it goes to the on-failure destination.
LAMBDA_EVENT_RETRIES = 2
LAMBDA_MAX_EVENT_AGE_SECONDS = 6 * 3600
EVENTS_DLQ_RETENTION_SECONDS = 14 * 24 * 3600

# Chalice's logical ids for app.py's functions and their event sources.
SCALE_UP = "ScaleUp"
SCALE_UP_EVENT = "ScaleUpSqsEventSource"
REST_API = "RestAPI"
RECONCILE = "Reconcile"
EVENT_HANDLERS = {
    "InstanceState": "InstanceStateEvent",
    "InstanceInterruption": "InstanceInterruptionEvent",
    "Images": "ImagesEvent",
}

FUNCTIONS = {
    "APIHandler": LambdaFunction.WEBHOOK,
    SCALE_UP: LambdaFunction.SCALE_UP,
    "InstanceState": LambdaFunction.INSTANCE_STATE,
    RECONCILE: LambdaFunction.RECONCILE,
    "InstanceInterruption": LambdaFunction.INSTANCE_INTERRUPTION,
    "Images": LambdaFunction.IMAGES,
}

EVENTS_DLQ = "EventsDeadLetterQueue"
# The state resources, with state.owner: stack.
STATE_TABLE = "StateTable"
JOBS_QUEUE = "JobsQueue"
JOBS_DLQ = "JobsDeadLetterQueue"
# Neither deleting the stack nor a change CloudFormation can only make by replacement may take the fleet's state.
RETAIN = {"DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"}
ALARM_TOPIC = "AlarmTopic"
DASHBOARD = "Dashboard"

# Alarm periods, in seconds.
FIVE_MINUTES = 300
FIFTEEN_MINUTES = 900


def merge_template(config: FleetConfig, *, app_name: str, stage: str) -> Template:
    """The merge template for ``config``, the stage file of Chalice stage ``stage`` of app ``app_name``."""
    resources: dict[str, Any] = {
        SCALE_UP: {
            "Properties": {
                "Events": {
                    SCALE_UP_EVENT: {"Properties": {"ScalingConfig": {"MaximumConcurrency": SCALE_UP_MAX_CONCURRENCY}}}
                }
            }
        },
        REST_API: {
            "Properties": {
                "MethodSettings": [
                    {
                        "ResourcePath": "/*",
                        "HttpMethod": "*",
                        "ThrottlingRateLimit": API_RATE_LIMIT,
                        "ThrottlingBurstLimit": API_BURST_LIMIT,
                    }
                ]
            }
        },
        # A reconcile run's schedule event carries nothing: the next run, a minute later, is its retry, so a failed
        # run is not invoked again beside it; ReconcileFailing alarms when runs keep failing.
        RECONCILE: {"Properties": {"EventInvokeConfig": {"MaximumRetryAttempts": 0}}},
        **{function: _event_handler(event) for function, event in EVENT_HANDLERS.items()},
        EVENTS_DLQ: {
            "Type": "AWS::SQS::Queue",
            "Properties": {
                "QueueName": events_dead_letter_queue_name(config.fleet),
                "MessageRetentionPeriod": EVENTS_DLQ_RETENTION_SECONDS,
                "SqsManagedSseEnabled": True,
                "Tags": [{"Key": FLEET_TAG, "Value": config.fleet}],
            },
        },
        f"{EVENTS_DLQ}Policy": {
            "Type": "AWS::SQS::QueuePolicy",
            "Properties": {
                "Queues": [{"Ref": EVENTS_DLQ}],
                "PolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            # The rules' dead-letter queue: EventBridge sends what it could not deliver, for this
                            # account's rules only.
                            "Sid": "EventBridgeDeadLetters",
                            "Effect": "Allow",
                            "Principal": {"Service": "events.amazonaws.com"},
                            "Action": "sqs:SendMessage",
                            "Resource": {"Fn::GetAtt": [EVENTS_DLQ, "Arn"]},
                            "Condition": {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}},
                        }
                    ],
                },
            },
        },
        ALARM_TOPIC: {
            "Type": "AWS::SNS::Topic",
            "Properties": {
                "TopicName": f"{config.fleet}-alarms",
                "Tags": [{"Key": FLEET_TAG, "Value": config.fleet}],
            },
        },
        DASHBOARD: {
            "Type": "AWS::CloudWatch::Dashboard",
            "Properties": {
                "DashboardName": config.fleet,
                "DashboardBody": {"Fn::Sub": json.dumps(dashboard_body(config), indent=None)},
            },
        },
        **{alarm_id: alarm for alarm_id, alarm in alarms(config).items()},
    }
    outputs = {
        "DashboardName": {"Value": {"Ref": DASHBOARD}},
        "AlarmTopicArn": {"Value": {"Ref": ALARM_TOPIC}},
        "EventsDeadLetterQueueUrl": {"Value": {"Ref": EVENTS_DLQ}},
    }
    stack_owned = config.state.owner is StateOwner.STACK
    if stack_owned:
        resources |= state_resources(config)
        outputs |= {"StateTableName": {"Value": {"Ref": STATE_TABLE}}, "JobsQueueUrl": {"Value": {"Ref": JOBS_QUEUE}}}
    for logical_id, function in FUNCTIONS.items():
        resource = resources.setdefault(logical_id, {})
        resource.setdefault("Properties", {})["FunctionName"] = function_name(app_name, stage, function)
        if stack_owned:
            # The functions name the table and queues (the scale-up trigger the jobs queue's ARN) without a
            # reference CloudFormation could order by: none starts before they exist.
            resource["DependsOn"] = [STATE_TABLE, JOBS_QUEUE, JOBS_DLQ]
    return {"Resources": resources, "Outputs": outputs}


def state_resources(config: FleetConfig) -> dict[str, Any]:
    """The table, the jobs queue and its dead-letter queue, for a stage whose ``state.owner`` is the stack."""
    state = config.state
    return {
        STATE_TABLE: {
            "Type": "AWS::DynamoDB::Table",
            **RETAIN,
            "Properties": table_properties(state.table, config.fleet),
        },
        JOBS_DLQ: {
            "Type": "AWS::SQS::Queue",
            **RETAIN,
            "Properties": dead_letter_queue_properties(state.dead_letter_queue, config.fleet),
        },
        JOBS_QUEUE: {
            "Type": "AWS::SQS::Queue",
            **RETAIN,
            "Properties": jobs_queue_properties(state.jobs_queue, config.fleet, {"Fn::GetAtt": [JOBS_DLQ, "Arn"]}),
        },
    }


def _event_handler(event: str) -> dict[str, Any]:
    dead_letters = {"Fn::GetAtt": [EVENTS_DLQ, "Arn"]}
    return {
        "Properties": {
            "EventInvokeConfig": {
                "MaximumRetryAttempts": LAMBDA_EVENT_RETRIES,
                "MaximumEventAgeInSeconds": LAMBDA_MAX_EVENT_AGE_SECONDS,
                "DestinationConfig": {"OnFailure": {"Type": "SQS", "Destination": dead_letters}},
            },
            "Events": {
                event: {
                    # Chalice writes CloudWatchEvent, which takes no retry policy or dead-letter queue; SAM's
                    # EventBridgeRule is the same rule on the default bus with both.
                    "Type": "EventBridgeRule",
                    "Properties": {
                        "RetryPolicy": {
                            "MaximumRetryAttempts": EVENTBRIDGE_RETRY_ATTEMPTS,
                            "MaximumEventAgeInSeconds": EVENTBRIDGE_MAX_EVENT_AGE_SECONDS,
                        },
                        "DeadLetterConfig": {"Arn": dead_letters},
                    },
                }
            },
        }
    }


# ---- alarms ------------------------------------------------------------------------------------------------


def _fleet_metric(name: str) -> dict[str, Any]:
    return {"Namespace": NAMESPACE, "MetricName": name, "Dimensions": [{"Name": "service", "Value": SERVICE}]}


def _queue_metric(queue: str | dict[str, Any]) -> dict[str, Any]:
    return {
        "Namespace": "AWS/SQS",
        "MetricName": "ApproximateNumberOfMessagesVisible",
        "Dimensions": [{"Name": "QueueName", "Value": queue}],
    }


# What reconcile reaps, each counted as OrphansReaped.<kind>: the rules' kinds and the expired runner tokens.
ORPHAN_KINDS = (*(kind.value for kind in Kind), "Token")


def _orphans_reaped() -> dict[str, Any]:
    """The sum of every ``OrphansReaped.<kind>``, as an alarm's metric math."""
    parts = [
        {
            "Id": f"kind{index}",
            "MetricStat": {"Metric": _fleet_metric(f"OrphansReaped.{kind}"), "Period": FIFTEEN_MINUTES, "Stat": "Sum"},
            "ReturnData": False,
        }
        for index, kind in enumerate(ORPHAN_KINDS)
    ]
    total = {"Id": "reaped", "Expression": "SUM(METRICS())", "Label": "OrphansReaped", "ReturnData": True}
    return {"Metrics": [*parts, total]}


def _alarm(
    config: FleetConfig,
    name: str,
    description: str,
    metric: Mapping[str, Any],
    *,
    statistic: str = "Sum",
    threshold: float = 1,
    period: int = FIVE_MINUTES,
    evaluation_periods: int = 1,
    datapoints: int = 1,
    comparison: str = "GreaterThanOrEqualToThreshold",
) -> dict[str, Any]:
    # A metric alarm states its statistic and period; a metric-math alarm states them per metric.
    single = {} if "Metrics" in metric else {"Statistic": statistic, "Period": period}
    return {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {
            "AlarmName": f"{config.fleet}-{name}",
            "AlarmDescription": f"{description} See docs/operations-runbook.md, {name}.",
            **metric,
            **single,
            "EvaluationPeriods": evaluation_periods,
            "DatapointsToAlarm": datapoints,
            "Threshold": threshold,
            "ComparisonOperator": comparison,
            # No datapoint is no event: these metrics are only emitted when something happened.
            "TreatMissingData": "notBreaching",
            "AlarmActions": [{"Ref": ALARM_TOPIC}],
            "OKActions": [{"Ref": ALARM_TOPIC}],
        },
    }


def alarms(config: FleetConfig) -> dict[str, dict[str, Any]]:
    """The stack's alarms by logical id; each one's runbook section is its name (``docs/operations-runbook.md``)."""
    return {
        "JobsDeadLetterAlarm": _alarm(
            config,
            "jobs-dead-lettered",
            "A job is in the jobs dead-letter queue: no runner will be launched for it.",
            _queue_metric(config.state.dead_letter_queue),
            statistic="Maximum",
            threshold=0,
            comparison="GreaterThanThreshold",
        ),
        "EventsDeadLetterAlarm": _alarm(
            config,
            "events-dead-lettered",
            "An EventBridge event failed its handler after every retry and waits in the events dead-letter queue.",
            _queue_metric({"Fn::GetAtt": [EVENTS_DLQ, "QueueName"]}),
            statistic="Maximum",
            threshold=0,
            comparison="GreaterThanThreshold",
        ),
        "OrphansReapedAlarm": _alarm(
            config,
            "orphans-reaped",
            "Reconcile reaped 3 or more orphans (instances, records, runners, tokens, launches) in 15 minutes.",
            _orphans_reaped(),
            threshold=3,
        ),
        "LaunchErrorsAlarm": _alarm(
            config,
            "launch-errors",
            "5 or more launches failed (throttled, refused or unanswered by EC2) in 15 minutes.",
            _fleet_metric("LaunchErrors"),
            threshold=5,
            period=FIFTEEN_MINUTES,
        ),
        "WebhooksRefusedAlarm": _alarm(
            config,
            "webhooks-refused",
            "5 or more webhook requests refused (401) in 5 minutes: a wrong secret in GitLab, or someone probing.",
            _fleet_metric("WebhooksRefused"),
            threshold=5,
        ),
        "InvariantViolationsAlarm": _alarm(
            config,
            "invariant-violations",
            "Reconcile found a fleet invariant broken in every run for 15 minutes.",
            _fleet_metric("InvariantViolations"),
            evaluation_periods=3,
            datapoints=3,
        ),
        "HooksDisabledAlarm": _alarm(
            config,
            "hooks-disabled",
            "GitLab disabled a connected hook (temporarily or for good) in the last hour: its Job Hooks are not sent.",
            _fleet_metric("HooksDisabled"),
            # Reconcile reads each hook in turn (at most 20 a run), so a disabled hook may be seen once an hour
            # only: one breaching period in the last twelve keeps the alarm on.
            evaluation_periods=12,
            datapoints=1,
        ),
        "ReconcileFailingAlarm": _alarm(
            config,
            "reconcile-failing",
            "Every reconcile run failed for 15 minutes: nothing reaps orphans, recovers jobs or retires runners.",
            {
                "Namespace": "AWS/Lambda",
                "MetricName": "Errors",
                "Dimensions": [{"Name": "FunctionName", "Value": {"Ref": RECONCILE}}],
            },
            evaluation_periods=3,
            datapoints=3,
        ),
    }


# ---- the dashboard ---------------------------------------------------------------------------------------------


def _metrics(names: Sequence[str], stat: str = "Sum") -> list[list[Any]]:
    return [[NAMESPACE, name, "service", SERVICE, {"stat": stat, "label": name}] for name in names]


def _graph(title: str, metrics: list[list[Any]], *, stat: str = "Sum", period: int = 60) -> dict[str, Any]:
    return {
        "type": "metric",
        "width": 12,
        "height": 6,
        "properties": {
            "title": title,
            "region": "${AWS::Region}",
            "view": "timeSeries",
            "stat": stat,
            "period": period,
            "metrics": metrics,
        },
    }


def _search(expression: str, label: str) -> list[Any]:
    return [{"expression": expression, "label": label, "id": label.lower().replace(" ", "_")}]


def _per_pool(config: FleetConfig, name: str) -> list[list[Any]]:
    return [
        [NAMESPACE, name, "service", SERVICE, "pool", pool.name, {"stat": stat, "label": f"{pool.name} {stat}"}]
        for pool in config.pools
        for stat in ("p50", "p95")
    ]


def _by_name_prefix(prefix: str) -> str:
    # A search by partial metric name: LaunchError.<code>, OrphansReaped.<kind>, Launches.<lifecycle or type>.
    return f"SEARCH('{{{NAMESPACE},service}} MetricName={prefix}', 'Sum', 300)"


def dashboard_body(config: FleetConfig) -> dict[str, Any]:
    """The dashboard's widgets: jobs, latency per pool, launches, errors, reconcile, webhooks, dead letters."""
    queues = [
        ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", config.state.jobs_queue, {"label": "jobs"}],
        [
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            "QueueName",
            config.state.dead_letter_queue,
            {"label": "jobs dead letters"},
        ],
        [
            "AWS/SQS",
            "ApproximateNumberOfMessagesVisible",
            "QueueName",
            events_dead_letter_queue_name(config.fleet),
            {"label": "events dead letters"},
        ],
    ]
    widgets = [
        _graph(
            "Jobs",
            _metrics(["JobsQueued", "JobsMatched", "JobsUnmatched", "JobsRecovered", "JobsNotQueued"]),
        ),
        _graph(
            "Jobs retried and dead-lettered",
            _metrics(["JobsRetried", "JobsRetriedAfterInterruption", "JobsDeadLettered", "LeaseWaits"]),
        ),
        _graph("Queue wait (pending to running), seconds", _per_pool(config, "QueueWaitSeconds"), stat="p95"),
        _graph("Boot (launch to first job), seconds", _per_pool(config, "BootSeconds"), stat="p95"),
        _graph(
            "Launches by lifecycle and instance type",
            _search(_by_name_prefix("Launches"), "Launches")
            + _metrics(["OnDemandFallbacks", "LaunchesResumed", "WarmLaunched"]),
            period=300,
        ),
        _graph(
            "Launch errors by code",
            _search(_by_name_prefix("LaunchError"), "Launch errors") + _metrics(["LaunchErrors"]),
            period=300,
        ),
        _graph(
            "Interruptions and terminations",
            _metrics(["InterruptionsHandled", "RunnersTerminated", "RunnersPaused", "RunnersRetired"]),
            period=300,
        ),
        _graph(
            "Orphans reaped by kind",
            _search(_by_name_prefix("OrphansReaped"), "Orphans reaped"),
            period=300,
        ),
        _graph(
            "Webhooks",
            _metrics(["WebhooksRefused", "WebhooksMalformed", "RunnerActivityNotRecorded"]),
        ),
        _graph(
            "Fleet health",
            _metrics(
                ["InvariantViolations", "HooksDisabled", "HookChecksFailed", "ReconcileStopped", "SweepProjectsFailed"]
            ),
            period=300,
        ),
        _graph("Queues (messages visible)", queues, stat="Maximum"),
    ]
    for index, widget in enumerate(widgets):
        widget["x"] = (index % 2) * 12
        widget["y"] = (index // 2) * 6
    return {"widgets": widgets}

"""API calls the fleet would make, by operation, and the documented service limits they are set against.

The simulator counts each call at the simulated second it is made (:class:`ApiMeter`). Per minute it reports the
peak and the mean; against a limit given as a token bucket it replays the per-second counts through the bucket
and reports the seconds in which a call would have found it empty (throttled).

The sources of each limit are cited beside it. Where a service's documentation gives no figure for an operation,
the limit says which documented figure stands in for it and why.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

# Operations, named "<service>:<operation>". GitLab operations name the REST route.
CREATE_FLEET = "ec2:CreateFleet"
INSTANCES_LAUNCHED = "ec2:instances launched"  # what the RunInstances resource bucket counts
TERMINATE_INSTANCES = "ec2:TerminateInstances"
DESCRIBE_INSTANCES = "ec2:DescribeInstances"
DESCRIBE_LAUNCH_TEMPLATES = "ec2:DescribeLaunchTemplates"
GITLAB_GET_JOB = "gitlab:GET /projects/:id/jobs/:job_id"
GITLAB_CREATE_RUNNER = "gitlab:POST /user/runners"
GITLAB_UPDATE_RUNNER = "gitlab:PUT /runners/:id"
GITLAB_DELETE_RUNNER = "gitlab:DELETE /runners/:id"
GITLAB_LIST_RUNNERS = "gitlab:GET /runners/all"
GITLAB_RUNNER_JOBS = "gitlab:GET /runners/:id/jobs"
GITLAB_RETRY_JOB = "gitlab:POST /projects/:id/jobs/:job_id/retry"
GITLAB_JOB_REQUEST = "gitlab:POST /jobs/request (runners)"
DYNAMODB_WRITE = "dynamodb:write items"
DYNAMODB_READ = "dynamodb:read items"
DYNAMODB_QUERY = "dynamodb:Query"
SQS_SEND = "sqs:SendMessage"
SQS_RECEIVE = "sqs:ReceiveMessage"


@dataclass(frozen=True)
class Limit:
    """A documented limit: a token bucket (``burst`` tokens, ``refill`` per second) or a plain per-minute cap."""

    operations: tuple[str, ...]
    source: str
    burst: float = 0.0
    refill_per_second: float = 0.0
    per_minute: float = 0.0
    note: str = ""

    @property
    def name(self) -> str:
        return " + ".join(self.operations)


EC2_THROTTLING = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"
LIMITS: tuple[Limit, ...] = (
    # EC2 request rate limiting: each API has its own bucket. Unlisted mutating actions share the default of
    # 50 tokens refilled at 5 a second; CreateFleet is counted against that default here.
    Limit((CREATE_FLEET,), EC2_THROTTLING, burst=50, refill_per_second=5, note="mutating actions' default bucket"),
    # EC2 resource rate limiting: RunInstances' resource bucket holds 1,000 instances and refills 2 a second
    # (the same page, "Resource token bucket sizes"; restated at https://repost.aws/questions/QUjr7o2qXxTTiCqGBfnmo6yA).
    # An instant CreateFleet launches instances too; applying that bucket to them is this simulator's assumption.
    Limit((INSTANCES_LAUNCHED,), EC2_THROTTLING, burst=1000, refill_per_second=2, note="RunInstances resource bucket"),
    Limit((TERMINATE_INSTANCES,), EC2_THROTTLING, burst=50, refill_per_second=5, note="mutating actions' default"),
    # Non-mutating (Describe*) actions: 100 tokens, 20 a second (the page's own example).
    Limit((DESCRIBE_INSTANCES,), EC2_THROTTLING, burst=100, refill_per_second=20, note="non-mutating actions"),
    # GitLab.com: authenticated API traffic, 2,000 requests a minute per user (the fleet's token is one user).
    # https://docs.gitlab.com/user/gitlab_com/#rate-limits-on-gitlabcom, announced in
    # https://about.gitlab.com/blog/2020/12/17/automation-check-in-and-rate-limit-changes-on-gitlab-dot-com/
    # A self-managed GitLab sets its own (Admin > Settings > Network); none by default for the REST API.
    Limit(
        (
            GITLAB_GET_JOB,
            GITLAB_CREATE_RUNNER,
            GITLAB_UPDATE_RUNNER,
            GITLAB_DELETE_RUNNER,
            GITLAB_LIST_RUNNERS,
            GITLAB_RUNNER_JOBS,
            GITLAB_RETRY_JOB,
        ),
        "https://docs.gitlab.com/user/gitlab_com/rate_limits/",
        per_minute=2000,
        note="GitLab.com authenticated API, per user",
    ),
    # DynamoDB on-demand: a table serves up to 40,000 read and 40,000 write request units a second by default
    # (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html, "Throughput default
    # quotas"); one partition 1,000 write units a second, the bound a hot key meets first.
    Limit(
        (DYNAMODB_WRITE,),
        "https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/ServiceQuotas.html",
        burst=1000,
        refill_per_second=1000,
        note="one partition's write units a second",
    ),
    # SQS standard queues: "nearly unlimited" API calls a second
    # (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html); listed
    # so the report shows the rate, never flagged.
)


@dataclass(frozen=True)
class OperationRate:
    operation: str
    calls: int
    peak_per_minute: int
    mean_per_minute: float


@dataclass(frozen=True)
class LimitCheck:
    limit: Limit
    peak_per_minute: int
    throttled_seconds: int  # seconds in which a call would have found the bucket empty

    @property
    def throttles(self) -> bool:
        return self.throttled_seconds > 0


class ApiMeter:
    """Counts calls by operation and simulated second."""

    def __init__(self) -> None:
        self._by_second: dict[str, Counter[int]] = defaultdict(Counter)

    def add(self, operation: str, when: float, calls: int = 1) -> None:
        if calls:
            self._by_second[operation][int(when)] += calls

    def total(self, operation: str) -> int:
        return sum(self._by_second[operation].values()) if operation in self._by_second else 0

    def per_second(self, operations: tuple[str, ...]) -> Counter[int]:
        merged: Counter[int] = Counter()
        for operation in operations:
            merged.update(self._by_second.get(operation, Counter()))
        return merged

    def rates(self, start: float, end: float) -> list[OperationRate]:
        minutes = max(1.0, (end - start) / 60.0)
        rates = []
        for operation in sorted(self._by_second):
            per_minute = per_minute_counts(self._by_second[operation])
            calls = sum(self._by_second[operation].values())
            rates.append(OperationRate(operation, calls, max(per_minute.values(), default=0), calls / minutes))
        return rates

    def check(self, limits: tuple[Limit, ...] = LIMITS) -> list[LimitCheck]:
        checks = []
        for limit in limits:
            seconds = self.per_second(limit.operations)
            peak = max(per_minute_counts(seconds).values(), default=0)
            if limit.per_minute:
                throttled = sum(1 for count in per_minute_counts(seconds).values() if count > limit.per_minute) * 60
            else:
                throttled = bucket_overflows(seconds, limit.burst, limit.refill_per_second)
            checks.append(LimitCheck(limit, peak, throttled))
        return checks


def per_minute_counts(by_second: Counter[int]) -> Counter[int]:
    minutes: Counter[int] = Counter()
    for second, count in by_second.items():
        minutes[second // 60] += count
    return minutes


def bucket_overflows(by_second: Counter[int], burst: float, refill: float) -> int:
    """Seconds in which the calls made would have found a token bucket of ``burst`` tokens, refilled ``refill`` a
    second, empty: the bucket starts full, and each second's calls take a token each."""
    tokens = burst
    last: int | None = None
    overflows = 0
    for second in sorted(by_second):
        if last is not None:
            tokens = min(burst, tokens + refill * (second - last))
        last = second
        tokens -= by_second[second]
        if tokens < 0:
            overflows += 1
            tokens = 0.0  # the refused calls took nothing
    return overflows

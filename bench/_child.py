"""What runs inside the fresh processes the benchmarks start, and the bare AWS calls they compare against.

Only the standard library is imported at module level, so loading this file adds nothing measurable to a
child whose interpreter start and imports are being timed; boto3 and ``app`` are imported, and timed, inside the
roles. A child reads its input as one JSON line on stdin and writes its figures to stderr as one line
starting with ``RESULT_PREFIX``: stdout is left to the app, whose logs and EMF metrics go there as in Lambda
(the bare memory baseline, which has no app, asks its parent to empty the table and queue over stdout).

Usage: ``python bench/_child.py app-cold | bare-cold | bare-memory`` (a JSON line on stdin).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import json  # noqa: E402 - after the clock starts, so the child's own figures include it
import sys  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

RESULT_PREFIX = "BENCH_RESULT "
LAMBDA_TIMEOUT_MS = 10_000  # the api_handler's lambda_timeout in .chalice/config.json
PENDING_RANK = 2  # chalicelib.intake.job_hooks: JobStatus.PENDING.rank
UNFINISHED_JOB_TTL_SECONDS = 30 * 24 * 3600  # chalicelib.store: an unfinished job's record expires after 30 days
FINISHED_RANK = 5


@dataclass
class LambdaContext:
    """The attributes of the Lambda context object that Chalice and Powertools read."""

    function_name: str = "runner-fleet-dev"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:runner-fleet-dev"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _deadline: float = field(default_factory=lambda: time.monotonic() + LAMBDA_TIMEOUT_MS / 1000)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def rss_mib() -> float:
    """Resident set size of this process, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass(frozen=True)
class BareTarget:
    """Where the bare calls go: the dev stage's table, jobs queue and webhook token parameter."""

    table: str
    jobs_queue: str
    token_parameter: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BareTarget:
        return cls(data["table"], data["jobs_queue"], data["token_parameter"])

    def to_dict(self) -> dict[str, str]:
        return {"table": self.table, "jobs_queue": self.jobs_queue, "token_parameter": self.token_parameter}


def job_update(table: str, delivery: str, hook: dict[str, Any], instance: str, now: float) -> dict[str, Any]:
    """The UpdateItem FleetStore.record_job_event makes for an unsigned pending job, spelled out by hand.

    One conditional write on the job's item: its fields set (with a random ``writer`` that tells a refusal by
    our own landed retry from a real duplicate, and is the queue claim) and ``queued`` false, the delivery key
    added to the item's string set of deliveries, and the old item returned if the condition refuses the write (a
    duplicate, a stale event, or a job already queued).
    """
    values: dict[str, dict[str, str]] = {
        "kind": {"S": "job"},
        "project_id": {"N": str(hook["project_id"])},
        "job_id": {"N": str(hook["build_id"])},
        "status": {"S": "pending"},
        "status_rank": {"N": str(PENDING_RANK)},
        "updated_at": {"N": repr(now)},
        "pipeline_id": {"N": str(hook["pipeline_id"])},
        "name": {"S": hook["build_name"]},
        "stage": {"S": hook["build_stage"]},
        "ref": {"S": hook["ref"]},
        "gitlab_instance": {"S": instance},
        "pending_at": {"N": repr(now)},
        "writer": {"S": uuid.uuid4().hex},
        "ttl": {"N": str(int(now) + UNFINISHED_JOB_TTL_SECONDS)},
        # An unfinished job is in the fleet-records index, which reconcile reads.
        "live": {"S": "job"},
    }
    names = {f"#a{i}": name for i, name in enumerate(values)}
    names["#rank"] = "status_rank"
    names["#queued"] = "queued"
    attribute_values: dict[str, dict[str, Any]] = {f":v{i}": value for i, value in enumerate(values.values())}
    attribute_values[":rank"] = {"N": str(PENDING_RANK)}
    attribute_values[":finished"] = {"N": str(FINISHED_RANK)}
    attribute_values[":key"] = {"S": delivery}
    attribute_values[":keys"] = {"SS": [delivery]}
    attribute_values[":unqueued"] = {"BOOL": False}
    attribute_values[":writer"] = values["writer"]
    attribute_values[":claimed"] = {"N": repr(now)}
    attribute_values[":queued"] = {"BOOL": True}
    return {
        "TableName": table,
        "Key": {"pk": {"S": f"JOB#{hook['project_id']}:{hook['build_id']}"}},
        "UpdateExpression": "SET "
        + ", ".join(f"#a{i} = :v{i}" for i in range(len(values)))
        + ", #queued = :unqueued, queue_claim = :writer, queue_claim_at = :claimed ADD deliveries :keys",
        "ConditionExpression": "(attribute_not_exists(pk) OR (#rank <= :rank AND #rank < :finished))"
        " AND NOT contains(deliveries, :key) AND (attribute_not_exists(#queued) OR #queued <> :queued)",
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": attribute_values,
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def queued_mark(table: str, hook: dict[str, Any], now: float) -> dict[str, Any]:
    """The UpdateItem FleetStore.mark_queued makes once the message is sent."""
    return {
        "TableName": table,
        "Key": {"pk": {"S": f"JOB#{hook['project_id']}:{hook['build_id']}"}},
        "UpdateExpression": "SET #queued = :true, queued_at = :now REMOVE queue_claim, queue_claim_at",
        "ConditionExpression": "attribute_exists(pk)",
        "ExpressionAttributeNames": {"#queued": "queued"},
        "ExpressionAttributeValues": {":true": {"BOOL": True}, ":now": {"N": repr(now)}},
    }


def queued_message(hook: dict[str, Any], instance: str, delivery: str, now: float) -> str:
    """The SQS message body the webhook sends (QueuedJob.to_json: every field, in declaration order)."""
    return json.dumps(
        {
            "project_id": hook["project_id"],
            "job_id": hook["build_id"],
            "received_at": now,
            "pipeline_id": hook["pipeline_id"],
            "job_name": hook["build_name"],
            "gitlab_instance": instance,
            "delivery": delivery,
            "attempt": 1,
            "waits": 0,
            "last_error": "",
            "pool": "",
            "tags": [],
            "graced": False,
            "retry_interrupted": "",
            "retries": hook.get("retries_count", 0),
        },
        separators=(",", ":"),
    )


class BareWebhook:
    """The webhook's AWS calls made directly on plain boto3 clients (default botocore config), nothing else."""

    def __init__(self, target: BareTarget, session: Any = None) -> None:
        import boto3

        session = session or boto3.session.Session()
        self.target = target
        self.ssm = session.client("ssm")
        self.sqs = session.client("sqs")
        self.dynamodb = session.client("dynamodb")
        self._queue_url: str | None = None

    def fetch_token(self) -> str:
        found = self.ssm.get_parameters(Names=[self.target.token_parameter], WithDecryption=True)
        return str(found["Parameters"][0]["Value"])

    def queue_url(self) -> str:
        if self._queue_url is None:
            self._queue_url = str(self.sqs.get_queue_url(QueueName=self.target.jobs_queue)["QueueUrl"])
        return self._queue_url

    def record_and_queue(self, event: dict[str, Any]) -> None:
        """UpdateItem + SendMessage + UpdateItem (the queued mark) for one API Gateway event, as the webhook does in
        steady state.

        The queue URL is resolved on first use, between the two, as JobQueue does: a first webhook makes its
        calls in the app's order.
        """
        headers = {k.lower(): v for k, v in event["headers"].items()}
        hook = json.loads(event["body"])
        delivery = headers["idempotency-key"]
        instance = headers.get("x-gitlab-instance", "")
        now = time.time()
        self.dynamodb.update_item(**job_update(self.target.table, delivery, hook, instance, now))
        self.sqs.send_message(
            QueueUrl=self.queue_url(), MessageBody=queued_message(hook, instance, delivery, now), DelaySeconds=0
        )
        self.dynamodb.update_item(**queued_mark(self.target.table, hook, time.time()))

    def cold(self, event: dict[str, Any]) -> None:
        """Everything a first webhook costs: the token (GetParameters), UpdateItem, the queue URL, SendMessage,
        UpdateItem."""
        self.fetch_token()
        self.record_and_queue(event)


def _app_cold(job: dict[str, Any]) -> dict[str, Any]:
    before = time.perf_counter()
    import app

    imported = time.perf_counter()
    response = app.app(job["event"], LambdaContext())
    handled = time.perf_counter()
    return {
        "import_s": imported - before,
        "handle_s": handled - imported,
        "in_process_s": handled - STARTED,
        "status": response["statusCode"],
        "body": response["body"],
    }


def _bare_cold(job: dict[str, Any]) -> dict[str, Any]:
    before = time.perf_counter()
    import boto3  # noqa: F401 - the import is what is being timed

    imported = time.perf_counter()
    BareWebhook(BareTarget.from_dict(job["target"])).cold(job["event"])
    handled = time.perf_counter()
    return {"import_s": imported - before, "handle_s": handled - imported, "in_process_s": handled - STARTED}


def vary(template: dict[str, Any], job_id: int) -> dict[str, Any]:
    """A copy of an API Gateway webhook event for another job, with its own Idempotency-Key and event UUID."""
    hook = json.loads(template["body"])
    hook["build_id"] = job_id
    body = json.dumps(hook)
    headers = dict(template["headers"])
    headers["Idempotency-Key"] = str(uuid.uuid4())
    headers["X-Gitlab-Event-UUID"] = str(uuid.uuid4())
    context = {**template["requestContext"], "requestId": str(uuid.uuid4())}
    return {
        **template,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "requestContext": context,
        "body": body,
    }


def _bare_memory(job: dict[str, Any]) -> dict[str, Any]:
    """The memory baseline: boto3 imported, the bare calls made, RSS read at the same points as memory.py."""
    started = rss_mib()
    import boto3  # noqa: F401 - the import is part of the baseline

    imported = rss_mib()
    bare = BareWebhook(BareTarget.from_dict(job["target"]))
    marks = set(job["marks"])
    rss_at: dict[str, float] = {}
    for n in range(1, job["count"] + 1):
        if n % job["clear_every"] == 0:
            _ask_parent("clear")
        event = vary(job["template"], job["first_job_id"] + n)
        if n == 1:
            bare.cold(event)
        else:
            bare.record_and_queue(event)
        if n in marks:
            rss_at[str(n)] = rss_mib()
    return {"rss_start_mib": started, "rss_imported_mib": imported, "rss_at": rss_at}


def _ask_parent(command: str) -> None:
    """One request to the benchmark over stdout, answered on stdin (``ok``)."""
    sys.stdout.write(command + "\n")
    sys.stdout.flush()
    if not sys.stdin.readline().startswith("ok"):
        raise RuntimeError(f"the benchmark refused {command!r}")


ROLES = {"app-cold": _app_cold, "bare-cold": _bare_cold, "bare-memory": _bare_memory}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    result = ROLES[sys.argv[1]](job)
    # perf_counter is CLOCK_MONOTONIC, shared by all processes: the parent can tell start-up from exit.
    result["clock_started"] = STARTED
    result["clock_reported"] = time.perf_counter()
    sys.stderr.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

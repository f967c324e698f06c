"""Shared by the benchmarks: moto server in its own process, dev stage bootstrap, API Gateway events, figures.

moto runs in a child process (``python bench/_common.py serve-moto``), which starts ``LocalAws``, bootstraps the
dev stage's table, queues and SSM parameters with ``Bootstrapper`` and prints what the benchmark needs as one
JSON line. The process being measured then only ever talks to it over HTTP: neither moto's threads nor its
modules share the measured process's CPU time, GIL or resident memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from _child import RESULT_PREFIX, BareTarget

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
PYTHON = sys.executable
CHILD_SCRIPT = BENCH_DIR / "_child.py"
# Relative, as .chalice/config.json sets it for the dev stage: the app resolves it against its own directory.
STAGE_CONFIG = "chalicelib/stages/dev.yaml"

sys.dont_write_bytecode = True  # this process imports app too: no __pycache__ in chalicelib and the like

if str(PROJECT_DIR) not in sys.path:
    # tests.payloads is not part of the installed package; the scripts run as `python bench/<name>.py`.
    sys.path.append(str(PROJECT_DIR))

from tests.payloads import gitlab_headers, job_hook  # noqa: E402


@dataclass(frozen=True)
class LocalStack:
    """The moto server's environment (endpoint and dummy credentials) and the dev stage resources in it."""

    environment: dict[str, str]
    webhook_token: str = field(repr=False)
    target: BareTarget
    plan: tuple[str, ...]
    process: MotoProcess

    def clear(self) -> None:
        """Empty the table and the jobs queue (outside any timing).

        moto's SendMessage slows with the queue's length, so without this the AWS side, not the code measured,
        would grow with every sample; an empty table keeps each UpdateItem's lookup alike too.
        """
        self.process.command("clear")


class MotoProcess:
    """moto server (LocalAws) in a child process, bootstrapped with the dev stage, for the ``with`` block."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> LocalStack:
        self._process = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "serve-moto", str(PROJECT_DIR / STAGE_CONFIG)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=PROJECT_DIR,
            env=_isolated_environment(),
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("{"):
            self._log.seek(0)
            problem = f"moto server did not start:\n{line}{self._log.read()[-4000:]}"
            self.__exit__(None, None, None)
            raise RuntimeError(problem)
        data = json.loads(line)
        return LocalStack(
            environment=data["environment"],
            webhook_token=data["webhook_token"],
            target=BareTarget.from_dict(data["target"]),
            plan=tuple(data["plan"]),
            process=self,
        )

    def command(self, name: str) -> str:
        """Send one command line to the moto child and wait for its one-line answer."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(name + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer.startswith("ok"):
            self._log.seek(0)
            raise RuntimeError(f"moto child answered {answer!r} to {name}:\n{self._log.read()[-4000:]}")
        return answer.strip()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        process = self._process
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the server stops when its stdin closes
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._log.close()
        self._process = None


def wait_until(condition: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """Poll ``condition`` every ``every`` seconds until it holds (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def isolate_environment() -> None:
    """Nothing in this process's environment may send boto3 anywhere but the sandbox's moto (set on start)."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "POWERTOOLS_"))]:
        del os.environ[key]
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # the moto child process too


def serve_moto(config_path: str) -> None:
    """The child side of MotoProcess: start LocalAws, bootstrap, announce, then obey stdin until it closes."""
    from chalicelib.aws import AwsClients
    from chalicelib.config import load_config
    from fleetctl.bootstrap import Bootstrapper
    from fleetctl.sandbox.local_aws import LocalAws
    from fleetctl.sandbox.network import register_sandbox_amis

    config = load_config(config_path)
    local = LocalAws().start()
    local.export_environment()
    clients = AwsClients(region=config.region)
    # Bootstrap refuses a plan whose pools have no runner AMI of their architecture: publish the sandbox's.
    register_sandbox_amis(clients.ssm, clients.ec2, config.ami_parameter)
    # No GitLab token: the webhook path never calls GitLab, so that parameter is left "missing".
    bootstrapper = Bootstrapper(config, clients, gitlab_token=None)
    plan = bootstrapper.plan()
    bootstrapper.execute(plan)
    found = clients.ssm.get_parameter(Name=config.webhook.token_parameter, WithDecryption=True)
    announcement = {
        "environment": local.environment(),
        "webhook_token": found["Parameter"]["Value"],
        "target": {
            "table": config.state.table,
            "jobs_queue": config.state.jobs_queue,
            "token_parameter": config.webhook.token_parameter,
        },
        "plan": [change.describe() for change in plan],
    }
    sys.stdout.write(json.dumps(announcement) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() == "clear":
            removed = _clear(clients, config.state.table, config.state.jobs_queue)
            sys.stdout.write(f"ok {removed}\n")
        else:
            sys.stdout.write(f"unknown command {line.strip()!r}\n")
        sys.stdout.flush()
    local.stop()


def _clear(clients: Any, table: str, queue: str) -> int:
    ddb = clients.dynamodb
    keys = [
        item["pk"]
        for page in ddb.get_paginator("scan").paginate(TableName=table, ProjectionExpression="pk")
        for item in page["Items"]
    ]
    for start in range(0, len(keys), 25):  # BatchWriteItem takes at most 25 requests
        requests = [{"DeleteRequest": {"Key": {"pk": key}}} for key in keys[start : start + 25]]
        ddb.batch_write_item(RequestItems={table: requests})
    # Drained rather than purged: PurgeQueue is allowed once a minute, in moto as in AWS.
    sqs = clients.sqs
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages")
        if not messages:
            return len(keys)
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        sqs.delete_message_batch(QueueUrl=url, Entries=entries)


def _isolated_environment() -> dict[str, str]:
    """This process's environment without anything that could send boto3 elsewhere than moto."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "POWERTOOLS_"))}
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    # Never write .pyc files into the project (nor does Lambda: /var/task is read-only).
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def handler_environment(stack: LocalStack) -> dict[str, str]:
    """What the webhook Lambda of the dev stage sees (.chalice/config.json), pointed at moto.

    Metrics stay enabled, as in Lambda: their EMF lines go to stdout, which the benchmarks discard.
    """
    chalice = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    return {
        **_isolated_environment(),
        **stack.environment,
        **chalice.get("environment_variables", {}),
        **chalice["stages"]["dev"].get("environment_variables", {}),
        "RUNNER_FLEET_CONFIG": STAGE_CONFIG,
    }


def use_handler_environment(stack: LocalStack) -> None:
    """Make this process look like the webhook Lambda; call before importing ``app``."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "POWERTOOLS_"))]:
        del os.environ[key]
    os.environ.update(handler_environment(stack))


def api_gateway_event(body: str, headers: dict[str, str]) -> dict[str, Any]:
    """A REST API (proxy integration) event for POST /webhooks/gitlab, as API Gateway hands it to Lambda."""
    return {
        "resource": "/webhooks/gitlab",
        "path": "/webhooks/gitlab",
        "httpMethod": "POST",
        "headers": dict(headers),
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None,
        # API Gateway always sends this key (null without a query string) and Chalice's Request requires it.
        "multiValueQueryStringParameters": None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/webhooks/gitlab",
            "httpMethod": "POST",
            "path": "/api/webhooks/gitlab",
            "stage": "api",
            "requestId": str(uuid.uuid4()),
            "identity": {"sourceIp": "127.0.0.1"},
        },
        "body": body,
        "isBase64Encoded": False,
    }


def webhook_event(token: str, job_id: int | None = None) -> dict[str, Any]:
    """A valid pending Job Hook for a new job, with its own Idempotency-Key."""
    return api_gateway_event(json.dumps(job_hook("pending", build_id=job_id)), gitlab_headers(token))


def queued(response: dict[str, Any]) -> bool:
    """Whether Chalice answered 200 {"queued": true}, i.e. the webhook recorded and queued the job."""
    try:
        body = json.loads(response.get("body") or "null")
    except ValueError:
        return False
    return response.get("statusCode") == 200 and body == {"queued": True}


def run_child(role: str, job: dict[str, Any], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Run ``_child.py <role>`` in a fresh interpreter; its wall time (interpreter start included) and figures,
    with ``startup_s`` (spawn to the child's first line) and ``exit_s`` (its figures written to its exit) added.

    The child's stdout (the app's logs and EMF metrics) goes to /dev/null, as cheap a sink as Lambda's.
    """
    payload = json.dumps(job) + "\n"
    started = time.perf_counter()
    finished = subprocess.run(
        [PYTHON, str(CHILD_SCRIPT), role],
        input=payload,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=PROJECT_DIR,
        check=False,
    )
    ended = time.perf_counter()
    figures = child_result(role, finished.returncode, finished.stderr)
    figures["startup_s"] = figures["clock_started"] - started
    figures["exit_s"] = ended - figures["clock_reported"]
    return ended - started, figures


def child_result(role: str, returncode: int | None, stderr: str) -> dict[str, Any]:
    """The figures a child wrote to stderr (``RESULT_PREFIX`` line), or an error with its stderr."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    raise RuntimeError(f"{role} child failed (exit {returncode}):\n{stderr[-4000:]}")


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 (the app's logs and EMF metrics) to /dev/null for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure, so the report shows it."""
    return round(os.getloadavg()[0], 2)


def footer(started: float, load_before: float) -> str:
    """The report's last human-readable line: how long the benchmark ran and how busy the machine was."""
    return (
        f"  ({time.perf_counter() - started:.0f} s; load average {load_before} before, {load_average()} after,"
        f" {os.cpu_count()} CPUs: figures from a busy machine are not comparable)"
    )


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def report(lines: Sequence[str], figures: dict[str, Any]) -> None:
    """Print the human-readable lines, then the figures as one JSON object: always the last line."""
    for line in lines:
        print(line)
    print(json.dumps(figures, sort_keys=False))
    sys.stdout.flush()


def run_benchmark(name: str, main: Callable[[], None]) -> int:
    """Run a benchmark's main; exit status 0 even if it broke, with the error in the last-line JSON."""
    try:
        main()
    except Exception as exc:
        traceback.print_exc()
        report([f"{name}: could not run: {exc}"], {"benchmark": name, "error": str(exc), "met": False})
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve-moto":
        serve_moto(sys.argv[2])
    else:
        sys.exit("usage: python bench/_common.py serve-moto <stage config>")

"""Local AWS: moto in server mode on a free loopback port, reached through the standard ``AWS_ENDPOINT_URL``.

Everything (boto3 in the app, Powertools, fleetctl) finds it the way it would find real AWS, with no special
code path. In front of moto sits the AWS shim (``fleetctl.sandbox.aws_shim``), which answers the way AWS does
where moto is kinder: every client of the local AWS meets its rules. The credentials are dummies that moto
accepts. moto runs in a child process of its own, as AWS is a peer of its own: the app, the GitLab emulator and
the event pump then never wait on moto for the interpreter lock, which is what a burst of hundreds of launches
needs on a two-core machine.

moto's DynamoDB is not safe under concurrent requests (a transaction deep-copies table state while another
request mutates it, and answers 500), while real DynamoDB serialises conflicting writes itself. So the server
here is moto's own threaded server with one difference: DynamoDB requests go through one at a time. Every
other service stays concurrent, and SQS long polls never block anything.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Self

import requests

SANDBOX_REGION = "us-east-1"

ENV_DEFAULTS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": SANDBOX_REGION,
    "AWS_REGION": SANDBOX_REGION,
}

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _SerialDynamoDB:
    """WSGI middleware: one DynamoDB request at a time (see the module docstring)."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not str(environ.get("HTTP_X_AMZ_TARGET", "")).startswith("DynamoDB_"):
            return self._app(environ, start_response)
        with self._lock:
            # Consume the body inside the lock: the work happens while the response is produced.
            return list(self._app(environ, start_response))


def _serve(host: str, port: int) -> Any:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    # werkzeug would print an access log line per AWS call.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from fleetctl.sandbox.aws_rules import default_rules
    from fleetctl.sandbox.aws_shim import AwsShim

    app = AwsShim(_SerialDynamoDB(DomainDispatcherApplication(create_backend_app)), default_rules())
    return make_server(host, port, app, True, request_handler=MotoRequestHandler)


class LocalAws:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    def start(self) -> Self:
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "fleetctl.sandbox.local_aws", self._host, str(self._port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.endpoint_url = line
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the server stops when its parent hangs up
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def reset(self) -> None:
        """Forget every resource (moto's reset API), for a fresh test."""
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=30).raise_for_status()

    def shim(self, rule: str, action: str, **payload: Any) -> Any:
        """Configure one of the AWS shim's rules (``POST /_shim/<rule>/<action>``); returns its answer."""
        response = requests.post(f"{self.endpoint_url}/_shim/{rule}/{action}", json=payload, timeout=30)
        if response.status_code != 200:
            raise ValueError(response.json().get("error", response.text))
        return response.json()["result"]

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until AWS's lagging reads have caught up with every write and launch made so far, and EC2's
        state-change events due so far were put: what an observer does in AWS before it judges the state it
        reads (tests, the demo's final checks); ECR's image events due so far too. Raises TimeoutError when they do
        not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            young = (
                self.shim("ec2-describe-lag", "status")["young"]
                + self.shim("dynamodb-index-lag", "status")["young_items"]
                + self.shim("ec2-state-events", "status")["due"]
                + self.shim("ecr-events", "status")["due"]
            )
            if young == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local AWS did not settle within {timeout} s ({young} reads still lag)")
            time.sleep(0.05)

    def environment(self) -> dict[str, str]:
        return {**ENV_DEFAULTS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def export_environment(self) -> None:
        os.environ.update(self.environment())


def main() -> None:
    """``python -m fleetctl.sandbox.local_aws HOST PORT``: serve until standard input closes."""
    host, port = sys.argv[1], int(sys.argv[2])
    server = _serve(host, port)
    threading.Thread(target=server.serve_forever, name="local-aws", daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    print(f"http://{bound_host}:{bound_port}", flush=True)
    sys.stdin.read()  # returns when the parent closes the pipe or dies
    # Everything moto holds is in memory and meant to vanish; waiting for its request threads only delays exit.
    os._exit(0)


if __name__ == "__main__":
    main()

"""Local AWS: moto in server mode on a free loopback port, reached through the standard ``AWS_ENDPOINT_URL``.

Everything (boto3 in the app, Powertools, fleetctl) finds it the way it would find real AWS, with no special
code path. The credentials are dummies that moto accepts.

moto's DynamoDB is not safe under concurrent requests (a transaction deep-copies table state while another
request mutates it, and answers 500), while real DynamoDB serialises conflicting writes itself. So the server
here is moto's own threaded server with one difference: DynamoDB requests go through one at a time. Every
other service stays concurrent, and SQS long polls never block anything.
"""

from __future__ import annotations

import logging
import os
import threading
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


class LocalAws:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.endpoint_url = ""

    def start(self) -> Self:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        # werkzeug would print an access log line per AWS call.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = _SerialDynamoDB(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._host, self._port, app, True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-aws", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def reset(self) -> None:
        """Forget every resource (moto's reset API), for a fresh test."""
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=10).raise_for_status()

    def environment(self) -> dict[str, str]:
        return {**ENV_DEFAULTS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def export_environment(self) -> None:
        os.environ.update(self.environment())

"""Lazily built boto3 clients, one place to swap them.

Nothing here creates a client at import time: a Lambda pays only for the clients its path uses, and tests (or
the sandbox) point everything at moto server through the standard ``AWS_ENDPOINT_URL`` or pass a session of
their own. Clients use botocore's ``standard`` retry mode, which retries throttling and transient errors with
jittered backoff and a retry quota, instead of hand-written loops.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config

# The webhook must answer GitLab well within its 10 s delivery timeout, so no call may hang: short connect and
# read timeouts, and a bounded number of standard-mode retries.
DEFAULT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 3},
    connect_timeout=2,
    read_timeout=5,
    max_pool_connections=32,
)


_shared_loader: list[Any] = []  # the process's one botocore data loader, once a session made it
_loader_lock = threading.Lock()


def _new_session(region: str | None) -> boto3.Session:
    """A boto3 session whose botocore data loader (service models, endpoints) is shared by every session of the
    process: each ``AwsClients`` gets clients of its own, but the JSON behind them is parsed once. A Lambda builds
    one session anyway; the sandbox and tests, which start afresh many times, would otherwise parse the EC2 model
    and the endpoint table again each time."""
    import botocore.session

    core = botocore.session.get_session()
    with _loader_lock:
        if _shared_loader:
            core.register_component("data_loader", _shared_loader[0])
        else:
            _shared_loader.append(core.get_component("data_loader"))
        session = boto3.Session(botocore_session=core, region_name=region)
        # boto3 adds its own data directory to the loader's search path for every session it makes.
        paths = _shared_loader[0].search_paths
        paths[:] = list(dict.fromkeys(paths))
    return session


class AwsClients:
    """Builds each service client once per process, from an injected session and botocore config."""

    def __init__(
        self,
        session: boto3.Session | None = None,
        config: Config | None = None,
        region: str | None = None,
    ) -> None:
        self._session = session
        self._config = config or DEFAULT_CONFIG
        self._region = region
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str) -> Any:
        # boto3 sessions are not thread-safe to create clients from concurrently (the local HTTP server and
        # the sandbox pump run threads), so creation is serialised; the clients themselves are thread-safe.
        found = self._clients.get(service)
        if found is not None:
            return found
        with self._lock:
            found = self._clients.get(service)
            if found is None:
                if self._session is None:
                    self._session = _new_session(self._region)
                found = self._session.client(service, config=self._config)
                self._clients[service] = found
            return found

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def ssm(self) -> Any:
        return self.client("ssm")

    @property
    def ec2(self) -> Any:
        return self.client("ec2")


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError``, or "" for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))

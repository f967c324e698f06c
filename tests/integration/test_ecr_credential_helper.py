"""The real Amazon ECR credential helper, with the docker configuration a pool's user data renders.

Debian's ``amazon-ecr-credential-helper`` (``docker-credential-ecr-login``, the helper the AMI installs from Amazon
Linux's repositories) and the real docker CLI run with ``HOME`` and ``AWS_ECR_CACHE_DIR`` as the boot unit sets
them, on the ``/root/.docker/config.json`` that cloud-init writes from the pool's user data. The docker CLI asks the
helper named in ``credHelpers`` for a registry's credentials and sends them to its daemon in the pull request's
``X-Registry-Auth`` header (docker/cli ``command/registry.go``); the daemon here is a stand-in on a unix socket that
records that header, since this machine runs no Docker engine. The helper reaches the local AWS's ECR through
``tests/aws_https_proxy.py``: its aws-sdk-go-v2 (2022) predates ``AWS_ENDPOINT_URL``.

What stays unverified here: the helper's IMDS credentials (an instance gets its role's from the metadata service;
the helper here gets the local AWS's from the environment), and the pull itself (no registry, no engine).
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib.config import load_config
from chalicelib.scaling.userdata import DOCKER_CONFIG_FILE, image_reference, render_user_data
from fleetctl.sandbox.local_aws import LocalAws
from tests.aws_https_proxy import AwsHttpsProxy

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "runner_ami" / "files" / "runner-fleet-boot.service"
ACCOUNT = "123456789012"  # moto's account: the local ECR answers for it
REGISTRY = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com"
DIGEST = "sha256:" + "ab" * 32


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed; `make test` installs it"
        if os.environ.get("RUNNER_FLEET_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


class DockerDaemonStandIn:
    """The two calls of ``docker pull`` a daemon answers (``HEAD /_ping``, ``POST /images/create``), recording the
    credentials each pull carried."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.pulls: list[dict[str, Any]] = []
        daemon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(200)
                self.send_header("Api-Version", "1.47")
                self.send_header("OSType", "linux")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self._answer(b"OK")

            def do_GET(self) -> None:
                self._answer(b"OK")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                encoded = self.headers.get("X-Registry-Auth", "")
                auth = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) or b"{}")
                daemon.pulls.append({"image": query["fromImage"][0], "tag": query.get("tag", [""])[0], "auth": auth})
                self._answer(json.dumps({"status": "Downloaded"}).encode() + b"\n", "application/json")

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

            def get_request(self) -> Any:
                connection, _ = super().get_request()
                return connection, ("local", 0)

        self._server = Server(str(socket_path), Handler)

    def __enter__(self) -> DockerDaemonStandIn:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def instance_root(tmp_path: Path) -> Path:
    """An instance's files as cloud-init writes them from the docker pool's user data: its docker configuration."""
    config = load_config(ROOT / "chalicelib" / "stages" / "dev.yaml")
    pool = config.pool("docker")
    user_data = yaml.safe_load(render_user_data(config, pool, image_reference(pool, REGISTRY, DIGEST)))
    root = tmp_path / "instance"
    [docker_config] = [f for f in user_data["write_files"] if f["path"] == DOCKER_CONFIG_FILE]
    target = root / DOCKER_CONFIG_FILE.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_text(docker_config["content"])
    return root


def _unit_environment(root: Path) -> dict[str, str]:
    """The boot unit's Environment= settings, with the instance's absolute paths under ``root``."""
    settings = [line.removeprefix("Environment=") for line in UNIT.read_text().splitlines()]
    pairs = dict(line.split("=", 1) for line in settings if "=" in line and not line.startswith(("#", "[")))
    return {key: str(root / value.lstrip("/")) for key, value in pairs.items() if key in ("HOME", "AWS_ECR_CACHE_DIR")}


@pytest.fixture
def pull(
    local_aws: LocalAws, instance_root: Path, tmp_path: Path
) -> Iterator[tuple[Any, DockerDaemonStandIn, AwsHttpsProxy]]:
    docker = _tool("docker")
    helper_dir = Path(_tool("docker-credential-ecr-login")).parent
    with AwsHttpsProxy(local_aws.endpoint_url, tmp_path) as proxy, DockerDaemonStandIn(tmp_path / "d.sock") as daemon:
        environment = {
            "PATH": f"{helper_dir}:/usr/bin:/bin",
            "DOCKER_HOST": f"unix://{daemon.socket_path}",
            **_unit_environment(instance_root),
            **{k: v for k, v in local_aws.environment().items() if k != "AWS_ENDPOINT_URL"},
            **proxy.environment(),
        }

        def run(image: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [docker, "pull", image], env=environment, capture_output=True, text=True, timeout=60, check=False
            )

        yield run, daemon, proxy


def test_the_pools_registry_gets_credentials_from_the_helper(
    pull: tuple[Any, DockerDaemonStandIn, AwsHttpsProxy], instance_root: Path
) -> None:
    run, daemon, proxy = pull

    # when the pool's image is pulled as the boot script pre-pulls it
    result = run(f"{REGISTRY}/ci/build-base@{DIGEST}")

    # then the helper got the registry's credentials from ECR, and docker sent them with the pull
    assert result.returncode == 0, result.stderr
    [pulled] = daemon.pulls
    assert pulled["image"] == f"{REGISTRY}/ci/build-base"
    assert pulled["auth"]["username"] == "AWS"
    assert pulled["auth"]["password"]  # the ECR authorization token's password
    assert pulled["auth"]["serveraddress"] == REGISTRY
    assert [r.target for r in proxy.requests] == ["AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"]
    assert {r.host for r in proxy.requests} == {"api.ecr.us-east-1.amazonaws.com"}
    # and it cached them where the boot unit's AWS_ECR_CACHE_DIR says, the instance's /root/.ecr
    cache = json.loads((instance_root / "root" / ".ecr" / "cache.json").read_text())
    assert REGISTRY in json.dumps(cache)

    # so the next pull (a job's image from the same registry) does not ask ECR again: the token lasts 12 hours
    again = run(f"{REGISTRY}/ci/build-base:other")
    assert again.returncode == 0, again.stderr
    assert daemon.pulls[1]["auth"] == pulled["auth"]
    assert len(proxy.requests) == 1


def test_ecr_authorization_tokens_are_valid_for_12_hours(local_aws: LocalAws) -> None:
    import time

    import boto3

    before = time.time()
    [data] = boto3.client("ecr").get_authorization_token()["authorizationData"]

    assert before + 12 * 3600 - 5 <= data["expiresAt"].timestamp() <= time.time() + 12 * 3600 + 5


def test_a_registry_the_pool_does_not_list_gets_no_credentials(
    pull: tuple[Any, DockerDaemonStandIn, AwsHttpsProxy], instance_root: Path
) -> None:
    run, daemon, proxy = pull

    # when images of registries the docker configuration does not name are pulled: another account's ECR, Docker Hub
    other = f"210987654321.dkr.ecr.us-east-1.amazonaws.com/ci/build-base@{DIGEST}"
    results = [run(other), run("docker.io/library/alpine:3.20")]

    # then docker asked no helper for them: no credentials went with the pulls, and nothing reached ECR
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert [p["auth"] for p in daemon.pulls] == [{}, {}]
    assert proxy.requests == []
    assert not (instance_root / "root" / ".ecr").exists()

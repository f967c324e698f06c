"""The GitLab emulator over real HTTP: python-gitlab and plain requests on one side, a webhook receiver on the
other, the way runner-fleet and gitlab-runner meet the real GitLab."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gitlab
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from tests.integration.conftest import EMULATOR_ADMIN_TOKEN

ADMIN = EMULATOR_ADMIN_TOKEN
OWNER = "glpat-test-owner"  # a non-administrator owning every group and project
SIGNING_KEY = bytes(range(32))
SIGNING_TOKEN = "whsec_" + base64.b64encode(SIGNING_KEY).decode()
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ISO_S = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
LEGACY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")
# Headers requests adds on its own; everything else on a delivery is what the emulator chose to send.
TRANSPORT_HEADERS = {"host", "accept", "accept-encoding", "connection", "content-length"}

pytestmark = pytest.mark.timeout(30)


# -- a webhook receiver --


@dataclass(frozen=True)
class Received:
    headers: CaseInsensitiveDict[str]
    body: bytes
    attempt: int  # how many times this Idempotency-Key has arrived, this one included

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


# Decides (status, seconds to stall before answering) for each request.
Responder = Callable[[Received], tuple[int, float]]


class Receiver:
    def __init__(self, respond: Responder) -> None:
        self.received: list[Received] = []
        self._respond = respond
        self._lock = threading.Lock()
        self._attempts: Counter[str] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = CaseInsensitiveDict(dict(self.headers.items()))
                with receiver._lock:
                    receiver._attempts[headers.get("Idempotency-Key", "")] += 1
                    got = Received(headers, body, receiver._attempts[headers.get("Idempotency-Key", "")])
                    receiver.received.append(got)
                status, stall = receiver._respond(got)
                time.sleep(stall)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the emulator gave up waiting: that is the point of a stall

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json for r in self.received]


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(respond: Responder = lambda _r: (200, 0.0)) -> Receiver:
        receiver = Receiver(respond)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


@pytest.fixture
def receiver(receiver_factory: Callable[..., Receiver]) -> Receiver:
    return receiver_factory()


# -- the emulator and clients --


@pytest.fixture
def signing_emu(emulator_factory: Callable[..., GitLabEmulator]) -> GitLabEmulator:
    """A GitLab that honours hook signing tokens: 19.0 with the webhook_signing_token flag on."""
    emulator = emulator_factory(version="19.0.0")
    emulator.enable_feature("webhook_signing_token")
    return emulator


@pytest.fixture
def gl(emu: GitLabEmulator) -> gitlab.Gitlab:
    client = gitlab.Gitlab(emu.url, private_token=ADMIN, timeout=5)
    client.auth()
    return client


def api(emu: GitLabEmulator, path: str) -> str:
    return f"{emu.url}/api/v4{path}"


def admin(emu: GitLabEmulator, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, api(emu, path), headers={"PRIVATE-TOKEN": ADMIN}, timeout=5, **kwargs)


def hook(emu: GitLabEmulator, project_id: int, url: str, **settings: Any) -> int:
    settings = {"url": url, "job_events": True, "push_events": False, **settings}
    response = admin(emu, "POST", f"/projects/{project_id}/hooks", json=settings)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def new_runner(emu: GitLabEmulator, **settings: Any) -> dict[str, Any]:
    response = admin(emu, "POST", "/user/runners", json={"runner_type": "instance_type", **settings})
    assert response.status_code == 201, response.text
    return dict(response.json())


def request_job(emu: GitLabEmulator, token: str, system_id: str = "s_test") -> requests.Response:
    return requests.post(api(emu, "/jobs/request"), json={"token": token, "system_id": system_id}, timeout=5)


def delivered_keys(emu: GitLabEmulator) -> Counter[str]:
    return Counter(d.idempotency_key for d in emu.deliveries)


# -- auth, routing, projects --


def test_requests_without_the_admin_token_get_401(emu: GitLabEmulator) -> None:
    # given / when
    missing = requests.get(api(emu, "/runners/all"), timeout=5)
    wrong = requests.get(api(emu, "/runners/all"), headers={"PRIVATE-TOKEN": "glpat-nope"}, timeout=5)
    bearer = requests.get(api(emu, "/runners/all"), headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)

    # then
    assert (missing.status_code, missing.json()) == (401, {"message": "401 Unauthorized"})
    assert wrong.status_code == 401
    assert bearer.status_code == 200
    with pytest.raises(gitlab.GitlabAuthenticationError):
        gitlab.Gitlab(emu.url, private_token="glpat-nope").auth()


def test_unknown_routes_and_ids_get_gitlab_404s(emu: GitLabEmulator) -> None:
    # given
    project_id = emu.create_project("acme/app")

    # when / then
    assert admin(emu, "GET", "/nope").json() == {"message": "404 Not Found"}
    assert admin(emu, "GET", "/projects/999").json() == {"message": "404 Project Not Found"}
    assert admin(emu, "GET", f"/projects/{project_id}/jobs/999").json() == {"message": "404 Job Not Found"}
    assert admin(emu, "GET", f"/projects/{project_id}/hooks/9").json() == {"message": "404 Hook Not Found"}
    assert admin(emu, "GET", "/runners/1").json() == {"message": "404 Runner Not Found"}
    assert admin(emu, "DELETE", "/runners/1").status_code == 404


def test_projects_are_found_by_id_or_encoded_path(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    created = gl.projects.create({"name": "Demo App", "path": "demo"})
    seeded = emu.create_project("acme/platform/app")

    # when
    by_path = gl.projects.get("acme/platform/app")

    # then
    assert created.path_with_namespace == "root/demo"
    assert by_path.id == seeded
    assert gl.projects.get(created.id).name == "Demo App"


# -- hooks --


def test_hooks_crud_never_returns_secrets(signing_emu: GitLabEmulator) -> None:
    # given
    emu = signing_emu
    gl = gitlab.Gitlab(emu.url, private_token=ADMIN, timeout=5)
    project = gl.projects.get(emu.create_project("acme/app"))

    # when
    created = project.hooks.create(
        {
            "url": "https://example.com/hook",
            "token": "s3cret",
            "job_events": True,
            "signing_token": SIGNING_TOKEN,
        }
    )
    created.pipeline_events = True
    created.token = ""
    created.save()
    fetched = project.hooks.get(created.id)

    # then
    assert "token" not in created.attributes and "signing_token" not in created.attributes
    assert fetched.job_events is True and fetched.pipeline_events is True
    assert fetched.token_present is False
    assert fetched.signing_token_present is True
    assert [h.id for h in project.hooks.list(get_all=True)] == [created.id]
    created.delete()
    assert project.hooks.list(get_all=True) == []
    with pytest.raises(gitlab.GitlabGetError) as missing:
        project.hooks.get(created.id)
    assert missing.value.response_code == 404


def test_a_malformed_signing_token_is_rejected(signing_emu: GitLabEmulator) -> None:
    # given
    emu = signing_emu
    project_id = emu.create_project("acme/app")

    # when
    response = admin(emu, "POST", f"/projects/{project_id}/hooks", json={"url": "http://x", "signing_token": "abc"})

    # then
    assert response.status_code == 400


# -- runners --


def test_runners_are_created_listed_and_filtered_like_gitlab(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project_id = emu.create_project("acme/app")

    # when
    shared = gl.user.runners.create(
        {
            "runner_type": "instance_type",
            "tag_list": ["docker", "linux"],
            "description": "spot-1",
            "paused": False,
        }
    )
    mine = gl.user.runners.create({"runner_type": "project_type", "project_id": project_id, "paused": True})
    detail = gl.runners.get(shared.id)

    # then
    assert shared.token.startswith("glrt-") and shared.token_expires_at is None
    assert (detail.status, detail.online, detail.runner_type, detail.is_shared) == (
        "never_contacted",
        False,
        "instance_type",
        True,
    )
    assert detail.tag_list == ["docker", "linux"] and detail.description == "spot-1"
    assert {"access_level", "maximum_timeout", "run_untagged", "locked", "projects", "contacted_at"} <= set(
        detail.attributes
    )
    # GET /runners lists the runners the user owns; instance runners only show in /runners/all.
    assert [r.id for r in gl.runners.list(get_all=True)] == [mine.id]
    assert {r.id for r in gl.runners_all.list(get_all=True)} == {shared.id, mine.id}
    assert [r.id for r in gl.runners_all.list(type="project_type", get_all=True)] == [mine.id]
    assert [r.id for r in gl.runners_all.list(paused=True, get_all=True)] == [mine.id]
    assert [r.id for r in gl.runners_all.list(tag_list=["docker"], get_all=True)] == [shared.id]
    assert [r.id for r in gl.runners_all.list(status="never_contacted", get_all=True)] == [shared.id, mine.id]
    # The list shape has no tags: reading them takes GET /runners/:id, as with GitLab.
    assert "tag_list" not in gl.runners_all.list(get_all=True)[0].attributes


def as_owner(emu: GitLabEmulator, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, api(emu, path), headers={"PRIVATE-TOKEN": OWNER}, timeout=5, **kwargs)


def test_a_token_without_admin_gets_403_where_gitlab_wants_an_administrator(emu: GitLabEmulator) -> None:
    # given a group owner's token, and an instance runner the administrator made
    emu.add_token(OWNER)
    project_id = emu.create_project("platform/app")
    shared = new_runner(emu)

    # when / then: /runners/all and instance runners are administrators' business
    assert as_owner(emu, "GET", "/user").json()["is_admin"] is False
    assert admin(emu, "GET", "/user").json()["is_admin"] is True
    listing = as_owner(emu, "GET", "/runners/all")
    assert (listing.status_code, listing.json()) == (403, {"message": "403 Forbidden"})
    assert as_owner(emu, "POST", "/user/runners", json={"runner_type": "instance_type"}).status_code == 403
    assert as_owner(emu, "DELETE", f"/runners/{shared['id']}").status_code == 403
    assert as_owner(emu, "POST", f"/runners/{shared['id']}/reset_authentication_token").status_code == 403
    # and group and project runners are the owner's
    project_runner = as_owner(
        emu, "POST", "/user/runners", json={"runner_type": "project_type", "project_id": project_id}
    )
    assert project_runner.status_code == 201
    reset = as_owner(emu, "POST", f"/runners/{project_runner.json()['id']}/reset_authentication_token")
    assert reset.status_code == 201


def test_a_revoked_token_gets_401(emu: GitLabEmulator) -> None:
    emu.add_token(OWNER)
    assert as_owner(emu, "GET", "/user").status_code == 200

    emu.revoke_token(OWNER)

    assert as_owner(emu, "GET", "/user").status_code == 401


def test_group_and_project_runner_listings_show_what_gitlab_shows(emu: GitLabEmulator) -> None:
    # given runners of every scope, in and out of the platform group
    emu.add_token(OWNER)
    app_id = emu.create_project("platform/app")
    other_id = emu.create_project("other/tool")
    group_id = as_owner(emu, "GET", f"/projects/{app_id}").json()["namespace"]["id"]
    other_group_id = as_owner(emu, "GET", f"/projects/{other_id}").json()["namespace"]["id"]

    def create(**settings: Any) -> int:
        answer = admin(emu, "POST", "/user/runners", json={"tag_list": "docker", **settings})
        assert answer.status_code == 201, answer.text
        return int(answer.json()["id"])

    shared = create(runner_type="instance_type")
    group = create(runner_type="group_type", group_id=group_id, tag_list="docker,dind")
    create(runner_type="group_type", group_id=other_group_id)
    app = create(runner_type="project_type", project_id=app_id)
    create(runner_type="project_type", project_id=other_id)

    def ids(path: str, **params: Any) -> list[int]:
        answer = as_owner(emu, "GET", path, params=params)
        assert answer.status_code == 200, answer.text
        return [int(r["id"]) for r in answer.json()]

    # when / then: a group lists its own runners and instance runners; a project adds its own
    assert ids(f"/groups/{group_id}/runners") == [shared, group]
    assert ids("/groups/platform/runners", type="group_type") == [group]
    assert ids(f"/groups/{group_id}/runners", tag_list="docker,dind") == [group]
    assert ids(f"/projects/{app_id}/runners") == [shared, group, app]
    assert ids("/projects/platform%2Fapp/runners", type="project_type") == [app]
    assert ids(f"/projects/{app_id}/runners", type="group_type") == [group]
    assert as_owner(emu, "GET", "/groups/999/runners").json() == {"message": "404 Group Not Found"}
    # the list shape is the one /runners/all has
    [listed] = as_owner(emu, "GET", f"/groups/{group_id}/runners", params={"type": "group_type"}).json()
    assert set(listed) == set(admin(emu, "GET", "/runners/all").json()[0])


def test_runners_are_updated_and_deleted(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    created = gl.user.runners.create({"runner_type": "instance_type", "tag_list": "docker"})
    runner = gl.runners.get(created.id)

    # when
    runner.paused = True
    runner.tag_list = ["docker", "arm64"]
    runner.description = "drained"
    runner.save()
    updated = gl.runners.get(created.id)
    gl.runners.delete(created.id)

    # then
    assert (updated.paused, updated.active, updated.tag_list, updated.description) == (
        True,
        False,
        ["docker", "arm64"],
        "drained",
    )
    assert [r["id"] for r in emu.runners()] == []
    with pytest.raises(gitlab.GitlabGetError):
        gl.runners.get(created.id)


def test_runner_tokens_verify_and_unregister(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    """``POST /runners/verify`` checks a created runner's token without contacting it: the runner and the
    runner manager it registers stay ``never_contacted`` (lib/api/ci/runner.rb ``authenticate_runner!(
    update_contacted_at: false)`` for ``glrt-`` tokens); ``DELETE /runners`` unregisters it."""
    # given
    token = new_runner(emu)["token"]

    # when
    verified = requests.post(api(emu, "/runners/verify"), json={"token": token, "system_id": "s_1"}, timeout=5)
    no_system_id = requests.post(api(emu, "/runners/verify"), json={"token": token}, timeout=5)
    bad = requests.post(api(emu, "/runners/verify"), json={"token": "glrt-bad", "system_id": "s_1"}, timeout=5)

    # then
    assert verified.status_code == 200 and verified.json()["token"] == token
    assert no_system_id.status_code == 400
    assert bad.status_code == 403
    assert emu.runners()[0]["status"] == "never_contacted"
    managers = admin(emu, "GET", f"/runners/{verified.json()['id']}/managers").json()
    assert [(m["system_id"], m["status"]) for m in managers] == [("s_1", "never_contacted")]
    assert requests.delete(api(emu, "/runners"), data={"token": token}, timeout=5).status_code == 204
    assert requests.delete(api(emu, "/runners"), params={"token": token}, timeout=5).status_code == 403
    assert emu.runners() == []


# -- pipelines, jobs, the runner agent API ------------------------------------------------------------------


def test_pipeline_jobs_queue_as_pending_with_their_tags(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project = gl.projects.get(emu.create_project("acme/app"))

    # when
    pipeline = project.pipelines.create(
        {
            "ref": "main",
            "jobs": [{"name": "build", "stage": "build", "tags": ["docker"]}, {"name": "lint", "stage": "build"}],
        }
    )
    pending = project.jobs.list(scope=["pending"], get_all=True)
    running = project.jobs.list(scope="running", get_all=True)

    # then
    assert pipeline.status == "pending"
    assert project.pipelines.get(pipeline.id).status == "pending"
    assert sorted(j.name for j in pending) == ["build", "lint"] and running == []
    build = project.jobs.get(next(j.id for j in pending if j.name == "build"))
    assert (build.status, build.tag_list, build.runner, build.stage) == ("pending", ["docker"], None, "build")
    assert build.pipeline["id"] == pipeline.id and build.pipeline["project_id"] == project.id
    assert ISO_MS.match(build.created_at) and build.started_at is None and build.finished_at is None
    assert "failure_reason" not in build.attributes
    assert len(pipeline.jobs.list(get_all=True)) == 2


def test_list_endpoints_paginate_for_python_gitlab(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec(name=f"job-{n}") for n in range(45)])

    # when
    first = admin(emu, "GET", f"/projects/{project_id}/jobs", params={"scope[]": "pending", "per_page": 20})
    last = admin(emu, "GET", f"/projects/{project_id}/jobs", params={"page": 3})
    project = gl.projects.get(project_id, lazy=True)

    # then
    assert len(first.json()) == 20
    assert {k: first.headers[k] for k in ("X-Page", "X-Per-Page", "X-Total", "X-Total-Pages", "X-Next-Page")} == {
        "X-Page": "1",
        "X-Per-Page": "20",
        "X-Total": "45",
        "X-Total-Pages": "3",
        "X-Next-Page": "2",
    }
    assert "page=2" in first.links["next"]["url"] and "scope" in first.links["next"]["url"]
    assert (len(last.json()), last.headers["X-Next-Page"], "next" in last.links) == (5, "", False)
    assert len(project.jobs.list(get_all=True)) == 45
    assert len(list(project.jobs.list(iterator=True, per_page=7))) == 45
    assert len(admin(emu, "GET", f"/projects/{project_id}/jobs", params={"per_page": 500}).json()) == 45


def test_a_runner_takes_only_jobs_it_may_run(emu: GitLabEmulator) -> None:
    # given
    project_id = emu.create_project("acme/app")
    other_project = emu.create_project("acme/other")
    pipeline = emu.create_pipeline(
        project_id, [JobSpec("gpu", tags=["gpu"]), JobSpec("untagged"), JobSpec("docker", tags=["docker"])]
    )
    docker_only = new_runner(emu, tag_list=["docker", "linux"], run_untagged=False)
    paused = new_runner(emu, tag_list=["docker", "gpu"], paused=True)
    elsewhere = new_runner(emu, runner_type="project_type", project_id=other_project, tag_list=["docker"])

    # when
    taken = request_job(emu, docker_only["token"])
    nothing_left = request_job(emu, docker_only["token"])

    # then
    assert taken.status_code == 201
    job = taken.json()
    assert job["job_info"] == {**job["job_info"], "name": "docker", "project_id": project_id, "stage": "test"}
    assert job["token"]
    assert nothing_left.status_code == 204
    assert request_job(emu, paused["token"]).status_code == 204
    assert request_job(emu, elsewhere["token"]).status_code == 204
    assert request_job(emu, "glrt-unknown").status_code == 403
    running = emu.job(project_id, job["id"])
    assert running["status"] == "running" and running["runner"]["id"] == docker_only["id"]
    assert ISO_MS.match(running["started_at"])
    on_runner = admin(emu, "GET", f"/runners/{docker_only['id']}/jobs", params={"status": "running"}).json()
    assert [(j["id"], j["pipeline"]["id"], j["project"]["path_with_namespace"]) for j in on_runner] == [
        (job["id"], pipeline, "acme/app")
    ]


def test_the_runner_reports_the_outcome_with_its_job_token(emu: GitLabEmulator) -> None:
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("a"), JobSpec("b")])
    token = new_runner(emu)["token"]
    first, second = request_job(emu, token).json(), request_job(emu, token).json()

    # when
    wrong_token = requests.put(api(emu, f"/jobs/{first['id']}"), json={"token": "x", "state": "success"}, timeout=5)
    success = requests.put(
        api(emu, f"/jobs/{first['id']}"), json={"token": first["token"], "state": "success"}, timeout=5
    )
    again = requests.put(api(emu, f"/jobs/{first['id']}"), json={"token": first["token"], "state": "failed"}, timeout=5)
    failed = requests.put(
        api(emu, f"/jobs/{second['id']}"),
        json={"token": second["token"], "state": "failed", "failure_reason": "runner_system_failure"},
        timeout=5,
    )

    # then
    assert (wrong_token.status_code, success.status_code, again.status_code, failed.status_code) == (
        403,
        200,
        403,
        200,
    )
    done = emu.job(project_id, first["id"])
    assert done["status"] == "success" and ISO_MS.match(done["finished_at"]) and done["duration"] is not None
    broken = emu.job(project_id, second["id"])
    assert (broken["status"], broken["failure_reason"]) == ("failed", "runner_system_failure")


def test_retry_queues_a_new_job_and_cancel_cancels(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project = gl.projects.get(emu.create_project("acme/app"))
    pipeline_id = emu.create_pipeline(project.id, [JobSpec("flaky", tags=["docker"]), JobSpec("slow")])
    flaky, slow = sorted(project.pipelines.get(pipeline_id).jobs.list(get_all=True), key=lambda j: j.name)
    emu.set_job_status(project.id, flaky.id, "failed", failure_reason="script_failure")

    # when
    retried = project.jobs.get(flaky.id, lazy=True).retry()
    canceled = project.jobs.get(slow.id, lazy=True).cancel()

    # then
    assert retried["id"] != flaky.id and retried["status"] == "pending" and retried["tag_list"] == ["docker"]
    assert retried["pipeline"]["id"] == pipeline_id
    assert project.jobs.get(flaky.id).status == "failed"
    assert canceled["status"] == "canceled"
    assert {j.id for j in project.pipelines.get(pipeline_id).jobs.list(get_all=True)} == {
        retried["id"],
        slow.id,
    }
    with pytest.raises(gitlab.GitlabJobRetryError):
        project.jobs.get(retried["id"], lazy=True).retry()  # still pending: not retryable


# -- webhooks --


def test_job_hooks_carry_gitlab_headers_and_body(emu: GitLabEmulator, receiver: Receiver) -> None:
    # given
    project_id = emu.create_project("acme/app")
    hook_id = hook(emu, project_id, receiver.url, token="hook-secret")

    # when
    pipeline_id = emu.create_pipeline(project_id, [JobSpec("build", tags=["docker"])])
    emu.wait_for_deliveries(timeout=5)

    # then
    assert sorted(b["build_status"] for b in receiver.bodies()) == ["created", "pending"]
    first, second = receiver.received
    assert {k.lower() for k in first.headers} - TRANSPORT_HEADERS == {
        "content-type",
        "user-agent",
        "x-gitlab-event",
        "x-gitlab-token",
        "x-gitlab-instance",
        "x-gitlab-webhook-uuid",
        "x-gitlab-event-uuid",
        "idempotency-key",
    }
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"] == "GitLab/17.9.0"
    assert first.headers["X-Gitlab-Event"] == "Job Hook"
    assert first.headers["X-Gitlab-Token"] == "hook-secret"
    assert first.headers["X-Gitlab-Instance"] == emu.url
    assert first.headers["X-Gitlab-Webhook-UUID"] != second.headers["X-Gitlab-Webhook-UUID"]
    assert first.headers["X-Gitlab-Event-UUID"] != second.headers["X-Gitlab-Event-UUID"]
    assert first.headers["Idempotency-Key"] != second.headers["Idempotency-Key"]
    body = next(b for b in receiver.bodies() if b["build_status"] == "pending")
    assert body["object_kind"] == "build"
    assert (body["build_name"], body["build_stage"], body["pipeline_id"], body["project_id"]) == (
        "build",
        "test",
        pipeline_id,
        project_id,
    )
    assert body["commit"]["id"] == pipeline_id  # the pipeline id, not a SHA
    assert body["project"]["path_with_namespace"] == "acme/app"
    assert ISO_MS.match(body["build_created_at"]) and ISO_S.match(body["build_created_at_iso"])
    assert body["build_started_at"] is None and body["build_started_at_iso"] is None
    assert body["runner"] is None and body["environment"] is None
    assert "tag_list" not in body and "tags" not in body  # job tags never travel in a Job Hook
    assert {d.hook_id for d in emu.deliveries} == {hook_id}
    assert [(d.id, d.status_code) for d in emu.deliveries] == [(1, 200), (2, 200)]


def test_job_hooks_show_the_runner_once_it_took_the_job(emu: GitLabEmulator, receiver: Receiver) -> None:
    # given
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("build", tags=["docker"])])
    hook(emu, project_id, receiver.url)
    runner = new_runner(emu, tag_list=["docker", "linux"], description="spot-1")

    # when
    job = request_job(emu, runner["token"]).json()
    requests.put(api(emu, f"/jobs/{job['id']}"), json={"token": job["token"], "state": "failed"}, timeout=5)
    emu.wait_for_deliveries(timeout=5)

    # then
    by_status = {b["build_status"]: b for b in receiver.bodies()}
    assert set(by_status) == {"running", "failed"}
    assert by_status["running"]["runner"] == {
        "active": True,
        "runner_type": "instance_type",
        "is_shared": True,
        "id": runner["id"],
        "description": "spot-1",
        "tags": ["docker", "linux"],
    }
    assert ISO_MS.match(by_status["running"]["build_started_at"])
    assert by_status["failed"]["build_failure_reason"] == "unknown_failure"
    assert by_status["failed"]["build_duration"] is not None
    assert "X-Gitlab-Token" not in receiver.received[0].headers  # the hook has no secret token


def test_only_hooks_with_job_events_get_job_hooks(
    emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    # given
    project_id = emu.create_project("acme/app")
    wants, ignores = receiver_factory(), receiver_factory()
    hook(emu, project_id, wants.url)
    hook(emu, project_id, ignores.url, job_events=False, push_events=True)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # then
    assert len(wants.received) == 2 and ignores.received == []


def test_legacy_timestamps_use_the_old_format_without_iso_fields(
    emulator_factory: Callable[..., GitLabEmulator], receiver: Receiver
) -> None:
    # given
    emu = emulator_factory(legacy_timestamps=True)
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # then
    body = receiver.bodies()[0]
    assert LEGACY.match(body["build_created_at"])
    assert not [key for key in body if key.endswith("_iso")]
    assert not [key for key in body["commit"] if key.endswith("_iso")]


def test_signed_deliveries_carry_a_valid_standard_webhooks_signature(
    signing_emu: GitLabEmulator, receiver: Receiver
) -> None:
    # given
    emu = signing_emu
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url, signing_token=SIGNING_TOKEN)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # then
    assert len(receiver.received) == 2
    for got in receiver.received:
        message_id, timestamp = got.headers["webhook-id"], got.headers["webhook-timestamp"]
        expected = base64.b64encode(
            hmac.new(SIGNING_KEY, f"{message_id}.{timestamp}.".encode() + got.body, hashlib.sha256).digest()
        ).decode()
        assert got.headers["webhook-signature"] == f"v1,{expected}"
        assert message_id == got.headers["Idempotency-Key"]
        assert abs(int(timestamp) - time.time()) < 60


class FakeClock:
    """The emulator's clock, stepped by hand so a hook's backoff passes without waiting for it."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def one_job(emu: GitLabEmulator, project_id: int) -> int:
    """A pending job, created before any hook exists so that it sent nothing yet."""
    pipeline = emu.create_pipeline(project_id, [JobSpec("build")])
    return int(emu.jobs_of_pipeline(project_id, pipeline)[0]["id"])


def one_event(emu: GitLabEmulator, project_id: int, job_id: int) -> None:
    """Exactly one Job Hook (the job flips between pending and running), delivered before this returns."""
    status = "running" if emu.job(project_id, job_id)["status"] == "pending" else "pending"
    emu.set_job_status(project_id, job_id, status)
    emu.wait_for_deliveries(timeout=5)


@pytest.mark.parametrize(
    ("answer", "logged"),
    [
        ((503, 0.0), (503, None)),
        ((500, 0.0), (500, None)),
        ((422, 0.0), (422, None)),
        ((200, 1.0), (None, "timeout")),  # stalls past the hook timeout
    ],
)
def test_a_failed_delivery_is_never_sent_again(
    emulator_factory: Callable[..., GitLabEmulator],
    receiver_factory: Callable[..., Receiver],
    answer: tuple[int, float],
    logged: tuple[int | None, str | None],
) -> None:
    """GitLab does not redeliver a failed webhook by itself. WebHookService#execute rescues transport errors
    (Gitlab::HTTP::HTTP_ERRORS) and takes any answer, 5xx included, as the end of the execution; it only logs it
    (gitlab-org/gitlab app/services/web_hook_service.rb), so WebHookWorker's Sidekiq retries
    (app/workers/web_hook_worker.rb) never fire for a failed delivery. Only a resend repeats it."""
    # given
    emu = emulator_factory(webhook_timeout=0.3)
    receiver = receiver_factory(lambda _got: answer)
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook(emu, project_id, receiver.url)

    # when
    one_event(emu, project_id, job_id)
    time.sleep(1.2)  # longer than any backoff a retrying sender would use here

    # then
    assert len(receiver.received) == 1
    assert [(d.status_code, d.error) for d in emu.deliveries] == [logged]


def test_a_refused_connection_is_logged_once_as_an_internal_error(emu: GitLabEmulator) -> None:
    """A receiver that is down gets no second try either; the hook log shows "internal error"
    (WebHookService::InternalErrorResponse, app/services/web_hook_service.rb; lib/api/entities/web_hook_log.rb)."""
    # given: nothing listens on the hook's port
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, url)

    # when
    one_event(emu, project_id, job_id)
    events = admin(emu, "GET", f"/projects/{project_id}/hooks/{hook_id}/events").json()

    # then
    assert [d.status_code for d in emu.deliveries] == [None]
    assert [e["response_status"] for e in events] == ["internal error"]


def test_the_hook_events_api_lists_executions_newest_first(
    emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    """GET /projects/:id/hooks/:hook_id/events lists the hook's WebHookLog rows, newest first, filtered by status
    code or category, 20 a page at most, the secret token redacted (gitlab-org/gitlab lib/api/hooks/events.rb,
    lib/api/entities/web_hook_log.rb, app/services/web_hooks/log_execution_service.rb;
    https://docs.gitlab.com/api/project_webhooks/#list-webhook-events)."""
    # given: a receiver that refuses the first delivery and accepts the second
    receiver = receiver_factory(lambda got: (503, 0.0) if len(receiver.received) == 1 else (200, 0.0))
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url, token="hook-secret")
    one_event(emu, project_id, job_id)
    one_event(emu, project_id, job_id)
    path = f"/projects/{project_id}/hooks/{hook_id}/events"

    # when
    events = admin(emu, "GET", path).json()
    failed = admin(emu, "GET", path, params={"status": "server_failure"}).json()
    ok = admin(emu, "GET", path, params={"status": "200"}).json()
    too_many = admin(emu, "GET", path, params={"per_page": 21})
    nonsense = admin(emu, "GET", path, params={"status": "bad"})

    # then
    assert [(e["id"], e["response_status"]) for e in events] == [(2, "200"), (1, "503")]
    assert set(events[0]) == {
        "id",
        "url",
        "trigger",
        "request_headers",
        "request_data",
        "response_headers",
        "response_body",
        "execution_duration",
        "response_status",
        "created_at",
    }
    assert (events[0]["trigger"], events[0]["url"]) == ("job_hooks", receiver.url)
    assert events[0]["request_headers"]["X-Gitlab-Token"] == "[REDACTED]"
    assert events[0]["request_data"]["build_status"] == "pending"
    assert [e["id"] for e in failed] == [1] and [e["id"] for e in ok] == [2]
    assert too_many.status_code == 400 and nonsense.status_code == 400


def test_a_resend_repeats_the_idempotency_key_under_new_uuids(
    signing_emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    """POST /projects/:id/hooks/:hook_id/events/:hook_log_id/resend executes the hook again, at once, with the
    logged payload and the same Idempotency-Key, and answers 201 with the receiver's status (gitlab-org/gitlab
    lib/api/hooks/resend_hook.rb, app/services/web_hooks/events/resend_service.rb, lib/api/entities/
    retry_webhook_event.rb). It is a new request: a new X-Gitlab-Webhook-UUID (WebHookService#build_headers) and,
    outside a webhook-made request, a new X-Gitlab-Event-UUID (lib/gitlab/web_hooks/recursion_detection/uuid.rb)."""
    # given: a delivery that failed
    receiver = receiver_factory(lambda got: (503, 0.0) if got.attempt == 1 else (200, 0.0))
    project_id = signing_emu.create_project("acme/app")
    job_id = one_job(signing_emu, project_id)
    hook_id = hook(signing_emu, project_id, receiver.url, signing_token=SIGNING_TOKEN)
    one_event(signing_emu, project_id, job_id)
    [failed] = signing_emu.deliveries

    # when
    resent = admin(signing_emu, "POST", f"/projects/{project_id}/hooks/{hook_id}/events/{failed.id}/resend")

    # then
    assert (resent.status_code, resent.json()) == (201, {"response_status": 200})
    first, second = receiver.received
    assert second.headers["Idempotency-Key"] == first.headers["Idempotency-Key"] == failed.idempotency_key
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert second.headers["X-Gitlab-Event-UUID"] != first.headers["X-Gitlab-Event-UUID"]
    assert second.headers["X-Gitlab-Webhook-UUID"] != first.headers["X-Gitlab-Webhook-UUID"]
    assert second.json == first.json
    assert [(d.id, d.status_code, d.idempotency_key) for d in signing_emu.deliveries] == [
        (1, 503, failed.idempotency_key),
        (2, 200, failed.idempotency_key),
    ]


def test_a_resend_from_python_is_the_same_as_over_http(emu: GitLabEmulator, receiver: Receiver) -> None:
    """GitLabEmulator.resend is the "Resend request" button: the same execution as the API's resend
    (app/services/web_hooks/events/resend_service.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook(emu, project_id, receiver.url)
    one_event(emu, project_id, job_id)
    [first] = emu.deliveries

    # when
    again = emu.resend(first)
    by_id = emu.resend(first.id, event_uuid="from-a-webhook-made-request")

    # then
    assert (again.id, again.status_code, again.idempotency_key) == (2, 200, first.idempotency_key)
    assert len({first.event_uuid, again.event_uuid}) == 2
    assert by_id.event_uuid == "from-a-webhook-made-request"
    assert [r.headers["Idempotency-Key"] for r in receiver.received] == [first.idempotency_key] * 3


def test_a_resend_made_by_a_webhook_request_passes_its_event_uuid_on(emu: GitLabEmulator, receiver: Receiver) -> None:
    """A request that carries X-Gitlab-Event-UUID (one a webhook receiver made) sets the UUID every hook executed
    within it sends (Gitlab::Middleware::WebhookRecursionDetection, lib/gitlab/web_hooks/recursion_detection.rb;
    spec/requests/recursive_webhook_detection_spec.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)
    one_event(emu, project_id, job_id)
    [first] = emu.deliveries

    # when
    requests.post(
        api(emu, f"/projects/{project_id}/hooks/{hook_id}/events/{first.id}/resend"),
        headers={"PRIVATE-TOKEN": ADMIN, "X-Gitlab-Event-UUID": "0f5c2e9a-recursive"},
        timeout=5,
    )

    # then
    assert receiver.received[-1].headers["X-Gitlab-Event-UUID"] == "0f5c2e9a-recursive"


def test_every_hook_execution_gets_its_own_event_uuid(
    emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    """Job Hooks are executed in Sidekiq (BuildHooksWorker, WebHookWorker), where no request UUID is set, so
    RecursionDetection::UUID#uuid_for_hook gives each hook of one event a new X-Gitlab-Event-UUID (gitlab-org/gitlab
    lib/gitlab/web_hooks/recursion_detection/uuid.rb; spec/requests/recursive_webhook_detection_spec.rb, "the
    webhook requests contain different UUID headers"); each also gets its own Idempotency-Key
    (WebHookService#generate_idempotency_key)."""
    # given: two hooks on one project
    one, two = receiver_factory(), receiver_factory()
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook(emu, project_id, one.url)
    hook(emu, project_id, two.url)

    # when: one event
    one_event(emu, project_id, job_id)

    # then
    [a], [b] = one.received, two.received
    assert a.json == b.json
    assert a.headers["X-Gitlab-Event-UUID"] != b.headers["X-Gitlab-Event-UUID"]
    assert a.headers["Idempotency-Key"] != b.headers["Idempotency-Key"]


def test_resends_gitlab_refuses(emu: GitLabEmulator, receiver: Receiver) -> None:
    """A resend of an unknown log row is a 404 "404 Not found" (ActiveRecord::RecordNotFound, lib/api/api.rb);
    after the hook's URL changed it is a 422 (WebHooks::Events::ResendService#url_changed_response); a receiver
    that cannot be reached makes it a 422 with the error (WebHookService#execute's error response, rendered by
    lib/api/hooks/resend_hook.rb)."""
    # given
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)
    one_event(emu, project_id, job_id)
    [first] = emu.deliveries
    path = f"/projects/{project_id}/hooks/{hook_id}/events"

    # when
    unknown = admin(emu, "POST", f"{path}/999/resend")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    admin(emu, "PUT", f"/projects/{project_id}/hooks/{hook_id}", json={"url": dead_url})
    moved = admin(emu, "POST", f"{path}/{first.id}/resend")
    one_event(emu, project_id, job_id)  # to the unreachable URL
    unreachable = admin(emu, "POST", f"{path}/{emu.deliveries[-1].id}/resend")

    # then
    assert (unknown.status_code, unknown.json()) == (404, {"message": "404 Not found"})
    assert (moved.status_code, moved.json()) == (
        422,
        {"message": "The hook URL has changed, and this log entry cannot be retried"},
    )
    assert unreachable.status_code == 422 and "ConnectionError" in unreachable.json()["message"]
    assert len(receiver.received) == 1


def test_a_hook_failing_four_times_in_a_row_is_disabled_for_a_minute(
    emulator_factory: Callable[..., GitLabEmulator], receiver_factory: Callable[..., Receiver]
) -> None:
    """After more than 3 consecutive failed executions (4xx and 5xx alike) a project hook is temporarily disabled
    for 1 minute; while disabled its events are not sent at all, a resend is refused with "Hook disabled", and
    the API shows alert_status "temporarily_disabled" and disabled_until (gitlab-org/gitlab
    app/models/concerns/web_hooks/auto_disabling.rb, app/services/web_hooks/log_execution_service.rb,
    app/services/web_hook_service.rb; https://docs.gitlab.com/user/project/integrations/webhooks/#auto-disabled-webhooks)."""
    # given: a receiver that fails everything, 4xx and 5xx mixed
    clock = FakeClock()
    emu = emulator_factory(clock=clock)
    answers = iter([500, 422, 503, 400] + [200] * 10)
    receiver = receiver_factory(lambda _got: (next(answers), 0.0))
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)

    # when: three failures, then a fourth
    for _ in range(3):
        one_event(emu, project_id, job_id)
    after_three = emu.hook(project_id, hook_id)
    one_event(emu, project_id, job_id)
    disabled = admin(emu, "GET", f"/projects/{project_id}/hooks/{hook_id}").json()
    one_event(emu, project_id, job_id)  # happens while disabled
    refused = admin(emu, "POST", f"/projects/{project_id}/hooks/{hook_id}/events/1/resend")
    clock.advance(minutes=1, seconds=1)
    one_event(emu, project_id, job_id)  # after the minute: sent, and answered 200

    # then
    assert (after_three["alert_status"], after_three["disabled_until"]) == ("executable", None)
    assert disabled["alert_status"] == "temporarily_disabled"
    assert disabled["disabled_until"] == "2025-03-01T12:01:00.000Z"
    assert (refused.status_code, refused.json()) == (422, {"message": "Hook disabled"})
    assert [d.status_code for d in emu.deliveries] == [500, 422, 503, 400, 200]
    assert len(receiver.received) == 5
    assert (emu.hook(project_id, hook_id)["alert_status"], emu.hook(project_id, hook_id)["disabled_until"]) == (
        "executable",
        None,
    )


def test_each_further_failure_doubles_the_backoff_up_to_a_day_and_40_disable_for_good(
    emulator_factory: Callable[..., GitLabEmulator], receiver_factory: Callable[..., Receiver]
) -> None:
    """The backoff starts at 1 minute and doubles with each failure past the fourth (INITIAL_BACKOFF,
    BACKOFF_GROWTH_FACTOR), capped at MAX_BACKOFF, 1 day; the 40th consecutive failure disables the hook for good,
    alert_status "disabled" (PERMANENTLY_DISABLED_FAILURE_THRESHOLD = 39, gitlab-org/gitlab
    app/models/concerns/web_hooks/auto_disabling.rb)."""
    # given
    clock = FakeClock()
    emu = emulator_factory(clock=clock)
    receiver = receiver_factory(lambda _got: (500, 0.0))
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)
    backoffs: list[timedelta] = []

    # when: every failure is followed by a wait past the hook's backoff
    for _ in range(40):
        one_event(emu, project_id, job_id)
        shown = emu.hook(project_id, hook_id)
        if shown["disabled_until"] is not None:
            until = datetime.fromisoformat(shown["disabled_until"])
            backoffs.append(until - clock.now)
            clock.advance(seconds=(until - clock.now).total_seconds() + 1)
    final = emu.hook(project_id, hook_id)
    one_event(emu, project_id, job_id)

    # then
    minutes = [int(b.total_seconds() // 60) for b in backoffs]
    assert minutes[:12] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1440]
    assert minutes[12:] == [1440] * (len(minutes) - 12)
    assert len(receiver.received) == 40
    assert final["alert_status"] == "disabled"


def test_a_success_resets_the_failure_count(
    emulator_factory: Callable[..., GitLabEmulator], receiver_factory: Callable[..., Receiver]
) -> None:
    """A successful execution re-enables the hook and clears its failures (WebHooks::AutoDisabling#enable!,
    called by app/services/web_hooks/log_execution_service.rb), so three failures, a success and three more
    failures never disable it."""
    # given
    emu = emulator_factory(clock=FakeClock())
    answers = iter([500, 500, 500, 200, 500, 500, 500])
    receiver = receiver_factory(lambda _got: (next(answers), 0.0))
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)

    # when
    for _ in range(7):
        one_event(emu, project_id, job_id)

    # then
    assert len(receiver.received) == 7
    assert emu.hook(project_id, hook_id)["alert_status"] == "executable"


def test_without_the_auto_disabling_flag_a_failing_hook_stays_enabled(
    emulator_factory: Callable[..., GitLabEmulator], receiver_factory: Callable[..., Receiver]
) -> None:
    """Auto-disabling sits behind the ``auto_disabling_web_hooks`` ops flag, on at GitLab.com and off by default on
    self-managed instances (gitlab-org/gitlab config/feature_flags/ops/auto_disabling_web_hooks.yml)."""
    # given
    emu = emulator_factory(clock=FakeClock(), auto_disabling=False)
    receiver = receiver_factory(lambda _got: (500, 0.0))
    project_id = emu.create_project("acme/app")
    job_id = one_job(emu, project_id)
    hook_id = hook(emu, project_id, receiver.url)

    # when
    for _ in range(6):
        one_event(emu, project_id, job_id)

    # then
    assert len(receiver.received) == 6
    assert emu.hook(project_id, hook_id)["alert_status"] == "executable"


def test_wait_for_deliveries_times_out_while_a_receiver_stalls(
    emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    # given
    receiver = receiver_factory(lambda _got: (200, 0.8))
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])

    # then
    with pytest.raises(TimeoutError):
        emu.wait_for_deliveries(timeout=0.1)
    emu.wait_for_deliveries(timeout=5)


def test_the_delivery_log_is_served_for_other_processes(emu: GitLabEmulator, receiver: Receiver) -> None:
    # given
    project_id = emu.create_project("acme/app")
    hook_id = hook(emu, project_id, receiver.url)
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # when
    log = admin(emu, "GET", "/sandbox/deliveries").json()
    later = admin(emu, "GET", "/sandbox/deliveries", params={"since": 1}).json()
    anonymous = requests.get(api(emu, "/sandbox/deliveries"), timeout=5)

    # then
    assert [(d["id"], d["hook_id"], d["event"], d["status_code"]) for d in log] == [
        (1, hook_id, "Job Hook", 200),
        (2, hook_id, "Job Hook", 200),
    ]
    assert len(later) == 1 and later[0]["idempotency_key"] == log[1]["idempotency_key"]
    assert anonymous.status_code == 401


# -- fault injection and accounting --


def test_fail_next_answers_with_the_injected_status(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project_id = emu.create_project("acme/app")
    emu.fail_next("GET", r"/projects/\d+", status=502, body="<html>bad gateway</html>")
    emu.fail_next("GET", r"/runners/all", count=2)
    patient = gitlab.Gitlab(emu.url, private_token=ADMIN, retry_transient_errors=True, timeout=5)

    # when / then
    with pytest.raises(gitlab.GitlabGetError) as failed:
        gl.projects.get(project_id)
    assert failed.value.response_code == 502
    assert gl.projects.get(project_id).id == project_id  # only the next one failed
    assert patient.runners_all.list(get_all=True) == []  # python-gitlab retried through both 500s
    assert emu.calls[("GET", "/runners/all")] == 3


def test_fail_next_with_a_delay_is_a_client_timeout(emu: GitLabEmulator) -> None:
    # given
    emu.fail_next("POST", "/user/runners", delay=2.0)
    impatient = gitlab.Gitlab(emu.url, private_token=ADMIN, timeout=0.2)

    # when
    with pytest.raises(requests.exceptions.Timeout):
        impatient.http_post("/user/runners", post_data={"runner_type": "instance_type"})

    # then: the stalled request never reached GitLab's state; the next one works
    assert emu.runners() == []
    assert new_runner(emu)["id"]


def test_calls_are_counted_by_route_template(emu: GitLabEmulator, gl: gitlab.Gitlab) -> None:
    # given
    project_id = emu.create_project("acme/app")

    # when
    for _ in range(3):
        gl.user.runners.create({"runner_type": "instance_type"})
    gl.projects.get(project_id).jobs.list(get_all=True)

    # then
    calls = emu.calls
    assert calls[("POST", "/user/runners")] == 3
    assert calls[("GET", "/projects/:id")] == 1
    assert calls[("GET", "/projects/:id/jobs")] == 1


def test_a_stopped_emulator_refuses_pooled_connections(
    emulator_factory: Callable[..., GitLabEmulator],
) -> None:
    # given
    emu = emulator_factory()
    session = requests.Session()
    assert session.get(api(emu, "/version"), headers={"PRIVATE-TOKEN": ADMIN}, timeout=5).ok

    # when
    emu.stop()

    # then
    with pytest.raises(requests.ConnectionError):
        session.get(api(emu, "/version"), headers={"PRIVATE-TOKEN": ADMIN}, timeout=5)

"""The GitLab emulator over real HTTP: python-gitlab and plain requests on one side, a webhook receiver on the
other, the way runner-fleet and gitlab-runner meet the real GitLab."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gitlab
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec

ADMIN = "glpat-test-admin"
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
def emulator_factory() -> Iterator[Callable[..., GitLabEmulator]]:
    started: list[GitLabEmulator] = []

    def make(**kwargs: Any) -> GitLabEmulator:
        emulator = GitLabEmulator(admin_token=ADMIN, **kwargs).start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


@pytest.fixture
def emu(emulator_factory: Callable[..., GitLabEmulator]) -> GitLabEmulator:
    return emulator_factory()


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
    assert emu.runners()[0]["status"] == "online"
    managers = admin(emu, "GET", f"/runners/{verified.json()['id']}/managers").json()
    assert [(m["system_id"], m["status"]) for m in managers] == [("s_1", "online")]
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
    assert first.headers["X-Gitlab-Webhook-UUID"] == second.headers["X-Gitlab-Webhook-UUID"]
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
    assert [(d.attempt, d.status_code) for d in emu.deliveries] == [(1, 200), (1, 200)]


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


def test_a_5xx_is_retried_with_the_same_idempotency_key(
    emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]
) -> None:
    # given: the receiver fails the first attempt of every delivery
    receiver = receiver_factory(lambda got: (503, 0.0) if got.attempt == 1 else (200, 0.0))
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url, signing_token=SIGNING_TOKEN)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # then
    attempts = Counter(r.headers["Idempotency-Key"] for r in receiver.received)
    assert list(attempts.values()) == [2, 2]
    assert len({(r.headers["Idempotency-Key"], r.headers["X-Gitlab-Event-UUID"]) for r in receiver.received}) == 2
    assert sorted((d.attempt, d.status_code) for d in emu.deliveries) == [
        (1, 503),
        (1, 503),
        (2, 200),
        (2, 200),
    ]
    assert delivered_keys(emu) == attempts


def test_a_4xx_is_not_retried(emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]) -> None:
    # given
    receiver = receiver_factory(lambda _got: (422, 0.0))
    project_id = emu.create_project("acme/app")
    hook(emu, project_id, receiver.url)

    # when
    emu.create_pipeline(project_id, [JobSpec("build")])
    emu.wait_for_deliveries(timeout=5)

    # then
    assert len(receiver.received) == 2
    assert [(d.attempt, d.status_code) for d in emu.deliveries] == [(1, 422), (1, 422)]


def test_delivery_gives_up_after_four_attempts(emu: GitLabEmulator, receiver_factory: Callable[..., Receiver]) -> None:
    # given: one event only, to a receiver that always fails
    receiver = receiver_factory(lambda _got: (500, 0.0))
    project_id = emu.create_project("acme/app")
    pipeline = emu.create_pipeline(project_id, [JobSpec("build")])
    job_id = admin(emu, "GET", f"/projects/{project_id}/pipelines/{pipeline}/jobs").json()[0]["id"]
    hook(emu, project_id, receiver.url)

    # when
    emu.set_job_status(project_id, job_id, "canceled")
    emu.wait_for_deliveries(timeout=5)

    # then
    assert [d.attempt for d in emu.deliveries] == [1, 2, 3, 4]
    assert len({r.headers["Idempotency-Key"] for r in receiver.received}) == 1


def test_a_receiver_timeout_is_retried(
    emulator_factory: Callable[..., GitLabEmulator], receiver_factory: Callable[..., Receiver]
) -> None:
    # given: the first attempt stalls past the hook timeout
    emu = emulator_factory(webhook_timeout=0.3)
    receiver = receiver_factory(lambda got: (200, 1.0) if got.attempt == 1 else (200, 0.0))
    project_id = emu.create_project("acme/app")
    pipeline = emu.create_pipeline(project_id, [JobSpec("build")])
    job_id = admin(emu, "GET", f"/projects/{project_id}/pipelines/{pipeline}/jobs").json()[0]["id"]
    hook(emu, project_id, receiver.url)

    # when
    emu.set_job_status(project_id, job_id, "running")
    emu.wait_for_deliveries(timeout=5)

    # then
    assert [(d.attempt, d.status_code, d.error) for d in emu.deliveries] == [
        (1, None, "timeout"),
        (2, 200, None),
    ]


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
    assert [(d["hook_id"], d["event"], d["attempt"], d["status_code"]) for d in log] == [
        (hook_id, "Job Hook", 1, 200)
    ] * 2
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

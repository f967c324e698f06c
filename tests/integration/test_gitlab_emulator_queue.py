"""The GitLab emulator's job queue as runners meet it over real HTTP: when a runner counts as contacted, the
long-polling value of ``POST /jobs/request``, protected refs and ``ref_protected`` runners, and the order each kind
of runner takes jobs in. Each test names the GitLab source whose behaviour it pins."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from fleetctl.sandbox.gitlab_emulator import GitLabEmulator, JobSpec
from tests.clocks import ManualClock
from tests.integration.test_gitlab_emulator import ADMIN, admin, api

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def emu(clock: ManualClock) -> Iterator[GitLabEmulator]:
    with GitLabEmulator(admin_token=ADMIN, clock=clock) as emulator:
        yield emulator


def runner(emu: GitLabEmulator, **settings: Any) -> dict[str, Any]:
    answer = admin(emu, "POST", "/user/runners", json={"runner_type": "instance_type", **settings})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def poll(emu: GitLabEmulator, token: str, last_update: str | None = None) -> requests.Response:
    """gitlab-runner's ``POST /jobs/request``, sending back the last X-GitLab-Last-Update it got, if any."""
    body = {"token": token, "system_id": "s_poll"}
    if last_update is not None:
        body["last_update"] = last_update
    return requests.post(api(emu, "/jobs/request"), json=body, timeout=5)


def taken(emu: GitLabEmulator, token: str) -> str | None:
    """The name of the job the runner is handed, or None for a 204."""
    answer = poll(emu, token)
    assert answer.status_code in (201, 204), answer.text
    return str(answer.json()["job_info"]["name"]) if answer.status_code == 201 else None


def variables(job: dict[str, Any]) -> dict[str, str]:
    return {v["key"]: v["value"] for v in job["variables"]}


# -- contact --------------------------------------------------------------------------------------------------


def test_verify_leaves_a_created_runner_never_contacted_until_it_asks_for_a_job(emu: GitLabEmulator) -> None:
    """For a ``glrt-`` token ``POST /runners/verify`` is ``authenticate_runner!(update_contacted_at:
    !registering_created_runner)``: "for runners that were created in the UI, we want to update the contacted_at
    value only when it starts polling for jobs" (lib/api/ci/runner.rb). The runner manager of the system id is
    made (Ci::Runner#ensure_manager) but heartbeats without contact (Ci::RunnerManager#heartbeat). The first
    ``POST /jobs/request`` contacts both (``authenticate_runner!``, lib/api/ci/helpers/runner.rb)."""
    # given
    created = runner(emu)

    # when
    verified = requests.post(
        api(emu, "/runners/verify"), json={"token": created["token"], "system_id": "s_1"}, timeout=5
    )
    after_verify = admin(emu, "GET", f"/runners/{created['id']}").json()
    managers_after_verify = admin(emu, "GET", f"/runners/{created['id']}/managers").json()
    first_poll = requests.post(
        api(emu, "/jobs/request"), json={"token": created["token"], "system_id": "s_1"}, timeout=5
    )
    after_poll = admin(emu, "GET", f"/runners/{created['id']}").json()
    managers_after_poll = admin(emu, "GET", f"/runners/{created['id']}/managers").json()

    # then
    assert verified.status_code == 200
    assert (after_verify["status"], after_verify["online"], after_verify["contacted_at"]) == (
        "never_contacted",
        False,
        None,
    )
    assert [(m["system_id"], m["status"], m["contacted_at"]) for m in managers_after_verify] == [
        ("s_1", "never_contacted", None)
    ]
    assert first_poll.status_code == 204
    assert (after_poll["status"], after_poll["online"]) == ("online", True)
    assert [(m["system_id"], m["status"]) for m in managers_after_poll] == [("s_1", "online")]


# -- long polling ---------------------------------------------------------------------------------------------


def test_a_204_carries_the_runner_queue_value_and_the_same_value_is_answered_until_the_queue_changes(
    emu: GitLabEmulator,
) -> None:
    """A 204 carries ``X-GitLab-Last-Update``, the runner's queue value (Ci::Runner#ensure_runner_queue_value,
    set without overwriting); a request sending it back while it is current gets a 204 echoing it
    (``runner_queue_value_latest?``, lib/api/ci/runner.rb). A job becoming pending ticks the queue of every
    runner that could pick it (Ci::UpdateBuildQueueService#tick, Ci::Runner#pick_build!), so the old value then
    finds the job; a job the runner cannot pick leaves its value alone."""
    # given
    project_id = emu.create_project("acme/app")
    docker = runner(emu, tag_list=["docker"], run_untagged=False)
    first = poll(emu, docker["token"])
    value = first.headers["X-GitLab-Last-Update"]

    # when
    again = poll(emu, docker["token"])
    echoed = poll(emu, docker["token"], value)
    emu.create_pipeline(project_id, [JobSpec("gpu", tags=["gpu"])])
    not_for_it = poll(emu, docker["token"], value)
    emu.create_pipeline(project_id, [JobSpec("build", tags=["docker"])])
    for_it = poll(emu, docker["token"], value)

    # then
    assert first.status_code == 204 and value
    assert (again.status_code, again.headers["X-GitLab-Last-Update"]) == (204, value)
    assert (echoed.status_code, echoed.headers["X-GitLab-Last-Update"]) == (204, value)
    assert (not_for_it.status_code, not_for_it.headers["X-GitLab-Last-Update"]) == (204, value)
    assert for_it.status_code == 201 and for_it.json()["job_info"]["name"] == "build"
    assert "X-GitLab-Last-Update" not in for_it.headers


def test_a_current_queue_value_gets_a_204_without_the_queue_being_looked_at(emu: GitLabEmulator) -> None:
    """While the value a runner sends is current GitLab answers 204 before ``Ci::RegisterJobService`` runs
    (lib/api/ci/runner.rb), so a job the runner became able to take without a tick stays unseen: enabling a
    project runner on another project does not tick it (Ci::Runners::AssignRunnerService, Ci::Runner#assign_to).
    Without the value, or once the value expires (RUNNER_QUEUE_EXPIRY_TIME, an hour, app/models/ci/runner.rb),
    the queue is looked at."""
    # given a project runner of one project, and a job pending in another
    home = emu.create_project("acme/home")
    other = emu.create_project("acme/other")
    mine = runner(emu, runner_type="project_type", project_id=home)
    emu.create_pipeline(other, [JobSpec("elsewhere")])
    value = poll(emu, mine["token"]).headers["X-GitLab-Last-Update"]

    # when the runner is enabled on the other project
    assigned = admin(emu, "POST", f"/projects/{other}/runners", json={"runner_id": mine["id"]})
    cached = poll(emu, mine["token"], value)
    fresh = poll(emu, mine["token"])

    # then
    assert assigned.status_code == 201
    assert (cached.status_code, cached.headers["X-GitLab-Last-Update"]) == (204, value)
    assert fresh.status_code == 201 and fresh.json()["job_info"]["name"] == "elsewhere"


def test_a_queue_value_expires_after_an_hour(emu: GitLabEmulator, clock: ManualClock) -> None:
    """Ci::Runner#ensure_runner_queue_value sets the value with ``expire: RUNNER_QUEUE_EXPIRY_TIME`` (1 hour,
    app/models/ci/runner.rb): after that the old value is no longer the latest and a new one is answered."""
    # given
    shared = runner(emu)
    value = poll(emu, shared["token"]).headers["X-GitLab-Last-Update"]

    # when
    clock.advance(minutes=59)
    within = poll(emu, shared["token"], value)
    clock.advance(minutes=1)
    expired = poll(emu, shared["token"], value)

    # then
    assert within.headers["X-GitLab-Last-Update"] == value
    assert expired.status_code == 204 and expired.headers["X-GitLab-Last-Update"] not in ("", value)


def test_a_paused_runner_gets_a_204_with_its_queue_value_even_with_a_job_for_it(emu: GitLabEmulator) -> None:
    """``unless current_runner.active?`` GitLab answers 204 with ``X-GitLab-Last-Update`` set to the runner's
    queue value (lib/api/ci/runner.rb); updating the runner ticks its queue (Ci::Runners::UpdateRunnerService),
    so once resumed the value it holds finds the job."""
    # given
    project_id = emu.create_project("acme/app")
    paused = runner(emu, paused=True)
    emu.create_pipeline(project_id, [JobSpec("build")])

    # when
    while_paused = poll(emu, paused["token"])
    value = while_paused.headers["X-GitLab-Last-Update"]
    admin(emu, "PUT", f"/runners/{paused['id']}", json={"paused": False})
    resumed = poll(emu, paused["token"], value)

    # then
    assert while_paused.status_code == 204 and value
    assert resumed.status_code == 201


# -- protected refs -------------------------------------------------------------------------------------------


def test_a_ref_protected_runner_takes_only_jobs_of_protected_refs(emu: GitLabEmulator) -> None:
    """A ``ref_protected`` runner's queue is narrowed to protected builds (Ci::RegisterJobService#each_build,
    ``builds_for_protected_runner``; Gitlab::Ci::Matching::RunnerMatcher#matches?). A build is protected when its
    pipeline's ref is (Gitlab::Ci::Pipeline::Seed::Build ``protected: @pipeline.protected_ref?``,
    Project#protected_for?): the default branch, protected from the project's creation
    (Projects::ProtectDefaultBranchService), a branch matching a protected wildcard (Gitlab::RefMatcher), a
    protected tag. The runner is told in ``git_info.protected`` and ``CI_COMMIT_REF_PROTECTED``."""
    # given
    project_id = emu.create_project("acme/app")
    protected = admin(emu, "POST", f"/projects/{project_id}/protected_branches", json={"name": "release/*"})
    emu.protect_tag(project_id, "v*")
    for ref, tag in (("feature", False), ("main", False), ("release/1.0", False), ("v1.0", True), ("v1.0", False)):
        emu.create_pipeline(project_id, [JobSpec(f"{ref}{'@tag' if tag else ''}")], ref=ref, tag=tag)
    guarded = runner(emu, access_level="ref_protected")
    anyone = runner(emu)

    # when
    picked: list[dict[str, Any]] = []
    while (answer := poll(emu, guarded["token"])).status_code == 201:
        picked.append(answer.json())
    left = poll(emu, anyone["token"]).json()

    # then
    assert protected.status_code == 201, protected.text
    assert [j["job_info"]["name"] for j in picked] == ["main", "release/1.0", "v1.0@tag"]
    assert [(j["git_info"]["protected"], variables(j)["CI_COMMIT_REF_PROTECTED"]) for j in picked] == [
        (True, "true")
    ] * 3
    assert picked[2]["git_info"]["ref_type"] == "tag"
    assert picked[2]["git_info"]["refspecs"] == ["+refs/tags/v1.0:refs/tags/v1.0"]
    assert left["job_info"]["name"] == "feature"
    assert (left["git_info"]["protected"], variables(left)["CI_COMMIT_REF_PROTECTED"]) == (False, "false")
    assert taken(emu, guarded["token"]) is None  # the branch named v1.0 is not the protected tag


def test_a_job_keeps_the_protection_it_was_created_with(emu: GitLabEmulator) -> None:
    """``protected`` is a column set when the build is created (Gitlab::Ci::Pipeline::Seed::Build), and a retry
    copies it (Ci::Build.clone_accessors): protecting the branch later does not protect jobs already created;
    pipelines created afterwards are. A runner switched to ``ref_protected`` with ``PUT /runners/:id`` follows
    the rule from then on."""
    # given an unprotected branch's job, and a runner that is not ref_protected yet
    project_id = emu.create_project("acme/app")
    emu.create_pipeline(project_id, [JobSpec("before")], ref="feature")
    guarded = runner(emu)
    admin(emu, "PUT", f"/runners/{guarded['id']}", json={"access_level": "ref_protected"})

    # when the branch is protected and a new pipeline runs on it
    emu.protect_branch(project_id, "feature")
    old_job = taken(emu, guarded["token"])
    emu.create_pipeline(project_id, [JobSpec("after")], ref="feature")
    new_job = taken(emu, guarded["token"])

    # then
    assert (old_job, new_job) == (None, "after")
    assert admin(emu, "GET", f"/runners/{guarded['id']}").json()["access_level"] == "ref_protected"


def test_protected_branches_are_listed_and_created_like_gitlab(emu: GitLabEmulator) -> None:
    """``GET``/``POST /projects/:id/protected_branches`` (lib/api/protected_branches.rb,
    lib/api/entities/protected_branch.rb, protected_ref_access.rb): the default branch is protected from the start
    for maintainers; protecting a name again is a 409 ("Protected branch '<name>' already exists"); an access
    level outside ProtectedRefAccess's allowed levels is Grape's 400."""
    # given
    project_id = emu.create_project("acme/app")
    path = f"/projects/{project_id}/protected_branches"

    # when
    created = admin(emu, "POST", path, json={"name": "stable", "push_access_level": 0, "merge_access_level": 30})
    again = admin(emu, "POST", path, json={"name": "main"})
    bad_level = admin(emu, "POST", path, json={"name": "main", "push_access_level": 35})
    nameless = admin(emu, "POST", path, json={})
    listed = admin(emu, "GET", path).json()

    # then
    assert created.status_code == 201
    assert {k: v for k, v in created.json().items() if k != "id"} == {
        "name": "stable",
        "push_access_levels": [
            {
                "id": created.json()["push_access_levels"][0]["id"],
                "access_level": 0,
                "access_level_description": "No one",
            }
        ],
        "merge_access_levels": [
            {
                "id": created.json()["merge_access_levels"][0]["id"],
                "access_level": 30,
                "access_level_description": "Developers + Maintainers",
            }
        ],
        "allow_force_push": False,
    }
    assert (again.status_code, again.json()) == (409, {"message": "Protected branch 'main' already exists"})
    assert (bad_level.status_code, bad_level.json()) == (
        400,
        {"error": "push_access_level does not have a valid value"},
    )
    assert (nameless.status_code, nameless.json()) == (400, {"error": "name is missing"})
    assert [(b["name"], b["push_access_levels"][0]["access_level_description"]) for b in listed] == [
        ("main", "Maintainers"),
        ("stable", "No one"),
    ]


# -- queue order ----------------------------------------------------------------------------------------------


def test_instance_runners_take_jobs_by_fair_scheduling_across_projects(emu: GitLabEmulator) -> None:
    """Instance runners take jobs ordered by how many jobs each project has running on instance runners, then by
    id (Ci::Queue::PendingBuildsStrategy#builds_for_shared_runner, the ``project_builds`` CTE of
    Ci::RunningBuild.instance_type): a project with three queued jobs does not hold back another project's one."""
    # given three jobs of one project queued before one job of another
    busy = emu.create_project("acme/busy")
    quiet = emu.create_project("acme/quiet")
    emu.create_pipeline(busy, [JobSpec("busy-1"), JobSpec("busy-2"), JobSpec("busy-3")])
    emu.create_pipeline(quiet, [JobSpec("quiet-1")])
    shared = runner(emu)

    # when
    order = [taken(emu, shared["token"]) for _ in range(4)]

    # then
    assert order == ["busy-1", "quiet-1", "busy-2", "busy-3"]


def test_jobs_running_on_other_kinds_of_runners_do_not_count_for_fair_scheduling(emu: GitLabEmulator) -> None:
    """Only Ci::RunningBuild rows of ``instance_type`` enter the count (PendingBuildsStrategy
    ``running_builds_for_shared_runners_cte``): a job running on a project runner leaves its project first in line
    for instance runners."""
    # given a job of the first project running on its project runner, and one more queued in each project
    first = emu.create_project("acme/first")
    second = emu.create_project("acme/second")
    emu.create_pipeline(first, [JobSpec("first-mine", tags=["own"]), JobSpec("first-shared")])
    emu.create_pipeline(second, [JobSpec("second-shared")])
    own = runner(emu, runner_type="project_type", project_id=first, tag_list=["own"], run_untagged=False)
    shared = runner(emu, run_untagged=True)

    # when
    on_own = taken(emu, own["token"])
    on_shared = taken(emu, shared["token"])

    # then
    assert (on_own, on_shared) == ("first-mine", "first-shared")


def test_group_and_project_runners_take_jobs_by_id(emu: GitLabEmulator) -> None:
    """Group and project runners take jobs oldest id first, without fair scheduling
    (Ci::Queue::BuildQueueService#builds_for_group_runner, #builds_for_project_runner, PendingBuildsStrategy#order
    ``build_id ASC``); by id, not by when a job was queued, so a later stage's job created with its pipeline goes
    before the job of a pipeline created after it, though it became pending later."""
    # given a group with two projects, and a two-stage pipeline whose second stage is queued last
    first = emu.create_project("acme/first")
    second = emu.create_project("acme/second")
    group_id = admin(emu, "GET", f"/projects/{first}").json()["namespace"]["id"]
    staged = emu.create_pipeline(first, [JobSpec("compile", stage="build"), JobSpec("unit", stage="test")])
    emu.create_pipeline(first, [JobSpec("first-late")])
    emu.create_pipeline(second, [JobSpec("second-1"), JobSpec("second-2")])
    group = runner(emu, runner_type="group_type", group_id=group_id)

    # when
    compile_ = taken(emu, group["token"])
    compile_id = next(j["id"] for j in emu.jobs_of_pipeline(first, staged) if j["name"] == "compile")
    emu.set_job_status(first, compile_id, "success")
    order = [compile_, *(taken(emu, group["token"]) for _ in range(4))]

    # then
    assert order == ["compile", "unit", "first-late", "second-1", "second-2"]

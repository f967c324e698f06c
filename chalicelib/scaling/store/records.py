"""The typed records of the fleet table's scale-up half: runner and launch items, a job's claim, a termination.

Plain data with no I/O, so the reconcile rules (:mod:`chalicelib.lifecycle.rules`) and the invariants decide over
them without a table, and the stores (:mod:`chalicelib.scaling.store`) decode what they read into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from chalicelib.scaling.launches import LaunchState
from chalicelib.store import LIVE_ATTRIBUTE, RunnerState, runner_key, to_item


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"
    HELD = "held"  # another launch already holds the job
    NOT_PENDING = "not_pending"  # the webhooks already saw it start, finish or be cancelled
    DEAD_LETTERED = "dead_lettered"  # scale-up gave up on it; a copy of its message must not launch it again


# The value of a job item's ``outcome`` once scale-up has dead-lettered the job.
DEAD_LETTERED_OUTCOME = "dead_lettered"
# A pool counter item (``POOL#<pool>``) carries this, the time it was drained, while its pool is drained: scale-up
# launches nothing for the pool (its jobs wait) and reconcile retires its runners.
DRAINED_ATTRIBUTE = "drained_at"
# A job item that waited for its pool (full, or drained) carries the pool and when it first waited, so that
# ``fleetctl status`` shows each pool's waiting jobs; written with the release of the claim it waited from.
WAITING_POOL_ATTRIBUTE = "waiting_pool"
# The pool of the launch that claimed a job, on the job's item (reconcile counts a pool's claimed pending jobs).
LAUNCH_POOL_ATTRIBUTE = "launch_pool"
# A terminated runner record carries ``token_cleanup`` / ``gitlab_cleanup`` with this value until its token / its
# GitLab runner is deleted.
CLEANUP_PENDING = "pending"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    launch_id: str
    claimed_at: float = 0.0  # when the holding launch claimed the job (HELD only)


@dataclass(frozen=True)
class RunnerRecord:
    """A ``RUNNER#<instance id>`` item, typed. A tombstone (an instance terminated before it was recorded) has
    only its instance id, state and reason."""

    instance_id: str
    pool: str = ""
    launch_id: str = ""
    lifecycle: str = ""
    instance_type: str = ""
    subnet_id: str | None = None
    launched_at: float = 0.0
    boot_deadline_at: float = 0.0
    token_key: str = ""  # the fleet-table item holding its GitLab runner token (chalicelib.scaling.tokens)
    gitlab_runner_id: int | None = None
    state: RunnerState = RunnerState.BOOTING
    lease: bool = False  # holds one of its pool's leases
    tombstone: bool = False
    reason: str = ""
    token_cleanup: bool = False  # terminated, and its token may still exist
    gitlab_cleanup: bool = False  # terminated, and its GitLab runner may still exist
    max_builds: int = 0  # builds its runner takes before it powers off (0: not recorded)
    draining: str = ""  # why it is paused in GitLab and takes no new job ("" while it is not)
    draining_at: float = 0.0  # when it was marked draining
    busy: tuple[str, ...] = ()  # "<project>:<job>" of the jobs the Job Hooks say it runs
    first_job_at: float = 0.0
    idle_since: float = 0.0  # when its last job finished, while it is idle after one (0 otherwise)
    warm: bool = False  # launched to keep its pool warm, not for a job
    # When EC2 first warned that its instance is to be interrupted (0: never), and the warnings it got.
    interrupted_at: float = 0.0
    interruptions: tuple[str, ...] = ()

    @property
    def terminated(self) -> bool:
        return self.state is RunnerState.TERMINATED

    @classmethod
    def from_item(cls, values: Mapping[str, Any]) -> RunnerRecord:
        runner_id = values.get("gitlab_runner_id")
        return cls(
            instance_id=str(values["instance_id"]),
            pool=str(values.get("pool", "")),
            launch_id=str(values.get("launch_id", "")),
            lifecycle=str(values.get("lifecycle", "")),
            instance_type=str(values.get("instance_type", "")),
            subnet_id=values.get("subnet_id"),
            launched_at=float(values.get("launched_at", 0)),
            boot_deadline_at=float(values.get("boot_deadline_at", 0)),
            token_key=str(values.get("token_key", "")),
            gitlab_runner_id=int(runner_id) if runner_id is not None else None,
            state=RunnerState(values.get("state", RunnerState.BOOTING.value)),
            lease=bool(values.get("lease", False)),
            tombstone=bool(values.get("tombstone", False)),
            reason=str(values.get("reason", "")),
            token_cleanup=values.get("token_cleanup") == CLEANUP_PENDING,
            gitlab_cleanup=values.get("gitlab_cleanup") == CLEANUP_PENDING,
            max_builds=int(values.get("max_builds", 0)),
            draining=str(values.get("draining", "")),
            draining_at=float(values.get("draining_at", 0)),
            busy=tuple(sorted(str(job) for job in values.get("busy", ()))),
            first_job_at=float(values.get("first_job_at", 0)),
            idle_since=float(values.get("idle_since", 0)),
            warm=bool(values.get("warm", False)),
            interrupted_at=float(values.get("interrupted_at", 0)),
            interruptions=tuple(sorted(str(kind) for kind in values.get("interruptions", ()))),
        )

    def new_item(self, now: float) -> dict[str, Any]:
        """The item of a runner just recorded: it holds its lease, and has no GitLab identity yet."""
        return to_item(
            {
                "pk": runner_key(self.instance_id),
                "kind": "runner",
                "instance_id": self.instance_id,
                "pool": self.pool,
                "launch_id": self.launch_id,
                "lifecycle": self.lifecycle,
                "instance_type": self.instance_type,
                "subnet_id": self.subnet_id,
                "launched_at": self.launched_at,
                "boot_deadline_at": self.boot_deadline_at,
                "token_key": self.token_key,
                "gitlab_runner_id": self.gitlab_runner_id,
                "state": self.state.value,
                "lease": True,
                "max_builds": self.max_builds or None,
                "warm": self.warm or None,
                "updated_at": now,
                LIVE_ATTRIBUTE: "runner",
            }
        )


@dataclass(frozen=True)
class LaunchRecord:
    """A ``LAUNCH#<launch id>`` item, typed."""

    launch_id: str
    pool: str
    state: LaunchState
    leases: int  # leases it holds now (each moves to a runner record as its instance is recorded)
    requested: int  # leases it took
    started_at: float  # when its current owner started on it
    reason: str = ""
    instances: tuple[str, ...] = ()
    plan: str = ""  # the CreateFleet requests it sends, as JSON (see chalicelib.scaling.fleet.LaunchPlan)

    @classmethod
    def from_item(cls, launch_id: str, values: Mapping[str, Any]) -> LaunchRecord:
        return cls(
            launch_id=launch_id,
            pool=str(values.get("pool", "")),
            state=LaunchState(values["state"]),
            leases=int(values.get("leases", 0)),
            requested=int(values.get("requested", 0)),
            started_at=float(values.get("started_at", 0)),
            reason=str(values.get("reason", "")),
            instances=tuple(str(i) for i in values.get("instances", ())),
            plan=str(values.get("plan", "")),
        )


@dataclass(frozen=True)
class PoolCounter:
    """A ``POOL#<pool>`` item, typed: the pool's leases, the launch template version it launches from (None before
    the first image promotion), and since when it is drained (0: not drained; ``fleetctl drain`` sets it). A pool
    that has no item yet reads as the default: no leases, no version, not drained."""

    name: str
    leases: int = 0
    template_version: int | None = None
    drained_at: float = 0.0

    @property
    def drained(self) -> bool:
        return self.drained_at > 0

    @classmethod
    def from_item(cls, name: str, values: Mapping[str, Any] | None) -> PoolCounter:
        values = values or {}
        version = values.get("template_version")
        return cls(
            name=name,
            leases=int(values.get("leases", 0)),
            template_version=int(version) if version is not None else None,
            drained_at=float(values.get(DRAINED_ATTRIBUTE, 0)),
        )


@dataclass(frozen=True)
class Termination:
    """What terminating a runner record found: the record as it is now (None for a tombstone just written)."""

    record: RunnerRecord | None
    newly: bool  # this call terminated it (not a duplicate or late event)
    tombstone: bool  # the instance had no record: a tombstone stands in for it

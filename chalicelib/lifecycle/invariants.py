"""The fleet's invariants, checked against facts read from the real resources.

Two uses, one function:

* **At a quiet moment** (no launch, boot or termination under way; ``settled_before`` None), every invariant
  holds. The integration scenarios end by asserting it, and ``fleetctl status`` shows it.
* **At the end of every reconcile run** (``settled_before`` = the run's time minus the grace its rules allow
  work in flight), each invariant is judged only on what is older than that grace, and the pool counters only
  against the leases records and launches hold (a launch in flight holds its leases itself). Reconcile logs each
  violation it did not put right in that run as an error, and counts ``InvariantViolations``.

The invariants:

* no live instance of the fleet's without a live runner record;
* no live runner record without its instance;
* no GitLab runner of the fleet's without a live instance, and at most one per instance;
* every live record's GitLab runner exists;
* a runner is paused in GitLab exactly when its record says it drains (interrupted or retiring);
* no runner past its retirement point started a job (beyond the slack of one reconcile period and the pause's
  grace, the longest a runner can go on taking jobs before it is paused);
* no runner token past its boot deadline;
* each pool's lease counter equal to the leases its live records and its launches hold (a launch holding leases is
  always where reconcile looks), and, at a quiet moment, to its live instances. The counter, the records and the
  launches are three index queries, no snapshot: a launch or a give-back between them makes them differ for a
  moment. Reconcile therefore reports a difference only when a second reading finds the same one
  (:func:`lease_differences`);
* every pending job of a connected project (of those a sweep listed) is queued or claimed.

A pure function of :class:`~chalicelib.lifecycle.facts.Facts` (the pending jobs only when swept).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from chalicelib.config import FleetConfig
from chalicelib.gitlab_api import GitLabRunner
from chalicelib.lifecycle.facts import Facts
from chalicelib.lifecycle.rules import (
    INSTANCE_VISIBILITY_SECONDS,
    LOST_WEBHOOK_SECONDS,
    RETIRE_GRACE_SECONDS,
    STALE_LAUNCH_SECONDS,
    retire_at,
)
from chalicelib.naming import described_instance
from chalicelib.scaling.store.records import RunnerRecord
from chalicelib.store import RunnerState

# How long a runner may go on taking jobs past its retirement point: until the next reconcile run pauses it, and
# the pause's grace, in which a request already past GitLab's check may still be given one.
RETIREMENT_SLACK_SECONDS = 60.0 + RETIRE_GRACE_SECONDS
# How long a record's drain mark and GitLab's pause may disagree: the two writes are one after the other.
PAUSE_SETTLE_SECONDS = 60.0
LEASES_HELD = "lease counter differs from the leases held"


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.subject} ({self.detail})"


def check(facts: Facts, config: FleetConfig, *, settled_before: float | None = None) -> list[Violation]:
    """Every invariant that does not hold; [] when the fleet is consistent. With ``settled_before``, only what is
    older than that is judged (see the module docstring). GitLab's invariants are checked only when GitLab was
    read, the pending jobs' only when swept."""
    quiet = settled_before is None
    settled = facts.now if settled_before is None else settled_before
    found: list[Violation] = []
    live_records = {i: r for i, r in facts.records.items() if not r.terminated}
    working = {launch.launch_id for launch in facts.launches if launch.leases > 0}
    for instance in facts.instances.values():
        if instance.instance_id in live_records or instance.state == "shutting-down":
            continue
        if not quiet and (instance.launched_at >= settled - STALE_LAUNCH_SECONDS or instance.launch_id in working):
            continue
        found.append(
            Violation("instance without a record", instance.instance_id, f"{instance.state}, pool {instance.pool}")
        )
    for record in live_records.values():
        if record.instance_id in facts.instances:
            continue
        if not quiet and record.launched_at >= settled - INSTANCE_VISIBILITY_SECONDS:
            continue
        found.append(Violation("record without an instance", record.instance_id, f"state {record.state.value}"))
    found += _gitlab_violations(facts, live_records, settled, quiet)
    found += _retirement_violations(facts, config, live_records)
    for token in facts.tokens or ():
        if token.deadline_at < facts.now:
            late = round(facts.now - token.deadline_at, 1)
            found.append(Violation("token past its boot deadline", token.instance_id, f"{late} s past"))
    found += _lease_violations(facts, config, live_records, quiet)
    found += _pending_job_violations(facts, settled)
    return found


def _gitlab_violations(
    facts: Facts, live_records: Mapping[str, RunnerRecord], settled: float, quiet: bool
) -> list[Violation]:
    if facts.gitlab_runners is None:
        return []
    found: list[Violation] = []
    named = {r.gitlab_runner_id for r in facts.records.values() if r.gitlab_runner_id is not None}
    per_instance: Counter[str] = Counter()
    listed = {runner.runner_id: runner for runner in facts.gitlab_runners}
    for runner in facts.gitlab_runners:
        instance_id = described_instance(runner.description) or ""
        per_instance[instance_id] += 1
        if instance_id not in facts.instances and (quiet or not _cleanup_under_way(facts, runner, named)):
            found.append(Violation("GitLab runner without an instance", str(runner.runner_id), runner.description))
    for instance_id, runners in sorted(per_instance.items()):
        if instance_id and runners > 1:
            found.append(Violation("more than one GitLab runner for an instance", instance_id, f"{runners} runners"))
    for record in live_records.values():
        runner_id = record.gitlab_runner_id
        if runner_id is None or (not quiet and record.launched_at >= settled - STALE_LAUNCH_SECONDS):
            continue
        seen = listed.get(runner_id)
        if seen is None:
            found.append(Violation("record's GitLab runner missing", record.instance_id, f"runner {runner_id}"))
            continue
        if record.state is RunnerState.DONE:
            continue
        if not quiet and record.draining and record.draining_at >= settled - PAUSE_SETTLE_SECONDS:
            continue
        if seen.paused != bool(record.draining):
            says = f"record drains ({record.draining})" if record.draining else "record does not drain"
            found.append(
                Violation(
                    "paused in GitLab unlike its record",
                    record.instance_id,
                    f"{'paused' if seen.paused else 'not paused'} in GitLab, {says}",
                )
            )
    return found


def _cleanup_under_way(facts: Facts, runner: GitLabRunner, named: set[int]) -> bool:
    """Whether a record will delete this GitLab runner, whose instance is gone: a terminated record keeps the
    runner's id for its cleanup; a live one may not show the id yet (the runner was registered a moment before its
    instance ended, and the index lags), and is judged by its own invariant ("record without an instance"), as the
    orphan rule leaves the runner to it."""
    if runner.runner_id in named:
        return True
    record = facts.records.get(described_instance(runner.description) or "")
    return record is not None and not record.terminated


def _retirement_violations(
    facts: Facts, config: FleetConfig, live_records: Mapping[str, RunnerRecord]
) -> list[Violation]:
    pools = {pool.name: pool for pool in config.pools}
    found: list[Violation] = []
    for job in facts.jobs:
        started = float(job.item.get("running_at", 0))
        instance_id = described_instance(str(job.item.get("runner_description") or "")) or ""
        record = live_records.get(instance_id)
        if not started or record is None or record.pool not in pools:
            continue
        due = retire_at(record, pools[record.pool])
        if started > due + RETIREMENT_SLACK_SECONDS:
            found.append(
                Violation(
                    "job started on a runner past its retirement point",
                    instance_id,
                    f"job {job.project_id}:{job.job_id} {round(started - due)} s after it",
                )
            )
    return found


def lease_differences(facts: Facts, config: FleetConfig) -> dict[str, int]:
    """Each pool whose lease counter differs from the leases its live records and launches hold: counter minus
    held."""
    held = _held_leases(facts, {i: r for i, r in facts.records.items() if not r.terminated})
    pools = sorted({p.name for p in config.pools} | set(facts.leases))
    differences = {pool: facts.leases.get(pool, 0) - held.get(pool, 0) for pool in pools}
    return {pool: difference for pool, difference in differences.items() if difference}


def _held_leases(facts: Facts, live_records: Mapping[str, RunnerRecord]) -> Counter[str]:
    held: Counter[str] = Counter(r.pool for r in live_records.values() if r.lease)
    for launch in facts.launches:
        held[launch.pool] += max(0, launch.leases)
    return held


def _lease_violations(
    facts: Facts, config: FleetConfig, live_records: Mapping[str, RunnerRecord], quiet: bool
) -> list[Violation]:
    found: list[Violation] = []
    held = _held_leases(facts, live_records)
    live: Counter[str] = Counter(i.pool for i in facts.instances.values() if i.state != "shutting-down")
    for pool in sorted({p.name for p in config.pools} | set(facts.leases)):
        leases = facts.leases.get(pool, 0)
        if leases != held.get(pool, 0):
            found.append(
                Violation(
                    LEASES_HELD,
                    pool,
                    f"{leases} leases, {held.get(pool, 0)} held by records and launches",
                )
            )
        if quiet and leases != live.get(pool, 0):
            found.append(
                Violation(
                    "lease counter differs from live instances", pool, f"{leases} leases, {live.get(pool, 0)} live"
                )
            )
    return found


def _pending_job_violations(facts: Facts, settled: float) -> list[Violation]:
    if facts.pending_jobs is None:
        return []
    known = {(job.project_id, job.job_id): job.item for job in facts.jobs}
    found: list[Violation] = []
    for pending in facts.pending_jobs:
        if pending.created_at >= settled - LOST_WEBHOOK_SECONDS:
            continue
        item = known.get((pending.project_id, pending.job_id))
        if item is not None and (item.get("queued") is True or item.get("launch_id") or item.get("queue_claim")):
            continue
        found.append(
            Violation(
                "pending job neither queued nor claimed", f"{pending.project_id}:{pending.job_id}", "lost Job Hook?"
            )
        )
    return found

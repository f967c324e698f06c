"""``fleetctl status``: what the fleet table says, summarised for people (a table per pool) or programs (``--json``).

Besides jobs, runners, pools and whether the fleet's invariants hold against the real resources
(:mod:`chalicelib.lifecycle.invariants`), it reports what the table alone cannot: pending jobs recorded but never queued
(their queue send failed; GitLab will not send them again), and, asked of GitLab, whether each hook that
``gitlab connect`` made is still executed. GitLab disables a hook after more than 3 consecutive failed deliveries,
and the events of that window never reach the fleet. A GitLab that cannot be asked is reported, not fatal.

The ``--json`` document is a stable interface: ``status_schema.json`` (shipped beside this module) is its JSON
Schema, ``docs/status.md`` describes it field by field, and ``schema_version`` changes only when a field is
removed or changes meaning (fields may be added).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import GitLabUnavailableError
from chalicelib.images.record import ImageRecord
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.lifecycle.facts import Facts
from chalicelib.lifecycle.invariants import check
from chalicelib.lifecycle.reconcile import REAPED, RECONCILED, RETIRED
from chalicelib.scaling.store.records import WAITING_POOL_ATTRIBUTE, PoolCounter
from chalicelib.store import FleetStore, HookRecord, RunnerState, is_unqueued_pending
from fleetctl.gitlab_connect import HookState

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("status_schema.json")
# How far back the reaped and retired counts look.
RECENT_SECONDS = 3600.0

# Reads one hook's state from GitLab; raises GitLabUnavailableError.
HookReader = Callable[[HookRecord], HookState]


def schema() -> dict[str, Any]:
    """The JSON Schema of ``fleetctl status --json``."""
    document: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return document


def waiting_for(item: Mapping[str, Any]) -> str:
    """The pool a job item waits for (full or drained), or "": a pending job that waited, with no launch since
    (scale-up marks it when it releases the claim it waited from) and no outcome."""
    if item.get("kind") != "job" or int(item.get("status_rank", 0)) != JobStatus.PENDING.rank:
        return ""
    if item.get("launch_id") or "outcome" in item:
        return ""
    return str(item.get(WAITING_POOL_ATTRIBUTE) or "")


def drain_state(counter: PoolCounter, live_runners: int) -> str:
    """``none``, ``draining`` (drained, with runners or leases left) or ``drained`` (drained and empty)."""
    if not counter.drained:
        return "none"
    return "draining" if live_runners or counter.leases else "drained"


class _PoolTally:
    """What the table says of one pool, gathered over the scan."""

    def __init__(self) -> None:
        self.runners: Counter[str] = Counter()
        self.lifecycles: Counter[str] = Counter()
        self.live = 0
        self.waiting = 0
        self.oldest_idle_since: float | None = None
        self.reaped = 0
        self.retired = 0

    def add_runner(self, item: Mapping[str, Any], now: float) -> None:
        state = str(item.get("state", "unknown"))
        self.runners[state] += 1
        if state == RunnerState.TERMINATED.value:
            if float(item.get("terminated_at", 0)) >= now - RECENT_SECONDS:
                reason = str(item.get("reason", ""))
                self.reaped += reason.startswith((REAPED, RECONCILED))
                self.retired += reason.startswith(RETIRED)
            return
        self.live += 1
        self.lifecycles[str(item.get("lifecycle") or "unknown")] += 1
        idle_since = item.get("idle_since")
        if state == RunnerState.IDLE.value and idle_since is not None:
            since = float(idle_since)
            self.oldest_idle_since = since if self.oldest_idle_since is None else min(self.oldest_idle_since, since)


def fleet_status(
    config: FleetConfig,
    store: FleetStore,
    read_hook: HookReader | None = None,
    facts: Facts | None = None,
    *,
    now: float | None = None,
) -> dict[str, Any]:
    """The summary (without ``invariants``: see :func:`invariant_report`); ``read_hook`` asks GitLab about each
    recorded hook (without it, hooks are listed unread), and ``facts`` (reconcile's view, None when AWS was
    unreadable) give each pool's roll-out."""
    from fleetctl.images import iso

    now = time.time() if now is None else now
    jobs: Counter[str] = Counter()
    unqueued = 0
    runners: Counter[str] = Counter()
    tallies: dict[str, _PoolTally] = {pool.name: _PoolTally() for pool in config.pools}
    counters: dict[str, PoolCounter] = {}
    images: dict[str, ImageRecord] = {}
    hooks: list[HookRecord] = []
    for item in store.scan():
        kind = item.get("kind")
        if kind == "job":
            jobs[str(item.get("status", "unknown"))] += 1
            if is_unqueued_pending(item):
                unqueued += 1
            waits_for = waiting_for(item)
            if waits_for:
                tallies.setdefault(waits_for, _PoolTally()).waiting += 1
        elif kind == "runner":
            runners[str(item.get("state", "unknown"))] += 1
            tallies.setdefault(str(item.get("pool", "")), _PoolTally()).add_runner(item, now)
        elif kind == "pool":
            name = str(item.get("name", ""))
            counters[name] = PoolCounter.from_item(name, item)
        elif kind == "image":
            name = str(item.get("pool", ""))
            images[name] = ImageRecord.from_item(name, item)
        elif kind == "hook":
            hooks.append(HookRecord.from_item(item))
    pools = []
    for pool in config.pools:
        tally = tallies[pool.name]
        counter = counters.get(pool.name, PoolCounter(pool.name))
        oldest = tally.oldest_idle_since
        pools.append(
            {
                "name": pool.name,
                "tags": list(pool.tags),
                "max_runners": pool.max_runners,
                "runners": dict(sorted(tally.runners.items())),
                "lifecycles": dict(sorted(tally.lifecycles.items())),
                "leases": counter.leases,
                "jobs_waiting": tally.waiting,
                "oldest_idle_seconds": round(max(0.0, now - oldest), 1) if oldest is not None else None,
                "reaped_last_hour": tally.reaped,
                "retired_last_hour": tally.retired,
                "drain": {
                    "state": drain_state(counter, tally.live),
                    "since": iso(counter.drained_at) if counter.drained else None,
                },
                "image": f"{pool.image.repository}:{pool.image.tag}",
                **image_report(pool, images.get(pool.name, ImageRecord(pool.name)), facts),
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "fleet": config.fleet,
        "generated_at": iso(now),
        "jobs": dict(sorted(jobs.items())),
        "unqueued_jobs": unqueued,
        "runners": dict(sorted(runners.items())),
        "reaped_last_hour": sum(t.reaped for t in tallies.values()),
        "hooks": [hook_report(hook, read_hook) for hook in sorted(hooks, key=lambda h: h.project_id)],
        "pools": pools,
    }


def image_report(pool: PoolConfig, record: ImageRecord, facts: Facts | None) -> dict[str, Any]:
    """The pool's image keys of the summary (described in docs/status.md)."""
    from fleetctl.images import iso

    candidate = record.candidate
    version: str | None = str(record.template_version) if record.template_version is not None else None
    if version is None and facts is not None:
        version = facts.template_versions.get(pool.name) or None
    return {
        "image_digest": record.current.digest if record.current else None,
        "image_candidate": (
            {"digest": candidate.digest, "state": candidate.state.value, "deadline": iso(candidate.deadline)}
            if candidate
            else None
        ),
        "image_pinned": record.pinned,
        "image_deleted": record.current_deleted_at is not None,
        "template_version": int(version) if version else None,
        "rollout": rollout(pool.name, version, facts) if facts is not None else None,
    }


def rollout(pool: str, version: str | None, facts: Facts) -> dict[str, Any]:
    """How many of the pool's live instances were launched from ``version`` and how many from another."""
    launched = [
        instance.template_version
        for instance in facts.instances.values()
        if instance.pool == pool and instance.state != "shutting-down"
    ]
    unknown = sum(1 for found in launched if not found)
    on_version = sum(1 for found in launched if found and found == version)
    return {
        "version": int(version) if version else None,
        "on_version": on_version,
        "on_other": len(launched) - unknown - on_version,
        "unknown": unknown,
        "total": len(launched),
    }


def image_line(pool: dict[str, Any]) -> str:
    """One pool's image for the table output: ``image ci/base@sha256:abcd1234… (pinned) rollout 3/5 on version
    4``, with a candidate awaiting its scan and a deleted current digest named."""
    from fleetctl.images import short_digest

    repository = str(pool["image"]).rsplit(":", 1)[0]
    digest = pool["image_digest"]
    line = f"image {repository}@{short_digest(digest)}" if digest else f"image {pool['image']} (no digest recorded)"
    if pool["image_pinned"]:
        line += " (pinned)"
    if pool["image_deleted"]:
        line += " (DELETED from ECR: new runners cannot pull it)"
    shown = pool["rollout"]
    if shown is not None and shown["version"] is not None:
        line += f" rollout {shown['on_version']}/{shown['total']} on version {shown['version']}"
    elif pool["template_version"] is not None:
        line += f" version {pool['template_version']}"
    candidate = pool["image_candidate"]
    if candidate is not None:
        line += f"; candidate {short_digest(candidate['digest'])} {candidate['state']} until {candidate['deadline']}"
    return line


def invariant_report(config: FleetConfig, facts: Facts | None) -> dict[str, Any]:
    """The fleet's invariants (:mod:`chalicelib.lifecycle.invariants`) against the real resources (``facts``,
    None when AWS was unreadable): whether they hold, each violation, and which could not be checked (GitLab
    unreadable)."""
    if facts is None:
        return {"hold": False, "violations": [], "unchecked": ["AWS unreadable"]}
    violations = [str(v) for v in check(facts, config)]
    unchecked = [] if facts.gitlab_known else ["GitLab runners: GitLab unreadable"]
    return {"hold": not violations, "violations": violations, "unchecked": unchecked}


def hook_report(hook: HookRecord, read_hook: HookReader | None) -> dict[str, Any]:
    """One hook: where it sends, and GitLab's ``alert_status`` and ``disabled_until`` for it, or why unknown."""
    report: dict[str, Any] = {
        "project_id": hook.project_id,
        "hook_id": hook.hook_id,
        "url": hook.webhook_url,
        "gitlab_url": hook.gitlab_url,
        "alert_status": None,
        "disabled_until": None,
        "error": None,
    }
    if read_hook is None:
        return {**report, "error": "not read from GitLab"}
    try:
        state = read_hook(hook)
    except GitLabUnavailableError as exc:
        return {**report, "error": exc.reason}
    return {**report, "alert_status": state.alert_status, "disabled_until": state.disabled_until}


def _counts(counts: Mapping[str, int], leave_out: Iterable[str] = ()) -> str:
    shown = [f"{name} {n}" for name, n in counts.items() if n and name not in set(leave_out)]
    return ", ".join(shown) or "-"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _drain_cell(drain: Mapping[str, Any]) -> str:
    if drain["state"] == "none":
        return "not drained"
    if drain["state"] == "draining":
        return f"draining since {drain['since']} (runners left)"
    return f"drained since {drain['since']} (empty; its jobs wait for 'fleetctl undrain')"


def render(summary: Mapping[str, Any], *, fold: bool = False) -> Any:
    """The summary for people: a header, the invariants, the hooks, then a table of each pool, one aligned line per
    figure (a rich renderable, for ``Console.print(..., crop=False)``, or for ``Live`` with ``fold``)."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [
        Text.assemble(
            (str(summary["fleet"]), "bold"),
            f"  jobs: {_counts(summary['jobs'])}  runners: {_counts(summary['runners'])}"
            f"  unqueued jobs: {summary['unqueued_jobs']}  reaped in the last hour: {summary['reaped_last_hour']}"
            f"  at {summary['generated_at']}",
        )
    ]
    invariants = summary["invariants"]
    verdict = Text("ok", "green") if invariants["hold"] else Text(f"{len(invariants['violations'])} violated", "red")
    if invariants["unchecked"]:
        verdict.append(f" (not checked: {', '.join(invariants['unchecked'])})")
    parts.append(Text.assemble("invariants: ", verdict))
    # One line per violation and per hook, never wrapped or cut (printed with crop=False): they are what the
    # operator came for, and what they grep for. Redrawn in place, they fold instead: a line longer than the
    # terminal would throw off the redraw.
    lines: list[str] = [f"  {violation}" for violation in invariants["violations"]]
    for hook in summary["hooks"]:
        state = hook["alert_status"] or f"unknown ({hook['error']})"
        until = f" until {hook['disabled_until']}" if hook["alert_status"] == "temporarily_disabled" else ""
        lines.append(f"hook {hook['hook_id']} of project {hook['project_id']} -> {hook['url']}: {state}{until}")
    parts += [Text(line, overflow="fold") if fold else Text(line, no_wrap=True, overflow="ignore") for line in lines]
    for pool in summary["pools"]:
        parts.append(Text(f"pool {pool['name']} ({','.join(pool['tags']) or 'untagged'})", "bold"))
        drain = pool["drain"]
        live = _counts(pool["runners"], leave_out=("terminated",))
        rows = [
            ("drain", _drain_cell(drain), "" if drain["state"] == "none" else "yellow"),
            ("runners", f"{live} ({_counts(pool['lifecycles'])})" if live != "-" else "none", ""),
            ("jobs waiting", str(pool["jobs_waiting"]), "yellow" if pool["jobs_waiting"] else ""),
            ("leases", f"{pool['leases']} of max {pool['max_runners']}", ""),
            ("image", image_line(pool).removeprefix("image "), "red" if pool["image_deleted"] else ""),
            ("oldest idle", _age(pool["oldest_idle_seconds"]), ""),
            ("last hour", f"{pool['reaped_last_hour']} reaped, {pool['retired_last_hour']} retired", ""),
        ]
        for label, value, style in rows:
            # Aligned label and value lines rather than a rich Table, whose columns would squeeze a long value (an
            # image with its candidate) into a fold; each line is never cut, like the violations above.
            line = Text.assemble(f"  {label:<14}", (value, style))
            if fold:
                line.overflow = "fold"
            else:
                line.no_wrap, line.overflow = True, "ignore"
            parts.append(line)
    return Group(*parts)

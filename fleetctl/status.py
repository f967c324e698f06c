"""``fleetctl status``: what the fleet table says, summarised for people (a table) or programs (JSON).

Besides jobs, runners, pools and whether the fleet's invariants hold against the real resources
(:mod:`chalicelib.lifecycle.invariants`), it reports what the table alone cannot: pending jobs recorded but never queued
(their queue send failed; GitLab will not send them again), and, asked of GitLab, whether each hook that
``gitlab connect`` made is still executed. GitLab disables a hook after more than 3 consecutive failed deliveries,
and the events of that window never reach the fleet. A GitLab that cannot be asked is reported, not fatal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from chalicelib.config import FleetConfig
from chalicelib.errors import GitLabUnavailableError
from chalicelib.lifecycle.facts import FactSource, gather_or_none
from chalicelib.lifecycle.invariants import check
from chalicelib.store import FleetStore, HookRecord, is_unqueued_pending
from fleetctl.gitlab_connect import HookState

# Reads one hook's state from GitLab; raises GitLabUnavailableError.
HookReader = Callable[[HookRecord], HookState]


def fleet_status(config: FleetConfig, store: FleetStore, read_hook: HookReader | None = None) -> dict[str, Any]:
    """The summary; ``read_hook`` asks GitLab about each recorded hook (without it, hooks are listed unread)."""
    jobs: Counter[str] = Counter()
    unqueued = 0
    runners: Counter[str] = Counter()
    runners_by_pool: dict[str, Counter[str]] = {pool.name: Counter() for pool in config.pools}
    leases: dict[str, int] = {}
    digests: dict[str, str | None] = {}
    hooks: list[HookRecord] = []
    for item in store.scan():
        kind = item.get("kind")
        if kind == "job":
            jobs[str(item.get("status", "unknown"))] += 1
            if is_unqueued_pending(item):
                unqueued += 1
        elif kind == "runner":
            state = str(item.get("state", "unknown"))
            runners[state] += 1
            runners_by_pool.setdefault(str(item.get("pool", "")), Counter())[state] += 1
        elif kind == "pool":
            leases[str(item.get("name", ""))] = int(item.get("leases", 0))
        elif kind == "image":
            digests[str(item.get("pool", ""))] = item.get("digest")
        elif kind == "hook":
            hooks.append(HookRecord.from_item(item))
    return {
        "fleet": config.fleet,
        "jobs": dict(sorted(jobs.items())),
        "unqueued_jobs": unqueued,
        "runners": dict(sorted(runners.items())),
        "hooks": [hook_report(hook, read_hook) for hook in sorted(hooks, key=lambda h: h.project_id)],
        "pools": [
            {
                "name": pool.name,
                "tags": list(pool.tags),
                "max_runners": pool.max_runners,
                "runners": dict(sorted(runners_by_pool.get(pool.name, Counter()).items())),
                "leases": leases.get(pool.name, 0),
                "image": f"{pool.image.repository}:{pool.image.tag}",
                "image_digest": digests.get(pool.name),
            }
            for pool in config.pools
        ],
    }


def invariant_report(config: FleetConfig, source: FactSource) -> dict[str, Any]:
    """The fleet's invariants (:mod:`chalicelib.lifecycle.invariants`) against the real resources: whether they
    hold, each violation, and which could not be checked (GitLab unreadable)."""
    facts = gather_or_none(source, tokens=True)
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

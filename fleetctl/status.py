"""``fleetctl status``: what the fleet table says, summarised for people (a table) or programs (JSON).

Besides jobs, runners, pools and whether the fleet's invariants hold against the real resources
(:mod:`chalicelib.lifecycle.invariants`), it reports what the table alone cannot: pending jobs recorded but never queued
(their queue send failed; GitLab will not send them again), and, asked of GitLab, whether each hook that
``gitlab connect`` made is still executed. GitLab disables a hook after more than 3 consecutive failed deliveries,
and the events of that window never reach the fleet. A GitLab that cannot be asked is reported, not fatal.

Each pool's entry (``pools`` in ``--json``) has, besides its runners and leases:

* ``image``: the configured ``repository:tag``;
* ``image_digest``: the digest the pool's image record names as current (null before bootstrap recorded one);
* ``image_candidate``: ``{"digest", "state", "deadline"}`` of a pushed digest held for its scan (``state``
  ``awaiting_scan`` or ``scan_timeout``, ``deadline`` ISO 8601 UTC), or null;
* ``image_pinned``: whether pushes wait for ``fleetctl image unpin``;
* ``image_deleted``: whether ECR deleted the current digest (new runners would fail to pull it);
* ``template_version``: the launch template version the pool launches from: the image record's, else the
  template's default version (null when neither is known);
* ``rollout``: ``{"version", "on_version", "on_other", "unknown", "total"}``: of the pool's live instances (those
  shutting down left out), how many were launched from ``version``, how many from another (an earlier
  promotion's: reconcile retires them once idle), and how many carry no launch template version tag; null when
  EC2 could not be read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import GitLabUnavailableError
from chalicelib.images.record import ImageRecord
from chalicelib.lifecycle.facts import Facts
from chalicelib.lifecycle.invariants import check
from chalicelib.store import FleetStore, HookRecord, is_unqueued_pending
from fleetctl.gitlab_connect import HookState

# Reads one hook's state from GitLab; raises GitLabUnavailableError.
HookReader = Callable[[HookRecord], HookState]


def fleet_status(
    config: FleetConfig, store: FleetStore, read_hook: HookReader | None = None, facts: Facts | None = None
) -> dict[str, Any]:
    """The summary; ``read_hook`` asks GitLab about each recorded hook (without it, hooks are listed unread), and
    ``facts`` (reconcile's view, None when AWS was unreadable) give each pool's roll-out."""
    jobs: Counter[str] = Counter()
    unqueued = 0
    runners: Counter[str] = Counter()
    runners_by_pool: dict[str, Counter[str]] = {pool.name: Counter() for pool in config.pools}
    leases: dict[str, int] = {}
    images: dict[str, ImageRecord] = {}
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
            pool = str(item.get("pool", ""))
            images[pool] = ImageRecord.from_item(pool, item)
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
                **image_report(pool, images.get(pool.name, ImageRecord(pool.name)), facts),
            }
            for pool in config.pools
        ],
    }


def image_report(pool: PoolConfig, record: ImageRecord, facts: Facts | None) -> dict[str, Any]:
    """The pool's image keys of the summary (see the module docstring)."""
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

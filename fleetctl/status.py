"""``fleetctl status``: what the fleet table says, summarised for people (a table) or programs (JSON)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from chalicelib.config import FleetConfig
from chalicelib.store import FleetStore


def fleet_status(config: FleetConfig, store: FleetStore) -> dict[str, Any]:
    jobs: Counter[str] = Counter()
    runners: Counter[str] = Counter()
    runners_by_pool: dict[str, Counter[str]] = {pool.name: Counter() for pool in config.pools}
    leases: dict[str, int] = {}
    digests: dict[str, str | None] = {}
    for item in store.scan():
        kind = item.get("kind")
        if kind == "job":
            jobs[str(item.get("status", "unknown"))] += 1
        elif kind == "runner":
            state = str(item.get("state", "unknown"))
            runners[state] += 1
            runners_by_pool.setdefault(str(item.get("pool", "")), Counter())[state] += 1
        elif kind == "pool":
            leases[str(item.get("name", ""))] = int(item.get("leases", 0))
        elif kind == "image":
            digests[str(item.get("pool", ""))] = item.get("digest")
    return {
        "fleet": config.fleet,
        "jobs": dict(sorted(jobs.items())),
        "runners": dict(sorted(runners.items())),
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

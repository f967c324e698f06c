"""The fleet's invariants, checked against facts read from the real resources.

At every quiet moment (no launch, boot or termination under way) these hold:

* no live instance of the fleet's without a live runner record;
* no live runner record without its instance;
* no GitLab runner of the fleet's without a live instance;
* no runner token past its boot deadline;
* each pool's lease counter equal to its live instances.

Integration scenarios end by asserting :func:`check`, and ``fleetctl status`` shows its result. It is a pure
function of :class:`~chalicelib.lifecycle.facts.Facts` gathered with ``tokens=True``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from chalicelib.config import FleetConfig
from chalicelib.lifecycle.facts import Facts
from chalicelib.naming import described_instance


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.subject} ({self.detail})"


def check(facts: Facts, config: FleetConfig) -> list[Violation]:
    """Every invariant that does not hold; [] when the fleet is consistent. GitLab's and the tokens' are
    checked only when their facts were read."""
    found: list[Violation] = []
    live_records = {i: r for i, r in facts.records.items() if not r.terminated}
    for instance in facts.instances.values():
        if instance.instance_id not in live_records and instance.state != "shutting-down":
            found.append(
                Violation("instance without a record", instance.instance_id, f"{instance.state}, pool {instance.pool}")
            )
    for record in live_records.values():
        if record.instance_id not in facts.instances:
            found.append(Violation("record without an instance", record.instance_id, f"state {record.state.value}"))
    for runner in facts.gitlab_runners or ():
        instance_id = described_instance(runner.description) or ""
        if instance_id not in facts.instances:
            found.append(Violation("GitLab runner without an instance", str(runner.runner_id), runner.description))
    for token in facts.tokens or ():
        if token.deadline_at < facts.now:
            late = round(facts.now - token.deadline_at, 1)
            found.append(Violation("token past its boot deadline", token.instance_id, f"{late} s past"))
    per_pool = Counter(instance.pool for instance in facts.instances.values() if instance.state != "shutting-down")
    for pool in sorted({p.name for p in config.pools} | set(facts.leases)):
        leases, live = facts.leases.get(pool, 0), per_pool.get(pool, 0)
        if leases != live:
            found.append(Violation("lease counter differs from live instances", pool, f"{leases} leases, {live} live"))
    return found

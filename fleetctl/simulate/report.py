"""A run's figures, per pool and in total, and how runs compare: the Pareto frontier of cost against p95 queue
wait, the table, the JSON and the self-contained HTML page."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetctl.simulate import api_rates as api
from fleetctl.simulate.engine import Outcome, PoolTally
from fleetctl.simulate.prices import SPOT, PriceTable


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


@dataclass(frozen=True)
class Figures:
    """One pool's figures, or the total's."""

    instance_hours: dict[str, float]  # "<lifecycle> <type>" -> hours
    cost: float
    floor_cost: float
    jobs: int
    launched: int
    wait_p50: float
    wait_p95: float
    wait_max: float
    peak_instances: int
    interruptions: int
    retried_jobs: int
    lost_jobs: int
    capacity_errors: int
    dead_lettered: int

    @property
    def cost_over_floor(self) -> float:
        return self.cost / self.floor_cost if self.floor_cost > 0 else 0.0

    @property
    def instances_per_job(self) -> float:
        return self.launched / self.jobs if self.jobs else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "instance_hours": {key: round(value, 3) for key, value in sorted(self.instance_hours.items())},
            "cost": round(self.cost, 4),
            "floor_cost": round(self.floor_cost, 4),
            "cost_over_floor": round(self.cost_over_floor, 4),
            "jobs": self.jobs,
            "instances_launched": self.launched,
            "instances_per_job": round(self.instances_per_job, 4),
            "queue_wait_seconds": {
                "p50": round(self.wait_p50, 2),
                "p95": round(self.wait_p95, 2),
                "max": round(self.wait_max, 2),
            },
            "peak_instances": self.peak_instances,
            "interruptions": self.interruptions,
            "retried_jobs": self.retried_jobs,
            "lost_jobs": self.lost_jobs,
            "capacity_errors": self.capacity_errors,
            "dead_lettered": self.dead_lettered,
        }


@dataclass(frozen=True)
class Summary:
    pools: dict[str, Figures]
    total: Figures
    api_rates: list[api.OperationRate]
    limits: list[api.LimitCheck]
    unmatched: int
    events: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def throttled(self) -> list[api.LimitCheck]:
        return [check for check in self.limits if check.throttles]

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "total": self.total.as_json(),
            "pools": {name: figures.as_json() for name, figures in self.pools.items()},
            "unmatched_jobs": self.unmatched,
            "api_calls_per_minute": [
                {
                    "operation": r.operation,
                    "calls": r.calls,
                    "peak": r.peak_per_minute,
                    "mean": round(r.mean_per_minute, 3),
                }
                for r in self.api_rates
            ],
            "limits": [
                {
                    "operations": list(c.limit.operations),
                    "limit": c.limit.note,
                    "burst": c.limit.burst,
                    "refill_per_second": c.limit.refill_per_second,
                    "per_minute": c.limit.per_minute,
                    "peak_per_minute": c.peak_per_minute,
                    "throttled_seconds": c.throttled_seconds,
                    "would_throttle": c.throttles,
                    "source": c.limit.source,
                }
                for c in self.limits
            ],
        }


def _figures(tallies: Sequence[PoolTally], floor: float, peak: int) -> Figures:
    hours: dict[str, float] = {}
    waits: list[float] = []
    for tally in tallies:
        for (lifecycle, instance_type), seconds in tally.instance_seconds.items():
            key = f"{lifecycle} {instance_type}"
            hours[key] = hours.get(key, 0.0) + seconds / 3600.0
        waits += tally.waits
    return Figures(
        instance_hours=hours,
        cost=sum(t.billed_cost for t in tallies),
        floor_cost=floor,
        jobs=sum(t.jobs for t in tallies),
        launched=sum(t.launched for t in tallies),
        wait_p50=percentile(waits, 0.50),
        wait_p95=percentile(waits, 0.95),
        wait_max=max(waits, default=0.0),
        peak_instances=peak,
        interruptions=sum(t.interruptions for t in tallies),
        retried_jobs=sum(t.retried for t in tallies),
        lost_jobs=sum(t.lost for t in tallies),
        capacity_errors=sum(t.capacity_errors for t in tallies),
        dead_lettered=sum(t.dead_lettered for t in tallies),
    )


def summarise(
    outcome: Outcome,
    prices: PriceTable,
    region: str,
    instance_types: Mapping[str, Sequence[str]],
    settings: dict[str, Any],
) -> Summary:
    """``instance_types``: each pool's listed types, whose cheapest spot price sets the pool's floor."""
    pools: dict[str, Figures] = {}
    floor_total = 0.0
    for name, tally in outcome.pools.items():
        _, cheapest = prices.cheapest(region, instance_types[name], SPOT)
        floor = tally.job_seconds * cheapest / 3600.0
        floor_total += floor
        pools[name] = _figures([tally], floor, tally.peak)
    total = _figures(list(outcome.pools.values()), floor_total, outcome.peak_total)
    return Summary(
        pools=pools,
        total=total,
        api_rates=outcome.meter.rates(outcome.start, outcome.end),
        limits=outcome.meter.check(),
        unmatched=outcome.unmatched,
        events=outcome.events,
        settings=settings,
    )


# -- comparing runs ----------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indexes of the points (cost, p95 wait) no other point beats: none is at most as costly and at most as slow
    while better in one. Equal points are all on the frontier."""
    front = set()
    for i, (cost, wait) in enumerate(points):
        dominated = any(
            other_cost <= cost and other_wait <= wait and (other_cost < cost or other_wait < wait)
            for j, (other_cost, other_wait) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.add(i)
    return front


def chosen(summaries: Sequence[Summary], front: set[int], max_wait: float) -> int | None:
    """The cheapest frontier run whose p95 wait is at most ``max_wait``."""
    fitting = [i for i in front if summaries[i].total.wait_p95 <= max_wait]
    return min(fitting, key=lambda i: (summaries[i].total.cost, i)) if fitting else None


def table(summaries: Sequence[Summary], front: set[int]) -> str:
    keys = sorted({key for s in summaries for key in s.settings.get("vary", {})})
    head = ["", *keys, "cost $", "floor $", "cost/floor", "p50 s", "p95 s", "max s", "inst/job", "peak", "throttles"]
    rows = [head]
    for i, s in enumerate(summaries):
        t = s.total
        rows.append(
            [
                "*" if i in front else "",
                *(str(s.settings.get("vary", {}).get(key, "")) for key in keys),
                f"{t.cost:.2f}",
                f"{t.floor_cost:.2f}",
                f"{t.cost_over_floor:.3f}",
                f"{t.wait_p50:.1f}",
                f"{t.wait_p95:.1f}",
                f"{t.wait_max:.1f}",
                f"{t.instances_per_job:.3f}",
                str(t.peak_instances),
                ",".join(c.limit.operations[0] for c in s.throttled) or "-",
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows)


def detail(summary: Summary) -> str:
    """One run's figures in text: per pool and total, then API rates against their limits."""
    lines = []
    for name, figures in [*summary.pools.items(), ("total", summary.total)]:
        f = figures
        hours = ", ".join(f"{key} {value:.2f} h" for key, value in sorted(f.instance_hours.items())) or "none"
        lines.append(
            f"{name}: {f.jobs} jobs, {f.launched} instances "
            f"({f.instances_per_job:.3f} a job, peak {f.peak_instances}); "
            f"{hours}; cost ${f.cost:.2f}, floor ${f.floor_cost:.2f}, ratio {f.cost_over_floor:.3f}; "
            f"wait p50 {f.wait_p50:.1f} s, p95 {f.wait_p95:.1f} s, max {f.wait_max:.1f} s; "
            f"{f.interruptions} interruptions, {f.retried_jobs} jobs retried"
            + (f", {f.capacity_errors} capacity errors" if f.capacity_errors else "")
            + (f", {f.dead_lettered} dead-lettered" if f.dead_lettered else "")
        )
    if summary.unmatched:
        lines.append(f"unmatched: {summary.unmatched} jobs no pool can run")
    lines.append("API calls per minute (peak / mean):")
    for rate in summary.api_rates:
        lines.append(f"  {rate.operation}: {rate.peak_per_minute} / {rate.mean_per_minute:.2f}")
    lines.append("limits:")
    for check in summary.limits:
        limit = check.limit
        bound = (
            f"{limit.per_minute:g}/min"
            if limit.per_minute
            else f"bucket {limit.burst:g}, +{limit.refill_per_second:g}/s"
        )
        verdict = f"WOULD THROTTLE ({check.throttled_seconds} s)" if check.throttles else "ok"
        lines.append(f"  {limit.name} [{limit.note}: {bound}]: peak {check.peak_per_minute}/min, {verdict}")
    return "\n".join(lines)


def render_html(summaries: Sequence[Summary], front: set[int], inputs: Mapping[str, Any], pick: int | None) -> str:
    """A page with no outside resource: an inline SVG of cost against p95 wait, the table, the inputs."""
    width, height, pad = 640, 400, 56
    costs = [s.total.cost for s in summaries] or [0.0]
    waits = [s.total.wait_p95 for s in summaries] or [0.0]
    low_c, high_c = min(costs), max(costs)
    low_w, high_w = min(waits), max(waits)

    def x(wait: float) -> float:
        return pad + (wait - low_w) / ((high_w - low_w) or 1.0) * (width - 2 * pad)

    def y(cost: float) -> float:
        return height - pad - (cost - low_c) / ((high_c - low_c) or 1.0) * (height - 2 * pad)

    marks = []
    for i, s in enumerate(summaries):
        colour = "#c0392b" if i == pick else ("#1f77b4" if i in front else "#aaaaaa")
        label = html.escape(", ".join(f"{k}={v}" for k, v in s.settings.get("vary", {}).items()) or "run")
        marks.append(
            f'<circle cx="{x(s.total.wait_p95):.1f}" cy="{y(s.total.cost):.1f}" r="5" fill="{colour}">'
            f"<title>{label}: ${s.total.cost:.2f}, p95 {s.total.wait_p95:.1f} s</title></circle>"
        )
    ordered = sorted(front, key=lambda i: summaries[i].total.wait_p95)
    line = " ".join(f"{x(summaries[i].total.wait_p95):.1f},{y(summaries[i].total.cost):.1f}" for i in ordered)
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="cost against p95 queue wait">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>'
        f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">'
        f"p95 queue wait (s): {low_w:.1f} to {high_w:.1f}</text>"
        f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
        f"cost ($): {low_c:.2f} to {high_c:.2f}</text>"
        f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-dasharray="4 3"/>' + "".join(marks) + "</svg>"
    )
    rows = table(summaries, front).splitlines()
    text_table = html.escape("\n".join(rows))
    inputs_list = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in inputs.items()
    )
    details = "".join(
        f"<h3>{html.escape(', '.join(f'{k}={v}' for k, v in s.settings.get('vary', {}).items()) or 'run')}</h3>"
        f"<pre>{html.escape(detail(s))}</pre>"
        for s in summaries
    )
    picked = (
        f"<p>Cheapest policy on the frontier within the wait target: row {pick + 1}.</p>" if pick is not None else ""
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>runner-fleet simulation</title>'
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em;overflow:auto}"
        "th{text-align:left;padding-right:1em}</style></head><body>"
        "<h1>runner-fleet simulation</h1>"
        f"<h2>Cost against p95 queue wait</h2>{svg}"
        "<p>Blue: the Pareto frontier (no other policy is both cheaper and faster); red: the policy picked.</p>"
        f"{picked}<h2>Policies</h2><pre>{text_table}</pre>"
        f"<h2>Inputs</h2><table>{inputs_list}</table><h2>Each run</h2>{details}</body></html>\n"
    )

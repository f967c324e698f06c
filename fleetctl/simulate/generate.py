"""A reference trace: seeded, realistic job histories without anyone's private data (docs/simulate.md).

Pipelines start on a working-day curve in one time zone (busy 08:00 to 18:00 on weekdays with a dip at lunch, a
trickle at night and at weekends); each runs stages in order (build, test, deploy), each stage fanning out into
parallel jobs, a stage's jobs becoming pending when the previous stage's longest job is done. Durations are
lognormal per stage (a long tail: a few jobs run ten times the median), and tags come from a fixed mix that reaches
every pool of the example configurations (untagged, ``docker``, ``docker,linux``, ``docker,dind``, ``release``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from fleetctl.simulate.history import HistoryJob

# Relative pipeline starts by local hour: night, the morning ramp, a lunch dip, the afternoon, the evening tail.
HOURLY = (
    0.05, 0.03, 0.02, 0.02, 0.02, 0.04, 0.10, 0.35, 0.80, 1.00, 1.00, 0.90,
    0.60, 0.85, 1.00, 0.95, 0.85, 0.60, 0.35, 0.20, 0.15, 0.10, 0.08, 0.06,
)  # fmt: skip
WEEKEND = 0.08  # a weekend day's pipelines, relative to a weekday's


@dataclass(frozen=True)
class Stage:
    name: str
    fan_out: tuple[int, int]  # parallel jobs, inclusive range
    median_seconds: float
    sigma: float
    tags: tuple[tuple[tuple[str, ...], float], ...]  # (tags, weight)
    present: float = 1.0  # share of pipelines that have the stage


STAGES = (
    Stage("build", (1, 2), 240.0, 0.6, ((("docker",), 0.5), (("docker", "dind"), 0.5))),
    Stage("test", (2, 8), 150.0, 0.9, (((), 0.35), (("docker",), 0.35), (("docker", "linux"), 0.30))),
    Stage("deploy", (1, 1), 90.0, 0.5, ((("release",), 0.5), (("docker",), 0.5)), present=0.3),
)
MAX_DURATION = 3 * 3600.0
PROJECTS = 40


@dataclass(frozen=True)
class TraceSettings:
    jobs: int
    seed: int = 0
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
    timezone: str = "Europe/Berlin"
    jobs_per_day: int = 3500


def generate(settings: TraceSettings) -> list[HistoryJob]:
    """``settings.jobs`` jobs over ``ceil(jobs / jobs_per_day)`` days (weekdays and weekends alike counted)."""
    rng = random.Random(settings.seed)
    days = max(1, math.ceil(settings.jobs / settings.jobs_per_day))
    zone = ZoneInfo(settings.timezone)
    local_start = settings.start.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    day_weights = [WEEKEND if (local_start + timedelta(days=d)).weekday() >= 5 else 1.0 for d in range(days)]
    jobs: list[HistoryJob] = []
    pipeline_id = 0
    while len(jobs) < settings.jobs:
        pipeline_id += 1
        day = rng.choices(range(days), weights=day_weights)[0]
        hour = rng.choices(range(24), weights=HOURLY)[0]
        wall = local_start + timedelta(days=day, hours=hour, seconds=rng.uniform(0, 3600))
        begin = wall.astimezone(UTC).timestamp()
        project = rng.randrange(1, PROJECTS + 1)
        jobs += _pipeline(rng, pipeline_id, project, begin, len(jobs))
    jobs = sorted(jobs[: settings.jobs], key=lambda job: (job.pending_at, job.id))
    return jobs


def _pipeline(rng: random.Random, pipeline_id: int, project: int, begin: float, first_id: int) -> Iterator[HistoryJob]:
    at = begin
    number = first_id
    for stage in STAGES:
        if rng.random() >= stage.present:
            continue
        longest = 0.0
        for index in range(rng.randint(*stage.fan_out)):
            number += 1
            tags = rng.choices([t for t, _ in stage.tags], weights=[w for _, w in stage.tags])[0]
            duration = min(MAX_DURATION, stage.median_seconds * math.exp(rng.gauss(0.0, stage.sigma)))
            longest = max(longest, duration)
            yield HistoryJob(
                id=number,
                pending_at=round(at, 3),
                duration=round(duration, 1),
                tags=tuple(sorted(tags)),
                project_id=project,
                pipeline_id=pipeline_id,
                stage=stage.name,
                name=f"{stage.name}-{index + 1}",
            )
        # The next stage waits for this one's longest job, plus the time its runners took to start (typical).
        at += longest + rng.uniform(20.0, 60.0)

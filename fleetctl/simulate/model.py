"""What the simulator assumes about the world around the fleet's decisions: how long an instance takes to boot,
how long a job image takes to pull, how often spot capacity is taken back or refused. Every figure is settable;
every draw comes from a stream of its own, seeded from the run's seed and the stream's name, so that a run is
reproducible and one stream's draws never shift another's.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from chalicelib.errors import RunnerFleetError


class ModelError(RunnerFleetError):
    """A model setting that cannot be read; the message names it."""


@dataclass(frozen=True)
class Distribution:
    """``fixed:V``, ``uniform:LOW,HIGH`` or ``lognormal:MEDIAN,SIGMA`` (seconds)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, name: str = "distribution") -> Distribution:
        kind, _, rest = text.partition(":")
        try:
            values = [float(part) for part in rest.split(",")] if rest else []
        except ValueError:
            raise ModelError(f"{name}: numbers expected after '{kind}:', got {rest!r}") from None
        expected = {"fixed": 1, "uniform": 2, "lognormal": 2}
        if kind not in expected or len(values) != expected[kind]:
            raise ModelError(f"{name}: expected fixed:V, uniform:LOW,HIGH or lognormal:MEDIAN,SIGMA, got {text!r}")
        if any(value < 0 for value in values) or (kind == "uniform" and values[0] > values[1]):
            raise ModelError(f"{name}: values must be non-negative (and LOW <= HIGH), got {text!r}")
        return cls(kind, *values)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        return self.a * math.exp(rng.gauss(0.0, self.b)) if self.a > 0 else 0.0

    @property
    def median(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"


# EC2 reports a launched instance running within seconds to a minute; the runner AMI's boot (cloud-init, the boot
# script's token read, gitlab-runner's first contact) adds some ten more. A median of 40 s with a spread that puts
# the 95th percentile near 60 s is an assumption, not a measurement: set --boot to your own figure.
DEFAULT_BOOT = Distribution("lognormal", 40.0, 0.25)
# The job image is pulled by the first job on an instance (later jobs find it cached).
DEFAULT_IMAGE_PULL = Distribution("lognormal", 15.0, 0.5)


@dataclass(frozen=True)
class Model:
    boot: Distribution = DEFAULT_BOOT
    image_pull: Distribution = DEFAULT_IMAGE_PULL
    # Spot interruptions per instance-hour, by pool ("*" for the rest). AWS's Spot Instance Advisor puts most
    # types in its lowest band, under 5 % interrupted a month; 0.002 an hour is about that for instances that live
    # through working hours.
    interruption_rate: Mapping[str, float] = field(default_factory=lambda: {"*": 0.002})
    # The share of spot CreateFleet calls that come back short of capacity (InsufficientInstanceCapacity).
    capacity_error_rate: float = 0.0
    # gitlab-runner asks for a job every check_interval (3 s by default).
    poll_seconds: float = 3.0
    # From the Job Hook to the scale-up batch: SQS delivery and the event source's batching window (1 s).
    queue_seconds: float = 1.0
    # EC2 bills Linux instances per second with a one-minute minimum; shutting down takes a few seconds.
    shutdown_seconds: float = 5.0
    minimum_billed_seconds: float = 60.0
    # A job lost to an interruption becomes a new job this long after the instance went (the failure's Job Hook,
    # scale-up's retry through GitLab's API, the new job's Job Hook).
    retry_seconds: float = 5.0
    # EC2's interruption warning comes two minutes before the instance is taken.
    interruption_notice_seconds: float = 120.0
    reconcile_seconds: float = 60.0
    # Reconcile starts this long before the first job: warm pools are warm when the history begins.
    warmup_seconds: float = 600.0

    def interruptions_per_hour(self, pool: str) -> float:
        return float(self.interruption_rate.get(pool, self.interruption_rate.get("*", 0.0)))


def stream(seed: int, name: str) -> random.Random:
    """A random stream of its own for ``name``, from the run's seed."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def parse_rates(values: tuple[str, ...] | list[str], name: str) -> dict[str, float]:
    """``POOL=RATE`` (or a bare RATE for every pool) into a mapping with ``*`` for the rest."""
    rates: dict[str, float] = {}
    for value in values:
        pool, _, rate = value.rpartition("=")
        try:
            number = float(rate)
        except ValueError:
            raise ModelError(f"{name}: expected POOL=RATE or RATE, got {value!r}") from None
        if number < 0:
            raise ModelError(f"{name}: a rate must not be negative, got {value!r}")
        rates[pool or "*"] = number
    return rates

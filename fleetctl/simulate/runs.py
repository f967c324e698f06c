"""Runs and grids of runs: a configuration with settings changed (``--vary key=v1,v2``), simulated and summarised."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from chalicelib.config import FleetConfig, parse_config
from chalicelib.errors import ConfigError, RunnerFleetError
from fleetctl.simulate.engine import Simulation
from fleetctl.simulate.history import HistoryJob
from fleetctl.simulate.model import Model
from fleetctl.simulate.prices import PriceTable
from fleetctl.simulate.report import Summary, summarise


class VaryError(RunnerFleetError):
    """A ``--vary`` that names no setting of the configuration, or gives a value it refuses."""


@dataclass(frozen=True)
class Vary:
    key: str  # dotted: pools.<pool name>.<field>[.<field>...], or a top-level field
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Vary:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise VaryError(f"--vary {text!r}: expected key=v1,v2,...")
        return cls(key.strip(), tuple(yaml.safe_load(value.strip()) for value in values.split(",")))


def with_settings(config: FleetConfig, settings: dict[str, Any]) -> FleetConfig:
    """``config`` with each dotted key set to its value, validated again (a refused value names the field)."""
    data = config.model_dump(mode="json")
    for key, value in settings.items():
        parts = key.split(".")
        target: Any = data
        for index, part in enumerate(parts[:-1]):
            if isinstance(target, list):
                found = [item for item in target if isinstance(item, dict) and item.get("name") == part]
                if not found:
                    raise VaryError(f"--vary {key}: no pool named {part!r}")
                target = found[0]
            elif isinstance(target, dict) and isinstance(target.get(part), dict | list):
                target = target[part]
            else:
                raise VaryError(f"--vary {key}: {'.'.join(parts[: index + 1])} is not a setting with fields")
        if not isinstance(target, dict) or parts[-1] not in target:
            raise VaryError(f"--vary {key}: no such setting")
        target[parts[-1]] = value
    try:
        return parse_config(data, "--vary")
    except ConfigError as exc:
        raise VaryError(str(exc)) from None


def grid(varies: Sequence[Vary]) -> list[dict[str, Any]]:
    """Every combination of the values, the first ``--vary`` changing slowest."""
    if not varies:
        return [{}]
    return [
        dict(zip([v.key for v in varies], combo, strict=True))
        for combo in itertools.product(*(v.values for v in varies))
    ]


def run(
    config: FleetConfig,
    jobs: Sequence[HistoryJob],
    *,
    prices: PriceTable,
    model: Model,
    seed: int,
    vary: dict[str, Any] | None = None,
) -> Summary:
    changed = with_settings(config, vary) if vary else config
    outcome = Simulation(changed, jobs, model=model, prices=prices, seed=seed).run()
    region = changed.region or "us-east-1"
    settings = {"vary": dict(vary or {}), "seed": seed}
    return summarise(outcome, prices, region, {p.name: p.instance_types for p in changed.pools}, settings)

"""Instance prices: the dated snapshot shipped in ``prices.json``, a file of the same shape (``--prices FILE``), or
AWS itself (``--prices aws``: the Price List API for on-demand, the spot price history for spot)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import RunnerFleetError

SNAPSHOT = Path(__file__).with_name("prices.json")
ON_DEMAND = "on-demand"
SPOT = "spot"


class PriceError(RunnerFleetError):
    """A price that cannot be found or read; the message names the region, type or file."""


@dataclass(frozen=True)
class PriceTable:
    """Hourly prices by region, instance type and lifecycle (``on-demand`` or ``spot``)."""

    prices: Mapping[str, Mapping[str, Mapping[str, float]]]
    as_of: str = ""
    source: str = ""
    notes: Mapping[str, Any] = field(default_factory=dict)

    def hourly(self, region: str, instance_type: str, lifecycle: str) -> float:
        key = "on_demand" if lifecycle == ON_DEMAND else "spot"
        try:
            return float(self.prices[region][instance_type][key])
        except KeyError:
            raise PriceError(
                f"no {lifecycle} price for {instance_type} in {region} in the price table ({self.source}); "
                "add it with --prices FILE"
            ) from None

    def cheapest(self, region: str, instance_types: Iterable[str], lifecycle: str) -> tuple[str, float]:
        """The cheapest of ``instance_types`` (ties: the first listed) and its hourly price."""
        best: tuple[str, float] | None = None
        for instance_type in instance_types:
            price = self.hourly(region, instance_type, lifecycle)
            if best is None or price < best[1]:
                best = (instance_type, price)
        if best is None:
            raise PriceError("no instance type to price")
        return best


def parse_prices(data: Any, source: str) -> PriceTable:
    if not isinstance(data, dict) or not isinstance(data.get("regions"), dict):
        raise PriceError(f"{source}: expected an object with 'regions': {{region: {{type: {{on_demand, spot}}}}}}")
    prices: dict[str, dict[str, dict[str, float]]] = {}
    for region, types in data["regions"].items():
        if not isinstance(types, dict):
            raise PriceError(f"{source}: regions.{region} must be an object of instance types")
        for instance_type, entry in types.items():
            at = f"regions.{region}.{instance_type}"
            if not isinstance(entry, dict) or not {"on_demand", "spot"} <= set(entry):
                raise PriceError(f"{source}: {at} needs on_demand and spot")
            try:
                pair = {key: float(entry[key]) for key in ("on_demand", "spot")}
            except (TypeError, ValueError):
                raise PriceError(f"{source}: {at}: prices must be numbers") from None
            if min(pair.values()) < 0:
                raise PriceError(f"{source}: {at}: prices must not be negative")
            prices.setdefault(region, {})[instance_type] = pair
    return PriceTable(prices, as_of=str(data.get("as_of", "")), source=source, notes=data.get("source", {}))


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The snapshot, or the file at ``path``."""
    target = Path(path) if path else SNAPSHOT
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PriceError(f"{target}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PriceError(f"{target}, line {exc.lineno}: not JSON ({exc.msg})") from None
    return parse_prices(data, str(target) if path else f"snapshot of {data.get('as_of', '?')}")


def spot_prices(ec2: Any, instance_types: Iterable[str], *, now: datetime | None = None) -> dict[str, float]:
    """The median across zones of each type's latest Linux spot price (DescribeSpotPriceHistory)."""
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    pages = ec2.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=sorted(set(instance_types)),
        ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        StartTime=now or datetime.now(UTC),
    )
    for page in pages:
        for entry in page.get("SpotPriceHistory", []):
            key = (entry["InstanceType"], entry["AvailabilityZone"])
            stamp = entry["Timestamp"]
            if key not in latest or stamp > latest[key][0]:
                latest[key] = (stamp, float(entry["SpotPrice"]))
    by_type: dict[str, list[float]] = {}
    for (instance_type, _), (_, price) in latest.items():
        by_type.setdefault(instance_type, []).append(price)
    return {instance_type: statistics.median(prices) for instance_type, prices in by_type.items()}


def on_demand_prices(pricing: Any, region: str, instance_types: Iterable[str]) -> dict[str, float]:
    """Linux, shared tenancy on-demand hourly prices from the Price List API (GetProducts)."""
    found: dict[str, float] = {}
    for instance_type in sorted(set(instance_types)):
        filters = [
            {"Type": "TERM_MATCH", "Field": field_name, "Value": value}
            for field_name, value in (
                ("instanceType", instance_type),
                ("regionCode", region),
                ("operatingSystem", "Linux"),
                ("tenancy", "Shared"),
                ("preInstalledSw", "NA"),
                ("capacitystatus", "Used"),
            )
        ]
        pages = pricing.get_paginator("get_products").paginate(ServiceCode="AmazonEC2", Filters=filters)
        for page in pages:
            for text in page.get("PriceList", []):
                product = json.loads(text) if isinstance(text, str) else text
                for term in product.get("terms", {}).get("OnDemand", {}).values():
                    for dimension in term.get("priceDimensions", {}).values():
                        usd = float(dimension.get("pricePerUnit", {}).get("USD", 0) or 0)
                        if usd > 0:
                            found[instance_type] = usd
    return found


def _reason(exc: Exception) -> str:
    """An AWS error's code (or HTTP status), never its body: a local endpoint may answer with a whole page."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return str(error.get("Code") or f"HTTP {status}")
    return type(exc).__name__


def aws_prices(session: Any, region: str, instance_types: Iterable[str]) -> PriceTable:
    """Today's prices for ``instance_types`` in ``region``, read from AWS with ``session``'s credentials."""
    types = sorted(set(instance_types))
    try:
        spot = spot_prices(session.client("ec2", region_name=region), types)
    except (ClientError, BotoCoreError) as exc:
        raise PriceError(f"EC2 DescribeSpotPriceHistory in {region} failed ({_reason(exc)})") from None
    try:
        # The Price List API answers in us-east-1 (and a few other regions), for every region.
        on_demand = on_demand_prices(session.client("pricing", region_name="us-east-1"), region, types)
    except (ClientError, BotoCoreError) as exc:
        raise PriceError(
            f"the AWS Price List API (pricing:GetProducts) failed ({_reason(exc)}); pass --prices FILE instead"
        ) from None
    missing = [t for t in types if t not in spot or t not in on_demand]
    if missing:
        raise PriceError(
            f"AWS gave no {'spot' if missing[0] not in spot else 'on-demand'} price for {missing[0]} in {region}"
        )
    table = {region: {t: {"on_demand": on_demand[t], "spot": spot[t]} for t in types}}
    return PriceTable(
        table, as_of=datetime.now(UTC).date().isoformat(), source="AWS (Price List API, spot price history)"
    )

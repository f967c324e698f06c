"""``--prices aws`` against the local AWS: the spot price history is read; the Price List API, which moto does not
serve, fails with an error that says which API and what to do instead."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner

from fleetctl.cli import main
from fleetctl.sandbox.local_aws import LocalAws
from fleetctl.simulate.prices import PriceError, aws_prices, spot_prices

pytestmark = pytest.mark.timeout(60)


def test_spot_prices_are_read_from_the_spot_price_history(local_aws: LocalAws) -> None:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    prices = spot_prices(ec2, ["m5.large", "m6i.large"])
    assert set(prices) == {"m5.large", "m6i.large"}
    assert all(price > 0 for price in prices.values())


def test_without_the_price_list_api_the_error_names_it_and_the_way_out(local_aws: LocalAws) -> None:
    with pytest.raises(PriceError, match=r"Price List API \(pricing:GetProducts\).*--prices FILE"):
        aws_prices(boto3.Session(), "us-east-1", ["m5.large"])


def test_the_command_line_reports_the_same(local_aws: LocalAws, tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text('{"id": 1, "pending_at": 1767607200, "duration": 60, "tags": ["docker"]}\n')
    result = CliRunner().invoke(
        main, ["simulate", "--history", str(history), "--config", "chalicelib/stages/dev.yaml", "--prices", "aws"]
    )
    assert result.exit_code == 1
    assert "Price List API" in result.output and "--prices FILE" in result.output

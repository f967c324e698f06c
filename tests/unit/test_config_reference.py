"""docs/configuration.md is the stage file's models in words, and stays so: a stale file fails here."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import BaseModel, Field, Strict

from chalicelib.config import parse_config
from fleetctl.config_reference import REFERENCE_PATH, REGENERATE, ConfigReferenceError, render

PROJECT = Path(__file__).parents[2]
DEV_STAGE = PROJECT / "chalicelib" / "stages" / "dev.yaml"


def test_the_committed_reference_is_current() -> None:
    # given the models as they are now / when the reference is rendered
    rendered = render()

    # then docs/configuration.md says exactly that
    committed = REFERENCE_PATH.read_text(encoding="utf-8") if REFERENCE_PATH.is_file() else ""
    assert committed == rendered, (
        f"{REFERENCE_PATH.relative_to(PROJECT)} is stale after a change to chalicelib/config.py: run '{REGENERATE}' "
        "and commit the result"
    )


def _keys(data: Any, path: str = "") -> Iterator[str]:
    """Every key path of a stage file, lists written as ``[]``: ``pools[].warm.windows[].start``."""
    if isinstance(data, dict):
        for key, value in data.items():
            child = f"{path}.{key}" if path else key
            yield child
            yield from _keys(value, child)
    elif isinstance(data, list):
        for item in data:
            yield from _keys(item, f"{path}[]")


def test_every_key_of_the_complete_example_is_documented_with_its_description() -> None:
    # given dev.yaml, which writes out every key a stage file may hold
    keys = set(_keys(yaml.safe_load(DEV_STAGE.read_text())))

    # when the reference is rendered
    reference = render()

    # then each key has its row, and each row its description
    assert "pools[].warm.windows[].timezone" in keys
    rows = {
        cells[0].strip("`"): cells
        for line in reference.splitlines()
        if line.startswith("| `") and (cells := [cell.strip() for cell in line.strip("|").split(" | ")])
    }
    assert sorted(keys - rows.keys()) == []
    assert all(len(rows[key]) == 5 and rows[key][4] not in ("", "-") for key in keys)


def test_a_row_states_the_type_default_and_bounds_that_validation_applies() -> None:
    reference = render()

    row = next(line for line in reference.splitlines() if line.startswith("| `pools[].idle_wait_seconds` |"))
    assert "| integer | `600` | 30 to 86,400 |" in row
    row = next(line for line in reference.splitlines() if line.startswith("| `pools[].market` |"))
    assert "one of `spot`, `on-demand` | `spot`" in row
    row = next(line for line in reference.splitlines() if line.startswith("| `pools[].max_builds` |"))
    assert "| 10, or 1 when ephemeral |" in row
    row = next(line for line in reference.splitlines() if line.startswith("| `pools[].subnets` |"))
    assert "*required*" in row and "no duplicate subnet; at least one" in row


def test_the_default_stated_for_max_builds_is_what_validation_fills_in() -> None:
    # max_builds' default is the one written out by hand (a before-validator fills it), so it is checked here
    data = yaml.safe_load(DEV_STAGE.read_text())
    for pool in data["pools"]:
        pool.pop("max_builds", None)

    config = parse_config(data)

    assert {pool.name: pool.max_builds for pool in config.pools} == {"docker": 10, "build": 1}


class _Undescribed(BaseModel):
    name: str = Field(description="Named.")
    size: Annotated[int, Strict()] = 0


def test_a_field_without_a_description_stops_the_rendering_naming_it() -> None:
    with pytest.raises(ConfigReferenceError, match=r"_Undescribed\.size has no description"):
        render(_Undescribed)


def test_check_exits_1_on_a_stale_file_and_regenerating_makes_it_current(tmp_path: Path) -> None:
    # given a reference that is out of date
    target = tmp_path / "configuration.md"
    target.write_text("# an old reference\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleetctl.config_reference", "--path", str(target), *args],
            capture_output=True,
            text=True,
            cwd=PROJECT,
            check=False,
        )

    # when it is checked, then regenerated, then checked again
    stale = run("--check")
    written = run()
    current = run("--check")

    # then the check names the command that fixes it, and the regenerated file passes
    assert stale.returncode == 1
    assert REGENERATE in stale.stderr
    assert written.returncode == 0 and target.read_text(encoding="utf-8") == render()
    assert current.returncode == 0

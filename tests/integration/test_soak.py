"""A two-minute soak (``fleetctl.sandbox.soak``; ``make soak`` runs ten): the whole sandbox under load with every
fault the soak injects, and then every job accounted for, no invariant violated, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.sandbox.soak import run_soak

SEED = 16


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_two_minute_soak_accounts_for_every_job_and_leaves_nothing_behind(tmp_path: Path) -> None:
    summary = run_soak(2.0, SEED, workdir=tmp_path / "soak")

    assert summary["ok"], json.dumps(summary, sort_keys=True)
    assert summary["jobs"].get("succeeded", 0) > 0 and sum(summary["faults"].values()) > 0

"""Job histories in and out: the JSONL and CSV schema, a malformed file's error naming its line, the reference
trace generator's shapes, and the ``fleetctl simulate`` commands on files."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from fleetctl.cli import main
from fleetctl.simulate.generate import TraceSettings, generate
from fleetctl.simulate.history import HistoryError, load_history, write_history

ROOT = Path(__file__).resolve().parents[2]
DEV = str(ROOT / "chalicelib" / "stages" / "dev.yaml")


def test_jsonl_history_is_read_with_iso_or_epoch_times_and_sorted(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"id": 2, "pending_at": "2026-01-05T10:00:10Z", "duration": 30, "tags": ["docker"]}\n'
        "\n"
        '{"id": 1, "pending_at": 1767607200, "duration": 12.5, "tags": [], "stage": "test", "pipeline_id": 7}\n'
        '{"id": 3, "created_at": "2026-01-05T10:00:00Z", "started_at": "2026-01-05T10:01:00Z",'
        ' "queued_duration": 20, "duration": 5}\n'
        '{"id": 4, "pending_at": 1767607200, "duration": 0, "status": "skipped"}\n'
    )
    jobs = load_history(path)
    assert [job.id for job in jobs] == [1, 2, 3]  # the skipped job never ran
    assert jobs[0].pending_at == datetime(2026, 1, 5, 10, 0, tzinfo=UTC).timestamp()
    assert jobs[1].tags == ("docker",)
    assert jobs[2].pending_at == datetime(2026, 1, 5, 10, 0, 40, tzinfo=UTC).timestamp()  # started - queued


def test_csv_history_takes_tags_comma_separated(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text('id,pending_at,duration,tags,project_id\n1,2026-01-05T10:00:00Z,30,"docker,linux",4\n')
    (job,) = load_history(path)
    assert (job.tags, job.project_id, job.duration) == (("docker", "linux"), 4, 30.0)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "line 2: Expecting property name"),
        ('{"id": 2, "duration": 3}', "line 2: pending_at"),
        ('{"id": 2, "pending_at": "yesterday", "duration": 3}', "line 2: pending_at must be an ISO 8601 time"),
        ('{"id": 2, "pending_at": "2026-01-05T10:00:00", "duration": 3}', "line 2: pending_at must carry a time zone"),
        ('{"id": 2, "pending_at": 5, "duration": -3}', "line 2: duration must not be negative"),
        ('{"id": 2, "pending_at": 5, "duration": 3, "tags": 7}', "line 2: tags must be a list"),
        ('{"id": 2, "pending_at": 5, "duration": 3, "colour": "red"}', "line 2: unknown field 'colour'"),
        ("[1, 2]", "line 2: a line must be a JSON object"),
    ],
)
def test_a_malformed_history_names_the_file_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"id": 1, "pending_at": 5, "duration": 3}\n' + line + "\n")
    with pytest.raises(HistoryError) as caught:
        load_history(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_a_malformed_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    path.write_text("id,pending_at,duration\n1,5,3\n2,5,lots\n")
    with pytest.raises(HistoryError, match=r"history\.csv, line 3: duration must be a number"):
        load_history(path)


def test_the_reference_trace_is_reproducible_and_round_trips(tmp_path: Path) -> None:
    first = generate(TraceSettings(jobs=500, seed=4))
    assert first == generate(TraceSettings(jobs=500, seed=4))
    assert first != generate(TraceSettings(jobs=500, seed=5))
    path = tmp_path / "trace.jsonl"
    write_history(first, path)
    assert load_history(path) == first


def test_the_reference_trace_has_working_day_peaks_stages_in_order_a_long_tail_and_a_tag_mix() -> None:
    zone = ZoneInfo("Europe/Berlin")
    jobs = generate(TraceSettings(jobs=20000, seed=1, timezone="Europe/Berlin"))
    local = [datetime.fromtimestamp(job.pending_at, zone) for job in jobs]
    weekday_office = sum(1 for t in local if t.weekday() < 5 and 9 <= t.hour < 17)
    weekday_night = sum(1 for t in local if t.weekday() < 5 and (t.hour < 6 or t.hour >= 22))
    assert weekday_office > 8 * weekday_night
    # pipelines: a later stage's jobs become pending after the earlier stage's jobs are done
    order = {"build": 0, "test": 1, "deploy": 2}
    by_pipeline: dict[int, list[tuple[int, float, float]]] = {}
    for job in jobs:
        by_pipeline.setdefault(job.pipeline_id, []).append((order[job.stage], job.pending_at, job.duration))
    for stages in by_pipeline.values():
        for stage, pending, _ in stages:
            earlier = [p + d for s, p, d in stages if s < stage]
            assert all(pending >= end for end in earlier)
    fan_out = Counter((job.pipeline_id, job.stage) for job in jobs)
    assert max(fan_out.values()) >= 6
    durations = sorted(job.duration for job in jobs)
    median, p99 = durations[len(durations) // 2], durations[int(len(durations) * 0.99)]
    assert p99 > 5 * median  # the long tail
    tags = Counter(job.tags for job in jobs)
    assert {(), ("docker",), ("docker", "linux"), ("dind", "docker"), ("release",)} <= set(tags)


def test_generate_then_simulate_from_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    trace = tmp_path / "trace.jsonl"
    generated = runner.invoke(main, ["simulate", "generate", "--jobs", "300", "--seed", "3", "--out", str(trace)])
    assert generated.exit_code == 0, generated.output
    assert len(trace.read_text().splitlines()) == 300
    page = tmp_path / "report.html"
    result = runner.invoke(
        main,
        [
            "simulate",
            "--history",
            str(trace),
            "--config",
            DEV,
            "--vary",
            "pools.docker.idle_wait_seconds=60,600",
            "--vary",
            "pools.docker.warm.size=0,2",
            "--html",
            str(page),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert len(document["runs"]) == 4 and document["pareto"]
    run = document["runs"][0]
    assert run["settings"]["vary"] == {"pools.docker.idle_wait_seconds": 60, "pools.docker.warm.size": 0}
    assert {"cost", "floor_cost", "cost_over_floor", "queue_wait_seconds", "peak_instances"} <= set(run["total"])
    assert {"ec2:CreateFleet", "gitlab:POST /user/runners"} <= {r["operation"] for r in run["api_calls_per_minute"]}
    html = page.read_text()
    assert "<svg" in html and "pools.docker.idle_wait_seconds" in html
    assert "<script" not in html and "src=" not in html and "href=" not in html  # self-contained


def test_the_command_line_names_a_malformed_line_and_an_unknown_setting(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "pending_at": 5, "duration": 3}\n{"id": 2}\n')
    result = runner.invoke(main, ["simulate", "--history", str(bad), "--config", DEV])
    assert result.exit_code == 1 and "bad.jsonl, line 2" in result.output
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "pending_at": 5, "duration": 3}\n')
    unknown = runner.invoke(main, ["simulate", "--history", str(good), "--config", DEV, "--vary", "pools.gpu.size=1"])
    assert unknown.exit_code == 1 and "no pool named 'gpu'" in unknown.output
    refused = runner.invoke(
        main, ["simulate", "--history", str(good), "--config", DEV, "--vary", "pools.docker.idle_wait_seconds=5"]
    )
    assert refused.exit_code == 1 and "idle_wait_seconds" in refused.output

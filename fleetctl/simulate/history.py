"""Job histories: the simulator's input, read from JSONL or CSV files (docs/simulate.md has the schema).

A job is pending from ``pending_at`` (epoch seconds) and runs ``duration`` seconds once a runner takes it. A
malformed line fails the whole file with a :class:`HistoryError` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from chalicelib.errors import RunnerFleetError

# Jobs in these states never ran on a runner: nothing to replay.
NEVER_RAN = frozenset({"created", "manual", "skipped", "scheduled", "waiting_for_resource"})
FIELDS = ("id", "project_id", "pipeline_id", "stage", "name", "pending_at", "duration", "tags", "status")


class HistoryError(RunnerFleetError):
    """A history file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class HistoryJob:
    id: int
    pending_at: float
    duration: float
    tags: tuple[str, ...] = ()
    project_id: int = 0
    pipeline_id: int = 0
    stage: str = ""
    name: str = ""
    status: str = "success"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        data["pending_at"] = iso(self.pending_at)
        return data


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _time(value: Any, field: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be an ISO 8601 time or epoch seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{field} must be an ISO 8601 time or epoch seconds, got {value!r}") from None
        if parsed.tzinfo is None:
            raise ValueError(f"{field} must carry a time zone (Z or +hh:mm), got {value!r}")
        return parsed.timestamp()
    raise ValueError(f"{field} is required")


def _number(value: Any, field: str, *, integer: bool = False, default: float | None = None) -> float:
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{field} is required")
        return default
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a number, got {value!r}")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{field} must not be negative, got {value!r}")
    return number


def _tags(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = value.replace(";", ",").split(",")
        return tuple(sorted({part.strip() for part in parts if part.strip()}))
    if isinstance(value, list) and all(isinstance(tag, str) for tag in value):
        return tuple(sorted({tag.strip() for tag in value if tag.strip()}))
    raise ValueError(f"tags must be a list of strings or a comma-separated string, got {value!r}")


def job_from(values: Mapping[str, Any]) -> HistoryJob:
    """A job from one record's fields; raises ValueError naming the field at fault."""
    unknown = sorted(set(values) - set(FIELDS) - {"created_at", "queued_duration", "started_at"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if values.get("pending_at") not in (None, ""):
        pending = _time(values["pending_at"], "pending_at")
    elif values.get("started_at") not in (None, "") and values.get("queued_duration") not in (None, ""):
        # GitLab's own figures: the job was pending queued_duration seconds before it started.
        pending = _time(values["started_at"], "started_at") - _number(values["queued_duration"], "queued_duration")
    else:
        pending = _time(values.get("created_at"), "pending_at (or created_at)")
    return HistoryJob(
        id=int(_number(values.get("id"), "id", integer=True)),
        pending_at=pending,
        duration=_number(values.get("duration"), "duration"),
        tags=_tags(values.get("tags")),
        project_id=int(_number(values.get("project_id"), "project_id", integer=True, default=0)),
        pipeline_id=int(_number(values.get("pipeline_id"), "pipeline_id", integer=True, default=0)),
        stage=str(values.get("stage") or ""),
        name=str(values.get("name") or ""),
        status=str(values.get("status") or "success"),
    )


def _jsonl(stream: TextIO, source: str) -> Iterator[HistoryJob]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
            if not isinstance(values, dict):
                raise ValueError("a line must be a JSON object")
            yield job_from(values)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise HistoryError(f"{source}, line {number}: {exc}") from None


def _csv(stream: TextIO, source: str) -> Iterator[HistoryJob]:
    reader = csv.DictReader(stream)
    if reader.fieldnames is None:
        return
    for row in reader:
        try:
            if None in row:
                raise ValueError("more values than the header names")
            yield job_from({key: value for key, value in row.items() if value is not None})
        except ValueError as exc:
            raise HistoryError(f"{source}, line {reader.line_num}: {exc}") from None


def load_history(path: str | Path) -> list[HistoryJob]:
    """The jobs of a ``.jsonl`` or ``.csv`` file that ran (see :data:`NEVER_RAN`), ordered by pending time."""
    source = str(path)
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            reader = _csv if source.lower().endswith(".csv") else _jsonl
            jobs = [job for job in reader(stream, source) if job.status not in NEVER_RAN]
    except OSError as exc:
        raise HistoryError(f"{source}: {exc.strerror or exc}") from None
    return sorted(jobs, key=lambda job: (job.pending_at, job.id))


def write_history(jobs: Iterable[HistoryJob], path: str | Path) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as stream:
        for job in jobs:
            stream.write(json.dumps(job.as_json(), separators=(",", ":")) + "\n")
            written += 1
    return written

"""``fleetctl image``: each pool's CI image as its image record holds it, and the operator's commands on it.

* ``history``: the current digest (what promoted it and when, its scan counts), a candidate awaiting its scan,
  whether the pool is pinned (and a push that waits for the unpin), a warning when ECR deleted the current
  digest, the launch template version scale-up launches from, then every digest the pool was offered, newest
  first;
* ``rollback``: pins a digest the pool ran before and rolls it out (:meth:`ImageRotation.rollback`);
* ``pin``: pins a digest ECR has in the pool's repository and rolls it out; a digest ECR does not have is refused
  before anything is written;
* ``unpin``: pushes count again; a push that came while pinned is decided now.

The commands go through :class:`~chalicelib.images.rotation.ImageRotation`, built here as the Lambdas build it
(``chalicelib.runtime.image_rotation``) but from the stage file and fleetctl's own clients, so an operator's
rollback writes the record and the launch template version exactly as a promotion does. Times are shown in UTC,
ISO 8601.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import AwsClients, error_code
from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.images.decisions import Verdict
from chalicelib.images.record import ImageRecord, Version
from chalicelib.images.rotation import ImageRotation, ImageRotationError, PoolOutcome
from chalicelib.images.store import ImageStore

DIGEST_PREFIX = "sha256:"
# How many characters of a digest a one-line summary shows: the algorithm and 8 hex digits.
SHORT_DIGEST = len(DIGEST_PREFIX) + 8


def fleet_account(clients: AwsClients) -> str:
    """The account fleetctl's credentials belong to (GetCallerIdentity needs no permission)."""
    return str(clients.client("sts").get_caller_identity()["Account"])


def image_rotation(config: FleetConfig, clients: AwsClients) -> ImageRotation:
    """The image rotation service over the stage's table and EC2, as ``chalicelib.runtime`` builds it."""
    return ImageRotation(
        config,
        ImageStore(config.state.table, clients.dynamodb),
        clients.ec2,
        account=lambda: fleet_account(clients),
        region=clients.ec2.meta.region_name,
        ecr=lambda: clients.client("ecr"),
    )


def ecr_client(clients: AwsClients, pool: PoolConfig) -> Any:
    """An ECR client in the region of the pool's registry: the pool's own region when it names one."""
    region = pool.image.region
    if region is None or region == clients.ec2.meta.region_name:
        return clients.client("ecr")
    return AwsClients(region=region).client("ecr")


def registry_id(pool: PoolConfig) -> dict[str, str]:
    """``registryId`` for ECR calls: the pool's registry account when it names one (else ECR takes the caller's)."""
    return {"registryId": pool.image.account} if pool.image.account else {}


@dataclass(frozen=True)
class EcrImage:
    """An image ECR has: its digest, its first tag ("" when untagged) and when it was pushed."""

    digest: str
    tag: str
    pushed_at: float

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> EcrImage:
        pushed = detail.get("imagePushedAt")
        pushed_at = pushed.timestamp() if isinstance(pushed, datetime) else float(pushed or 0)
        tags = detail.get("imageTags") or [""]
        return cls(str(detail["imageDigest"]), str(tags[0]), pushed_at)

    def version(self) -> Version:
        return Version(self.digest, self.tag, self.pushed_at)


def find_digest(clients: AwsClients, pool: PoolConfig, digest: str) -> EcrImage:
    """The image ``digest`` in the pool's repository; :class:`ImageRotationError` naming the repository when ECR
    does not have it."""
    repository = pool.image.repository
    where = f"ECR repository {repository}" + (f" of account {pool.image.account}" if pool.image.account else "")
    if not digest.startswith(DIGEST_PREFIX) or len(digest) == len(DIGEST_PREFIX):
        raise ImageRotationError(f"{digest!r} is not an image digest (sha256:<64 hex digits>)")
    try:
        found = ecr_client(clients, pool).describe_images(
            repositoryName=repository, imageIds=[{"imageDigest": digest}], **registry_id(pool)
        )["imageDetails"]
    except ClientError as exc:
        code = error_code(exc)
        if code == "RepositoryNotFoundException":
            raise ImageRotationError(f"no {where}; nothing was changed") from None
        if code in ("ImageNotFoundException", "InvalidParameterException"):
            raise ImageRotationError(f"{where} has no image {digest}; nothing was changed") from None
        raise
    if not found:
        raise ImageRotationError(f"{where} has no image {digest}; nothing was changed")
    return EcrImage.from_detail(found[0])


# -- the commands -------------------------------------------------------------------------------------------------


class ImageCommands:
    """What ``fleetctl image`` does, each command returning the lines it prints."""

    def __init__(self, config: FleetConfig, clients: AwsClients, rotation: ImageRotation | None = None) -> None:
        self._config = config
        self._clients = clients
        self._rotation = rotation or image_rotation(config, clients)

    def pool(self, name: str) -> PoolConfig:
        return self._rotation.pool(name)

    def history(self, pool: str) -> ImageRecord:
        return self._rotation.history(pool)

    def rollback(self, pool: str, to: str | None = None) -> list[str]:
        before = self._rotation.history(pool)
        outcome = self._rotation.rollback(pool, to)
        lines = [_moved(outcome, before, "rolled back")]
        return [*lines, *_pinned_until(pool)]

    def pin(self, pool: str, digest: str) -> list[str]:
        config = self.pool(pool)
        found = find_digest(self._clients, config, digest)
        before = self._rotation.history(pool)
        outcome = self._rotation.pin(pool, found.digest, found.tag, found.pushed_at)
        return [_moved(outcome, before, "pinned"), *_pinned_until(pool)]

    def unpin(self, pool: str) -> list[str]:
        before = self._rotation.history(pool)
        if not before.pinned:
            return [f"pool {pool} is not pinned; nothing changed"]
        outcome = self._rotation.unpin(pool)
        deferred = before.deferred
        if deferred is None:
            return [f"pool {pool} unpinned: no push came while it was pinned; the next push is decided as it comes"]
        push = f"the push of {deferred.digest} (tag {deferred.tag}, {iso(deferred.pushed_at)})"
        if outcome.verdict is Verdict.PROMOTED:
            version = f"launch template version {outcome.template_version}"
            return [
                f"pool {pool} unpinned: {push} that came while it was pinned is promoted, {version}; runners "
                "launched from other versions are retired once idle"
            ]
        if outcome.verdict is Verdict.AWAITING_SCAN:
            after = self._rotation.history(pool)
            deadline = f" until {iso(after.candidate.deadline)}" if after.candidate else ""
            return [f"pool {pool} unpinned: {push} that came while it was pinned awaits its scan{deadline}"]
        after = self._rotation.history(pool)
        entry = after.known(deferred.digest)
        why = entry.reason if entry is not None and entry.reason else _why_nothing(after, deferred.digest)
        return [f"pool {pool} unpinned: {push} that came while it was pinned changes nothing ({why})"]


def _why_nothing(record: ImageRecord, digest: str) -> str:
    if record.current is not None and record.current.digest == digest:
        return "it is the current digest"
    entry = record.known(digest)
    return entry.outcome.value if entry is not None else "nothing to do"


def _moved(outcome: PoolOutcome, before: ImageRecord, what: str) -> str:
    previous = before.current.digest if before.current else None
    if outcome.verdict is not Verdict.PROMOTED:
        return f"pool {outcome.pool} already runs {outcome.digest}; it is pinned to it"
    source = f" from {previous}" if previous else ""
    return (
        f"pool {outcome.pool} {what}{source} to {outcome.digest}: launch template version "
        f"{outcome.template_version} is the pool's; runners launched from other versions are retired once idle"
    )


def _pinned_until(pool: str) -> list[str]:
    return [f"pool {pool} is pinned: pushes wait until 'fleetctl image unpin {pool}'"]


# -- rendering ----------------------------------------------------------------------------------------------------


def iso(timestamp: float | None) -> str:
    """Epoch seconds as ISO 8601 UTC to the second; "-" for none."""
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_digest(digest: str) -> str:
    return f"{digest[:SHORT_DIGEST]}…" if len(digest) > SHORT_DIGEST else digest


def counts_text(counts: tuple[tuple[str, int], ...] | None) -> str:
    """A scan's findings by severity; "-" when no scan is known, "clean" for a scan with no finding."""
    if counts is None:
        return "-"
    found = [f"{severity} {n}" for severity, n in counts if n]
    return ", ".join(found) if found else "clean"


def version_document(version: Version) -> dict[str, Any]:
    return {
        "digest": version.digest,
        "tag": version.tag,
        "pushed_at": iso(version.pushed_at),
        "outcome": version.outcome.value,
        "promoted_at": iso(version.promoted_at) if version.promoted_at else None,
        "by": version.by.value if version.by else None,
        "counts": dict(version.counts) if version.counts is not None else None,
        "reason": version.reason,
    }


def record_document(record: ImageRecord) -> dict[str, Any]:
    """``image history --json``: one stable object; times ISO 8601 UTC, absent things null."""
    candidate = record.candidate
    deferred = record.deferred
    return {
        "pool": record.pool,
        "current": version_document(record.current) if record.current else None,
        "current_deleted_at": iso(record.current_deleted_at) if record.current_deleted_at else None,
        "candidate": (
            {
                "digest": candidate.digest,
                "tag": candidate.tag,
                "pushed_at": iso(candidate.pushed_at),
                "state": candidate.state.value,
                "deadline": iso(candidate.deadline),
            }
            if candidate
            else None
        ),
        "pinned": record.pinned,
        "deferred": (
            {"digest": deferred.digest, "tag": deferred.tag, "pushed_at": iso(deferred.pushed_at)} if deferred else None
        ),
        "template_version": record.template_version,
        "history": [version_document(version) for version in record.history],
    }


def history_summary(record: ImageRecord, pool: PoolConfig) -> list[str]:
    """The lines above the history table (plain text, no markup)."""
    image = f"{pool.image.repository}:{pool.image.tag}"
    lines = [f"pool {record.pool}: image {image}"]
    current = record.current
    if current is None:
        lines.append("current:   none (no digest promoted or recorded yet)")
    else:
        by = current.by.value if current.by else "-"
        lines.append(
            f"current:   {current.digest} (tag {current.tag}), promoted {iso(current.promoted_at)} by {by}, "
            f"scan {counts_text(current.counts)}"
        )
    if record.current_deleted_at is not None:
        lines.append(
            f"WARNING:   ECR deleted the current digest at {iso(record.current_deleted_at)}: runners keep their "
            "pulled copy, but a new runner would fail to pull it; push a new image or roll back"
        )
    candidate = record.candidate
    if candidate is None:
        lines.append("candidate: none")
    else:
        lines.append(
            f"candidate: {candidate.digest} (tag {candidate.tag}, pushed {iso(candidate.pushed_at)}) "
            f"{candidate.state.value}, deadline {iso(candidate.deadline)}"
        )
    if not record.pinned:
        lines.append("pinned:    no")
    else:
        waiting = ""
        if record.deferred is not None:
            deferred = record.deferred
            waiting = f"; a push of {deferred.digest} (tag {deferred.tag}, {iso(deferred.pushed_at)}) waits for it"
        lines.append(f"pinned:    yes, until 'fleetctl image unpin {record.pool}'{waiting}")
    template = str(record.template_version) if record.template_version is not None else "none recorded"
    lines.append(f"launch template version: {template}")
    return lines


HISTORY_COLUMNS = ("digest", "tag", "pushed at", "outcome", "promoted at", "by", "scan", "reason")


def history_rows(record: ImageRecord) -> list[tuple[str, ...]]:
    """The history table's rows, newest first."""
    return [
        (
            version.digest,
            version.tag,
            iso(version.pushed_at),
            version.outcome.value,
            iso(version.promoted_at),
            version.by.value if version.by else "-",
            counts_text(version.counts),
            version.reason or "",
        )
        for version in record.history
    ]


def print_history(record: ImageRecord, pool: PoolConfig) -> None:
    """``image history`` for people: the summary lines, then the history as a table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        # Piped or captured: no terminal to fit, and a digest cut or folded is no use to copy.
        console.width = 240
    for line in history_summary(record, pool):
        style = "bold red" if line.startswith("WARNING") else None
        console.print(line, soft_wrap=True, markup=False, highlight=False, style=style)
    if not record.history:
        console.print("history:   none", markup=False)
        return
    console.print("history, newest first:", markup=False)
    table = Table(*HISTORY_COLUMNS)
    table.columns[0].no_wrap = True
    table.columns[0].min_width = len(DIGEST_PREFIX) + 64
    for row in history_rows(record):
        table.add_row(*row)
    console.print(table)

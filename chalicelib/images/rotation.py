"""Image rotation: carry out what :mod:`chalicelib.images.decisions` decides for each pool an image event concerns.

A promotion, in this order, each step safe to repeat:

1. a new launch template version: the data of the version the pool launches from now, with user data rendered
   for ``registry/repository@sha256:...`` (:func:`chalicelib.scaling.templates.template_data`); its ClientToken
   derives from the pool, digest and source version, so a retry after a lost answer gets the same version back;
2. one transaction: the image record (conditioned on its revision) and the pool's counter item naming the new
   version; a writer that lost the race reads again and decides again on what the winner wrote (the version it
   made in step 1 is left unused, as a template may be);
3. the new version becomes the template's default (for anyone launching from the template by hand, and for
   reconcile's view of it).

From step 2 on, scale-up launches from the new version and reconcile retires the runners launched from any other
(paused busy or idle, deleted once running nothing: :mod:`chalicelib.lifecycle.rules`); reconcile also makes the
pool's version the default when step 3 did not happen. Nothing else moves: a running job finishes on the image it
started with.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.config import FleetConfig, PoolConfig
from chalicelib.errors import RetryableError, RunnerFleetError
from chalicelib.images import decisions
from chalicelib.images.decisions import Decision, Verdict
from chalicelib.images.events import ImageEvent
from chalicelib.images.record import ImageRecord, PromotedBy, Version
from chalicelib.images.store import ImageStore
from chalicelib.naming import launch_template_name
from chalicelib.observability import count, logger
from chalicelib.scaling.templates import template_data
from chalicelib.scaling.userdata import image_reference

_DECIDE_ATTEMPTS = 5
_LOUD = {
    Verdict.REJECTED: "ImageRejected",
    Verdict.CURRENT_DELETED: "CurrentImageDeleted",
    Verdict.SCAN_TIMEOUT: "ImageScanTimeout",
    Verdict.CURRENT_FAILS_SCAN: "CurrentImageFailsScan",
}


class ImageRotationError(RunnerFleetError):
    """An operator command that cannot be carried out (no such pool, no such digest)."""


@dataclass(frozen=True)
class PoolOutcome:
    pool: str
    verdict: Verdict
    digest: str
    template_version: int | None = None
    reason: str = ""


def registry_host(pool: PoolConfig, account: str, region: str) -> str:
    """The ECR registry of the pool's image: another account's when the pool names one, else the fleet's."""
    return f"{pool.image.account or account}.dkr.ecr.{pool.image.region or region}.amazonaws.com"


class ImageRotation:
    """Applies image events and operator commands to the pools' records and launch templates.

    ``account`` gives the fleet's own AWS account id (called at most once, when a pool's registry needs it).
    """

    def __init__(
        self,
        config: FleetConfig,
        store: ImageStore,
        ec2: Any,
        *,
        account: Callable[[], str],
        region: str,
        ecr: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._ecr_source = ecr
        self._store = store
        self._ec2 = ec2
        self._account_source = account
        self._account: str | None = None
        self._region = region
        self._clock = clock

    def _ecr(self) -> Any:
        if self._ecr_source is None:
            raise ImageRotationError("this image rotation was built without an ECR client")
        return self._ecr_source()

    @property
    def account(self) -> str:
        if self._account is None:
            self._account = self._account_source()
        return self._account

    def pool(self, name: str) -> PoolConfig:
        for pool in self._config.pools:
            if pool.name == name:
                return pool
        raise ImageRotationError(f"no pool {name!r} in the {self._config.fleet} configuration")

    # -- events -------------------------------------------------------------------------------------------------

    def handle(self, event: ImageEvent) -> list[PoolOutcome]:
        """Apply one event to every pool it concerns; an event no pool uses is counted and logged, not an error."""
        pools = [
            pool
            for pool in self._config.pools
            if decisions.concerns(pool, event, account=self.account, region=self._region)
        ]
        facts = {
            "event_id": event.event_id,
            "kind": event.kind.value,
            "repository": event.repository,
            "digest": event.digest,
            "tags": list(event.tags),
            "account": event.account,
            "region": event.region,
        }
        if not pools:
            count("ImageEventsIgnored")
            logger.info("image event for no pool's image", extra=facts)
            return []
        now = self._clock()
        outcomes = []
        for pool in pools:

            def decided(record: ImageRecord, pool: PoolConfig = pool) -> Decision:
                tag = self._tag_digest(pool) if decisions.needs_tag(record, event) else None
                return decisions.decide(record, event, pool, now, tag)

            outcomes.append(self._apply(pool, decided, facts))
        return outcomes

    def expire_scans(self, pools: list[str]) -> list[PoolOutcome]:
        """Reconcile's check of the named pools' candidates: a scan past its deadline is reported, once."""
        now = self._clock()
        outcomes = []
        for name in pools:
            pool = self.pool(name)
            outcome = self._apply(pool, lambda record: decisions.expire(record, now), {"check": "scan timeout"})
            outcomes.append(outcome)
        return outcomes

    def _tag_digest(self, pool: PoolConfig) -> str | None:
        """The digest the pool's tag names in ECR now, or None when ECR cannot say (no permission on another
        account's repository, the tag gone)."""
        registry = {"registryId": pool.image.account} if pool.image.account else {}
        try:
            found = self._ecr().describe_images(
                repositoryName=pool.image.repository, imageIds=[{"imageTag": pool.image.tag}], **registry
            )["imageDetails"]
        except ClientError as exc:
            logger.warning(
                "ECR cannot say which digest the tag names; the larger digest wins",
                extra={"pool": pool.name, "error_code": error_code(exc)},
            )
            return None
        return str(found[0]["imageDigest"]) if found else None

    # -- operator commands --------------------------------------------------------------------------------------

    def history(self, pool: str) -> ImageRecord:
        return self._store.read(self.pool(pool).name)

    def pin(self, pool: str, digest: str, tag: str = "", pushed_at: float = 0.0) -> PoolOutcome:
        config = self.pool(pool)
        now = self._clock()
        return self._apply(
            config,
            lambda record: decisions.pin(record, digest, tag or config.image.tag, pushed_at or now, now),
            {"command": "pin", "digest": digest},
        )

    def rollback(self, pool: str, to: str | None = None) -> PoolOutcome:
        record = self.history(pool)
        target = decisions.rollback_target(record, to)
        if target is None:
            wanted = f"digest {to}" if to else "an earlier promoted digest"
            raise ImageRotationError(f"pool {pool} has no {wanted} in its history to roll back to")
        return self.pin(pool, target.digest, target.tag, target.pushed_at)

    def unpin(self, pool: str) -> PoolOutcome:
        config = self.pool(pool)
        now = self._clock()
        return self._apply(config, lambda record: decisions.unpin(record, config, now), {"command": "unpin"})

    def adopt(self, pool: str, version: Version, template_version: int) -> PoolOutcome:
        """Bootstrap's first digest (or a template version it wrote for the current one): the record names it, with
        no roll-out of its own (bootstrap made the template version itself). A pool that moved to another digest
        since bootstrap planned keeps it."""
        config = self.pool(pool)

        def adopted(record: ImageRecord) -> Decision:
            if record.current is not None and record.current.digest != version.digest:
                # A promotion came between bootstrap's plan and this write: the pool's digest is the newer one.
                return Decision(Verdict.SUPERSEDED, record, reason=f"the pool runs {record.current.digest} now")
            # A push event older than the adopted digest, arriving late, must not count as newer.
            at, digest = max((record.latest_push_at, record.latest_push_digest), (version.pushed_at, version.digest))
            record = replace(record, latest_push_at=at, latest_push_digest=digest)
            if record.current is not None:
                if record.template_version == template_version:
                    return Decision(Verdict.ALREADY_CURRENT, record)
                return Decision(Verdict.PROMOTED, replace(record, template_version=template_version))
            first = replace(version, promoted_at=self._clock(), by=PromotedBy.BOOTSTRAP)
            return Decision(
                Verdict.PROMOTED,
                replace(record.with_history(first), current=first, template_version=template_version),
            )

        return self._apply(config, adopted, {"command": "bootstrap"}, render=False)

    # -- the one write path -------------------------------------------------------------------------------------

    def _apply(
        self,
        pool: PoolConfig,
        decide: Callable[[ImageRecord], Decision],
        facts: dict[str, Any],
        *,
        render: bool = True,
    ) -> PoolOutcome:
        for _ in range(_DECIDE_ATTEMPTS):
            before = self._store.read(pool.name)
            decision = decide(before)
            after = decision.record
            if not decision.changed:
                return self._report(pool, decision, before, facts)
            if decision.promote is not None and render:
                version = self._new_template_version(pool, decision.promote, before.template_version)
                after = replace(after, template_version=version)
            if self._store.write(before, after):
                if after.template_version is not None and after.template_version != before.template_version:
                    self.make_default(pool.name, after.template_version)
                return self._report(pool, replace(decision, record=after), before, facts)
        raise RetryableError(f"pool {pool.name}'s image record kept changing under this write")

    def _new_template_version(self, pool: PoolConfig, version: Version, source: int | None) -> int:
        name = launch_template_name(self._config.fleet, pool.name)
        described = self._ec2.describe_launch_template_versions(
            LaunchTemplateName=name, Versions=[str(source) if source is not None else "$Default"]
        )["LaunchTemplateVersions"][0]
        base = described["LaunchTemplateData"]
        image_id = base["ImageId"]
        root_device = base["BlockDeviceMappings"][0]["DeviceName"]
        reference = image_reference(pool, registry_host(pool, self.account, self._region), version.digest)
        data = template_data(self._config, pool, image_id, root_device, reference)
        seed = f"{self._config.fleet}/{pool.name}/{version.digest}/{described['VersionNumber']}"
        created = self._ec2.create_launch_template_version(
            LaunchTemplateName=name,
            VersionDescription=f"runner-fleet image {version.digest}",
            LaunchTemplateData=data,
            ClientToken=hashlib.sha256(seed.encode()).hexdigest()[:64],
        )
        return int(created["LaunchTemplateVersion"]["VersionNumber"])

    def make_default(self, pool: str, version: int) -> None:
        name = launch_template_name(self._config.fleet, pool)
        try:
            self._ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion=str(version))
        except ClientError as exc:
            # The record names the version already; reconcile makes it the default on its next run.
            logger.warning(
                "launch template default not moved; reconcile moves it",
                extra={"pool": pool, "version": version, "error_code": error_code(exc)},
            )

    def _report(self, pool: PoolConfig, decision: Decision, before: ImageRecord, facts: dict[str, Any]) -> PoolOutcome:
        record = decision.record
        digest = (
            decision.promote.digest
            if decision.promote
            else (record.candidate.digest if record.candidate else str(facts.get("digest", "")))
        )
        extra = {
            **facts,
            "pool": pool.name,
            "verdict": decision.verdict.value,
            "reason": decision.reason,
            "current": record.current.digest if record.current else None,
            "previous": before.current.digest if before.current else None,
            "template_version": record.template_version,
        }
        metric = _LOUD.get(decision.verdict)
        if metric:
            count(metric)
            logger.error(f"image {decision.verdict.value}", extra=extra)
        elif decision.verdict is Verdict.PROMOTED:
            count("ImagePromoted")
            logger.info("image promoted", extra=extra)
        else:
            logger.info(f"image {decision.verdict.value}", extra=extra)
        return PoolOutcome(pool.name, decision.verdict, digest, record.template_version, decision.reason)

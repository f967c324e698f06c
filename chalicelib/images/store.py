"""The pools' image records in the fleet table, and the launch template version each pool launches from.

``IMAGE#<pool>`` holds the :class:`~chalicelib.images.record.ImageRecord`; the pool's counter item ``POOL#<pool>``
holds ``template_version`` (and ``image_digest``): the version scale-up launches from and reconcile keeps runners
on. Both are written in one transaction whose condition is the image record's ``revision``, so two handlers that
read the same record cannot both write their reading of it, and a pool never launches from a version its image
record does not name.

An image record with a candidate awaiting its scan carries the ``live`` attribute, so reconcile finds the scans
past their deadline in the index of live records it reads anyway, at no extra call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.images.record import CandidateState, ImageRecord
from chalicelib.scaling.store.table import cancellation_reasons, transiently_cancelled
from chalicelib.store import LIVE_ATTRIBUTE, conflict_backoff, from_item, pool_key
from chalicelib.store import to_item as _to_item

IMAGE_PREFIX = "IMAGE#"
_READ_BATCH = 100
_WRITE_ATTEMPTS = 6


def image_key(pool: str) -> str:
    return f"{IMAGE_PREFIX}{pool}"


def _decimals(value: Any) -> Any:
    """boto3 refuses floats anywhere in an item, nested ones included."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _decimals(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_decimals(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class ImageStore:
    """Reads and conditional writes of image records through the low-level DynamoDB client."""

    def __init__(self, table: str, client: Any, sleep: Callable[[float], None] = time.sleep) -> None:
        self.table = table
        self._client = client
        self._sleep = sleep

    def read(self, pool: str) -> ImageRecord:
        """The pool's record, read consistently (a decision is only as good as the record it starts from)."""
        found = self._client.get_item(TableName=self.table, Key={"pk": {"S": image_key(pool)}}, ConsistentRead=True)
        return ImageRecord.from_item(pool, _plain(from_item(found["Item"])) if "Item" in found else None)

    def read_many(self, pools: Iterable[str]) -> dict[str, ImageRecord]:
        """Every named pool's record, 100 a BatchGetItem, unprocessed keys asked again."""
        names = list(dict.fromkeys(pools))
        records = {name: ImageRecord(name) for name in names}
        for start in range(0, len(names), _READ_BATCH):
            keys = [{"pk": {"S": image_key(name)}} for name in names[start : start + _READ_BATCH]]
            request: dict[str, Any] = {self.table: {"Keys": keys, "ConsistentRead": True}}
            for attempt in range(_WRITE_ATTEMPTS):
                answer = self._client.batch_get_item(RequestItems=request)
                for item in answer.get("Responses", {}).get(self.table, []):
                    values = _plain(from_item(item))
                    pool = str(values["pk"]).removeprefix(IMAGE_PREFIX)
                    records[pool] = ImageRecord.from_item(pool, values)
                request = answer.get("UnprocessedKeys") or {}
                if not request:
                    break
                self._sleep(conflict_backoff(attempt))
            else:
                raise RuntimeError("the fleet table left image records unprocessed past every attempt")
        return records

    def write(self, before: ImageRecord, after: ImageRecord) -> bool:
        """Write ``after`` if the stored record is still ``before`` (its revision); False if another writer came
        first. When ``after`` names a new template version, the pool's counter item gets it in the same
        transaction."""
        values = after.as_item()
        values["revision"] = before.revision + 1
        item: dict[str, Any] = {"pk": image_key(after.pool), "kind": "image", **values}
        if after.candidate is not None and after.candidate.state is CandidateState.AWAITING_SCAN:
            item[LIVE_ATTRIBUTE] = "image"
        put: dict[str, Any] = {"TableName": self.table, "Item": _to_item(_decimals(item))}
        if before.revision == 0:
            put["ConditionExpression"] = "attribute_not_exists(pk)"
        else:
            put["ConditionExpression"] = "revision = :revision"
            put["ExpressionAttributeValues"] = {":revision": {"N": str(before.revision)}}
        writes: list[dict[str, Any]] = [{"Put": put}]
        if after.template_version is not None and after.template_version != before.template_version:
            digest = after.current.digest if after.current else ""
            writes.append(
                {
                    "Update": {
                        "TableName": self.table,
                        "Key": {"pk": {"S": pool_key(after.pool)}},
                        "UpdateExpression": "SET kind = :kind, #name = :name, #live = :kind, "
                        "template_version = :version, image_digest = :digest",
                        "ExpressionAttributeNames": {"#name": "name", "#live": LIVE_ATTRIBUTE},
                        "ExpressionAttributeValues": {
                            ":kind": {"S": "pool"},
                            ":name": {"S": after.pool},
                            ":version": {"N": str(after.template_version)},
                            ":digest": {"S": digest},
                        },
                    }
                }
            )
        return self._transact(writes)

    def _transact(self, writes: list[dict[str, Any]]) -> bool:
        """True once it applied, False when its condition failed (another writer came first); conflicts and
        throttling are tried again, with the fleet table's backoff (:mod:`chalicelib.scaling.store.table`)."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                self._client.transact_write_items(TransactItems=writes)
            except ClientError as exc:
                if error_code(exc) != "TransactionCanceledException":
                    raise
                if "ConditionalCheckFailed" in cancellation_reasons(exc):
                    return False
                if not transiently_cancelled(exc) or attempt + 1 == _WRITE_ATTEMPTS:
                    raise
                self._sleep(conflict_backoff(attempt))
                continue
            return True
        raise AssertionError("unreachable")  # pragma: no cover

    def template_version(self, pool: str) -> int | None:
        """The launch template version the pool's counter item names (None before the first promotion)."""
        found = self._client.get_item(
            TableName=self.table,
            Key={"pk": {"S": pool_key(pool)}},
            ProjectionExpression="template_version",
            ConsistentRead=True,
        )
        value = found.get("Item", {}).get("template_version", {}).get("N")
        return int(value) if value is not None else None

"""DynamoDB's global secondary indexes trail their table: a Query on a GSI can answer from before a write made a
moment ago; moto's indexes are the table itself.

Sources (the DynamoDB developer guide and API reference):

* "DynamoDB read consistency", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/HowItWorks.ReadConsistency.html:
  "All reads from GSIs and streams are eventually consistent"; an eventually consistent read "may not reflect
  the results of a recently completed write operation"; strongly consistent reads "from a global secondary index
  or DynamoDB stream are not supported".
* "Using Global Secondary Indexes in DynamoDB", https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/GSI.html
  (data synchronization between tables and global secondary indexes: the table's writes reach the index
  asynchronously; attribute projections: ``KEYS_ONLY`` holds the table and index keys, ``INCLUDE`` those and
  ``NonKeyAttributes``, ``ALL`` every attribute; an item without the index key attributes is not in the index),
  and AWS's knowledge center, https://repost.aws/knowledge-center/dynamodb-missing-table-items-gsi ("Write
  operations propagate to a GSI within 1 second", longer under load).
* The Query API reference, https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/API_Query.html
  (``ConsistentRead``: "If you query a global secondary index with ConsistentRead set to true, you will receive a
  ValidationException", which moto already answers; ``Count`` and ``ScannedCount``; ``Select=COUNT``;
  ``Limit`` and ``LastEvaluatedKey``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from fleetctl.sandbox.aws_rules.support import (
    LaggingRule,
    dynamodb_backend,
    key_identity,
    moto_account,
    with_json_body,
)
from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward

__all__ = ["GlobalIndexLag", "IndexShape", "lagged_page"]

_WRITES = frozenset({"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"})
# A partition key equality, the one key condition the rule reads: `attr = :value` or `#name = :value`.
_PARTITION_EQUALS = re.compile(r"^\s*(#[A-Za-z0-9_]+|[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(:[A-Za-z0-9_]+)\s*$")
# A Query with any of these is answered as moto answers it (see GlobalIndexLag).
_UNREAD_PARAMETERS = ("FilterExpression", "QueryFilter", "KeyConditions", "ProjectionExpression", "AttributesToGet")
_READ_SELECTS = frozenset({None, "ALL_PROJECTED_ATTRIBUTES", "ALL_ATTRIBUTES", "COUNT"})

Image = dict[str, Any]  # an item in DynamoDB JSON
KeyId = tuple[tuple[str, str], ...]
Scope = tuple[str, str, str]  # account, Region, table name


@dataclass(eq=False)
class _Write:
    """One write to one item: when it completed (or began, while it is still being applied), and the item as it
    was before it (None: no item)."""

    at: float
    before: Image | None
    done: bool = False


@dataclass(frozen=True)
class _Begun:
    """A write this rule remembered before forwarding it: the table as the request named it, and the item."""

    requested_table: str
    scope: Scope
    names: tuple[str, ...]
    identity: KeyId
    write: _Write


@dataclass(frozen=True)
class IndexShape:
    """What a Query of one global secondary index needs of its table and index."""

    table_keys: tuple[str, ...]  # the table's partition key, then its sort key if any
    hash_keys: tuple[str, ...]  # the index's partition key attributes
    range_keys: tuple[str, ...]  # the index's sort key attributes
    projection: str  # KEYS_ONLY | INCLUDE | ALL
    non_key_attributes: tuple[str, ...] = ()

    @property
    def index_keys(self) -> tuple[str, ...]:
        return (*self.hash_keys, *self.range_keys)

    def holds(self, image: Mapping[str, Any]) -> bool:
        """Whether the index holds this item: a GSI is sparse, and holds only items with all its key attributes."""
        return all(name in image for name in self.index_keys)

    def project(self, image: Mapping[str, Any]) -> Image:
        if self.projection == "ALL":
            return dict(image)
        kept = {*self.table_keys, *self.index_keys}
        if self.projection == "INCLUDE":
            kept |= set(self.non_key_attributes)
        return {name: value for name, value in image.items() if name in kept}

    def position(self, image: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Where the index orders an item: by its index keys, then (for items alike there) its table keys, as
        moto orders them. None when one is missing."""
        found: list[Any] = []
        for name in (*self.index_keys, *self.table_keys):
            value = _sortable(image.get(name))
            if value is None:
                return None
            found.append(value)
        return tuple(found)

    def last_key(self, image: Mapping[str, Any]) -> Image:
        return {name: image[name] for name in dict.fromkeys((*self.table_keys, *self.index_keys)) if name in image}


def lagged_page(
    shape: IndexShape,
    answer: Mapping[str, Any],
    lagged: Mapping[KeyId, Image | None],
    *,
    partition: Mapping[str, Any],
    forward_order: bool,
    exclusive_start: Mapping[str, Any] | None,
    limit: int | None,
    count_only: bool,
) -> dict[str, Any] | None:
    """Moto's Query answer for one page of an index, as the index still showed it: each item with a write younger
    than the lag (``lagged``: its key, and its image before the oldest such write) appears as that image if the
    index held it in the queried partition, and not at all otherwise. ``None`` when the page cannot be placed
    (a key without its attributes).

    Images the answer did not hold are placed where they belong in the page, between ``exclusive_start`` and the
    answer's ``LastEvaluatedKey``; a page longer than ``limit`` is cut there, with a ``LastEvaluatedKey`` of its
    own."""
    start = shape.position(exclusive_start) if exclusive_start else None
    end_key = answer.get("LastEvaluatedKey")
    end = shape.position(end_key) if end_key else None
    if (exclusive_start and start is None) or (end_key and end is None):
        return None
    partition_id = key_identity(partition, shape.hash_keys)

    def in_page(position: tuple[Any, ...]) -> bool:
        after_start = start is None or (position > start if forward_order else position < start)
        before_end = end is None or (position <= end if forward_order else position >= end)
        return after_start and before_end

    page: list[tuple[tuple[Any, ...], Image]] = []
    for item in answer.get("Items") or []:
        identity = key_identity(item, shape.table_keys)
        position = shape.position(item)
        if position is None:
            return None
        if identity not in lagged:
            page.append((position, item))
    for image in lagged.values():
        if image is None or not shape.holds(image) or key_identity(image, shape.hash_keys) != partition_id:
            continue
        position = shape.position(image)
        if position is not None and in_page(position):
            page.append((position, shape.project(image)))
    page.sort(key=lambda entry: entry[0], reverse=not forward_order)
    items = [item for _, item in page]
    last: Mapping[str, Any] | None = end_key
    if limit is not None and len(items) > limit:
        items = items[:limit]
        last = shape.last_key(items[-1])
    result = {key: value for key, value in answer.items() if key not in ("Items", "LastEvaluatedKey")}
    result["Count"] = result["ScannedCount"] = len(items)
    if not count_only:
        result["Items"] = items
    if last:
        result["LastEvaluatedKey"] = dict(last)
    return result


@dataclass(frozen=True)
class _Plan:
    """A Query this rule answers: what it forwards to moto, and what it needs to read moto's answer."""

    forwarded: AwsRequest
    scope: Scope
    shape: IndexShape
    partition: Image
    forward_order: bool
    exclusive_start: Mapping[str, Any] | None
    limit: int | None
    count_only: bool


class GlobalIndexLag(LaggingRule):
    """A Query on a global secondary index answers, for ``seconds`` after a write to an item, as if the write had
    not reached the index yet: the item as it was before its oldest write younger than the lag, if the index
    held that image in the queried partition, and nothing otherwise. A new item is missing, an item that left
    the index (or its partition) is still there with its former attributes, a deleted item is still there, and
    an updated one shows its former projected attributes.

    Writes are PutItem, UpdateItem, DeleteItem, BatchWriteItem and TransactWriteItems that succeeded (a
    BatchWriteItem's unprocessed items excepted); the item's former image is read from moto in this process
    before the write is forwarded, with this rule's writes one at a time so none slips in between. Only writes
    made while the lag is on are remembered, and a lag made longer applies to the writes still remembered.

    ``Count`` and ``ScannedCount`` count the items answered, ``Select=COUNT`` counts them without items, and a
    ``Limit`` page stays ``Limit`` items long with its ``LastEvaluatedKey``. The index's projection (``KEYS_ONLY``,
    ``INCLUDE`` or ``ALL``) shapes the former images as it shapes moto's.

    What the rule leaves as moto answers it: a Query whose key condition is not one equality on the index's
    partition key (``attr = :v`` or ``#name = :v``; a sort key condition included), one with a
    ``FilterExpression``, ``ProjectionExpression``, ``AttributesToGet`` or the legacy ``KeyConditions`` /
    ``QueryFilter``, or ``Select=SPECIFIC_ATTRIBUTES``; a Scan of an index; local secondary indexes; PartiQL
    writes. ``ConsistentRead=true`` on a GSI is moto's to refuse, and it does, with AWS's
    ``ValidationException``.

    ``POST /_shim/dynamodb-index-lag/<action>``:

    * ``set`` ``{"seconds": 1.0}``: the lag (0, the default, turns the rule off and forgets the writes);
    * ``advance`` ``{"seconds": 2}``: moves this rule's clock, so a test can step past the lag;
    * ``status`` ``{}``: the lag, how many items have young writes, and how many answers the rule rewrote.
    """

    name = "dynamodb-index-lag"

    def __init__(self, *, seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(seconds=seconds, clock=clock)  # its lock guards the history and the counters
        self._write_lock = threading.Lock()  # one write at a time, from reading its former image to its answer
        self._writes: dict[Scope, dict[KeyId, list[_Write]]] = {}  # per table and item, oldest first
        self.rewritten = 0

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.protocol != "json" or request.service != "dynamodb" or self._seconds <= 0:
            return forward(request)
        if request.operation in _WRITES:
            return self._write(request, forward)
        if request.operation == "Query" and request.params.get("IndexName"):
            return self._query(request, forward)
        return forward(request)

    # ---- writes ------------------------------------------------------------------------------------------------

    def _write(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        with self._write_lock:
            begun = self._begin(request)
            response: AwsResponse | None = None
            try:
                response = forward(request)
                return response
            finally:
                self._finish(request, begun, response)

    def _begin(self, request: AwsRequest) -> list[_Begun]:
        """Remember, as still being applied, each item the write touches with its current image."""
        touched = list(_touched_items(request))
        if not touched:
            return []
        from moto.core.exceptions import JsonRESTError
        from moto.dynamodb.models.utilities import dynamo_json_dump

        backend = dynamodb_backend(request)
        account = moto_account(request)
        found: list[tuple[str, Scope, tuple[str, ...], KeyId, Image | None]] = []
        for table_name, source in touched:
            try:
                table = backend.get_table(table_name)
            except JsonRESTError:  # an unknown table is moto's to refuse
                continue
            if not table.global_indexes:  # nothing of it can lag
                continue
            names = tuple(name for name in (table.hash_key_attr, table.range_key_attr) if name)
            identity = key_identity(source, names)
            if identity is None:  # so is a malformed key
                continue
            try:
                item = backend.get_item(table.name, {name: source[name] for name in names})
            except JsonRESTError:
                continue
            before = json.loads(dynamo_json_dump(dict(item.attrs))) if item is not None else None
            found.append((table_name, (account, request.region, str(table.name)), names, identity, before))
        with self._lock:
            now = self._now()
            begun = []
            for table_name, scope, names, identity, before in found:
                write = _Write(now, before)
                self._writes.setdefault(scope, {}).setdefault(identity, []).append(write)
                begun.append(_Begun(table_name, scope, names, identity, write))
            return begun

    def _finish(self, request: AwsRequest, begun: list[_Begun], response: AwsResponse | None) -> None:
        """A write applied completes now; one refused (or a batch's unprocessed item) never happened."""
        if not begun:
            return
        applied = response is not None and response.status == 200
        unprocessed: Mapping[str, Any] = {}
        if applied and response is not None and request.operation == "BatchWriteItem":
            unprocessed = response.json().get("UnprocessedItems") or {}
        with self._lock:
            now = self._now()
            for entry in begun:
                if applied and not _left_unprocessed(entry, unprocessed):
                    entry.write.at, entry.write.done = now, True
                    continue
                writes = self._writes.get(entry.scope, {}).get(entry.identity, [])
                if entry.write in writes:
                    writes.remove(entry.write)

    # ---- queries -----------------------------------------------------------------------------------------------

    def _query(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        plan = self._plan(request)
        if plan is None:
            return forward(request)
        response = forward(plan.forwarded)
        if response.status != 200:
            return response
        with self._lock:
            lagged = self._lagged(plan.scope)
        if not lagged:
            return response if plan.forwarded is request else with_json_body(response, _as_asked(plan, response))
        answer = lagged_page(
            plan.shape,
            response.json(),
            lagged,
            partition=plan.partition,
            forward_order=plan.forward_order,
            exclusive_start=plan.exclusive_start,
            limit=plan.limit,
            count_only=plan.count_only,
        )
        if answer is None:
            return response if plan.forwarded is request else with_json_body(response, _as_asked(plan, response))
        with self._lock:
            self.rewritten += 1
        return with_json_body(response, answer)

    def _plan(self, request: AwsRequest) -> _Plan | None:
        """How to answer this Query, or None to leave it to moto as it came."""
        params = request.params
        select = params.get("Select")
        if any(name in params for name in _UNREAD_PARAMETERS) or select not in _READ_SELECTS:
            return None
        if params.get("ConsistentRead") is True:
            return None
        condition = _PARTITION_EQUALS.match(str(params.get("KeyConditionExpression") or ""))
        if condition is None:
            return None
        attribute, placeholder = condition.groups()
        if attribute.startswith("#"):
            attribute = (params.get("ExpressionAttributeNames") or {}).get(attribute)
        value = (params.get("ExpressionAttributeValues") or {}).get(placeholder)
        found = _index_shape(request, str(params.get("TableName")), str(params.get("IndexName")))
        if found is None or not isinstance(value, Mapping) or found[1].hash_keys != (attribute,):
            return None
        table_name, shape = found
        scope = (moto_account(request), request.region, table_name)
        with self._lock:
            young = len(self._lagged(scope))
        if not young:
            return None
        forwarded = dict(params)
        count_only = select == "COUNT"
        if count_only:
            forwarded.pop("Select")
        limit = params.get("Limit")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1 else None
        if limit is not None:
            # Each young item moto answers may leave the page: ask for that many more, so the page stays full.
            forwarded["Limit"] = limit + young
        exclusive_start = params.get("ExclusiveStartKey")
        return _Plan(
            forwarded=request
            if forwarded == params
            else replace(request, params=forwarded, body=json.dumps(forwarded).encode()),
            scope=scope,
            shape=shape,
            partition={attribute: value},
            forward_order=params.get("ScanIndexForward", True) is not False,
            exclusive_start=exclusive_start if isinstance(exclusive_start, Mapping) else None,
            limit=limit,
            count_only=count_only,
        )

    def _lagged(self, scope: Scope) -> dict[KeyId, Image | None]:
        """Each item of the table with a write younger than the lag (or still being applied), and its image
        before the oldest such write; forgets the writes the lag has passed. Lock held."""
        settled_before = self._now() - self._seconds
        items = self._writes.get(scope)
        if not items:
            return {}
        lagged: dict[KeyId, Image | None] = {}
        for identity in list(items):
            writes = items[identity]
            while writes and writes[0].done and writes[0].at <= settled_before:
                writes.pop(0)
            if writes:
                lagged[identity] = writes[0].before
            else:
                del items[identity]
        return lagged

    # ---- configuration -----------------------------------------------------------------------------------------

    def _forget(self) -> None:
        self._writes = {}

    def _status(self) -> dict[str, Any]:
        young = sum(len(self._lagged(scope)) for scope in list(self._writes))
        return {"young_items": young, "rewritten": self.rewritten}

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self.rewritten = 0


def _as_asked(plan: _Plan, response: AwsResponse) -> dict[str, Any]:
    """Moto's answer to the forwarded Query, as the Query that came asked it (its own Select and Limit)."""
    answer: dict[str, Any] = response.json()
    items = list(answer.get("Items") or [])
    if plan.limit is not None and len(items) > plan.limit:
        items = items[: plan.limit]
        answer["LastEvaluatedKey"] = plan.shape.last_key(items[-1])
    answer["Count"] = answer["ScannedCount"] = len(items)
    answer.pop("Items", None)
    if not plan.count_only:
        answer["Items"] = items
    return answer


def _index_shape(request: AwsRequest, table_name: str, index_name: str) -> tuple[str, IndexShape] | None:
    """The table's name and the shape of its global secondary index ``index_name``, from moto; None when moto
    knows no such table or GSI (moto answers that itself)."""
    from moto.core.exceptions import JsonRESTError

    try:
        table = dynamodb_backend(request).get_table(table_name)
    except JsonRESTError:
        return None
    index = next((gsi for gsi in table.global_indexes or [] if gsi.name == index_name), None)
    if index is None:
        return None
    projection = index.projection or {}
    shape = IndexShape(
        table_keys=tuple(name for name in (table.hash_key_attr, table.range_key_attr) if name),
        hash_keys=tuple(key["AttributeName"] for key in index.schema if key["KeyType"] == "HASH"),
        range_keys=tuple(key["AttributeName"] for key in index.schema if key["KeyType"] == "RANGE"),
        projection=str(projection.get("ProjectionType") or "ALL"),
        non_key_attributes=tuple(projection.get("NonKeyAttributes") or ()),
    )
    return str(table.name), shape


def _touched_items(request: AwsRequest) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each (table, item or key) a write names; a transaction's ConditionCheck writes nothing."""
    params = request.params
    if request.operation == "PutItem":
        yield from _entry(params.get("TableName"), params.get("Item"))
    elif request.operation in ("UpdateItem", "DeleteItem"):
        yield from _entry(params.get("TableName"), params.get("Key"))
    elif request.operation == "BatchWriteItem":
        for table, writes in (params.get("RequestItems") or {}).items():
            for write in writes if isinstance(writes, list) else []:
                if isinstance(write, Mapping) and isinstance(put := write.get("PutRequest"), Mapping):
                    yield from _entry(table, put.get("Item"))
                elif isinstance(write, Mapping) and isinstance(delete := write.get("DeleteRequest"), Mapping):
                    yield from _entry(table, delete.get("Key"))
    elif request.operation == "TransactWriteItems":
        for entry in params.get("TransactItems") or []:
            for kind, action in entry.items() if isinstance(entry, dict) else ():
                if kind in ("Put", "Update", "Delete") and isinstance(action, dict):
                    yield from _entry(action.get("TableName"), action.get("Item" if kind == "Put" else "Key"))


def _entry(table: Any, source: Any) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(table, str) and isinstance(source, Mapping):
        yield table, source


def _left_unprocessed(entry: _Begun, unprocessed: Mapping[str, Any]) -> bool:
    """Whether a BatchWriteItem's answer left this write among its ``UnprocessedItems``."""
    for write in unprocessed.get(entry.requested_table) or []:
        source = (write.get("PutRequest") or {}).get("Item") or (write.get("DeleteRequest") or {}).get("Key")
        if isinstance(source, Mapping) and key_identity(source, entry.names) == entry.identity:
            return True
    return False


def _sortable(value: Any) -> tuple[str, Any] | None:
    """A key value as the index orders it: strings by code point (UTF-8 byte order), numbers by value, binary by
    bytes; led by its type, so values of two types never meet in a comparison. None for anything else."""
    if not isinstance(value, Mapping) or len(value) != 1:
        return None
    kind, raw = next(iter(value.items()))
    if not isinstance(raw, str):
        return None
    if kind == "S":
        return kind, raw
    if kind == "N":
        with contextlib.suppress(ArithmeticError):
            return kind, Decimal(raw)
        return None
    if kind == "B":
        with contextlib.suppress(binascii.Error, ValueError):
            return kind, base64.b64decode(raw)
    return None

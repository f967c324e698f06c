"""Each runner instance's GitLab token, in a fleet-table item that only that instance may read and delete.

Why DynamoDB and not Parameter Store: Parameter Store takes about 3 PutParameter calls a second per account and
Region (standard throughput; 10 with higher throughput), so one token parameter per launched instance throttles
a burst of a few launches a second. A DynamoDB item is written at the table's own, far higher rate.

The key. For a role assigned to an EC2 instance, IAM sets the request's ``aws:userid`` to ``<role id>:<instance
id>`` (IAM User Guide, "IAM policy elements: Variables and tags", "Request information that you can use for policy
variables"): EC2 names the role session after the instance, and the runner role trusts only EC2, so no one else can
choose that session name. The item's key is ``TOKEN#<role id>:<instance id>`` and the instance role may
``GetItem`` and ``DeleteItem`` only where ``dynamodb:LeadingKeys`` equals ``TOKEN#${aws:userid}``
(``fleetctl/iam_policies.py``). The instance learns its own ``aws:userid`` as the ``UserId`` of
``sts:GetCallerIdentity``, which needs no permission; user data names only the table.

Each pool has a role of its own (``chalicelib.naming.runner_role_name``), so the role id in the key also keeps a
pool's instances away from another pool's tokens. A role id (``AROA...``) exists only once bootstrap has made the
role, and changes if the role is made again; scale-up reads each pool's with ``iam:GetRole``, once per process.
The runner record keeps the item's key, so the instance-state handler deletes a token without asking IAM.

At rest the token is encrypted by the table's server-side encryption (bootstrap creates the table with the KMS
key ``aws/dynamodb``). The item expires by TTL a while after the pool's boot deadline, a backstop for the
deletions that scale-up, the instance itself and the instance-state handler make.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from botocore.exceptions import ClientError

from chalicelib.aws import error_code
from chalicelib.store import TOKEN_INDEX_KEY, to_item, token_key

# How long after its boot deadline an unread token may stay: TTL deletion is a backstop, never the first deletion.
TOKEN_GRACE_SECONDS = 3600


def session_user_id(role_id: str, instance_id: str) -> str:
    """``aws:userid`` of the role session EC2 gives an instance of the role."""
    return f"{role_id}:{instance_id}"


class RunnerRoles:
    """The unique ids of the pools' runner roles (``{pool: role name}``), each read with ``iam:GetRole`` on first
    use and kept for the process."""

    def __init__(self, iam_client: Any, role_names: Mapping[str, str]) -> None:
        self._iam = iam_client
        self._role_names = dict(role_names)
        self._role_ids: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(self._role_names)

    def role_id(self, pool: str) -> str:
        found = self._role_ids.get(pool)
        if found is None:
            with self._lock:
                found = self._role_ids.get(pool)
                if found is None:
                    found = str(self._iam.get_role(RoleName=self._role_names[pool])["Role"]["RoleId"])
                    self._role_ids[pool] = found
        return found


class RunnerTokens:
    def __init__(self, dynamodb_client: Any, table: str, roles: RunnerRoles | None = None) -> None:
        self._dynamodb = dynamodb_client
        self._table = table
        self._roles = roles

    def learn_roles(self, pools: Iterable[str] | None = None) -> None:
        """Read the runner role ids of ``pools`` (default: every pool) not yet known; a ``ClientError`` when IAM
        refuses or fails."""
        if self._roles is None:
            raise RuntimeError("token keys are derived by scale-up, which knows the runner roles")
        for pool in self._roles.pools if pools is None else pools:
            self._roles.role_id(pool)

    def key(self, pool: str, instance_id: str) -> str:
        """The item key of the token of an instance of ``pool`` (scale-up's side only)."""
        if self._roles is None:
            raise RuntimeError("token keys are derived by scale-up, which knows the runner roles")
        return token_key(session_user_id(self._roles.role_id(pool), instance_id))

    def put(
        self, key: str, instance_id: str, token: str, deadline_at: float, *, idle_wait_seconds: int | None = None
    ) -> None:
        """Store (or, after a token reset, replace) an instance's token under ``key``; its instance must read it
        by ``deadline_at`` (its boot deadline), and TTL deletes it ``TOKEN_GRACE_SECONDS`` later.
        ``idle_wait_seconds``, when given, replaces the pool's idle wait on that instance (0: never stop for
        idleness, as a warm runner does)."""
        item: dict[str, Any] = {
            "pk": key,
            "kind": "token",
            "instance_id": instance_id,
            "token": token,
            "deadline_at": deadline_at,
            "ttl": int(deadline_at + TOKEN_GRACE_SECONDS),
            # The keys-only index reconcile finds tokens past their deadline in (store.TOKEN_DEADLINES_INDEX).
            "token_index": TOKEN_INDEX_KEY,
            "token_due": deadline_at,
        }
        if idle_wait_seconds is not None:
            item["idle_wait_seconds"] = idle_wait_seconds
        self._dynamodb.put_item(TableName=self._table, Item=to_item(item))

    def delete(self, key: str) -> None:
        """Delete a token; one already gone (read by its instance, or deleted before) counts as deleted."""
        try:
            self._dynamodb.delete_item(TableName=self._table, Key={"pk": {"S": key}})
        except ClientError as exc:
            # DeleteItem of a missing item succeeds; a refused condition cannot happen without one. Anything
            # else is a real failure, for the caller's retry.
            if error_code(exc) != "ConditionalCheckFailedException":
                raise

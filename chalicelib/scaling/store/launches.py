"""Launch records: read, and moved through their life, each move one conditional transition.

The transitions are :mod:`chalicelib.scaling.launches` (pure); a move its record's state does not allow is
refused and reported as False, for the caller to read what is there. The leases a launch record holds are taken
and given back with the pool's counter (:mod:`chalicelib.scaling.store.capacity`), moved onto runner records
(:mod:`chalicelib.scaling.store.runners`).
"""

from __future__ import annotations

from typing import Any

from chalicelib.scaling.launches import LaunchEvent, LaunchUpdate
from chalicelib.scaling.launches import update as launch_update
from chalicelib.scaling.store.records import LaunchRecord
from chalicelib.scaling.store.table import ScaleTable, update_request
from chalicelib.store import launch_key


class LaunchStore(ScaleTable):
    """``LAUNCH#`` items: read, finished, failed, paused, taken over, unmarked."""

    def get_launch(self, launch_id: str) -> LaunchRecord | None:
        found = self.get(launch_key(launch_id))
        return LaunchRecord.from_item(launch_id, found) if found else None

    def launch_request(self, launch_id: str, move: LaunchUpdate) -> dict[str, Any]:
        return update_request(
            self.table, launch_key(launch_id), move.expression, move.values, move.condition or None, move.names
        )

    def _move_launch(self, launch_id: str, move: LaunchUpdate) -> bool:
        """One launch-record move (chalicelib.scaling.launches); False when the record's state does not allow it."""
        return self._write_unless_refused("update_item", self.launch_request(launch_id, move))

    def finish_launch(self, launch_id: str, instance_ids: list[str]) -> bool:
        """Every runner the launch made is ready. It stays in the live index until reconcile sees it holds
        nothing (chalicelib.scaling.launches). False when it was no longer its owner's (reconcile settled it)."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.FINISH, now=self._clock(), instances=tuple(instance_ids))
        )

    def fail_launch(self, launch_id: str, reason: str) -> bool:
        """The launch stops with ``reason``; any leases it still holds are given back by reconcile."""
        return self._move_launch(launch_id, launch_update(LaunchEvent.FAIL, now=self._clock(), reason=reason))

    def unmark_launch(self, launch_id: str) -> bool:
        """A finished launch that holds no lease any more leaves the live index."""
        return self._move_launch(launch_id, launch_update(LaunchEvent.UNMARK, now=self._clock()))

    def mark_launch_incomplete(self, launch_id: str, reason: str = "") -> bool:
        """The invocation ends with work left (runners unfinished, an answer lost): the next delivery of its jobs
        resumes it. False when it may not be resumed any more (reconcile settled it: it failed)."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.PAUSE, now=self._clock(), reason=reason or "incomplete")
        )

    def take_over_launch(self, launch_id: str, stale_before: float) -> bool:
        """Become the one invocation resuming a launch: it is incomplete, or its last owner went silent."""
        return self._move_launch(
            launch_id, launch_update(LaunchEvent.TAKE_OVER, now=self._clock(), stale_before=stale_before)
        )

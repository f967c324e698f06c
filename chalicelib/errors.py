"""One error hierarchy for runner-fleet.

Handlers map these to HTTP statuses or queue outcomes at their boundary; library code raises them and never
exits or prints.
"""

from __future__ import annotations


class RunnerFleetError(Exception):
    """Base of every error runner-fleet raises on purpose."""


class ConfigError(RunnerFleetError):
    """The fleet configuration is invalid. ``problems`` holds one ``field.path: reason`` line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class AuthenticationError(RunnerFleetError):
    """A webhook failed authentication (token or signature). Maps to 401; the reason is logged, not returned."""


class PayloadError(RunnerFleetError):
    """A webhook body is not what its event type promises. Maps to 400."""


class PayloadTooLargeError(RunnerFleetError):
    """A webhook body exceeds the size limit. Maps to 413."""


class SecretUnavailableError(RunnerFleetError):
    """A secret could not be read for a transient reason (throttling, network). Maps to 503."""


class RetryableError(RunnerFleetError):
    """A step failed in a way that a later attempt may fix (throttling, capacity, GitLab 5xx)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class GitLabUnavailableError(RunnerFleetError):
    """GitLab could not be asked, or refused: unreachable, timed out, or an error status. ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

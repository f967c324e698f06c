"""How Lambda ends an invocation at its timeout, played inside one process.

Lambda stops a function when its timeout passes, wherever it is: the invocation fails ("Task timed out after N
seconds"), nothing after that point runs, and a request already sent may or may not have reached AWS
(https://docs.aws.amazon.com/lambda/latest/dg/configuration-timeout.html). The sandbox runs every invocation in a
thread of one process, and a thread cannot be killed, so an invocation is stopped at its next call instead:

* each invocation runs under a deadline (a context variable, so the threads a function starts through a
  ``ThreadPoolExecutor`` carry it too, as a function's threads die with it in Lambda);
* every AWS call (botocore's ``BaseClient._make_api_call``) and every HTTP request (``requests.Session.send``,
  which python-gitlab uses for GitLab) checks it before it goes out and again when its answer comes back: past the
  deadline, the call raises :class:`InvocationTimedOut`. A call in flight at the deadline has then reached its peer,
  but the function never sees the answer, as a killed function would not;
* :class:`InvocationTimedOut` is a ``BaseException``, so no ``except Exception`` of the function's own code catches
  it and carries on; and an invocation that returns after its deadline (it caught it anyway, or spent its time
  without calling anything) fails all the same (:func:`invocation`).

Why not a process per invocation: handlers share the app's warm state (clients, caches) across invocations, as a
warm Lambda container does, and the sandbox's peers are reached by loopback sockets either way; stopping at the
next call gives the same outcome as Lambda's kill for everything a function does that anybody else can see,
since only calls leave the process.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

__all__ = ["InvocationTimedOut", "deadline", "install", "invocation"]

# (function, deadline on time.monotonic, timeout) of the invocation the current thread works for.
_deadline: contextvars.ContextVar[tuple[str, float, float] | None] = contextvars.ContextVar(
    "lambda_deadline", default=None
)
_install_lock = threading.Lock()
_installed: list[bool] = []  # non-empty once installed


class InvocationTimedOut(BaseException):
    """The invocation's timeout passed: Lambda would have stopped the function here."""

    def __init__(self, function: str, timeout: float) -> None:
        self.function = function
        self.timeout = timeout
        super().__init__(f"{function}: Task timed out after {timeout:.2f} seconds")


def deadline() -> float | None:
    """The current invocation's deadline (``time.monotonic``), or None outside an invocation."""
    current = _deadline.get()
    return current[1] if current else None


def _check() -> None:
    current = _deadline.get()
    if current is not None and time.monotonic() >= current[1]:
        raise InvocationTimedOut(current[0], current[2])


@contextmanager
def invocation(function: str, timeout: float) -> Iterator[None]:
    """Run the body as one invocation of ``function`` with ``timeout`` seconds; raises
    :class:`InvocationTimedOut` if it ends after its deadline, however it ended."""
    install()
    token = _deadline.set((function, time.monotonic() + timeout, timeout))
    try:
        yield
        _check()
    finally:
        _deadline.reset(token)


def install() -> None:
    """Put the deadline checks on botocore's and requests' calls, and make thread pools carry the context
    (once per process; outside an invocation they change nothing)."""
    with _install_lock:
        if _installed:
            return
        _wrap_botocore()
        _wrap_requests()
        _wrap_thread_pools()
        _installed.append(True)


def _checked(call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check()
        answer = call(*args, **kwargs)
        _check()
        return answer

    return wrapper


def _wrap_botocore() -> None:
    from botocore.client import BaseClient

    BaseClient._make_api_call = _checked(BaseClient._make_api_call)


def _wrap_requests() -> None:
    import requests

    requests.Session.send = _checked(requests.Session.send)  # type: ignore[method-assign]


def _wrap_thread_pools() -> None:
    original = ThreadPoolExecutor.submit

    def submit(self: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _deadline.get() is None:
            return original(self, fn, *args, **kwargs)
        context = contextvars.copy_context()
        return original(self, context.run, fn, *args, **kwargs)

    ThreadPoolExecutor.submit = submit  # type: ignore[method-assign,assignment]

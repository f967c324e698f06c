"""A pytest plugin that fails the session when a secret the sandbox minted reaches a log line or an EMF metric.

What counts as a secret: every personal access token the GitLab emulator accepts (``glpat-``), every runner token
it mints or resets (``glrt-``), every webhook secret token and signing secret a hook is given, and every webhook
token bootstrap generates and signing secret connect generates. They are recorded as they are made, by wrapping
the emulator model's and fleetctl's minting points for the session.

What is scanned, as it is produced:

* every record of the functions' logger (``fleet``, Powertools), at every level, formatted by the JSON formatter
  the Lambdas use, whatever level the tests run at: records below the configured level are scanned and then
  dropped, so handlers, ``caplog`` and propagation see exactly what they would without this plugin;
* every name, dimension and metadata value given to Powertools' metrics, which is all an EMF document holds
  besides numbers (tests run with metrics disabled, so no EMF is printed: its content is scanned at the source);
* every test's captured output: the log sections whole, and of stdout and stderr the lines that are JSON log or
  EMF documents (a test's own prints, such as a sandbox's export lines, are not logs);
* at the end, the soak's log files (``soak.log``) under the session's temporary directory, where the soak sends
  the functions' logs as CloudWatch would keep them.

Limits: a secret is found only as a whole token (a run of the URL-safe alphabet, or ``whsec_`` and base64); one
glued without a separator to other such characters is not. Output of processes the tests start (the CLI in a
subprocess) is not logs and is not scanned. The offending line is printed with every secret in it replaced.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Runs that can hold a token: URL-safe base64 with its hyphen (glpat-, glrt-, token_urlsafe), and a signing secret.
_RUN = re.compile(r"whsec_[A-Za-z0-9+/=]+|[A-Za-z0-9_\-]{12,}")
_LOG_LINE = re.compile(r'^\s*\{.*("level"|"_aws")')
_LOGGER = "fleet"


@dataclass
class SecretScanner:
    """The secrets minted so far, and the lines found holding one."""

    secrets: set[str] = field(default_factory=set)
    leaks: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, secret: object) -> None:
        if isinstance(secret, str) and len(secret) >= 12:
            with self._lock:
                self.secrets.add(secret)

    def scan(self, text: str, where: str) -> None:
        """Record each line of ``text`` that holds a minted secret (redacted), saying ``where`` it was seen."""
        found = {run for run in _RUN.findall(text) if run in self.secrets}
        if not found:
            return
        for line in text.splitlines():
            if any(secret in line for secret in found):
                with self._lock:
                    self.leaks.append(f"{where}: {redact(line, found)}")

    def scan_log_output(self, text: str, where: str) -> None:
        """Scan only the lines of captured stdout or stderr that are JSON log or EMF documents."""
        lines = [line for line in text.splitlines() if _LOG_LINE.match(line)]
        if lines:
            self.scan("\n".join(lines), where)


def redact(line: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        prefix = secret[:6] if secret.startswith(("glpat-", "glrt-", "whsec_")) else ""
        line = line.replace(secret, f"{prefix}[REDACTED]")
    return line[:400]


class _ScanningHandler(logging.Handler):
    """Formats each record of the functions' logger as the Lambdas would print it, and scans it."""

    def __init__(self, scanner: SecretScanner, format_record: Callable[[logging.LogRecord], str]) -> None:
        super().__init__(logging.DEBUG)
        self._scanner = scanner
        self._format_record = format_record

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self._format_record(record)
        except Exception:  # a record the formatter refuses is scanned as its message alone
            text = record.getMessage()
        self._scanner.scan(text, f"log record {record.name}:{record.levelname}")


@dataclass
class _Installed:
    undo: list[Callable[[], None]] = field(default_factory=list)


def _wrap(owner: Any, name: str, after: Callable[..., None], installed: _Installed) -> None:
    """Call ``after(result, *args, **kwargs)`` after each call of ``owner.name``."""
    original = owner.__dict__[name]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)
    installed.undo.append(lambda: setattr(owner, name, original))


def _recording_factory(factory: Callable[[], str], scanner: SecretScanner) -> Callable[[], str]:
    def make() -> str:
        secret = factory()
        scanner.record(secret)
        return secret

    return make


def install(scanner: SecretScanner) -> _Installed:
    """Record the secrets where they are minted, and scan the functions' logs and metrics as they are made."""
    from fleetctl import gitlab_connect
    from fleetctl.bootstrap import Bootstrapper
    from fleetctl.sandbox.gitlab_model import GitLabModel

    installed = _Installed()

    def token_of(result: Any, *_: Any, **__: Any) -> None:
        if isinstance(result, dict):
            scanner.record(result.get("token"))

    def access_token(_result: Any, _model: Any, token: str, *_: Any, **__: Any) -> None:
        scanner.record(token)

    def hook_secrets(_result: Any, *args: Any, **kwargs: Any) -> None:
        changes = kwargs.get("changes", args[-1] if args else None)
        scanner.record(getattr(changes, "token", None))
        scanner.record(getattr(changes, "signing_token", None))

    _wrap(GitLabModel, "add_access_token", access_token, installed)
    _wrap(GitLabModel, "create_runner", token_of, installed)
    _wrap(GitLabModel, "reset_runner_token", token_of, installed)
    _wrap(GitLabModel, "create_hook", hook_secrets, installed)
    _wrap(GitLabModel, "update_hook", hook_secrets, installed)
    # The generators are keyword-only defaults, bound when the functions were defined.
    for function, parameter in ((Bootstrapper.__init__, "token_factory"), (gitlab_connect.connect, "signing_factory")):
        defaults = function.__kwdefaults__
        assert defaults is not None
        original = defaults[parameter]
        defaults[parameter] = _recording_factory(original, scanner)
        installed.undo.append(functools.partial(defaults.__setitem__, parameter, original))
    _install_log_scan(scanner, installed)
    _install_metric_scan(scanner, installed)
    return installed


def _install_log_scan(scanner: SecretScanner, installed: _Installed) -> None:
    """Scan every record of the functions' logger, whatever its level, without changing what anyone else sees:
    the logger creates records at every level, the scanner sees each, and only those at or above the level the
    test configured go on to the handlers and up to the root (where pytest and ``caplog`` listen)."""
    from chalicelib.observability import logger as powertools_logger

    fleet = logging.getLogger(_LOGGER)
    handler = _ScanningHandler(scanner, powertools_logger.registered_formatter.format)
    original_call = fleet.callHandlers

    def is_enabled_for(level: int) -> bool:
        return not fleet.disabled

    def call_handlers(record: logging.LogRecord) -> None:
        handler.handle(record)
        if record.levelno >= fleet.getEffectiveLevel():
            original_call(record)

    before = {name: fleet.__dict__[name] for name in ("isEnabledFor", "callHandlers") if name in fleet.__dict__}
    fleet.isEnabledFor = is_enabled_for  # type: ignore[method-assign]
    fleet.callHandlers = call_handlers  # type: ignore[method-assign]

    def undo() -> None:
        for name in ("isEnabledFor", "callHandlers"):
            if name in before:
                setattr(fleet, name, before[name])
            else:
                delattr(fleet, name)

    installed.undo.append(undo)


def _install_metric_scan(scanner: SecretScanner, installed: _Installed) -> None:
    from aws_lambda_powertools.metrics.base import MetricManager, SingleMetric
    from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

    def scan_arguments(_result: Any, _metrics: Any, *args: Any, **kwargs: Any) -> None:
        scanner.scan(" ".join(repr(value) for value in (*args, *kwargs.values())), "EMF metric")

    for owner in (AmazonCloudWatchEMFProvider, MetricManager, SingleMetric):
        for name in ("add_metric", "add_dimension", "add_metadata"):
            if name in owner.__dict__:
                _wrap(owner, name, scan_arguments, installed)


_scanner = SecretScanner()
_installed: list[_Installed] = []


def pytest_configure(config: pytest.Config) -> None:
    _installed.append(install(_scanner))


def pytest_unconfigure(config: pytest.Config) -> None:
    while _installed:
        for undo in reversed(_installed.pop().undo):
            undo()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for title, content in report.sections:
        where = f"{report.nodeid} ({title})"
        if title.startswith("Captured log"):
            _scanner.scan(content, where)
        else:
            _scanner.scan_log_output(content, where)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        base = Path(factory.getbasetemp())
        for log in base.glob("**/soak.log"):
            _scanner.scan(log.read_text(errors="replace"), str(log))
    if not _scanner.leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "secrets in logs or metrics (tests/secret_scan.py)")
        for leak in _scanner.leaks[:50]:
            reporter.write_line(leak)
        if len(_scanner.leaks) > 50:
            reporter.write_line(f"... and {len(_scanner.leaks) - 50} more")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

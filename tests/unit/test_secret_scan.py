"""The session's secret scan (``tests/secret_scan.py``) finds a minted secret in what the functions log, at any
level, and in what they give their metrics, and prints the line without the secret."""

from __future__ import annotations

import json

from tests.secret_scan import SecretScanner, install

RUNNER_TOKEN = "glrt-t1_unit-scan-0123456789ab"


def uninstall(installed: object) -> None:
    for undo in reversed(installed.undo):  # type: ignore[attr-defined]
        undo()


def test_a_recorded_secret_in_a_json_log_line_is_reported_redacted() -> None:
    # given
    scanner = SecretScanner()
    scanner.record(RUNNER_TOKEN)
    line = json.dumps({"level": "INFO", "message": "runner made", "token": RUNNER_TOKEN})

    # when
    scanner.scan_log_output(f"a test's own print {RUNNER_TOKEN}\n{line}\n", "test (Captured stdout call)")

    # then
    [leak] = scanner.leaks
    assert RUNNER_TOKEN not in leak
    assert '"token": "glrt-t[REDACTED]"' in leak
    assert leak.startswith("test (Captured stdout call): ")


def test_a_token_nobody_minted_is_not_a_leak() -> None:
    scanner = SecretScanner()
    scanner.record(RUNNER_TOKEN)
    scanner.scan('{"level": "INFO", "message": "glrt-someone-elses-token-0000"}', "log")
    assert scanner.leaks == []


def test_a_debug_record_below_the_tests_level_is_scanned_and_a_metric_dimension_too() -> None:
    from aws_lambda_powertools.metrics import MetricUnit, single_metric

    from chalicelib.observability import logger

    # given a scanner installed beside the session's, knowing a secret the session's does not
    scanner = SecretScanner()
    installed = install(scanner)
    scanner.record(RUNNER_TOKEN)
    try:
        # when the functions' logger writes it at DEBUG (the tests run at WARNING) and a metric carries it
        logger.debug("handed over", extra={"token": RUNNER_TOKEN})
        with single_metric(name="Unit", unit=MetricUnit.Count, value=1, namespace="Test") as metric:
            metric.add_dimension(name="pool", value=RUNNER_TOKEN)
    finally:
        uninstall(installed)

    # then both are reported, and the record went no further than the scanner
    assert [leak.split(":")[0] for leak in scanner.leaks] == ["log record fleet", "EMF metric"]
    assert all(RUNNER_TOKEN not in leak for leak in scanner.leaks)


def test_the_emulator_records_what_it_mints() -> None:
    from fleetctl.sandbox.gitlab_model import GitLabModel

    scanner = SecretScanner()
    installed = install(scanner)
    try:
        GitLabModel().add_access_token("glpat-unit-scan-recorded", admin=False)
    finally:
        uninstall(installed)
    assert "glpat-unit-scan-recorded" in scanner.secrets

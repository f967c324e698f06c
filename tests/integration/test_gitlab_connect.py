"""``fleetctl bootstrap`` and ``fleetctl gitlab connect`` against the GitLab emulator: tokens are checked before
they are used, and signing is turned on only where GitLab really signs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from chalicelib.intake.secrets import UNSIGNED
from fleetctl.cli import main
from fleetctl.sandbox.stack import DEFAULT_CONFIG, Sandbox

SIGNING_PARAMETER = "/runner-fleet/dev/webhook-signing-secret"


def fleetctl(*args: str, token: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**(env or {}), "GITLAB_TOKEN": token})


def stage_file(stack: Any) -> str:
    """The stage file the sandbox wrote (its GitLab URL is the emulator's)."""
    return str(stack.workdir / "fleet.json")


def connect_args(stack: Any) -> list[str]:
    project, url = str(stack.project_id), stack.server.webhook_url
    return ["gitlab", "connect", "--config", stage_file(stack), "--project", project, "--url", url]


# -- tokens are checked before they are stored or used ------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "missing"),
    [
        (("read_api", "create_runner"), "missing scope manage_runner or api (to reset runner tokens"),
        (("create_runner", "manage_runner"), "missing scope read_api or api (to read jobs"),
        (("read_api", "manage_runner"), "missing scope create_runner or api (to create runners"),
        # the stage file's pools retry jobs lost to spot interruptions, which only api allows
        (("read_api", "create_runner", "manage_runner"), "missing scope api (to retry jobs lost to spot"),
    ],
)
def test_bootstrap_refuses_a_token_missing_a_scope_and_names_it(
    sandbox: Any, scopes: tuple[str, ...], missing: str
) -> None:
    # given a token lacking one of the scopes the fleet needs
    token = "glpat-weak-" + "-".join(scopes)
    sandbox.gitlab.add_token(token, scopes=scopes)

    # when
    result = fleetctl("bootstrap", "--config", stage_file(sandbox), "--dry-run", token=token)

    # then
    assert result.exit_code == 1
    assert missing in result.output
    assert token not in result.output


@pytest.mark.parametrize(("state", "said"), [("expired", "Token is expired"), ("revoked", "Token was revoked")])
def test_bootstrap_and_connect_refuse_an_expired_or_revoked_token(sandbox: Any, state: str, said: str) -> None:
    # given
    token = f"glpat-{state}"
    sandbox.gitlab.add_token(token, scopes=("api",), expires_at=date.today() if state == "expired" else None)
    if state == "revoked":
        sandbox.gitlab.revoke_token(token)

    # when
    bootstrap = fleetctl("bootstrap", "--config", stage_file(sandbox), "--dry-run", token=token)
    connect = fleetctl(*connect_args(sandbox), token=token)

    # then
    assert (bootstrap.exit_code, connect.exit_code) == (1, 1)
    assert said in bootstrap.output and said in connect.output


def test_connect_refuses_a_token_without_the_api_scope(sandbox: Any) -> None:
    # given a token with the scopes of a fleet that retries no job: enough to run it, not to manage hooks
    token = "glpat-fleet-without-api"
    sandbox.gitlab.add_token(token, scopes=("read_api", "create_runner", "manage_runner"))
    hooks_before = sandbox.gitlab.calls[("PUT", "/projects/:id/hooks/:hook_id")]

    # when
    result = fleetctl(*connect_args(sandbox), token=token)

    # then
    assert result.exit_code == 1
    assert "missing scope api (to create and update the project webhook)" in result.output
    assert sandbox.gitlab.calls[("PUT", "/projects/:id/hooks/:hook_id")] == hooks_before


def test_instance_runners_need_an_administrators_token(sandbox: Any, tmp_path: Path) -> None:
    # given an instance-runner stage and a non-administrator token with every scope
    document = json.loads(Path(stage_file(sandbox)).read_text())
    document["gitlab"].update({"runner_type": "instance_type", "runner_owner_id": None})
    stage = tmp_path / "instance.json"
    stage.write_text(json.dumps(document))
    sandbox.gitlab.add_token("glpat-owner-api", scopes=("api",))

    # when
    result = fleetctl("bootstrap", "--config", str(stage), "--dry-run", token="glpat-owner-api")

    # then
    assert result.exit_code == 1
    assert "instance_type runners need an administrator's token" in result.output


# -- signing only where GitLab signs -----------------------------------------------------------------------------


def signed_stage(workdir: Path) -> Path:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["webhook"]["signing_secret_parameter"] = SIGNING_PARAMETER
    config = workdir / "signed.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def signed_sandbox(tmp_path_factory: pytest.TempPathFactory, gitlab_version: str) -> Iterator[Sandbox]:
    """A sandbox whose stage names a signing parameter, on a GitLab of ``gitlab_version``. One sandbox at a time:
    a sandbox points the process's environment (AWS endpoint, stage file) at itself."""
    workdir = tmp_path_factory.mktemp(f"gitlab-{gitlab_version}")
    stack = Sandbox(config_path=signed_stage(workdir), workdir=workdir, run_pump=False, gitlab_version=gitlab_version)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def old_gitlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from signed_sandbox(tmp_path_factory, "17.9.0")


@pytest.fixture
def gitlab_19(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from signed_sandbox(tmp_path_factory, "19.0.0")


def delivered_statuses(stack: Sandbox) -> set[int | None]:
    """Create a one-job pipeline; the statuses the webhook answered its Job Hooks with."""
    before = len(stack.gitlab.deliveries)
    stack.gitlab.create_pipeline(stack.project_id, [{"name": "a", "tags": ["docker"]}])
    stack.gitlab.wait_for_deliveries()
    return {d.status_code for d in stack.gitlab.deliveries[before:] if d.event == "Job Hook"}


def test_on_gitlab_before_19_signing_stays_off_and_deliveries_are_accepted(old_gitlab: Sandbox) -> None:
    # given the stage names a signing parameter; the sandbox connected the hook at start
    # then connect said why signing is off, stored no secret but "unsigned", and unsigned deliveries are accepted
    assert "signed webhooks need GitLab 19.0 or later" in old_gitlab.signing
    assert "signing" not in old_gitlab.secrets()
    assert signing_parameter(old_gitlab) == UNSIGNED
    assert delivered_statuses(old_gitlab) == {200}


def test_on_gitlab_19_signing_follows_the_feature_flag(gitlab_19: Sandbox) -> None:
    from fleetctl.sandbox.stack import GITLAB_OPERATOR_TOKEN

    # given GitLab 19.0 with the webhook_signing_token flag off: connect at start said so, stored nothing
    assert "webhook_signing_token feature flag is off" in gitlab_19.signing
    assert "signing" not in gitlab_19.secrets()
    assert signing_parameter(gitlab_19) == UNSIGNED
    assert delivered_statuses(gitlab_19) == {200}

    # when an administrator enables the flag and the operator connects again
    gitlab_19.gitlab.enable_feature("webhook_signing_token")
    result = fleetctl(*connect_args(gitlab_19), token=GITLAB_OPERATOR_TOKEN, env=gitlab_19.aws.environment())

    # then signing is on: the secret is stored, GitLab signs, the webhook verifies
    assert result.exit_code == 0, result.output
    assert "signing: on" in result.output
    assert gitlab_19.secrets()["signing"].startswith("whsec_")
    assert delivered_statuses(gitlab_19) == {200}
    signed = [d for d in gitlab_19.gitlab.deliveries if d.event == "Job Hook"][-1]
    assert signed.status_code == 200


def signing_parameter(stack: Sandbox) -> str:
    from chalicelib import runtime

    return str(runtime.aws().ssm.get_parameter(Name=SIGNING_PARAMETER, WithDecryption=True)["Parameter"]["Value"])

"""The ``fleetctl`` command line: validate, policies, bootstrap, doctor, ami publish, image, gitlab connect, status,
drain, undrain, reconcile, sandbox."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from chalicelib.errors import ConfigError

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RUNNER_FLEET_CONFIG",
    required=True,
    help="Stage configuration file (YAML or JSON). Defaults to $RUNNER_FLEET_CONFIG.",
)


def _load(config_path: Path) -> Any:
    from chalicelib.config import load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _clients(config: Any) -> Any:
    from chalicelib.aws import AwsClients

    return AwsClients(region=config.region)


class FleetctlGroup(click.Group):
    """The command group that answers what a person can act on (no credentials, an unreachable AWS or GitLab, a
    refused token, a missing resource) with one line naming it and what to do, and exit status 1. The traceback
    shows only with ``fleetctl --debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            from fleetctl.errors import explain

            message = explain(exc)
            if message is None or ctx.params.get("debug"):
                raise
            raise click.ClickException(f"{message} (fleetctl --debug shows the traceback)") from None


@click.group(cls=FleetctlGroup)
@click.option("--debug", is_flag=True, envvar="FLEETCTL_DEBUG", help="Show the traceback of any error.")
def main(debug: bool) -> None:
    """Operate a runner-fleet: autoscaled GitLab CI runners on EC2 spot."""


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--chalice-config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Chalice's config.json to check against the file (default: .chalice/config.json of this project).",
)
@click.option(
    "--aws",
    "against_aws",
    is_flag=True,
    help="Also check the file against the live account (its region, the standard AWS credentials): each pool's "
    "subnets exist, in distinct Availability Zones, and spot pools have EC2 Spot's service-linked role.",
)
def validate(config_file: Path, chalice_config: Path | None, against_aws: bool) -> None:
    """Check a stage configuration file, and the Chalice stage that loads it; print every problem."""
    from chalicelib.config import load_config

    try:
        config = load_config(config_file)
    except ConfigError as exc:
        click.echo(f"{config_file}: {len(exc.problems)} problem(s)", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    click.echo(
        f"{config_file}: valid ({config.fleet}, {len(config.pools)} pools: "
        + ", ".join(p.name for p in config.pools)
        + ")"
    )
    problems = _chalice_drift(config, config_file, chalice_config)
    if problems:
        click.echo(f"{problems[0]}", err=True)
        for problem in problems[1:]:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    if against_aws:
        from fleetctl.bootstrap import account_problems

        found = account_problems(config, _clients(config))
        if found:
            click.echo(f"{config_file}: {len(found)} problem(s) in account region {config.region}", err=True)
            for problem in found:
                click.echo(f"  {problem}", err=True)
            sys.exit(1)
        click.echo(f"{config_file}: the account in {config.region} has what the pools need")


def _chalice_drift(config: Any, config_file: Path, chalice_config: Path | None) -> list[str]:
    """What disagrees between the stage file and the Chalice stages whose RUNNER_FLEET_CONFIG names it.

    The first line says what was compared; no line at all means no drift. A file no stage names is not a
    deployed stage (a sandbox or a draft): nothing to compare.
    """
    from chalicelib.config import CONFIG_ENV_VAR
    from chalicelib.intake.settings import settings_drift
    from fleetctl.lambda_policies import CHALICE_CONFIG, chalice_stages, stage_config_path, stage_policy_files

    chalice_config = chalice_config or CHALICE_CONFIG
    if not chalice_config.is_file():
        return []
    target = config_file.resolve()
    problems: list[str] = []
    for stage, settings in chalice_stages(chalice_config).items():
        if CONFIG_ENV_VAR not in settings.get("environment_variables", {}):
            continue
        if stage_config_path(chalice_config, stage).resolve() != target:
            continue
        # Chalice merges the top-level, stage and function environments, the later winning.
        top = json.loads(chalice_config.read_text()).get("environment_variables", {})
        environment = {**top, **settings["environment_variables"]}
        problems += [
            f"stage {stage}: environment_variables.{problem}" for problem in settings_drift(config, environment)
        ]
        for function, function_settings in settings.get("lambda_functions", {}).items():
            if function_settings.get("environment_variables"):
                merged = {**environment, **function_settings["environment_variables"]}
                problems += [
                    f"stage {stage}: lambda_functions.{function}.environment_variables.{problem}"
                    for problem in settings_drift(config, merged)
                ]
        for policy in stage_policy_files(config, stage, chalice_config):
            if not policy.path.is_file():
                problems.append(
                    f"stage {stage}: {policy.path.name} is missing; run 'fleetctl policies --stage {stage}'"
                )
            elif not policy.is_current():
                problems.append(f"stage {stage}: {policy.path.name} is stale; run 'fleetctl policies --stage {stage}'")
    if problems:
        problems.insert(0, f"{chalice_config}: {len(problems)} problem(s) against {config_file}")
    return problems


@main.command()
@click.option("--stage", type=click.Choice(["dev", "prod", "all"]), default="all", show_default=True)
@click.option("--check", is_flag=True, help="Write nothing; exit 1 naming each policy file that is stale.")
@click.option(
    "--chalice-config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Chalice's config.json naming the stages and policy files (default: .chalice/config.json of this project).",
)
def policies(stage: str, check: bool, chalice_config: Path | None) -> None:
    """Generate the Lambda functions' IAM policies into .chalice/ from each stage's file."""
    from fleetctl.lambda_policies import CHALICE_CONFIG, chalice_stages, iter_policy_files

    chalice_config = chalice_config or CHALICE_CONFIG
    stages = sorted(chalice_stages(chalice_config)) if stage == "all" else [stage]
    try:
        files = list(iter_policy_files(stages, chalice_config))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stale = [policy for policy in files if not policy.is_current()]
    if check:
        for policy in stale:
            click.echo(f"stale: {policy.path.name} (run 'fleetctl policies --stage {policy.stage}')", err=True)
        if stale:
            sys.exit(1)
        click.echo(f"{len(files)} policy files current")
        return
    for policy in stale:
        policy.path.write_text(policy.text)
        click.echo(f"wrote {policy.path.name}")
    click.echo(f"{len(files)} policy files, {len(stale)} written")


@main.command()
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Print the plan without changing anything.")
def bootstrap(config_path: Path, dry_run: bool) -> None:
    """Create or update the resources chalice deploy does not (idempotent).

    With GITLAB_TOKEN set, the token is first checked with GitLab (scopes read_api, create_runner and
    manage_runner, or api; an administrator's for instance runners) and stored only if it passes."""
    from fleetctl.bootstrap import Bootstrapper, Verb, check_fleet_token
    from fleetctl.gitlab_token import GitLabTokenError

    config = _load(config_path)
    gitlab_token = os.environ.get("GITLAB_TOKEN")
    if gitlab_token:
        try:
            check_fleet_token(config, gitlab_token)
        except GitLabTokenError as exc:
            raise click.ClickException(str(exc)) from None
    bootstrapper = Bootstrapper(config, _clients(config), gitlab_token=gitlab_token)
    plan = bootstrapper.plan()
    for change in plan:
        click.echo(("would " if dry_run else "") + change.describe())
    invalid = [change for change in plan if change.verb is Verb.INVALID]
    if invalid:
        raise click.ClickException(f"{len(invalid)} invalid change(s) in the plan; nothing was changed")
    if not dry_run:
        for line in bootstrapper.execute(plan):
            click.echo(line)


@main.command()
@CONFIG_OPTION
@click.option(
    "--stage",
    envvar="RUNNER_FLEET_STAGE",
    default=None,
    help="Chalice stage whose deployed functions to check (default: the stage whose RUNNER_FLEET_CONFIG names the "
    "file). Defaults to $RUNNER_FLEET_STAGE.",
)
@click.option(
    "--webhook-url",
    envvar="RUNNER_FLEET_WEBHOOK_URL",
    default=None,
    help="The deployed webhook URL the hooks must name (default: from .chalice/deployed/<stage>.json). "
    "Defaults to $RUNNER_FLEET_WEBHOOK_URL.",
)
@click.option(
    "--gitlab-token",
    envvar="GITLAB_TOKEN",
    default=None,
    help="API token to read the hooks with. Defaults to $GITLAB_TOKEN, else the config's gitlab.token_parameter "
    "(whose token is checked in any case).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(
    config_path: Path, stage: str | None, webhook_url: str | None, gitlab_token: str | None, as_json: bool
) -> None:
    """Pre-flight of a deployed stage: every check passes or says what is wrong and the command that fixes it.

    Exits 1 when any check fails. Reads only; changes nothing."""
    from chalicelib.config import load_config
    from fleetctl.doctor import Doctor, Finding, stage_naming
    from fleetctl.lambda_policies import CHALICE_CONFIG

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        findings = [Finding("config", False, problem, f"correct {config_path}") for problem in exc.problems]
        _print_findings(findings, as_json)
        sys.exit(1)
    clients = _clients(config)
    # Credentials first: without them every check would fail alike (the one line comes from FleetctlGroup).
    clients.client("sts").get_caller_identity()
    checker = Doctor(
        config,
        config_path,
        clients,
        drift=lambda: _chalice_drift(config, config_path, None),
        chalice_config=CHALICE_CONFIG,
        stage=stage or stage_naming(config_path, CHALICE_CONFIG),
        webhook_url=webhook_url,
        gitlab_token=gitlab_token,
    )
    findings = checker.run()
    _print_findings(findings, as_json)
    if not all(finding.ok for finding in findings):
        sys.exit(1)


def _print_findings(findings: list[Any], as_json: bool) -> None:
    failed = [finding for finding in findings if not finding.ok]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": [f.as_dict() for f in findings]}, sort_keys=True))
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(soft_wrap=True, highlight=False)
    for finding in findings:
        line = Text()
        line.append("pass " if finding.ok else "FAIL ", style="green" if finding.ok else "bold red")
        line.append(f"{finding.check}: ", style="bold")
        line.append(finding.detail)
        console.print(line)
        if not finding.ok and finding.fix:
            console.print(Text(f"     fix: {finding.fix}", style="yellow"))
    checks = len({finding.check for finding in findings})
    failing = sorted({finding.check for finding in failed}, key=[f.check for f in findings].index)
    verdict = f"{len(failed)} failed ({', '.join(failing)})" if failed else "all passed"
    console.print(Text(f"{checks} checks, {verdict}", style="bold red" if failed else "bold green"))


@main.group()
def ami() -> None:
    """Runner AMIs: one per architecture, built with runner_ami/'s Packer template."""


@ami.command("publish")
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--stage",
    default=None,
    help="Stage whose ami_parameter to write, its file found through .chalice/config.json (or use --config).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RUNNER_FLEET_CONFIG",
    default=None,
    help="Stage configuration file, instead of --stage. Defaults to $RUNNER_FLEET_CONFIG.",
)
def ami_publish(manifest: Path, stage: str | None, config_path: Path | None) -> None:
    """Publish the AMIs of Packer's MANIFEST (manifest.json) to <ami_parameter>/<arch> of the stage.

    Each build's custom_data.arch names its architecture; its AMI in the stage's region must exist in EC2 with
    that architecture, or nothing is written. Bootstrap then gives each pool the AMI of its instance types'
    architecture."""
    from fleetctl.ami import ManifestError, built_amis, parse_manifest, publish_amis

    if stage is not None:
        from fleetctl.lambda_policies import CHALICE_CONFIG, chalice_stages, stage_config_path

        stages = chalice_stages(CHALICE_CONFIG)
        if stage not in stages:
            raise click.BadParameter(f"{stage!r} is not a stage of {CHALICE_CONFIG}: {', '.join(sorted(stages))}")
        config_path = stage_config_path(CHALICE_CONFIG, stage)
    if config_path is None:
        raise click.UsageError("name the stage: --stage S, --config FILE or $RUNNER_FLEET_CONFIG")
    config = _load(config_path)
    clients = _clients(config)
    try:
        amis = built_amis(
            parse_manifest(manifest.read_text(), str(manifest)), clients.ec2.meta.region_name, str(manifest)
        )
        published = publish_amis(config, clients, amis, str(manifest))
    except ManifestError as exc:
        raise click.ClickException(f"{exc}; nothing was published") from None
    for publication in published:
        click.echo(publication.describe())


@main.group()
def image() -> None:
    """CI image rotation: each pool's digest and its history, rollback, pin and unpin."""


def _image_commands(config_path: Path) -> Any:
    from fleetctl.images import ImageCommands

    config = _load(config_path)
    return ImageCommands(config, _clients(config))


def _image_errors(run: Any) -> Any:
    """``run()``'s answer; a refused command or AWS error becomes a ClickException with its message."""
    from botocore.exceptions import ClientError

    from chalicelib.aws import error_code
    from chalicelib.errors import RunnerFleetError

    try:
        return run()
    except RunnerFleetError as exc:
        raise click.ClickException(str(exc)) from None
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", "")
        raise click.ClickException(f"AWS refused: {error_code(exc)}: {message}") from None


@image.command("history")
@CONFIG_OPTION
@click.argument("pool")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def image_history(config_path: Path, pool: str, as_json: bool) -> None:
    """The pool's current digest, candidate, pin and launch template version, then its history, newest first."""
    from fleetctl.images import print_history, record_document

    commands = _image_commands(config_path)
    record = _image_errors(lambda: commands.history(pool))
    if as_json:
        click.echo(json.dumps(record_document(record), sort_keys=True))
        return
    print_history(record, commands.pool(pool))


@image.command("rollback")
@CONFIG_OPTION
@click.argument("pool")
@click.option("--to", "digest", default=None, help="A digest the pool ran before (default: the last one before).")
def image_rollback(config_path: Path, pool: str, digest: str | None) -> None:
    """Pin the pool to a digest it ran before and roll it out; pushes wait until ``fleetctl image unpin``."""
    commands = _image_commands(config_path)
    for line in _image_errors(lambda: commands.rollback(pool, digest)):
        click.echo(line)


@image.command("pin")
@CONFIG_OPTION
@click.argument("pool")
@click.argument("digest")
def image_pin(config_path: Path, pool: str, digest: str) -> None:
    """Pin the pool to DIGEST, which ECR must have in the pool's repository, and roll it out."""
    commands = _image_commands(config_path)
    for line in _image_errors(lambda: commands.pin(pool, digest)):
        click.echo(line)


@image.command("unpin")
@CONFIG_OPTION
@click.argument("pool")
def image_unpin(config_path: Path, pool: str) -> None:
    """Let pushes move the pool again; a push that came while it was pinned is decided now."""
    commands = _image_commands(config_path)
    for line in _image_errors(lambda: commands.unpin(pool)):
        click.echo(line)


@main.group()
def gitlab() -> None:
    """GitLab side of the fleet."""


@gitlab.command("connect")
@CONFIG_OPTION
@click.option("--project", "project_id", required=True, help="Project id or path.")
@click.option(
    "--url",
    "webhook_url",
    envvar="RUNNER_FLEET_WEBHOOK_URL",
    required=True,
    help="The deployed webhook URL (…/webhooks/gitlab). Defaults to $RUNNER_FLEET_WEBHOOK_URL.",
)
@click.option("--gitlab-url", envvar="GITLAB_URL", help="Defaults to $GITLAB_URL, else the config's gitlab.url.")
@click.option(
    "--gitlab-token", envvar="GITLAB_TOKEN", required=True, help="API token (scope api). Defaults to $GITLAB_TOKEN."
)
def gitlab_connect(
    config_path: Path, project_id: str, webhook_url: str, gitlab_url: str | None, gitlab_token: str
) -> None:
    """Create or update the project webhook (job events, secret token from SSM), and record it for ``status``.

    When the stage names webhook.signing_secret_parameter, signing is turned on only if GitLab answers that it
    took the signing secret (GitLab 19.0 with the webhook_signing_token flag); otherwise it says why and the
    webhook keeps checking X-Gitlab-Token alone."""
    from chalicelib.store import FleetStore
    from fleetctl.gitlab_connect import connect
    from fleetctl.gitlab_token import GitLabTokenError

    config = _load(config_path)
    clients = _clients(config)
    url = gitlab_url or config.gitlab.url
    try:
        result = connect(
            config,
            clients.ssm,
            gitlab_url=url,
            gitlab_token=gitlab_token,
            project_id=project_id,
            webhook_url=webhook_url,
        )
    except GitLabTokenError as exc:
        raise click.ClickException(str(exc)) from None
    hook = result.hook
    FleetStore(config.state.table, clients.dynamodb).record_hook(hook.project_id, hook.hook_id, url, webhook_url)
    for line in result.describe(project_id, webhook_url):
        click.echo(line)


@main.command()
@CONFIG_OPTION
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object, of the stable schema fleetctl/status_schema.json (docs/status.md).",
)
@click.option(
    "--watch",
    type=click.FloatRange(min=1.0),
    is_flag=False,
    flag_value=5.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh the table in place every SECONDS (default 5) until Ctrl-C.",
)
@click.option(
    "--gitlab-token",
    envvar="GITLAB_TOKEN",
    help="API token to read the hooks with. Defaults to $GITLAB_TOKEN, else the config's gitlab.token_parameter.",
)
def status(config_path: Path, as_json: bool, watch: float | None, gitlab_token: str | None) -> None:
    """Each pool's runners (by state and spot / on-demand), jobs waiting, leases, image roll-out, oldest idle
    runner, reaped in the last hour and drain state; jobs by status (and those never queued), the fleet's
    invariants, and whether GitLab still executes each hook ``gitlab connect`` made."""
    if as_json and watch is not None:
        raise click.UsageError("--watch refreshes the table; --json prints one document")
    config = _load(config_path)
    summarise = _status_reader(config, _clients(config), gitlab_token)
    if as_json:
        click.echo(json.dumps(summarise(), sort_keys=True))
        return
    from rich.console import Console

    from fleetctl.status import render

    console = Console()
    if watch is None:
        console.print(render(summarise()), crop=False)
        return
    from rich.live import Live

    try:
        with Live(render(summarise(), fold=True), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                live.update(render(summarise(), fold=True), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends; Live has put the terminal back


def _status_reader(config: Any, clients: Any, gitlab_token: str | None) -> Any:
    """A function reading the status summary afresh (facts from AWS and GitLab, the table, the hooks) each call."""
    from chalicelib.lifecycle.facts import FactSource, gather_or_none
    from chalicelib.scaling.store import ScaleStore
    from chalicelib.store import FleetStore
    from fleetctl.status import fleet_status, invariant_report

    source = FactSource(
        config,
        ScaleStore(config.state.table, clients.dynamodb),
        clients.ec2,
        _gitlab_api(config, clients, gitlab_token),
    )
    store = FleetStore(config.state.table, clients.dynamodb)
    read_hook = _hook_reader(config, clients, gitlab_token)

    def summarise() -> dict[str, Any]:
        facts = gather_or_none(source, tokens=True)
        summary = fleet_status(config, store, read_hook, facts)
        summary["invariants"] = invariant_report(config, facts)
        return summary

    return summarise


def _drained_pool(config_path: Path, pool: str) -> tuple[Any, Any]:
    """The stage's config and the scale store, once ``pool`` is known to be one of its pools."""
    from chalicelib.scaling.store import ScaleStore

    config = _load(config_path)
    try:
        config.pool(pool)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="POOL") from None
    return config, ScaleStore(config.state.table, _clients(config).dynamodb)


@main.command()
@CONFIG_OPTION
@click.argument("pool")
@click.option("--no-wait", is_flag=True, help="Drain and return at once, without following the pool to empty.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=10.0,
    show_default=True,
    help="Seconds between progress reads.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Give up waiting (exit 1, the pool stays drained) after this many seconds; default: wait until empty.",
)
def drain(config_path: Path, pool: str, no_wait: bool, interval: float, timeout: float | None) -> None:
    """Stop launching for POOL and retire its runners: idle ones at reconcile's next run, busy ones once their job
    is done (they take no other). Jobs for the pool wait, queued, until ``fleetctl undrain POOL``. Prints the
    progress (runners left, busy and idle, jobs waiting) until the pool is empty, unless --no-wait."""
    from fleetctl.drain import drain_progress
    from fleetctl.images import iso

    _, store = _drained_pool(config_path, pool)
    counter = store.capacity.set_drained(pool, True)
    click.echo(
        f"{pool} drained since {iso(counter.drained_at)}: nothing launches for it and its jobs wait; "
        "reconcile retires its runners, busy ones once their job is done"
    )
    progress = drain_progress(store, pool)
    click.echo(progress.line())
    if no_wait:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not progress.empty:
            if deadline is not None and time.monotonic() >= deadline:
                click.echo(f"{pool} is not empty yet; it stays drained", err=True)
                sys.exit(1)
            time.sleep(interval)
            latest = drain_progress(store, pool)
            if not latest.drained:
                click.echo(f"{pool} was undrained meanwhile", err=True)
                sys.exit(1)
            if latest != progress:
                click.echo(latest.line())
            progress = latest
    except KeyboardInterrupt:
        click.echo(f"stopped following; {pool} stays drained ('fleetctl undrain {pool}' undoes it)")
        return
    click.echo(f"{pool} is empty; {progress.jobs_waiting} job(s) wait for 'fleetctl undrain {pool}'")


@main.command()
@CONFIG_OPTION
@click.argument("pool")
def undrain(config_path: Path, pool: str) -> None:
    """Let POOL launch again: the jobs waiting for it launch at their next turn in the queue. Runners already paused
    for retirement are retired all the same."""
    from fleetctl.drain import drain_progress

    _, store = _drained_pool(config_path, pool)
    store.capacity.set_drained(pool, False)
    progress = drain_progress(store, pool)
    click.echo(f"{pool} undrained: {progress.jobs_waiting} job(s) waiting launch at their next turn")


def _token_reader(config: Any, clients: Any, gitlab_token: str | None) -> Any:
    """``gitlab_token``, else the fleet's own API token from SSM, read once, when first needed; raises
    GitLabUnavailableError when it cannot be read."""
    from botocore.exceptions import BotoCoreError, ClientError

    from chalicelib.aws import error_code
    from chalicelib.errors import GitLabUnavailableError

    tokens: list[str] = [gitlab_token] if gitlab_token else []

    def token() -> str:
        if not tokens:
            name = config.gitlab.token_parameter
            try:
                found = clients.ssm.get_parameter(Name=name, WithDecryption=True)
            except ClientError as exc:
                raise GitLabUnavailableError(f"no GitLab token: {name} unreadable ({error_code(exc)})") from None
            except BotoCoreError as exc:
                raise GitLabUnavailableError(f"no GitLab token: {name} unreadable ({type(exc).__name__})") from None
            tokens.append(str(found["Parameter"]["Value"]))
        return tokens[0]

    return token


def _gitlab_api(config: Any, clients: Any, gitlab_token: str | None) -> Any:
    """The fleet's GitLab API client, as the Lambdas build it, with the operator's token or the fleet's."""
    from chalicelib.errors import GitLabUnavailableError, RetryableError
    from chalicelib.gitlab_api import GitLabApi

    read_token = _token_reader(config, clients, gitlab_token)

    def token() -> str:
        try:
            return str(read_token())
        except GitLabUnavailableError as exc:
            raise RetryableError(exc.reason) from None

    gitlab = config.gitlab
    return GitLabApi(gitlab.url, token, runner_type=gitlab.runner_type, owner_id=gitlab.runner_owner_id)


def _hook_reader(config: Any, clients: Any, gitlab_token: str | None) -> Any:
    """Reads a recorded hook from GitLab with ``gitlab_token``, else the fleet's own API token from SSM (read once,
    when the first hook is read)."""
    from chalicelib.store import HookRecord
    from fleetctl.gitlab_connect import HookState, read_project_hook

    token = _token_reader(config, clients, gitlab_token)

    def read(hook: HookRecord) -> HookState:
        return read_project_hook(hook.gitlab_url or config.gitlab.url, token(), hook.project_id, hook.hook_id)

    return read


@main.command()
@CONFIG_OPTION
@click.option("--once", is_flag=True, help="One run, then exit (else a run every --interval seconds).")
@click.option("--interval", type=click.IntRange(10, 3600), default=60, show_default=True)
@click.option(
    "--gitlab-token",
    envvar="GITLAB_TOKEN",
    help="API token to use. Defaults to $GITLAB_TOKEN, else the config's gitlab.token_parameter.",
)
def reconcile(config_path: Path, once: bool, interval: int, gitlab_token: str | None) -> None:
    """Run reconcile as the scheduled Lambda does: reap orphans, settle stale launches, retire old runners,
    recover lost jobs and keep warm pools warm. Prints each run's report as JSON."""
    import time

    from chalicelib.lifecycle.reconcile import build_reconciler
    from chalicelib.scaling.scale_up import build_scale_up

    config = _load(config_path)
    clients = _clients(config)
    gitlab = _gitlab_api(config, clients, gitlab_token)
    reconciler = build_reconciler(config, clients, gitlab, lambda: build_scale_up(config, clients, gitlab))
    while True:
        click.echo(json.dumps(reconciler.run().as_dict(), sort_keys=True))
        if once:
            return
        time.sleep(interval)


# -- sandbox ----------------------------------------------------------------------------------------------------


@main.group()
def sandbox() -> None:
    """The local sandbox: moto server, GitLab emulator, served webhook, event pump."""


def _state_file() -> Path:
    from fleetctl.sandbox.stack import DEFAULT_WORKDIR

    return DEFAULT_WORKDIR / "state.json"


def _print_exports(exports: dict[str, str]) -> None:
    for key, value in exports.items():
        click.echo(f"export {key}={shlex.quote(value)}")


@sandbox.command("up")
@click.option("--detach", is_flag=True, help="Run in the background and print shell export lines.")
def sandbox_up(detach: bool) -> None:
    """Start the sandbox (foreground until Ctrl-C, or --detach)."""
    state_file = _state_file()
    if state_file.exists():
        if _is_sandbox(int(json.loads(state_file.read_text())["pid"])):
            raise click.ClickException(f"a sandbox is already up ({state_file}); run 'fleetctl sandbox down'")
        state_file.unlink()  # left behind by a sandbox that did not stop cleanly
    if detach:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        log = (state_file.parent / "sandbox.log").open("wb")
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "fleetctl.cli", "sandbox", "up"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not state_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise click.ClickException(f"sandbox did not start; see {state_file.parent / 'sandbox.log'}")
            time.sleep(0.2)
        _print_exports(json.loads(state_file.read_text())["exports"])
        return
    from fleetctl.sandbox.stack import Sandbox

    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with Sandbox(schedule_every=60.0) as stack:
        exports = stack.exports()
        # Written aside and renamed into place: `up --detach` reads the file as soon as it exists, and must never
        # see it created but not yet written.
        partial = state_file.with_name(f"{state_file.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps({"pid": os.getpid(), "exports": exports}))
        partial.replace(state_file)
        try:
            _print_exports(exports)
            click.echo("# sandbox up; Ctrl-C (or 'fleetctl sandbox down') stops it", err=True)
            while not stopping:
                time.sleep(0.2)
        finally:
            state_file.unlink(missing_ok=True)


@sandbox.command("down")
def sandbox_down() -> None:
    """Stop a detached sandbox and every process it started."""
    state_file = _state_file()
    if not state_file.exists():
        click.echo("no sandbox is up")
        return
    pid = int(json.loads(state_file.read_text())["pid"])
    if not _is_sandbox(pid):
        # A stale file (after a reboot or a kill -9): the pid may belong to something else by now.
        state_file.unlink(missing_ok=True)
        click.echo("sandbox was not running")
        return
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone
    state_file.unlink(missing_ok=True)
    click.echo("sandbox stopped")


def _is_sandbox(pid: int) -> bool:
    """Whether ``pid`` is a running ``fleetctl sandbox up`` (read from /proc, without signalling it)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # `python -m fleetctl.cli sandbox up` (detached) or the `fleetctl sandbox up` console script
    launcher = any(part.endswith((b"fleetctl.cli", b"/fleetctl", b"fleetctl")) for part in command)
    return launcher and b"sandbox" in command and b"up" in command


@sandbox.command("pipeline")
@click.option(
    "--project",
    "project_id",
    envvar="RUNNER_FLEET_SANDBOX_PROJECT",
    required=True,
    help="Project id in the sandbox's GitLab. Defaults to $RUNNER_FLEET_SANDBOX_PROJECT.",
)
@click.option("--jobs", "count", type=click.IntRange(1, 5000), default=5, show_default=True)
@click.option("--tags", default="", help="Comma-separated job tags; empty for untagged jobs.")
@click.option("--gitlab-url", envvar="GITLAB_URL", required=True, help="Defaults to $GITLAB_URL.")
@click.option("--gitlab-token", envvar="GITLAB_TOKEN", required=True, help="Defaults to $GITLAB_TOKEN.")
def sandbox_pipeline(project_id: str, count: int, tags: str, gitlab_url: str, gitlab_token: str) -> None:
    """Create a pipeline of N jobs in the running sandbox's GitLab; their Job Hooks follow."""
    import requests

    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    jobs = [{"name": f"job-{i + 1}", "stage": "test", "tags": tag_list} for i in range(count)]
    answer = requests.post(
        f"{gitlab_url.rstrip('/')}/api/v4/projects/{project_id}/pipeline",
        json={"ref": "main", "jobs": jobs},
        headers={"PRIVATE-TOKEN": gitlab_token},
        timeout=30,
    )
    if answer.status_code != 201:
        raise click.ClickException(f"GitLab answered {answer.status_code}: {answer.text[:200]}")
    pipeline = answer.json()
    click.echo(
        f"created pipeline {pipeline['id']} in project {project_id}: {count} jobs tagged "
        f"{','.join(tag_list) or '(untagged)'}"
    )


@sandbox.command("demo")
@click.option("--jobs", default=6, show_default=True, help="Jobs in the demo pipeline.")
def sandbox_demo(jobs: int) -> None:
    """Run the end-to-end scenario; the last line is a JSON summary with "ok"."""
    # The handlers' structured logs and EMF lines would drown the story; `sandbox up` keeps them in its log.
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    from fleetctl.sandbox.scenario import run_demo

    summary = run_demo(jobs=jobs)
    click.echo(json.dumps(summary, sort_keys=True))
    if not summary["ok"]:
        sys.exit(1)


# The fleet simulator's commands live in their own package (fleetctl/simulate, docs/simulate.md).
from fleetctl.simulate.cli import simulate as simulate_group  # noqa: E402

main.add_command(simulate_group, "simulate")


if __name__ == "__main__":
    main()

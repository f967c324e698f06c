"""``fleetctl simulate``: replay a job history against the stage configuration (and variations of it), and
``fleetctl simulate generate``: write a reference trace. The heavy imports happen inside the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from chalicelib.errors import RunnerFleetError


@click.group(invoke_without_command=True)
@click.option(
    "--history",
    "history_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Job history, .jsonl or .csv (docs/simulate.md).",
)
@click.option(
    "--gitlab-project",
    "gitlab_projects",
    default=None,
    help="Read the history from GitLab instead: project ids or paths, comma-separated.",
)
@click.option("--since", default="14d", show_default=True, help="How far back to read from GitLab (s, m, h, d, w).")
@click.option("--gitlab-url", envvar="GITLAB_URL", default=None, help="Defaults to $GITLAB_URL.")
@click.option("--gitlab-token", envvar="GITLAB_TOKEN", default=None, help="Defaults to $GITLAB_TOKEN (scope read_api).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RUNNER_FLEET_CONFIG",
    default=None,
    help="Stage configuration to simulate. Defaults to $RUNNER_FLEET_CONFIG.",
)
@click.option(
    "--prices",
    "prices_from",
    default=None,
    help="A price file (same shape as the snapshot), or 'aws' to read today's prices. Default: the snapshot shipped.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of every random draw.")
@click.option(
    "--boot",
    default=None,
    help="Boot time: fixed:V, uniform:LOW,HIGH or lognormal:MEDIAN,SIGMA seconds (default lognormal:40,0.25).",
)
@click.option(
    "--image-pull", default=None, help="Image pull on an instance's first job, same forms (default lognormal:15,0.5)."
)
@click.option(
    "--interruption-rate",
    multiple=True,
    help="Spot interruptions per instance-hour, POOL=RATE or RATE for all (default 0.002).",
)
@click.option(
    "--capacity-error-rate",
    default=0.0,
    show_default=True,
    help="Share of spot CreateFleet calls refused for capacity.",
)
@click.option(
    "--vary",
    "varies",
    multiple=True,
    help="key=v1,v2,...: run every combination, e.g. pools.docker.idle_wait_seconds=60,300.",
)
@click.option(
    "--max-wait",
    type=float,
    default=None,
    help="The p95 wait target for picking a policy (default: the boot median + 15 s).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a self-contained HTML report here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def simulate(ctx: click.Context, /, **options: Any) -> None:
    """Replay a job history against the stage configuration: cost, queue wait and API load, per pool."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        _simulate(**options)
    except RunnerFleetError as exc:
        raise click.ClickException(str(exc)) from None


def _simulate(
    history_path: Path | None,
    gitlab_projects: str | None,
    since: str,
    gitlab_url: str | None,
    gitlab_token: str | None,
    config_path: Path | None,
    prices_from: str | None,
    seed: int,
    boot: str | None,
    image_pull: str | None,
    interruption_rate: tuple[str, ...],
    capacity_error_rate: float,
    varies: tuple[str, ...],
    max_wait: float | None,
    html_path: Path | None,
    as_json: bool,
) -> None:
    from chalicelib.config import load_config
    from fleetctl.simulate.history import load_history
    from fleetctl.simulate.model import DEFAULT_BOOT, DEFAULT_IMAGE_PULL, Distribution, Model, parse_rates
    from fleetctl.simulate.report import chosen, detail, pareto_front, render_html, table
    from fleetctl.simulate.runs import Vary, grid, run

    if config_path is None:
        raise click.UsageError("--config (or $RUNNER_FLEET_CONFIG) is required")
    if (history_path is None) == (gitlab_projects is None):
        raise click.UsageError("give exactly one of --history FILE and --gitlab-project ID[,ID...]")
    config = load_config(config_path)
    if history_path is not None:
        jobs = load_history(history_path)
        source = str(history_path)
    else:
        jobs = _gitlab_jobs(gitlab_projects or "", since, gitlab_url, gitlab_token)
        source = f"GitLab {gitlab_url} projects {gitlab_projects}, last {since}"
    if not jobs:
        raise click.ClickException(f"{source}: no job to replay")
    prices = _prices(prices_from, config)
    model = Model(
        boot=Distribution.parse(boot, "--boot") if boot else DEFAULT_BOOT,
        image_pull=Distribution.parse(image_pull, "--image-pull") if image_pull else DEFAULT_IMAGE_PULL,
        interruption_rate=parse_rates(interruption_rate, "--interruption-rate") or {"*": 0.002},
        capacity_error_rate=capacity_error_rate,
    )
    combos = grid([Vary.parse(text) for text in varies])
    summaries = [run(config, jobs, prices=prices, model=model, seed=seed, vary=combo) for combo in combos]
    front = pareto_front([(s.total.cost, s.total.wait_p95) for s in summaries])
    target = max_wait if max_wait is not None else model.boot.median + 15.0
    pick = chosen(summaries, front, target)
    inputs = {
        "history": source,
        "jobs": len(jobs),
        "config": str(config_path),
        "prices": f"{prices.source} (as of {prices.as_of})",
        "seed": seed,
        "boot": str(model.boot),
        "image pull": str(model.image_pull),
        "interruptions per instance-hour": dict(model.interruption_rate),
        "capacity error rate": model.capacity_error_rate,
        "vary": list(varies),
        "p95 wait target (s)": target,
    }
    if html_path is not None:
        html_path.write_text(render_html(summaries, front, inputs, pick), encoding="utf-8")
    if as_json:
        document = {
            "inputs": inputs,
            "runs": [s.as_json() for s in summaries],
            "pareto": sorted(front),
            "chosen": pick,
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    if len(summaries) == 1:
        click.echo(detail(summaries[0]))
    else:
        click.echo(table(summaries, front))
        click.echo("* on the Pareto frontier of cost against p95 wait")
    if pick is not None:
        s = summaries[pick]
        click.echo(
            f"cheapest on the frontier with p95 wait <= {target:.0f} s: "
            f"{', '.join(f'{k}={v}' for k, v in s.settings['vary'].items()) or 'the configuration as it is'}: "
            f"cost/floor {s.total.cost_over_floor:.3f}, p95 wait {s.total.wait_p95:.1f} s"
        )
    else:
        click.echo(f"no policy on the frontier has a p95 wait <= {target:.0f} s")
    if any(s.throttled for s in summaries):
        click.echo("some runs would be throttled: see the limits (--json or the single-run output)", err=True)


def _gitlab_jobs(projects: str, since: str, url: str | None, token: str | None) -> list[Any]:
    import gitlab

    from fleetctl.simulate.gitlab_history import parse_since, read_projects

    if not url or not token:
        raise click.UsageError("--gitlab-project needs --gitlab-url and --gitlab-token (or $GITLAB_URL, $GITLAB_TOKEN)")
    refs = [part.strip() for part in projects.split(",") if part.strip()]
    client = gitlab.Gitlab(url, private_token=token, retry_transient_errors=True)
    try:
        return read_projects(client, refs, parse_since(since))
    except gitlab.exceptions.GitlabError as exc:
        raise click.ClickException(f"GitLab refused the job listing: {exc.response_code} {exc.error_message}") from None


def _prices(prices_from: str | None, config: Any) -> Any:
    from fleetctl.simulate.prices import aws_prices, load_prices

    if prices_from == "aws":
        import boto3

        session = boto3.Session()
        if session.get_credentials() is None:
            raise click.ClickException("--prices aws needs AWS credentials (none found); pass --prices FILE instead")
        types = [t for pool in config.pools for t in pool.instance_types]
        return aws_prices(session, config.region or session.region_name or "us-east-1", types)
    return load_prices(prices_from)


@simulate.command("generate")
@click.option("--jobs", "count", type=click.IntRange(1), required=True, help="How many jobs.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL file to write."
)
@click.option("--timezone", default="Europe/Berlin", show_default=True, help="Where the working day is.")
@click.option("--start", default="2026-01-05", show_default=True, help="First day (UTC date, ISO 8601).")
@click.option("--jobs-per-day", type=click.IntRange(1), default=3500, show_default=True)
def generate_command(count: int, seed: int, out_path: Path, timezone: str, start: str, jobs_per_day: int) -> None:
    """Write a seeded reference trace in the --history schema (docs/simulate.md)."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfoNotFoundError

    from fleetctl.simulate.generate import TraceSettings, generate
    from fleetctl.simulate.history import write_history

    try:
        begin = datetime.fromisoformat(start).replace(tzinfo=UTC)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 date: {start!r}", param_hint="--start") from None
    try:
        jobs = generate(TraceSettings(jobs=count, seed=seed, start=begin, timezone=timezone, jobs_per_day=jobs_per_day))
    except (ZoneInfoNotFoundError, ValueError):
        raise click.BadParameter(f"not an IANA time zone: {timezone!r}", param_hint="--timezone") from None
    written = write_history(jobs, out_path)
    click.echo(f"wrote {written} jobs to {out_path}", file=sys.stdout)

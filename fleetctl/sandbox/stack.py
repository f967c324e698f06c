"""The sandbox: local AWS, the GitLab emulator, the served webhook and the event pump, wired together.

It is what ``make demo``, ``fleetctl sandbox up`` and the tests run, so all three exercise the same pieces.
The stage configuration is the shipped ``dev.yaml`` with the GitLab URL pointed at the emulator, written to
the sandbox's work directory and named by ``RUNNER_FLEET_CONFIG`` exactly as a deployed Lambda finds its own.

GitLab is used the way docs/gitlab.md tells an operator to: the fleet makes group runners of the sandbox's group with
a non-administrator token holding exactly the scopes the fleet needs (read_api, create_runner, manage_runner, and
api since its pools retry jobs lost to spot interruptions),
which bootstrap checks and stores; the hook is connected with another non-administrator token of scope api.
What only an administrator could do (groups, projects, feature flags) is seeded from Python, not the API.

The runner instances are played by simulated agents (``fleetctl.sandbox.agents``), one per running instance of the
fleet, unless the sandbox is made with ``agents=False`` (tests that look at instances as scale-up left them). They
idle out after ``SANDBOX_AGENT_OPTIONS.wait_timeout_seconds``, a sandbox-only stand-in for the pools' idle wait,
whose minimum in a stage file (30 s) would make every scenario wait.

The functions are also registered in the local AWS's Lambda as ``chalice deploy --stage dev`` names them, with the
stage's environment from ``.chalice/config.json`` (``RUNNER_FLEET_CONFIG`` naming the sandbox's stage file, which
is the one they load), so that ``fleetctl doctor --stage dev`` reads a deployment as it would in AWS. Invoking them
there would take Docker: the sandbox runs them in its own process, as the module ``pump`` says.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from chalicelib.config import FleetConfig, load_config
from chalicelib.intake.settings import settings_environment
from fleetctl.sandbox.agents import AgentManager, AgentOptions
from fleetctl.sandbox.gitlab_emulator import GitLabEmulator
from fleetctl.sandbox.gitlab_model import Clock, utcnow
from fleetctl.sandbox.local_aws import SANDBOX_REGION, LocalAws
from fleetctl.sandbox.pump import LambdaService
from fleetctl.sandbox.webhook_server import PROJECT_DIR, WebhookServer

DEFAULT_CONFIG = PROJECT_DIR / "chalicelib" / "stages" / "dev.yaml"
DEFAULT_WORKDIR = PROJECT_DIR / ".sandbox"


def without_warm_pools(workdir: Path, name: str, **pool: Any) -> Path:
    """The shipped stage file with no warm pool, and ``pool``'s fields set on every pool, written to ``workdir``:
    a scenario on it ends with nothing running whatever the day and hour (dev.yaml keeps a build runner warm in
    Berlin working hours, and a warm runner stays until its window closes)."""
    import yaml

    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for fields in document["pools"]:
        fields.update(pool, warm={"size": 0, "windows": []})
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / name
    target.write_text(yaml.safe_dump(document))
    return target


SANDBOX_GROUP = "demo"
# The Chalice stage whose functions the sandbox plays (the stage file it starts from is that stage's).
SANDBOX_STAGE = "dev"
SANDBOX_PROJECT = f"{SANDBOX_GROUP}/app"
GITLAB_ADMIN_TOKEN = "glpat-sandbox-admin"  # noqa: S105 - the emulator's fixed local token
# The fleet's own token (what bootstrap stores for scale-up) and the operator's (gitlab connect, pipelines).
GITLAB_FLEET_TOKEN = "glpat-sandbox-fleet"  # noqa: S105 - a fixed local token
# api because the stage file's pools retry jobs lost to spot interruptions (GitLab's jobs API takes no narrower
# scope); the other three are what a fleet that retries none needs.
GITLAB_FLEET_SCOPES = ("read_api", "create_runner", "manage_runner", "api")
GITLAB_OPERATOR_TOKEN = "glpat-sandbox-operator"  # noqa: S105 - a fixed local token
GITLAB_OPERATOR_SCOPES = ("api",)
# Re-queued jobs wait seconds, not minutes, so a scenario plays out while you watch.
SANDBOX_ENVIRONMENT = {
    "RUNNER_FLEET_RETRY_BASE_SECONDS": "1",
    "RUNNER_FLEET_LEASE_WAIT_SECONDS": "2",
    "POWERTOOLS_METRICS_NAMESPACE": "RunnerFleet",
}

# Instances boot in a second and idle out after three (see the module docstring).
SANDBOX_AGENT_OPTIONS = AgentOptions(boot_delay_seconds=1.0, wait_timeout_seconds=3.0)
# Lambda as AWS runs it (fleetctl.sandbox.pump): functions side by side, stopped at their timeouts, and one
# EventBridge event in twenty delivered twice, each up to half a second late, so events for one instance cross.
SANDBOX_LAMBDA = LambdaService(duplicate_share=0.05, reorder_window=0.5)
# AWS's reads lag as they do in AWS (the shim's rules, fleetctl/sandbox/aws_rules), scaled as the sandbox's boots
# are: a new instance missing from DescribeInstances for a second, a global index trailing writes by half a
# second, one BatchGetItem in ten leaving keys unprocessed, EC2's state-change events half a second to a second
# after the call. ``Sandbox(aws_lags=...)`` changes them (a test that needs one off says why).
SANDBOX_AWS_LAGS: dict[str, dict[str, float]] = {
    "ec2-describe-lag": {"seconds": 1.0},
    "dynamodb-index-lag": {"seconds": 0.5},
    "dynamodb-unprocessed-keys": {"share": 0.1, "seed": 16},
    "ec2-state-events": {"running_seconds": 0.5, "terminated_seconds": 1.0, "stopped_seconds": 1.0},
}


@dataclass(frozen=True)
class SandboxPorts:
    aws: int = 0
    gitlab: int = 0
    webhook: int = 0


class Sandbox:
    def __init__(
        self,
        config_path: Path = DEFAULT_CONFIG,
        workdir: Path = DEFAULT_WORKDIR,
        ports: SandboxPorts | None = None,
        *,
        run_pump: bool = True,
        gitlab_version: str = "17.9.0",
        gitlab_features: tuple[str, ...] = (),
        agents: bool = True,
        agent_options: AgentOptions = SANDBOX_AGENT_OPTIONS,
        schedule_every: float | None = None,
        lambda_service: LambdaService = SANDBOX_LAMBDA,
        aws_lags: Mapping[str, Mapping[str, float]] = SANDBOX_AWS_LAGS,
        gitlab_clock: Clock = utcnow,
    ) -> None:
        self._config_path = config_path
        self.workdir = workdir
        self._ports = ports = ports or SandboxPorts()
        self._run_pump = run_pump
        self._lambda_service = lambda_service
        self._aws_lags = aws_lags
        # How often the pump fires the scheduled handlers (reconcile); None: only when asked (tests drive
        # reconcile themselves, on a clock of their choosing).
        self._schedule_every = schedule_every
        self.aws = LocalAws(port=ports.aws)
        # GitLab's idea of now (``gitlab_clock``): a soak moves it on to let StuckCiJobsWorker drop abandoned jobs.
        self.gitlab = GitLabEmulator(
            port=ports.gitlab, admin_token=GITLAB_ADMIN_TOKEN, version=gitlab_version, clock=gitlab_clock
        )
        self.gitlab.add_token(GITLAB_FLEET_TOKEN, scopes=GITLAB_FLEET_SCOPES, name="runner-fleet")
        self.gitlab.add_token(GITLAB_OPERATOR_TOKEN, scopes=GITLAB_OPERATOR_SCOPES, name="operator")
        for feature in gitlab_features:
            self.gitlab.enable_feature(feature)
        self.group_id = 0
        # What the last connect said about signing ("signed", or why not).
        self.signing = ""
        self.server: WebhookServer | None = None
        self.pump: Any = None
        self._stop = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self.project_id = 0
        self._projects = 0
        self._saved_environ: dict[str, str] | None = None
        self.config: FleetConfig | None = None
        self._run_agents = agents
        self._agent_options = agent_options
        # Started with the sandbox when ``agents`` is true; replaced on reset.
        self.agents: AgentManager | None = None

    def start(self) -> Self:
        from chalicelib import runtime

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._saved_environ = dict(os.environ)
        self.aws.start()
        self.aws.export_environment()
        self.gitlab.start()
        self.group_id = self.gitlab.create_group(SANDBOX_GROUP)
        for key, value in SANDBOX_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        self._prepare_aws()
        import app

        self.server = WebhookServer(app.app).start()
        from fleetctl.sandbox.pump import EventPump

        self.pump = EventPump(app.app, runtime.aws(), service=self._lambda_service).connect()
        self._start_pump()
        self.project_id = self.gitlab.create_project(SANDBOX_PROJECT)
        self._projects = 1
        self.connect()
        self._start_agents()
        return self

    def reset(self, config_path: Path | None = None) -> None:
        """Forget every AWS resource and start again from a fresh bootstrap and a new connected project, with the
        stage file ``config_path`` this time when given (else the sandbox's own)."""
        from chalicelib import runtime

        self._stop_agents()
        # The pump stops while AWS forgets its queues, and polls the new ones afterwards.
        self._stop_pump()
        self.aws.reset()
        self._prepare_aws(config_path or self._config_path)
        if self.pump is not None:
            import app
            from fleetctl.sandbox.pump import EventPump

            self.pump.close()
            self.pump = EventPump(app.app, runtime.aws(), service=self._lambda_service).connect()
            self._start_pump()
        self._projects += 1
        self.project_id = self.gitlab.create_project(f"{SANDBOX_PROJECT}-{self._projects}")
        self.connect()
        self._start_agents()

    def bootstrap(self) -> list[str]:
        """``fleetctl bootstrap`` with GITLAB_TOKEN set to the fleet's token: checked with GitLab, then stored."""
        from chalicelib import runtime
        from fleetctl.bootstrap import Bootstrapper, check_fleet_token

        assert self.config is not None
        check_fleet_token(self.config, GITLAB_FLEET_TOKEN)
        bootstrapper = Bootstrapper(self.config, runtime.aws(), gitlab_token=GITLAB_FLEET_TOKEN)
        plan = bootstrapper.plan()
        bootstrapper.execute(plan)
        return [change.describe() for change in plan]

    def connect(self) -> int:
        """``fleetctl gitlab connect`` with the operator's token: connect the hook and record it in the fleet table."""
        from chalicelib import runtime
        from fleetctl.gitlab_connect import connect

        assert self.server is not None and self.config is not None
        result = connect(
            self.config,
            runtime.aws().ssm,
            gitlab_url=self.gitlab.url,
            gitlab_token=GITLAB_OPERATOR_TOKEN,
            project_id=self.project_id,
            webhook_url=self.server.webhook_url,
        )
        self.signing = result.signing
        hook = result.hook
        runtime.store().record_hook(hook.project_id, hook.hook_id, self.gitlab.url, self.server.webhook_url)
        return hook.hook_id

    def secrets(self) -> dict[str, str]:
        """The webhook token, and the signing secret when connect stored one."""
        from chalicelib import runtime
        from chalicelib.intake.secrets import UNSIGNED
        from fleetctl.gitlab_connect import read_parameter

        assert self.config is not None
        ssm = runtime.aws().ssm
        found = {
            "token": ssm.get_parameter(Name=self.config.webhook.token_parameter, WithDecryption=True)["Parameter"][
                "Value"
            ]
        }
        if self.config.webhook.signing_secret_parameter:
            signing = read_parameter(ssm, self.config.webhook.signing_secret_parameter)
            if signing is not None and signing != UNSIGNED:
                found["signing"] = signing
        return found

    def exports(self) -> dict[str, str]:
        assert self.server is not None and self.config is not None
        return {
            **self.aws.environment(),
            "RUNNER_FLEET_CONFIG": os.environ["RUNNER_FLEET_CONFIG"],
            **settings_environment(self.config),
            "RUNNER_FLEET_WEBHOOK_URL": self.server.webhook_url,
            "RUNNER_FLEET_WEBHOOK_SECRET": self.secrets()["token"],
            "GITLAB_URL": self.gitlab.url,
            "GITLAB_TOKEN": GITLAB_OPERATOR_TOKEN,
            "RUNNER_FLEET_SANDBOX_PROJECT": str(self.project_id),
            "RUNNER_FLEET_STAGE": SANDBOX_STAGE,
        }

    def stop(self) -> None:
        self._stop_agents()
        self._stop_pump()
        if self.pump is not None:
            self.pump.close()
        if self.server is not None:
            self.server.stop()
        self.gitlab.stop()
        self.aws.stop()
        if self._saved_environ is not None:
            # Leave the process as it was: a stopped sandbox's endpoint must not linger in the environment.
            os.environ.clear()
            os.environ.update(self._saved_environ)
            self._saved_environ = None
            from chalicelib import runtime

            runtime.reset()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_pump(self) -> None:
        if self._run_pump and self.pump is not None:
            self._stop = threading.Event()
            self._pump_thread = threading.Thread(
                target=self.pump.run,
                args=(self._stop,),
                kwargs={"tick_every": self._schedule_every},
                name="event-pump",
                daemon=True,
            )
            self._pump_thread.start()

    def _stop_pump(self) -> None:
        self._stop.set()
        thread, self._pump_thread = self._pump_thread, None
        if thread is not None:
            thread.join(timeout=10)

    def _start_agents(self) -> None:
        from chalicelib.aws import AwsClients

        if self._run_agents and self.config is not None:
            clients = AwsClients(region=SANDBOX_REGION)
            self.agents = AgentManager(self.config.fleet, clients, self._agent_options).start()

    def _stop_agents(self) -> None:
        agents, self.agents = self.agents, None
        if agents is not None:
            agents.stop()

    def _prepare_aws(self, config_path: Path | None = None) -> None:
        """What an AWS account would already have (a VPC, an AMI), the stage config pointing at it, a bootstrap."""
        from chalicelib import runtime
        from chalicelib.aws import AwsClients
        from fleetctl.sandbox.network import create_sandbox_network, register_sandbox_amis

        for rule, settings in self._aws_lags.items():
            self.aws.shim(rule, "set", **settings)
        clients = AwsClients(region=SANDBOX_REGION)
        network = create_sandbox_network(clients.ec2)
        config_file = self._write_stage_config(
            config_path or self._config_path, network.subnet_ids, network.security_group_id
        )
        os.environ["RUNNER_FLEET_CONFIG"] = str(config_file)
        self.config = load_config(config_file)
        # What .chalice/config.json sets for a deployed stage, from the same stage file.
        os.environ.update(settings_environment(self.config))
        runtime.reset()
        register_sandbox_amis(clients.ssm, clients.ec2, self.config.ami_parameter)
        self.bootstrap()
        register_functions(clients, config_file)

    def _write_stage_config(self, config_path: Path, subnets: tuple[str, ...], security_group: str) -> Path:
        """The stage file, with the emulator's URL and the sandbox network's ids in place."""
        import yaml

        document = yaml.safe_load(config_path.read_text())
        document["gitlab"]["url"] = self.gitlab.url
        # Group runners, so that the fleet's token needs no administrator (see the module docstring).
        document["gitlab"]["runner_type"] = "group_type"
        document["gitlab"]["runner_owner_id"] = self.group_id
        for pool in document["pools"]:
            pool["subnets"] = list(subnets)
            pool["security_groups"] = [security_group]
        target = self.workdir / "fleet.json"
        # Replaced, not rewritten in place: the served webhook and the pump may read it at any moment.
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps(document, indent=2))
        partial.replace(target)
        return target


def register_functions(clients: Any, config_file: Path, stage: str = SANDBOX_STAGE) -> list[str]:
    """Register the stage's functions in the local Lambda, named and configured as ``chalice deploy`` would
    (the API handler ``<app>-<stage>``, each other ``<app>-<stage>-<function>``; the environment merged from the
    top level, the stage and the function of ``.chalice/config.json``), with ``RUNNER_FLEET_CONFIG`` naming
    ``config_file``. Their code is an empty package: nothing invokes them there. Returns their names."""
    import io
    import zipfile

    from fleetctl.lambda_policies import CHALICE_CONFIG, LambdaFunction, function_name

    document = json.loads(CHALICE_CONFIG.read_text())
    app_name = str(document["app_name"])
    settings = document["stages"][stage]
    environment = {**document.get("environment_variables", {}), **settings.get("environment_variables", {})}
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
    role = clients.client("iam").create_role(RoleName=f"{app_name}-{stage}", AssumeRolePolicyDocument=json.dumps(trust))
    package = io.BytesIO()
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("app.py", "")
    lambda_client = clients.client("lambda")
    names = []
    for function in LambdaFunction:
        own = settings.get("lambda_functions", {}).get(function.chalice_name, {})
        variables = {**environment, **own.get("environment_variables", {}), "RUNNER_FLEET_CONFIG": str(config_file)}
        name = function_name(app_name, stage, function)
        lambda_client.create_function(
            FunctionName=name,
            Runtime="python3.11",
            Role=role["Role"]["Arn"],
            Handler=f"app.{function.chalice_name}" if function is not LambdaFunction.WEBHOOK else "app.app",
            Code={"ZipFile": package.getvalue()},
            Timeout=int(own.get("lambda_timeout", 60)),
            MemorySize=int(own.get("lambda_memory_size", 128)),
            Environment={"Variables": variables},
        )
        names.append(name)
    return names

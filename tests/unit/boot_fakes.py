"""Stand-ins for the commands the runner AMI's boot script runs, answering as the real ones do.

One program, installed under each command's name (``curl``, ``aws``, ``docker``, ``gitlab-runner``, ``systemctl``,
``systemd-run``, ``shutdown``) in a directory put first on ``PATH``. Each call appends its argv, its standard input
and its environment to ``$FAKE_DIR/calls.jsonl``; ``$FAKE_DIR/world.json`` says what the instance's world holds (its
identity, the token item, which command fails). Each rule below names where the real behaviour is documented, and
``tests/unit/test_runner_ami.py`` checks each rule on its own.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import jmespath
import jmespath.exceptions

IMDS = "http://169.254.169.254"
IMDS_SESSION = "AQAEAFakeImdsSessionToken=="
INSTANCE_ID = "i-0123456789abcdef0"
REGION = "eu-west-1"
ROLE_ID = "AROAEXAMPLEROLEID1234"
USER_ID = f"{ROLE_ID}:{INSTANCE_ID}"
COMMANDS = ("curl", "aws", "docker", "gitlab-runner", "systemctl", "systemd-run", "shutdown")


def install(bin_dir: Path, fake_dir: Path, world: dict[str, Any]) -> None:
    """Put the fakes in ``bin_dir`` and the world they answer from in ``fake_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake_dir.mkdir(parents=True, exist_ok=True)
    (fake_dir / "world.json").write_text(json.dumps(world))
    source = Path(__file__).read_text()
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{source}")
        path.chmod(0o755)


def calls(fake_dir: Path) -> list[dict[str, Any]]:
    log = fake_dir / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


class Failed(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _fake_dir() -> Path:
    return Path(os.environ["FAKE_DIR"])


def _world() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((_fake_dir() / "world.json").read_text())
    return loaded


def _save_world(world: dict[str, Any]) -> None:
    (_fake_dir() / "world.json").write_text(json.dumps(world))


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _fail_if_told(command: str) -> None:
    message = _world().get("fail", {}).get(command)
    if message:
        raise Failed(message, 1)


# -- curl against the instance metadata service -------------------------------------------------------------------


def curl(argv: list[str], stdin: str) -> str:
    """IMDSv2: PUT /latest/api/token (with a TTL header) gives a session token; with ``http_tokens = required`` a
    metadata GET without ``X-aws-ec2-metadata-token`` is answered 401, which ``--fail`` turns into exit 22 (EC2 User
    Guide, "Use the Instance Metadata Service to access instance metadata"; curl(1), --fail)."""
    headers = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-H", "--header")]
    if "@-" in headers:
        headers = [h for h in headers if h != "@-"] + [line for line in stdin.splitlines() if line]
    url = next(arg for arg in argv if arg.startswith("http://"))
    method = _option(argv, "-X") or "GET"
    if url == f"{IMDS}/latest/api/token":
        if method != "PUT" or not any(h.lower().startswith("x-aws-ec2-metadata-token-ttl-seconds:") for h in headers):
            raise Failed("curl: (22) The requested URL returned error: 400", 22)
        return IMDS_SESSION
    if f"X-aws-ec2-metadata-token: {IMDS_SESSION}" not in headers:
        raise Failed("curl: (22) The requested URL returned error: 401", 22)
    answers = {"instance-id": INSTANCE_ID, "placement/region": REGION}
    path = url.removeprefix(f"{IMDS}/latest/meta-data/")
    if path not in answers:
        raise Failed("curl: (22) The requested URL returned error: 404", 22)
    return answers[path]


# -- aws CLI v2 ---------------------------------------------------------------------------------------------------


def _compiled_query(expression: str | None) -> Any:
    """``--query`` is a JMESPath expression the CLI compiles with the ``jmespath`` library while it resolves its
    global arguments, before any request (aws-cli ``awscli/globalargs.py``, ``_resolve_query``: "Bad value for
    --query"; a command line error is exit status 252), then applies to the response (AWS CLI User Guide, "Filter
    output from the AWS CLI"): a missing key is null, and a multiselect list ``[a, b]`` answers a list holding a
    null for each missing one. None: no ``--query``, the whole response."""
    if expression is None:
        return None
    try:
        return jmespath.compile(expression)
    except jmespath.exceptions.JMESPathError as exc:
        raise Failed(f"Bad value for --query {expression}: {exc}", 252) from None


def _text(value: Any) -> str:
    """``--output text`` (AWS CLI User Guide, "Setting the output format", text; aws-cli ``awscli/text.py``,
    ``format_text``): a scalar is printed as it is, a null as ``None``; a list of scalars on one line, its elements
    separated by tabs, a null among them again as ``None``; an empty list prints nothing. The boot script queries
    nothing else, so other shapes (objects, nested lists) are refused rather than rendered."""
    if isinstance(value, list):
        if any(isinstance(element, dict | list) for element in value):
            raise Failed("fake aws: --output text of objects or nested lists is not rendered", 252)
        return "\t".join("None" if element is None else str(element) for element in value)
    if isinstance(value, dict):
        raise Failed("fake aws: --output text of objects is not rendered", 252)
    return "None" if value is None else str(value)


def aws(argv: list[str]) -> str:
    """``aws sts get-caller-identity`` answers the role session (API reference, GetCallerIdentity: UserId is
    ``role-id:caller-specified-role-name``, the instance id for an instance profile). ``aws dynamodb`` needs a region
    ("You must specify a region."). GetItem on a missing key answers no ``Item`` element (DynamoDB API reference,
    GetItem); DeleteItem answers ``{}``."""
    service, operation = argv[0], argv[1]
    query = _compiled_query(_option(argv, "--query"))
    world = _world()
    if (service, operation) == ("sts", "get-caller-identity"):
        response: dict[str, Any] = {
            "UserId": world.get("user_id", USER_ID),
            "Account": "123456789012",
            "Arn": f"arn:aws:sts::123456789012:assumed-role/runner/{INSTANCE_ID}",
        }
    elif service == "dynamodb":
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            raise Failed(
                'You must specify a region. You can also configure your region by running "aws configure".', 253
            )
        key = json.loads(_option(argv, "--key") or "{}")
        table = _option(argv, "--table-name")
        item = world.get("items", {}).get(key.get("pk", {}).get("S", "")) if table == world["table"] else None
        if operation == "get-item":
            errors = world.get("get_item_errors", 0)
            if errors:
                world["get_item_errors"] = errors - 1
                _save_world(world)
                raise Failed("An error occurred (ProvisionedThroughputExceededException) when calling GetItem", 254)
            not_yet = world.get("not_yet", 0)
            if not_yet:
                world["not_yet"] = not_yet - 1
                _save_world(world)
                item = None
            response = {"Item": item} if item else {}
        elif operation == "delete-item":
            world.get("items", {}).pop(key.get("pk", {}).get("S", ""), None)
            _save_world(world)
            return ""
        else:
            raise Failed(f"aws: unexpected operation {operation}", 252)
    else:
        raise Failed(f"aws: unexpected command {service} {operation}", 252)
    value = response if query is None else query.search(response)
    return _text(value) if _option(argv, "--output") == "text" else json.dumps(value)


# -- docker, gitlab-runner ----------------------------------------------------------------------------------------


def docker(argv: list[str]) -> str:
    """Pulling from ECR needs credentials for the registry host; with none configured the daemon answers "no basic
    auth credentials" (Amazon ECR User Guide, "Troubleshooting Docker commands": the credHelpers entry of the
    client's ``$HOME/.docker/config.json`` names the helper per registry)."""
    if argv[0] != "pull":
        raise Failed(f"docker: unexpected command {argv[0]}", 125)
    image = argv[-1]
    registry = image.split("/", 1)[0]
    config_file = Path(os.environ.get("HOME", "/nonexistent")) / ".docker" / "config.json"
    helpers = json.loads(config_file.read_text()).get("credHelpers", {}) if config_file.exists() else {}
    if helpers.get(registry) != "ecr-login":
        raise Failed(f'Error response from daemon: Head "https://{registry}/v2/": no basic auth credentials', 1)
    _fail_if_told("docker")
    return image


def _runner_by_name(config_file: str | None, name: str | None) -> dict[str, Any]:
    """gitlab-runner ``commands/single.go`` HandleArgs: the runner section named ``--runner`` from ``--config``,
    fatal when missing; then a URL, a token and an executor are required ("Missing Token")."""
    if not config_file or not Path(config_file).exists():
        raise Failed(f"FATAL: Error loading config: open {config_file}: no such file or directory", 1)
    document = tomllib.loads(Path(config_file).read_text())
    runner = next((r for r in document.get("runners", []) if r.get("name") == name), None)
    if runner is None:
        raise Failed(f'FATAL: Error loading runner by name: could not find a runner with the name "{name}"', 1)
    for key, message in (("url", "Missing URL"), ("token", "Missing Token"), ("executor", "Missing Executor")):
        if not runner.get(key):
            raise Failed(f"FATAL: {message}", 1)
    return runner


def gitlab_runner(argv: list[str]) -> str:
    command = argv[0]
    if command == "verify":
        runner = _runner_by_name(_option(argv, "--config"), _option(argv, "--name"))
        _fail_if_told("verify")
        return f"Verifying runner... is valid  runner={runner['token'][:8]}"
    if command == "run-single":
        _runner_by_name(_option(argv, "--config"), _option(argv, "--runner"))
        _fail_if_told("run-single")
        return "This runner has processed its build limit, so now exiting"
    raise Failed(f"gitlab-runner: unexpected command {command}", 1)


def main() -> int:
    name = Path(sys.argv[0]).name
    argv = sys.argv[1:]
    stdin = "" if sys.stdin.isatty() else sys.stdin.read()
    with (_fake_dir() / "calls.jsonl").open("a") as log:
        log.write(json.dumps({"command": name, "argv": argv, "stdin": stdin, "env": dict(os.environ)}) + "\n")
    handlers = {
        "curl": lambda: curl(argv, stdin),
        "aws": lambda: aws(argv),
        "docker": lambda: docker(argv),
        "gitlab-runner": lambda: gitlab_runner(argv),
    }
    try:
        out = handlers[name]() if name in handlers else ""
    except Failed as failure:
        print(failure, file=sys.stderr)
        return failure.status
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

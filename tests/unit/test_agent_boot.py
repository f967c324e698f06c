"""The simulated agent's boot decisions, on the user data the fleet really renders: what cloud-init writes,
what ``source`` sets, the token's place in config.toml, run-single's exit conditions and a script's steps."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from chalicelib.config import load_config
from chalicelib.scaling.userdata import (
    DOCKER_CONFIG_FILE,
    RUNNER_CONFIG_FILE,
    SETTINGS_FILE,
    render_user_data,
    runner_name,
)
from fleetctl.sandbox.agents import (
    BootError,
    HandOff,
    RunSingle,
    ScriptStep,
    parse_cloud_config,
    parse_settings,
    plan_script,
    read_hand_off,
    runner_section,
    with_token,
)

DEV = Path(__file__).parents[2] / "chalicelib" / "stages" / "dev.yaml"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/ci/build-base:latest"
TOKEN = "glrt-t1_abcDEF-123"


def rendered() -> tuple[str, str]:
    config = load_config(DEV)
    pool = config.pools[0]
    return render_user_data(config, pool, IMAGE), runner_name(config, pool)


def test_the_rendered_cloud_config_gives_the_agent_every_file_and_the_boot_service() -> None:
    """cloud-init's ``write_files`` (cloudinit/config/cc_write_files.py): each path with its content and mode;
    ``runcmd`` starts the boot service (runner_ami/README.md, "User data")."""
    # when
    cloud_config = parse_cloud_config(rendered()[0])

    # then
    assert set(cloud_config.files) == {SETTINGS_FILE, RUNNER_CONFIG_FILE, DOCKER_CONFIG_FILE}
    assert cloud_config.files[DOCKER_CONFIG_FILE].permissions == "0600"
    assert cloud_config.starts_boot_service()


def test_user_data_that_is_not_a_cloud_config_fails_the_boot() -> None:
    """cloud-init treats a document as cloud-config only when its first line is ``#cloud-config``
    (cloudinit/handlers/cloud_config.py); anything else gives the agent no files."""
    with pytest.raises(BootError):
        parse_cloud_config("#!/bin/bash\necho hi\n")


def test_write_files_append_and_base64_are_applied_as_cloud_init_does() -> None:
    """``append: true`` adds to the file, ``encoding: b64`` is decoded (cc_write_files)."""
    # given
    document = (
        "#cloud-config\nwrite_files:\n"
        '  - {path: /a, content: "one\\n"}\n'
        "  - {path: /a, content: dHdvCg==, encoding: b64, append: true}\n"
    )

    # when / then
    assert parse_cloud_config(document).files["/a"].content == "one\ntwo\n"


def test_the_settings_file_reads_as_bash_source_would() -> None:
    """``shlex.quote`` values are read back unchanged, whatever they hold (the renderer quotes with it)."""
    # given
    values = {"A": "plain", "B": "with space", "C": 'it\'s $HOME `x` "q"', "D": ""}
    text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())

    # when / then
    assert parse_settings(text) == values
    assert parse_settings(parse_cloud_config(rendered()[0]).files[SETTINGS_FILE].content)["RUNNER_MAX_BUILDS"] == "10"


def test_an_unquoted_value_with_a_space_is_refused() -> None:
    """``NAME=a b`` in bash runs ``b`` with NAME in its environment and never sets NAME."""
    with pytest.raises(BootError):
        parse_settings("NAME=a b\n")


def test_the_token_goes_after_the_runners_line_and_run_single_finds_its_section() -> None:
    """Boot step 8 (the token line after ``[[runners]]``) and run-single's ``--runner NAME``, which takes URL,
    token and executor from that section (gitlab-runner commands/single.go HandleArgs)."""
    # given
    user_data, name = rendered()
    config_toml = parse_cloud_config(user_data).files[RUNNER_CONFIG_FILE].content

    # when
    section = runner_section(with_token(config_toml, TOKEN), name)

    # then
    assert section.token == TOKEN and section.executor == "docker" and section.name == name
    with pytest.raises(BootError, match="Missing Token"):
        runner_section(config_toml, name)


def test_the_token_item_gives_the_token_and_a_warm_runners_idle_wait() -> None:
    """The item scale-up writes (docs/token-handoff.md), as GetItem answers it: a warm runner's carries
    ``idle_wait_seconds`` (a number, 0); a runner launched for a job has none, and the pool's idle wait applies."""
    warm = {"pk": {"S": "TOKEN#r:i-1"}, "token": {"S": TOKEN}, "idle_wait_seconds": {"N": "0"}}
    cold = {"pk": {"S": "TOKEN#r:i-2"}, "token": {"S": TOKEN}}
    assert read_hand_off(warm) == HandOff(TOKEN, 0)
    assert read_hand_off(cold) == HandOff(TOKEN, None)
    assert TOKEN not in repr(read_hand_off(warm))


@pytest.mark.parametrize("idle_wait", ["forever", "-1", "1.5"])
def test_a_token_item_idle_wait_that_is_not_a_whole_number_fails_the_boot(idle_wait: str) -> None:
    item = {"token": {"S": TOKEN}, "idle_wait_seconds": {"N": idle_wait}}
    with pytest.raises(BootError, match="idle_wait_seconds of the token item must be a whole number"):
        read_hand_off(item)


def test_run_single_stops_after_max_builds_or_the_wait_timeout() -> None:
    """commands/single.go: postBuild decrements MaxBuilds and restarts the idle clock; checkFinishedConditions
    exits when MaxBuilds < 1 (unless 0 was given: run forever) or when no job came for more than WaitTimeout."""
    # given
    ephemeral = RunSingle.start(max_builds=1, wait_timeout=600, now=0)
    reusable = RunSingle.start(max_builds=10, wait_timeout=600, now=0)
    forever = RunSingle.start(max_builds=0, wait_timeout=0, now=0)
    warm = RunSingle.start(max_builds=10, wait_timeout=0, now=0)  # a warm runner: no idle stop

    # then
    assert ephemeral.finished(now=5) is None
    assert ephemeral.after_build(now=5).finished(now=5) == "max builds"
    assert reusable.after_build(now=500).finished(now=1100) is None
    assert reusable.after_build(now=500).finished(now=1101) == "wait timeout"
    assert forever.after_build(now=1).finished(now=10**6) is None
    assert warm.finished(now=10**6) is None


def test_a_script_sleeps_exits_or_succeeds_line_by_line() -> None:
    """``sleep N`` (fractional too) waits, ``exit N`` ends the script with N, anything else succeeds at once."""
    assert plan_script(["echo hi", "sleep 0.5", "exit 3", "sleep 9"]) == [
        ScriptStep("echo hi"),
        ScriptStep("sleep 0.5", sleep=0.5),
        ScriptStep("exit 3", exit_code=3),
    ]

"""Names both sides rely on: the token item scale-up writes is the one a runner instance reads."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from chalicelib.config import load_config
from chalicelib.scaling.tokens import session_user_id
from chalicelib.scaling.userdata import SETTINGS_FILE, image_reference, render_user_data
from chalicelib.store import token_key

DEV = Path(__file__).resolve().parents[2] / "chalicelib" / "stages" / "dev.yaml"


def test_the_instance_reads_its_token_where_scale_up_writes_it() -> None:
    # given the user data of a pool, which tells the instance where its token is
    config = load_config(DEV)
    pool = config.pools[0]
    script = render_user_data(config, pool, image_reference(pool, "123456789012.dkr.ecr.us-east-1.amazonaws.com"))
    [settings_file] = [f for f in yaml.safe_load(script)["write_files"] if f["path"] == SETTINGS_FILE]
    settings = dict(line.split("=", 1) for line in settings_file["content"].splitlines())
    # when the instance appends its role session's user id (sts:GetCallerIdentity's UserId) to the key prefix
    user_id = session_user_id("AROAEXAMPLEROLEID0001", "i-0123456789abcdef0")
    key = shlex.split(settings["RUNNER_FLEET_TOKEN_KEY_PREFIX"])[0] + user_id
    # then it reads the table and item scale-up writes
    assert shlex.split(settings["RUNNER_FLEET_TOKEN_TABLE"]) == [config.state.table]
    assert key == token_key(user_id) == "TOKEN#AROAEXAMPLEROLEID0001:i-0123456789abcdef0"

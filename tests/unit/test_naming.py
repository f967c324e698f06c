"""Names both sides rely on: the token path scale-up writes is the one a runner instance reads."""

from __future__ import annotations

from pathlib import Path

from chalicelib.config import load_config
from chalicelib.naming import runner_token_parameter, runner_token_prefix
from chalicelib.userdata import image_reference, render_user_data

DEV = Path(__file__).resolve().parents[2] / "chalicelib" / "stages" / "dev.yaml"


def test_the_instance_reads_its_token_where_scale_up_writes_it() -> None:
    # given the user data of a pool, which tells the instance where its token is
    config = load_config(DEV)
    pool = config.pools[0]
    script = render_user_data(config, pool, image_reference(pool, "123456789012.dkr.ecr.us-east-1.amazonaws.com"))
    # then the prefix it appends its own instance id to is the one scale-up writes under
    prefix = runner_token_prefix(config.fleet)
    assert prefix in script
    assert runner_token_parameter(config.fleet, "i-0123456789abcdef0") == prefix + "i-0123456789abcdef0"

"""The fleet configuration: each rule reports its field path and a readable reason; files load as promised."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from chalicelib.config import (
    CONFIG_ENV_VAR,
    AccessLevel,
    FleetConfig,
    Market,
    Severity,
    get_config,
    load_config,
    parse_config,
    reset_config_cache,
)
from chalicelib.errors import ConfigError

STAGES = Path(__file__).parents[2] / "chalicelib" / "stages"

SUBNET = "subnet-0123456789abcdef0"
SG = "sg-0123456789abcdef0"


def valid_pool(name: str = "docker", **overrides: Any) -> dict[str, Any]:
    pool: dict[str, Any] = {
        "name": name,
        "tags": ["docker", "linux"],
        "instance_types": ["m7i.large"],
        "subnets": [SUBNET],
        "security_groups": [SG],
        "max_runners": 20,
        "image": {"repository": "ci/build-base"},
    }
    pool.update(overrides)
    return pool


def valid_config(*pools: dict[str, Any]) -> dict[str, Any]:
    return {
        "fleet": "runner-fleet-test",
        "gitlab": {"url": "https://gitlab.example.com", "token_parameter": "/runner-fleet/test/gitlab-token"},
        "webhook": {"token_parameter": "/runner-fleet/test/webhook-token"},
        "state": {
            "table": "runner-fleet-test",
            "jobs_queue": "runner-fleet-test-jobs",
            "dead_letter_queue": "runner-fleet-test-jobs-dlq",
        },
        "cache_bucket": "runner-fleet-test-cache",
        "ami_parameter": "/runner-fleet/test/runner-ami",
        "pools": list(pools) or [valid_pool()],
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(data, source="test.yaml")
    assert raised.value.source == "test.yaml"
    return raised.value.problems


def with_pool(**overrides: Any) -> dict[str, Any]:
    return valid_config(valid_pool(**overrides))


@pytest.fixture
def fresh_config_cache() -> Iterator[None]:
    reset_config_cache()
    yield
    reset_config_cache()


# ---- shipped stage files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["dev.yaml", "prod.yaml"])
def test_shipped_stage_files_validate(stage: str) -> None:
    config = load_config(STAGES / stage)

    assert config.pools


def test_dev_stage_has_the_docker_and_build_pools() -> None:
    config = load_config(STAGES / "dev.yaml")

    assert config.fleet == "runner-fleet-dev"
    assert config.gitlab.url == "http://127.0.0.1:8929"
    assert config.state.jobs_queue == "runner-fleet-dev-jobs"
    assert config.state.dead_letter_queue == "runner-fleet-dev-jobs-dlq"
    docker, build = config.pools
    assert (docker.name, docker.tags, docker.run_untagged) == ("docker", ("docker", "linux"), True)
    assert docker.instance_types == ("m7i.large", "m6i.large", "m5.large")
    assert len(docker.subnets) == 2
    assert (docker.market, docker.on_demand_fallback, docker.max_runners) == (Market.SPOT, True, 20)
    assert (build.name, build.tags, build.run_untagged) == ("build", ("docker", "dind"), False)
    assert build.privileged is True
    assert (build.ephemeral, build.max_builds) == (True, 1)  # a privileged pool is ephemeral
    assert build.instance_types == ("c7i.xlarge", "c6i.xlarge")
    assert build.max_runners == 10
    assert build.scan is not None
    assert build.scan.severity_threshold is Severity.HIGH
    assert build.warm.size == 1
    assert [w.timezone for w in build.warm.windows] == ["Europe/Berlin"]
    assert {(p.image.repository, p.image.tag) for p in config.pools} == {("ci/build-base", "latest")}


# ---- defaults and normalisation --------------------------------------------------------------------------


def test_minimal_pool_gets_documented_defaults() -> None:
    # when
    config = parse_config(valid_config())

    # then
    pool = config.pools[0]
    assert config.region is None
    assert config.webhook.signing_secret_parameter is None
    assert pool.run_untagged is False
    assert pool.market is Market.SPOT
    assert pool.on_demand_fallback is True
    assert (pool.warm.size, pool.warm.windows) == (0, ())
    assert pool.ephemeral is False
    assert pool.max_builds == 10
    assert pool.idle_wait_seconds == 600
    assert pool.max_lifetime_minutes == 720
    assert pool.boot_deadline_seconds == 600
    assert pool.image.tag == "latest"
    assert pool.scan is None
    assert pool.privileged is False
    assert pool.disk_gib == 40
    assert pool.max_launch_attempts == 8
    assert pool.ami is None
    assert pool.image.push is False
    assert pool.access_level is AccessLevel.NOT_PROTECTED
    assert pool.allow_privileged_reuse is False


def test_gitlab_url_trailing_slash_is_stripped() -> None:
    data = valid_config()
    data["gitlab"]["url"] = "https://gitlab.example.com/gitlab/"

    assert parse_config(data).gitlab.url == "https://gitlab.example.com/gitlab"


def test_on_demand_market_is_accepted() -> None:
    assert parse_config(with_pool(market="on-demand")).pools[0].market is Market.ON_DEMAND


def test_optional_settings_are_accepted() -> None:
    data = with_pool(ami="ami-0123abcd", scan={}, subnets=["subnet-0123abcd"])
    data["region"] = "us-gov-west-1"
    data["webhook"]["signing_secret_parameter"] = "/runner-fleet/test/signing"

    config = parse_config(data)

    assert config.region == "us-gov-west-1"
    assert config.webhook.signing_secret_parameter == "/runner-fleet/test/signing"
    assert config.pools[0].ami == "ami-0123abcd"
    assert config.pools[0].scan is not None
    assert config.pools[0].scan.severity_threshold is Severity.HIGH


def test_ami_parameter_may_name_an_aws_public_parameter() -> None:
    data = valid_config()
    data["ami_parameter"] = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"

    assert parse_config(data).ami_parameter.startswith("/aws/service/")


def test_severities_are_ordered_for_threshold_comparison() -> None:
    names = ["INFORMATIONAL", "LOW", "MEDIUM", "HIGH", "CRITICAL"]

    assert [s.rank for s in map(Severity, names)] == [0, 1, 2, 3, 4]


# ---- global fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ab", "Runner-fleet", "runner_fleet", "r" * 41])
def test_fleet_name_rule(name: str) -> None:
    data = valid_config()
    data["fleet"] = name

    assert problems_of(data) == [f"fleet: must be 3-40 lowercase letters, digits or hyphens, got '{name}'"]


def test_region_must_look_like_an_aws_region() -> None:
    data = valid_config()
    data["region"] = "Frankfurt"

    assert problems_of(data) == ["region: must be an AWS region like 'us-east-1', got 'Frankfurt'"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://gitlab.example.com", "must be an http or https URL, got 'ftp://gitlab.example.com'"),
        ("gitlab.example.com", "must be an http or https URL, got 'gitlab.example.com'"),
        ("https://", "must be an http or https URL, got 'https://'"),
        (
            "https://root:secret@gitlab.example.com",
            "must not contain credentials; the API token comes from gitlab.token_parameter",
        ),
        (
            "https://gitlab.example.com/?x=1",
            "must not have a query or fragment, got 'https://gitlab.example.com/?x=1'",
        ),
    ],
)
def test_gitlab_url_rule(url: str, reason: str) -> None:
    data = valid_config()
    data["gitlab"]["url"] = url

    assert problems_of(data) == [f"gitlab.url: {reason}"]


INJECTED_URL = "https://gitlab.example.com\nSETTINGS\ntouch /tmp/pwned"


@pytest.mark.parametrize(
    ("url", "found"),
    [
        (INJECTED_URL, "'\\n'"),
        ("https://gitlab.example.com\r", "'\\r'"),
        ("https://gitlab.example.com/\tx", "'\\t'"),
        ("https://gitlab.example.com/a b", "' '"),
        (" https://gitlab.example.com", "' '"),
        ("https://gitlab.example.com\x00", "'\\x00'"),
        ("https://gitlab.example.com\x1b[2J", "'\\x1b'"),
        ("https://gitlab.example.com\x7f", "'\\x7f'"),
        ("https://gitlab.example.com\x85", "'\\x85'"),
        ("https://gitlab.example.com\u2028x", "'\\u2028'"),
        ("https://gitlab.example.com\u00a0", "'\\xa0'"),
        ("https://gitlab.example.com\u200b", "'\\u200b'"),
    ],
)
def test_gitlab_url_refuses_whitespace_and_control_characters(url: str, found: str) -> None:
    data = valid_config()
    data["gitlab"]["url"] = url

    [problem] = problems_of(data)

    assert problem.startswith(f"gitlab.url: must not contain whitespace or control characters, found {found} in ")


@pytest.mark.parametrize(
    "url",
    [
        "http://gitlab.example.com",
        "http://gitlab.example.com:8929",
        "http://10.0.0.5",
        "http://128.0.0.1",
        "http://[::2]:8080",
        "http://localhost.example.com",
        "http://0.0.0.0",
    ],
)
def test_gitlab_url_needs_https_unless_loopback(url: str) -> None:
    data = valid_config()
    data["gitlab"]["url"] = url

    assert problems_of(data) == [
        f"gitlab.url: must use https (http is allowed only for localhost, 127.0.0.0/8 and ::1), got {url!r}"
    ]


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("https://gitlab.example.com", "https://gitlab.example.com"),
        ("https://gitlab.example.com:8443/gitlab/", "https://gitlab.example.com:8443/gitlab"),
        ("http://127.0.0.1:8929", "http://127.0.0.1:8929"),
        ("http://127.10.20.30", "http://127.10.20.30"),
        ("http://localhost:8080/", "http://localhost:8080"),
        ("http://LOCALHOST:8080", "http://LOCALHOST:8080"),
        ("http://[::1]:8929", "http://[::1]:8929"),
        ("https://10.0.0.5", "https://10.0.0.5"),
    ],
)
def test_gitlab_url_accepts_https_anywhere_and_http_on_loopback(url: str, parsed: str) -> None:
    data = valid_config()
    data["gitlab"]["url"] = url

    assert parse_config(data).gitlab.url == parsed


def test_gitlab_url_port_must_be_a_port() -> None:
    data = valid_config()
    data["gitlab"]["url"] = "https://gitlab.example.com:99999"

    assert problems_of(data) == [
        "gitlab.url: must have a port between 0 and 65535, got 'https://gitlab.example.com:99999'"
    ]


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("gitlab", "token_parameter"),
        ("webhook", "token_parameter"),
        ("webhook", "signing_secret_parameter"),
        (None, "ami_parameter"),
    ],
)
def test_ssm_parameter_names_must_start_with_a_slash(section: str | None, field: str) -> None:
    data = valid_config()
    (data[section] if section else data)[field] = "runner-fleet/test/x"
    path = f"{section}.{field}" if section else field

    assert problems_of(data) == [f"{path}: must be an SSM parameter name starting with '/', got 'runner-fleet/test/x'"]


def test_ssm_parameter_name_characters() -> None:
    data = valid_config()
    data["gitlab"]["token_parameter"] = "/runner fleet//token"

    assert problems_of(data) == [
        "gitlab.token_parameter: must be an SSM parameter name: '/'-separated parts of letters, digits, "
        "'_', '.' or '-', got '/runner fleet//token'"
    ]


def test_secret_parameters_must_be_distinct() -> None:
    # given
    data = valid_config()
    data["webhook"]["token_parameter"] = data["gitlab"]["token_parameter"]
    data["webhook"]["signing_secret_parameter"] = data["gitlab"]["token_parameter"]

    # then
    assert problems_of(data) == [
        "webhook.token_parameter: must differ from gitlab.token_parameter, got '/runner-fleet/test/gitlab-token'",
        "webhook.signing_secret_parameter: must differ from gitlab.token_parameter, "
        "got '/runner-fleet/test/gitlab-token'",
    ]


def test_dead_letter_queue_must_differ_from_jobs_queue() -> None:
    data = valid_config()
    data["state"]["dead_letter_queue"] = data["state"]["jobs_queue"]

    assert problems_of(data) == ["state.dead_letter_queue: must differ from jobs_queue, got 'runner-fleet-test-jobs'"]


def test_state_names_follow_aws_rules() -> None:
    data = valid_config()
    data["state"]["table"] = "t!"
    data["state"]["jobs_queue"] = "jobs.fifo"

    assert problems_of(data) == [
        "state.table: must be a DynamoDB table name: 3-255 letters, digits, '_', '.' or '-', got 't!'",
        "state.jobs_queue: must be an SQS queue name: 1-80 letters, digits, '_' or '-', got 'jobs.fifo'",
    ]


@pytest.mark.parametrize("bucket", ["ab", "Runner-Cache", "runner_cache", "-runner-cache", "r" * 64])
def test_cache_bucket_name_shape(bucket: str) -> None:
    data = valid_config()
    data["cache_bucket"] = bucket

    assert problems_of(data) == [
        "cache_bucket: must be an S3 bucket name: 3-63 lowercase letters, digits, dots or hyphens, "
        f"starting and ending with a letter or digit, got '{bucket}'"
    ]


@pytest.mark.parametrize(
    ("bucket", "reason"),
    [
        ("runner..cache", "must not contain '..', got 'runner..cache'"),
        ("192.168.10.20", "must not be formatted as an IP address, got '192.168.10.20'"),
    ],
)
def test_cache_bucket_special_rules(bucket: str, reason: str) -> None:
    data = valid_config()
    data["cache_bucket"] = bucket

    assert problems_of(data) == [f"cache_bucket: {reason}"]


# ---- pools -----------------------------------------------------------------------------------------------


def test_at_least_one_pool_is_required() -> None:
    data = valid_config()
    data["pools"] = []

    assert problems_of(data) == ["pools: must list at least one pool"]


def test_duplicate_pool_names_are_reported_at_the_duplicate() -> None:
    data = valid_config(valid_pool("docker"), valid_pool("build"), valid_pool("docker"))

    assert problems_of(data) == ["pools[2](docker).name: duplicate pool name 'docker'"]


def test_identical_tag_sets_in_two_pools_are_allowed() -> None:
    config = parse_config(valid_config(valid_pool("small"), valid_pool("large")))

    assert config.pools[0].tags == config.pools[1].tags


@pytest.mark.parametrize("name", ["", "Docker", "docker_pool", "p" * 33])
def test_pool_name_rule(name: str) -> None:
    assert problems_of(with_pool(name=name)) == [
        f"pools[0]({name}).name: must be 1-32 lowercase letters, digits or hyphens, got '{name}'"
    ]


def test_pool_path_has_only_the_index_when_the_pool_has_no_name() -> None:
    pool = valid_pool()
    del pool["name"]
    pool["max_runners"] = 0

    assert problems_of(valid_config(pool)) == [
        "pools[0].name: required",
        "pools[0].max_runners: must be between 1 and 1000, got 0",
    ]


def test_fleet_pool_lookup_by_name() -> None:
    config = parse_config(valid_config(valid_pool("docker"), valid_pool("build")))

    assert config.pool("build") is config.pools[1]
    expected = "no pool named 'gpu' in fleet 'runner-fleet-test'; pools are: docker, build"
    with pytest.raises(KeyError, match=expected):
        config.pool("gpu")


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("", "must not be empty"),
        (" docker", "must not have leading or trailing whitespace, got ' docker'"),
        ("docker ", "must not have leading or trailing whitespace, got 'docker '"),
        ("docker,linux", "must not contain commas, got 'docker,linux'"),
        (3, "must be a string, got 3; quote it"),
    ],
)
def test_tag_rules(tag: object, reason: str) -> None:
    assert problems_of(with_pool(tags=["linux", tag])) == [f"pools[0](docker).tags[1]: {reason}"]


def test_duplicate_tag_is_reported_at_its_index() -> None:
    assert problems_of(with_pool(tags=["docker", "linux", "docker"])) == [
        "pools[0](docker).tags[2]: duplicate tag 'docker'"
    ]


def test_long_values_are_shortened_in_reasons() -> None:
    tag = "a," + "b" * 300

    [problem] = problems_of(with_pool(tags=[tag]))

    assert problem == f"pools[0](docker).tags[0]: must not contain commas, got '{tag[:96]}..."


def test_tags_may_be_empty_only_when_run_untagged() -> None:
    assert problems_of(with_pool(tags=[])) == [
        "pools[0](docker).tags: must not be empty unless run_untagged is true, or no job can match"
    ]
    assert parse_config(with_pool(tags=[], run_untagged=True)).pools[0].tags == ()


@pytest.mark.parametrize("instance_type", ["m7i-flex.xlarge", "u-6tb1.metal", "mac2-m2pro.metal"])
def test_instance_type_shapes_that_exist(instance_type: str) -> None:
    assert parse_config(with_pool(instance_types=[instance_type])).pools[0].instance_types == (instance_type,)


@pytest.mark.parametrize("instance_type", ["large", "m7i", "M7i.large", "m7i.*", "t.micro"])
def test_instance_type_must_look_like_family_dot_size(instance_type: str) -> None:
    assert problems_of(with_pool(instance_types=[instance_type])) == [
        f"pools[0](docker).instance_types[0]: must be an EC2 instance type like 'm7i.large', got '{instance_type}'"
    ]


@pytest.mark.parametrize(
    ("field", "duplicate", "what"),
    [
        ("instance_types", "m7i.large", "instance type"),
        ("subnets", SUBNET, "subnet"),
        ("security_groups", SG, "security group"),
    ],
)
def test_network_and_type_lists_are_non_empty_and_unique(field: str, duplicate: str, what: str) -> None:
    assert problems_of(with_pool(**{field: []})) == [f"pools[0](docker).{field}: must not be empty"]
    assert problems_of(with_pool(**{field: [duplicate, duplicate]})) == [
        f"pools[0](docker).{field}[1]: duplicate {what} '{duplicate}'"
    ]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("subnets", "subnet-xyz", "must be a subnet id like 'subnet-0123456789abcdef0', got 'subnet-xyz'"),
        ("subnets", "subnet-0123", "must be a subnet id like 'subnet-0123456789abcdef0', got 'subnet-0123'"),
        (
            "security_groups",
            "sg-XYZ12345",
            "must be a security group id like 'sg-0123456789abcdef0', got 'sg-XYZ12345'",
        ),
    ],
)
def test_subnet_and_security_group_ids(field: str, value: str, reason: str) -> None:
    assert problems_of(with_pool(**{field: [value]})) == [f"pools[0](docker).{field}[0]: {reason}"]


def test_market_must_be_spot_or_on_demand() -> None:
    assert problems_of(with_pool(market="reserved")) == [
        "pools[0](docker).market: must be 'spot' or 'on-demand', got 'reserved'"
    ]


@pytest.mark.parametrize(
    ("field", "low", "high"),
    [
        ("max_runners", 1, 1000),
        ("max_builds", 1, 1000),
        ("idle_wait_seconds", 30, 86400),
        ("max_lifetime_minutes", 20, 10080),
        ("boot_deadline_seconds", 60, 3600),
        ("disk_gib", 8, 16384),
        ("max_launch_attempts", 1, 50),
    ],
)
def test_numeric_ranges(field: str, low: int, high: int) -> None:
    for value in (low - 1, high + 1):
        assert problems_of(with_pool(**{field: value})) == [
            f"pools[0](docker).{field}: must be between {low} and {high}, got {value}"
        ]


def test_numeric_range_bounds_are_inclusive() -> None:
    pool = parse_config(with_pool(max_runners=1000, disk_gib=8, max_launch_attempts=50)).pools[0]

    assert (pool.max_runners, pool.disk_gib, pool.max_launch_attempts) == (1000, 8, 50)


@pytest.mark.parametrize(("value", "shown"), [("20", "'20'"), (20.5, "20.5"), (True, "true"), (None, "null")])
def test_numbers_are_not_coerced(value: object, shown: str) -> None:
    assert problems_of(with_pool(max_runners=value)) == [
        f"pools[0](docker).max_runners: must be a whole number, got {shown}"
    ]


@pytest.mark.parametrize(("value", "shown"), [("yes", "'yes'"), (1, "1")])
def test_flags_must_be_true_or_false(value: object, shown: str) -> None:
    assert problems_of(with_pool(privileged=value)) == [
        f"pools[0](docker).privileged: must be true or false, got {shown}"
    ]


def test_interrupted_jobs_are_retried_unless_the_pool_says_not() -> None:
    assert parse_config(with_pool()).pools[0].retry_interrupted_jobs is True
    assert parse_config(with_pool(retry_interrupted_jobs=False)).pools[0].retry_interrupted_jobs is False
    assert problems_of(with_pool(retry_interrupted_jobs="no")) == [
        "pools[0](docker).retry_interrupted_jobs: must be true or false, got 'no'"
    ]


def test_warm_size_cannot_exceed_max_runners() -> None:
    assert problems_of(with_pool(max_runners=20, warm={"size": 30})) == [
        "pools[0](docker).warm.size: must not exceed max_runners 20, got 30"
    ]


def test_warm_size_range() -> None:
    assert problems_of(with_pool(warm={"size": -1})) == [
        "pools[0](docker).warm.size: must be between 0 and 1000, got -1"
    ]


def test_boot_deadline_and_idle_wait_must_fit_in_the_lifetime() -> None:
    data = with_pool(
        max_lifetime_minutes=20, job_timeout_seconds=600, boot_deadline_seconds=1200, idle_wait_seconds=1500
    )

    assert problems_of(data) == [
        "pools[0](docker).boot_deadline_seconds: must be shorter than max_lifetime_minutes 20 (1200 seconds), got 1200",
        "pools[0](docker).idle_wait_seconds: must be shorter than max_lifetime_minutes 20 (1200 seconds), got 1500",
    ]


def test_the_job_timeout_must_leave_the_lifetime_time_to_retire_a_runner_before_it_ends() -> None:
    # given a lifetime of 90 minutes and a job timeout of 50: a runner retired at 45 minutes could start a job
    # that runs past the lifetime backstop
    data = with_pool(max_lifetime_minutes=90, job_timeout_seconds=3000)

    assert problems_of(data) == [
        "pools[0](docker).job_timeout_seconds: must be at most half of max_lifetime_minutes 90 (2700 seconds), "
        "got 3000: a job could still run when the lifetime ends"
    ]
    # half the lifetime is allowed
    assert parse_config(with_pool(max_lifetime_minutes=90, job_timeout_seconds=2700)).pools[0].job_timeout_seconds


# ---- ephemeral and max_builds ----------------------------------------------------------------------------


def test_ephemeral_pool_defaults_to_one_build() -> None:
    assert parse_config(with_pool(ephemeral=True)).pools[0].max_builds == 1


def test_ephemeral_pool_accepts_an_explicit_single_build() -> None:
    assert parse_config(with_pool(ephemeral=True, max_builds=1)).pools[0].max_builds == 1


def test_ephemeral_pool_refuses_more_than_one_build() -> None:
    assert problems_of(with_pool(ephemeral=True, max_builds=10)) == [
        "pools[0](docker).max_builds: must be 1 when ephemeral is true, got 10"
    ]


def test_reused_pool_keeps_its_max_builds() -> None:
    assert parse_config(with_pool(max_builds=3)).pools[0].max_builds == 3


# ---- trust: privileged reuse, image push, protected branches ----------------------------------------------------


def test_privileged_pool_must_be_ephemeral() -> None:
    assert problems_of(with_pool(privileged=True)) == [
        "pools[0](docker).privileged: a privileged pool must be ephemeral (max_builds 1), got max_builds 10; "
        "set allow_privileged_reuse: true to let one instance run several privileged jobs"
    ]
    assert problems_of(with_pool(privileged=True, max_builds=2))[0].startswith("pools[0](docker).privileged: ")


@pytest.mark.parametrize(
    "settings",
    [
        {"ephemeral": True},
        {"max_builds": 1},
        {"allow_privileged_reuse": True},
        {"allow_privileged_reuse": True, "max_builds": 5},
    ],
)
def test_privileged_pool_is_ephemeral_or_says_it_reuses(settings: dict[str, Any]) -> None:
    assert parse_config(with_pool(privileged=True, **settings)).pools[0].privileged is True


def test_allow_privileged_reuse_needs_a_privileged_pool() -> None:
    assert problems_of(with_pool(allow_privileged_reuse=True)) == [
        "pools[0](docker).allow_privileged_reuse: must be false unless privileged is true"
    ]


# A pool that may push: its jobs reach the role's credentials, so only protected refs' jobs, one per instance.
PUSHER = {"access_level": "ref_protected", "ephemeral": True}


def test_a_pool_may_push_to_a_repository_of_its_own() -> None:
    config = parse_config(
        valid_config(
            valid_pool("docker"),
            valid_pool("build", tags=["dind"], image={"repository": "ci/dind", "push": True}, **PUSHER),
        )
    )

    assert [p.image.push for p in config.pools] == [False, True]


@pytest.mark.parametrize(
    ("settings", "problems"),
    [
        (
            {"ephemeral": True},
            [
                "pools[0](docker).image.push: a pool that pushes its image must take only protected refs' jobs "
                "(access_level: ref_protected), got access_level not_protected"
            ],
        ),
        (
            {"access_level": "ref_protected", "max_builds": 2},
            [
                "pools[0](docker).image.push: a pool that pushes its image must be ephemeral (max_builds 1), got "
                "max_builds 2"
            ],
        ),
        (
            {},
            [
                "pools[0](docker).image.push: a pool that pushes its image must take only protected refs' jobs "
                "(access_level: ref_protected), got access_level not_protected",
                "pools[0](docker).image.push: a pool that pushes its image must be ephemeral (max_builds 1), got "
                "max_builds 10",
            ],
        ),
    ],
)
def test_push_is_refused_unless_the_pool_is_ephemeral_and_protected_refs_only(
    settings: dict[str, Any], problems: list[str]
) -> None:
    data = with_pool(image={"repository": "ci/build-base", "push": True}, **settings)

    assert problems_of(data) == problems


def test_push_to_a_repository_another_pool_runs_is_refused_naming_both_pools() -> None:
    data = valid_config(
        valid_pool("docker"),
        valid_pool("build", tags=["dind"], image={"repository": "ci/build-base", "push": True}, **PUSHER),
        valid_pool("lint", tags=["lint"]),
    )

    assert problems_of(data) == [
        "pools[1](build).image.push: pool build may not push to ci/build-base, which pool(s) docker, lint also "
        "run; give it a repository of its own"
    ]


def test_two_pools_pushing_to_one_repository_are_both_refused() -> None:
    shared = {"repository": "ci/dind", "push": True}
    data = valid_config(valid_pool("a", image=shared, **PUSHER), valid_pool("b", tags=["b"], image=shared, **PUSHER))

    assert problems_of(data) == [
        "pools[0](a).image.push: pool a may not push to ci/dind, which pool(s) b also run; give it a repository "
        "of its own",
        "pools[1](b).image.push: pool b may not push to ci/dind, which pool(s) a also run; give it a repository "
        "of its own",
    ]


def test_image_push_must_be_a_boolean() -> None:
    assert problems_of(with_pool(image={"repository": "ci/build-base", "push": "yes"})) == [
        "pools[0](docker).image.push: must be true or false, got 'yes'"
    ]


def test_access_level_is_not_protected_or_ref_protected() -> None:
    assert parse_config(with_pool(access_level="ref_protected")).pools[0].access_level is AccessLevel.REF_PROTECTED
    assert problems_of(with_pool(access_level="protected")) == [
        "pools[0](docker).access_level: must be 'not_protected' or 'ref_protected', got 'protected'"
    ]


# ---- warm windows ----------------------------------------------------------------------------------------


def window(**overrides: Any) -> dict[str, Any]:
    return {"start": "0 8 * * 1-5", "end": "0 19 * * 1-5", **overrides}


def test_window_time_zone_defaults_to_utc() -> None:
    pool = parse_config(with_pool(warm={"size": 2, "windows": [window()]})).pools[0]

    assert pool.warm.windows[0].timezone == "UTC"
    assert pool.warm.windows[0].zone.key == "UTC"


def test_window_with_a_time_zone() -> None:
    pool = parse_config(with_pool(warm={"size": 2, "windows": [window(timezone="Europe/Berlin")]})).pools[0]

    assert pool.warm.windows[0].zone.key == "Europe/Berlin"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../etc/passwd", ""])
def test_unknown_time_zone(zone: str) -> None:
    data = with_pool(warm={"size": 1, "windows": [window(), window(timezone=zone)]})

    assert problems_of(data) == [f"pools[0](docker).warm.windows[1].timezone: unknown time zone '{zone}'"]


def test_invalid_cron_expression() -> None:
    data = with_pool(warm={"size": 1, "windows": [window(start="61 * * * *")]})

    assert problems_of(data) == ["pools[0](docker).warm.windows[0].start: invalid cron expression '61 * * * *'"]


@pytest.mark.parametrize("start", ["R 8 * * *", "0 H * * *", "H(0-29) 8 * * *", "0 8 * * H/2"])
def test_croniters_random_and_hashed_fields_are_refused(start: str) -> None:
    data = with_pool(warm={"size": 1, "windows": [window(start=start)]})

    assert problems_of(data) == [
        f"pools[0](docker).warm.windows[0].start: invalid cron expression '{start}': R and H (random, hashed) "
        "are not cron"
    ]


def test_cron_expression_needs_five_fields() -> None:
    data = with_pool(warm={"size": 1, "windows": [window(end="0 19 * *")]})

    assert problems_of(data) == [
        "pools[0](docker).warm.windows[0].end: invalid cron expression '0 19 * *': expected 5 fields "
        "(minute hour day-of-month month day-of-week), got 4"
    ]


@pytest.mark.parametrize("end", ["0  8 * * 1-5", "0 08 * * 1-5", "00 8 * * mon-fri"])
def test_window_start_and_end_must_differ(end: str) -> None:
    # the same schedule however it is spelled: such a window never opens
    data = with_pool(warm={"size": 1, "windows": [window(end=end)]})

    assert problems_of(data) == [
        "pools[0](docker).warm.windows[0].end: must differ from start, or the window never opens"
    ]


# ---- image and scan gate ---------------------------------------------------------------------------------


def test_image_repository_and_tag_rules() -> None:
    data = with_pool(image={"repository": "CI/Build Base", "tag": "-latest"})

    assert problems_of(data) == [
        "pools[0](docker).image.repository: must be an ECR repository name like 'ci/build-base', got 'CI/Build Base'",
        "pools[0](docker).image.tag: must be an image tag like 'latest' or '2024.06', got '-latest'",
    ]


def test_unquoted_yaml_number_as_tag_hints_at_quoting() -> None:
    assert problems_of(with_pool(image={"repository": "ci/build-base", "tag": 2024.1})) == [
        "pools[0](docker).image.tag: must be a string, got 2024.1; quote it"
    ]


def test_scan_severity_must_be_a_known_severity() -> None:
    assert problems_of(with_pool(scan={"severity_threshold": "high"})) == [
        "pools[0](docker).scan.severity_threshold: must be 'INFORMATIONAL', 'LOW', 'MEDIUM', 'HIGH' or "
        "'CRITICAL', got 'high'"
    ]


def test_ami_must_be_an_ami_id() -> None:
    assert problems_of(with_pool(ami="ubuntu-22.04")) == [
        "pools[0](docker).ami: must be an AMI id like 'ami-0123456789abcdef0', got 'ubuntu-22.04'"
    ]


# ---- structure ---------------------------------------------------------------------------------------------


def test_unknown_fields_are_errors_at_every_level() -> None:
    # given
    data = with_pool(colour="blue")
    data["regoin"] = "us-east-1"
    data["gitlab"]["tokn_parameter"] = "/x"
    data["pools"][0]["warm"] = {"size": 0, "windows": [window(tz="UTC")]}

    # then
    assert problems_of(data) == [
        "gitlab.tokn_parameter: unknown field",
        "pools[0](docker).warm.windows[0].tz: unknown field",
        "pools[0](docker).colour: unknown field",
        "regoin: unknown field",
    ]


def test_missing_required_fields() -> None:
    data = valid_config()
    del data["gitlab"]
    del data["state"]["table"]
    del data["pools"][0]["image"]

    assert problems_of(data) == [
        "gitlab: required",
        "state.table: required",
        "pools[0](docker).image: required",
    ]


def test_wrong_container_types() -> None:
    data = valid_config()
    data["gitlab"] = "https://gitlab.example.com"
    data["pools"] = {"docker": valid_pool()}

    assert problems_of(data) == [
        "gitlab: must be a mapping, got 'https://gitlab.example.com'",
        "pools: must be a list, got a mapping",
    ]


def test_pool_that_is_not_a_mapping() -> None:
    data = valid_config(valid_pool(), "docker")  # type: ignore[arg-type]

    assert problems_of(data) == ["pools[1]: must be a mapping, got 'docker'"]


def test_non_string_keys_are_reported_with_a_hint() -> None:
    data = valid_config()
    data["gitlab"][True] = "x"  # what YAML makes of an unquoted `on:` key

    assert problems_of(data) == ["gitlab: key true must be a string; quote it"]


@pytest.mark.parametrize(("data", "shown"), [([], "a list"), (None, "null"), ("fleet", "'fleet'")])
def test_top_level_must_be_a_mapping(data: object, shown: str) -> None:
    assert problems_of(data) == [f"top level must be a mapping of settings, got {shown}"]


def test_several_errors_are_reported_together() -> None:
    # given
    data = valid_config(
        valid_pool("docker", max_runners=0, market="reserved"),
        valid_pool(
            "build",
            warm={"size": 1, "windows": [window(timezone="Mars/Olympus")]},
            subnets=["subnet-nope"],
        ),
    )
    data["fleet"] = "X"
    data["webhook"]["token_parameter"] = "webhook-token"

    # when
    problems = problems_of(data)

    # then
    assert problems == [
        "fleet: must be 3-40 lowercase letters, digits or hyphens, got 'X'",
        "webhook.token_parameter: must be an SSM parameter name starting with '/', got 'webhook-token'",
        "pools[0](docker).market: must be 'spot' or 'on-demand', got 'reserved'",
        "pools[0](docker).max_runners: must be between 1 and 1000, got 0",
        "pools[1](build).subnets[0]: must be a subnet id like 'subnet-0123456789abcdef0', got 'subnet-nope'",
        "pools[1](build).warm.windows[0].timezone: unknown time zone 'Mars/Olympus'",
    ]


def test_error_message_lists_source_and_problems() -> None:
    data = with_pool(max_runners=0)

    with pytest.raises(ConfigError) as raised:
        parse_config(data)

    assert str(raised.value) == (
        "invalid configuration in <config>:\n  pools[0](docker).max_runners: must be between 1 and 1000, got 0"
    )


def test_config_is_frozen() -> None:
    config = parse_config(valid_config())

    with pytest.raises(pydantic.ValidationError):
        config.fleet = "other"
    with pytest.raises(pydantic.ValidationError):
        config.pools[0].max_runners = 1
    with pytest.raises(AttributeError):
        config.pools[0].tags.append("x")  # type: ignore[attr-defined]


def test_parsing_does_not_change_the_input() -> None:
    data = with_pool(ephemeral=True)
    before = copy.deepcopy(data)

    parse_config(data)

    assert data == before


# ---- files -----------------------------------------------------------------------------------------------


def test_load_yaml(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "stage.yml"
    path.write_text(yaml.safe_dump(valid_config()), encoding="utf-8")

    assert load_config(path) == parse_config(valid_config())


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(valid_config()), encoding="utf-8")

    assert load_config(str(path)) == parse_config(valid_config())


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    # given
    path = tmp_path / "stage.yaml"
    path.write_text(
        """
fleet: runner-fleet-test
gitlab: {url: "https://gitlab.example.com", token_parameter: /t/gitlab}
webhook: {token_parameter: /t/webhook}
state: {table: runner-test, jobs_queue: jobs, dead_letter_queue: jobs-dlq}
cache_bucket: runner-test-cache
ami_parameter: /t/ami
pools:
  - &docker
    name: docker
    tags: [docker]
    instance_types: [m7i.large]
    subnets: &subnets [subnet-0123456789abcdef0]
    security_groups: [sg-0123456789abcdef0]
    max_runners: 5
    image: {repository: ci/build-base}
  - <<: *docker
    name: build
    max_runners: 2
""",
        encoding="utf-8",
    )

    # when
    config = load_config(path)

    # then
    assert [(p.name, p.max_runners, p.subnets) for p in config.pools] == [
        ("docker", 5, ("subnet-0123456789abcdef0",)),
        ("build", 2, ("subnet-0123456789abcdef0",)),
    ]


def test_problems_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(with_pool(max_runners=0)), encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert raised.value.source == str(path)
    assert raised.value.problems == ["pools[0](docker).max_runners: must be between 1 and 1000, got 0"]


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.source == str(path)
    return raised.value.problems


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("fleet: runner-fleet-test\ngitlab:\n  url: [unclosed\n", encoding="utf-8")

    [problem] = load_problems(path)

    assert problem.startswith("invalid YAML at line 4, column 1: ")


def test_yaml_tab_indentation_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("fleet: runner-fleet-test\ngitlab:\n\turl: x\n", encoding="utf-8")

    assert load_problems(path) == [
        "invalid YAML at line 3, column 1: found character '\\t' that cannot start any token"
    ]


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text('{\n  "fleet": "runner-fleet-test",\n}\n', encoding="utf-8")

    assert load_problems(path) == [
        "invalid JSON at line 3, column 1: Expecting property name enclosed in double quotes"
    ]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("fleet: runner-fleet-test\nregion: us-east-1\nfleet: other\n", encoding="utf-8")

    assert load_problems(path) == ["invalid YAML at line 3, column 1: duplicate key 'fleet'"]


def test_duplicate_json_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text('{"fleet": "runner-fleet-test", "fleet": "other"}', encoding="utf-8")

    assert load_problems(path) == ["invalid JSON: duplicate key 'fleet'"]


def test_missing_file(tmp_path: Path) -> None:
    assert load_problems(tmp_path / "nope.yaml") == ["file not found"]


def test_unreadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "stage.yaml"
    directory.mkdir()

    [problem] = load_problems(directory)

    assert problem.startswith("cannot read file: ")


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_bytes(b"fleet: \xff\n")

    [problem] = load_problems(path)

    assert problem.startswith("not UTF-8 text: ")


def test_empty_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("# nothing yet\n", encoding="utf-8")

    assert load_problems(path) == ["file is empty"]


def test_file_whose_top_level_is_a_list(tmp_path: Path) -> None:
    path = tmp_path / "stage.yaml"
    path.write_text("- fleet: runner-fleet-test\n", encoding="utf-8")

    assert load_problems(path) == ["top level must be a mapping of settings, got a list"]


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "stage.toml"
    path.write_text("fleet = 'x'\n", encoding="utf-8")

    assert load_problems(path) == ["unsupported file type '.toml'; use .yaml, .yml or .json"]


# ---- process-wide config -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_config_cache")
def test_get_config_requires_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)

    with pytest.raises(ConfigError) as raised:
        get_config()

    assert raised.value.problems == [
        "RUNNER_FLEET_CONFIG: not set; point it at a stage file such as chalicelib/stages/dev.yaml"
    ]


@pytest.mark.usefixtures("fresh_config_cache")
def test_get_config_resolves_a_relative_path_against_the_app_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # given a working directory that is not the project
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIG_ENV_VAR, "chalicelib/stages/dev.yaml")

    # when
    config = get_config()

    # then
    assert config == load_config(STAGES / "dev.yaml")


@pytest.mark.usefixtures("fresh_config_cache")
def test_get_config_loads_once_until_reset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # given
    path = tmp_path / "stage.json"
    path.write_text(json.dumps(valid_config()), encoding="utf-8")
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    first = get_config()

    # when the file changes
    changed = valid_config()
    changed["fleet"] = "runner-fleet-changed"
    path.write_text(json.dumps(changed), encoding="utf-8")

    # then the process keeps its config until the cache is reset
    assert get_config() is first
    reset_config_cache()
    assert get_config().fleet == "runner-fleet-changed"


def test_import_stays_lean_for_cold_start() -> None:
    code = "import sys, chalicelib.config; print(sorted(m for m in ('yaml', 'croniter') if m in sys.modules))"

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
    )

    assert result.stdout.strip() == "[]"


def test_fleet_config_is_the_public_type() -> None:
    assert isinstance(parse_config(valid_config()), FleetConfig)


@pytest.mark.parametrize(
    ("gitlab", "problem"),
    [
        ({"runner_type": "group_type"}, "gitlab.runner_owner_id: is required when runner_type is group_type"),
        ({"runner_type": "project_type"}, "gitlab.runner_owner_id: is required when runner_type is project_type"),
        ({"runner_owner_id": 7}, "gitlab.runner_owner_id: must be empty for instance_type runners"),
    ],
)
def test_runner_scope_and_owner_go_together(gitlab: dict[str, Any], problem: str) -> None:
    data = valid_config()
    data["gitlab"].update(gitlab)
    assert problems_of(data) == [problem]


def test_group_runners_with_an_owner_are_valid() -> None:
    data = valid_config()
    data["gitlab"].update({"runner_type": "group_type", "runner_owner_id": 42})
    assert parse_config(data).gitlab.runner_owner_id == 42


def test_job_timeout_bounds() -> None:
    assert problems_of(with_pool(job_timeout_seconds=60)) == [
        "pools[0](docker).job_timeout_seconds: must be between 600 and 2592000, got 60"
    ]


# -- what GitLab refuses when a pool's runner is created fails validation first ---------------------------------


def test_more_tags_than_gitlab_allows_on_a_runner_are_refused() -> None:
    """Ci::Runner::TAG_LIST_MAX_LENGTH = 50 (app/models/ci/runner.rb in gitlab-org/gitlab)."""
    assert parse_config(with_pool(tags=[f"t{i}" for i in range(50)])).pools[0].tags[-1] == "t49"
    assert problems_of(with_pool(tags=[f"t{i}" for i in range(51)])) == [
        "pools[0](docker).tags: must list at most 50 tags, GitLab's limit for a runner, got 51"
    ]


def test_a_tag_longer_than_gitlab_keeps_is_refused() -> None:
    """Ci::Tag validates name length maximum 255 (app/models/ci/tag.rb in gitlab-org/gitlab)."""
    assert parse_config(with_pool(tags=["a" * 255])).pools[0].tags == ("a" * 255,)
    assert problems_of(with_pool(tags=["linux", "a" * 256])) == [
        "pools[0](docker).tags[1]: must be at most 255 characters (GitLab's limit), got 256"
    ]


def test_a_runner_timeout_under_ten_minutes_is_refused() -> None:
    """Ci::Runner validates maximum_timeout >= 600, "needs to be at least 10 minutes" (app/models/ci/runner.rb)."""
    assert parse_config(with_pool(job_timeout_seconds=600)).pools[0].job_timeout_seconds == 600
    assert problems_of(with_pool(job_timeout_seconds=599)) == [
        "pools[0](docker).job_timeout_seconds: must be between 600 and 2592000, got 599"
    ]


def test_the_longest_runner_description_fits_gitlab() -> None:
    """Ci::Runner validates description length maximum 1024 (app/models/ci/runner.rb); the description is
    naming.runner_description of the longest fleet and pool names the config allows and a 17-digit instance id."""
    from chalicelib.naming import runner_description

    longest = runner_description("f" * 40, "p" * 32, "i-" + "0" * 17)

    assert len(longest) <= 1024

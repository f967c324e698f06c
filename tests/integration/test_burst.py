"""A burst: 150 pending jobs, delivered as real webhooks, over two pools of at most 60 runners each.

Two event-pump threads play concurrent scale-up invocations while a monitor samples, throughout, the running
instances and the capacity counter of each pool: neither may ever pass 60. The 30 jobs that find their pool
full wait; when 30 runners finish, they launch. In the end every job has launched exactly once.

The same rules at 500 jobs over pools of 200 are ``bench/scale_up_burst.py``'s (``make bench``): at that size the
burst takes minutes of this machine, too long for a suite that must pass on a busy machine with margin.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

from chalicelib.store import job_key, pool_key
from fleetctl.sandbox.ec2_events import terminate_instances
from fleetctl.sandbox.stack import DEFAULT_CONFIG, Sandbox

MAX_RUNNERS = 60
_SLOW_ANSWER = (ReadTimeoutError, ConnectTimeoutError)
JOBS_PER_POOL = 75
FINISHING_PER_POOL = JOBS_PER_POOL - MAX_RUNNERS
FULL = Counter({"docker": MAX_RUNNERS, "build": MAX_RUNNERS})


@pytest.fixture(scope="module")
def burst_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("burst")
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for pool in document["pools"]:
        pool["max_runners"] = MAX_RUNNERS
        pool["warm"] = {"size": 0, "windows": []}
    config = workdir / "burst.yaml"
    config.write_text(yaml.safe_dump(document))
    # No agents: the burst counts instances as scale-up launched them, none powered off by a finished job.
    stack = Sandbox(config_path=Path(config), workdir=workdir, run_pump=False, agents=False)
    stack.start()
    yield stack
    stack.stop()


class Monitor:
    """Samples each pool's live instances and lease counter until stopped; keeps the highest of each."""

    def __init__(self, sandbox: Sandbox) -> None:
        from chalicelib import runtime

        self._sandbox = sandbox
        self._ec2 = runtime.aws().ec2
        self._store = runtime.store()
        self.highest: Counter[str] = Counter()
        self.samples = 0
        self.missed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def live_instances(self) -> Counter[str]:
        live: Counter[str] = Counter()
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
        )
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                    live[tags.get("runner-fleet:pool", "?")] += 1
        return live

    def leases(self) -> Counter[str]:
        return Counter({p: int((self._store.get(pool_key(p)) or {}).get("leases", 0)) for p in ("docker", "build")})

    def _run(self) -> None:
        # Capacity counters every second; instances (a DescribeInstances over hundreds, slow in moto, which also
        # serves the app) every fifth: the monitor must not starve the fleet it watches.
        while not self._stop.is_set():
            try:
                leases = self.leases()
                live = self.live_instances() if self.samples % 5 == 0 else Counter()
            except _SLOW_ANSWER:
                # moto, serving the whole burst, can answer the monitor too late; that sample is skipped.
                self.missed += 1
                self._stop.wait(1.0)
                continue
            for pool in ("docker", "build"):
                self.highest[f"{pool} instances"] = max(self.highest[f"{pool} instances"], live[pool])
                self.highest[f"{pool} leases"] = max(self.highest[f"{pool} leases"], leases[pool])
            self.samples += 1
            self._stop.wait(1.0)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _wait(condition: Any, timeout: float, what: str, state: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not _holds(condition):
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f": {state()}" if state else "")
        time.sleep(5)


def _holds(condition: Any) -> bool:
    """A look at the fleet; one that moto answers too late (while it serves the burst) counts as not yet."""
    try:
        return bool(condition())
    except _SLOW_ANSWER:
        return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_burst_of_jobs_never_overfills_a_pool_and_launches_every_job_once(burst_sandbox: Sandbox) -> None:
    from chalicelib import runtime

    stack = burst_sandbox
    store = runtime.store()
    specs = [{"name": f"d{i}", "stage": "test", "tags": ["docker", "linux"]} for i in range(JOBS_PER_POOL)]
    specs += [{"name": f"b{i}", "stage": "test", "tags": ["docker", "dind"]} for i in range(JOBS_PER_POOL)]
    stop = threading.Event()
    pumps = [threading.Thread(target=stack.pump.run, args=(stop,), kwargs={"interval": 0.1}) for _ in range(2)]
    with Monitor(stack) as monitor:
        for pump in pumps:
            pump.start()
        try:
            # when the jobs arrive as webhooks
            pipeline = stack.gitlab.create_pipeline(stack.project_id, specs)
            stack.gitlab.wait_for_deliveries(timeout=120)
            job_ids = [int(j["id"]) for j in stack.gitlab.jobs_of_pipeline(stack.project_id, pipeline)]
            # then each pool fills up to its limit, and no further
            _wait(lambda: monitor.leases() == FULL, 480, "both pools full")
            _wait(lambda: monitor.live_instances() == FULL, 240, "both pools' runners")
            time.sleep(3)  # the waiting jobs keep asking; the pools must stay full, not overfill
            assert monitor.live_instances() == FULL
            # when some runners finish
            live = monitor.live_instances()
            assert live == FULL
            finishing = _some_instances(runtime.aws().ec2, {"docker": FINISHING_PER_POOL, "build": FINISHING_PER_POOL})
            terminate_instances(runtime.aws().ec2, finishing)
            # then the waiting jobs launch in the capacity they free
            _wait(lambda: _launched(store, stack.project_id, job_ids) == len(job_ids), 480, "every job launched")
        finally:
            stop.set()
            for pump in pumps:
                pump.join(timeout=30)

    # Copies of a job (a re-sent message whose first answer was lost, a job re-queued to resume a launch whose
    # CreateFleet answer was lost) may still wait out their delay: let them come back and be recognised as
    # launched already, launching nothing more.
    _wait(
        lambda: stack.pump.drain(timeout=5) == 0 and _queue_depth(runtime.jobs_queue().url) == 0,
        180,
        "empty queue",
        lambda: f"queue {_queue_attributes(runtime.jobs_queue().url)}",
    )
    # Watched throughout: most seconds of the burst gave a sample.
    assert monitor.samples > 10 and monitor.missed < monitor.samples
    assert monitor.highest["docker instances"] <= MAX_RUNNERS
    assert monitor.highest["build instances"] <= MAX_RUNNERS
    assert monitor.highest["docker leases"] <= MAX_RUNNERS
    assert monitor.highest["build leases"] <= MAX_RUNNERS
    assert monitor.live_instances() == FULL
    assert {p: int((store.get(pool_key(p)) or {}).get("leases", 0)) for p in ("docker", "build")} == {
        "docker": MAX_RUNNERS,
        "build": MAX_RUNNERS,
    }
    # one instance and one GitLab runner per job, ever; nothing lost, nothing dead-lettered
    runners = stack.gitlab.runners()
    assert len(runners) == 2 * MAX_RUNNERS  # one per job made, those of the finished instances deleted
    assert _all_instances_ever(runtime.aws().ec2) == 2 * JOBS_PER_POOL
    assert _queue_depth(runtime.jobs_queue().url) == 0
    assert _queue_depth(runtime.dead_letter_queue().url) == 0


def _launched(store: Any, project_id: int, job_ids: list[int]) -> int:
    """How many of the jobs belong to a finished launch (two scans: light on moto's one-at-a-time DynamoDB)."""
    launched = {
        str(item["pk"]).removeprefix("LAUNCH#") for item in store.scan("launch") if item.get("state") == "launched"
    }
    wanted = {job_key(project_id, job_id) for job_id in job_ids}
    return sum(1 for item in store.scan("job") if item["pk"] in wanted and item.get("launch_id") in launched)


def _some_instances(ec2: Any, wanted: dict[str, int]) -> list[str]:
    chosen: list[str] = []
    taken: Counter[str] = Counter()
    for page in ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-state-name", "Values": ["running"]}]
    ):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                pool = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}.get("runner-fleet:pool", "")
                if taken[pool] < wanted.get(pool, 0):
                    taken[pool] += 1
                    chosen.append(instance["InstanceId"])
    return chosen


def _all_instances_ever(ec2: Any) -> int:
    pages = ec2.get_paginator("describe_instances").paginate()
    return sum(len(r["Instances"]) for page in pages for r in page["Reservations"])


def _queue_attributes(url: str) -> dict[str, int]:
    from chalicelib import runtime

    attributes = runtime.aws().sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=[
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ],
    )["Attributes"]
    return {name: int(value) for name, value in attributes.items()}


def _queue_depth(url: str) -> int:
    return sum(_queue_attributes(url).values())

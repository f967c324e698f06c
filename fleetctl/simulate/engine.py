"""The simulation: jobs arrive, scale-up launches, runners boot and take jobs, reconcile runs every minute.

What is decided is decided by the product's functions, called through their modules (so that a test can watch
them): which pool a job goes to (``policy.match_pool``), which runners may take it (``policy.can_take``), which jobs
wait for an idle runner (``policy.leave_to_idle_runners`` with ``RetryPolicy.idle_grace``), how long a job waits for
capacity or after a failed launch (``RetryPolicy``), whether a short spot launch falls back to on-demand
(``fleet.plan_launch``), whether a job lost to an interruption is retried (``interruptions.decide_retry``), and what
reconcile does (``rules.decide``: retirements for age and closed warm windows, warm launches within
``max_runners``, never-contacted runners). What the product leaves to others is modelled here: EC2 (boot times,
capacity, interruptions, the bill), GitLab handing the oldest pending job to the first runner that asks, and
gitlab-runner's ``run-single`` powering off after ``max_builds`` jobs or ``idle_wait_seconds`` without one.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum

from chalicelib.config import FleetConfig, PoolConfig, WarmConfig
from chalicelib.gitlab_api import GitLabRunner
from chalicelib.intake.job_hooks import JobStatus
from chalicelib.lifecycle import facts as facts_module
from chalicelib.lifecycle import interruptions, rules, windows
from chalicelib.lifecycle.facts import Facts, InstanceFact
from chalicelib.scaling import fleet, policy
from chalicelib.scaling.fleet import LaunchTemplateRef
from chalicelib.scaling.store.records import LAUNCH_POOL_ATTRIBUTE, RunnerRecord
from chalicelib.store import RETIRING, RunnerState
from fleetctl.simulate import api_rates as api
from fleetctl.simulate.events import EventQueue, VirtualClock
from fleetctl.simulate.history import HistoryJob
from fleetctl.simulate.model import Model, stream
from fleetctl.simulate.prices import ON_DEMAND, SPOT, PriceTable

BATCH_SIZE = 50  # the jobs queue's event source batch (app.py)


class Phase(str, Enum):
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    GONE = "gone"


class SimJob:
    """One job run: a history job, or the retry of one lost to an interruption."""

    __slots__ = (
        "attempts",
        "claimed_at",
        "done",
        "graced",
        "job",
        "pending",
        "pending_at",
        "pool",
        "retries",
        "seq",
        "started_at",
        "tags",
        "waits",
    )

    def __init__(self, job: HistoryJob, seq: int, pending_at: float, retries: int = 0) -> None:
        self.job = job
        self.seq = seq
        self.tags = frozenset(job.tags)
        self.pending_at = pending_at
        self.started_at = -1.0
        self.pool = ""
        self.retries = retries
        self.graced = False
        self.waits = 0
        self.attempts = 0
        self.pending = True
        self.done = False
        self.claimed_at = -1.0


class Instance:
    __slots__ = (
        "booted_at",
        "builds_left",
        "draining",
        "draining_at",
        "ended_at",
        "facts",
        "first_job_at",
        "id",
        "idle_since",
        "instance_type",
        "job",
        "jobs_run",
        "launched_at",
        "lifecycle",
        "offered",
        "phase",
        "pool",
        "reason",
        "warm",
    )

    def __init__(self, number: int, pool: PoolConfig, instance_type: str, lifecycle: str, now: float, warm: bool):
        self.id = number
        self.pool = pool
        self.instance_type = instance_type
        self.lifecycle = lifecycle
        self.launched_at = now
        self.booted_at = -1.0
        self.ended_at = -1.0
        self.phase = Phase.BOOTING
        self.builds_left = pool.max_builds
        self.idle_since = now
        self.job: SimJob | None = None
        self.warm = warm
        self.draining = ""
        self.draining_at = 0.0
        self.jobs_run = 0
        self.offered = False
        self.first_job_at = 0.0
        self.facts: tuple[object, tuple[RunnerRecord, InstanceFact, GitLabRunner]] | None = None
        self.reason = ""

    @property
    def instance_id(self) -> str:
        return f"i-{self.id:017x}"


@dataclass(frozen=True)
class Life:
    """One instance, from launch to termination, and why it ended."""

    pool: str
    warm: bool
    lifecycle: str
    launched_at: float
    ended_at: float
    reason: str


@dataclass
class PoolTally:
    launched: int = 0
    launched_for_warm: int = 0
    instance_seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    billed_cost: float = 0.0
    # The history's durations of the finished jobs whose tags are matched to the pool (whichever runner ran them).
    job_seconds: float = 0.0
    jobs: int = 0
    waits: list[float] = field(default_factory=list)
    peak: int = 0
    live: int = 0
    interruptions: int = 0
    retried: int = 0
    lost: int = 0
    capacity_errors: int = 0
    fallbacks: int = 0
    dead_lettered: int = 0


@dataclass
class Outcome:
    """What a run produced, before it is summarised (:mod:`fleetctl.simulate.report`)."""

    pools: dict[str, PoolTally]
    meter: api.ApiMeter
    start: float
    end: float
    unmatched: int
    events: int
    peak_total: int


class Simulation:
    def __init__(
        self,
        config: FleetConfig,
        jobs: Sequence[HistoryJob],
        *,
        model: Model | None = None,
        prices: PriceTable,
        seed: int = 0,
        retry_policy: policy.RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.region = config.region or "us-east-1"
        self.model = model or Model()
        self.prices = prices
        self.retry = retry_policy or policy.RetryPolicy()
        self.jobs = sorted(jobs, key=lambda job: (job.pending_at, job.id))
        # Reconcile starts a warm-up before the first job, so that warm pools are warm when the history begins.
        start = (self.jobs[0].pending_at if self.jobs else 0.0) - self.model.warmup_seconds
        self.clock = VirtualClock(start)
        self.queue = EventQueue(self.clock)
        self.meter = api.ApiMeter()
        self.tally = {pool.name: PoolTally() for pool in config.pools}
        self.unmatched = 0
        self.peak_total = 0
        self.live_total = 0
        self.pools = {pool.name: pool for pool in config.pools}
        self.leases = {pool.name: 0 for pool in config.pools}
        self.idle: dict[str, dict[int, Instance]] = {pool.name: {} for pool in config.pools}
        self.instances: dict[int, Instance] = {}
        self.next_instance = 0
        self.next_seq = 0
        self.by_seq: dict[int, SimJob] = {}  # pending jobs
        self.recovered = 0
        self.lives: list[Life] = []  # every instance's life, once it ended
        # Pending jobs by tag set, oldest first (GitLab hands a runner the oldest job it may run); each pool's
        # list of the tag sets its runners may take, built as tag sets appear.
        self.pending: dict[frozenset[str], deque[SimJob]] = {}
        self.takeable: dict[str, list[deque[SimJob]]] = {pool.name: [] for pool in config.pools}
        self.takers: dict[frozenset[str], list[str]] = {}
        self.floor_pool: dict[frozenset[str], str] = {}
        self.inbox: list[SimJob] = []
        self.batch_due = False
        self.rng_boot = stream(seed, "boot")
        self.rng_pull = stream(seed, "image pull")
        self.rng_interrupt = stream(seed, "interruptions")
        self.rng_capacity = stream(seed, "capacity")
        self.rng_poll = stream(seed, "poll")
        self.rng_policy = stream(seed, "retry policy")
        self.horizon = (self.jobs[-1].pending_at if self.jobs else start) + 1.0
        self.last_activity = start
        self.templates = {pool.name: LaunchTemplateRef(f"sim-{pool.name}", "1") for pool in config.pools}
        # The cheapest type of each pool for each lifecycle: what price-capacity-optimized spot and lowest-price
        # on-demand allocations tend to give, with the capacity left out of the model.
        self.cheapest = {
            pool.name: {
                lifecycle: prices.cheapest(self.region, pool.instance_types, lifecycle)[0]
                for lifecycle in (SPOT, ON_DEMAND)
            }
            for pool in config.pools
        }

    # -- running -------------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        for job in self.jobs:
            self.queue.at(job.pending_at, self._arrive, self._new_job(job, job.pending_at))
        start = self.clock.now
        self.queue.at(start, self._reconcile)
        with warm_sizes_held():
            self.queue.run()
        end = max(self.last_activity, start)
        return Outcome(self.tally, self.meter, start, end, self.unmatched, self.queue.fired, self.peak_total)

    def _new_job(self, job: HistoryJob, pending_at: float, retries: int = 0) -> SimJob:
        self.next_seq += 1
        return SimJob(job, self.next_seq, pending_at, retries)

    @property
    def now(self) -> float:
        return self.clock.now

    # -- jobs ----------------------------------------------------------------------------------------------

    def _arrive(self, job: SimJob) -> None:
        now = self.now
        # The webhook records the job and queues it (one PutItem, one SendMessage).
        self.meter.add(api.DYNAMODB_WRITE, now)
        self.meter.add(api.SQS_SEND, now)
        self.by_seq[job.seq] = job
        waiting = self.pending.get(job.tags)
        if waiting is None:
            waiting = self._new_tag_set(job.tags)
        waiting.append(job)
        self._offer(job)
        self._deliver(job, self.model.queue_seconds)

    def _new_tag_set(self, tags: frozenset[str]) -> deque[SimJob]:
        waiting: deque[SimJob] = deque()
        self.pending[tags] = waiting
        ordered = sorted(tags)
        takers = [pool.name for pool in self.config.pools if policy.can_take(pool, ordered)]
        self.takers[tags] = takers
        # The floor counts a job's seconds against the pool its tags are matched to, whichever runner took it.
        matched = policy.match_pool(ordered, self.config.pools)
        self.floor_pool[tags] = matched.name if matched else ""
        for name in takers:
            self.takeable[name].append(waiting)
        return waiting

    def _offer(self, job: SimJob) -> None:
        """An idle runner that may take the job asks GitLab for it at its next poll."""
        for name in self.takers[job.tags]:
            for instance in self.idle[name].values():
                if not instance.offered:
                    instance.offered = True
                    self.queue.after(self.rng_poll.uniform(0, self.model.poll_seconds), self._poll, instance)
                    return

    def _poll(self, instance: Instance) -> None:
        instance.offered = False
        if instance.phase is Phase.IDLE and not instance.draining:
            self._take_next(instance)

    def _take_next(self, instance: Instance) -> bool:
        """The runner asks GitLab for a job: the oldest pending one it may run, if any."""
        self.meter.add(api.GITLAB_JOB_REQUEST, self.now)
        best: SimJob | None = None
        for waiting in self.takeable[instance.pool.name]:
            while waiting and not waiting[0].pending:
                waiting.popleft()
            if waiting and (best is None or waiting[0].seq < best.seq):
                best = waiting[0]
        if best is None:
            return False
        self._start(instance, best)
        return True

    def _start(self, instance: Instance, job: SimJob) -> None:
        now = self.now
        job.pending = False
        job.started_at = now
        self.by_seq.pop(job.seq, None)
        pool = self.tally[instance.pool.name]
        pool.waits.append(now - job.pending_at)
        self.idle[instance.pool.name].pop(instance.id, None)
        instance.phase = Phase.BUSY
        instance.job = job
        instance.builds_left -= 1
        run = job.job.duration
        if instance.jobs_run == 0:
            instance.first_job_at = now
            run += self.model.image_pull.sample(self.rng_pull)
        instance.jobs_run += 1
        # Job Hooks: running, then finished; each updates the job and runner records.
        self.meter.add(api.DYNAMODB_WRITE, now, 2)
        self.queue.after(run, self._finish, instance, job)

    def _finish(self, instance: Instance, job: SimJob) -> None:
        if instance.job is not job or instance.phase is not Phase.BUSY:
            return  # the instance was lost meanwhile
        job.done = True
        tally = self.tally[instance.pool.name]
        tally.jobs += 1
        floor_pool = self.floor_pool[job.tags]
        if floor_pool:
            self.tally[floor_pool].job_seconds += job.job.duration
        self.meter.add(api.DYNAMODB_WRITE, self.now, 2)
        instance.job = None
        if instance.builds_left <= 0:
            self._power_off(instance, "max builds")
            return
        self._become_idle(instance)

    def _become_idle(self, instance: Instance) -> None:
        instance.phase = Phase.IDLE
        instance.idle_since = self.now
        # A warm runner never stops for idleness (its token item says so): reconcile retires it.
        stops = not instance.warm
        if instance.draining:
            # A paused runner gets no job; it waits out its idle time (or its retirement) and powers off.
            if stops:
                self.queue.after(instance.pool.idle_wait_seconds, self._idle_timeout, instance, instance.idle_since)
            return
        if self._take_next(instance):
            return
        self.idle[instance.pool.name][instance.id] = instance
        if stops:
            self.queue.after(instance.pool.idle_wait_seconds, self._idle_timeout, instance, instance.idle_since)

    def _idle_timeout(self, instance: Instance, since: float) -> None:
        if instance.phase is Phase.IDLE and instance.idle_since == since:
            self._power_off(instance, "wait timeout")

    # -- scale-up ------------------------------------------------------------------------------------------

    def _deliver(self, job: SimJob, delay: float) -> None:
        """The job's message reaches scale-up after ``delay``; messages due together share a batch."""
        self.queue.after(delay, self._receive, job)

    def _receive(self, job: SimJob) -> None:
        self.inbox.append(job)
        if not self.batch_due:
            self.batch_due = True
            # The event source's batching window gathers what arrives within it.
            self.queue.after(self.model.queue_seconds, self._batch)

    def _batch(self) -> None:
        self.batch_due = False
        batch, self.inbox = self.inbox[:BATCH_SIZE], self.inbox[BATCH_SIZE:]
        if self.inbox:
            self.batch_due = True
            self.queue.after(0.0, self._batch)
        now = self.now
        self.meter.add(api.SQS_RECEIVE, now)
        by_pool: dict[str, list[SimJob]] = defaultdict(list)
        for job in batch:
            if not job.pending:
                continue  # taken meanwhile: scale-up reads it from GitLab and drops it
            if not job.pool:
                self.meter.add(api.GITLAB_GET_JOB, now)
                matched = policy.match_pool(sorted(job.tags), self.config.pools)
                if matched is None:
                    self.unmatched += 1
                    job.pending = False
                    self.by_seq.pop(job.seq, None)
                    continue
                job.pool = matched.name
            elif job.waits == 0:
                self.meter.add(api.GITLAB_GET_JOB, now)  # a deferred or retried job is read again
            by_pool[job.pool].append(job)
        for name, jobs in by_pool.items():
            self._scale_pool(self.pools[name], jobs)

    def _scale_pool(self, pool: PoolConfig, jobs: list[SimJob]) -> None:
        fresh = [job for job in jobs if not job.graced and job.waits == 0]
        # The idle index holds runners idle after a job (the finished Job Hook puts them there), not ones booted
        # and never given one (store.py: idle_pool).
        idle = sum(1 for i in self.idle[pool.name].values() if i.jobs_run and not i.draining) if fresh else 0
        deferred = policy.leave_to_idle_runners([(job.seq, job.graced) for job in fresh], idle)
        launch: list[SimJob] = []
        for job in jobs:
            if job.seq in deferred:
                job.graced = True
                self.meter.add(api.SQS_SEND, self.now)
                self._deliver(job, self.retry.idle_grace)
            else:
                launch.append(job)
        room = max(0, pool.max_runners - self.leases[pool.name])
        for job in launch[room:]:
            job.waits += 1
            self.meter.add(api.SQS_SEND, self.now)
            self._deliver(job, self.retry.lease_wait_delay(job.waits, self.rng_policy))
        admitted = launch[:room]
        for job in admitted:
            job.claimed_at = self.now
        if admitted:
            self.meter.add(api.DYNAMODB_WRITE, self.now, 2 * len(admitted) + 1)  # claims, the lease counter
            self._launch(pool, admitted, warm=0)

    def _launch(self, pool: PoolConfig, jobs: list[SimJob], *, warm: int) -> None:
        """One CreateFleet for the pool (two when a short spot launch falls back to on-demand)."""
        now = self.now
        count = len(jobs) + warm
        plan = fleet.plan_launch(pool, self.templates[pool.name], fleet=self.config.fleet, launch_id="sim", count=count)
        lifecycle = (
            ON_DEMAND
            if plan.request["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "on-demand"
            else SPOT
        )
        self.meter.add(api.CREATE_FLEET, now)
        tally = self.tally[pool.name]
        if lifecycle == SPOT and self.rng_capacity.random() < self.model.capacity_error_rate:
            tally.capacity_errors += 1
            if not plan.fallback:
                self._launch_failed(pool, jobs)
                return
            tally.fallbacks += 1
            self.meter.add(api.CREATE_FLEET, now)
            lifecycle = ON_DEMAND
        self.leases[pool.name] += count
        self.meter.add(api.INSTANCES_LAUNCHED, now, count)
        instance_type = self.cheapest[pool.name][lifecycle]
        for index in range(count):
            self._new_instance(pool, instance_type, lifecycle, warm=index >= len(jobs))

    def _launch_failed(self, pool: PoolConfig, jobs: list[SimJob]) -> None:
        for job in jobs:
            job.attempts += 1
            job.claimed_at = -1.0  # the failed launch releases its claim, as scale-up's does
            if job.attempts >= pool.max_launch_attempts:
                # Dead-lettered: no launch will come for it; counted, and left out of the replay from here on.
                self.tally[pool.name].dead_lettered += 1
                job.pending = False
                self.by_seq.pop(job.seq, None)
                continue
            self.meter.add(api.SQS_SEND, self.now)
            self._deliver(job, self.retry.backoff_delay(job.attempts, self.rng_policy))

    def _new_instance(self, pool: PoolConfig, instance_type: str, lifecycle: str, *, warm: bool) -> None:
        now = self.now
        self.next_instance += 1
        instance = Instance(self.next_instance, pool, instance_type, lifecycle, now, warm)
        self.instances[instance.id] = instance
        tally = self.tally[pool.name]
        tally.launched += 1
        tally.launched_for_warm += int(warm)
        tally.live += 1
        tally.peak = max(tally.peak, tally.live)
        self.live_total += 1
        self.peak_total = max(self.peak_total, self.live_total)
        # Its GitLab runner, record and token.
        self.meter.add(api.GITLAB_CREATE_RUNNER, now)
        self.meter.add(api.DYNAMODB_WRITE, now, 3)
        self.queue.after(self.model.boot.sample(self.rng_boot), self._booted, instance)
        self.queue.after(pool.max_lifetime_minutes * 60.0, self._lifetime_over, instance)
        rate = self.model.interruptions_per_hour(pool.name) if lifecycle == SPOT else 0.0
        if rate > 0:
            self.queue.after(self.rng_interrupt.expovariate(rate / 3600.0), self._interruption_warning, instance)

    def _booted(self, instance: Instance) -> None:
        if instance.phase is not Phase.BOOTING:
            return
        instance.booted_at = self.now
        self.meter.add(api.DYNAMODB_READ, self.now)  # the token read (and delete)
        self.meter.add(api.DYNAMODB_WRITE, self.now)
        self._become_idle(instance)

    # -- endings -------------------------------------------------------------------------------------------

    def _power_off(self, instance: Instance, reason: str) -> None:
        if instance.phase is Phase.GONE:
            return
        self.idle[instance.pool.name].pop(instance.id, None)
        instance.phase = Phase.GONE
        instance.reason = reason
        self.queue.after(self.model.shutdown_seconds, self._terminated, instance)

    def _terminated(self, instance: Instance) -> None:
        now = self.now
        instance.ended_at = now
        self.last_activity = max(self.last_activity, now)
        pool = instance.pool
        tally = self.tally[pool.name]
        seconds = now - instance.launched_at
        tally.instance_seconds[(instance.lifecycle, instance.instance_type)] += seconds
        hourly = self.prices.hourly(self.region, instance.instance_type, instance.lifecycle)
        tally.billed_cost += max(seconds, self.model.minimum_billed_seconds) * hourly / 3600.0
        tally.live -= 1
        self.live_total -= 1
        self.leases[pool.name] -= 1
        del self.instances[instance.id]
        self.lives.append(
            Life(pool.name, instance.warm, instance.lifecycle, instance.launched_at, now, instance.reason)
        )
        # instance_state: the record terminated, the lease back, the token deleted, the GitLab runner deleted.
        self.meter.add(api.DYNAMODB_WRITE, now, 3)
        self.meter.add(api.GITLAB_DELETE_RUNNER, now)

    def _lose_job(self, instance: Instance) -> None:
        job = instance.job
        if job is None:
            return
        instance.job = None
        tally = self.tally[instance.pool.name]
        tally.lost += 1
        decision = interruptions.decide_retry(instance.pool, job.retries)
        if decision is interruptions.RetryDecision.RETRY:
            tally.retried += 1
            self.meter.add(api.GITLAB_RETRY_JOB, self.now)
            retry = self._new_job(job.job, self.now + self.model.retry_seconds, job.retries + 1)
            self.queue.at(retry.pending_at, self._arrive, retry)

    def _interruption_warning(self, instance: Instance) -> None:
        if instance.phase is Phase.GONE:
            return
        self.tally[instance.pool.name].interruptions += 1
        # The interruption handler marks the record draining and pauses the GitLab runner.
        self.meter.add(api.DYNAMODB_WRITE, self.now)
        self.meter.add(api.GITLAB_UPDATE_RUNNER, self.now)
        instance.draining = instance.draining or interruptions.Interruption.SPOT_WARNING.value
        instance.draining_at = self.now
        self.idle[instance.pool.name].pop(instance.id, None)
        self.queue.after(self.model.interruption_notice_seconds, self._interrupted, instance)

    def _interrupted(self, instance: Instance) -> None:
        if instance.phase is Phase.GONE:
            return
        self._lose_job(instance)
        self.idle[instance.pool.name].pop(instance.id, None)
        instance.phase = Phase.GONE
        instance.reason = "spot interruption"
        self._terminated(instance)

    def _lifetime_over(self, instance: Instance) -> None:
        """The instance powers itself off at its max lifetime, whatever it runs (reconcile retires it before)."""
        if instance.phase is Phase.GONE:
            return
        if instance.phase is Phase.BUSY:
            self._lose_job(instance)
        self._power_off(instance, "max lifetime")

    # -- reconcile -----------------------------------------------------------------------------------------

    def _reconcile(self) -> None:
        now = self.now
        self.meter.add(api.GITLAB_LIST_RUNNERS, now, max(1, math.ceil(len(self.instances) / 100)))
        self.meter.add(api.DESCRIBE_INSTANCES, now, max(1, math.ceil(len(self.instances) / 1000)))
        self.meter.add(api.DESCRIBE_LAUNCH_TEMPLATES, now)
        self.meter.add(api.DYNAMODB_QUERY, now, 6)
        for action in rules.decide(self._facts(now), self.config):
            self._act(action)
        # Reconcile runs until the last job arrived and every job is done; what is left then idles out by itself.
        # GitLab drops a job left pending for a day (StuckCiJobsWorker), so a day past the last arrival ends it.
        busy = self.by_seq or any(i.phase is Phase.BUSY for i in self.instances.values())
        if now < self.horizon or (busy and now < self.horizon + 86400.0):
            self.queue.after(self.model.reconcile_seconds, self._reconcile)

    def _facts(self, now: float) -> Facts:
        records: dict[str, RunnerRecord] = {}
        instances: dict[str, InstanceFact] = {}
        runners: list[GitLabRunner] = []
        for instance in self.instances.values():
            if instance.phase is Phase.GONE:
                continue
            record, fact, runner = self._instance_facts(instance)
            records[fact.instance_id] = record
            instances[fact.instance_id] = fact
            runners.append(runner)
        # The sweep of GitLab's pending jobs: this run's turn of the active projects (the product's round robin).
        pending = list(self.by_seq.values())
        swept = set(facts_module.sweep_turn(sorted({job.job.project_id for job in pending}), now))
        return Facts(
            now=now,
            records=records,
            launches=(),
            leases=dict(self.leases),
            instances=instances,
            template_versions={},
            jobs=[self._job_fact(job) for job in pending],
            active_projects=tuple(sorted(swept)),
            gitlab_runners=runners,
            pending_jobs=[
                facts_module.PendingJob(job.job.project_id, job.seq, job.pending_at)
                for job in pending
                if job.job.project_id in swept
            ],
            tokens=(),
        )

    def _job_fact(self, job: SimJob) -> facts_module.JobFact:
        """A pending job's table item, as scale-up leaves it: claimed by a launch once one took it."""
        item: dict[str, object] = {"status_rank": JobStatus.PENDING.rank, "updated_at": job.pending_at, "queued": True}
        if job.claimed_at >= 0:
            item.update(launch_id=f"launch-{job.seq}", claimed_at=job.claimed_at, **{LAUNCH_POOL_ATTRIBUTE: job.pool})
        return facts_module.JobFact(job.job.project_id, job.seq, "pending", job.pending_at, item)

    def _instance_facts(self, instance: Instance) -> tuple[RunnerRecord, InstanceFact, GitLabRunner]:
        """The instance as reconcile reads it (record, EC2, GitLab), rebuilt only when it changed."""
        job = instance.job
        key = (instance.phase, instance.jobs_run > 0, instance.draining, instance.booted_at >= 0, job)
        cached = instance.facts
        if cached is not None and cached[0] == key:
            return cached[1]
        name = instance.instance_id
        if instance.phase is Phase.BUSY:
            state = RunnerState.BUSY
        elif instance.jobs_run:
            state = RunnerState.IDLE
        else:
            state = RunnerState.BOOTING
        record = RunnerRecord(
            instance_id=name,
            pool=instance.pool.name,
            launch_id="sim",
            lifecycle=instance.lifecycle,
            instance_type=instance.instance_type,
            launched_at=instance.launched_at,
            boot_deadline_at=instance.launched_at + instance.pool.boot_deadline_seconds,
            gitlab_runner_id=instance.id,
            state=state,
            lease=True,
            max_builds=instance.pool.max_builds,
            draining=instance.draining,
            draining_at=instance.draining_at,
            busy=(f"{job.job.project_id}:{job.seq}",) if job else (),
            first_job_at=instance.first_job_at,
            idle_since=instance.idle_since if state is RunnerState.IDLE else 0.0,
            warm=instance.warm,
        )
        fact = InstanceFact(name, instance.pool.name, "sim", "running", instance.launched_at)
        status = "online" if instance.booted_at >= 0 else "never_contacted"
        runner = GitLabRunner(instance.id, f"runner-fleet {self.config.fleet}/{name}", status, bool(instance.draining))
        instance.facts = (key, (record, fact, runner))
        return record, fact, runner

    def _act(self, action: rules.Action) -> None:
        now = self.now
        if isinstance(action, rules.WarmLaunch):
            pool = self.pools[action.pool]
            self.meter.add(api.DYNAMODB_WRITE, now)
            self._launch(pool, [], warm=action.count)
            return
        if isinstance(action, rules.RecoverJob):
            self._recover(action)
            return
        instance_id = getattr(action, "instance_id", "")
        instance = self.instances.get(int(instance_id[2:], 16)) if instance_id.startswith("i-") else None
        if instance is None or instance.phase is Phase.GONE:
            return
        if isinstance(action, rules.Pause):
            self.meter.add(api.DYNAMODB_WRITE, now)
            self.meter.add(api.GITLAB_UPDATE_RUNNER, now)
            instance.draining = RETIRING + action.reason
            instance.draining_at = now
            self.idle[instance.pool.name].pop(instance.id, None)
        elif isinstance(action, rules.Retire | rules.Reap):
            self.meter.add(api.GITLAB_RUNNER_JOBS, now)
            self.meter.add(api.TERMINATE_INSTANCES, now)
            if instance.phase is Phase.BUSY:
                self._lose_job(instance)
            self._power_off(instance, action.reason)

    def _recover(self, action: rules.RecoverJob) -> None:
        """A pending job whose launch brought a runner that took another job: claimed afresh and queued again."""
        job = self.by_seq.get(action.job_id)
        if job is None or not job.pending:
            return
        self.recovered += 1
        job.claimed_at = -1.0
        job.graced = False
        job.waits = 0
        self.meter.add(api.DYNAMODB_WRITE, self.now)
        self.meter.add(api.SQS_SEND, self.now)
        self._deliver(job, 0.0)


@contextmanager
def warm_sizes_held() -> Iterator[None]:
    """Reconcile's rules, while the simulation runs, get each warm pool's size from ``windows.warm_size`` held
    until the instant ``windows.next_change`` says it changes: both the product's, so the answers are the same,
    without reading the cron schedules again on every run of every simulated minute (the Lambda reads them once a
    minute; a month simulated would read them half a million times)."""
    held: dict[int, tuple[WarmConfig, float, float, int]] = {}

    def warm_size(warm: WarmConfig, now: datetime) -> int:
        at = now.timestamp()
        entry = held.get(id(warm))
        if entry is not None and entry[0] is warm and entry[1] <= at < entry[2]:
            return entry[3]
        size = windows.warm_size(warm, now)
        change = windows.next_change(warm, now)
        held[id(warm)] = (warm, at, change.timestamp() if change else math.inf, size)
        return size

    names = vars(rules)  # the name reconcile's rules call warm_size by
    original = names["warm_size"]
    names["warm_size"] = warm_size
    try:
        yield
    finally:
        names["warm_size"] = original


def simulate(
    config: FleetConfig, jobs: Sequence[HistoryJob], *, prices: PriceTable, model: Model | None = None, seed: int = 0
) -> Outcome:
    return Simulation(config, jobs, model=model, prices=prices, seed=seed).run()


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)

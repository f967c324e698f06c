"""The fleet simulator: replay speed, and the figure we care about.

1. Speed: the reference trace of REPLAY_JOBS jobs (``fleetctl simulate generate --jobs 100000 --seed 1``: about a
   month of a large organisation) replayed once against the example configuration (chalicelib/stages/prod.yaml);
   printed as jobs per second of wall time. Target: the whole replay under 30 s.
2. The figure: on the reference trace of GRID_JOBS jobs (seed 1, a week), every combination of GRID is simulated;
   of the runs on the Pareto frontier of cost against p95 queue wait, the cheapest whose p95 wait is at most the
   model's median boot time plus 15 s is picked, and its cost over the floor cost (job-seconds at the cheapest
   listed spot price of each pool) is printed with its settings. Goal: at most 1.10.

The grid's runs are spread over two processes; no timing is taken from them. The last line is a JSON object with
the figures, the targets and whether they are met.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from chalicelib.config import Market, load_config  # noqa: E402
from fleetctl.simulate.generate import TraceSettings, generate  # noqa: E402
from fleetctl.simulate.model import Model  # noqa: E402
from fleetctl.simulate.prices import load_prices  # noqa: E402
from fleetctl.simulate.report import Summary, chosen, pareto_front, table  # noqa: E402
from fleetctl.simulate.runs import Vary, grid, run  # noqa: E402

CONFIG = PROJECT_DIR / "chalicelib" / "stages" / "prod.yaml"
SEED = 1
REPLAY_JOBS = 100_000
REPLAY_TARGET_SECONDS = 30.0
GRID_JOBS = 20_000
GRID = (
    "pools.docker.idle_wait_seconds=30,60,300,900",
    "pools.docker.warm.size=0,4,8",
    "pools.build.warm.size=0,2,4",
)
GOAL = 1.10


def _grid_run(settings: dict[str, Any]) -> Summary:
    config = load_config(CONFIG)
    jobs = generate(TraceSettings(jobs=GRID_JOBS, seed=SEED))
    return run(config, jobs, prices=load_prices(), model=Model(), seed=SEED, vary=settings)


def main() -> None:
    config = load_config(CONFIG)
    prices = load_prices()
    model = Model()
    jobs = generate(TraceSettings(jobs=REPLAY_JOBS, seed=SEED))
    started = time.perf_counter()
    summary = run(config, jobs, prices=prices, model=model, seed=SEED)
    elapsed = time.perf_counter() - started
    verdict = "meets" if elapsed < REPLAY_TARGET_SECONDS else "MISSES"
    print(
        f"replay: {REPLAY_JOBS} jobs in {elapsed:.1f} s, {REPLAY_JOBS / elapsed:,.0f} jobs/s, {summary.events} events"
    )
    print(f"  {verdict} the target of {REPLAY_TARGET_SECONDS:.0f} s for {REPLAY_JOBS} jobs")
    print(
        f"  as configured: cost/floor {summary.total.cost_over_floor:.3f}, p95 wait {summary.total.wait_p95:.1f} s, "
        f"{summary.total.instances_per_job:.3f} instances a job"
    )

    combos = grid([Vary.parse(text) for text in GRID])
    with ProcessPoolExecutor(max_workers=2) as workers:
        summaries = list(workers.map(_grid_run, combos))
    front = pareto_front([(s.total.cost, s.total.wait_p95) for s in summaries])
    target = model.boot.median + 15.0
    print(f"\ngrid on the reference trace of {GRID_JOBS} jobs (seed {SEED}), {CONFIG.relative_to(PROJECT_DIR)}:")
    print(table(summaries, front))
    pick = chosen(summaries, front, target)
    result: dict[str, Any] = {
        "bench": "simulate",
        "replay_jobs": REPLAY_JOBS,
        "replay_seconds": round(elapsed, 2),
        "jobs_per_second": round(REPLAY_JOBS / elapsed),
        "replay_target_seconds": REPLAY_TARGET_SECONDS,
        "replay_met": elapsed < REPLAY_TARGET_SECONDS,
        "wait_target_seconds": target,
        "goal": GOAL,
    }
    if pick is None:
        print(f"\nthe figure we care about: no policy on the frontier has a p95 wait <= {target:.0f} s")
        print(json.dumps({**result, "cost_over_floor": None, "policy": None, "goal_met": False}))
        return
    best = summaries[pick]
    policy = ", ".join(f"{key}={value}" for key, value in best.settings["vary"].items())
    print(
        f"\nthe figure we care about: cost/floor {best.total.cost_over_floor:.3f} (goal <= {GOAL:.2f}) at {policy}; "
        f"p95 wait {best.total.wait_p95:.1f} s <= {target:.0f} s (median boot {model.boot.median:.0f} s + 15 s)"
    )
    for name, figures in best.pools.items():
        print(f"  {name}: cost/floor {figures.cost_over_floor:.3f}, p95 wait {figures.wait_p95:.1f} s")
    # What the pools the grid cannot tune cost over their floor, whatever the others do: an ephemeral pool pays a
    # boot for every job, an on-demand one its price against the spot floor. With every other pool at its floor
    # cost (no boot, no idle, perfectly packed), the figure would be this.
    fixed = {pool.name for pool in config.pools if pool.ephemeral or pool.market is Market.ON_DEMAND}
    bound = sum(f.cost if name in fixed else f.floor_cost for name, f in best.pools.items()) / best.total.floor_cost
    print(f"  with every pool but {', '.join(sorted(fixed))} at its floor cost, the figure would be {bound:.3f}")
    result["bound_with_reusable_pools_at_floor"] = round(bound, 4)
    figure = round(best.total.cost_over_floor, 4)
    print(
        json.dumps({**result, "cost_over_floor": figure, "policy": best.settings["vary"], "goal_met": figure <= GOAL})
    )


if __name__ == "__main__":
    main()

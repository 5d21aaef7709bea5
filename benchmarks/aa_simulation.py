"""A/A simulation of the report: how far does ``analysis.tables.build_report`` move the headline
IKD − KD difference when no method is better than another?

    .venv/bin/python benchmarks/aa_simulation.py                       # issue 9's setup
    .venv/bin/python benchmarks/aa_simulation.py --confirm-seeds 5     # with a confirmation phase
    .venv/bin/python benchmarks/aa_simulation.py --effect 1            # a true +1 point IKD gain

Each simulated sweep (5 tasks × 3 search seeds, IKD 36 settings vs KD 4, noise sd 1 point,
20 % of IKD trials failing at random; see ``analysis.simulate``) is reported on its own, exactly
as ``ikd-sweep report`` would. Printed: the mean Avg-row IKD − KD, the share of sweeps in which
IKD is ahead, and how often the per-task paired test rejects at p < 0.05. Only columns present
before and after issue 9 (``comparisons``: task, comparison, diff, p_value) are read, so the same
script measures both protocols.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.simulate import SimSpec, simulate  # noqa: E402
from analysis.tables import build_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="search seeds per setting")
    parser.add_argument("--confirm-seeds", type=int, default=0, help="0: no confirmation phase")
    parser.add_argument("--ikd-settings", type=int, default=36)
    parser.add_argument("--kd-settings", type=int, default=4)
    parser.add_argument("--fail", type=float, default=0.2, help="share of IKD trials failing")
    parser.add_argument("--noise", type=float, default=1.0, help="noise sd in points")
    parser.add_argument("--effect", type=float, default=0.0, help="true IKD gain in points")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = SimSpec(
        n_tasks=args.tasks,
        search_seeds=tuple(range(1, args.seeds + 1)),
        confirm_seeds=tuple(range(args.seeds + 1, args.seeds + 1 + args.confirm_seeds)),
        kd_settings=args.kd_settings,
        ikd_settings=args.ikd_settings,
        noise=args.noise / 100,
        effect=args.effect / 100,
        ikd_fail=args.fail,
    )
    avg, task_p, task_diff = [], [], []
    start = time.perf_counter()
    for k in range(args.sweeps):
        runs, expected = simulate(
            args.seed * 100_003 + k, spec, lambda r, e: build_report(r, e).selected
        )
        comp = build_report(runs, expected, "aa").comparisons
        comp = comp[comp["comparison"].eq("ikd-kd")]
        tasks = comp[comp["task"].ne("Avg")]
        avg.append(float(comp.loc[comp["task"].eq("Avg"), "diff"].iloc[0]) * 100)
        task_p += list(tasks["p_value"].astype(float))
        task_diff += list(tasks["diff"].astype(float) * 100)
    elapsed = time.perf_counter() - start
    avg_a, p = np.array(avg), np.array(task_p)
    # A sweep has no Avg difference when a task has no pair (all its IKD seeds failed).
    has_avg = np.isfinite(avg_a)
    tested = p[np.isfinite(p)]
    print(
        f"sweeps={args.sweeps} tasks={args.tasks} search_seeds={args.seeds} "
        f"confirm_seeds={args.confirm_seeds} ikd_settings={args.ikd_settings} "
        f"kd_settings={args.kd_settings} ikd_fail={args.fail:g} noise={args.noise:g}pt "
        f"effect={args.effect:+g}pt"
    )
    print(
        f"mean Avg IKD − KD:          {avg_a[has_avg].mean():+.3f} points "
        f"(sd over sweeps {avg_a[has_avg].std():.3f}; {int((~has_avg).sum())} sweeps without one)"
    )
    print(f"sweeps with IKD ahead:      {100 * np.mean(avg_a[has_avg] > 0):.1f} %")
    print(f"mean per-task IKD − KD:     {np.nanmean(task_diff):+.3f} points")
    print(
        f"per-task rejections p<.05: {100 * np.mean(tested < 0.05):.1f} % "
        f"({int((tested < 0.05).sum())}/{tested.size} tests; {p.size - tested.size} without p)"
    )
    print(f"time: {elapsed:.1f} s ({1000 * elapsed / args.sweeps:.0f} ms per sweep)")


if __name__ == "__main__":
    main()

"""A/A simulation of the report: does ``analysis.tables.build_report`` keep the headline
IKD − KD at zero when no method is better, do its intervals cover, do its tests hold their level?

    .venv/bin/python benchmarks/aa_simulation.py                 # both noise models, 1000 sweeps
    .venv/bin/python benchmarks/aa_simulation.py --effect 1      # a true +1 point IKD gain

Each simulated sweep: 5 tasks × 3 search seeds, IKD 36 settings vs KD 4 (sweeps/glue.yaml's
grid), see ``analysis.simulate`` for the two noise models ("shared": a run's luck shared by val
and dev, val noisier than dev, per-seed effects, IKD 1.5x noisier, 20 % IKD failures and 10 %
early stops in the search, 10 % IKD failures in the confirmation; "independent": independent
val and dev noise of 1 point). All sweeps of a setup go through one ``build_report`` call, each
sweep's tasks named ``s<k>-t<j>``; each sweep's Avg row is rebuilt from its tasks' rows with the
report's own ``stats.welch_average`` (tests/test_aa.py checks that this equals the report of
that sweep alone). Printed per setup: the mean Avg IKD − KD, the share of sweeps with IKD ahead,
how often the per-task and Avg 95 % intervals cover the truth, the per-task t-test's rejection
rate at p < 0.05, the median minimum detectable effect (per task and Avg), and how often the
probability-of-improvement interval covers the true probability (1/2 with no effect).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import stats  # noqa: E402
from analysis.simulate import SimSpec, simulate  # noqa: E402
from analysis.tables import build_report, select_settings  # noqa: E402


def measure(spec: SimSpec, sweeps: int, seed: int) -> dict[str, float]:
    report = build_report(*simulate(seed, spec, select_settings, n_sweeps=sweeps), "aa")
    comp = report.comparisons
    tasks = comp[comp["comparison"].eq("ikd-kd") & comp["task"].ne("Avg")]
    truth = spec.effect
    avg, avg_cover, avg_mde = [], [], []
    for _, g in tasks.groupby(tasks["task"].str.split("-").str[0].to_numpy()):
        mean, se, df = stats.welch_average(g["diff"], g["se"], g["df"])
        avg.append(mean)
        if np.isfinite(se):
            lo, hi = scipy_stats.t.interval(0.95, df, mean, se)
            avg_cover.append(lo <= truth <= hi)
            avg_mde.append(stats.mde(np.array([se]), np.array([df]))[0])
    have = tasks.dropna(subset=["ci_low"])
    p = tasks["p_value"].dropna()
    # With no effect P(IKD > KD) is 1/2 on every seed; with one, it depends on the task's noise.
    imp = tasks.dropna(subset=["p_improve_low"])
    avg = np.array(avg)
    return {
        "avg": 100 * np.nanmean(avg),
        "ahead": 100 * np.mean(avg[np.isfinite(avg)] > 0),
        "task_cov": 100 * np.mean((have["ci_low"] <= truth) & (truth <= have["ci_high"])),
        "avg_cov": 100 * np.mean(avg_cover) if avg_cover else np.nan,
        "avg_defined": 100 * len(avg_cover) / len(avg),
        "reject": 100 * np.mean(p < 0.05),
        "mde": 100 * tasks["mde"].median(),
        "avg_mde": 100 * np.median(avg_mde) if avg_mde else np.nan,
        "imp_cov": 100 * np.mean((imp["p_improve_low"] <= 0.5) & (0.5 <= imp["p_improve_high"]))
        if truth == 0 else np.nan,
        "seeds_05": tasks["seeds_for_effect"].median(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=1000)
    parser.add_argument("--effect", type=float, default=0.0, help="true IKD gain in points")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.sweeps} sweeps per row, 5 tasks each; true IKD − KD {args.effect:+g} pt")
    print("model        confirm | mean Avg  IKD ahead | task CI  Avg CI (defined) | p<.05 | "
          "MDE task / Avg | seeds for 0.5 | P(impr.) CI")
    for model in ("shared", "independent"):
        for confirm in (0, 3, 5):
            kw = {"confirm_seeds": tuple(range(4, 4 + confirm)), "effect": args.effect / 100}
            spec = SimSpec(**kw) if model == "shared" else SimSpec.independent(**kw)
            start = time.perf_counter()
            m = measure(spec, args.sweeps, args.seed * 1000 + confirm)
            took = time.perf_counter() - start
            print(f"{model:<12} {confirm or 'none':>7} | {m['avg']:+7.2f}pt {m['ahead']:8.1f}% | "
                  f"{m['task_cov']:6.1f}% {m['avg_cov']:6.1f}% ({m['avg_defined']:3.0f}%) | "
                  f"{m['reject']:4.1f}% | {m['mde']:4.2f} / {m['avg_mde']:4.2f} pt | "
                  f"{m['seeds_05']:13.0f} | {m['imp_cov']:5.1f}%   ({took:.0f} s)")


if __name__ == "__main__":
    main()

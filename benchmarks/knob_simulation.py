"""Which knob test keeps its level when runs of one seed share that seed's luck? And does the
chosen one find a planted temperature effect, and ``Report.sensitivity`` its slope?

    .venv/bin/python benchmarks/knob_simulation.py               # 400 sweeps per row
    .venv/bin/python benchmarks/knob_simulation.py --sweeps 1000

Simulated search phases (``analysis.simulate``, shared-luck noise: a per-(task, seed) effect
shared by every run of that seed, a per-run luck, val noise, IKD 1.5x noisier, 20 % IKD
failures, 10 % early stops), 5 tasks each, KD 4 temperatures, IKD 4 x 3 x 3 settings. Cells:
(task, method, knob): kd/temperature, ikd/temperature, ikd/exam_every, ikd/teacher_lr. Three
tests of "this knob changes the val score", each on the finished runs of a (task, method):

- blocked ANOVA (``analysis.knobs``): additive model val ~ knobs + seed, Type II F per knob;
- one-way ANOVA of the same model without the seed (the seeds' luck left in the error term);
- Friedman's test on the per-seed means of each value (seeds as blocks, values as treatments).

Printed: the share of A/A cells with p < 0.05 (no knob matters), per seed count; with a planted
+1 pt per step up the temperature grid, the share of IKD and of KD temperature cells with Holm
p < 0.05, and the mean and sd over cells of the slope of ``sensitivity``'s means against the
grid step. The last row has 4x the default seed luck (2 pt): the seeds' shared part is what
the block takes out of the error term.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.knobs import knob_runs, knob_tests, sensitivity  # noqa: E402
from analysis.simulate import TEMPERATURES, SimSpec, simulate_search  # noqa: E402
from analysis.stats import holm  # noqa: E402


def friedman(runs: pd.DataFrame) -> pd.DataFrame:
    """Friedman's test per (task, method, knob) on seed-blocked means; NaN with < 2 seeds."""
    frame, swept = knob_runs(runs)
    rows = []
    for (task, method), knobs in swept.items():
        g = frame[frame["task"].eq(task) & frame["method"].eq(method)]
        p = []
        for h in knobs:
            table = g.groupby(["seed", h])["val"].mean().unstack(h).dropna()
            ok = len(table) >= 2 and table.shape[1] >= 3
            p.append(scipy_stats.friedmanchisquare(*table.to_numpy().T).pvalue if ok else np.nan)
        rows += [{"task": task, "method": method, "hparam": h, "p_value": q, "p_holm": r}
                 for h, q, r in zip(knobs, p, holm(p), strict=True)]
    return pd.DataFrame(rows)


def slopes(sens: pd.DataFrame) -> np.ndarray:
    """Per temperature cell: least-squares slope of the means (points) on the grid step."""
    temp = sens[sens["hparam"].eq("temperature")]
    step = temp["value"].map({t: i for i, t in enumerate(TEMPERATURES)}).to_numpy(dtype=float)
    out = []
    for idx in temp.groupby(["task", "method"], sort=False).indices.values():
        out.append(np.polyfit(step[idx], 100 * temp["mean"].to_numpy()[idx], 1)[0])
    return np.array(out)


TESTS = {
    "blocked ANOVA": lambda runs: knob_tests(runs, shares=False),
    "one-way ANOVA": lambda runs: knob_tests(runs, shares=False, block=False),
    "Friedman": friedman,
}


def _row(label: str, spec: SimSpec, sweeps: int, rng: np.random.Generator) -> None:
    null = simulate_search(rng, spec, sweeps)[0]
    planted = simulate_search(rng, dataclasses.replace(spec, temperature_slope=0.01), sweeps)[0]
    slope = slopes(sensitivity(planted))
    for name, test in TESTS.items():
        start = time.perf_counter()
        aa = test(null)["p_value"]
        hit = test(planted)
        hit = hit[hit["hparam"].eq("temperature")]
        found = {m: 100 * (hit.loc[hit["method"].eq(m), "p_holm"] < 0.05).mean()
                 for m in ("ikd", "kd")}
        took = time.perf_counter() - start
        rate = 100 * (aa < 0.05).sum() / max(aa.notna().sum(), 1)
        print(f"{label:<17} | {name:<13} | {rate:5.1f}% ({100 * aa.notna().mean():3.0f}% defined) "
              f"| {found['ikd']:5.1f}% / {found['kd']:5.1f}% | {slope.mean():+.3f} ± "
              f"{slope.std():.3f}  ({took:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.sweeps} sweeps per row, 5 tasks each")
    print("noise, seeds      | test          | A/A p<.05 (cells)      | +1 pt/step T found "
          "(Holm p<.05) IKD / KD | slope, pt (mean ± sd over cells)")
    rng = np.random.default_rng(args.seed)
    for n_seeds in (1, 3, 5):
        spec = SimSpec(search_seeds=tuple(range(1, n_seeds + 1)))
        _row(f"shared, {n_seeds}", spec, args.sweeps, rng)
    # Seed luck 4x the default (2 pt): what ignoring the seeds costs when it is large.
    spec = SimSpec(seed_noise=0.02)
    _row("shared 4x seed, 3", spec, args.sweeps, rng)


if __name__ == "__main__":
    main()

"""What the knobs do: ``Report.sensitivity`` and ``Report.importance`` (analysis/knobs.py), on
simulated search phases with the shared-luck noise of ``analysis.simulate`` (a per-seed effect
shared by every run of that seed, per-run luck, IKD 1.5x noisier, failures and early stops).
benchmarks/knob_simulation.py prints the same figures for the other tests it was chosen over."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.knobs import IMPORTANCE_COLUMNS, SENSITIVITY_COLUMNS, knob_tests, sensitivity
from analysis.simulate import TEMPERATURES, SimSpec, simulate_search
from analysis.tables import build_report
from ikd_sweep.trials import CONTROL

THREE = SimSpec(search_seeds=(1, 2, 3))


def search(seed: int, spec: SimSpec, sweeps: int) -> pd.DataFrame:
    return simulate_search(np.random.default_rng(seed), spec, sweeps)[0]


@pytest.mark.parametrize("seeds", [(1, 2, 3), (1,)], ids=["3 seeds", "1 seed"])
def test_no_knob_effect_rejects_at_its_level(seeds: tuple[int, ...]) -> None:
    # 300 sweeps x 5 tasks x 4 cells (kd/T, ikd/T, ikd/exam_every, ikd/teacher_lr) = 6000; with
    # one seed KD's 4 runs leave no error to test against (NaN), IKD's 36 do (and a KD whose
    # runs but one stopped early has no swept knob: no row).
    tests = knob_tests(search(3, SimSpec(search_seeds=seeds), 300), shares=False)
    assert len(tests) == 6000 if len(seeds) > 1 else 5900 < len(tests) <= 6000
    tested = tests["p_value"].notna()
    assert tested.all() if len(seeds) > 1 else tested.eq(tests["method"].eq("ikd")).all()
    assert 0.04 <= (tests.loc[tested, "p_value"] < 0.05).mean() <= 0.06


def test_planted_temperature_effect_is_found_and_measured() -> None:
    runs = search(4, SimSpec(search_seeds=(1, 2, 3), temperature_slope=0.01), 100)
    tests = knob_tests(runs, shares=False).set_index(["method", "hparam"])
    # IKD's 36 settings x 3 seeds find +1 pt per temperature step after Holm over its 3 knobs.
    assert (tests.loc[("ikd", "temperature"), "p_holm"] < 0.05).mean() >= 0.8
    # The untouched knobs stay at the level.
    assert (tests.loc[("ikd", "exam_every"), "p_value"] < 0.05).mean() <= 0.1
    sens = sensitivity(runs)
    temp = sens[sens["hparam"].eq("temperature")]
    step = temp["value"].map({t: i for i, t in enumerate(TEMPERATURES)})
    # A value none of whose runs finished has no row (all 3 KD runs stopped early: it happens).
    assert temp.groupby(["task", "method"]).size().between(2, 4).all()
    slopes = temp.assign(step=step).groupby(["task", "method"]).apply(
        lambda c: np.polyfit(c["step"], 100 * c["mean"], 1)[0], include_groups=False)
    assert abs(slopes.mean() - 1.0) <= 0.15  # points per step, as planted


def test_intervals_are_over_seeds_and_one_seed_is_handled() -> None:
    runs = search(5, SimSpec(search_seeds=(1, 2, 3), ikd_fail=0.0, early_stop=0.0), 1)
    three = sensitivity(runs)
    assert list(three.columns) == SENSITIVITY_COLUMNS
    assert (three["n_seeds"] == 3).all()
    # By hand: IKD at exam_every 5, its 12 settings averaged within each seed, then a
    # t-interval over the 3 seed means (runs of one seed share its luck: 3 units, not 36).
    row = three.set_index(["task", "method", "hparam", "value"]).loc[
        ("t0", "ikd", "exam_every", 5.0)]
    mine = runs[runs["method"].eq("ikd") & runs["exam_every"].eq(5.0) & runs["task"].eq("t0")]
    per_seed = mine.groupby("seed")["sel_val_main"].mean()
    low, high = stats.t.interval(0.95, 2, per_seed.mean(), stats.sem(per_seed))
    assert row["n"] == 36 and row["mean"] == pytest.approx(per_seed.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))

    one = search(6, SimSpec(search_seeds=(1,)), 1)
    tests = knob_tests(one, shares=False).set_index(["task", "method", "hparam"])
    assert list(tests.reset_index().columns) == IMPORTANCE_COLUMNS
    ikd = tests.xs("ikd", level="method")
    # IKD's 36 settings of one seed: a test within that seed's luck, and it says so.
    assert ikd["p_value"].notna().all() and ikd["note"].str.startswith("one seed").all()
    # KD's 4 settings of one seed: no residual degree of freedom, a reason instead of a p.
    kd = tests.xs("kd", level="method")
    assert kd["p_value"].isna().all()
    assert set(kd["note"]) <= {"needs more runs: none left over to estimate the noise"}
    assert sensitivity(one)["ci_low"].notna().any()


def test_only_swept_knobs_of_search_runs_on_val() -> None:
    runs = search(7, THREE, 1)
    runs = runs.astype({c: object for c in ("task", "method", "phase", "status")})
    control = runs[runs["method"].eq("ikd") & runs["teacher_lr"].eq(1e-6)].assign(
        teacher_lr=0.0, trial_id=lambda f: f["trial_id"] + 10**6)
    confirm = runs[runs["method"].eq("kd")].assign(phase="confirm", sel_val_main=9.0,
                                                   trial_id=lambda f: f["trial_id"] + 10**7)
    one_t = runs[runs["method"].eq("kd") & runs["temperature"].eq(2.0)].assign(
        method="ikd", exam_every=5.0, teacher_lr=1e-5, trial_id=lambda f: f["trial_id"] + 10**8,
        task="single")
    both = pd.concat([runs, control, confirm, one_t], ignore_index=True)
    report = build_report(both, None, "knobs", knob_stats=True)
    imp, sens = report.importance, report.sensitivity
    # The control is its own method; IKD's teacher_lr is swept over its positive values only.
    assert (sens.loc[sens["method"].eq("ikd") & sens["hparam"].eq("teacher_lr"), "value"] > 0).all()
    assert not (imp["method"].eq(CONTROL) & imp["hparam"].eq("teacher_lr")).any()
    assert {"temperature", "exam_every"} == set(imp.loc[imp["method"].eq(CONTROL), "hparam"])
    # A task where every knob has one value has no rows; finetune never has any.
    assert "single" not in set(imp["task"]) and "finetune" not in set(imp["method"])
    # Confirmation runs (val 9.0) are not read; neither is dev.
    assert sens["mean"].max() < 1.0
    shuffled = both.assign(sel_dev_main=np.random.default_rng(0).permutation(both["sel_dev_main"]))
    again = build_report(shuffled, None, "knobs", knob_stats=True)
    pd.testing.assert_frame_equal(again.sensitivity, sens)
    pd.testing.assert_frame_equal(again.importance, imp)


def test_importance_shares_come_from_optuna_and_find_the_planted_knob() -> None:
    runs = search(8, SimSpec(search_seeds=(1, 2, 3), temperature_slope=0.02), 1)
    imp = knob_tests(runs).set_index(["task", "method", "hparam"])
    ikd = imp.xs("ikd", level="method")["importance"].unstack("hparam")
    assert ikd.sum(axis=1).to_numpy() == pytest.approx(1.0)
    assert (ikd.idxmax(axis=1) == "temperature").all()
    kd = imp.xs("kd", level="method")["importance"]
    assert (kd == 1.0).all()  # the only knob KD has
    assert not math.isnan(imp["p_holm"].iloc[0])

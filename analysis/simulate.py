"""Simulated sweeps for testing the report's selection and statistics (A/A tests).

Every setting of every method has the same true score on a task (plus ``effect`` for IKD), so
any systematic difference the report shows is made by the report itself. The default noise is
the realistic one: a per-run "luck" term shared by the run's val and dev scores (a run that is
better is better on both), val noisier than dev (val is a small slice of train), a per-(task,
seed) effect shared by every method and phase, IKD runs 1.5x noisier, 20 % of IKD search trials
failing and 10 % of search trials stopped early (KILLED), and failures among the IKD
confirmation runs. ``SimSpec.independent()`` is the simpler model: independent val and dev
noise of equal size, no shared parts. Pure numpy/pandas; the frames have the columns
``analysis.collect`` produces, so ``analysis.tables.build_report`` takes them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ikd_sweep.names import CONFIRM, HPARAMS, METHODS, PHASES, SEARCH

# sweeps/glue.yaml's grid: 4 temperatures; IKD also 3 exam_every × 3 teacher_lr (36 settings).
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
EXAM_EVERY = (1.0, 5.0, 10.0)
TEACHER_LRS = (1e-6, 5e-6, 1e-5)
STATUSES = ["FINISHED", "FAILED", "KILLED"]


@dataclass(frozen=True)
class SimSpec:
    """One simulated sweep design. Scores are fractions (GLUE style), so 0.01 is one point."""

    n_tasks: int = 5
    search_seeds: tuple[int, ...] = (1, 2, 3)
    confirm_seeds: tuple[int, ...] = ()
    kd_settings: int = 4
    ikd_settings: int = 36
    #: sd of a per-run effect shared by its val and dev scores (a lucky run is lucky on both).
    luck: float = 0.007
    #: sd of the noise of each split's own evaluation; val is smaller than dev, so noisier.
    val_noise: float = 0.01
    dev_noise: float = 0.005
    #: sd of a per-(task, seed) effect shared by every method and phase (data order, init).
    seed_noise: float = 0.005
    #: IKD's run-level noise (luck and both splits) relative to the other methods'.
    ikd_scale: float = 1.5
    #: True IKD − everything else, in score units (0.01 = +1 point).
    effect: float = 0.0
    #: A planted knob effect: score units per step up the temperature grid (``TEMPERATURES``;
    #: 0.01 = +1 point per step), for every method that uses the temperature.
    temperature_slope: float = 0.0
    #: Probability that an IKD search trial FAILS (no metrics), independently per trial.
    ikd_fail: float = 0.2
    #: Probability that a search trial is stopped early (KILLED, partial scores), any method.
    early_stop: float = 0.1
    #: Probability that an IKD confirmation run FAILS (no early stopping there).
    confirm_fail: float = 0.1

    @classmethod
    def independent(cls, **kw: object) -> SimSpec:
        """The independent-noise model: val and dev noise of 1 point each, nothing shared,
        IKD no noisier (failures and early stops as given)."""
        plain = {"luck": 0.0, "seed_noise": 0.0, "val_noise": 0.01, "dev_noise": 0.01,
                 "ikd_scale": 1.0}
        return cls(**{**plain, **kw})


@dataclass(frozen=True)
class Truth:
    """What the simulation drew once per task: its true score and its seeds' shared effects."""

    tasks: list[str]
    mu: np.ndarray
    #: seed_effect[task, seed]
    seed_effect: np.ndarray


def _settings(method: str, spec: SimSpec) -> list[tuple[float, float, float]]:
    nan = float("nan")
    if method == "finetune":
        return [(nan, nan, nan)]
    if method == "kd":
        temps = [*TEMPERATURES, *np.arange(16.0, 16.0 + spec.kd_settings)]
        return [(t, nan, nan) for t in temps[: spec.kd_settings]]
    grid = list(itertools.product(TEMPERATURES, EXAM_EVERY, TEACHER_LRS))
    # Beyond the glue grid: more temperatures, so any count is possible.
    extra = itertools.product(np.arange(16.0, 1e4), EXAM_EVERY, TEACHER_LRS)
    return (grid + list(itertools.islice(extra, max(0, spec.ikd_settings - len(grid)))))[
        : spec.ikd_settings
    ]


def _frames(
    rng: np.random.Generator,
    spec: SimSpec,
    truth: Truth,
    plan: pd.DataFrame,
    seeds: Sequence[int],
    phase: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs and expected trials: every row of ``plan`` (task index, method, hparams) × seeds."""
    n_seeds = len(seeds)
    rep = plan.loc[plan.index.repeat(n_seeds)].reset_index(drop=True)
    rep["seed"] = np.tile(np.asarray(seeds, dtype=np.int64), len(plan))
    n = len(rep)
    task_idx = rep["task_idx"].to_numpy()
    is_ikd = rep["method"].eq("ikd").to_numpy()
    mu = truth.mu[task_idx] + np.where(is_ikd, spec.effect, 0.0)
    mu = mu + truth.seed_effect[task_idx, rep["seed"].to_numpy()]
    if spec.temperature_slope:
        step = pd.Series(rep["temperature"]).map({t: i for i, t in enumerate(TEMPERATURES)})
        mu = mu + spec.temperature_slope * step.fillna(0.0).to_numpy(dtype=float)
    scale = np.where(is_ikd, spec.ikd_scale, 1.0)
    luck = rng.normal(0.0, spec.luck, n) * scale
    val = mu + luck + rng.normal(0.0, spec.val_noise, n) * scale
    dev = mu + luck + rng.normal(0.0, spec.dev_noise, n) * scale
    search = phase == SEARCH
    failed = is_ikd & (rng.random(n) < (spec.ikd_fail if search else spec.confirm_fail))
    killed = ~failed & (rng.random(n) < (spec.early_stop if search else 0.0))
    val[failed] = np.nan
    dev[failed] = np.nan
    # A stopped trial trained less: its scores exist (and are worse) but never count.
    val[killed] -= 0.05
    dev[killed] -= 0.05
    status = np.where(failed, 1, np.where(killed, 2, 0)).astype(np.int8)
    # Categorical strings and integer ids: a thousand simulated sweeps build in a second.
    # (Fixed categories, so the search and confirmation frames concatenate as categoricals.)
    task = pd.Categorical.from_codes(task_idx, categories=list(truth.tasks))
    offset = 0 if search else 1 << 40
    trial_id = np.arange(n, dtype=np.int64) + offset
    expected = pd.DataFrame(
        {
            "trial_id": trial_id,
            "task": task,
            "method": pd.Categorical(rep["method"], categories=list(METHODS)),
            "seed": rep["seed"].to_numpy(),
            **{h: rep[h].to_numpy(dtype=float) for h in HPARAMS},
            "phase": pd.Categorical.from_codes(
                np.full(n, PHASES.index(phase)), categories=list(PHASES)
            ),
        }
    )
    runs = expected.assign(
        run_id=trial_id,
        status=pd.Categorical.from_codes(status, categories=STATUSES),
        sel_val_main=val,
        sel_dev_main=dev,
        sel_step=np.where(failed, np.nan, 100.0),
        final_dev_main=dev,
        # One checkpoint per run: the dev-chosen checkpoint (old protocol) is the same run score.
        best_dev_main=dev,
    )
    return runs, expected


def simulate_search(
    rng: np.random.Generator, spec: SimSpec, n_sweeps: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame, Truth]:
    """Search-phase runs and expected trials of ``n_sweeps`` sweeps (tasks ``s<k>-t<j>``;
    with one sweep just ``t<j>``): finetune, kd and ikd over their settings × search seeds;
    and what is true of each task."""
    tasks = [
        f"s{k:04d}-t{j}" if n_sweeps > 1 else f"t{j}"
        for k in range(n_sweeps)
        for j in range(spec.n_tasks)
    ]
    mu = rng.uniform(0.6, 0.9, len(tasks))
    top = max((*spec.search_seeds, *spec.confirm_seeds)) + 1
    truth = Truth(tasks, mu, rng.normal(0.0, spec.seed_noise, (len(tasks), top)))
    block = pd.DataFrame(
        [(m, *hp) for m in METHODS for hp in _settings(m, spec)],
        columns=["method", *HPARAMS],
    )
    # Every task gets the same block of settings.
    plan = block.loc[np.tile(block.index, len(tasks))].reset_index(drop=True)
    plan.insert(0, "task_idx", np.repeat(np.arange(len(tasks)), len(block)))
    runs, expected = _frames(rng, spec, truth, plan, spec.search_seeds, SEARCH)
    return runs, expected, truth


def simulate_confirm(
    rng: np.random.Generator, spec: SimSpec, truth: Truth, selected: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Confirmation runs of each selected (task, method) setting on ``spec.confirm_seeds``,
    drawn like the search runs (same true scores and seed effects, fresh run noise)."""
    index = {t: i for i, t in enumerate(truth.tasks)}
    sel = selected[selected["method"].isin(METHODS)]
    plan = pd.DataFrame(
        {
            "task_idx": sel["task"].map(index).to_numpy(),
            "method": sel["method"].to_numpy(),
            **{h: sel[h].to_numpy(dtype=float) for h in HPARAMS},
        }
    )
    return _frames(rng, spec, truth, plan, spec.confirm_seeds, CONFIRM)


def simulate(
    seed: int,
    spec: SimSpec,
    select: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame],
    n_sweeps: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both phases: search runs, then (when ``spec.confirm_seeds``) confirmation runs of the
    settings that ``select(runs, expected)`` picks, as the sweep driver does."""
    rng = np.random.default_rng(seed)
    runs, expected, truth = simulate_search(rng, spec, n_sweeps)
    if spec.confirm_seeds:
        more_runs, more_expected = simulate_confirm(rng, spec, truth, select(runs, expected))
        runs = pd.concat([runs, more_runs], ignore_index=True)
        expected = pd.concat([expected, more_expected], ignore_index=True)
    return runs, expected

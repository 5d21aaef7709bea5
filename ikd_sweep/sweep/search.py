"""How a Tuner chooses its trials: a grid over the planned trials (with ASHA early stopping in
the search phase when `search.scheduler: asha`), or an optuna study (`search.algorithm: optuna`).

The optuna searcher chain is `_SeedRepeater(_Distinct(OptunaSearch))`; Tune checkpoints each
link's state with the experiment, so `Tuner.restore` resumes the search where it stopped.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Repeater, Searcher
from ray.tune.search.repeater import TRIAL_INDEX

from ikd_sweep.config import SweepConfig
from ikd_sweep.names import VAL
from ikd_sweep.sweep.events import EVALS, OBJECTIVE
from ikd_sweep.trials import Study, Trial

_log = logging.getLogger(__name__)

_REDRAWS = 100  # repeats in a row after which a study's space counts as exhausted


class _Distinct(Searcher):
    """Between the Repeater and OptunaSearch: a suggestion that rounds to a setting already
    suggested (small integer ranges) is told back as pruned and drawn again, so a trial id
    never repeats; after `_REDRAWS` repeats in a row the study ends with fewer settings."""

    def __init__(self, searcher: Searcher, study: Study) -> None:
        self.searcher, self.study = searcher, study
        self._inner: dict[str, str] = {}  # Tune's trial id -> the id the searcher knows
        self._seen: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def suggest(self, trial_id: str) -> dict | str | None:
        for k in range(_REDRAWS):
            inner = trial_id if k == 0 else f"{trial_id}~{k}"
            config = self.searcher.suggest(inner)
            if not isinstance(config, dict):
                return config
            key = self.study.trial(config, 0).trial_id
            if key not in self._seen:
                self._seen.add(key)
                self._inner[trial_id] = inner
                return config
            self.searcher.on_trial_complete(inner, result=None)  # pruned: it learns nothing
        _log.warning("optuna: %s has no new setting after %d draws; it ends with %d settings",
                     self.study.name, _REDRAWS, len(self._seen))
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.searcher.on_trial_complete(self._inner.pop(trial_id, trial_id), result=result,
                                        error=error)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def get_state(self) -> dict:
        return {"_inner": self._inner, "_seen": self._seen}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


class _SeedRepeater(Repeater):
    """Ray Tune's Repeater with repeat i run on sweep seed `seeds[i]`: the searcher sees the
    mean of OBJECTIVE over a setting's seeds (nanmean: a failed seed leaves it out). A trial's
    config is its Trial's dict, trial id included, so it is tracked like a grid trial."""

    def __init__(self, searcher: Searcher, study: Study, seeds: list[int]) -> None:
        super().__init__(searcher, repeat=len(seeds))
        self.study, self.seeds = study, list(seeds)

    def suggest(self, trial_id: str) -> dict | str | None:
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        seed = self.seeds[config.pop(TRIAL_INDEX)]
        return self.study.trial(config, seed).to_dict()


def optuna_searcher(sweep: SweepConfig, study: Study) -> Searcher:
    """The search algorithm of one study: Optuna's TPE (seeded by sweep and study) over the
    study's ranges, temperature uniform, teacher_lr log-uniform, exam_every integers, each
    suggested setting repeated on every seed of `search.seeds`."""
    from optuna.distributions import FloatDistribution, IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = {h: IntDistribution(int(lo), int(hi)) if h == "exam_every"
             else FloatDistribution(lo, hi, log=h == "teacher_lr")
             for h, lo, hi in study.ranges}
    seed = zlib.crc32(f"{sweep.name}/{study.name}/{sweep.train.seed_base}".encode())
    inner = OptunaSearch(space=space, metric=OBJECTIVE, mode="max", seed=seed)
    return _SeedRepeater(_Distinct(inner, study), study, sweep.search.seeds)


def _trial_name(trial: Any) -> str:
    return trial.config["trial_id"]


def tuner_setup(sweep: SweepConfig, trials: Sequence[Trial], study: Study | None, asha: bool
                ) -> tuple[dict, tune.TuneConfig]:
    """(param_space, TuneConfig) of a new Tuner: `study`'s searcher, else a grid over `trials`
    (early-stopped by ASHA on val/main when `asha`)."""
    names = {"max_concurrent_trials": sweep.max_concurrent_trials, "reuse_actors": True,
             "trial_name_creator": _trial_name, "trial_dirname_creator": _trial_name}
    if study is not None:
        return {}, tune.TuneConfig(  # the searcher's own space (optuna distributions)
            search_alg=optuna_searcher(sweep, study),
            num_samples=sweep.search.num_samples * len(sweep.search.seeds), **names)
    scheduler = ASHAScheduler(time_attr=EVALS, grace_period=2, reduction_factor=2) \
        if asha else None
    # The trial id is the only parameter: the trial table shows it, and the trainable looks the
    # trial up; grid_search over the expanded list never repeats a trial.
    return {"trial_id": tune.grid_search([t.trial_id for t in trials])}, tune.TuneConfig(
        # Selection data only: dev is never used to stop (or choose) anything.
        metric=VAL if asha else None, mode="max" if asha else None,
        scheduler=scheduler, **names)

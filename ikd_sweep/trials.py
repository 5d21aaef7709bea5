"""Trials: what one point of a sweep is, which hyperparameters each method uses, the sweep's
plan (`SweepPlan`: both phases, optuna studies, the control rule, totals), seeds and picking one
trial by hand.

The CLI, the sweep driver, the live view, the trainer's assembly (`trial.py`) and the teacher
cache read trials from here; the names they are made of (methods, phases, hyperparameters,
which method uses which, the control rule) live in `ikd_sweep.names`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ikd_sweep.config import SweepConfig
from ikd_sweep.errors import UserError
from ikd_sweep.names import (
    CONFIRM,
    CONTROL,
    CONTROL_TEACHER_LR,
    HPARAMS,
    METHOD_HPARAMS,
    METHODS,
    SEARCH,
    base_method,
    method_label,
)


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: a task, a method, a seed and the method's hyperparameters."""

    task: str
    method: str
    seed: int
    temperature: float | None = None
    exam_every: int | None = None
    teacher_lr: float | None = None
    phase: str = SEARCH  # names.PHASES

    @property
    def trial_id(self) -> str:
        parts = [self.task, self.method, f"s{self.seed}"]
        if self.temperature is not None:
            parts.append(f"T{self.temperature:g}")
        if self.exam_every is not None:
            parts.append(f"E{self.exam_every}")
        if self.teacher_lr is not None:
            parts.append(f"tlr{self.teacher_lr:g}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trial:
        return cls(d["task"], d["method"], d["seed"], *(d.get(h) for h in HPARAMS),
                   phase=d.get("phase") or SEARCH)


def trial_seed(cfg: SweepConfig, trial: Trial | int) -> int:
    """The seed a trial (or the teacher of sweep seed `trial`) trains with: seed_base + seed.

    The teacher of seed s and the students of seed s share it, so a sweep's seed names one
    data split (train/quiz) for all of them."""
    seed = trial if isinstance(trial, int) else trial.seed
    return cfg.train.seed_base + seed


def _method_trial(task: str, method: str, seed: int, setting: Mapping[str, Any],
                  phase: str = SEARCH) -> Trial:
    """A Trial with only the hyperparameters `method` uses; a missing or NaN one is an error."""
    values: dict[str, Any] = {}
    for h in METHOD_HPARAMS[method]:
        v = setting.get(h)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"method {method} needs {h}; the setting has {dict(setting)}")
        values[h] = int(v) if h == "exam_every" else float(v)
    return Trial(task, method, seed, **values, phase=phase)


def round_value(h: str, value: float) -> float | int:
    """A drawn value as trials use it: exam_every an integer, teacher_lr to 3 significant
    digits, temperature to 3 decimals; so a trial id (and the report's grouping) names the
    setting that ran, and the seeds of one drawn setting share it exactly."""
    if h == "exam_every":
        return int(round(value))
    if h == "teacher_lr":
        return float(f"{value:.3g}")
    return round(float(value), 3)


def _hyper_points(cfg: SweepConfig, method: str, rng: random.Random) -> list[dict[str, Any]]:
    """The search points of a method, each naming only the hyperparameters it uses."""
    s = cfg.search
    used = METHOD_HPARAMS[method]
    if s.algorithm == "grid":
        return [dict(zip(used, p, strict=True))
                for p in itertools.product(*(getattr(s, h) for h in used))]
    # teacher_lr 0 is the control (a teacher that never moves), not the end of a range.
    moving_lrs = [lr for lr in s.teacher_lr if lr != CONTROL_TEACHER_LR]

    def draw(h: str) -> float | int:  # random search: the range a list spans
        values = moving_lrs if h == "teacher_lr" else getattr(s, h)
        lo, hi = min(values), max(values)
        if h == "exam_every":
            return rng.randint(lo, hi)
        if h == "teacher_lr":  # log-uniform
            return round_value(h, math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return round_value(h, rng.uniform(lo, hi))

    n = s.num_samples if used else 1
    points = []
    for _ in range(n):
        p = {h: draw(h) for h in used if h != "teacher_lr" or moving_lrs}
        if "teacher_lr" in used:
            if moving_lrs:
                points.append(tuple(p.items()))
            if CONTROL_TEACHER_LR in s.teacher_lr:  # the control, with the same other values
                points.append(tuple({**p, "teacher_lr": CONTROL_TEACHER_LR}.items()))
        else:
            points.append(tuple(p.items()))
    return [dict(p) for p in dict.fromkeys(points)]  # a repeated draw is one trial, not two


@dataclass(frozen=True)
class Study:
    """One (task, method) searched by `search.algorithm: optuna`: the searcher varies the
    hyperparameters of `ranges` (name, low, high: the range the sweep's list spans) and holds
    those of `fixed` (a list of one value; teacher_lr 0 for the control's own search)."""

    task: str
    method: str
    ranges: tuple[tuple[str, float, float], ...]
    fixed: tuple[tuple[str, float], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}" + ("-control" if self.label == CONTROL else "")

    @property
    def label(self) -> str:
        """The report's method of the settings this study proposes."""
        return method_label(self.method, dict(self.fixed).get("teacher_lr"))

    def trial(self, suggestion: Mapping[str, float], seed: int) -> Trial:
        """The trial of a suggested setting on sweep seed `seed` (grid's id format)."""
        point = {**dict(self.fixed), **{h: round_value(h, suggestion[h]) for h, *_ in self.ranges}}
        return _method_trial(self.task, self.method, seed, point)


def _optuna_spaces(cfg: SweepConfig, method: str) -> list[Study]:
    """A method's searches on task "" (see `optuna_studies`); a Study without ranges is a
    fixed setting (finetune, or lists of one value), which runs as grid trials."""
    s = cfg.search
    used = METHOD_HPARAMS[method]
    # The control (teacher_lr 0) is not the end of a range: it gets a search of its own.
    lr_lists = [[lr for lr in s.teacher_lr if lr != CONTROL_TEACHER_LR],
                [CONTROL_TEACHER_LR] if CONTROL_TEACHER_LR in s.teacher_lr else []]
    studies = []
    for lrs in [v for v in lr_lists if v] if "teacher_lr" in used else [None]:
        ranges, fixed = [], []
        for h in used:
            values = lrs if h == "teacher_lr" else getattr(s, h)
            lo, hi = min(values), max(values)
            if lo == hi:
                fixed.append((h, lo))
            else:
                ranges.append((h, lo, hi))
        studies.append(Study("", method, tuple(ranges), tuple(fixed)))
    return studies


def optuna_studies(cfg: SweepConfig) -> list[Study]:
    """The (task, method) searches of an optuna sweep; each proposes `num_samples` settings,
    each run on every seed. Empty for grid and random sweeps."""
    if cfg.search.algorithm != "optuna":
        return []
    return [Study(task, st.method, st.ranges, st.fixed) for task in cfg.tasks
            for method in cfg.methods for st in _optuna_spaces(cfg, method) if st.ranges]


def expand_trials(cfg: SweepConfig) -> list[Trial]:
    """All search trials of a sweep known up front, without duplicates, in a stable order
    (task, method, point, seed). With optuna: only the fixed settings (finetune, lists of one
    value); the searched ones are chosen during the run (`optuna_studies`)."""
    trials: list[Trial] = []
    for task in cfg.tasks:
        for method in cfg.methods:
            if cfg.search.algorithm == "optuna":
                for st in _optuna_spaces(cfg, method):
                    if not st.ranges:
                        trials += [_method_trial(task, method, seed, dict(st.fixed))
                                   for seed in cfg.search.seeds]
                continue
            # The random draw is seeded by the sweep, so a resumed sweep expands identically.
            rng = random.Random(f"{cfg.name}/{task}/{method}/{cfg.train.seed_base}")
            for point in _hyper_points(cfg, method, rng):
                trials += [_method_trial(task, method, seed, point) for seed in cfg.search.seeds]
    assert len({tr.trial_id for tr in trials}) == len(trials)
    return trials


def confirm_trials(cfg: SweepConfig, task: str, method: str,
                   setting: Mapping[str, Any]) -> list[Trial]:
    """The selected `setting` of (task, method) re-run on each of `search.confirm_seeds`.

    `setting` maps hyperparameter names to values, e.g. a row of the report's selection;
    values of hyperparameters the method does not use (NaN there) are ignored."""
    if method not in METHOD_HPARAMS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return [_method_trial(task, method, seed, setting, phase=CONFIRM)
            for seed in cfg.search.confirm_seeds]


@dataclass(frozen=True)
class SweepPlan:
    """A sweep's trials, worked out once per command: the search trials known up front, the
    optuna studies (their trials are chosen during the run) and the confirmation phase (the
    selected setting of each (task, method label) re-run on `search.confirm_seeds`, known once
    the search has selected it). validate, `run --dry-run`, the live view and the driver read
    their numbers from here."""

    cfg: SweepConfig
    search: tuple[Trial, ...]
    studies: tuple[Study, ...]

    @classmethod
    def of(cls, cfg: SweepConfig) -> SweepPlan:
        return cls(cfg, tuple(expand_trials(cfg)), tuple(optuna_studies(cfg)))

    @property
    def n_search(self) -> int:
        """Search-phase trials, those optuna will choose included (num_samples x seeds each)."""
        s = self.cfg.search
        return len(self.search) + len(self.studies) * s.num_samples * len(s.seeds)

    def labels(self) -> list[tuple[str, str]]:
        """(task, method label) of every selection the search makes: a random or grid sweep
        with teacher_lr 0 has control trials, an optuna sweep a control study."""
        found = {(t.task, method_label(t.method, t.teacher_lr)) for t in self.search}
        found |= {(st.task, st.label) for st in self.studies}
        order = [*self.cfg.methods, CONTROL]
        return sorted(found, key=lambda k: (self.cfg.tasks.index(k[0]), order.index(k[1])))

    def confirm_slots(self) -> list[tuple[str, str, int]]:
        """(task, method label, seed) of each confirmation trial to come."""
        return [(task, label, seed) for task, label in self.labels()
                for seed in self.cfg.search.confirm_seeds]

    @property
    def total(self) -> int:
        return self.n_search + len(self.confirm_slots())

    def confirmations(self, settings: Iterable[Mapping[str, Any]]) -> list[Trial]:
        """Each selected setting (`task`, `method` — a label or the method it trains with — and
        its hyperparameters) of a task and method still in the sweep, on the confirm seeds."""
        out: list[Trial] = []
        for st in settings:
            method = base_method(st["method"])
            if st["task"] in self.cfg.tasks and method in self.cfg.methods:
                out += confirm_trials(self.cfg, st["task"], method, st)
        return list(dict.fromkeys(out))

    def headline(self) -> str:
        """`12 trials (10 search, 2 confirm)`: the sweep's size in one phrase."""
        n_confirm = len(self.confirm_slots())
        phases = f" ({self.n_search} search, {n_confirm} confirm)" if n_confirm else ""
        return f"{self.total} trials{phases}"

    def studies_note(self) -> str | None:
        """The trials of an optuna sweep that are not known up front, in one line."""
        if not self.studies:
            return None
        spaces = dict.fromkeys(f"{st.label} " + ", ".join(f"{h} {lo:g}..{hi:g}"
                                                          for h, lo, hi in st.ranges)
                               for st in self.studies)
        s = self.cfg.search
        return (f"optuna: {s.num_samples} settings x {len(s.seeds)} seeds per (task, method), "
                f"chosen during the run ({len(self.studies)} searches: {'; '.join(spaces)})")


class PickError(UserError):
    """A trial asked for by hand that the sweep cannot run; `option` names the CLI option."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)


def pick_trial(cfg: SweepConfig, task: str, method: str, seed: int | None = None,
               **setting: Any) -> Trial:
    """One trial of the sweep by hand (`ikd-sweep train`): a hyperparameter left None takes the
    first value of its search list, the seed the first of `search.seeds`."""
    if task not in cfg.tasks:
        raise PickError("--task", f"task {task!r} is not in the sweep (tasks: {cfg.tasks}); "
                        "add it with --set 'tasks=[...]'")
    if method not in METHOD_HPARAMS:
        raise PickError("--method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    unused = [h for h, v in setting.items() if v is not None and h not in METHOD_HPARAMS[method]]
    if unused:
        raise PickError(f"--{unused[0].replace('_', '-')}",
                        f"method {method} does not use {', '.join(unused)} (it uses: "
                        f"{', '.join(METHOD_HPARAMS[method]) or 'none of them'})")
    chosen = {h: setting.get(h) if setting.get(h) is not None else getattr(cfg.search, h)[0]
              for h in METHOD_HPARAMS[method]}
    return _method_trial(task, method, cfg.search.seeds[0] if seed is None else seed, chosen)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": 1e-5}`` (the param naming of the runs)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                    else {f"{prefix}{key}": value})
    return flat


def flat_params(cfg: SweepConfig, trial: Trial) -> dict[str, Any]:
    """The trial's flattened config: what its MLflow run records as params."""
    out: dict[str, Any] = {k: v for k, v in trial.to_dict().items() if v is not None}
    for section in ("data", "teacher", "student", "train", "ikd"):
        for k, v in getattr(cfg, section).model_dump(mode="json").items():
            if v is not None and v != {}:
                out[f"{section}.{k}"] = v
    out["sweep"] = cfg.name
    return out


def trial_record(cfg: SweepConfig, trial: Trial) -> dict[str, Any]:
    """What a trial's run records as ``trial_config.json``."""
    return {**trial.to_dict(), "sweep": cfg.name, "seed_used": trial_seed(cfg, trial)}

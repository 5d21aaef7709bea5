"""`ikd-sweep export`: the selected student of a sweep, as a Hugging Face model folder.

The setting is the report's own selection (`selection.selection`: per (task, method), chosen on
val); its runs are the report's (`Selection.scores`: the confirmation runs when the setting has
finished ones, else its search runs). Of those, the run of `--seed`, or by
default the one with the best `sel/val_main` (val again: dev chooses nothing). Its `student`
artifact, logged by the driver when the trial finished, is copied out of the tracking store
(through analysis/collect.py, one of the two MLflow modules) and, with `--register`, registered as a
model version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ikd_sweep.errors import UserError
from ikd_sweep.names import HPARAMS


class ExportError(UserError):
    """Bad input for `export` (unknown task, method or seed, a non-empty --out): exit 2."""


@dataclass
class Exported:
    run_id: str
    trial_id: str
    task: str
    method: str
    seed: int
    phase: str
    setting: str
    sel_val_main: float
    sel_dev_main: float
    seed_chosen: str  # how the seed was chosen, for the output
    out: Path
    registered: str | None = None  # "NAME version V"


def _choices(values) -> str:
    return ", ".join(str(v) for v in sorted(set(values))) or "none"


def _setting(row) -> str:
    parts = [f"{h}={row[h]:g}" for h in HPARAMS
             if h in row and isinstance(row[h], float) and math.isfinite(row[h])]
    return ", ".join(parts) or "(no hyperparameters)"


def export_student(sweep: str, task: str, method: str, seed: int | None, out: Path,
                   tracking_uri: str, register: str | None = None) -> Exported:
    """Copy the selected student of (sweep, task, method) into `out`; see the module doc."""
    from analysis.collect import download_student, register_student
    from ikd_sweep.selection import selection

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder")
    sel = selection(sweep, tracking_uri)  # UnknownSweep names the sweeps there are
    runs, selected = sel.runs, sel.selected
    if selected.empty:
        raise ExportError(f"sweep {sweep!r} has no finished trials to export from")
    if task not in set(selected["task"]):
        raise ExportError(f"--task {task!r}: not a task of sweep {sweep!r} with a selected "
                          f"setting; choose from: {_choices(selected['task'])}")
    of_task = selected[selected["task"].eq(task)]
    if method not in set(of_task["method"]):
        raise ExportError(f"--method {method!r}: no selected setting for it on {task}; choose "
                          f"from: {_choices(of_task['method'])}")
    row = of_task[of_task["method"].eq(method)].iloc[0]
    # The report's runs of that setting (Report.scores); their facts from the collected runs.
    rep = sel.scores
    rep_ids = set(rep.loc[rep["task"].eq(task) & rep["method"].eq(method), "run_id"])
    picked = runs.runs[runs.runs["run_id"].isin(rep_ids)]
    if picked.empty:
        raise ExportError(f"{task}/{method}: the selected setting has no finished run")
    if seed is None:
        # val chooses, as everywhere else; ties keep the lowest seed.
        ranked = picked.sort_values(["sel_val_main", "seed"], ascending=[False, True])
        chosen, how = ranked.iloc[0], (f"the best sel/val_main of seeds "
                                       f"{_choices(picked['seed'].astype(int))}")
    else:
        match = picked[picked["seed"].astype(int).eq(seed)]
        if match.empty:
            raise ExportError(f"--seed {seed}: not a reported seed of the selected {task}/"
                              f"{method} setting; choose from: "
                              f"{_choices(picked['seed'].astype(int))}")
        chosen, how = match.iloc[0], "--seed"
    try:
        download_student(tracking_uri, chosen["run_id"], out)
    except LookupError as exc:
        raise ExportError(str(exc)) from None
    result = Exported(run_id=chosen["run_id"], trial_id=str(chosen["trial_id"]), task=task,
                      method=method, seed=int(chosen["seed"]), phase=str(chosen["phase"]),
                      setting=_setting(row), sel_val_main=float(chosen["sel_val_main"]),
                      sel_dev_main=float(chosen["sel_dev_main"]), seed_chosen=how, out=out)
    if register:
        version = register_student(tracking_uri, chosen["run_id"], register)
        result.registered = f"{register} version {version}"
    return result

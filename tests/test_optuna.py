"""`search.algorithm: optuna`: Optuna's searcher proposes the settings, every one runs on every
seed, the searcher learns their mean selection score, and a re-run resumes instead of redoing.

One real sweep (local Ray, SQLite MLflow, tiny models, 64 GLUE rows) serves every assertion on
what a run does; the searcher chain and the config rules are also checked without Ray.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import end_to_end, run_cli, runs_of, sweep_file
from typer.testing import CliRunner

from ikd_sweep.cli import app
from ikd_sweep.names import SEL_VAL
from ikd_sweep.store import TAG

SEARCH = {"algorithm": "optuna", "num_samples": 2, "seeds": [1, 2], "temperature": [1, 4]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("optuna")
    home = tmp / "home"
    path = sweep_file(tmp, "opt", tasks=["rte"], methods=["kd"], search=SEARCH)
    first = run_cli(["run", str(path)], home)
    _, children = runs_of(home, "opt")
    before = {r.info.run_id: r.info.end_time for r in children}
    again = run_cli(["run", str(path)], home)
    return {"home": home, "first": first, "again": again, "before": before}


def test_validate_says_the_settings_are_chosen_during_the_run(tmp_path: Path):
    path = sweep_file(tmp_path, "opt", tasks=["rte"], methods=["kd"], search=SEARCH)
    out = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "optuna: 2 settings x 2 seeds per (task, method), chosen during the run" in out.stdout
    assert "valid, 4 trials" in out.stdout


@end_to_end
def test_two_settings_each_on_both_seeds(sweep):
    assert sweep["first"].returncode == 0, sweep["first"].stderr[-3000:]
    parents, children = runs_of(sweep["home"], "opt")
    assert len(parents) == 1 and len(children) == 4
    assert {r.info.status for r in children} == {"FINISHED"}
    seeds = defaultdict(set)
    for r in children:
        seeds[r.data.params["temperature"]].add(r.data.tags[TAG.SEED])
        # The trial id names the setting and seed, as a grid trial's does.
        assert r.data.tags[TAG.TRIAL_ID] == (
            f"rte-kd-s{r.data.tags['ikd.seed']}-T{float(r.data.params['temperature']):g}")
    assert len(seeds) == 2 and all(s == {"1", "2"} for s in seeds.values())
    # Each temperature lies in the range the sweep's list spans.
    assert all(1 <= float(t) <= 4 for t in seeds)


@end_to_end
def test_searcher_learned_the_mean_over_seeds(sweep):
    """Optuna's study holds one completed trial per setting, valued at the mean sel/val_main
    of its two seeds (selection data; dev is never the objective)."""
    _, children = runs_of(sweep["home"], "opt")
    by_setting = defaultdict(list)
    for r in children:
        by_setting[r.data.params["temperature"]].append(r.data.metrics[SEL_VAL])
    means = sorted(sum(v) / len(v) for v in by_setting.values())
    state = max((sweep["home"] / "ray" / "opt" / "rte-kd").glob("searcher-state-*.pkl"))
    study = pickle.loads(state.read_bytes())["_ot_study"]
    seen = sorted(t.value for t in study.trials if t.value is not None)
    print(f"searcher saw {seen}; MLflow means over seeds {means}")
    assert seen == pytest.approx(means, abs=1e-9)


@end_to_end
def test_rerun_creates_and_reruns_nothing(sweep):
    assert sweep["again"].returncode == 0, sweep["again"].stderr[-3000:]
    parents, children = runs_of(sweep["home"], "opt")
    assert len(parents) == 1
    assert {r.info.run_id: r.info.end_time for r in children} == sweep["before"]
    trial_dirs = [p for p in (sweep["home"] / "ray" / "opt" / "rte-kd").iterdir() if p.is_dir()]
    assert len(trial_dirs) == 4


def test_optuna_with_asha_is_a_config_error(tmp_path: Path):
    path = sweep_file(tmp_path, "opt-asha", tasks=["rte"], methods=["kd"],
                      search={**SEARCH, "scheduler": "asha"})
    out = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "200"})
    assert out.exit_code == 2
    assert "search.scheduler" in out.stderr and "optuna" in out.stderr
    assert "Traceback" not in out.output


def _config(**search):
    from ikd_sweep.config import SweepConfig

    return SweepConfig.model_validate({
        "name": "unit", "tasks": ["rte"], "methods": ["finetune", "kd", "ikd"],
        "teacher": {"model": "minilm"}, "student": {"model": "minilm"},
        "search": {"algorithm": "optuna", **search}})


def test_searcher_chain_runs_each_setting_on_every_seed_and_learns_the_mean():
    """The searcher alone, fed made-up scores: seeds map to repeats, the study learns the
    mean over a setting's seeds, and a space with fewer settings than asked ends early."""
    from ray.tune.search import Searcher

    from ikd_sweep.sweep.events import OBJECTIVE
    from ikd_sweep.sweep.search import optuna_searcher
    from ikd_sweep.trials import Study

    cfg = _config(seeds=[3, 7], num_samples=3)
    study = Study("rte", "ikd", (("exam_every", 1, 2),),
                  (("temperature", 2.0), ("teacher_lr", 1e-5)))
    searcher = optuna_searcher(cfg, study)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(4)}
    assert [c["seed"] for c in configs.values()] == [3, 7, 3, 7]
    settings = {c["exam_every"] for c in configs.values()}
    assert settings == {1, 2}  # two distinct settings, each on both seeds
    assert len({c["trial_id"] for c in configs.values()}) == 4
    score = {"t0": 0.2, "t1": 0.6, "t2": 0.5, "t3": 0.9}
    for tid, value in score.items():
        searcher.on_trial_complete(tid, result={OBJECTIVE: value})
    inner = searcher.searcher.searcher
    seen = sorted(t.value for t in inner._ot_study.trials if t.value is not None)
    assert seen == pytest.approx([0.4, 0.7])
    # exam_every 1..2 holds two settings: a third would repeat one, so the search ends.
    assert searcher.suggest("t4") == Searcher.FINISHED


def test_a_listed_teacher_lr_0_gets_its_own_search():
    from ikd_sweep.trials import SweepPlan, expand_trials, optuna_studies

    cfg = _config(teacher_lr=[0, 1e-5, 1e-4], exam_every=[2], seeds=[1, 2], num_samples=3)
    studies = {st.name: st for st in optuna_studies(cfg)}
    assert set(studies) == {"rte-kd", "rte-ikd", "rte-ikd-control"}
    assert dict(studies["rte-ikd-control"].fixed) == {"exam_every": 2, "teacher_lr": 0.0}
    assert [h for h, *_ in studies["rte-ikd"].ranges] == ["temperature", "teacher_lr"]
    # finetune has no hyperparameter: plain trials per seed; 3 searches x 3 settings x 2 seeds.
    assert [t.trial_id for t in expand_trials(cfg)] == ["rte-finetune-s1", "rte-finetune-s2"]
    assert SweepPlan.of(cfg).n_search == 2 + 3 * 3 * 2

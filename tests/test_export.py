"""The selected student of each finished trial: kept, logged once, exported, registered.

The session's finished sweep (`finished_sweep` in conftest.py: tiny models, RTE and STS-B, a
search seed and a confirmation seed, run by the CLI as a user would): disk use after it, then
`ikd-sweep export` (+ `--register`) of a selected student, which is a confirmation run's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SHARED as SWEEP
from helpers import SHARED_TRIALS, end_to_end, run_cli, runs_of, store, sweep_file

from ikd_sweep.names import SEL_DEV
from ikd_sweep.store import TAG


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def swept(finished_sweep) -> tuple[Path, Path]:
    """The finished sweep's scratch folder (holding its sweep file) and working folder."""
    return finished_sweep.tmp, finished_sweep.home


@end_to_end
def test_finished_trials_keep_only_their_student_on_disk(swept):
    """Per finished trial: at most 1.25x its student's model.safetensors on disk.

    For this 4 MB test student the tokenizer alone is 17.6 % of the weights and Tune's own
    records of a trial's reports (its final one carries the `sys/*` timings) about 3 %; at the
    demo's size the whole is 1.011x.

    Counted: every byte under the working folder except what is shared per task and seed or
    per sweep, reported beside it: `cache/` (tokenized data, fine-tuned teachers, kd teacher
    logits) and the tracking database (`mlflow.db`, params and metrics). So the count holds the
    student folders in `mlartifacts/` (the MLflow copy; the local one is deleted once logged),
    the runs' small JSON artifacts, Tune's state under `ray/`, and any checkpoint left behind.
    """
    _, home = swept
    _, children = runs_of(home, SWEEP)
    assert len(children) == sum(SHARED_TRIALS.values())
    assert {c.info.status for c in children} == {"FINISHED"}
    files = [p for p in home.rglob("*") if p.is_file()]
    shared = {p for p in files if p.relative_to(home).parts[0] == "cache"
              or p.name.startswith("mlflow.db")}
    counted = _bytes(set(files) - shared)
    weights = {}
    for c in children:
        art = Path(c.info.artifact_uri.removeprefix("file://")) / "student"
        assert (art / "model.safetensors").is_file(), c.data.tags[TAG.TRIAL_ID]
        weights[c.info.run_id] = (art / "model.safetensors").stat().st_size
    per_trial = counted / len(children)
    ratio = per_trial / (sum(weights.values()) / len(weights))
    ray_bytes = _bytes((home / "ray").rglob("*"))
    print(f"\ndisk per finished trial: {per_trial:.0f} B = {ratio:.3f}x its model.safetensors "
          f"({sum(weights.values()) / len(weights):.0f} B); ray/ {ray_bytes} B in all; shared "
          f"(not counted): cache/ {_bytes(p for p in shared if 'cache' in p.parts)} B, "
          f"mlflow.db {_bytes(p for p in shared if 'cache' not in p.parts)} B")
    assert ratio <= 1.25
    # The bytes exist once: no local student copy, no resumable state of a finished trial.
    assert not any((home / "students").rglob("*.safetensors"))
    # (Tune's checkpoint folders stay, emptied but for its own metadata dotfiles.)
    assert not [p for c in (home / "ray").rglob("checkpoint_*") for p in c.iterdir()
                if not p.name.startswith(".")]
    assert not [p for p in files if p.name == "state.pt"]


@end_to_end
def test_export_gives_a_loadable_student_with_the_recorded_dev_score(swept, glue_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ikd_sweep.config import load_sweep
    from ikd_sweep.data import prepare_data
    from ikd_sweep.trainer import evaluate
    from ikd_sweep.trials import trial_seed

    tmp, home = swept
    out = tmp / "kd-student"
    p = run_cli(["export", "--sweep", SWEEP, "--task", "rte", "--method", "kd", "--out",
                 str(out), "--register", "rte-kd"], home)
    assert p.returncode == 0, p.stdout + p.stderr
    # The report's runs of the selected setting are its confirmation runs (seed 2).
    assert "seed 2, chosen by the best sel/val_main of seeds 2" in p.stdout
    assert "registered rte-kd version 1" in p.stdout
    _, children = runs_of(home, SWEEP)
    run = next(c for c in children if c.data.tags[TAG.METHOD] == "kd"
               and c.data.params["task"] == "rte" and c.data.tags[TAG.PHASE] == "confirm")
    assert run.data.tags[TAG.TRIAL_ID] in p.stdout

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = load_sweep(tmp / f"{SWEEP}.yaml")
    # The dev rows the trial evaluated: the project's own data preparation and evaluation.
    data = prepare_data("rte", cfg.data, tokenizer, home / "cache" / "data",
                        trial_seed(cfg, 2), method="kd")
    got = evaluate(model, data.dev, data.task, torch.device("cpu"),
                   cfg.train.eval_batch_size, tokenizer.pad_token_id or 0)["main"]
    recorded = run.data.metrics[SEL_DEV]
    print(f"\nexported kd student: dev main {got:.6f}, recorded sel/dev_main {recorded:.6f}")
    assert abs(got - recorded) <= 1e-4
    card = (out / "README.md").read_text()
    assert f"| sweep | {SWEEP} |" in card and "| method | kd |" in card

    versions = store(home).search_model_versions("name = 'rte-kd'")
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)]


@end_to_end
@pytest.mark.parametrize(("args", "message"), [
    (["--sweep", "nope", "--task", "rte", "--method", "kd"], f"known sweeps: {SWEEP}"),
    (["--sweep", SWEEP, "--task", "sst2", "--method", "kd"], "choose from: rte, stsb"),
    (["--sweep", SWEEP, "--task", "rte", "--method", "distil"], "choose from: finetune, ikd, kd"),
    (["--sweep", SWEEP, "--task", "rte", "--method", "kd", "--seed", "1"], "choose from: 2"),
])
def test_export_names_the_valid_values_of_a_bad_option(swept, args, message):
    from typer.testing import CliRunner

    from ikd_sweep.cli import app

    tmp, home = swept
    out = tmp / f"bad-{os.urandom(4).hex()}"
    result = CliRunner().invoke(app, ["export", *args, "--out", str(out), "--home", str(home)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists() or not any(out.iterdir())


def test_train_keeps_the_student_and_drops_the_resumable_state(tmp_path, glue_dir):
    """`ikd-sweep train` (no Ray): the student stays in its trial folder, is logged to the
    trial's run, and the resumable checkpoint is gone once the trial has finished."""
    from typer.testing import CliRunner

    from ikd_sweep.cli import app

    home2 = tmp_path / "train-home"
    path = sweep_file(tmp_path, SWEEP, tasks=["rte"])
    result = CliRunner().invoke(app, ["train", str(path), "--task", "rte",
                                      "--method", "finetune", "--home", str(home2),
                                      "--device", "cpu"], env={"MLFLOW_TRACKING_URI": None})
    assert result.exit_code == 0, result.output
    (trial_dir,) = (home2 / "single" / SWEEP).iterdir()
    assert (trial_dir / "student" / "model.safetensors").is_file()
    assert not (trial_dir / "checkpoint").exists()
    _, children = runs_of(home2, SWEEP)
    (run,) = children
    names = {f.path for f in store(home2).list_artifacts(run.info.run_id, "student")}
    assert "student/model.safetensors" in names and "student/README.md" in names

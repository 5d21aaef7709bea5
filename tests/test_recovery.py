"""Issue 13: a re-run of `ikd-sweep run` recovers from every fault, and a sweep runs once.

Each test makes the fault happen for real (a non-finite loss, a full disk while a teacher is
saved, a trial no node can hold, a second driver), then checks what the user sees and what the
MLflow store holds, and that the same command, re-run once the cause is gone, finishes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from helpers import ROOT, cli_env, end_to_end, merge, run_cli, runs_of, start_cli, store, sweep_file

from ikd_sweep.store import TAG


def statuses(home: Path, sweep: str) -> tuple[list[str], dict[str, tuple[str, int]]]:
    parents, children = runs_of(home, sweep)
    return ([p.info.status for p in parents],
            {c.data.tags[TAG.TRIAL_ID]: (c.info.status, c.info.end_time) for c in children})


@end_to_end
def test_early_failure_rerun_retries_it_and_a_broken_tune_state_is_set_aside(tmp_path):
    # lr 1e30: the loss is NaN by the first logging step, before any evaluation.
    home = tmp_path / "home"
    sweep = sweep_file(tmp_path, "early", tasks=["wnli"], methods=["finetune"],
                       search={"temperature": [1], "seeds": [1]}, train={"lr": 1.0e30})
    first = run_cli(["run", str(sweep)], home)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "FAILED wnli-finetune-s1: NonFiniteLoss: non-finite loss" in first.stdout
    parents, trials = statuses(home, "early")
    assert parents == ["FAILED"] and trials["wnli-finetune-s1"][0] == "FAILED"
    (failed,) = runs_of(home, "early")[1]
    assert "non-finite loss" in failed.data.tags[TAG.ERROR]  # the cause, on the run

    # What a full disk leaves: a 0-byte error.pkl in the Tune folder.
    (pkl,) = (home / "ray" / "early").glob("wnli/*/error.pkl")
    pkl.write_bytes(b"")
    again = run_cli(["run", str(sweep)], home)
    assert again.returncode == 3, again.stdout + again.stderr
    assert "set aside" in again.stderr and "error.pkl is empty" in again.stderr, again.stderr
    assert "FAILED wnli-finetune-s1: NonFiniteLoss" in again.stdout, again.stdout
    parents2, trials2 = statuses(home, "early")
    assert parents2 == ["FAILED"], "the parent must not stay RUNNING"
    assert trials2["wnli-finetune-s1"][0] == "FAILED"
    assert trials2["wnli-finetune-s1"][1] > trials["wnli-finetune-s1"][1], "not retried"
    assert list((home / "ray" / "early").glob("wnli.broken-*"))

    # The cause gone, the same command (no --restart) finishes the trial in the same run.
    fixed = run_cli(["run", str(sweep), "--set", "train.lr=0.001"], home)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "finished 1, failed 0" in fixed.stdout
    parents3, trials3 = statuses(home, "early")
    assert parents3 == ["FINISHED"] and trials3["wnli-finetune-s1"][0] == "FINISHED"
    assert len(trials3) == 1


FULL_DISK = """
import errno, os
_replace = os.replace
def _full(src, dst, *a, **k):
    # The disk "fills up" while a teacher is being saved, as long as <home>/FULL exists.
    if "/cache/teachers/" in os.fspath(dst) and os.path.exists(
            os.path.join(os.environ["IKD_SWEEP_HOME"], "FULL")):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(dst))
    return _replace(src, dst, *a, **k)
os.replace = _full
"""


@end_to_end
def test_teacher_failure_on_a_full_disk_then_rerun_runs_its_kd_trials(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)  # every process, Ray's workers too
    env = {**cli_env(home), "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    sweep = sweep_file(tmp_path, "full", tasks=["wnli"], methods=["finetune", "kd"],
                       search={"temperature": [1, 2], "seeds": [1]})
    (home / "FULL").write_text("")
    first = run_cli(["run", str(sweep)], home, env=env)
    assert first.returncode == 3, first.stdout + first.stderr
    assert "finished 1, failed 2" in first.stdout, first.stdout
    out = " ".join(first.stdout.split())  # the console wraps long lines
    assert "no space left on device (writing " in out, out
    assert "cache/teachers" in "".join(out.split()), out
    # The teacher was fine-tuned once; its other trial failed at once with the same cause.
    assert "failed in this run" in out, out
    assert "teacher wnli seed 1: epoch 1/1, dev" in first.stderr, first.stderr
    teachers = home / "cache" / "teachers"
    assert not [p.name for p in teachers.iterdir() if ".tmp-" in p.name], "stray temp folder"
    _, trials = statuses(home, "full")
    assert trials["wnli-finetune-s1"][0] == "FINISHED"
    assert sorted(s for s, _ in trials.values()) == ["FAILED", "FAILED", "FINISHED"]
    errors = {c.data.tags[TAG.TRIAL_ID]: c.data.tags.get(TAG.ERROR, "")
              for c in runs_of(home, "full")[1]}
    assert all("\x1b[" not in e for e in errors.values())
    assert all(e.startswith("OSError: no space left on device")
               or e.startswith("TeacherFailed: ") for t, e in errors.items() if "-kd-" in t)

    (home / "FULL").unlink()  # space again: the same command runs the kd trials of seed 1
    again = run_cli(["run", str(sweep)], home, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "finished 3, failed 0" in again.stdout, again.stdout
    parents, trials2 = statuses(home, "full")
    assert parents == ["FINISHED"] and len(trials2) == 3
    assert all(s == "FINISHED" for s, _ in trials2.values())
    assert trials2["wnli-finetune-s1"] == trials["wnli-finetune-s1"], "finished trial re-run"
    assert len(list(teachers.glob("*/DONE"))) == 1


@end_to_end
def test_impossible_resources_exit_2_at_once_and_touch_nothing(tmp_path):
    home = tmp_path / "home"
    cases = [("cpu", {"cpu": 1000}, "resources.cpu: 1000 requested per trial; the cluster has")]
    if not torch.cuda.is_available():
        cases.append(("gpu", {"cpu": 1, "gpu": 1},
                      "resources.gpu: 1 requested per trial; the cluster has 0 GPUs"))
    for name, resources, message in cases:
        sweep = sweep_file(tmp_path, f"too-big-{name}", tasks=["wnli"], methods=["finetune"],
                           search={"temperature": [1], "seeds": [1]}, resources=resources)
        t0 = time.monotonic()
        p = run_cli(["run", str(sweep)], home, timeout=120)
        took = time.monotonic() - t0
        text = " ".join((p.stdout + p.stderr).split())
        assert p.returncode == 2, text
        assert message in text and "Traceback" not in text, text
        assert took < 60, f"took {took:.0f} s"
        client_runs = list((home / "ray").glob(f"too-big-{name}/*"))
        assert not client_runs, "a Tuner was started"
    # No parent run was created (so none is left RUNNING).
    assert store(home).get_experiment_by_name("too-big-cpu") is None


@end_to_end
def test_two_sweeps_start_at_once_and_a_second_run_of_one_is_refused(tmp_path):
    """Two sweeps started at the same moment into a fresh store both finish; a second run of
    one of them, while it runs, is refused and names the first."""
    home = tmp_path / "home"
    over = {"tasks": ["wnli"], "methods": ["finetune"], "search": {"temperature": [1]}}
    once = sweep_file(tmp_path, "once", **merge(over, {"search": {"seeds": [1, 2]}}))
    other = sweep_file(tmp_path, "other", **over)
    log, other_log = tmp_path / "first.log", tmp_path / "other.log"
    first = start_cli(["run", str(once)], home, log)
    second_sweep = start_cli(["run", str(other)], home, other_log)
    try:
        lock = home / "locks" / "once.lock"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the first driver holds the lock (and says so)
            assert first.poll() is None, log.read_text(errors="replace")[-5000:]
            try:
                if json.loads(lock.read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        second = run_cli(["run", str(once)], home, timeout=120)
        text = " ".join((second.stdout + second.stderr).split())
        assert second.returncode == 2, text
        assert f"sweep once is already running in {home} (pid {first.pid} on " in text, text
        assert "wait for it or stop it" in text and "Traceback" not in text, text
        rc = first.wait(timeout=600)
        assert rc == 0, log.read_text(errors="replace")[-5000:]
        rc = second_sweep.wait(timeout=600)
        assert rc == 0, other_log.read_text(errors="replace")[-5000:]
    finally:
        for proc in (first, second_sweep):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name, n in (("once", 2), ("other", 1)):
        parents, trials = statuses(home, name)
        assert parents == ["FINISHED"] and len(trials) == n
        assert all(s == "FINISHED" for s, _ in trials.values())


def test_errors_are_plain_text_with_the_root_cause_first():
    from ray.exceptions import RayTaskError

    from ikd_sweep.sweep.events import describe_error

    try:
        raise ValueError("\x1b[31mbad\x1b[0m value")
    except ValueError as e:
        wrapped = RayTaskError("trainable", "\x1b[36mTraceback (remote)\x1b[0m ...", e)
    text = describe_error(wrapped)
    assert text.startswith("ValueError: bad value\n"), text
    assert "\x1b" not in text
    full = describe_error(OSError(28, "No space left on device", "/data/x"))
    assert full.startswith("OSError: no space left on device (writing /data/x)"), full

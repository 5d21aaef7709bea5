"""Overhead that Ray Tune + MLflow add per trial, measured side by side in one run.

The same N no-op-sized trials (a 1-layer hidden-32 model, 2 optimizer steps, 32 training rows)
run (a) in a plain Python loop calling the trainer and (b) as a sweep: Ray Tune trials, one at
a time, each recorded in a fresh SQLite MLflow store. The plain loop runs before and after the
sweep and its mean is used, so machine drift hits both sides. Prints per-trial times, the
overhead per trial and the ratio; Ray's start-up is timed separately.

    python benchmarks/bench_sweep.py [--trials 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ikd_sweep.config import SweepConfig
from ikd_sweep.sweep.cluster import init_ray
from ikd_sweep.sweep.driver import run_sweep
from ikd_sweep.tracking import SweepTracker
from ikd_sweep.trial import run_trial
from ikd_sweep.trials import SweepPlan, expand_trials

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def sweep_config(n: int, name: str) -> SweepConfig:
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}
    return SweepConfig.model_validate({
        "name": name, "tasks": ["wnli"], "methods": ["finetune"],
        "data": {"source": "glue_dir", "glue_dir": str(GLUE), "max_length": 32,
                 "max_train_samples": 32, "max_eval_samples": 16},
        "teacher": {"model": "minilm", "init": "random", "config": tiny},
        "student": {"model": "minilm", "init": "random", "config": tiny},
        "train": {"epochs": 1, "batch_size": 16, "log_every": 1},
        "search": {"seeds": list(range(1, n + 1))},
        "max_concurrent_trials": 1,  # serial, like the plain loop
    })


def plain_loop(cfg: SweepConfig, home: Path) -> list[float]:
    times = []
    for trial in expand_trials(cfg):
        t0 = time.perf_counter()
        run_trial(cfg, trial, home=home)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    n = ap.parse_args().trials
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    cfg = sweep_config(n, "bench-overhead")
    plain_loop(sweep_config(1, "warmup"), root / "plain")  # tokenizer, data cache, imports

    before = plain_loop(cfg, root / "plain")
    t0 = time.perf_counter()
    init_ray(None)
    ray_start = time.perf_counter() - t0
    tracker = SweepTracker(f"sqlite:///{root}/sweep/mlflow.db", cfg.name)
    _ = tracker.experiment_id  # create the store before timing: a one-off per store
    t0 = time.perf_counter()
    out = run_sweep(SweepPlan.of(cfg), home=root / "sweep", tracker=tracker, verbose=0)
    swept = time.perf_counter() - t0
    after = plain_loop(cfg, root / "plain")
    assert len(out.finished) == n, out.failed

    plain = statistics.mean([sum(before), sum(after)])
    print(f"trials: {n} (serial), plain loop before/after: {sum(before):.2f} s / "
          f"{sum(after):.2f} s")
    print(f"plain loop per trial:           {plain / n:.3f} s")
    print(f"Ray Tune + MLflow per trial:    {swept / n:.3f} s")
    print(f"overhead per trial:             {(swept - plain) / n:.3f} s")
    print(f"sweep / plain ratio:            {swept / plain:.2f}x")
    print(f"Ray start-up (once per sweep):  {ray_start:.2f} s")


if __name__ == "__main__":
    main()

"""Dev economy: one trial evaluating dev only where selection needs it, over one evaluating
dev at every evaluation (the old trainer), side by side in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dev_economy.py            # demo kd
    .venv/bin/python benchmarks/bench_dev_economy.py --method finetune --reps 2

Runs `trial.run_trial` of the sweep's first (task, method, seed) trial with the trainer's
`dev_every_eval` off and on, interleaved (`--reps` pairs), in one process, on the cached
teacher of `--home` (fine-tuned there first if missing: minutes for the demo). Prints the wall
time of each and their ratio, and checks that both trained, selected and reported the same
(`sel/*`, `final/*`, `steps`): only the number of dev evaluations differs. No Ray or MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ikd_sweep import trial as trial_module  # noqa: E402
from ikd_sweep.config import load_sweep  # noqa: E402
from ikd_sweep.trainer import FitSettings  # noqa: E402
from ikd_sweep.trials import expand_trials  # noqa: E402


class Count:
    """Counts the evaluation reports that carry a dev score."""

    def __init__(self) -> None:
        self.evals = self.dev = 0

    def log(self, metrics, step) -> None:
        pass

    def report(self, metrics, step, checkpoint) -> None:
        self.evals += 1
        self.dev += "dev/main" in metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "demo.yaml"))
    ap.add_argument("--method", default="kd")
    ap.add_argument("--home", default=str(ROOT / "ikd-runs"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    cfg = load_sweep(Path(args.sweep))
    trial = next(t for t in expand_trials(cfg) if t.method == args.method)
    real = FitSettings.for_trial

    def run(every: bool) -> tuple[float, dict, Count]:
        FitSettings.for_trial = classmethod(  # type: ignore[method-assign]
            lambda cls, c, t: dataclasses.replace(real(c, t), dev_every_eval=every))
        rec = Count()
        t0 = time.perf_counter()
        result = trial_module.run_trial(cfg, trial, home=Path(args.home), callback=rec,
                                        device=args.device)
        return time.perf_counter() - t0, result, rec

    run(False)  # warm-up: teacher (cached or fine-tuned), tokenized data, kd logits
    times: dict[bool, list[float]] = {False: [], True: []}
    results, counts = {}, {}
    for _ in range(args.reps):
        for every in (False, True):
            dt, results[every], counts[every] = run(every)
            times[every].append(dt)
    same = {k: v for k, v in results[False].items() if k.startswith(("sel/", "final/", "steps"))}
    other = {k: results[True][k] for k in same}
    new, old = statistics.median(times[False]), statistics.median(times[True])
    out = {"trial": trial.trial_id, "evaluations": counts[False].evals,
           "dev_evaluations": {"selection_only": counts[False].dev, "every": counts[True].dev},
           "seconds": {"selection_only": new, "every": old}, "ratio_new_over_old": new / old,
           "same_selection_and_final": same == other}
    print(json.dumps(out, indent=1))
    if same != other:
        sys.exit(f"results differ: {same} vs {other}")


if __name__ == "__main__":
    main()

"""Where a CPU trial's time goes, before and after issue 25's changes, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_trial_shares.py          # ~3.5 min
    .venv/bin/python benchmarks/cpu_trial_shares.py --full --methods kd        # the demo's rows

Runs the sweep's first kd and ikd trials (`trial.run_trial`, what `ikd-sweep train` runs; no
Ray or MLflow) twice each, in one process, alternating (kd: before, after; ikd: after, before,
so a drift in the machine's load hits both alike), after a 3-step warm-up run of each:

- **before**: the trainer as it was: AdamW per tensor on CPU (`fused=False`, `foreach=False`,
  torch's CPU default when `fused` is not asked for) and evaluation in fixed 128-row batches;
- **after**: the trainer as it is: fused AdamW, evaluation in padding-bounded batches
  (`data.tight_batches`).

Both are switched inside this process only (torch.optim.AdamW and trainer.evaluate replaced
for the "before" runs); the product has no knob for them. Prints per method and variant the
time shares (`sys/time_share/*`), the seconds per section, samples/s (the trial's and the
median per logging window), the loop's CPU seconds, and the ratios after/before; then the
evaluation alone (the trial's student, and for ikd its teacher, on val + dev, old vs new
batching, alternating `--eval-reps` times, CPU time). Checks the scores: the optimizer changes
only float rounding, so `sel/*` and `final/*` may differ by an example or two; it says by how
much. Default size: the demo (sweeps/demo.yaml) at half its rows (750 train, 436 dev: the same
shares of training and evaluation, half the time); `--full` runs it as it is. The teacher is
fine-tuned first (into `--home`) if not cached, outside the timed runs. One JSON object on
stdout, the report on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ikd_sweep import teacher as teacher_cache  # noqa: E402
from ikd_sweep import trainer  # noqa: E402
from ikd_sweep import trial as trial_module  # noqa: E402
from ikd_sweep.config import load_sweep, parse_overrides  # noqa: E402
from ikd_sweep.data import iterate, prepare_data  # noqa: E402
from ikd_sweep.models import build_model, load_tokenizer  # noqa: E402
from ikd_sweep.timing import SECTIONS  # noqa: E402
from ikd_sweep.trials import expand_trials, trial_seed  # noqa: E402

HALF = ["data.max_train_samples=750", "data.max_eval_samples=436"]
SCORES = ("sel/val_main", "sel/dev_main", "final/val_main", "final/dev_main", "steps")


class PerTensorAdamW(torch.optim.AdamW):
    """The trainer's AdamW before issue 25 on CPU: one tensor at a time."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.update(fused=False, foreach=False)
        super().__init__(*args, **kwargs)


_EVALUATE = trainer.evaluate  # today's, which `old_evaluate` runs on the old batches


def _fixed_batches(split, batch_size, **kw):
    """`data.iterate` as evaluation called it before issue 25: fixed `batch_size`-row batches."""
    kw.pop("max_pad", None)
    kw.pop("pad_multiple", None)
    return iterate(split, batch_size, **kw)


def old_evaluate(*args, **kwargs) -> dict[str, float]:
    """`trainer.evaluate` before issue 25: the same code on fixed-size batches."""
    trainer.iterate = _fixed_batches
    try:
        return _EVALUATE(*args, **kwargs)
    finally:
        trainer.iterate = iterate


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """`before`: the old optimizer and evaluation, in this process only; `after`: as is."""
    real_adamw, real_eval = torch.optim.AdamW, trainer.evaluate
    if name == "before":
        torch.optim.AdamW, trainer.evaluate = PerTensorAdamW, old_evaluate
    try:
        yield
    finally:
        torch.optim.AdamW, trainer.evaluate = real_adamw, real_eval


class Windows:
    """Trainer callback: each logging window's samples/s."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def log(self, metrics, step) -> None:
        if "samples_per_s" in metrics:
            self.rates.append(metrics["samples_per_s"])

    def report(self, metrics, step, checkpoint) -> None:
        pass


def run(cfg, trial, home: Path, name: str) -> dict:
    """One trial in variant `name`: its shares, section seconds, samples/s, CPU s, scores."""
    cpu: dict[str, float] = {}
    real_fit = trial_module.fit

    def timed_fit(*args, **kwargs):  # the loop's CPU time: waiting for a core is not its cost
        t0 = time.process_time()
        try:
            return real_fit(*args, **kwargs)
        finally:
            cpu["s"] = time.process_time() - t0

    cb = Windows()
    trial_module.fit = timed_fit
    try:
        with variant(name):
            res = trial_module.run_trial(cfg, trial, home=home, callback=cb, device="cpu")
    finally:
        trial_module.fit = real_fit
    wall = res["sys/wall_s"]
    return {"share": {k: round(res[f"sys/time_share/{k}"], 3) for k in (*SECTIONS, "other")},
            "seconds": {k: round(res[f"sys/time_share/{k}"] * wall, 2) for k in SECTIONS},
            "wall_s": round(wall, 1), "loop_cpu_s": round(cpu["s"], 1),
            "samples_per_s": round(res["sys/samples_per_s"], 1),
            "window_samples_per_s": round(statistics.median(cb.rates), 1),
            "threads": int(res["sys/threads"]),
            "scores": {k: res[k] for k in SCORES}}


def eval_only(cfg, trial, home: Path, reps: int) -> dict:
    """Old vs new evaluation of the trial's models (a fresh student; for ikd also its teacher)
    on val + dev, alternating, CPU seconds (medians) and the largest metric difference."""
    tok = load_tokenizer(cfg.teacher.model)
    data = prepare_data(trial.task, cfg.data, tok, home / "cache" / "data",
                        trial_seed(cfg, trial), method=trial.method)
    models = {"student": build_model(cfg.student, data.task.num_labels)}
    if trial.method == "ikd":
        folder = teacher_cache.ensure_teacher(cfg, trial.task, trial.seed, home, device="cpu")
        models["teacher"] = teacher_cache.load_teacher(folder)
    dev, out = torch.device("cpu"), {}
    for who, model in models.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        diff = 0.0
        for _ in range(reps):
            got = {}
            for name, fn in (("before", old_evaluate), ("after", trainer.evaluate)):
                t0 = time.process_time()
                got[name] = {s: fn(model, getattr(data, s), data.task, dev,
                                   cfg.train.eval_batch_size) for s in ("val", "dev")}
                times[name].append(time.process_time() - t0)
            diff = max(diff, *(abs(got["before"][s][k] - got["after"][s][k])
                               for s in ("val", "dev") for k in got["before"][s]))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[who] = {"cpu_s_before": round(med["before"], 3), "cpu_s_after": round(med["after"], 3),
                    "speedup": round(med["before"] / med["after"], 2), "max_metric_diff": diff}
    return out


def report(method: str, runs: dict[str, dict], ev: dict) -> None:
    b, a = runs["before"], runs["after"]
    print(f"\n{method}: time shares of the training loop (before -> after)", file=sys.stderr)
    for k in (*SECTIONS, "other"):
        extra = f"   {b['seconds'][k]:6.1f} s -> {a['seconds'][k]:6.1f} s" if k in SECTIONS else ""
        print(f"  {k:16s} {b['share'][k]:.3f} -> {a['share'][k]:.3f}{extra}", file=sys.stderr)
    for k in ("samples_per_s", "window_samples_per_s", "wall_s", "loop_cpu_s"):
        print(f"  {k:22s} {b[k]:8.1f} -> {a[k]:8.1f}  (x{a[k] / b[k]:.2f})", file=sys.stderr)
    print(f"  scores before {b['scores']}\n         after  {a['scores']}", file=sys.stderr)
    for who, e in ev.items():
        print(f"  evaluation alone ({who}, val + dev): {e['cpu_s_before']:.2f} s -> "
              f"{e['cpu_s_after']:.2f} s CPU (x{e['speedup']:.2f} faster), largest metric "
              f"difference {e['max_metric_diff']:.2g}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "demo.yaml"))
    ap.add_argument("--methods", nargs="+", default=["kd", "ikd"])
    ap.add_argument("--home", help="working folder (default: a temporary one)")
    ap.add_argument("--full", action="store_true", help="the sweep's own rows, not half")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="key=value")
    ap.add_argument("--eval-reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core of a shared machine; the same for every variant
    over = [*([] if args.full else HALF), *args.set_]
    cfg = load_sweep(Path(args.sweep), parse_overrides(over))
    # A few steps of each method first: one-time costs (first autograd graphs, allocations)
    # would otherwise land on whichever variant runs first.
    warm = load_sweep(Path(args.sweep), parse_overrides([*over, "train.max_steps=3"]))
    home = Path(args.home or tempfile.mkdtemp(prefix="cpu-shares-"))
    t0 = time.perf_counter()
    out: dict = {"sweep": cfg.name, "rows": cfg.data.max_train_samples,
                 "dev_rows": cfg.data.max_eval_samples, "torch": torch.__version__}
    for n, method in enumerate(args.methods):
        trial = next(t for t in expand_trials(cfg) if t.method == method)
        if method != "finetune":  # the teacher is set-up, not part of either variant
            teacher_cache.ensure_teacher(cfg, trial.task, trial.seed, home, device="cpu")
        warm_trial = next(t for t in expand_trials(warm) if t.method == method)
        trial_module.run_trial(warm, warm_trial, home=home, device="cpu")
        order = ("before", "after") if n % 2 == 0 else ("after", "before")
        runs = {name: run(cfg, trial, home, name) for name in order}
        ev = eval_only(cfg, trial, home, args.eval_reps)
        b, a = runs["before"], runs["after"]
        out[method] = {"trial": trial.trial_id, **runs, "evaluation_alone": ev, "ratio": {
            "samples_per_s_after_over_before": round(a["samples_per_s"] / b["samples_per_s"], 2),
            "loop_cpu_s_before_over_after": round(b["loop_cpu_s"] / a["loop_cpu_s"], 2),
            "wall_s_before_over_after": round(b["wall_s"] / a["wall_s"], 2)},
            "same_scores": b["scores"] == a["scores"]}
        report(method, runs, ev)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {out['total_s']} s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

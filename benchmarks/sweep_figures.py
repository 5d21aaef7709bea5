"""The figures of benchmarks/gpu_sweep_check.sh, read back from the sweeps' MLflow store.

    python benchmarks/sweep_figures.py --tracking-uri URI --sweep pack_1=NAME --wall pack_1=S
        [--sweep pack_2=NAME --wall pack_2=S ...] [--train kd=FILE --train ikd=FILE]
        [--sweep-file FILE] [--out FILE.json]

Per packing k (k trials per GPU; on CPU, k trials sharing the machine's cores):
- `sweep_samples_per_s.pack_k`: the student training samples of all the sweep's trials (the
  trainer's `sys/train_samples`) over the sweep's span, from the first trial's start to the last
  trial's end (MLflow run times): what the sweep delivers, set-up and evaluation included;
- `trial_samples_per_s.pack_k`: the mean over trials of `sys/samples_per_s`, one trial's
  samples over its own training time (how much a trial slows down when it shares the device);
- `peak_gib.pack_k`: the largest `sys/peak_gpu_gib` of its trials (null on CPU);
- `wall_s.pack_k`: the `ikd-sweep run` command's wall time (Ray and MLflow set-up included);
  `span_s.pack_k`; `finished.pack_k` and `trials.pack_k`;
- `time_share.pack_k.<method>.<section>`: the mean share of each method's trial time.
- `trial_samples_per_s.sweep_pack_k`: the steady state of a kd trial in the sweep: per trial
  the median of its logging windows' `samples_per_s` (training alone: evaluation, reports and
  checkpoints excluded), then the median over the pack's kd trials; `startup_s.sweep_pack_k`
  the median `sys/startup_s` (trial start to first step), `threads.sweep_pack_k` the median
  `sys/threads`; the same per method under `by_method.<method>.<key>.sweep_pack_k` (ikd too).
`ratio.pack_k_over_pack_1` compares `sweep_samples_per_s`. With `--standalone NAME=FILE` (the
metrics.jsonl of an `ikd-sweep train` run, e.g. `cold`: a fresh process, teacher cached):
`trial_samples_per_s.standalone_NAME` (median window) and `startup_s.standalone_NAME`, and
`ratio.sweep_pack_k_over_standalone_NAME` (kd; target >= 0.9; a NAME starting with `ikd` is an
ikd trial: `ratio.ikd_sweep_pack_k_over_standalone_NAME`). `--experiments FILE` embeds the
JSON of benchmarks/gpu_gap_experiments.py under `experiments`. `breakdown.<method>` holds the
`ikd-sweep train` results given with --train (shares, samples/s, peak), and `estimate_gib` the
preflight's memory estimate of one trial of the sweep file. One JSON object on stdout (and in
--out); the same figures as dotted `key = value` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from analysis.collect import collect

SYS = "sys/"


def pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def last(runs, run_id: str, metric: str) -> float:
    h = runs.history(run_id, metric)
    return float(h["value"].iloc[-1]) if len(h) else math.nan


def median(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return round(statistics.median(values), 2) if values else None


def steady_state(frame, runs, pack: str) -> dict[str, dict]:
    """Per method, over its finished trials: the median of each trial's median logging-window
    `samples_per_s`, and the medians of `sys/startup_s` and `sys/threads`."""
    out: dict[str, dict] = {}
    for method, g in frame[frame["status"] == "FINISHED"].groupby("method"):
        windows = [median(runs.history(r, "samples_per_s")["value"]) for r in g["run_id"]]
        out[method] = {key: {f"sweep_{pack}": median(values)} for key, values in (
            ("trial_samples_per_s", windows), ("startup_s", g["sys/startup_s"]),
            ("threads", g["sys/threads"]))}
    return out


def pack_figures(uri: str, sweep: str, pack: str = "pack_1") -> dict:
    runs = collect(sweep, uri)
    frame = runs.runs
    names = ["sys/train_samples", "sys/samples_per_s", "sys/peak_gpu_gib", "sys/startup_s",
             "sys/threads",
             *(f"sys/time_share/{k}" for k in ("course", "teacher_forward", "exam", "optimizer",
                                               "evaluation", "checkpoint", "other"))]
    for name in names:
        frame[name] = [last(runs, r, name) for r in frame["run_id"]]
    span = (frame["end_time"].max() - frame["start_time"].min()).total_seconds()
    done = frame[frame["status"] == "FINISHED"]
    peak = frame["sys/peak_gpu_gib"].max()
    shares = {m: {k.rsplit("/", 1)[-1]: round(float(v), 4) for k, v in
                  g[[n for n in names if "time_share" in n]].mean().items()}
              for m, g in done.groupby("method")}
    return {"trials": len(frame), "finished": len(done), "span_s": round(span, 1),
            "sweep_samples_per_s": round(done["sys/train_samples"].sum() / span, 1),
            "trial_samples_per_s": round(float(done["sys/samples_per_s"].mean()), 1),
            "peak_gib": None if math.isnan(peak) else round(float(peak), 2),
            "time_share": shares, "by_method": steady_state(frame, runs, pack)}


def estimate_gib(sweep_file: Path) -> float:
    from ikd_sweep.config import load_sweep
    from ikd_sweep.preflight import model_size, trial_memory

    cfg = load_sweep(sweep_file)
    sizes = {n: model_size(getattr(cfg, n), n) for n in ("teacher", "student")}
    return round(trial_memory(cfg, set(cfg.methods), sizes) / 2**30, 2)


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict):
            merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


def add_packs(out: dict, uri: str, sweeps: dict[str, str], walls: dict[str, float]) -> None:
    """Each packing's figures into `out`; the kd trials' steady state also at the top level
    (`trial_samples_per_s.sweep_pack_k`, `startup_s.`, `threads.`: the issue's kd trial)."""
    for pack, name in sweeps.items():
        try:
            figures = pack_figures(uri, name, pack)
        except LookupError as e:  # the sweep left no runs (it failed before any trial)
            print(f"{pack}: {e}", file=sys.stderr)
            figures = {"trials": 0, "finished": 0}
        figures["wall_s"] = walls.get(pack)
        merge(out["by_method"], figures.pop("by_method", {}))
        for key, value in figures.items():
            out[key][pack] = value
    merge(out, {k: v for k, v in out["by_method"].get("kd", {}).items()})


def add_standalone(out: dict, logs: dict[str, str]) -> None:
    """A trial alone (`ikd-sweep train`'s metrics.jsonl): its median window samples/s, its
    startup, and each packing's steady state over it."""
    for name, path in logs.items():
        try:
            rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        except (OSError, ValueError) as e:
            print(f"standalone {name}: no metrics ({e})", file=sys.stderr)
            continue
        out["trial_samples_per_s"][f"standalone_{name}"] = median(
            r["samples_per_s"] for r in rows if "samples_per_s" in r)
        out["startup_s"][f"standalone_{name}"] = median(
            r["sys/startup_s"] for r in rows if "sys/startup_s" in r)
        # Each method's trials in the sweeps over the same method alone (`ikd...`: ikd).
        method = "ikd" if name.startswith("ikd") else "kd"
        alone = out["trial_samples_per_s"][f"standalone_{name}"]
        rates = out["by_method"].get(method, {}).get("trial_samples_per_s", {})
        for key, v in rates.items():
            if v and alone:
                prefix = "" if method == "kd" else f"{method}_"
                out["ratio"][f"{prefix}{key}_over_standalone_{name}"] = round(v / alone, 2)


def add_breakdown(out: dict, results: dict[str, str]) -> None:
    for method, path in results.items():
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"breakdown {method}: no result ({e})", file=sys.stderr)
            continue
        out["breakdown"][method] = {k[len(SYS):]: round(v, 4) for k, v in res.items()
                                    if k.startswith(SYS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--sweep", action="append", default=[], help="pack_k=SWEEP_NAME")
    ap.add_argument("--wall", action="append", default=[], help="pack_k=SECONDS")
    ap.add_argument("--train", action="append", default=[], help="METHOD=RESULT.json")
    ap.add_argument("--standalone", action="append", default=[], help="NAME=metrics.jsonl")
    ap.add_argument("--experiments", type=Path, help="gpu_gap_experiments.py's JSON")
    ap.add_argument("--sweep-file", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out: dict = {key: {} for key in ("sweep_samples_per_s", "trial_samples_per_s", "startup_s",
                                     "threads", "peak_gib", "wall_s", "span_s", "finished",
                                     "trials", "time_share", "by_method", "ratio", "breakdown")}
    add_packs(out, args.tracking_uri, pairs(args.sweep),
              {k: float(v) for k, v in pairs(args.wall).items()})
    base = out["sweep_samples_per_s"].get("pack_1")
    out["ratio"].update({f"{p}_over_pack_1": round(v / base, 2)
                         for p, v in out["sweep_samples_per_s"].items()
                         if base and v and p != "pack_1"})
    add_standalone(out, pairs(args.standalone))
    add_breakdown(out, pairs(args.train))
    if args.experiments is not None:
        try:
            out["experiments"] = json.loads(args.experiments.read_text())
        except (OSError, ValueError) as e:
            print(f"experiments: none ({e})", file=sys.stderr)
    if args.sweep_file is not None:
        out["estimate_gib"] = estimate_gib(args.sweep_file)
    out["all_finished"] = bool(out["trials"]) and all(
        out["finished"][p] == out["trials"][p] > 0 for p in out["trials"])
    text = json.dumps(out)
    if args.out is not None:
        args.out.write_text(text + "\n")
    for key, value in flat(out).items():
        print(f"{key} = {value}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()

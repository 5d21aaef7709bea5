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
`ratio.pack_k_over_pack_1` compares `sweep_samples_per_s`. `breakdown.<method>` holds the
`ikd-sweep train` results given with --train (shares, samples/s, peak), and `estimate_gib` the
preflight's memory estimate of one trial of the sweep file. One JSON object on stdout (and in
--out); the same figures as dotted `key = value` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from analysis.collect import collect

SYS = "sys/"


def pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def last(runs, run_id: str, metric: str) -> float:
    h = runs.history(run_id, metric)
    return float(h["value"].iloc[-1]) if len(h) else math.nan


def pack_figures(uri: str, sweep: str) -> dict:
    runs = collect(sweep, uri)
    frame = runs.runs
    names = ["sys/train_samples", "sys/samples_per_s", "sys/peak_gpu_gib",
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
            "time_share": shares}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--sweep", action="append", default=[], help="pack_k=SWEEP_NAME")
    ap.add_argument("--wall", action="append", default=[], help="pack_k=SECONDS")
    ap.add_argument("--train", action="append", default=[], help="METHOD=RESULT.json")
    ap.add_argument("--sweep-file", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    walls = {k: float(v) for k, v in pairs(args.wall).items()}
    out: dict = {key: {} for key in ("sweep_samples_per_s", "trial_samples_per_s", "peak_gib",
                                     "wall_s", "span_s", "finished", "trials", "time_share")}
    for pack, name in pairs(args.sweep).items():
        try:
            figures = pack_figures(args.tracking_uri, name)
        except LookupError as e:  # the sweep left no runs (it failed before any trial)
            print(f"{pack}: {e}", file=sys.stderr)
            figures = {"trials": 0, "finished": 0}
        figures["wall_s"] = walls.get(pack)
        for key, value in figures.items():
            out[key][pack] = value
    base = out["sweep_samples_per_s"].get("pack_1")
    out["ratio"] = {f"{p}_over_pack_1": round(v / base, 2)
                    for p, v in out["sweep_samples_per_s"].items() if base and p != "pack_1"}
    out["breakdown"] = {}
    for method, path in pairs(args.train).items():
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"breakdown {method}: no result ({e})", file=sys.stderr)
            continue
        out["breakdown"][method] = {k[len(SYS):]: round(v, 4) for k, v in res.items()
                                    if k.startswith(SYS)}
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

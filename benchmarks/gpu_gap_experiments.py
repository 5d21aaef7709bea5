"""Why a trial is slower inside Ray than alone: the experiments of issue 25, one JSON object.

    python benchmarks/gpu_gap_experiments.py                          # GPU: launch, Ray, reports
    python benchmarks/gpu_gap_experiments.py --sweep-file F --home H  # + standalone, log_every
    python benchmarks/gpu_gap_experiments.py --device cpu --ops 2000 --ckpt-mib 4   # CPU smoke

Each experiment is capped (`--cap`, 120 s) and says how long it took (`seconds.<name>`):

- `launch`: `launch_us.plain`: microseconds per tiny op (an in-place add on a one-element
  tensor, `--ops` of them, then one synchronize; median of 3) in this plain process, and the
  threads it runs with (`threads.plain`: torch intra-op and inter-op threads,
  `OMP_NUM_THREADS`, CPU affinity, CUDA_VISIBLE_DEVICES);
- `ray`: the same inside a Ray task (`launch_us.ray_task`, `threads.ray_task`) and inside a
  Ray Tune trial (`launch_us.tune_trial`, `threads.tune_trial`), both with `--trial-cpu` CPUs
  and one GPU as a sweep's trial gets them; in the trial also `report_ms.plain`: one
  `tune.report` of a trainer-sized metrics dict (the trial waits for the driver's round trip;
  the sweep's driver also writes MLflow then), and `report_ms.checkpoint_<n>mib`: one report
  with a checkpoint folder of n MiB (`--ckpt-mib`: the trainer's checkpoint is the student and
  its AdamW state, for ikd the teacher and its optimizer too), which Tune copies into its
  storage on the trial's thread, beside `copy_ms.checkpoint_<n>mib`, a plain copy of it;
- with `--sweep-file` (a sweep whose teacher is cached in `--home`, e.g. gpu_sweep_check.sh's
  pack_1.yaml): `standalone.cold_1`, `standalone.cold_2`: `ikd-sweep train --method kd`
  twice, each in a fresh process (median window samples/s, startup_s, threads); and
  `log_every.<n>`: `ikd-sweep run` of that kd trial alone with `train.log_every` n (5 and
  1000 by default): the trial's `sys/samples_per_s` (training time: report waits included,
  evaluation excluded), its share `other` and its median window samples/s (reports excluded).

No figure here is asserted; the note reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# A logging window's metrics, as the trainer reports them (the payload of each tune.report).
PAYLOAD = {"train/loss": 0.5, "train/lr": 1e-4, "samples_per_s": 1000.0, "epoch": 0.5,
           "train/kd_loss": 0.4, "exam/loss": 0.6, "exam/hypergrad_norm": 1.0}


def launch_us(device: str, n: int) -> float:
    """Microseconds per tiny op: `n` in-place adds, one synchronize; median of 3."""
    x = torch.zeros(1, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(200):  # warm: the first launches load kernels
        x.add_(1.0)
    sync()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        sync()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return round(statistics.median(times), 3)


def threads() -> dict:
    return {"torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "affinity": len(os.sched_getaffinity(0)),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def checkpoint_folder(root: Path, mib: int) -> Path:
    """A folder holding one `mib` MiB state file, as the trainer's checkpoint folder does."""
    folder = root / f"ckpt-{mib}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state": torch.ones(mib * 2**18)}, folder / "state.pt")  # 4-byte floats
    return folder


def task_fn(device: str, n: int) -> dict:
    """The Ray task: launch time and threads."""
    return {"launch_us": launch_us(device, n), "threads": threads()}


def trial_fn(config: dict) -> None:
    """The Tune trial: launch time, threads, report and checkpoint costs; one final report."""
    from ray import tune

    out = {"launch_us": launch_us(config["device"], config["ops"]), "threads": threads()}
    t0 = time.perf_counter()
    for _ in range(config["reports"]):
        tune.report(dict(PAYLOAD))
    out["report_ms"] = {"plain": round((time.perf_counter() - t0) / config["reports"] * 1e3, 2)}
    out["copy_ms"] = {}
    scratch = Path(tempfile.mkdtemp(prefix="gap-ckpt-"))
    try:
        for mib in config["ckpt_mib"]:
            folder = checkpoint_folder(scratch, mib)
            t0 = time.perf_counter()
            shutil.copytree(folder, scratch / f"copy-{mib}")
            out["copy_ms"][f"checkpoint_{mib}mib"] = round((time.perf_counter() - t0) * 1e3, 1)
            t0 = time.perf_counter()
            tune.report(dict(PAYLOAD), checkpoint=tune.Checkpoint.from_directory(str(folder)))
            out["report_ms"][f"checkpoint_{mib}mib"] = round((time.perf_counter() - t0) * 1e3, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tune.report({"gap": json.dumps(out)})


def ray_experiments(args, gpus: int) -> dict:
    """A Ray task and a Tune trial with a sweep trial's resources, in one local Ray."""
    import ray
    from ray import tune

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        res = {"num_cpus": args.trial_cpu, "num_gpus": min(gpus, 1)}
        task = ray.remote(**res)(task_fn)
        got = ray.get(task.remote(args.device, args.ops), timeout=args.cap)
        fn = tune.with_resources(trial_fn, {"cpu": args.trial_cpu, "gpu": min(gpus, 1)})
        storage = tempfile.mkdtemp(prefix="gap-tune-")
        grid = tune.Tuner(fn, param_space={"device": args.device, "ops": args.ops,
                                           "reports": args.reports, "ckpt_mib": args.ckpt_mib},
                          run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
        shutil.rmtree(storage, ignore_errors=True)
        trial = json.loads(grid[0].metrics["gap"])
    finally:
        ray.shutdown()
    return {"launch_us": {"ray_task": got["launch_us"], "tune_trial": trial["launch_us"]},
            "threads": {"ray_task": got["threads"], "tune_trial": trial["threads"]},
            "report_ms": trial["report_ms"], "copy_ms": trial["copy_ms"]}


def cli(args, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "ikd_sweep.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=args.cap)


def windows(rows: list[dict]) -> dict:
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    start = [r["sys/startup_s"] for r in rows if "sys/startup_s" in r]
    return {"window_samples_per_s": round(statistics.median(rates), 1) if rates else None,
            "startup_s": round(start[0], 2) if start else None}


def standalone(args, run: int) -> dict:
    """`ikd-sweep train --method kd` in a fresh process (teacher cached): its steady state."""
    p = cli(args, "train", str(args.sweep_file), "--task", args.task, "--method", "kd",
            "--device", args.device, "--home", str(args.home), "--no-track")
    logs = sorted(Path(args.home, "single").glob("*/*-kd-*/metrics.jsonl"),
                  key=lambda f: f.stat().st_mtime)
    if p.returncode != 0 or not logs:
        return {"error": (p.stderr or p.stdout)[-300:]}
    final = json.loads(logs[-1].with_name("final_metrics.json").read_text())
    rows = [json.loads(line) for line in logs[-1].read_text().splitlines() if line]
    return {**windows(rows), "samples_per_s": round(final["sys/samples_per_s"], 1),
            "threads": final.get("sys/threads"), "run": run}


def log_every(args, n: int) -> dict:
    """The kd trial alone in `ikd-sweep run` with train.log_every n: what reports cost."""
    from analysis.collect import collect

    name = f"gapexp-le{n}"
    p = cli(args, "run", str(args.sweep_file), "--home", str(args.home), "--restart",
            "--set", f"name={name}", "--set", "methods=[kd]", "--set", "search.temperature=[2]",
            "--set", f"train.log_every={n}")
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-300:]}
    runs = collect(name, f"sqlite:///{Path(args.home).resolve()}/mlflow.db")
    run_id = runs.runs["run_id"].iloc[0]

    def last(metric: str) -> float | None:
        h = runs.history(run_id, metric)
        return round(float(h["value"].iloc[-1]), 3) if len(h) else None

    rates = runs.history(run_id, "samples_per_s")["value"]
    return {"samples_per_s": last("sys/samples_per_s"), "other": last("sys/time_share/other"),
            "window_samples_per_s": round(float(rates.median()), 1) if len(rates) else None,
            "startup_s": last("sys/startup_s"), "evaluation": last("sys/time_share/evaluation")}


def timed(seconds: dict, name: str, fn, *a):
    t0 = time.perf_counter()
    try:
        return fn(*a)
    except Exception as e:  # one failed experiment must not cost the others' figures
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        seconds[name] = round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--reports", type=int, default=50)
    ap.add_argument("--ckpt-mib", type=int, nargs="*", default=[600, 1700])
    ap.add_argument("--trial-cpu", type=float, default=2)
    ap.add_argument("--sweep-file", type=Path)
    ap.add_argument("--home", type=Path)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--log-every", type=int, nargs="*", default=[5, 1000])
    ap.add_argument("--cap", type=int, default=120, help="seconds per experiment")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    seconds: dict[str, float] = {}
    out: dict = {"device": args.device, "torch": torch.__version__, "ops": args.ops,
                 "launch_us": {"plain": timed(seconds, "launch", launch_us, args.device,
                                              args.ops)},
                 "threads": {"plain": threads()}, "seconds": seconds}
    ray_out = timed(seconds, "ray", ray_experiments, args, gpus)
    if "error" in ray_out:
        out["ray_error"] = ray_out.pop("error")
    for key, value in ray_out.items():
        out.setdefault(key, {}).update(value)
    if args.sweep_file is not None and args.home is not None:
        out["standalone"] = {f"cold_{i}": timed(seconds, f"standalone_{i}", standalone, args, i)
                             for i in (1, 2)}
        out["log_every"] = {str(n): timed(seconds, f"log_every_{n}", log_every, args, n)
                            for n in args.log_every}
    text = json.dumps(out)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

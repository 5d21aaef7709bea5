"""Ray on the driver: start a local Ray or join a cluster (quietly: the live view is the
output), check that a node can hold one trial, and end the processes a killed earlier driver of
the same sweep left behind (a local Ray only; the session is recorded in
`<home>/ray/<sweep>.session.json`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import ray

from ikd_sweep.config import SweepConfig
from ikd_sweep.errors import UserError
from ikd_sweep.home import Home


class ResourceError(UserError):
    """A trial asks for more than any node of the cluster has."""


class _TrialTracebacks(logging.Filter):
    """Drops Tune's report of a failed trial (its traceback, ~45 lines per attempt) and of the
    trials that did not complete: the live view prints each failure in one line, the summary
    lists them, and the whole traceback is in the run's tag ikd.error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Trial task failed for trial",
                                               "Trials did not complete"))


_FILTER = _TrialTracebacks()


def quiet_ray(verbose: int, tracebacks: bool = False) -> None:
    """verbose 0: Ray's and Tune's own messages off (warnings and errors still show, a failed
    trial's traceback only with `tracebacks`), so the driver's output is the live view (Tune's
    verbose 0 also drops its tables and TensorBoard hint); 1+: Tune's tables, Ray's logs and
    tracebacks as Ray prints them."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(level)
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).removeFilter(_FILTER)
        if not (verbose or tracebacks):
            logging.getLogger(name).addFilter(_FILTER)
    if not verbose:
        # Tune's new output engine prints its config box and TensorBoard hint even at verbose
        # 0; its legacy engine at verbose 0 prints nothing.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Its one warning at start-up says that token authentication is on: the safe default.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.WARNING if verbose else logging.ERROR)


def init_ray(address: str | None, verbose: int = 0, tracebacks: bool = False) -> str:
    """Join the cluster at `address` (e.g. auto, HOST:6379) or start a local Ray."""
    quiet_ray(verbose, tracebacks)
    if not ray.is_initialized():
        # A local Ray runs no dashboard. Its gRPC servers listen on all interfaces (Ray has no
        # setting to bind them to loopback; README, "Ray"); its token authentication is on.
        # Workers' prints reach the driver only with --verbose: the live view replaces them.
        extra = {} if address else {"include_dashboard": False}
        ray.init(address=address, log_to_driver=verbose > 0, configure_logging=False,
                 **({} if verbose else {"logging_level": logging.WARNING}), **extra)
    gcs = ray.get_runtime_context().gcs_address
    print(f"Ray: {'joined ' + gcs if address else 'local, at ' + gcs}; "
          f"{ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs", file=sys.stderr)
    return gcs


def check_resources(sweep: SweepConfig, joined: bool) -> None:
    """Raise `ResourceError` when no node can hold one trial: Tune would wait forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for field_, key, unit in (("cpu", "CPU", "CPUs"), ("gpu", "GPU", "GPUs")):
        need = float(getattr(sweep.resources, field_) or 0)
        biggest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if need > biggest:
            total = sum(n.get(key, 0.0) for n in nodes)
            where = (f"the cluster has {total:g} {unit}" if len(nodes) <= 1 else
                     f"the largest of the cluster's {len(nodes)} nodes has {biggest:g} {unit} "
                     f"({total:g} in all)")
            hint = (" (a joined cluster: nodes an autoscaler has not started yet do not count; "
                    "start one that large first)" if joined else "")
            raise ResourceError(f"resources.{field_}: {need:g} requested per trial; {where}"
                                f"{hint}; lower resources.{field_} in the sweep file")


def _own_processes(session: str, raylet: int | None) -> list[int]:
    """PIDs of this user's processes of one Ray session (Linux /proc): its command line names
    the session folder (GCS, raylet, monitors), or its environment names the session's raylet
    (agents and workers, which rename themselves `ray::...`)."""
    tag = f"RAY_RAYLET_PID={raylet}\0".encode() if raylet else None
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid() or int(proc.name) == os.getpid():
                continue
            if session.encode() in (proc / "cmdline").read_bytes() or (
                    tag and tag in (proc / "environ").read_bytes()):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def cleanup_leftover_ray(home: Path, sweep: str) -> int:
    """End the Ray processes (raylet, GCS, agents) a killed earlier driver of this sweep left;
    only those of the session it recorded. Call with the sweep's lock held. Returns a count."""
    record = Home(home).session_record(sweep)
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return 0
    session = str(info.get("session_dir") or "")
    pids = _own_processes(session, info.get("raylet")) if "session_" in session else []
    found = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.time() + 10
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if "Z" not in _proc_state(pid)]
        if pids:
            time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if found:
        print(f"Ray: ended {found} processes left by a killed earlier run of {sweep}",
              file=sys.stderr)
    record.unlink(missing_ok=True)
    return found


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def record_session(home: Path, sweep: str) -> None:
    try:
        node = ray._private.worker._global_node
        session = node.get_session_dir_path()
        raylet = node.all_processes["raylet"][0].process.pid
    except Exception:  # a private API: without it the next start cleans nothing up
        return
    record = Home(home).session_record(sweep)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"session_dir": session, "raylet": raylet,
                                  "driver": os.getpid()}))

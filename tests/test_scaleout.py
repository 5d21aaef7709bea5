"""Scale-out for real: PostgreSQL + `mlflow server` + a `ray start --head` cluster on localhost.

The module starts a private PostgreSQL cluster (the Debian package: `bash
.ci/install-postgres.sh`) and an `mlflow server` with it as the backend store and proxied
artifacts, both bound to 127.0.0.1, and a Ray head node. Each test drives `ikd-sweep run
--tracking-uri http://127.0.0.1:PORT --address 127.0.0.1:RAYPORT` in a subprocess, as a user
would, and then reads the runs back through the server. The second test SIGKILLs the tracking
server in the middle of a trial, brings it back on the same port a few seconds later, and
checks that training went on and that every metric was either delivered or reported lost.

Ray 2.60 turns on token authentication for `ray start --head` whenever ~/.ray/auth_token
exists (any earlier local `ray.init()` writes one), while a driver given an explicit address
does not; so the cluster and the driver here share a private token (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH), independent of whatever ~/.ray holds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import CLI, ROOT, free_port, merge, needs_glue
from helpers import sweep_file as tiny_sweep_file

from ikd_sweep.names import DEV, FINAL_DEV, VAL
from ikd_sweep.store import ROLE_SWEEP, ROLE_TRIAL, TAG

RAY = str(Path(sys.executable).with_name("ray"))
PG_USER, PG_PASSWORD, PG_DB = "ikd", "ikd-test-pw", "mlflow"
DOWN_S = 6  # how long the killed tracking server stays down before it is started again


def _pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, pg_ctl, postgres, psql."""
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres", "psql")):
            with contextlib.suppress(ValueError):
                found.append((float(d.parent.name), d))
    return max(found)[1] if found else None


def _pg_driver() -> str:
    """The DBAPI module SQLAlchemy uses for a plain ``postgresql://`` URI (the form the docs and
    docker/compose.yaml give): psycopg (3) from SQLAlchemy 2.1 on, psycopg2 before."""
    from sqlalchemy.dialects import postgresql

    return postgresql.dialect.driver


PG_BIN = _pg_bin()
PG_DRIVER = _pg_driver()

pytestmark = [
    pytest.mark.slow,
    needs_glue,
    pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL server binaries not found under "
                       "/usr/lib/postgresql/*/bin: run `bash .ci/install-postgres.sh` as root"),
    pytest.mark.skipif(importlib.util.find_spec(PG_DRIVER) is None,
                       reason=f"SQLAlchemy's postgresql:// needs the {PG_DRIVER} module, which "
                       "is not installed: pip install 'psycopg[binary]' (psycopg2-binary for "
                       "SQLAlchemy < 2.1)"),
]


# ------------------------------------------------------------------------------ helpers


def sweep_file(tmp: Path, name: str, **over) -> Path:
    """The tiny sweep on WNLI with finetune and kd at T=1 and T=4 (`over` merged in)."""
    return tiny_sweep_file(tmp, name, **merge(
        {"methods": ["finetune", "kd"], "search": {"temperature": [1, 4]}}, over))


def base_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0",
           "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    return env


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout:.0f} s:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


# ------------------------------------------------------------------------------ PostgreSQL


@dataclass
class Postgres:
    bin: Path
    root: Path  # data dir, socket dir and log, owned by the user that runs the server
    port: int
    as_user: list[str]  # argv prefix that runs a command as that user

    @property
    def uri(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{PG_DB}"

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)

    def psql(self, sql: str) -> str:
        p = self.run(str(self.bin / "psql"), "-h", str(self.root), "-p", str(self.port),
                     "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()


@pytest.fixture(scope="module")
def postgres():
    assert PG_BIN is not None
    as_user: list[str] = []
    # PostgreSQL refuses to run as root: run it as the `postgres` OS user the package made.
    root = Path(tempfile.mkdtemp(prefix="ikd-pg-", dir="/tmp"))  # short: unix socket path
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no `postgres` OS user to run PostgreSQL")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(PG_BIN, root, free_port(), as_user)
    t0 = time.time()
    data = root / "data"
    p = pg.run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
               "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
    assert p.returncode == 0, p.stdout + p.stderr
    opts = (f"-h 127.0.0.1 -p {pg.port} -k {root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    p = pg.run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"),
               "-o", opts, "-w", "-t", "120", "start")
    assert p.returncode == 0, p.stdout + p.stderr + (root / "postgres.log").read_text()
    try:
        pg.psql(f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}'")
        pg.psql(f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")
        version = pg.psql("SHOW server_version")
        print(f"\n[scaleout] PostgreSQL {version} on 127.0.0.1:{pg.port} "
              f"({time.time() - t0:.1f} s)")
        yield pg
    finally:
        pg.run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ MLflow server


@dataclass
class MlflowServer:
    backend_uri: str
    artifacts: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> float:
        """Start the server and wait for /health; returns the seconds it took."""
        t0 = time.time()
        argv = [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--allowed-hosts", "127.0.0.1:*,localhost:*"]
        with open(self.log, "a") as out:
            out.write(f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(argv)}\n")
            out.flush()
            self.proc = subprocess.Popen(argv, env=base_env(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/health", self.proc, timeout, self.log)
        return time.time() - t0

    def kill(self) -> None:
        """SIGKILL the server and its workers at once: no clean shutdown."""
        assert self.proc is not None
        _kill_group(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        _kill_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(postgres.uri, tmp / "artifacts", tmp / "server.log")
    try:
        took = server.start()
        print(f"[scaleout] mlflow server on {server.url}, backend {postgres.uri} "
              f"({took:.1f} s)")
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ Ray cluster


@dataclass
class RayCluster:
    port: int
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """`ray start --head --block` in its own session; torn down by signalling that session only
    (`ray stop --force` would also stop other people's Ray processes on this machine)."""
    tmp = tmp_path_factory.mktemp("ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="ikdray-", dir="/tmp"))  # short: unix sockets
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    argv = [RAY, "start", "--head", "--block", f"--port={port}",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
            "--disable-usage-stats", f"--temp-dir={temp_dir}",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}"]
    log = tmp / "ray-start.log"
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 180
        while "block forever" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()}"
            assert time.time() < deadline, f"ray start did not come up:\n{log.read_text()}"
            time.sleep(0.5)
        print(f"[scaleout] Ray head on 127.0.0.1:{port} ({time.time() - t0:.1f} s)")
        yield RayCluster(port, env)
    finally:
        proc.send_signal(signal.SIGTERM)  # `--block` stops what it started on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc, signal.SIGKILL)  # and anything of that session left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The shared working folder (what every node would mount), also $IKD_SWEEP_HOME."""
    return tmp_path_factory.mktemp("shared") / "ikd-runs"


def sweep_argv(sweep: Path, server: MlflowServer, cluster: RayCluster) -> list[str]:
    return [*CLI, "run", str(sweep), "--tracking-uri", server.url,
            "--address", cluster.address]


def sweep_env(cluster: RayCluster, home: Path) -> dict[str, str]:
    return {**cluster.env, "IKD_SWEEP_HOME": str(home)}


def runs_of(client, sweep: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(sweep)
    assert exp is not None, f"no experiment {sweep!r} on the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_SWEEP]
    children = [r for r in runs if r.data.tags.get(TAG.ROLE) == ROLE_TRIAL]
    return parents, children


# ------------------------------------------------------------------------------ tests


def test_sweep_on_ray_cluster_records_through_mlflow_server_on_postgres(
        tmp_path, monkeypatch, postgres, mlflow_server, ray_cluster, home):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    sweep = sweep_file(tmp_path, "scaleout")  # wnli: finetune + kd T=1, T=4, one seed
    t0 = time.time()
    p = subprocess.run(sweep_argv(sweep, mlflow_server, ray_cluster),
                       env=sweep_env(ray_cluster, home), capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    took = time.time() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "finished 3, failed 0" in p.stdout, out
    # The cluster, not a local Ray (Ray reports the GCS under the node's own IP, not 127.0.0.1).
    assert re.search(rf"Ray: joined \S+:{ray_cluster.port};", p.stderr), out
    assert f"tracking {mlflow_server.url}" in " ".join(p.stderr.split()), out
    assert not (home / "mlflow.db").exists()  # nothing fell back to the SQLite default
    print(f"\n[scaleout] 3-trial sweep on the Ray cluster via the MLflow server: {took:.1f} s")

    client = MlflowClient(mlflow_server.url)
    parents, children = runs_of(client, "scaleout")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    assert len(children) == 3
    assert sorted(c.data.tags[TAG.TRIAL_ID] for c in children) == sorted(
        {c.data.tags[TAG.TRIAL_ID] for c in children})
    assert sorted(c.data.tags[TAG.METHOD] for c in children) == ["finetune", "kd", "kd"]
    dl = tmp_path / "downloads"
    for c in children:
        run_id = c.info.run_id
        assert c.info.status == "FINISHED", c.data.tags.get(TAG.ERROR)
        assert c.data.tags["mlflow.parentRunId"] == parent_id
        assert c.data.params["task"] == "wnli" and c.data.params["method"] in ("finetune", "kd")
        assert c.data.params["train.lr"] == "0.001"
        if c.data.params["method"] == "kd":
            assert float(c.data.params["temperature"]) in (1.0, 4.0)
        for key in (VAL, "train/loss"):
            hist = client.get_metric_history(run_id, key)
            assert len(hist) >= 2 and len({h.step for h in hist}) == len(hist), key
        assert FINAL_DEV in c.data.metrics
        assert "ikd.lost_metrics" not in c.data.tags
        # Artifacts go through the server's proxy (mlflow-artifacts:/) into its destination.
        assert c.info.artifact_uri.startswith("mlflow-artifacts:"), c.info.artifact_uri
        names = {f.path for f in client.list_artifacts(run_id)}
        assert {"trial_config.json", "final_metrics.json"} <= names
        cfg = json.loads(Path(client.download_artifacts(run_id, "trial_config.json",
                                                        str(dl / run_id))).read_text())
        final = json.loads(Path(client.download_artifacts(run_id, "final_metrics.json",
                                                          str(dl / run_id))).read_text())
        assert cfg["trial_id"] == c.data.tags[TAG.TRIAL_ID] and cfg["sweep"] == "scaleout"
        assert final[FINAL_DEV] == pytest.approx(c.data.metrics[FINAL_DEV])
    stored = list((mlflow_server.artifacts).rglob("final_metrics.json"))
    assert len(stored) == 3, stored
    trials = json.loads(Path(client.download_artifacts(parent_id, "trials.json",
                                                       str(dl / parent_id))).read_text())
    assert len(trials) == 3
    # ... and the rows really are in PostgreSQL.
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres.uri)
    try:
        with engine.connect() as conn:
            n_runs = conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM runs r JOIN experiments e "
                "ON r.experiment_id = e.experiment_id WHERE e.name = :name"),
                {"name": "scaleout"}).scalar_one()
            n_dev = conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM metrics WHERE run_uuid = :run AND key = 'dev/main'"),
                {"run": children[0].info.run_id}).scalar_one()
    finally:
        engine.dispose()
    assert n_runs == 4 and n_dev >= 2, (n_runs, n_dev)


def _lost_records(home: Path, run_id: str) -> list[dict]:
    path = home / "lost-metrics" / f"{run_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("client_retries", ["default", "off"])
def test_tracking_server_killed_mid_sweep(tmp_path, mlflow_server, ray_cluster, home,
                                          client_retries):
    """SIGKILL the tracking server during a trial, restart it on the same port a few seconds
    later: trials keep training, and every metric is delivered late or reported lost.

    ``default``: MLflow's HTTP client as shipped, which retries one request with backoff for
    about two minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7), so a short outage looks like one
    slow request and every metric arrives late, with the time it was measured. ``off``:
    MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 for the driver (the one process that writes MLflow), so
    every request fails at once: the metrics of the outage go to the lost-metrics file, and
    the driver says so when the server goes and when it comes back.
    """
    from mlflow import MlflowClient

    name = f"outage-{client_retries}"
    n_trials, eval_every = (2 if client_retries == "default" else 1), 4
    sweep = sweep_file(
        tmp_path, name, methods=["finetune"], search={"seeds": list(range(1, n_trials + 1))},
        data={"max_train_samples": 256},
        # off: the trial must outlast the outage, since a driver without HTTP retries cannot
        # record a trial's end (or the sweep's) while the server is down.
        # (measured: about 14 steps/s on 2 busy cores, an outage of about 40 s; 60 epochs are
        # 1740 steps)
        train={"epochs": 5 if client_retries == "default" else 60, "batch_size": 8, "lr": 1e-3,
               "eval_every": eval_every, "log_every": 1},
        max_concurrent_trials=1)
    env = sweep_env(ray_cluster, home)
    if client_retries == "off":
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    log = tmp_path / "sweep.log"
    client = MlflowClient(mlflow_server.url)
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_argv(sweep, mlflow_server, ray_cluster),
                                env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # 1. Wait until a trial is training and its first evaluation reached the server.
        victim, deadline = None, time.time() + 300
        while victim is None:
            assert proc.poll() is None, f"sweep ended early:\n{log.read_text()[-5000:]}"
            assert time.time() < deadline, f"no trial started:\n{log.read_text()[-5000:]}"
            time.sleep(0.5)
            with contextlib.suppress(Exception):
                _, children = runs_of(client, name)
                for c in children:
                    if c.info.status == "RUNNING" and client.get_metric_history(
                            c.info.run_id, DEV):
                        victim = c
                        break
        victim_steps = len(client.get_metric_history(victim.info.run_id, "train/loss"))
        # 2. Kill the server (no clean shutdown), keep it down, bring it back on the same port.
        t_kill = time.time()
        mlflow_server.kill()
        time.sleep(DOWN_S)
        t_restart = time.time()
        restart_took = mlflow_server.start()
        t_back = time.time()
        outage = t_back - t_kill
        print(f"\n[scaleout] killed the server {t_kill - t0:.1f} s into the sweep, while "
              f"{victim.data.tags['ikd.trial_id']} was at step {victim_steps}; down "
              f"{outage:.1f} s ({DOWN_S} s + {restart_took:.1f} s to restart)")
        # 3. The sweep must come to an end by itself.
        rc = proc.wait(timeout=480)
    finally:
        if proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    took = time.time() - t0
    text = log.read_text(errors="replace")
    assert rc == 0, f"exit {rc}:\n{text[-8000:]}"
    assert f"finished {n_trials}, failed 0" in text, text[-8000:]

    parents, children = runs_of(client, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags[TAG.TRIAL_ID] for c in children]
    assert len(ids) == len(set(ids)) == n_trials, ids  # exactly one run per trial

    summary, during_outage, delivered_during, lost_total = [], 0, 0, 0
    for c in sorted(children, key=lambda r: r.info.start_time):
        run_id, trial_id = c.info.run_id, c.data.tags[TAG.TRIAL_ID]
        lost = _lost_records(home, run_id)
        finish_record = home / "lost-metrics" / f"{run_id}.finish.json"
        lost_steps: dict[str, set[int]] = {}
        for rec in lost:
            lost_steps.setdefault(rec["key"], set()).add(rec["step"])
        hist = {key: client.get_metric_history(run_id, key) for key in c.data.metrics}
        delivered = {key: {m.step for m in h} for key, h in hist.items()}
        # Evidence that training went on: metrics stamped (by the trial) while the server was
        # down, whether they reached the server afterwards or the lost-metrics file.
        stamps = [m.timestamp for h in hist.values() for m in h] + [r["timestamp"] for r in lost]
        during = sum(t_kill * 1000 <= s <= t_restart * 1000 for s in stamps)
        during_outage += during
        delivered_during += sum(t_kill * 1000 <= m.timestamp <= t_restart * 1000
                                for h in hist.values() for m in h)
        lost_total += len(lost)
        if c.info.status != "FINISHED":
            # The end of the run could not be recorded either: then it must be on disk.
            assert finish_record.exists(), f"{trial_id}: {c.info.status}, no finish record"
            assert json.loads(finish_record.read_text())["status"] == "FINISHED"
        total = c.data.metrics.get("steps")
        if total is None and "steps" in lost_steps:
            total = max(lost_steps["steps"])
        assert total, f"{trial_id}: its step count was neither delivered nor reported lost"
        total = int(total)
        expected = {"train/loss": set(range(1, total + 1)),
                    VAL: set(range(eval_every, total + 1, eval_every)) | {total}}
        missing_total = 0
        for key, steps in expected.items():
            missing = steps - delivered.get(key, set())
            # Complete history, or every missing point reported in the lost-metrics file.
            assert missing <= lost_steps.get(key, set()), (
                f"{trial_id}: {key} silently lost at steps {sorted(missing)}")
            missing_total += len(missing)
        if lost:
            tag = c.data.tags.get("ikd.lost_metrics")
            assert tag == str(len(lost)) or finish_record.exists(), (trial_id, tag, len(lost))
        n_delivered = sum(len(h) for h in hist.values())
        started = c.info.start_time / 1000 - t_back
        summary.append(f"  {trial_id}: run created {started:+.1f} s from the server's return; "
                       f"{c.info.status}, {total} steps; {n_delivered} metric "
                       f"points delivered, {len(lost)} reported lost "
                       f"(tag ikd.lost_metrics={c.data.tags.get('ikd.lost_metrics', '-')}), "
                       f"{missing_total} train/loss+val/main points missing; "
                       f"{during} stamped during the outage")
    assert during_outage > 0, "no metric was produced while the server was down"
    warned = text.count("MLflow tracking unreachable")
    recovered = text.count("MLflow tracking is reachable again")
    print(f"[scaleout] {name} sweep: exit {rc} after {took:.1f} s; server down {outage:.1f} s; "
          f"'unreachable' warnings {warned}, 'reachable again' {recovered}")
    print("\n".join(summary))
    for line in text.splitlines():
        if "MLflow tracking" in line and "reachable" in line:
            print("   ", line.strip()[:300])
    if client_retries == "off":
        # Every request failed at once: the tracker noticed, and said so both ways.
        assert warned >= 1 and recovered >= 1, text[-8000:]
    else:
        # MLflow's own retries outlast a short outage: everything arrives, stamped with the
        # time it was measured (during the outage), not the time it was delivered.
        assert lost_total == 0, f"{lost_total} metrics lost"
        assert delivered_during > 0, "no metric stamped during the outage was delivered"

"""Checks before any training (`ikd-sweep run` before Ray starts, `ikd-sweep train`): the data
files exist, parse and have rows; the models resolve and have the layers asked for; the working
folder is writable and has room for the checkpoints; the tracking store can be written.

Each failure is a `UserError` naming the file, field or path and what to do. Resources on the
cluster are checked in `tune.py` (that needs Ray).
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ikd_sweep.config import ModelConfig, SweepConfig
from ikd_sweep.data import DataError, carve_splits, load_raw
from ikd_sweep.errors import ModelError, PreflightError, StoreError
from ikd_sweep.models import model_config
from ikd_sweep.tasks import get_task
from ikd_sweep.trials import Trial

# A checkpoint holds fp32 weights plus AdamW's two moments: 3 x 4 bytes per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12


def preflight(cfg: SweepConfig, home: Path, trials: Sequence[Trial],
              tracking_uri: str | None = None, source: Path | None = None) -> str:
    """Raise a `UserError` for the first problem that would stop `trials` of `cfg` later;
    return the disk estimate for the checkpoints as text. `source` (the sweep file) is named
    in errors about its fields."""
    try:
        check_data(cfg)
        sizes = {name: _parameter_count(spec, name) for name, spec in
                 (("teacher", cfg.teacher), ("student", cfg.student))}
    except (ModelError, DataError) as e:
        if source is None or str(e).startswith(("/", str(source))):  # names its file already
            raise
        raise type(e)(f"{source}: {e}") from None
    need = check_disk(home, trials, sizes, teachers=len({(t.task, t.seed) for t in trials
                                                  if t.method in ("kd", "ikd")}))
    if tracking_uri is not None:
        check_store(tracking_uri)
    return _mb(need)


def check_data(cfg: SweepConfig) -> None:
    """Every task's files read (once) and leave training rows after val and quiz are carved."""
    for name in cfg.tasks:
        task = get_task(name)
        raw = load_raw(task, cfg.data)
        labels = raw["train"]["label"]
        n = min(len(labels), cfg.data.max_train_samples or len(labels))
        carve_splits(np.zeros(n), cfg.data.val_fraction, cfg.data.quiz_fraction,
                     seed=0, regression=True)


def _parameter_count(spec: ModelConfig, field: str) -> int:
    """Parameters of the model `spec` builds, counted on the meta device (nothing allocated)."""
    config = model_config(spec, field)
    overrides = dict(spec.config)
    if spec.num_layers is not None:
        overrides["num_hidden_layers"] = spec.num_layers
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def check_disk(home: Path, trials: Sequence[Trial], params: dict[str, int],
               teachers: int) -> int:
    """Bytes the checkpoints need (one per trial, teachers once per task and seed); raise when
    the disk under `home` has less free. Returns the estimate."""
    writable(home, "working folder", "pass --home or set IKD_SWEEP_HOME")
    per_trial = {m: CHECKPOINT_BYTES_PER_PARAM * (params["student"] + (
        params["teacher"] if m == "ikd" else 0)) for m in ("finetune", "kd", "ikd")}
    need = (sum(per_trial[t.method] for t in trials)
            + teachers * 4 * params["teacher"])  # a cached teacher: its fp32 weights
    free = shutil.disk_usage(home).free
    if need > free:
        largest = max(per_trial[t.method] for t in trials)
        raise PreflightError(
            f"{home}: about {_mb(need)} needed for the checkpoints of {len(trials)} trials (up "
            f"to {_mb(largest)} each) and {teachers} teacher{'s' * (teachers != 1)}, but only "
            f"{_mb(free)} free; free some space or pass --home on a larger disk")
    return need


def writable(folder: Path, what: str, hint: str, create: bool = True) -> None:
    """Write a file into `folder` (created if `create`, else into its nearest existing parent,
    where it would be created), or raise naming it."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{what} {folder}: {existing} is a file, not a folder; {hint}")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder if create else existing):
            pass
    except OSError as e:
        raise PreflightError(f"{what} {folder} is not writable ({e.strerror}); {hint}") from None


def check_store(uri: str) -> None:
    """A SQLite store's folder (and file) writable, a tracking server reachable."""
    from ikd_sweep.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is not None:
        if db.exists() and not db.is_file():
            raise StoreError(f"tracking store {db} is not a file; pass another --tracking-uri")
        try:
            writable(db.parent, "tracking store folder", "pass a writable --tracking-uri")
        except PreflightError as e:
            raise StoreError(str(e)) from None
        if db.exists() and (not _can_write(db) or _header(db) not in (b"", b"SQLite format 3\0")):
            raise StoreError(f"tracking store {db} is read-only or not an SQLite database; "
                             "fix its permissions or pass another --tracking-uri")
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StoreError(f"tracking server {uri} is unreachable ({reason}); start it or "
                             "pass another --tracking-uri") from None


def _can_write(path: Path) -> bool:
    try:
        with path.open("r+b"):
            return True
    except OSError:
        return False


def _header(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(16)

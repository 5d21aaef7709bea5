"""Checks before any training (`ikd-sweep run` before Ray starts, `ikd-sweep train`): the data
files exist, parse and have rows; the models resolve and have the layers asked for; the working
folder is writable and has room for the checkpoints; the tracking store can be written; where a
CUDA device is visible, the trials that `resources.gpu` packs onto one GPU fit its memory.

Each failure is a `UserError` naming the file, field or path and what to do. Resources on the
cluster are checked in `sweep/cluster.py` (that needs Ray).
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from ikd_sweep.config import ModelConfig, SweepConfig
from ikd_sweep.data import DataError, carve_splits, load_raw
from ikd_sweep.errors import ModelError, PreflightError, StoreError
from ikd_sweep.models import model_config
from ikd_sweep.names import METHODS
from ikd_sweep.tasks import get_task
from ikd_sweep.trials import Trial

# A checkpoint holds fp32 weights plus AdamW's two moments: 3 x 4 bytes per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12
# The GPU memory estimate of one trial (`trial_memory`). Training a model holds fp32 weights,
# gradients and AdamW's two moments: 16 bytes per parameter. Backward keeps about 34 bytes per
# token, hidden unit and layer under bf16 autocast when attention does not store its scores
# (SDPA; Korthikanti et al. 2022). PyTorch's caching allocator holds more than the live tensors
# (x1.25), and each process's CUDA context takes ~0.5 GiB outside it.
TRAIN_BYTES_PER_PARAM = 16
ACTIVATION_BYTES = 34
ALLOCATOR_SLACK = 1.25
CUDA_CONTEXT_BYTES = 2**29


@dataclass(frozen=True)
class ModelSize:
    params: int
    hidden: int
    layers: int

    def activations(self, batch: int, length: int) -> int:
        """Bytes of activations a training pass keeps for backward."""
        return ACTIVATION_BYTES * batch * length * self.hidden * self.layers


def preflight(cfg: SweepConfig, home: Path, trials: Sequence[Trial],
              tracking_uri: str | None = None, source: Path | None = None) -> str:
    """Raise a `UserError` for the first problem that would stop `trials` of `cfg` later;
    return the disk estimate for the checkpoints as text. `source` (the sweep file) is named
    in errors about its fields."""
    try:
        check_data(cfg)
        sizes = {name: model_size(spec, name) for name, spec in
                 (("teacher", cfg.teacher), ("student", cfg.student))}
        check_packing(cfg, {t.method for t in trials}, sizes)
    except (ModelError, DataError, PreflightError) as e:
        if source is None or str(e).startswith(("/", str(source))):  # names its file already
            raise
        raise type(e)(f"{source}: {e}") from None
    need = check_disk(home, trials, {k: v.params for k, v in sizes.items()},
                      teachers=len({(t.task, t.seed) for t in trials
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


def model_size(spec: ModelConfig, field: str) -> ModelSize:
    """Parameters, width and depth of the model `spec` builds, counted on the meta device
    (nothing allocated)."""
    config = model_config(spec, field)
    overrides = dict(spec.config)
    if spec.num_layers is not None:
        overrides["num_hidden_layers"] = spec.num_layers
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return ModelSize(sum(p.numel() for p in model.parameters()), config.hidden_size,
                     config.num_hidden_layers)


def trial_memory(cfg: SweepConfig, methods: set[str], sizes: dict[str, ModelSize]) -> int:
    """Estimated peak GPU bytes of one trial of `methods` (an estimate from model sizes, batch
    and length: see the constants above; `sys/peak_gpu_gib` is the measured figure). The first
    trial of a (task, seed) also fine-tunes its teacher, so that counts as well."""
    s, t = sizes["student"], sizes["teacher"]
    batch, length = cfg.train.batch_size, cfg.data.max_length
    student = TRAIN_BYTES_PER_PARAM * s.params + s.activations(batch, length)
    need = {"finetune": student,
            # the teacher's weights and one layer's no-grad activations at a time
            "kd": student + 4 * t.params + t.activations(batch, length) // max(1, t.layers),
            # + the teacher trained by the exam (its backward through a full forward), the
            # lookahead's and the quiz's student passes, the exam's weight and gradient copies
            "ikd": (student + TRAIN_BYTES_PER_PARAM * t.params + t.activations(batch, length)
                    + 2 * s.activations(batch, length) + 12 * s.params + 8 * t.params)}
    peak = max(need[m] for m in methods)
    if methods & {"kd", "ikd"}:
        peak = max(peak, TRAIN_BYTES_PER_PARAM * t.params
                   + t.activations(cfg.teacher.batch_size, length))
    return int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES


def gpu_memory() -> tuple[str, int] | None:
    """Name and bytes of the first visible CUDA device; None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory


def check_packing(cfg: SweepConfig, methods: set[str], sizes: dict[str, ModelSize]) -> None:
    """Raise when the trials `resources.gpu` puts on one GPU would not fit its memory by
    `trial_memory`'s estimate. Only where a CUDA device is visible here (the driver's machine
    stands for the cluster's GPUs); CPU trials and machines without one are not checked."""
    gpu = cfg.resources.gpu
    device = gpu_memory() if gpu > 0 else None
    if device is None:
        return
    name, total = device
    per_gpu = round(1 / gpu) if gpu < 1 else 1
    each = trial_memory(cfg, methods, sizes)
    if each * per_gpu <= total:
        return
    fits = total // each
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    what = (f"resources.gpu: {gpu:g} packs {per_gpu} trial{'s' * (per_gpu > 1)} per GPU, each "
            f"estimated at up to {gib(each)} (student {_describe(sizes['student'])}, teacher "
            f"{_describe(sizes['teacher'])}, batch {cfg.train.batch_size} x length "
            f"{cfg.data.max_length}; an estimate from model sizes), but the {name} has "
            f"{gib(total)}")
    if fits == 0:
        raise PreflightError(f"{what}: not even one trial fits; lower train.batch_size or "
                             "data.max_length, or use smaller models")
    n = 2 ** (int(fits).bit_length() - 1)  # the most trials per GPU that fit, a power of 2
    raise PreflightError(f"{what}: {fits} fit; set resources.gpu to {1 / n:g} ({n} per GPU)")


def _describe(size: ModelSize) -> str:
    return f"{size.params / 1e6:.0f}M parameters, {size.layers} x {size.hidden}"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def check_disk(home: Path, trials: Sequence[Trial], params: dict[str, int],
               teachers: int) -> int:
    """Bytes the checkpoints need (one per trial, teachers once per task and seed); raise when
    the disk under `home` has less free. Returns the estimate."""
    writable(home, "working folder", "pass --home or set IKD_SWEEP_HOME")
    per_trial = {m: CHECKPOINT_BYTES_PER_PARAM * (params["student"] + (
        params["teacher"] if m == "ikd" else 0)) for m in METHODS}
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

"""Fine-tune-once cache of teachers, and of a fixed teacher's logits on the training set.

A teacher is fine-tuned once per (task, teacher model and settings, seed, data settings) on
train - val (the trial's seed carves val, so the teacher never sees the val rows its students
are selected on; it may learn from the quiz rows) and saved under `<home>/cache/teachers/<key>/`
with its val and dev scores; every trial of that task and seed reuses it. A file lock
(`filelock`) makes a second process wait for the first instead of training the same teacher
twice. This module depends on the trainer (it fine-tunes with `fit`), never the reverse. For `kd`
the teacher is fixed, so its logits on train - val (every row a kd course can hold, with or
without quiz parity) are computed once per cached teacher (`train_logits.pt`) and shared by every
kd trial (they do not depend on temperature).

Inside a sweep, the first trial that needs a teacher fine-tunes it (`progress` hears of each
epoch) while the other trials of that seed wait on the lock. A teacher that fails leaves a
`<key>.failed` marker naming the driver's `attempt`: the other trials of that attempt fail at
once with the same error instead of training it again; the next run (a new attempt) retries it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from ikd_sweep.config import SweepConfig
from ikd_sweep.data import TaskData, iterate, prepare_data
from ikd_sweep.errors import CacheError
from ikd_sweep.files import atomic_path
from ikd_sweep.home import Home
from ikd_sweep.models import autocast, build_model, load_tokenizer, model_inputs
from ikd_sweep.names import DEV
from ikd_sweep.trainer import Callback, FitSettings, evaluate, fit, pick_device, seed_everything
from ikd_sweep.trials import trial_seed

DONE = "DONE"
_log = logging.getLogger(__name__)


def _intact(folder: Path) -> bool:
    """Whether a cached teacher's files are whole: each safetensors file as long as its header
    says (a truncated copy or a full disk leaves it shorter) and metrics.json readable."""
    try:
        weights = list(folder.glob("*.safetensors"))
        for f in weights:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if f.stat().st_size != 8 + n + end:
                return False
        json.loads((folder / "metrics.json").read_text())
        return bool(weights)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _cached(out: Path, warn: bool = False) -> bool:
    if not (out / DONE).exists():
        return False
    if _intact(out):
        return True
    if warn:
        _log.warning("cached teacher at %s is corrupt; rebuilding", out)
    return False


def teacher_key(cfg: SweepConfig, task: str, seed: int) -> str:
    """Content key: everything that changes what the fine-tuned teacher is."""
    d = cfg.data
    # quiz_fraction is absent: val is carved before quiz, so train - val does not depend on it.
    # max_eval_samples is present: the recorded dev score depends on it.
    parts = {"task": task, "seed": trial_seed(cfg, seed),
             "teacher": cfg.teacher.model_dump(mode="json"),
             "data": {"source": d.source, "glue_dir": str(d.glue_dir), "max_length": d.max_length,
                      "val_fraction": d.val_fraction, "max_train_samples": d.max_train_samples,
                      "max_eval_samples": d.max_eval_samples},
             "train": {"weight_decay": cfg.train.weight_decay,
                       "warmup_ratio": cfg.train.warmup_ratio,
                       "max_grad_norm": cfg.train.max_grad_norm}, "v": 2}
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{task}-s{seed}-{digest}"


def teacher_dir(cfg: SweepConfig, task: str, seed: int, home: Path) -> Path:
    return Home(home).teacher(teacher_key(cfg, task, seed))


def _locked(path: Path) -> FileLock:
    """An exclusive lock across processes; blocks until the process holding it is done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


class TeacherFailed(RuntimeError):
    """The teacher of this (task, seed) failed earlier in the same sweep run."""


class _EpochProgress:
    """Trainer callback of a teacher's fit: one `progress` call per evaluation (epoch end)."""

    def __init__(self, progress: Callable[[dict[str, Any]], None], task: str, seed: int,
                 epochs: float) -> None:
        self.progress = progress
        self.info = {"task": task, "seed": int(seed), "epochs": math.ceil(epochs)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def report(self, metrics: dict[str, float], step: int, checkpoint: Path | None) -> None:
        self.progress({**self.info, "epoch": math.ceil(metrics.get("epoch", 0) - 1e-9),
                       "dev_main": float(metrics[DEV])})


def _failure_marker(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def ensure_teacher(cfg: SweepConfig, task: str, seed: int, home: Path, *,
                   device: str | None = None,
                   progress: Callable[[dict[str, Any]], None] | None = None,
                   attempt: str | None = None) -> Path:
    """The folder of the fine-tuned teacher for (task, seed), training it if not cached.

    `progress` gets `{task, seed, epoch, epochs, dev_main}` after each epoch of a fine-tuning.
    `attempt` (a sweep run's id): a failure is remembered for this attempt, and raised again
    as `TeacherFailed` by every later call of the same attempt."""
    out = teacher_dir(cfg, task, seed, home)
    if _cached(out):
        return out
    marker = _failure_marker(out)
    with _locked(out.with_name(out.name + ".lock")):
        if _cached(out, warn=True):  # trained by another process while we waited
            return out
        if attempt is not None and marker.exists():
            try:
                failed = json.loads(marker.read_text())
            except (OSError, ValueError):
                failed = {}
            if failed.get("attempt") == attempt:
                raise TeacherFailed(f"teacher of {task} seed {seed} failed in this run: "
                                    f"{failed.get('error', 'unknown error')}")
        try:
            _fine_tune(cfg, task, seed, home, out, device, None if progress is None else
                       _EpochProgress(progress, task, seed, cfg.teacher.epochs))
        except Exception as e:
            if attempt is not None:
                try:
                    marker.write_text(json.dumps({"attempt": attempt,
                                                  "error": f"{type(e).__name__}: {e}"}))
                except OSError:  # e.g. the disk is full: the next trial tries again
                    pass
            raise
        marker.unlink(missing_ok=True)
    return out


def _fine_tune(cfg: SweepConfig, task: str, seed: int, home: Path, out: Path,
               device: str | None, callback: Callback | None) -> None:
    """Fine-tune the teacher and save it to `out` (the caller holds its lock)."""
    dev = pick_device(device)
    tokenizer = load_tokenizer(cfg.teacher.model)
    settings = FitSettings.for_teacher(cfg, seed)
    data = prepare_data(task, cfg.data, tokenizer, Home(home).data_cache, settings.seed,
                        method="teacher")
    seed_everything(settings.seed)
    model = build_model(cfg.teacher, data.task.num_labels)
    metrics = fit(settings, data.task, data, model, device=dev, callback=callback,
                  pad_id=tokenizer.pad_token_id or 0)
    # The saved (final) model's scores: what every kd/ikd trial of this seed starts from.
    scores = {f"{name}/{k}": v for name, split in (("val", data.val), ("dev", data.dev))
              for k, v in evaluate(model, split, data.task, dev, settings.train.eval_batch_size,
                                   tokenizer.pad_token_id or 0).items()}
    with atomic_path(out) as tmp:  # a crash leaves no half-written teacher behind
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(
            {**metrics, **scores, "key": out.name}, indent=1))
        (tmp / DONE).write_text("")


def teacher_metrics(path: Path) -> dict[str, float]:
    return json.loads((Path(path) / "metrics.json").read_text())


def load_teacher(path: Path) -> PreTrainedModel:
    try:
        return AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:
        (Path(path) / DONE).unlink(missing_ok=True)  # so that the next run rebuilds it
        raise CacheError(f"cached teacher at {path} is corrupt ({type(e).__name__}: {e}); "
                         "re-run to rebuild it") from None


@torch.no_grad()
def train_logits(path: Path, data: TaskData, device: torch.device,
                 batch_size: int = 128) -> torch.Tensor:
    """The fixed teacher's logits for every row of train - val, indexed by the row's `idx`.

    Cached beside the teacher and computed in eval mode under the same autocast as training,
    so it is what a live teacher forward pass gives during kd (up to padding-width rounding;
    the teacher never trains in kd)."""
    cache = Path(path) / "train_logits.pt"
    rows = data.labelled.idx  # covers the kd course with or without quiz parity

    def cached() -> torch.Tensor | None:  # only logits computed for these very rows
        if not cache.exists():
            return None
        try:
            saved = torch.load(cache)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            _log.warning("cached teacher logits at %s are corrupt (%s); rebuilding", cache,
                         str(e).strip().split(". ")[0][:160])
            cache.unlink(missing_ok=True)
            return None
        return saved["logits"] if torch.equal(saved["rows"], torch.as_tensor(rows)) else None

    if (hit := cached()) is not None:
        return hit
    with _locked(cache.with_suffix(".lock")):
        if (hit := cached()) is not None:  # computed by another trial while we waited
            return hit
        model = load_teacher(path).to(device).eval()
        out = torch.zeros((int(rows.max()) + 1, data.task.num_labels))
        for batch in iterate(data.labelled, batch_size, regression=data.task.is_regression):
            with autocast(device):
                out[batch["idx"]] = model(**{k: v.to(device) for k, v in
                                             model_inputs(batch).items()}).logits.float().cpu()
        with atomic_path(cache) as tmp:
            torch.save({"rows": torch.as_tensor(rows), "logits": out}, tmp)
    return out

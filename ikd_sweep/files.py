"""Atomic writes of files and folders: readers see the old version or the new, never half."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ikd_sweep.errors import UserError
from ikd_sweep.home import Home


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path, *, first_wins: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` (not created); write a file or a folder
    there, and on success it becomes `path` in one rename. On an error `path` is untouched.

    A folder that already exists is swapped out whole (a crash between the two renames leaves
    no `path`, never a mix). `first_wins`: keep an existing folder and drop the new copy, for
    caches that concurrent writers fill with identical content. Without it the caller is the
    only writer of `path` (or holds a lock), so leftovers of an earlier crashed write go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not first_wins:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            _remove(stale)
    # Unique per writer, so two processes never write into the same temporary path.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        if first_wins:
            try:
                os.rename(tmp, path)
            except OSError:  # another writer's folder is already there
                pass
        elif tmp.is_dir() and path.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


class SweepBusy(UserError):
    """Another live process runs this sweep in this working folder."""


@contextmanager
def sweep_lock(home: Path, sweep: str) -> Iterator[Path]:
    """Hold `<home>/locks/<sweep>.lock` for one `run` of `sweep`, or raise `SweepBusy` at once.

    The OS lock (flock, through filelock) dies with its process, so a killed driver never
    blocks the next run; the file's text (pid, host, start time) only names the holder."""
    import json
    import socket
    import time

    from filelock import FileLock, Timeout

    path = Home(home).lock(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            who = json.loads(path.read_text())
            holder = f"pid {who['pid']} on {who['host']}, since {who['since']}"
        except (OSError, ValueError, KeyError):  # written a moment after the lock is taken
            holder = "another process"
        raise SweepBusy(f"sweep {sweep} is already running in {home} ({holder}); wait for it "
                        "or stop it") from None
    try:
        path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield path
    finally:
        lock.release()

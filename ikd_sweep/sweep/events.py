"""What a trial reports to Tune and the driver reads back: the report kinds, its keys, and a
trial's error as text. Ray-free: the live view (progress.py) reads the same reports.

A report is `{"ikd": {"kind", "step", "time_ms", "metrics" | "error" | "device"}}`, plus a few
top-level keys Tune itself reads (ASHA's time axis, the optuna objective, "done").
"""

from __future__ import annotations

import errno
import re
import traceback
from typing import Any

from ikd_sweep.names import SEL_VAL

REPORT = "ikd"  # the report's key in a Tune result
DONE_KEY = "ikd_done"  # present in a trial's last report only when the trial completed
EVALS = "ikd_evals"  # evaluations so far: ASHA's time axis (evaluation reports only)
# What search.algorithm optuna maximises, top level in a trial's final report: the selection
# metric of the comparison protocol (selection data), never dev.
OBJECTIVE = SEL_VAL
# Report kinds: a training-curve point, an evaluation (with its checkpoint), the final result,
# the error that ended the trial, "finished by an earlier run of the command", a teacher's
# epoch, the device the trial trains on.
LOG, EVAL, FINAL, ERROR, RECORDED, TEACHER, DEVICE = (
    "log", "eval", "final", "error", "recorded", "teacher", "device")


def report_of(result: dict[str, Any]) -> dict[str, Any]:
    """The ikd report inside a Tune result ({} for a result without one)."""
    return result.get(REPORT) or {}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def plain(text: str) -> str:
    """`text` without terminal colour codes (Ray colours its error messages)."""
    return _ANSI.sub("", text)


def describe_error(exc: BaseException) -> str:
    """Plain text, root cause first: the original exception inside Ray's or Tune's wrappers,
    its message, then the traceback (no terminal colour codes)."""
    root, seen = exc, set()
    while id(root) not in seen:  # RayTaskError.cause, TuneError's __cause__
        seen.add(id(root))
        inner = getattr(root, "cause", None) or root.__cause__
        if not isinstance(inner, BaseException):
            break
        root = inner
    if isinstance(root, OSError) and root.errno == errno.ENOSPC:
        where = f" (writing {root.filename})" if root.filename else ""
        head = (f"OSError: no space left on device{where}; free space and re-run the same "
                "command")
    else:
        head = f"{type(root).__name__}: {str(root).strip()}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    return plain(f"{head}\n\n{tb}").strip()


def error_line(error: str | None) -> str:
    """The first line of a `describe_error` text: the error's type and message."""
    lines = (error or "").strip().splitlines()
    return lines[0] if lines else "unknown error"

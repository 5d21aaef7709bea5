"""The selected student kept as a Hugging Face model folder with its model card.

`fit` calls `save_student` each time selection improves; the folder is swapped in whole, so it
always holds one complete selected student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ikd_sweep.files import atomic_path
from ikd_sweep.names import SEL_DEV, SEL_STEP, SEL_VAL


@dataclass
class KeepStudent:
    """Where and how `fit` keeps the selected student: `path` (a folder, replaced whole each
    time selection improves), the tokenizer saved with it, and the model card's facts (task,
    method, setting, seed, sweep, commit; written by `trial.run_trial`, which knows them)."""

    path: Path
    tokenizer: Any = None
    card: dict[str, Any] | None = None


def student_card(card: dict[str, Any], sel: dict[str, float]) -> str:
    """The README.md model card of a kept student: its facts and its selection scores."""
    facts = {**(card or {}), SEL_VAL: sel[SEL_VAL],
             SEL_DEV: sel[SEL_DEV], SEL_STEP: int(sel[SEL_STEP])}
    title = " ".join(str(facts[k]) for k in ("task", "method") if facts.get(k) is not None)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-classification", "---",
             "", f"# ikd-sweep student{': ' + title if title else ''}", "",
             "The student at the checkpoint its trial selected on `val/main` (ties keep the "
             "earlier); `sel/dev_main` is its GLUE dev score, which chose nothing.", "",
             "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else '-'} |" for k, v in facts.items()]
    return "\n".join(lines) + "\n"


def save_student(keep: KeepStudent, model: torch.nn.Module, sel: dict[str, float]) -> Path:
    """Write the selected student atomically: a crash leaves the previous folder, never half."""
    with atomic_path(keep.path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if keep.tokenizer is not None:
            keep.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(student_card(keep.card or {}, sel), encoding="utf-8")
    return keep.path

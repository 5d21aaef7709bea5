"""Where a trial's time goes: seconds per part of the step, and the GPU's memory peak.

`StepTimes` adds up the time of named sections (`course`: the student's course forward and
backward; `teacher_forward`: the live teacher's forward in plain course steps; `exam`: ikd's
exam, the hypergradient and the teacher's update direction; `optimizer`: the AdamW steps of
student and teacher, clipping and the schedule; `evaluation`: val/dev scoring; `checkpoint`:
resumable state and the kept student). On CUDA each section is bracketed by two CUDA events,
recorded without a host sync and read at the logging steps (which sync anyway), so timing costs
the normal path nothing; on a GPU-starved (launch-bound) step an event pair still measures the
section's wall time, since the GPU reaches the end event only after the host launched the
section's work. On CPU, where kernels run synchronously, `time.perf_counter` does it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SECTIONS = ("course", "teacher_forward", "exam", "optimizer", "evaluation", "checkpoint")


class StepTimes:
    """Seconds per section of `fit` (see the module doc), summed over the trial."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(SECTIONS, 0.0)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t0

    def collect(self) -> None:
        """Read the finished event pairs (after a host sync, they are done: no wait)."""
        for name, start, end in self._pending:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000
        self._pending.clear()

    def metrics(self, wall_s: float, samples: int) -> dict[str, float]:
        """`sys/time_share/<section>` (and `other`: data, logging, host work) of `wall_s`, the
        loop's wall time; `sys/samples_per_s`: student training samples per second of training
        time (the wall time less evaluation and checkpoints)."""
        self.collect()
        wall = max(wall_s, 1e-9)
        out = {f"sys/time_share/{k}": v / wall for k, v in self.seconds.items()}
        out["sys/time_share/other"] = max(0.0, 1 - sum(self.seconds.values()) / wall)
        train_s = wall - self.seconds["evaluation"] - self.seconds["checkpoint"]
        out.update({"sys/wall_s": wall_s, "sys/train_s": train_s,
                    "sys/train_samples": float(samples),
                    "sys/samples_per_s": samples / train_s if train_s > 0 else 0.0})
        return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """`sys/peak_gpu_gib`: the most memory PyTorch's allocator held on the trial's GPU since
    `reset_peak_memory` (reserved: what other trials on the card cannot use; the CUDA context,
    ~0.5 GiB per process, comes on top), and `sys/peak_gpu_allocated_gib` (live tensors).
    Nothing on CPU, so the store holds no empty GPU metric there."""
    if device.type != "cuda":
        return {}
    return {"sys/peak_gpu_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "sys/peak_gpu_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}

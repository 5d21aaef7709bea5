"""Trainer speed ratios, measured side by side in one run.

    python benchmarks/bench_trainer.py                           # CPU, small models (1-2 min)
    python benchmarks/bench_trainer.py --json                    # one JSON object on stdout
    python benchmarks/bench_trainer.py --device cuda --size base # BERT-base teacher, 6L student

Prints, as medians of interleaved repetitions after a warm-up:

1. the whole ikd round (exam + the real course step + teacher update, the trainer's own
   `TrainStep`) over a kd course step with a live teacher, per estimator and lookahead, fused
   (the real step reuses the exam's course gradient and teacher outputs) and unfused, at
   exam_every 1 and 10 (k - 1 plain course steps plus one round, over k kd steps);
2. a kd course step on cached teacher logits over one with a live teacher forward pass;
3. per-batch padding of length-grouped batches (`ikd_sweep.data.batch_order` + `collate`, what
   the trainer does) over padding every batch to max_length, timed as student forward +
   backward on real SST-2 sentence lengths, with the fraction of padding tokens of each;
4. (`--compile-batches`, CUDA) the kd course step's samples/s eager and with `train.compile`;

and the course step's samples/s. Models are random-init BERTs (speed does not depend on the
weights). No Ray or MLflow: the script imports the trainer's building blocks only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    get_linear_schedule_with_warmup,
)

ROOT = Path(__file__).resolve().parents[1]
try:
    import ikd_sweep  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from ikd_sweep.config import IkdConfig, TrainConfig  # noqa: E402
from ikd_sweep.data import Split, batch_order, collate, read_glue_tsv  # noqa: E402
from ikd_sweep.distill.exam import ESTIMATORS  # noqa: E402
from ikd_sweep.models import autocast, model_inputs  # noqa: E402
from ikd_sweep.tasks import get_task  # noqa: E402
from ikd_sweep.trainer import FitSettings, TrainStep  # noqa: E402

VOCAB = 30522  # BERT uncased, the MiniLM tokenizer's vocabulary

# teacher / student: (layers, hidden, heads, intermediate); batch size, sequence length
SIZES = {
    "tiny": {"teacher": (4, 256, 4, 1024), "student": (2, 256, 4, 1024), "batch": 16, "seq": 64},
    "base": {"teacher": (12, 768, 12, 3072), "student": (6, 768, 12, 3072), "batch": 32,
             "seq": 128},
}


def make_model(spec: tuple[int, int, int, int], vocab: int, seed: int) -> torch.nn.Module:
    layers, hidden, heads, inter = spec
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=inter, num_labels=2,
                     max_position_embeddings=512)
    return BertForSequenceClassification(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(b: int, seq: int, vocab: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(1000, vocab, (b, seq), generator=g),
             "attention_mask": torch.ones(b, seq, dtype=torch.long),
             "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand(b, seq).clone(),
             "labels": torch.randint(0, 2, (b,), generator=g),
             "idx": torch.arange(b)}
    return {k: v.to(device) for k, v in batch.items()}




def measure(fns: dict[str, Callable[[], None]], device, reps: int, warmup: int) -> dict:
    """Median seconds per call of each fn, repetitions interleaved (drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    # On CPU, the process's CPU time: on a shared machine, waiting for a core is not the step's
    # cost (run with one torch thread, OMP_NUM_THREADS=1, so that spinning threads do not count).
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


# ----------------------------------------------------------------------------- (1) and (2)


def make_step(method: str, student, teacher, device, *, estimator="finite_difference",
              lookahead="sgd", fuse=True, cached=None, compile_=False) -> TrainStep:
    """The trainer's own step (`TrainStep`), as `fit` builds it: AdamW, linear schedule."""
    train = TrainConfig(epochs=1, batch_size=1, eval_batch_size=1, lr=1e-5, weight_decay=0.01,
                        warmup_ratio=0.0, max_grad_norm=1.0, log_every=1, alpha=0.5,
                        compile=compile_)
    ikd = IkdConfig(estimator=estimator, lookahead_lr=5e-5, lookahead=lookahead)
    s = FitSettings(method=method, seed=0, train=train, ikd=ikd, temperature=2.0, exam_every=1,
                    teacher_lr=1e-6, fuse_exam=fuse)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.train.lr, fused=cuda)
    sched = get_linear_schedule_with_warmup(opt, 0, 10**9)
    t_opt = None
    if method == "ikd":
        t_opt = torch.optim.AdamW(teacher.parameters(), lr=s.teacher_lr, weight_decay=0.0,
                                  fused=cuda)
    return TrainStep(s, student, opt, sched, device, teacher=teacher, teacher_logits=cached,
                     t_opt=t_opt)


def bench_steps(args, size: dict, device: torch.device, vocab: int) -> dict:
    b, seq = size["batch"], size["seq"]
    teacher = make_model(size["teacher"], vocab, 0).to(device).eval()  # as in fit: no dropout
    student = make_model(size["student"], vocab, 1).to(device).train()
    course = random_batch(b, seq, vocab, device, 0)
    quiz = random_batch(b, seq, vocab, device, 1)
    with torch.no_grad(), autocast(device):
        cached = teacher(**model_inputs(course)).logits.float()  # logits "of the training set"
    for p in teacher.parameters():  # as fit does for ikd (kd's forward runs under no_grad)
        p.requires_grad_(True)

    kd_live = make_step("kd", student, teacher, device)
    kd_cached = make_step("kd", student, None, device, cached=cached)
    fns = {"kd course (live teacher)": lambda: kd_live(course),
           "kd course (cached logits)": lambda: kd_cached(course)}
    rounds = {}
    for la in args.lookahead:
        for e in args.estimators:
            for fuse in (True, False):
                step = make_step("ikd", student, teacher, device, estimator=e, lookahead=la,
                                 fuse=fuse)
                name = f"ikd round {e} {la} {'fused' if fuse else 'unfused'}"
                rounds[(e, la, fuse)] = name
                fns[name] = (lambda st: lambda: st(course, quiz, diagnose=False))(step)
    t = measure(fns, device, args.reps, args.warmup)
    live, cache = t["kd course (live teacher)"], t["kd course (cached logits)"]

    mem = {}
    if device.type == "cuda":  # peak allocated during each step on its own (models included)
        for name, fn in fns.items():
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync(device)
            mem[name] = torch.cuda.max_memory_allocated(device) / 2**30

    def row(name, extra=""):
        m = f"  peak {mem[name]:5.2f} GiB" if mem else ""
        return f"  {name:<40}{ms(t[name])}{m}{extra}"

    def per_step(name, k):  # an exam every k steps: k - 1 plain course steps and one round
        return (t[name] + (k - 1) * live) / (k * live)

    result: dict = {"lookahead": args.lookahead[0], "ikd_round_over_kd_step": {},
                    "ikd_round_over_kd_step_unfused": {}}
    print("\n(1) ikd round (exam + course step) / kd course step (live teacher); an exam every "
          "k steps costs (round + (k-1) course) / (k course)")
    print(row("kd course (live teacher)", f"  {b / live:8.1f} samples/s"))
    for (e, la, fuse), name in rounds.items():
        k1, k10 = per_step(name, 1), per_step(name, 10)
        print(row(name, f"  k=1 {k1:5.2f}  k=10 {k10:5.2f}"))
        if la == args.lookahead[0]:
            key = "ikd_round_over_kd_step" + ("" if fuse else "_unfused")
            result[key][e] = {"exam_every_1": round(k1, 3), "exam_every_10": round(k10, 3)}
    print("\n(2) kd course step: cached teacher logits / live teacher forward")
    print(row("kd course (cached logits)", f"  {b / cache:8.1f} samples/s"))
    print(row("kd course (live teacher)", f"  {b / live:8.1f} samples/s"))
    print(f"  ratio cached / live: {cache / live:.2f}")
    result["kd_cached_over_live"] = round(cache / live, 3)
    result["kd_course_samples_per_s"] = round(b / live, 1)
    if mem:
        result["peak_gib"] = {k: round(v, 2) for k, v in mem.items()}
    return result


def bench_compile(args, size: dict, device: torch.device, vocab: int) -> dict:
    """kd course step (live teacher) samples/s, eager vs `train.compile` (CUDA only)."""
    seq = size["seq"]
    teacher = make_model(size["teacher"], vocab, 0).to(device).eval()
    student = make_model(size["student"], vocab, 1).to(device).train()
    out: dict = {}
    print(f"\n(4) kd course step samples/s, eager vs compiled (seq {seq})")
    for b in args.compile_batches:
        course = random_batch(b, seq, vocab, device, 0)
        fns = {}
        for comp in (False, True):
            if comp and device.type != "cuda":
                print("  compiled: skipped (train.compile is CUDA-only)")
                continue
            step = make_step("kd", student, teacher, device, compile_=comp)
            fns["compiled" if comp else "eager"] = (lambda st, c=course: lambda: st(c))(step)
        t = measure(fns, device, args.reps, max(args.warmup, 3))  # compile on the warm-up
        out[f"batch_{b}"] = {k: round(b / v, 1) for k, v in t.items()}
        print(f"  batch {b:4d}: " + "  ".join(f"{k} {b / v:8.1f} samples/s" for k, v in t.items()))
    return out


# ----------------------------------------------------------------------------- (3) padding


def sst2_split(glue_dir: Path, tokenizer, n: int, max_length: int, seed: int) -> Split:
    """n random SST-2 training sentences, tokenized as the trainer does (truncated)."""
    task = get_task("sst2")
    cols = read_glue_tsv(task, glue_dir / task.glue_folder / "train.tsv")
    rows = np.random.default_rng(seed).permutation(len(cols["label"]))[:n]
    enc = tokenizer([cols["sentence"][i] for i in rows], truncation=True,
                    max_length=max_length)
    tt = enc.get("token_type_ids")
    return Split(list(enc["input_ids"]), None if tt is None else list(tt),
                 np.asarray([cols["label"][i] for i in rows]), np.arange(len(rows)))


def pad_fraction(split: Split, batches: list[list[int]], pad_to: int | None) -> float:
    real = total = 0
    for rows in batches:
        lens = [len(split.input_ids[i]) for i in rows]
        real += sum(lens)
        total += len(rows) * (pad_to or max(lens))
    return 1 - real / total


def bench_padding(args, size: dict, device: torch.device) -> None:
    from ikd_sweep.models import load_tokenizer  # needs the packaged MiniLM tokenizer

    b, seq = size["batch"], size["seq"]
    glue = Path(args.glue_dir)
    if not (glue / "SST-2" / "train.tsv").is_file():
        print(f"\n(3) padding: skipped, no SST-2 at {glue} (see --glue-dir)")
        return
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except Exception as e:  # report it and go on with the other results
        print(f"\n(3) padding: skipped, tokenizer {args.tokenizer!r} unavailable: {e}")
        return
    split = sst2_split(glue, tokenizer, args.sentences, seq, 0)
    pad_id = tokenizer.pad_token_id or 0
    student = make_model(size["student"], max(VOCAB, len(tokenizer)), 1).to(device).train()
    grouped = batch_order(split, b, 0)                        # what the trainer does
    shuffled = batch_order(split, b, 0, group_by_length=False)  # per-batch padding, no grouping
    variants = {"length-grouped, per-batch pad": (grouped, None),
                "random order, per-batch pad": (shuffled, None),
                f"padded to max_length {seq}": (grouped, seq)}
    # The same N batches of rows for grouped and max_length; pre-collated, moved to the device.
    n = min(args.pad_batches, len(grouped))
    data = {k: [{kk: vv.to(device) for kk, vv in collate(split, rows, pad_id, pad_to).items()}
                for rows in order[:n]] for k, (order, pad_to) in variants.items()}

    def fwd_bwd(batches):
        def run():
            for batch in batches:
                with autocast(device):
                    loss = F.cross_entropy(student(**model_inputs(batch)).logits.float(),
                                           batch["labels"])
                loss.backward()
            student.zero_grad(set_to_none=True)
        return run

    t = measure({k: fwd_bwd(v) for k, v in data.items()}, device, max(3, args.reps // 3),
                1)
    lens = np.array([len(s) for s in split.input_ids])
    print(f"\n(3) padding: student fwd+bwd over {n} batches of {b} real SST-2 sentences "
          f"({len(split)} sampled, {lens.mean():.1f} tokens on average, longest {lens.max()})")
    base = t[f"padded to max_length {seq}"]
    for k, (order, pad_to) in variants.items():
        frac = pad_fraction(split, order, pad_to)
        tokens = sum(bt["input_ids"].numel() for bt in data[k])
        print(f"  {k:<32}{ms(t[k])}  pad tokens {frac:6.1%}  ({tokens} tokens timed)"
              f"  ratio {t[k] / base:5.2f}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: small CPU-friendly models (default); base: BERT-base teacher "
                        "(12 x 768), 6-layer student, batch 32, seq 128")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 15 tiny, 30 base)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls of each step")
    p.add_argument("--pad-batches", type=int, default=None,
                   help="batches per padding variant (default: 20 tiny, 50 base)")
    p.add_argument("--sentences", type=int, default=4000, help="SST-2 sentences to sample")
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--tokenizer", default="minilm",
                   help="minilm (packaged all-MiniLM-L6-v2), a hub id or a local path")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "padding"])
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--lookahead", nargs="+", default=["sgd"], choices=["sgd", "adam"],
                   help="lookaheads to time (the first one goes into --json)")
    p.add_argument("--compile-batches", nargs="*", type=int, default=[],
                   help="also time the kd course step eager vs torch.compile at these batch "
                        "sizes (CUDA), e.g. 32 128")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the ratios on stdout (the report on stderr)")
    args = p.parse_args(argv)
    if args.json:
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args, p)
        print(json.dumps(result))
    else:
        run(args, p)


def run(args, p: argparse.ArgumentParser) -> dict:
    args.reps = args.reps or (30 if args.size == "base" else 15)
    args.pad_batches = args.pad_batches or (50 if args.size == "base" else 20)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    size = SIZES[args.size]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device {device} ({name or 'cpu'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    desc = lambda s: f"{s[0]}L x {s[1]} ({s[2]} heads, ffn {s[3]})"  # noqa: E731
    print(f"size {args.size}: teacher {desc(size['teacher'])}, student {desc(size['student'])}, "
          f"batch {size['batch']}, seq {size['seq']}; median of {args.reps} interleaved reps "
          f"after {args.warmup} warm-up")
    t0 = time.perf_counter()
    result: dict = {"device": str(name or device), "size": args.size}
    if "steps" not in args.skip:
        result.update(bench_steps(args, size, device, VOCAB))
    if args.compile_batches:
        result["course_samples_per_s"] = bench_compile(args, size, device, VOCAB)
    if "padding" not in args.skip:
        bench_padding(args, size, device)
    heavy = sorted(m for m in ("ray", "mlflow") if m in sys.modules)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; Ray/MLflow imported: {heavy or 'no'}")
    assert not heavy, "the trainer's building blocks must not import Ray or MLflow"
    return result


if __name__ == "__main__":
    main()

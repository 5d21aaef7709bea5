"""Every bad input a user can give ends in a short message naming the file or field, exit 2, no
traceback, and leaves the finished runs in the store as they were.

One table of cases; each fails in validation or preflight, before Ray or training starts. Most
run in-process through typer's CliRunner (the error handling lives in the app itself, so it is
the real CLI's); the cases marked `sub` run the real CLI in a subprocess.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import CLI, GLUE, cli_env, needs_glue
from helpers import sweep_raw as tiny_sweep
from mlflow import MlflowClient
from typer.testing import CliRunner

from ikd_sweep.cli import app

SWEEP = "bad-inputs"

pytestmark = needs_glue


def sweep_raw(glue_dir: Path = GLUE) -> dict:
    # resources: the sweep's default (one CPU per trial), not the tiny sweep's explicit one.
    raw = tiny_sweep(SWEEP, tasks=["rte"], data={"glue_dir": str(glue_dir)},
                     search={"temperature": [1]})
    del raw["resources"]
    return raw


def write_sweep(folder: Path, name: str, text: str | None = None, glue_dir: Path = GLUE,
                **dotted) -> Path:
    """A sweep file: the tiny base with `section__key=value` overrides (a whole section
    replaced by `section=value`), or raw `text`."""
    raw = sweep_raw(glue_dir)
    for key, value in dotted.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    path = folder / f"{name}.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw))
    return path


def glue_with(folder: Path, name: str, train: bytes | None) -> Path:
    """A GLUE folder whose RTE/train.tsv is `train` (absent when None), dev.tsv the real one."""
    glue = folder / f"glue-{name}"
    (glue / "RTE").mkdir(parents=True)
    shutil.copy(GLUE / "RTE" / "dev.tsv", glue / "RTE" / "dev.tsv")
    if train is not None:
        (glue / "RTE" / "train.tsv").write_bytes(train)
    return glue


def rte_head(n: int) -> bytes:
    return b"".join((GLUE / "RTE" / "train.tsv").read_bytes().splitlines(keepends=True)[:n])


@dataclass
class Env:
    """What a case may use: a scratch folder, the home with the finished run, its base sweep."""

    tmp: Path
    home: Path
    base: Path
    holds: list = field(default_factory=list)  # sockets kept open while the case runs


@dataclass
class Case:
    id: str
    make: Callable[[Env], list[str]]  # the CLI arguments
    expect: list[str | Callable[[Env], str]]  # substrings of the output
    sub: bool = False  # through the real CLI in a subprocess
    env: dict[str, str] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # in-process cases only


def data_case(id_: str, train: bytes | None, *expect: str, cmd: str = "run",
              sub: bool = False) -> Case:
    def make(e: Env) -> list[str]:
        glue = glue_with(e.tmp, id_, train)
        path = write_sweep(e.tmp, id_, glue_dir=glue)
        return (["run", str(path)] if cmd == "run" else
                ["train", str(path), "--task", "rte", "--method", "finetune"])
    train_tsv: Callable[[Env], str] = lambda e: str(e.tmp / f"glue-{id_}" / "RTE" / "train.tsv")  # noqa: E731
    return Case(id_, make, [train_tsv, *expect], sub=sub)


def sweep_case(id_: str, *expect: str, text: str | None = None, cmd: str = "validate",
               sub: bool = False, **dotted) -> Case:
    def make(e: Env) -> list[str]:
        path = write_sweep(e.tmp, id_, text, **dotted)
        return {"validate": ["validate", str(path)], "run": ["run", str(path)],
                "train": ["train", str(path), "--task", "rte", "--method", "finetune"]}[cmd]
    return Case(id_, make, [lambda e: f"{id_}.yaml", *expect], sub=sub)


def train_flags(*flags: str, method: str = "ikd") -> Callable[[Env], list[str]]:
    return lambda e: ["train", str(e.base), "--task", "rte", "--method", method, *flags]


def busy_port(e: Env, listen: bool) -> int:
    """A loopback port held by this test: listening (a server is there) or bound only (a
    connection is refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if listen:
        s.listen()
    e.holds.append(s)
    return s.getsockname()[1]


def truncated_checkpoint(e: Env) -> list[str]:
    """A resumable checkpoint cut short (a finished trial keeps none: it is deleted at the end,
    so a torch.save of the trial's size is written and truncated), in a home of its own."""
    import torch

    home = e.tmp / "resume-home"
    state = home / "single" / SWEEP / "rte-finetune-s1" / "checkpoint" / "state.pt"
    state.parent.mkdir(parents=True)
    torch.save({"step": 3, "student": {"w": torch.zeros(4096)}}, state)
    state.write_bytes(state.read_bytes()[:1000])
    return ["train", str(e.base), "--task", "rte", "--method", "finetune", "--resume",
            "--no-track", "--home", str(home)]


def resumed_state(e: Env) -> str:
    return str(e.tmp / "resume-home" / "single" / SWEEP / "rte-finetune-s1" / "checkpoint"
               / "state.pt")


def not_sqlite(e: Env) -> list[str]:
    (e.tmp / "junk.db").write_text("not a database\n")
    return ["run", str(e.base), "--tracking-uri", f"sqlite:///{e.tmp / 'junk.db'}"]


def under_a_file(e: Env) -> Path:
    (e.tmp / "a-file").write_text("")
    return e.tmp / "a-file"


def no_store_report(e: Env) -> list[str]:
    (e.tmp / "empty-home").mkdir()
    return ["report", "--home", str(e.tmp / "empty-home")]


CASES = [
    # the sweep file
    sweep_case("lr-inf", "train.lr", "finite number", train__lr=float("inf")),
    sweep_case("lr-nan", "train.lr", "finite number", train__lr=float("nan"), cmd="run"),
    sweep_case("max-steps-bool", "train.max_steps", "valid integer", train__max_steps=True),
    sweep_case("quiz-parity-int", "data.quiz_parity", "valid boolean", data__quiz_parity=1),
    sweep_case("compile-str", "train.compile", "valid boolean", train__compile="yes please"),
    sweep_case("epochs-inf", "teacher.epochs", "finite number", teacher__epochs=float("inf"),
               cmd="train"),
    sweep_case("duplicate-key", "name: duplicate key (first at line",
               text=yaml.safe_dump(sweep_raw()) + f"name: {SWEEP}-again\n"),
    sweep_case("seed-negative", "search.seeds.0", "greater than or equal to 0",
               search={"seeds": [-5]}),
    sweep_case("seed-huge", "search.seeds.0", "valid integer", search={"seeds": [1e20]}),
    sweep_case("seed-base-overflow", "train.seed_base", "below 2**32",
               train__seed_base=2**32 - 1),
    sweep_case("unknown-key", "student.colour: unknown key", student__colour="red"),
    Case("set-bad-yaml", lambda e: ["validate", str(e.base), "--set", "train.lr=[1"],
         ["--set 'train.lr=[1'", "not valid YAML"]),
    Case("set-no-equals", lambda e: ["validate", str(e.base), "--set", "train.lr"],
         ["--set", "key=value"]),
    Case("binary-file", lambda e: ["validate", str(_binary(e))],
         [lambda e: f"{e.tmp / 'binary.yaml'}:1", "not a text (UTF-8) file"]),
    Case("missing-file", lambda e: ["run", str(e.tmp / "absent.yaml")],
         ["absent.yaml", "cannot read the file"]),
    # data files
    data_case("train-empty", b"", "the file is empty", sub=True),
    data_case("train-header-only", rte_head(1), "no data rows", cmd="train"),
    data_case("train-not-utf8", rte_head(5) + b"9\t\xff\xfe\tb\tentailment\n",
              "train.tsv:6: not UTF-8"),
    data_case("train-malformed-row", rte_head(5) + b"9\tonly two\n", "train.tsv:6: 2 columns"),
    data_case("train-bad-label", rte_head(5) + b"9\ta\tb\tmaybe\n", "train.tsv:6: label 'maybe'",
              cmd="train"),
    data_case("train-missing", None, "file not found", "data.glue_dir"),
    Case("glue-dir-missing", lambda e: ["run", str(write_sweep(
        e.tmp, "nodir", glue_dir=e.tmp / "nowhere"))], ["data.glue_dir", "nowhere",
                                                        "does not exist"]),
    sweep_case("too-few-rows", "data.max_train_samples", "leave none to train on",
               data__max_train_samples=2, cmd="run"),
    # models
    sweep_case("model-path-missing", "student.model: model path /no/such/model does not exist",
               student={"model": "/no/such/model"}, cmd="run"),
    Case("hub-id-offline", lambda e: ["run", str(write_sweep(
        e.tmp, "hub", teacher={"model": "no-org/no-such-model"}))],
         ["teacher.model 'no-org/no-such-model'", "offline? use a local path or `minilm`"],
         env={"HF_HUB_OFFLINE": "1"}, sub=True),  # read by huggingface_hub at import
    sweep_case("student-layers", "student.num_layers is 50", "has 6 layers",
               student={"model": "minilm", "num_layers": 50}, cmd="train"),
    sweep_case("teacher-layers", "teacher.num_layers is 7", "has 6 layers",
               teacher={"model": "minilm", "num_layers": 7}, cmd="run"),
    # CLI flags of `train`: the sweep file's rules
    Case("flag-exam-every-0", train_flags("--exam-every", "0"),
         ["--exam-every", "greater than 0", "search.exam_every"]),
    Case("flag-temperature-negative", train_flags("--temperature", "-1"),
         ["--temperature", "greater than 0"]),
    Case("flag-temperature-nan", train_flags("--temperature", "nan"),
         ["--temperature", "finite number"]),
    Case("flag-teacher-lr-negative", train_flags("--teacher-lr", "-1"),
         ["--teacher-lr", "greater than or equal to 0"]),
    Case("flag-seed-negative", train_flags("--seed", "-5"), ["--seed", "search.seeds"]),
    Case("flag-unknown-task", lambda e: ["train", str(e.base), "--task", "nope", "--method",
                                         "kd"], ["--task", "'nope' is not in the sweep"]),
    Case("flag-unknown-method", train_flags(method="distil"), ["--method", "'distil'"]),
    Case("flag-unused-hparam", train_flags("--temperature", "2", method="finetune"),
         ["--temperature", "does not use temperature"]),
    Case("report-format", lambda e: ["report", "--format", "pdf"], ["--format", "pdf"]),
    # stores and folders
    Case("report-no-store", no_store_report,
         [lambda e: f"no tracking store at {e.tmp / 'empty-home' / 'mlflow.db'}"]),
    Case("report-out-unwritable", lambda e: ["report", "--out", str(under_a_file(e) / "r")],
         ["--out", "is a file, not a folder"]),
    Case("store-unreachable", lambda e: ["run", str(e.base), "--tracking-uri",
                                         f"http://127.0.0.1:{busy_port(e, listen=False)}"],
         ["tracking server http://127.0.0.1:", "unreachable"]),
    Case("store-under-a-file", lambda e: ["run", str(e.base), "--tracking-uri",
                                          f"sqlite:///{under_a_file(e)}/mlflow.db"],
         ["tracking store folder", "is a file, not a folder"]),
    Case("store-not-sqlite", not_sqlite, ["junk.db", "not an SQLite database"]),
    Case("home-under-a-file", lambda e: ["run", str(e.base), "--home",
                                         str(under_a_file(e) / "home")],
         [lambda e: str(e.tmp / "a-file")]),
    Case("ui-port-busy", lambda e: ["ui", "--port", str(busy_port(e, listen=True))],
         ["cannot serve on 127.0.0.1:", "--port"]),
    Case("disk-too-small", lambda e: ["run", str(e.base)],
         ["needed for the checkpoints of 3 trials", "and 1 teacher, but only 1 MB free"],
         patch=lambda m: m.setattr("ikd_sweep.preflight.shutil.disk_usage",
                                   lambda p: shutil._ntuple_diskusage(2**40, 2**40, 2**20))),
    # caches
    Case("resume-truncated-checkpoint", truncated_checkpoint,
         [resumed_state, "delete it or run without --resume"]),
]


def _binary(e: Env) -> Path:
    path = e.tmp / "binary.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))
    return path


def _snapshot(home: Path) -> tuple[int, dict]:
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return len(runs), {r.info.run_id: (r.info.status, r.info.end_time, r.data.metrics,
                                       r.data.params) for r in runs
                       if r.info.status == "FINISHED"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Env:
    """A home with one finished tracked `train` run (and its checkpoint), made once."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    home = tmp / "home"
    base = write_sweep(tmp, "base")
    # In-process: a subprocess would pay the imports again.
    result = CliRunner().invoke(app, ["train", str(base), "--task", "rte", "--method",
                                      "finetune", "--home", str(home), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    count, finished_runs = _snapshot(home)
    assert count == 2 and finished_runs  # the "-train" parent and the trial
    return Env(tmp, home, base)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error(case: Case, finished: Env, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch):
    before = _snapshot(finished.home)
    e = Env(tmp_path, finished.home, finished.base)
    try:
        args = case.make(e)
        env = cli_env(finished.home, **case.env)
        if case.sub:
            p = subprocess.run([*CLI, *args], env=env,
                               capture_output=True, text=True, cwd=tmp_path, timeout=300)
            code, out = p.returncode, p.stdout + p.stderr
        else:
            monkeypatch.chdir(tmp_path)
            if case.patch is not None:
                case.patch(monkeypatch)
            for k in ("MLFLOW_TRACKING_URI", "IKD_SWEEP_DEBUG"):
                monkeypatch.delenv(k, raising=False)
            result = CliRunner().invoke(app, args, env={k: env[k] for k in
                                                        ("IKD_SWEEP_HOME", "COLUMNS",
                                                         *case.env)})
            code, out = result.exit_code, result.output
            assert not isinstance(result.exception, Exception) or code == 2, repr(
                result.exception)
    finally:
        for s in e.holds:
            s.close()
    flat = " ".join(out.split())  # rich may wrap long lines
    assert code == 2, out
    assert "Traceback" not in out
    for want in case.expect:
        text = want(e) if callable(want) else want
        assert " ".join(text.split()) in flat, f"{text!r} not in:\n{out}"
    assert _snapshot(finished.home) == before  # no run added, no finished run changed
    assert not (tmp_path / "empty-home" / "mlflow.db").exists()  # report created no store


def test_debug_shows_the_traceback(finished: Env, tmp_path: Path):
    bad = write_sweep(tmp_path, "bad", train__lr=float("inf"))
    for args, env in ((["--debug", "validate", str(bad)], {}),
                      (["validate", str(bad)], {"IKD_SWEEP_DEBUG": "1"})):
        result = CliRunner().invoke(app, args, env=env)
        assert type(result.exception).__name__ == "ConfigError"  # raised, not turned into Exit
    p = subprocess.run([*CLI, "--debug", "validate", str(bad)],
                       env=cli_env(finished.home), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" in p.stderr and "train.lr" in p.stderr


def test_a_bug_keeps_its_traceback_with_a_hint(finished: Env, monkeypatch: pytest.MonkeyPatch):
    import ikd_sweep.cli as cli

    def broken(cfg):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(cli.SweepPlan, "of", broken)
    result = CliRunner().invoke(app, ["validate", str(finished.base)])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    assert "unexpected error (RuntimeError)" in result.output and "report it" in result.output


def test_corrupt_caches_are_reported_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A truncated teacher (its DONE marker present), teacher logits or tokenized data is
    detected, named with its path, and built again; the rebuilt entry is whole."""
    import torch

    from ikd_sweep import teacher as tc
    from ikd_sweep.config import load_sweep
    from ikd_sweep.data import prepare_data
    from ikd_sweep.errors import CacheError
    from ikd_sweep.models import load_tokenizer

    cfg, home = load_sweep(write_sweep(tmp_path, "caches")), tmp_path / "home"
    tdir = tc.ensure_teacher(cfg, "rte", 1, home, device="cpu")
    weights = tdir / "model.safetensors"
    whole = weights.read_bytes()

    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    truncate(weights)
    with caplog.at_level("WARNING"):
        assert tc.ensure_teacher(cfg, "rte", 1, home, device="cpu") == tdir
    assert f"cached teacher at {tdir} is corrupt; rebuilding" in caplog.text
    assert weights.stat().st_size == len(whole)
    tc.load_teacher(tdir)  # loads

    truncate(weights)  # found only on load (e.g. damaged while a sweep runs)
    with pytest.raises(CacheError, match=f"cached teacher at {tdir} is corrupt"):
        tc.load_teacher(tdir)
    assert not (tdir / tc.DONE).exists()  # so the next run rebuilds it
    tc.ensure_teacher(cfg, "rte", 1, home, device="cpu")
    tc.load_teacher(tdir)

    tokenizer = load_tokenizer(cfg.teacher.model)
    data = prepare_data("rte", cfg.data, tokenizer, home / "cache" / "data", 1, method="kd")
    logits = tc.train_logits(tdir, data, torch.device("cpu"))
    truncate(tdir / "train_logits.pt")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert torch.equal(tc.train_logits(tdir, data, torch.device("cpu")), logits)
    assert f"cached teacher logits at {tdir / 'train_logits.pt'} are corrupt" in caplog.text

    for arrow in (home / "cache" / "data").glob("rte-train-*/*.arrow"):
        truncate(arrow)
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = prepare_data("rte", cfg.data, tokenizer, home / "cache" / "data", 1,
                             method="kd")
    assert "cached tokenized data at" in caplog.text and "rte-train-" in caplog.text
    assert again.train.input_ids == data.train.input_ids

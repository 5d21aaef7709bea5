"""Sweep files: validation errors (file, line, field), trials (expansion, confirmation runs,
picking one by hand, seeds) and --set overrides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ikd_sweep.config import (
    ConfigError,
    SweepConfig,
    check_search_value,
    load_sweep,
    parse_overrides,
)
from ikd_sweep.tasks import TASKS
from ikd_sweep.trials import (
    METHOD_HPARAMS,
    PickError,
    Trial,
    confirm_trials,
    expand_trials,
    pick_trial,
    trial_seed,
)

# One key per line, so every field has its own line number (1-based, as in an editor).
BASE = [
    "name: t",  # 1
    "tasks: [rte, sst2]",  # 2
    "methods: [finetune, kd, ikd]",  # 3
    "data:",  # 4
    "  source: hub",  # 5
    "  quiz_fraction: 0.1",  # 6
    "teacher:",  # 7
    "  model: minilm",  # 8
    "  lr: 2.0e-5",  # 9
    "student:",  # 10
    "  model: minilm",  # 11
    "  num_layers: 2",  # 12
    "train:",  # 13
    "  lr: 5.0e-5",  # 14
    "  epochs: 1",  # 15
    "ikd:",  # 16
    "  lookahead_lr: 5.0e-5",  # 17
    "search:",  # 18
    "  temperature: [1, 2]",  # 19
    "  exam_every: [1, 5]",  # 20
    "  teacher_lr:",  # 21
    "    - 1.0e-6",  # 22
    "    - 1.0e-5",  # 23
    "  seeds: [1, 2]",  # 24
]


def write_sweep(
    tmp_path: Path,
    replace: dict[int, str] | None = None,
    append: list[str] | None = None,
    name: str = "sweep.yaml",
) -> Path:
    lines = list(BASE)
    for lineno, text in (replace or {}).items():
        lines[lineno - 1] = text
    path = tmp_path / name
    path.write_text("\n".join(lines + (append or [])) + "\n")
    return path


def errors_of(path: Path, overrides: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_sweep(path, overrides)
    assert exc.value.path == str(path)
    assert str(path) in str(exc.value)
    return exc.value.errors


def test_base_file_is_valid(tmp_path):
    cfg = load_sweep(write_sweep(tmp_path))
    assert cfg.tasks == ["rte", "sst2"]
    assert cfg.search.teacher_lr == [1e-6, 1e-5]
    # 2 tasks x 2 seeds x (1 + 2 + 2*2*2)
    assert len(expand_trials(cfg)) == 2 * 2 * (1 + 2 + 8)


# (line to replace, its new text, dotted field path, line of the error, words the message has)
BAD = {
    "unknown nested key": (
        15,
        "  epochz: 1",
        "train.epochz",
        15,
        ["unknown key", "valid keys here", "epochs", "batch_size", "lr"],
    ),
    "wrong type (number)": (15, "  epochs: three", "train.epochs", 15, ["valid number"]),
    "wrong type (list)": (2, "tasks: rte", "tasks", 2, ["valid list"]),
    "wrong type (integer)": (12, "  num_layers: [2]", "student.num_layers", 12, ["valid integer"]),
    "unknown task": (2, "tasks: [rte, nope]", "tasks", 2,
                     ["unknown task", "nope", "known tasks", *TASKS]),
    "unknown method": (
        3,
        "methods: [finetune, distil]",
        "methods.1",
        3,
        ["'finetune'", "'kd'", "'ikd'"],
    ),
    "teacher.lr negative": (9, "  lr: -1.0e-5", "teacher.lr", 9, ["greater than 0"]),
    "teacher.lr zero": (9, "  lr: 0", "teacher.lr", 9, ["greater than 0"]),
    "train.lr zero": (14, "  lr: 0", "train.lr", 14, ["greater than 0"]),
    "train.lr negative": (14, "  lr: -5.0e-5", "train.lr", 14, ["greater than 0"]),
    "lookahead_lr negative": (
        17,
        "  lookahead_lr: -1.0e-4",
        "ikd.lookahead_lr",
        17,
        ["greater than 0"],
    ),
    "lookahead_lr zero": (17, "  lookahead_lr: 0", "ikd.lookahead_lr", 17, ["greater than 0"]),
    "teacher_lr entry negative": (
        23,
        "    - -1.0e-5",
        "search.teacher_lr.1",
        23,
        ["greater than or equal to 0"],
    ),
    "quiz_fraction zero": (6, "  quiz_fraction: 0", "data.quiz_fraction", 6, ["greater than 0"]),
    "quiz_fraction 0.6": (
        6,
        "  quiz_fraction: 0.6",
        "data.quiz_fraction",
        6,
        ["less than or equal to 0.5"],
    ),
    "temperature zero": (
        19,
        "  temperature: [0, 2]",
        "search.temperature.0",
        19,
        ["greater than 0"],
    ),
    "temperature negative": (
        19,
        "  temperature: [2, -1]",
        "search.temperature.1",
        19,
        ["greater than 0"],
    ),
    "empty temperature": (19, "  temperature: []", "search.temperature", 19, ["at least one"]),
    "empty exam_every": (20, "  exam_every: []", "search.exam_every", 20, ["at least one"]),
    "empty seeds": (24, "  seeds: []", "search.seeds", 24, ["at least one"]),
    # The model-level check has no field of its own: it points at the enclosing `data:` key.
    "glue_dir source without glue_dir": (5, "  source: glue_dir", "data", 4,
                                         ["glue_dir", "data.glue_dir"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_each_error_names_file_line_and_field(tmp_path, case):
    lineno, text, field, err_line, words = BAD[case]
    path = write_sweep(tmp_path, replace={lineno: text})
    errors = errors_of(path)
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith(f"{path}:{err_line}: {field}: "), error
    for word in words:
        assert word in error, (word, error)


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    path = write_sweep(tmp_path, append=["colour: red"])  # line 25
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:25: colour: unknown key")
    for key in ("name", "tasks", "methods", "data", "teacher", "student", "search"):
        assert key in error


def test_missing_required_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\ntasks: [rte]\nmethods: [kd]\nteacher: {model: minilm}\n")
    (error,) = errors_of(path)
    assert "student" in error and "required field is missing" in error


def test_every_problem_is_reported(tmp_path):
    path = write_sweep(
        tmp_path, replace={6: "  quiz_fraction: 0.6", 14: "  lr: 0", 19: "  temperature: [0]"}
    )
    errors = errors_of(path)
    assert sorted(e.split(": ")[0] for e in errors) == sorted(
        [f"{path}:6", f"{path}:14", f"{path}:19"]
    )


def test_quiz_fraction_bounds(tmp_path):
    cfg = load_sweep(write_sweep(tmp_path, replace={6: "  quiz_fraction: 0.5"}))
    assert cfg.data.quiz_fraction == 0.5
    for bad in ("0", "0.6", "-0.1"):
        path = write_sweep(tmp_path, replace={6: f"  quiz_fraction: {bad}"}, name=f"{bad}.yaml")
        (error,) = errors_of(path)
        assert f"{path}:6: data.quiz_fraction" in error


def test_glue_dir_given_is_resolved_relative_to_the_file(tmp_path):
    path = write_sweep(tmp_path, replace={5: "  source: glue_dir", 6: "  glue_dir: ../glue"})
    cfg = load_sweep(path)
    assert cfg.data.glue_dir == (tmp_path.parent / "glue").resolve()


def test_invalid_yaml_gives_file_and_line(tmp_path):
    path = write_sweep(tmp_path, replace={19: "  temperature: [1, 2"})
    (error,) = errors_of(path)
    assert "not valid YAML" in error
    # PyYAML notices the unclosed list on the next line.
    assert error.startswith(f"{path}:20: ")


def test_yaml_tab_indent_gives_file_and_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("name: t\ntasks: [rte]\n\tmethods: [kd]\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:3: ") and "not valid YAML" in error


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    (error,) = errors_of(path)
    assert "mapping" in error


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    (error,) = errors_of(path)
    assert "cannot read" in error


def test_first_order_with_a_regression_task_is_rejected_at_load(tmp_path):
    path = write_sweep(tmp_path, {2: "tasks: [rte, stsb]", 17: "  estimator: first_order"})
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:17: ikd.estimator: first_order needs class pseudo-labels")
    assert "stsb is a regression task" in error and "exact or finite_difference" in error
    # Also when the estimator comes from --set (no line of its own: the ikd section's line).
    path = write_sweep(tmp_path, {2: "tasks: [rte, stsb]"}, name="b.yaml")
    (error,) = errors_of(path, {"ikd.estimator": "first_order"})
    assert error.startswith(f"{path}:16: ikd.estimator: first_order")


def test_first_order_is_fine_without_regression_tasks_or_without_ikd(tmp_path):
    assert load_sweep(write_sweep(tmp_path, {17: "  estimator: first_order"})).ikd.estimator \
        == "first_order"
    cfg = load_sweep(write_sweep(tmp_path, {2: "tasks: [stsb]", 3: "methods: [finetune, kd]",
                                            17: "  estimator: first_order"}, name="kd.yaml"))
    assert {t.method for t in expand_trials(cfg)} == {"finetune", "kd"}


# ----------------------------------------------------------------------------- trials


def sweep(
    tasks=("rte",),
    methods=("finetune", "kd", "ikd"),
    temperature=(1, 2),
    exam_every=(1, 5),
    teacher_lr=(1e-6, 1e-5),
    seeds=(1, 2),
    **search,
) -> SweepConfig:
    return SweepConfig.model_validate(
        {
            "name": "t",
            "tasks": list(tasks),
            "methods": list(methods),
            "teacher": {"model": "minilm"},
            "student": {"model": "minilm", "num_layers": 2},
            "search": {
                "temperature": list(temperature),
                "exam_every": list(exam_every),
                "teacher_lr": list(teacher_lr),
                "seeds": list(seeds),
                **search,
            },
        }
    )


GRIDS = [
    # tasks, temperature, exam_every, teacher_lr, seeds
    (["rte"], [1, 2], [1, 5], [1e-6, 1e-5], [1, 2]),
    (["rte", "sst2", "cola"], [4], [1, 5, 10], [1e-5], [1]),
    (["mrpc", "stsb"], [1, 2, 4, 8], [1, 5, 10], [1e-6, 5e-6, 1e-5], [1, 2, 3]),
]


@pytest.mark.parametrize("tasks,T,E,lr,seeds", GRIDS)
def test_grid_trial_count(tasks, T, E, lr, seeds):
    trials = expand_trials(sweep(tasks, temperature=T, exam_every=E, teacher_lr=lr, seeds=seeds))
    assert len(trials) == len(tasks) * len(seeds) * (1 + len(T) + len(T) * len(E) * len(lr))
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    assert len(
        {(t.task, t.method, t.seed, t.temperature, t.exam_every, t.teacher_lr) for t in trials}
    ) == len(trials)


def test_grid_trials_carry_only_their_methods_hyperparameters():
    trials = expand_trials(sweep())
    by_method = {m: [t for t in trials if t.method == m] for m in ("finetune", "kd", "ikd")}
    assert len(by_method["finetune"]) == 2  # one per seed
    for t in by_method["finetune"]:
        assert (t.temperature, t.exam_every, t.teacher_lr) == (None, None, None)
        assert t.trial_id == f"rte-finetune-s{t.seed}"
    assert {(t.temperature, t.seed) for t in by_method["kd"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for t in by_method["kd"]:
        assert t.temperature is not None and t.exam_every is None and t.teacher_lr is None
    assert {(t.temperature, t.exam_every, t.teacher_lr) for t in by_method["ikd"]} == {
        (T, E, lr) for T in (1, 2) for E in (1, 5) for lr in (1e-6, 1e-5)
    }
    assert {t.seed for t in by_method["ikd"]} == {1, 2}


@pytest.mark.parametrize(
    "methods,per_task_seed",
    [
        (["finetune"], 1),
        (["kd"], 2),
        (["ikd"], 8),
        (["finetune", "ikd"], 9),
        (["kd", "ikd"], 10),
    ],
)
def test_method_subsets(methods, per_task_seed):
    trials = expand_trials(sweep(tasks=("rte", "cola"), methods=methods))
    assert len(trials) == 2 * 2 * per_task_seed
    assert {t.method for t in trials} == set(methods)


def test_duplicate_values_are_rejected():
    with pytest.raises(ValueError, match="distinct"):
        sweep(temperature=(2, 2))
    with pytest.raises(ValueError, match="distinct"):
        sweep(methods=("kd", "kd"))
    with pytest.raises(ValueError, match="distinct"):
        sweep(tasks=("rte", "rte"))


RANDOM = dict(tasks=("rte", "sst2"), temperature=(1, 8), exam_every=(1, 10),
              teacher_lr=(1e-6, 1e-4), seeds=(1, 2, 3), algorithm="random", num_samples=5)


def test_random_search():
    cfg = sweep(**RANDOM)
    trials = expand_trials(cfg)
    for task in ("rte", "sst2"):
        ft = [t for t in trials if t.task == task and t.method == "finetune"]
        assert sorted(t.seed for t in ft) == [1, 2, 3]
        for method in ("kd", "ikd"):
            ts = [t for t in trials if t.task == task and t.method == method]
            points = {(t.temperature, t.exam_every, t.teacher_lr) for t in ts}
            assert len(points) == 5
            for p in points:  # every point runs with every seed
                assert sorted(
                    t.seed for t in ts if (t.temperature, t.exam_every, t.teacher_lr) == p
                ) == [1, 2, 3]
            for t in ts:
                assert 1 <= t.temperature <= 8
                if method == "kd":
                    assert t.exam_every is None and t.teacher_lr is None
                else:
                    assert isinstance(t.exam_every, int) and 1 <= t.exam_every <= 10
                    assert 1e-6 <= t.teacher_lr <= 1e-4
    assert len(trials) == 2 * 3 * (1 + 5 + 5)
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    # The draw is seeded by the sweep: the same file expands the same way every time.
    assert expand_trials(cfg) == trials
    again = sweep(**RANDOM)
    assert expand_trials(again) == trials


def test_teacher_lr_zero_is_the_ikd_control():
    grid = expand_trials(sweep(methods=("ikd",), temperature=(2,), exam_every=(5,),
                               teacher_lr=(0, 1e-5), seeds=(1,)))
    assert [(t.teacher_lr, t.trial_id) for t in grid] == [
        (0, "rte-ikd-s1-T2-E5-tlr0"), (1e-5, "rte-ikd-s1-T2-E5-tlr1e-05")]
    # random search: log-uniform over the positive values, and a control twin of every draw
    drawn = expand_trials(sweep(methods=("ikd",), teacher_lr=(0, 1e-6, 1e-4), seeds=(1,),
                                algorithm="random", num_samples=6))
    moving = {(t.temperature, t.exam_every) for t in drawn if t.teacher_lr > 0}
    control = {(t.temperature, t.exam_every) for t in drawn if t.teacher_lr == 0}
    assert len(drawn) == 12 and moving == control and len(moving) == 6
    assert all(1e-6 <= t.teacher_lr <= 1e-4 for t in drawn if t.teacher_lr > 0)
    # a sweep without 0 draws exactly as before the control existed
    plain = expand_trials(sweep(methods=("ikd",), algorithm="random", num_samples=3))
    assert len(plain) == 3 * 2 and all(t.teacher_lr > 0 for t in plain)


def test_random_teacher_lr_spans_orders_of_magnitude():
    cfg = sweep(
        methods=("ikd",), teacher_lr=(1e-7, 1e-3), seeds=(1,), algorithm="random", num_samples=40
    )
    logs = [math.log10(t.teacher_lr) for t in expand_trials(cfg)]
    # log-uniform: draws fall in both the lower and the upper half of the exponent range
    assert min(logs) < -5 < max(logs)


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_parses_values_as_yaml():
    got = parse_overrides(
        [
            "train.epochs=1",
            "search.seeds=[7, 8]",
            "data.source = glue_dir",
            "train.lr=1.0e-3",
            "name=a=b",
        ]
    )
    assert got == {
        "train.epochs": 1,
        "search.seeds": [7, 8],
        "data.source": "glue_dir",
        "train.lr": 1e-3,
        "name": "a=b",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["train.epochs"])


def test_overrides_apply_to_the_file(tmp_path):
    path = write_sweep(tmp_path)
    cfg = load_sweep(
        path,
        parse_overrides(
            ["train.lr=1.0e-3", "search.seeds=[7]", "methods=[kd]", "tracking.experiment=x"]
        ),
    )
    assert cfg.train.lr == 1e-3
    assert cfg.train.epochs == 1  # untouched neighbours stay
    assert cfg.search.seeds == [7]
    assert cfg.experiment == "x"
    assert len(expand_trials(cfg)) == 2 * 1 * 2  # 2 tasks x 1 seed x 2 temperatures


def test_overrides_are_validated(tmp_path):
    path = write_sweep(tmp_path)
    (error,) = errors_of(path, parse_overrides(["train.lr=-1"]))
    assert f"{path}:14: train.lr:" in error and "greater than 0" in error
    (error,) = errors_of(path, parse_overrides(["data.quiz_fraction=0.9"]))
    assert "data.quiz_fraction" in error
    (error,) = errors_of(path, parse_overrides(["train.nonsense=1"]))
    assert "train.nonsense: unknown key" in error
    (error,) = errors_of(path, parse_overrides(["tasks=[rte, nope]"]))
    assert "nope" in error
    with pytest.raises(ValueError, match="not a section"):
        load_sweep(path, parse_overrides(["data.source.x=1"]))


# ----------------------------------------------------------------------------- one trial


def test_confirm_trials_rerun_a_selected_setting_on_the_fresh_seeds():
    cfg = sweep(confirm_seeds=[11, 12])
    # A row of the report's selection: NaN where the method does not use a hyperparameter.
    kd = confirm_trials(cfg, "rte", "kd", {"temperature": 2.0, "exam_every": math.nan,
                                           "teacher_lr": math.nan})
    assert kd == [Trial("rte", "kd", 11, 2.0, phase="confirm"),
                  Trial("rte", "kd", 12, 2.0, phase="confirm")]
    (ikd, _) = confirm_trials(cfg, "rte", "ikd", {"temperature": 1.0, "exam_every": 5.0,
                                                  "teacher_lr": 1e-5})
    assert ikd.exam_every == 5 and isinstance(ikd.exam_every, int)
    assert ikd.trial_id == "rte-ikd-s11-T1-E5-tlr1e-05" and ikd.phase == "confirm"
    assert Trial.from_dict(ikd.to_dict()) == ikd  # what a Ray worker gets back
    # Same id scheme as the search, and no clash with it (fresh seeds).
    assert not {t.trial_id for t in kd} & {t.trial_id for t in expand_trials(cfg)}
    assert all(t.phase == "search" for t in expand_trials(cfg))
    with pytest.raises(ValueError, match="ikd needs teacher_lr"):
        confirm_trials(cfg, "rte", "ikd", {"temperature": 1.0, "exam_every": 5})
    assert confirm_trials(sweep(), "rte", "kd", {"temperature": 2.0}) == []  # none configured


def test_every_trial_uses_exactly_its_methods_hyperparameters():
    cfg = sweep(confirm_seeds=[9])
    trials = expand_trials(cfg) + [
        t for m in ("finetune", "kd", "ikd")
        for t in confirm_trials(cfg, "rte", m, {"temperature": 2, "exam_every": 1,
                                                "teacher_lr": 1e-6})]
    for t in trials:
        used = {h for h in ("temperature", "exam_every", "teacher_lr")
                if getattr(t, h) is not None}
        assert used == set(METHOD_HPARAMS[t.method]), t


def test_pick_trial_defaults_to_the_first_values_and_rejects_what_does_not_apply():
    cfg = sweep()
    assert pick_trial(cfg, "rte", "finetune") == Trial("rte", "finetune", 1)
    assert pick_trial(cfg, "rte", "kd", 2) == Trial("rte", "kd", 2, 1.0)
    assert pick_trial(cfg, "rte", "ikd", teacher_lr=3e-6) == Trial("rte", "ikd", 1, 1.0, 1, 3e-6)
    with pytest.raises(PickError, match="task 'cola' is not in the sweep") as e:
        pick_trial(cfg, "cola", "kd")
    assert e.value.option == "--task"
    with pytest.raises(PickError, match="finetune, kd, ikd") as e:
        pick_trial(cfg, "rte", "distil")
    assert e.value.option == "--method"
    with pytest.raises(PickError, match="kd does not use exam_every") as e:
        pick_trial(cfg, "rte", "kd", exam_every=5)
    assert e.value.option == "--exam-every"


def test_trial_seed_is_seed_base_plus_seed_for_trials_and_teachers():
    cfg = SweepConfig.model_validate({**sweep().model_dump(), "train": {"seed_base": 100}})
    assert trial_seed(cfg, Trial("rte", "kd", 3, 2.0)) == 103
    assert trial_seed(cfg, 3) == 103  # the teacher of seed 3 splits the data the same way


def test_holes_a_lax_schema_let_through_are_errors(tmp_path):
    """Infinite numbers, booleans or floats for ints, duplicate keys and out-of-range seeds
    were accepted silently (last key wins, `true` taken as 1, `.inf` trains to NaN)."""
    path = write_sweep(tmp_path, append=["data:", "  quiz_parity: true"])
    # last-wins would drop data.source silently: both lines are named instead
    assert errors_of(path) == [f"{path}:25: data: duplicate key (first at line 4); keep one"]
    path = write_sweep(tmp_path, {14: "  lr: .inf", 15: "  epochs: .nan",
                                  24: "  seeds: [-5, 1.0e+20]"},
                       append=["  confirm_seeds: [4294967296]", "  algorithm: grid"])
    errors = "\n".join(errors_of(path, {"train.max_steps": True, "data.quiz_parity": 1}))
    for where, msg in [(14, "train.lr: Input should be a finite number"),
                       (15, "train.epochs: Input should be a finite number"),
                       (24, "search.seeds.0: Input should be greater than or equal to 0"),
                       (24, "search.seeds.1: Input should be a valid integer"),
                       (25, "search.confirm_seeds.0: Input should be less than 4294967296"),
                       (13, "train.max_steps: Input should be a valid integer"),
                       (4, "data.quiz_parity: Input should be a valid boolean")]:
        assert f"{path}:{where}: {msg}" in errors, errors


def test_cli_values_obey_the_file_rules():
    assert check_search_value("temperature", "2") == 2.0  # a flag's text, as the file's
    for name, value, msg in [("exam_every", 0, "greater than 0"),
                             ("exam_every", True, "valid integer"),
                             ("temperature", float("inf"), "finite number"),
                             ("teacher_lr", -1.0, "greater than or equal to 0"),
                             ("seeds", 2**32, "less than 4294967296")]:
        with pytest.raises(ValueError, match=msg):
            check_search_value(name, value)


def test_a_broken_override_names_itself():
    with pytest.raises(ConfigError) as exc:
        parse_overrides(["train.lr=[1"])
    assert exc.value.path == "--set 'train.lr=[1'" and exc.value.what == "invalid override"
    assert "not valid YAML" in exc.value.errors[0]


def test_a_binary_file_is_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"name: t\n\xff\xfe\x00\x01")
    assert errors_of(path) == [f"{path}:2: not a text (UTF-8) file: byte 0xff at offset 8; a "
                               "sweep file is YAML text"]


@pytest.mark.parametrize("gpu", ["0", "1", "2", "0.5", "0.25", "0.125"])
def test_gpus_per_trial_pack_whole_cards(tmp_path, gpu):
    cfg = load_sweep(write_sweep(tmp_path, append=["resources:", f"  gpu: {gpu}"]))
    assert cfg.resources.gpu == float(gpu)


@pytest.mark.parametrize("gpu", ["0.3", "0.6", "1.5"])
def test_gpus_per_trial_that_do_not_divide_a_card_are_refused_with_the_reason(tmp_path, gpu):
    path = write_sweep(tmp_path, append=["resources:", "  cpu: 1", f"  gpu: {gpu}"])  # line 27
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:27: resources.gpu: {gpu} GPUs per trial"), error
    assert "a fraction that divides 1 (1, 0.5, 0.25, 0.125" in error and "ray#5902" in error


def test_validate_accepts_a_quarter_gpu_and_refuses_0_3(tmp_path):
    from typer.testing import CliRunner

    from ikd_sweep.cli import app

    runner = CliRunner()
    good = write_sweep(tmp_path, append=["resources: {cpu: 1, gpu: 0.25}"], name="good.yaml")
    result = runner.invoke(app, ["validate", str(good)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    bad = write_sweep(tmp_path, append=["resources: {cpu: 1, gpu: 0.3}"], name="bad.yaml")
    result = runner.invoke(app, ["validate", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert f"{bad}:25: resources.gpu: 0.3 GPUs per trial" in " ".join(result.output.split())

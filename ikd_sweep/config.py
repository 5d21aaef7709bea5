"""Sweep files: the pydantic schema and YAML loading with line numbers.

A sweep file names tasks, methods, shared training settings and a search space. `load_sweep`
validates it and raises `ConfigError` whose lines name the file, the line, the field path and
what would be valid; a combination that cannot run (`first_order` on a regression task) is
rejected here, before anything starts. Trials and their expansion live in `ikd_sweep.trials`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ikd_sweep.errors import UserError
from ikd_sweep.names import METHODS
from ikd_sweep.tasks import TASKS

PositiveFloat = Annotated[float, Field(gt=0)]
# Strict ints: `max_steps: true` or `epochs_int: 2.5` is a mistake, not 1 or 2. Floats stay lax
# because YAML 1.1 reads `1e-5` as a string.
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# numpy, torch and scikit-learn take seeds in [0, 2**32).
SEED_LIMIT = 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, strict=True)]


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `nan` would train to NaN instead of failing here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(_Strict):
    source: Literal["hub", "glue_dir", "package"] = "hub"
    glue_dir: Path | None = None
    max_length: PositiveInt = 128
    quiz_fraction: float = Field(0.1, gt=0, le=0.5)
    # Selection data (checkpoints, settings) carved out of train; GLUE dev is only reported.
    val_fraction: float = Field(0.1, gt=0, le=0.5)
    # True: finetune/kd train on train - val (quiz rows included), ikd on train - val - quiz,
    # so every method sees the same labelled rows. False: every method trains on
    # train - val - quiz (the pre-protocol behaviour).
    quiz_parity: StrictBool = True
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None

    @model_validator(mode="after")
    def _glue_dir_needed(self) -> DataConfig:
        if self.source == "glue_dir" and self.glue_dir is None:
            raise ValueError("data.source 'glue_dir' needs data.glue_dir "
                             "(a folder with CoLA/, RTE/, …)")
        if self.quiz_fraction + self.val_fraction >= 0.9:
            raise ValueError(f"data.quiz_fraction + data.val_fraction is "
                             f"{self.quiz_fraction + self.val_fraction:g}; it must stay below "
                             "0.9 so that training rows remain")
        return self


class ModelConfig(_Strict):
    """A model: hub id, local path or `minilm` (the packaged all-MiniLM-L6-v2).

    `num_layers` keeps the first N layers of the pretrained model; `init: random` builds the
    architecture from its config with fresh weights; `config` overrides config fields (e.g. a
    tiny `{hidden_size: 64, num_hidden_layers: 2}` for tests).
    """

    model: str
    num_layers: PositiveInt | None = None
    init: Literal["pretrained", "random"] = "pretrained"
    config: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(ModelConfig):
    epochs: PositiveFloat = 3
    lr: PositiveFloat = 2e-5
    batch_size: PositiveInt = 32


class TrainConfig(_Strict):
    epochs: PositiveFloat = 3
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    lr: PositiveFloat = 5e-5
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    hidden_weight: float = Field(0.0, ge=0)
    eval_every: PositiveInt | None = None
    log_every: PositiveInt = 10
    max_steps: PositiveInt | None = None
    seed_base: int = Field(0, ge=0, lt=SEED_LIMIT, strict=True)
    # torch.compile the course-step forwards on CUDA (ignored, with a message, on CPU).
    compile: StrictBool = False


class IkdConfig(_Strict):
    estimator: Literal["exact", "finite_difference", "first_order"] = "finite_difference"
    lookahead_lr: PositiveFloat = 5e-5
    teacher_ce_weight: float = Field(0.0, ge=0)
    fd_epsilon: PositiveFloat = 0.01
    # sgd: one plain SGD step of lookahead_lr (MetaDistil's pilot step); adam: one step of the
    # student's own AdamW from its current state, second moment held constant (DESIGN.md).
    lookahead: Literal["sgd", "adam"] = "sgd"
    # student_first: real student step, then the exam judges it and the teacher steps;
    # teacher_first: exam -> teacher step -> real student step on the updated teacher (MetaDistil).
    order: Literal["student_first", "teacher_first"] = "student_first"
    teacher_schedule: Literal["constant", "linear"] = "constant"


class SearchConfig(_Strict):
    temperature: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    exam_every: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 10])
    # 0 is the control: ikd through the same code path with a teacher that never moves.
    teacher_lr: list[NonNegativeFloat] = Field(default_factory=lambda: [1e-6, 5e-6, 1e-5])
    seeds: list[Seed] = Field(default_factory=lambda: [1, 2, 3])
    # Fresh seeds on which each method's selected setting is re-run after the search; the
    # headline table uses these runs when they exist. Must not overlap `seeds`.
    confirm_seeds: list[Seed] = Field(default_factory=list)
    # grid: every combination. random: num_samples points per (task, method) drawn from the
    # ranges the lists span (log-uniform over the positive teacher_lr values; a listed 0 adds
    # a teacher_lr 0 control twin of every drawn ikd point), each run with every seed.
    # optuna: Optuna's TPE proposes num_samples settings per (task, method) in those ranges,
    # each run on every seed, learning from the mean sel/val_main over seeds; a listed
    # teacher_lr 0 gets its own search (ikd-control: temperature, exam_every), same budget.
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: PositiveInt = 1
    scheduler: Literal["none", "asha"] = "none"

    @field_validator("temperature", "exam_every", "teacher_lr", "seeds")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("must list at least one value")
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        return v

    @field_validator("confirm_seeds")
    @classmethod
    def _distinct_confirm(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _fresh_confirm_seeds(self) -> SearchConfig:
        reused = sorted(set(self.confirm_seeds) & set(self.seeds))
        if reused:
            raise ValueError(f"search.confirm_seeds must be fresh seeds; {reused} also in "
                             "search.seeds")
        return self

    @model_validator(mode="after")
    def _optuna_without_asha(self) -> SearchConfig:
        if self.algorithm == "optuna" and self.scheduler == "asha":
            # The searcher learns a setting's mean over its seeds' sel/val_main, which a
            # trial stopped early does not have.
            raise PydanticCustomError(
                "optuna_asha",
                "scheduler asha cannot be combined with algorithm optuna (the searcher needs "
                "every seed's final sel/val_main); use scheduler: none, or algorithm grid or "
                "random with asha", {"field": "search.scheduler"})
        return self


class Resources(_Strict):
    cpu: PositiveFloat = 1
    # GPUs per trial: 0 (CPU trials), whole GPUs, or 1/n of one (n trials share a card).
    gpu: float = Field(0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _packs_whole(cls, v: float) -> float:
        # Ray places a fractional trial on one card and never splits it across two, so a
        # fraction that does not divide 1 leaves the rest of each card idle (0.3: three trials
        # and 0.1 unused), and its rounding can overcommit a card (ray#5902); above 1 Ray takes
        # whole GPUs only.
        n = round(1 / v) if 0 < v < 1 else 0
        if v > 1 and v != int(v) or 0 < v < 1 and abs(n * v - 1) > 1e-6:
            raise PydanticCustomError(
                "gpu_packing",
                "{v} GPUs per trial: use 0, a whole number, or a fraction that divides 1 "
                "(1, 0.5, 0.25, 0.125: 1, 2, 4, 8 trials per GPU); Ray keeps a trial on one "
                "card, so other fractions leave part of each card idle or overcommit it "
                "(ray#5902)", {"v": f"{v:g}"})
        return v


class TrackingConfig(_Strict):
    uri: str | None = None
    experiment: str | None = None


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    tasks: list[str] = Field(min_length=1)
    methods: list[Literal[METHODS]] = Field(min_length=1)  # type: ignore[valid-type]
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig
    student: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    ikd: IkdConfig = Field(default_factory=IkdConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: PositiveInt | None = None
    max_failures: int = Field(1, ge=0, strict=True)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known tasks: {', '.join(TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must be distinct, got {v}")
        return v

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _runnable_estimator(self) -> SweepConfig:
        regression = [t for t in self.tasks if TASKS[t].is_regression]
        if "ikd" in self.methods and self.ikd.estimator == "first_order" and regression:
            # ctx.field: the error is reported at ikd.estimator, not at the top level.
            raise PydanticCustomError(
                "first_order_regression",
                "first_order needs class pseudo-labels, but {tasks} is a regression task; "
                "use exact or finite_difference (or drop the regression tasks)",
                {"field": "ikd.estimator", "tasks": ", ".join(regression)})
        return self

    @model_validator(mode="after")
    def _seeds_in_range(self) -> SweepConfig:
        # A trial trains with seed_base + seed (trials.trial_seed): that sum must be a valid seed.
        top = self.train.seed_base + max([*self.search.seeds, *self.search.confirm_seeds])
        if top >= SEED_LIMIT:
            raise PydanticCustomError(
                "seed_range", "train.seed_base + seed is {top}; it must stay below 2**32",
                {"field": "train.seed_base", "top": top})
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


# ----------------------------------------------------------------------------- loading


class ConfigError(UserError):
    """A sweep file that does not validate; `errors` holds one readable line per problem."""

    def __init__(self, path: str | Path, errors: list[str], what: str = "invalid sweep file"):
        self.path = str(path)
        self.errors = errors
        self.what = what
        super().__init__(f"{path}: {what}\n" + "\n".join(f"  {e}" for e in errors))

    def __reduce__(self):  # picklable across Ray processes despite the extra arguments
        return (type(self), (self.path, self.errors, self.what))


def check_search_value(name: str, value: Any) -> Any:
    """One value for `search.<name>` given elsewhere (a CLI flag of `ikd-sweep train`), checked
    by the rules of the sweep file; raises ValueError with pydantic's reason."""
    field = SearchConfig.model_fields[name]
    adapter = TypeAdapter(field.annotation, config=ConfigDict(allow_inf_nan=False))
    try:
        return adapter.validate_python([value])[0]
    except ValidationError as e:
        raise ValueError("; ".join(err["msg"] for err in e.errors())) from None


def _duplicate_keys(node: yaml.Node | None, path: Path) -> list[str]:
    """Keys given twice in one mapping: YAML keeps the last silently, which hides a typo."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if k.value in first:
                found.append(f"{path}:{line}: {k.value}: duplicate key (first at line "
                             f"{first[k.value]}); keep one")
            else:
                first[k.value] = line
            found += _duplicate_keys(v, path)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            found += _duplicate_keys(v, path)
    return found


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each field path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, k.value)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = (*prefix, i)
            lines[path] = v.start_mark.line + 1
            lines.update(_key_lines(v, path))
    return lines


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    d = raw
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {p} is not a section")
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (value parsed as YAML) into a dict of dotted keys."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}", [
                f"the value {v!r} is not valid YAML ({getattr(e, 'problem', None) or e}); "
                "quote it, e.g. --set 'train.lr=1e-4' or --set 'search.seeds=[1, 2]'"],
                what="invalid override") from None
    return out


def _format_error(err: dict, lines: dict[tuple, int], path: str) -> str:
    field_ = (err.get("ctx") or {}).get("field")  # a cross-field check names its own field
    loc = tuple(field_.split(".")) if field_ else tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for n in range(len(loc), -1, -1):  # nearest enclosing key that exists in the file
        if loc[:n] in lines:
            line = lines[loc[:n]]
            break
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
        parent = loc[:-1]
        model = _model_at(parent)
        if model is not None:
            msg += f"; valid keys here: {', '.join(model.model_fields)}"
    elif err["type"] == "missing":
        msg = "required field is missing"
    where = f"{path}:{line}" if line else path
    return f"{where}: {field}: {msg}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = SweepConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; raise ConfigError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, [f"cannot read the file: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(path, [f"{path}:{line}: not a text (UTF-8) file: byte "
                                 f"0x{e.object[e.start]:02x} at offset {e.start}; a sweep file "
                                 "is YAML text"]) from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(path, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if dup := _duplicate_keys(node, path):
        raise ConfigError(path, dup)
    if not isinstance(raw, dict):
        raise ConfigError(path, [f"{path}: the top level must be a mapping of keys "
                                 "(name, tasks, …)"])
    lines = _key_lines(node) if node is not None else {}
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as e:
        errors = [_format_error(err, lines, str(path)) for err in e.errors()]
        raise ConfigError(path, errors) from None
    if cfg.data.glue_dir is not None and not cfg.data.glue_dir.is_absolute():
        # Relative glue_dir is relative to the sweep file, so a sweep runs from any folder.
        cfg.data.glue_dir = (path.parent / cfg.data.glue_dir).resolve()
    return cfg

"""`ikd-sweep validate`: trial counts of the shipped sweeps, exit 2 and readable errors."""

from __future__ import annotations

import pytest
from helpers import ROOT
from typer.testing import CliRunner

from ikd_sweep.cli import app

runner = CliRunner()


def validate(*args: str):
    # A wide terminal so rich does not wrap the lines we look for.
    return runner.invoke(app, ["validate", *map(str, args)], env={"COLUMNS": "200"})


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("sweep,trials", [("glue.yaml", 984), ("demo.yaml", 5)])
def test_shipped_sweeps_validate(sweep, trials):
    path = ROOT / "sweeps" / sweep
    result = validate(path)
    assert result.exit_code == 0, result.output
    assert f"{path}: valid, {trials} trials" in flat(result.stdout)


def test_glue_sweep_breakdown():
    result = validate(ROOT / "sweeps" / "glue.yaml")
    out = result.stdout
    # 8 tasks x 3 seeds: finetune 1 point, kd 4 temperatures, ikd 4 x 3 x 3 points.
    assert out.count("finetune") == 8
    rows = [line for line in out.splitlines() if " ikd " in line]
    assert len(rows) == 8 and all(" 108 " in r for r in rows)
    rows = [line for line in out.splitlines() if " kd " in line]
    assert len(rows) == 8 and all(" 12 " in r for r in rows)


def test_set_override_changes_the_count():
    path = ROOT / "sweeps" / "demo.yaml"
    result = validate(path, "--set", "search.seeds=[1]", "--set", "search.temperature=[1, 2, 4]")
    assert result.exit_code == 0, result.output
    # 1 seed x (1 + 3 + 3*1*1)
    assert f"{path}: valid, 7 trials" in flat(result.stdout)


def test_bad_override_exits_2():
    path = ROOT / "sweeps" / "demo.yaml"
    result = validate(path, "--set", "train.lr=0")
    assert result.exit_code == 2
    assert "train.lr" in result.output and "greater than 0" in result.output
    result = validate(path, "--set", "train.lr")
    assert result.exit_code == 2
    assert "key=value" in result.output


def test_bad_file_exits_2_and_prints_every_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"  # 1
        "tasks: [rte, nope]\n"  # 2
        "methods: [kd, distil]\n"  # 3
        "teacher: {model: minilm}\n"  # 4
        "student:\n"  # 5
        "  model: minilm\n"  # 6
        "  colour: red\n"  # 7
        "search:\n"  # 8
        "  temperature: [0]\n"  # 9
    )
    result = validate(path)
    assert result.exit_code == 2
    assert result.stdout == ""
    out = result.output
    assert "invalid sweep file" in out
    assert f"{path}:2: tasks: " in out and "nope" in out and "known tasks" in out
    assert f"{path}:3: methods.1: " in out
    assert f"{path}:7: student.colour: unknown key; valid keys here: model" in out
    assert f"{path}:9: search.temperature.0: " in out


def test_invalid_yaml_exits_2_with_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntasks: [rte\nmethods: [kd]\n")
    result = validate(path)
    assert result.exit_code == 2
    assert f"{path}:3: not valid YAML" in result.output


def test_missing_file_exits_2(tmp_path):
    result = validate(tmp_path / "absent.yaml")
    assert result.exit_code == 2
    assert "cannot read" in result.output

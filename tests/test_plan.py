"""A sweep that compares methods ships with confirmation seeds, and says so when it does not."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ikd_sweep.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def test_glue_sweep_lists_its_confirmation_phase() -> None:
    result = runner.invoke(app, ["validate", str(REPO / "sweeps" / "glue.yaml")],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # 8 tasks x (finetune, kd, ikd) selected settings x 5 fresh seeds.
    assert ("confirmation phase: 120 trials, the selected setting of each (task, method) x 5 "
            "seeds [4, 5, 6, 7, 8]") in flat(result.stdout)
    assert "warning" not in result.output


def test_comparing_methods_without_confirmation_warns() -> None:
    glue = str(REPO / "sweeps" / "glue.yaml")
    for args in (["validate", glue], ["run", glue, "--dry-run"]):
        result = runner.invoke(app, [*args, "--set", "search.confirm_seeds=[]"],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "warning: compares methods without search.confirm_seeds" in flat(result.output)

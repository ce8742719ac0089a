"""The RDI-Nets / DeepSloth reproduction (eenet.robust.reproduce) end to end through the CLI,
on a tiny schedule (400 training digits, 3 epochs, 2-step training attack, 120 test
digits): the files it writes, and facts its tables must show on trained models: every
attack lowers accuracy, max-average is the strongest single-exit attack, the slowdown
attack raises the cost, and the budget guard bounds every batch's cost under it."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import pytest

from eenet import cli

pytest.importorskip("sklearn")

SMOKE = ["--epochs", "3", "--train-samples", "400", "--lr", "5e-3", "--train-steps", "2",
         "--test-samples", "120", "--eenet-epochs", "20", "--no-progress"]


class Run:
    """``eenet robust`` on the tiny schedule: its exit code, stdout and files."""

    def __init__(self, out: str) -> None:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            self.rc = cli.main(["robust", *SMOKE, "--out", out])
        self.stdout = stdout.getvalue()
        self.out = out
        with open(os.path.join(out, "robust.json")) as f:
            self.report: dict[str, Any] = json.load(f)
        with open(os.path.join(out, "robust.md")) as f:
            self.markdown = f.read()

    def rows(self, prefix: str = "") -> list[dict[str, Any]]:
        return [r for r in self.report["accuracy"] if r["name"].startswith(prefix)]

    def row(self, name: str) -> dict[str, Any]:
        (row,) = [r for r in self.report["accuracy"] if r["name"] == name]
        return row


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    yield Run(str(tmp_path_factory.mktemp("robust") / "out"))


def _singles(report: dict[str, Any]) -> list[str]:
    return [f for f in report["forms"] if f.startswith("single_")]


def test_writes_the_tables(run: Run) -> None:
    assert run.rc == 0
    assert run.markdown in run.stdout   # printed and written alike
    for title in ("## Accuracy and cost", "## Slowdown attack", "## Budget guard",
                  "## Verdict"):
        assert title in run.markdown
    names = [r["name"] for r in run.report["accuracy"]]
    assert names == ["RDI-Nets, uniform entropy", "RDI-Nets, EENet @ 50%",
                     *(f"RDI-Nets, exit {k} alone" for k in range(4)),
                     "PGD-AT single-exit baseline", "standard multi-exit, uniform entropy"]
    for name in names:
        assert f"| {name} |" in run.markdown
    assert run.report["forms"] == ["main", "single_0", "single_1", "single_2", "single_3",
                                   "average", "max_average"]
    assert "400 train / 359 val / 120 test" in run.markdown
    assert len(run.report["slowdown"]) == len(run.report["guard"]) == 6
    # every estimate is a mean inside its interval
    for row in run.report["accuracy"]:
        for est in [row["clean"], row["worst"], row["cost"],
                    *(a for a in row["attacks"].values() if a is not None)]:
            assert est["low"] <= est["value"] <= est["high"]


def test_costs(run: Run) -> None:
    """Exit k alone costs its cumulative cost, the baseline the backbone, the policies
    something in between the first and the last exit; heads make the full multi-exit path
    dearer than the backbone."""
    exits = run.report["exit_costs"]
    assert exits == sorted(exits) and exits[-1] > 1.0
    for k, c in enumerate(exits):
        assert run.row(f"RDI-Nets, exit {k} alone")["cost"]["value"] == pytest.approx(c)
    assert run.row("PGD-AT single-exit baseline")["cost"]["value"] == 1.0
    for row in run.rows("RDI-Nets, ")[:2] + run.rows("standard"):
        assert exits[0] < row["cost"]["value"] < exits[-1]
        assert set(row["attack_costs"]) == set(run.report["forms"])
        for cost in row["attack_costs"].values():
            assert exits[0] <= cost["value"] <= exits[-1]
    assert "## Cost per sample under each attack" in run.markdown


def test_every_attack_lowers_accuracy(run: Run) -> None:
    served = run.rows("RDI-Nets, ")[:2] + run.rows("standard") + run.rows("PGD-AT")
    for row in served:
        clean = row["clean"]["value"]
        assert clean > 0.3, f"{row['name']} is not trained: clean accuracy {clean}"
        for form, acc in row["attacks"].items():
            if acc is not None:
                assert acc["value"] < clean, (row["name"], form, acc, clean)
    for k in range(4):   # each exit under its own single-exit attack
        row = run.row(f"RDI-Nets, exit {k} alone")
        assert row["attacks"][f"single_{k}"]["value"] < row["clean"]["value"], row


def test_max_average_is_the_strongest_single_exit_attack(run: Run) -> None:
    """Per sample the max-average input has the largest summed loss over the exits of the
    single-exit attacks' inputs, so its mean is at least each one's (exact). In accuracy
    it is chosen by that loss, not by the exit the policy takes, so through a policy it
    need not be the lowest: it must not be significantly weaker than the strongest
    single-exit attack (the two bootstrap intervals overlap)."""
    singles = _singles(run.report)
    for model, losses in run.report["form_losses"].items():
        best = max(losses[f] for f in singles)
        assert losses["max_average"] >= best * (1 - 1e-6), (model, losses)
    for row in run.rows("RDI-Nets, ") + run.rows("standard"):
        strongest = min((row["attacks"][f] for f in singles), key=lambda a: a["value"])
        assert row["attacks"]["max_average"]["low"] <= strongest["high"], row


def test_slowdown_raises_the_cost(run: Run) -> None:
    for s in run.report["slowdown"]:
        assert s["cost_slow"]["value"] > s["cost_clean"]["high"], s
        assert 0.0 < s["erased"] <= 1.0, s


def test_guard_bounds_every_batch_under_the_slowdown_attack(run: Run) -> None:
    exit0 = run.report["exit_costs"][0]
    tested = 0
    for g in run.report["guard"]:
        assert g["bound"] == pytest.approx(max(g["limit"], exit0))
        assert len(g["batch_costs"]) == math.ceil(120 / 32)
        assert max(g["batch_costs"]) <= g["bound"] * (1 + 1e-9), g
        assert g["worst_guarded"] == pytest.approx(max(g["batch_costs"]))
        if g["worst_unguarded"] > g["bound"]:   # the attack broke the limit unguarded
            tested += 1
            assert g["forced_slow"]["value"] > 0, g
    assert tested >= 4, run.report["guard"]


@pytest.mark.parametrize(("argv", "match"), [
    (["--budget", "0"], "argument --budget: a budget is a fraction"),
    (["--epochs", "0"], "argument --epochs: expected a positive integer"),
    (["--lr", "nan"], "argument --lr: expected a positive number"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice"),
    (["--budget", "0.1"], "budget 0.1 of the backbone is below the cost of the first exit"),
])
def test_bad_arguments(argv: list[str], match: str, tmp_path: Any,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["robust", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eenet robust: error: ") and match in err, err
    assert "\n" not in err
    assert not (tmp_path / "o").exists()   # refused before anything was written


def test_output_folder_must_be_a_folder(tmp_path: Any, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    (tmp_path / "file").write_text("x")
    assert cli.main(["robust", "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_schedule_train_attack_needs_a_step() -> None:
    from eenet.robust.reproduce import Schedule

    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="train_steps must be an int >= 1"):
            Schedule(train_steps=bad).train_attack()
    assert Schedule(train_steps=2).train_attack().steps == 2

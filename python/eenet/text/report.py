"""The SST-2 run end to end (``eenet text``): train (or reuse the saved logits), evaluate
every policy at every budget, and write the tables (markdown and JSON) and the plot."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from ..budget import Costs
from ..demo import draw_accuracy_vs_cost, fit_policy
from ..policies import EENet, MaxProb
from ..runtime.timing import cpu_name
from ..saving import load_plain
from .evaluate import (
    TEXT_BUDGETS,
    Comparison,
    PolicyRow,
    compare,
    evaluate_policies,
    exit_accuracies,
    rows_to_dicts,
    score_aucs,
)
from .recipe import LOGITS_FILE, SplitLogits, SST2Config, run

__all__ = ["load_run", "reproduce"]


def _ladder(result: dict[str, Any]) -> str:
    flops = Costs.from_dict(result["costs_flops"])
    ms = Costs.from_dict(result["costs_ms"])
    after = [*result["config"]["exits_after"], "6"]
    lines = ["| exit (after layer) | dev accuracy | test accuracy | FLOPs (fraction) | "
             "latency (fraction) |", "|---|---|---|---|---|"]
    dev = exit_accuracies(SplitLogits.from_dict(result["dev"]))
    test = exit_accuracies(SplitLogits.from_dict(result["test"]))
    for k, layer in enumerate(after):
        lines.append(f"| {k} ({layer}) | {dev[k]:.3f} | {test[k]:.3f} | "
                     f"{flops.values[k] / flops.full:.3f} | {ms.values[k] / ms.full:.3f} |")
    return "\n".join(lines)


def _policy_table(rows: list[PolicyRow]) -> str:
    names = list(dict.fromkeys(r.policy for r in rows))
    head = "| budget | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for b in sorted({r.budget for r in rows}):
        cells = []
        for n in names:
            r = next(r for r in rows if r.budget == b and r.policy == n)
            cells.append(f"{r.accuracy:.3f} [{r.low:.3f}, {r.high:.3f}] cost {r.cost_flops:.2f}"
                         f" / {r.cost_ms:.2f}")
        lines.append(f"| {b:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _comparison_table(comps: list[Comparison]) -> str:
    lines = ["| budget | best heuristic | EENet - heuristic [95% CI] | P(diff <= 0) | EENet | "
             "headroom (full model - heuristic) |", "|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c.budget:.0%} | {c.heuristic} | {c.diff:+.3f} [{c.low:+.3f}, "
                     f"{c.high:+.3f}] | {c.p_le_0:.3f} | {c.verdict} | {c.headroom:+.3f} |")
    return "\n".join(lines)


def _auc_table(aucs: dict[str, list[float]]) -> str:
    names = list(aucs)
    lines = ["| exit | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in range(len(next(iter(aucs.values())))):
        lines.append(f"| {k} | " + " | ".join(f"{aucs[n][k]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def _plot(rows: list[PolicyRow], exits: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves = {name: [(r.cost_flops, r.accuracy, r.low, r.high) for r in rows
                     if r.policy == name] for name in dict.fromkeys(r.policy for r in rows)}
    draw_accuracy_vs_cost(ax, curves,
                          f"SST-2 test: accuracy vs achieved cost (MiniLM-L6, {exits} exits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_RUN_KEYS = ("dev", "test", "costs_flops", "costs_ms", "history", "train_seconds", "config")


def load_run(out: str) -> dict[str, Any]:
    """What :func:`eenet.text.recipe.run` saved in ``out`` (``<out>/sst2_logits.pt``), read
    as plain data (``torch.load(weights_only=True)``: no code in the file runs). Raises
    ``FileNotFoundError`` when there is no such file and ``ValueError`` when it is not one
    that ``run`` writes."""
    path = os.path.join(out, LOGITS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no earlier run to reuse in {out}: {path} does not exist "
                                "(run eenet text without --reuse first)")
    result = load_plain(path, "the logits file of an eenet text run")
    missing = ([k for k in _RUN_KEYS if k not in result] if isinstance(result, dict)
               else list(_RUN_KEYS))
    if missing:
        raise ValueError(f"{path} is not the logits file of an eenet text run (missing "
                         f"{', '.join(missing)})")
    for split in ("dev", "test"):
        d = result[split]
        ok = (isinstance(d, dict) and isinstance(d.get("logits"), list) and d["logits"]
              and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in d["logits"])
              and isinstance(d.get("labels"), torch.Tensor)
              and isinstance(d.get("lengths"), torch.Tensor))
        if not ok:
            raise ValueError(f"{path}: its {split} entry is not every exit's (N, C) logits "
                             "with labels and lengths")
    return result


def reproduce(cfg: SST2Config, report: str | None = None,
              budgets: tuple[float, ...] = TEXT_BUDGETS,
              resamples: int = 2000, eenet_options: dict[str, Any] | None = None,
              reuse: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the recipe (or, with ``reuse``, read ``<out>/sst2_logits.pt`` of an earlier
    run with :func:`load_run`, which raises when there is none), fit every policy on dev
    and evaluate on test at ``budgets``; writes ``report`` (default ``<out>/sst2.md``) with
    ``.json`` and ``.png`` beside it. Returns the JSON content: its ``threads``, ``cpu`` and
    ``torch`` are the run's (where it trained and timed the exits), ``report`` this
    evaluation's (``threads``, ``cpu``, ``torch``) and ``seconds`` its wall time."""
    start = time.perf_counter()
    result = load_run(cfg.out) if reuse else run(cfg, progress)
    dev, test = SplitLogits.from_dict(result["dev"]), SplitLogits.from_dict(result["test"])
    flops, ms = Costs.from_dict(result["costs_flops"]), Costs.from_dict(result["costs_ms"])
    rows, correct = evaluate_policies(dev, test, flops, ms, budgets, resamples=resamples,
                                      eenet_options=eenet_options)
    comps = compare(rows, correct, exit_accuracies(test)[-1], resamples=resamples)
    low = min(budgets)
    aucs = {"MaxProb": score_aucs(MaxProb([0.0] * len(test.logits)), test),
            f"EENet (fitted at {low:.0%})": score_aucs(
                fit_policy(EENet, dev.logits, dev.labels, flops, low, eenet_options), test)}
    report = report or os.path.join(cfg.out, "sst2.md")
    base = os.path.splitext(report)[0]
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    _plot(rows, len(test.logits), base + ".png")
    cfg_d = result["config"]
    # where the run trained and timed its costs (not recorded by older runs)
    trained_on = result.get("cpu", "an unrecorded CPU")
    trained_with = result.get("torch", "unrecorded")
    content = {"config": result["config"], "train_seconds": result["train_seconds"],
               "history": result["history"], "costs_flops": result["costs_flops"],
               "costs_ms": result["costs_ms"], "dev_exit_accuracy": exit_accuracies(dev),
               "test_exit_accuracy": exit_accuracies(test), "rows": rows_to_dicts(rows),
               "comparisons": rows_to_dicts(comps), "score_auc": aucs,
               "threads": cfg_d["threads"], "cpu": trained_on, "torch": trained_with,
               "seconds": time.perf_counter() - start,
               "report": {"threads": cfg.threads, "cpu": cpu_name(), "torch": torch.__version__}}
    with open(base + ".json", "w") as f:
        json.dump(content, f, indent=1)
    text = "\n".join([
        "# SST-2: every exit policy on a multi-exit all-MiniLM-L6-v2",
        "",
        f"Fine-tuned on {cfg_d['train_phrases'] or 'all'} train phrases, {cfg_d['epochs']} "
        f"epoch(s), batch {cfg_d['batch_size']}, Adam lr {cfg_d['lr']:g}, bfloat16 autocast "
        f"{'on' if cfg_d['autocast'] else 'off'}, word embeddings "
        f"{'frozen' if cfg_d['freeze_word_embeddings'] else 'trained'}, {cfg_d['head']}-pool "
        f"exit heads after layers {', '.join(map(str, cfg_d['exits_after']))} and 6; training "
        f"took {result['train_seconds'] / 60:.1f} min on {trained_on} with "
        f"{cfg_d['threads']} thread(s) (torch {trained_with}).",
        f"Policies are fitted on the dev sentences ({len(dev.labels)}) and evaluated on the "
        f"test sentences ({len(test.labels)}); budgets are fractions of the full model's "
        "FLOPs; the latency costs were measured at batch "
        f"{result['costs_ms']['meta'].get('batch_size')} on dev sentences of median length.",
        "",
        "## The exits",
        "",
        _ladder(result),
        "",
        "## Accuracy vs budget (test)",
        "",
        "Each cell: accuracy [95% bootstrap CI], achieved cost as a fraction of the full "
        "model in FLOPs / in measured latency.",
        "",
        _policy_table(rows),
        "",
        "## EENet vs the best heuristic (paired bootstrap on the test sentences)",
        "",
        _comparison_table(comps),
        "",
        "## How well each exit's score ranks that exit's right answers (test, AUC)",
        "",
        _auc_table(aucs),
        "",
        f"![accuracy vs cost]({os.path.basename(base)}.png)",
        "",
    ])
    with open(report, "w") as f:
        f.write(text)
    return content

"""``eenet`` command line: ``demo``, ``calibrate`` and ``report``.

    eenet demo [--datasets mnist digits] [--epochs 8] [--out demo_out]
    eenet calibrate --model M.pt --dataset mnist --policy EENet --budget 0.5 --out P.json
    eenet report --model M.pt --policy P.json --dataset mnist

``demo`` saves its trained models as ``<out>/<dataset>_model.pt``; ``calibrate`` fits a
policy on the validation split of the dataset the model was trained on; ``report`` serves
the test split with the runtime engine and prints accuracy, achieved cost and exit mix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import budget as budget_mod
from . import data, demo
from .policies import ExitPolicy, collect_exit_logits
from .runtime import MODES, Engine
from .saving import load_model, load_policy, save_policy


def _policy_class(name: str) -> type[ExitPolicy]:
    classes = {c.__name__.lower(): c for c in demo.POLICY_CLASSES}
    if name.lower() not in classes:
        raise SystemExit(f"eenet: unknown policy {name!r}; choose from "
                         f"{[c.__name__ for c in demo.POLICY_CLASSES]}")
    return classes[name.lower()]


def cmd_demo(args: argparse.Namespace) -> None:
    demo.main(tuple(args.datasets), epochs=args.epochs, seed=args.seed, out_dir=args.out,
              progress=not args.no_progress)


def cmd_calibrate(args: argparse.Namespace) -> None:
    net, meta = load_model(args.model)
    splits = data.load(args.dataset, seed=meta.get("seed", 0))
    example = splits.val[0][: args.batch]
    costs = (budget_mod.count_flops(net, example) if args.costs == "flops"
             else budget_mod.measure(net, example))
    logits, labels = collect_exit_logits(net, splits.loader("val", 256))
    policy = demo.fit_policy(_policy_class(args.policy), logits, labels, costs, args.budget)
    save_policy(policy, args.out, costs, args.budget, {"dataset": args.dataset})
    exit_index, _ = policy.decide(logits)
    r = budget_mod.report(costs, exit_index, args.budget)
    print(f"{policy}\nvalidation: achieved {r['achieved']:.4g} {costs.unit} for asked "
          f"{r['asked']:.4g} ({r['ratio']:.1%}); saved {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    net, meta = load_model(args.model)
    policy, costs, info = load_policy(args.policy, num_exits=net.num_exits)
    splits = data.load(args.dataset, seed=meta.get("seed", 0))
    x, y = splits.test
    out = Engine(net, policy, mode=args.mode)(x)
    acc = float((out.logits.argmax(1) == y).float().mean())
    low, high = demo.bootstrap_interval(out.logits.argmax(1) == y)
    counts = torch.bincount(out.exit_index, minlength=net.num_exits).tolist()
    achieved = costs.expected(out.exit_index)
    print(f"{policy} on {args.dataset} test ({len(y)} samples, mode {args.mode})")
    print(f"  accuracy {acc:.4f} [95% CI {low:.4f}, {high:.4f}]")
    print(f"  samples per exit {counts}")
    print(f"  achieved cost {achieved:.4g} {costs.unit} = {achieved / costs.full:.1%} of the "
          f"full model (asked {info.get('budget')})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eenet", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train, calibrate and serve multi-exit CNNs on digits")
    p.add_argument("--datasets", nargs="+", default=list(data.DATASETS), choices=data.DATASETS)
    p.add_argument("--epochs", type=int, default=demo.EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="fit a policy for a budget on a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True, choices=data.DATASETS)
    p.add_argument("--policy", default="EENet")
    p.add_argument("--budget", type=float, required=True,
                   help="average cost per sample as a fraction of the full model")
    p.add_argument("--costs", choices=("flops", "latency"), default="flops")
    p.add_argument("--batch", type=int, default=64, help="batch size the costs are taken at")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="serve the test split with a saved model and policy")
    p.add_argument("--model", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--dataset", required=True, choices=data.DATASETS)
    p.add_argument("--mode", choices=MODES, default="compact")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eenet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

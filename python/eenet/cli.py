"""``eenet`` command line: ``demo``, ``calibrate``, ``report``, ``robust``, ``text`` and ``serve``.

    eenet demo [--datasets mnist digits] [--epochs 8] [--out demo_out]
    eenet calibrate --model M.pt [--dataset mnist] --policy EENet --budget 0.5 --out P.json
    eenet report --model M.pt --policy P.json [--dataset mnist]
    eenet robust [--dataset digits] [--epochs 40] [--train-steps 5] [--out robust_out]
    eenet text [--data-dir DIR] [--train-phrases 20000] [--out text_out] [--report R.md]
    eenet serve M.pt P.json [--host 127.0.0.1] [--port 8000] [--ray] [--max-batch 64]

``demo`` saves its trained models as ``<out>/<dataset>_model.pt``; ``calibrate`` fits a
policy on the validation split of the dataset the model was trained on; ``report`` serves
the test split with the runtime engine and prints accuracy, achieved cost and exit mix;
``robust`` trains RDI-Nets, the PGD-trained single-exit baseline and a standard multi-exit
model, attacks and serves them (:mod:`eenet.robust.reproduce`) and writes the tables to
``<out>/robust.md``; ``text`` fine-tunes a multi-exit MiniLM on SST-2, fits every policy
on the dev sentences and evaluates it on the test sentences (:mod:`eenet.text.report`),
writing ``<out>/sst2.md`` (or ``--report``) with its JSON and plot; ``serve`` serves a
model with its policy over HTTP (``POST /v1/predict``, ``GET /v1/stats``, ``/healthz``,
``/metrics``) through the re-batching :class:`eenet.serving.ServingEngine`, with the plain
front-end of :mod:`eenet.serving.http` or, with ``--ray``, as a Ray Serve deployment on a
local Ray (:mod:`eenet.serving.ray_app`), until Ctrl-C.

Every argument is checked before any data is loaded or trained on, and the files are
checked against each other: a model trained on another dataset, a policy calibrated on
another dataset or for another model (its recorded weights' fingerprint or architecture, or
its FLOP costs, differ) is refused. Usage errors print one line, ``eenet <command>: error:
<what>``, and exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from . import budget as budget_mod
from . import data, demo
from .nn import MultiExitNetwork, architecture_of
from .policies import EENet, collect_exit_logits
from .runtime import MODES, Engine
from .saving import load_model, load_policy, model_mismatch, model_record, save_policy

POLICY_NAMES: tuple[str, ...] = tuple(c.__name__ for c in demo.POLICY_CLASSES)
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line or files that do not belong together (exit code 2); ``prog`` is
    the command it concerns when known (``eenet calibrate``)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` for options that have a default (not for required ones)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the CLI's format, raised instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


# -- argument types: each rejects a bad value at parse time, before any slow work ------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed >= 0, got {text!r}") from None
    if not 0 <= value < 2**63:  # (the splits' NumPy generator refuses negative seeds)
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, 2**63), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(
            f"a budget is a fraction of the full model's cost in (0, 1], got {value:g}")
    return value


def _budget_list(text: str) -> tuple[float, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated budgets, got {text!r}")
    return tuple(_fraction(p) for p in parts)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value:g}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (0: any free one), got "
                                         f"{value}")
    return value


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"expected a host name or address, got {text!r}")
    return text


def _policy_name(text: str) -> str:
    """The policy class name, matched case-insensitively (choices reject the rest)."""
    return {n.lower(): n for n in POLICY_NAMES}.get(text.lower(), text)


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        what = "is a directory" if os.path.isdir(text) else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}")
    return text


def _output_file(text: str) -> str:
    if not text.strip() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"expected a file name, got {text!r}")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {folder} is not writable")
    return text


def _report_file(text: str) -> str:
    """A file to write whose folder exists or can be made (it is made when written)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file name")
    _output_dir(os.path.dirname(os.path.abspath(text)))
    return text


def _output_dir(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = os.path.abspath(text)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is not a writable "
                                         "directory")
    return text


# -- checks of the files against each other and the dataset ----------------------------------


def _dataset_for(args: argparse.Namespace, meta: dict[str, Any]) -> str:
    """The dataset to run on: --dataset, else the one the model file records; a model
    trained on another dataset than --dataset is refused."""
    trained_on = meta.get("dataset")
    if args.dataset is None:
        if trained_on is None:
            raise UsageError(f"{args.model} does not record the dataset it was trained on: "
                             f"pass --dataset (one of {', '.join(data.DATASETS)})")
        if trained_on not in data.DATASETS:
            raise UsageError(f"{args.model} was trained on {trained_on!r}, which eenet cannot "
                             f"load (datasets: {', '.join(data.DATASETS)})")
        return str(trained_on)
    if trained_on is not None and trained_on != args.dataset:
        raise UsageError(f"{args.model} was trained on {trained_on!r}, not on "
                         f"{args.dataset!r}: pass --dataset {trained_on} (or leave it out)")
    return str(args.dataset)


def _check_inputs(net: MultiExitNetwork, splits: data.Splits, model_path: str) -> None:
    """The model takes the dataset's inputs (the image size a ``small_cnn`` was built for:
    it would run on any) and predicts its number of classes."""
    x = splits.val[0][:2]
    spec = architecture_of(net) or {}
    if spec.get("arch") == "small_cnn":
        config = spec.get("config") or {}
        built = (config.get("in_channels"), config.get("image_size"), config.get("image_size"))
        if None not in built and tuple(built) != tuple(x.shape[1:]):
            raise UsageError(f"{model_path} was built for images of shape {built}; "
                             f"{splits.name} has {tuple(x.shape[1:])}")
    try:
        with torch.no_grad():
            outs = net(x)
    except RuntimeError as exc:
        raise UsageError(f"{model_path} does not take {splits.name} inputs of shape "
                         f"{tuple(x.shape[1:])}: {str(exc).splitlines()[0]}") from exc
    if outs[0].shape[1] != splits.num_classes:
        raise UsageError(f"{model_path} predicts {outs[0].shape[1]} classes, {splits.name} has "
                         f"{splits.num_classes}")


def _check_policy(args: argparse.Namespace, info: dict[str, Any], dataset: str,
                  net: MultiExitNetwork) -> None:
    meta = info.get("meta") or {}
    if meta.get("dataset") is not None and meta["dataset"] != dataset:
        raise UsageError(f"{args.policy} was calibrated on {meta['dataset']!r}, not on "
                         f"{dataset!r}")
    why = model_mismatch(meta, net)
    if why is not None:
        raise UsageError(f"{args.policy} was calibrated for another model than {args.model} "
                         f"({why}; calibrated with {meta.get('model', 'another file')}): run "
                         "eenet calibrate on it")


def _check_costs(args: argparse.Namespace, costs: budget_mod.Costs, net: MultiExitNetwork,
                 x: torch.Tensor) -> None:
    """FLOP costs in the policy file must be this model's (latency ones cannot be
    recomputed exactly; the fingerprint covers them)."""
    if costs.unit != "flops":
        return
    ours = budget_mod.count_flops(net, x).values
    if any(abs(a - b) > 1e-6 * max(abs(a), abs(b)) for a, b in zip(costs.values, ours,
                                                                   strict=True)):
        raise UsageError(f"{args.policy}'s costs ({', '.join(f'{v:.4g}' for v in costs.values)} "
                         f"FLOPs per exit) are not {args.model}'s "
                         f"({', '.join(f'{v:.4g}' for v in ours)}): the policy belongs to "
                         "another model; run eenet calibrate on this one")


# -- commands --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    demo.main(tuple(args.datasets), epochs=args.epochs, seed=args.seed, out_dir=args.out,
              progress=not args.no_progress)


def cmd_text(args: argparse.Namespace) -> None:
    from .text import data as text_data
    from .text.recipe import SST2Config
    from .text.report import load_run, reproduce

    try:
        if args.reuse:  # evaluates saved logits: neither the data nor MiniLM is read
            load_run(args.out)
        else:  # a missing folder fails before training
            text_data.split_path("dev", args.data_dir)
            text_data.minilm_path()
    except FileNotFoundError as exc:
        raise UsageError(str(exc), prog="eenet text") from None
    cfg = SST2Config(data_dir=args.data_dir, out=args.out, train_phrases=args.train_phrases,
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     threads=args.threads, seed=args.seed, dev_limit=args.dev_limit,
                     test_limit=args.test_limit)
    options = {"epochs": args.eenet_epochs} if args.eenet_epochs else None
    content = reproduce(cfg, args.report, budgets=args.budgets, resamples=args.resamples,
                        eenet_options=options,
                        reuse=args.reuse, progress=not args.quiet)
    report = args.report or os.path.join(args.out, "sst2.md")
    print(f"SST-2 test accuracy per exit: "
          f"{', '.join(f'{a:.3f}' for a in content['test_exit_accuracy'])}")
    for c in content["comparisons"]:
        print(f"budget {c['budget']:.0%}: EENet - {c['heuristic']} = {c['diff']:+.3f} "
              f"[{c['low']:+.3f}, {c['high']:+.3f}] ({c['verdict']})")
    print(f"report: {os.path.abspath(report)} ({content['seconds'] / 60:.1f} min)")


def cmd_robust(args: argparse.Namespace) -> None:
    from .robust import reproduce

    schedule = reproduce.Schedule(
        dataset=args.dataset, epochs=args.epochs, std_epochs=args.std_epochs or args.epochs,
        train_steps=args.train_steps, lr=args.lr, budget=args.budget,
        serve_batch=args.batch, train_samples=args.train_samples,
        test_samples=args.test_samples, seed=args.seed,
        eenet_options={"epochs": args.eenet_epochs})
    reproduce.run(schedule, out_dir=args.out, progress=not args.no_progress)


def cmd_calibrate(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and os.path.samefile(args.out, args.model):
        raise UsageError(f"--out {args.out} is the model file: the policy would replace it; "
                         "name another file")
    net, meta = load_model(args.model)
    dataset = _dataset_for(args, meta)
    data.require_dataset(dataset)
    splits = data.load(dataset, seed=meta.get("seed", 0))
    _check_inputs(net, splits, args.model)
    example = splits.val[0][: args.batch]
    costs = (budget_mod.count_flops(net, example) if args.costs == "flops"
             else budget_mod.measure(net, example))
    budget_mod.as_budget(args.budget).absolute(costs)  # reachable? before the fit
    logits, labels = collect_exit_logits(net, splits.loader("val", 256))
    cls = {c.__name__: c for c in demo.POLICY_CLASSES}[args.policy]
    policy = demo.fit_policy(cls, logits, labels, costs, args.budget)
    save_policy(policy, args.out, costs, args.budget,
                {"dataset": dataset, "model": os.path.basename(args.model),
                 **model_record(net)})
    exit_index, _ = policy.decide(logits)
    r = budget_mod.report(costs, exit_index, args.budget)
    print(f"{policy}\nvalidation: achieved {r['achieved']:.4g} {costs.unit} for asked "
          f"{r['asked']:.4g} ({r['ratio']:.1%}); saved {args.out}")


def cmd_report(args: argparse.Namespace) -> None:
    net, meta = load_model(args.model)
    policy, costs, info = load_policy(args.policy, num_exits=net.num_exits)
    dataset = _dataset_for(args, meta)
    _check_policy(args, info, dataset, net)
    data.require_dataset(dataset)
    splits = data.load(dataset, seed=meta.get("seed", 0))
    _check_inputs(net, splits, args.model)
    x, y = splits.test
    _check_costs(args, costs, net, x[:2])
    out = Engine(net, policy, mode=args.mode)(x)
    acc = float((out.logits.argmax(1) == y).float().mean())
    low, high = demo.bootstrap_interval(out.logits.argmax(1) == y)
    counts = torch.bincount(out.exit_index, minlength=net.num_exits).tolist()
    achieved = costs.expected(out.exit_index)
    print(f"{policy} on {dataset} test ({len(y)} samples, mode {args.mode})")
    print(f"  accuracy {acc:.4f} [95% CI {low:.4f}, {high:.4f}]")
    print(f"  samples per exit {counts}")
    asked = info.get("budget")
    asked_text = ("no budget recorded" if asked is None else
                  f"asked {asked.value:.4g} of the full model" if asked.unit == "fraction" else
                  f"asked {asked.value:.4g} {asked.unit}")
    print(f"  achieved cost {achieved:.4g} {costs.unit} = {achieved / costs.full:.1%} of the "
          f"full model ({asked_text})")


def cmd_serve(args: argparse.Namespace) -> None:
    config = {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
              "queue_size": args.queue_size, "on_full": args.on_full}
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"eenet serve: warning: listening on {args.host}, not the loopback interface; "
              "the server has no authentication", file=sys.stderr)
    if args.ray:
        from .serving import ray_app

        if args.port == 0:
            raise UsageError("--port 0 (any free port) works without --ray only: Ray Serve "
                             "listens on the port it is given")
        ray_app.require_ray()  # a missing extra fails before Ray or the model is loaded
        ray_app.run_ray(args.model, args.policy, args.host, args.port, threads=args.threads,
                        **config)
        return
    from .serving.http import load_engine, run_http

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    engine = load_engine(args.model, args.policy, **config)
    try:
        with engine:
            run_http(engine, args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: "
                         f"{exc.strerror or exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eenet", description=__doc__.split("\n")[0],
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    dataset_help = ("dataset to run on (default: the one the model file records it was "
                    "trained on)")

    p = sub.add_parser("demo", help="train, calibrate and serve multi-exit CNNs on digits",
                       formatter_class=_Formatter)
    p.add_argument("--datasets", nargs="+", default=list(data.DATASETS), choices=data.DATASETS,
                   help="datasets to run the demo on")
    p.add_argument("--epochs", type=_positive_int, default=demo.EPOCHS,
                   help="training epochs per model")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the splits and the training")
    p.add_argument("--out", type=_output_dir, default="demo_out",
                   help="directory for the models and the plot (created if missing)")
    p.add_argument("--no-progress", action="store_true",
                   help="no training progress (bar on a terminal, a line per epoch otherwise)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="fit a policy for a budget on a saved model",
                       formatter_class=_Formatter)
    p.add_argument("--model", required=True, type=_existing_file,
                   help="model file (eenet.saving.save_model; eenet demo writes them)")
    p.add_argument("--dataset", choices=data.DATASETS, default=None, help=dataset_help)
    p.add_argument("--policy", type=_policy_name, choices=POLICY_NAMES, default="EENet",
                   help="exit policy to fit (any case)")
    p.add_argument("--budget", type=_fraction, required=True,
                   help="average cost per sample as a fraction of the full model, in (0, 1]")
    p.add_argument("--costs", choices=("flops", "latency"), default="flops",
                   help="cost model: counted FLOPs or measured latency")
    p.add_argument("--batch", type=_positive_int, default=64,
                   help="batch size the costs are taken at")
    p.add_argument("--out", required=True, type=_output_file,
                   help="policy file to write (JSON; its folder must exist)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="serve the test split with a saved model and policy",
                       formatter_class=_Formatter)
    p.add_argument("--model", required=True, type=_existing_file, help="model file")
    p.add_argument("--policy", required=True, type=_existing_file,
                   help="policy file calibrated for this model (eenet calibrate)")
    p.add_argument("--dataset", choices=data.DATASETS, default=None, help=dataset_help)
    p.add_argument("--mode", choices=MODES, default="compact",
                   help="runtime mode (compact drops the exited rows; full and mask do not)")
    p.set_defaults(func=cmd_report)

    from .robust.reproduce import Schedule

    defaults = Schedule()
    p = sub.add_parser("robust", help="RDI-Nets vs the PGD-trained baseline, the slowdown "
                       "attack and the budget guard", formatter_class=_Formatter)
    p.add_argument("--dataset", choices=data.DATASETS, default=defaults.dataset,
                   help="dataset to train and attack on")
    p.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                   help="epochs of RDI-Nets and of the PGD-trained baseline")
    p.add_argument("--std-epochs", type=_positive_int, default=None,
                   help="epochs of the standard multi-exit model (default: --epochs)")
    p.add_argument("--train-steps", type=_positive_int, default=defaults.train_steps,
                   help="PGD steps of the training attack (the test attack's travel in that "
                   "many steps)")
    p.add_argument("--lr", type=_positive_float, default=defaults.lr,
                   help="learning rate (Adam) of every model")
    p.add_argument("--budget", type=_fraction, default=defaults.budget,
                   help="EENet's and MaxProb's budget, a fraction of the backbone's FLOPs")
    p.add_argument("--batch", type=_positive_int, default=defaults.serve_batch,
                   help="batch size the test split is served in")
    p.add_argument("--eenet-epochs", type=_positive_int,
                   default=inspect.signature(EENet.fit_logits).parameters["epochs"].default,
                   help="training epochs of the EENet scheduler")
    p.add_argument("--train-samples", type=_positive_int, default=None,
                   help="use only the first N training samples (default: all)")
    p.add_argument("--test-samples", type=_positive_int, default=None,
                   help="use only the first N test samples (default: all)")
    p.add_argument("--seed", type=_seed, default=defaults.seed,
                   help="seed of the splits, the initialisation and the training")
    p.add_argument("--out", type=_output_dir, default="robust_out",
                   help="directory for robust.md and robust.json (created if missing)")
    p.add_argument("--no-progress", action="store_true",
                   help="no training progress (bar on a terminal, a line per epoch otherwise)")
    p.set_defaults(func=cmd_robust)

    from .text.evaluate import TEXT_BUDGETS
    from .text.recipe import SST2Config

    text = SST2Config()
    p = sub.add_parser("text", help="SST-2 with a multi-exit MiniLM: fine-tune, fit every "
                       "policy on dev, evaluate on test", formatter_class=_Formatter)
    p.add_argument("--data-dir", default=None,
                   help="the SST-2 folder (train/dev/test.tsv; default: $EENET_SST2_DIR, "
                   "else ../shared/data/sst2)")
    p.add_argument("--train-phrases", type=_positive_int, default=text.train_phrases,
                   help="fine-tune on a seeded subset of this many train phrases")
    p.add_argument("--epochs", type=_positive_int, default=text.epochs,
                   help="fine-tuning epochs")
    p.add_argument("--batch-size", type=_positive_int, default=text.batch_size,
                   help="fine-tuning batch size (phrases of similar length)")
    p.add_argument("--lr", type=_positive_float, default=text.lr, help="Adam learning rate")
    p.add_argument("--threads", type=_positive_int, default=text.threads,
                   help="torch intra-op threads (one is fastest on a loaded 2-core machine)")
    p.add_argument("--seed", type=int, default=text.seed, help="seed of the subset and the run")
    p.add_argument("--dev-limit", type=_positive_int, default=None,
                   help="use a seeded subset of this many dev sentences (default: all)")
    p.add_argument("--test-limit", type=_positive_int, default=None,
                   help="use a seeded subset of this many test sentences (default: all)")
    p.add_argument("--eenet-epochs", type=_positive_int, default=None,
                   help="training epochs of the EENet scheduler (default: its own)")
    p.add_argument("--budgets", type=_budget_list, default=TEXT_BUDGETS,
                   help="comma-separated budgets, fractions of the full model's FLOPs")
    p.add_argument("--resamples", type=_positive_int, default=2000,
                   help="bootstrap resamples of the intervals")
    p.add_argument("--out", type=_output_dir, default=text.out,
                   help="directory for the model, the logits and the report")
    p.add_argument("--report", type=_report_file, default=None,
                   help="the report's markdown file (default: <out>/sst2.md; .json and .png "
                   "beside it)")
    p.add_argument("--reuse", action="store_true",
                   help="evaluate the logits of an earlier run in --out instead of training")
    p.add_argument("--quiet", action="store_true", help="no training progress")
    p.set_defaults(func=cmd_text)

    p = sub.add_parser("serve", help="serve a model and its policy over HTTP (re-batching "
                       "engine; Ray Serve with --ray) until Ctrl-C", formatter_class=_Formatter)
    p.add_argument("model", metavar="MODEL", type=_existing_file,
                   help="model file (eenet.saving.save_model)")
    p.add_argument("policy", metavar="POLICY", type=_existing_file,
                   help="policy file calibrated for this model (eenet calibrate)")
    p.add_argument("--host", type=_host, default="127.0.0.1",
                   help="address to listen on (the server has no authentication)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (0: any free "
                   "one, without --ray)")
    p.add_argument("--ray", action="store_true",
                   help="serve as a Ray Serve deployment on a local Ray (the serve extra)")
    p.add_argument("--max-batch", type=_positive_int, default=64,
                   help="rows per stage run, at most")
    p.add_argument("--max-wait-ms", type=_nonnegative_float, default=2.0,
                   help="how long a stage's oldest pending row waits for more rows")
    p.add_argument("--queue-size", type=_positive_int, default=1024,
                   help="requests (samples) admitted and not started, at most")
    p.add_argument("--on-full", choices=("reject", "block"), default="reject",
                   help="a full queue: answer 429 at once, or wait up to a second for room")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for usage errors)."""
    prog = "eenet"
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
        prog = f"eenet {args.command}"
        args.func(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
            data.MissingExtraError) as exc:
        where = getattr(exc, "prog", None) or prog
        print(f"{where}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

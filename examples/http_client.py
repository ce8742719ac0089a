"""Send concurrent requests to a running ``eenet serve`` and print the answers and its stats.

Start a server first (the demo's MNIST model and a policy calibrated for it)::

    make demo                                   # trains demo_out/mnist_model.pt (and digits)
    eenet calibrate --model demo_out/mnist_model.pt --policy EENet --budget 0.5 \\
        --out policy.json
    eenet serve demo_out/mnist_model.pt policy.json --port 8000          # plain HTTP
    eenet serve demo_out/mnist_model.pt policy.json --port 8000 --ray    # or Ray Serve

then, in another terminal::

    python examples/http_client.py --url http://127.0.0.1:8000 --samples 256 --threads 16

Each of ``--threads`` threads posts calls of ``--per-call`` samples (MNIST test images, from
the same seeded split as the demo, or random inputs of ``--random C,H,W``), so samples of
concurrent calls meet in the server's engine and are batched together at every stage.
Printed: a few answers (exit, label, score, latency), accuracy and the exit mix when the
labels are known, the wall time, then ``GET /v1/stats`` (batch sizes per stage, latency
percentiles, cost per sample against the budget).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def post(url: str, doc: dict[str, Any], timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """POST ``doc`` as JSON; (status, JSON reply), error replies included."""
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def get(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


def samples(args: argparse.Namespace) -> tuple[list[Any], list[int] | None]:
    """(samples as nested lists, their labels or None)."""
    if args.random:
        import random

        shape = [int(d) for d in args.random.split(",")]
        rng = random.Random(0)

        def one(dims: list[int]) -> Any:
            if not dims:
                return rng.gauss(0.0, 1.0)
            return [one(dims[1:]) for _ in range(dims[0])]

        return [one(shape) for _ in range(args.samples)], None
    from eenet import data

    data.require_dataset(args.dataset)
    x, y = data.load(args.dataset).test
    x, y = x[: args.samples], y[: args.samples]
    return x.tolist(), y.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    parser.add_argument("--samples", type=int, default=256, help="samples to send")
    parser.add_argument("--per-call", type=int, default=4, help="samples per HTTP call")
    parser.add_argument("--threads", type=int, default=16, help="concurrent callers")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "digits"),
                        help="send this dataset's test images (the demo extra)")
    parser.add_argument("--random", metavar="SHAPE", default=None,
                        help="send random samples of this shape instead, e.g. 1,28,28")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="a deadline for every sample (answers may come early, forced)")
    parser.add_argument("--show", type=int, default=8, help="answers to print")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        print("health:", get(url + "/healthz"))
    except OSError as exc:
        print(f"cannot reach {url}: {exc} (start `eenet serve MODEL POLICY` first)",
              file=sys.stderr)
        return 1
    xs, labels = samples(args)
    calls = [(a, xs[a:a + args.per_call]) for a in range(0, len(xs), args.per_call)]

    def send(call: tuple[int, list[Any]]) -> tuple[int, int, dict[str, Any]]:
        doc: dict[str, Any] = {"inputs": call[1]}
        if args.deadline_ms:
            doc["deadline_ms"] = args.deadline_ms
        return (call[0], *post(url + "/v1/predict", doc))

    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        replies = list(pool.map(send, calls))
    wall = time.perf_counter() - start

    answers: dict[int, dict[str, Any]] = {}
    errors: Counter[str] = Counter()
    for first, status, doc in replies:
        if status != 200:
            errors[f"{status} {doc.get('type')}: {doc.get('error')}"] += 1
            continue
        for i, out in enumerate(doc["outputs"]):
            answers[first + i] = out
    for i in sorted(answers)[: args.show]:
        a = answers[i]
        truth = f" (true {labels[i]})" if labels is not None else ""
        print(f"sample {i:4d}: exit {a['exit']} label {a['label']}{truth} score "
              f"{a['score']:.3f}{' forced' if a['forced'] else ''} {a['latency_ms']:.1f} ms")
    exits = Counter(a["exit"] for a in answers.values())
    print(f"{len(answers)} of {len(xs)} samples answered in {wall:.2f} s "
          f"({len(calls)} calls from {args.threads} threads); answers per exit "
          f"{dict(sorted(exits.items()))}")
    if labels is not None and answers:
        right = sum(a["label"] == labels[i] for i, a in answers.items())
        print(f"accuracy {right / len(answers):.4f}")
    for what, n in errors.items():
        print(f"{n} calls failed: {what}")
    stats = get(url + "/v1/stats")
    print("stats:", json.dumps({k: v for k, v in stats.items() if k != "batch_sizes"},
                               indent=1))
    runs, rows = stats["stage_runs"], stats["stage_rows"]
    print("mean batch size per stage:",
          [round(r / n, 2) if n else None for r, n in zip(rows, runs, strict=True)])
    return 0 if not errors else 2


if __name__ == "__main__":
    raise SystemExit(main())

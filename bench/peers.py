"""The execution modes users run today, implemented from their papers' descriptions, next to
ours; and the "ideal" every mode is measured against.

Every mode is a callable ``runner(x, **row_inputs) -> EngineOutput`` with the per-sample
results in input order (logits (N, C) float32 of the exit taken, exit_index (N,) int64, score
(N,) float32), so the tests check each one against the oracle :func:`eenet.runtime.simulate`.
Row inputs (per-row side inputs such as a padded batch's ``attention_mask``, each (N, ...))
go to every stage and every exit head (``head(h, **row_inputs)``; a head reads those it names)
and travel with the rows: indexed with them where a peer drops rows, sliced per sample by
``batch1``, compacted by the engine.

- ``full``: every stage and exit on every row, decisions afterwards (Engine ``full``).
- ``mask``: all rows run every stage until all have exited; exited rows are frozen (Engine
  ``mask``; PABEE-style: the batch waits for its slowest sample).
- ``bool_index``: FastBERT / bert-squeeze: after each exit, ``h = h[~exit]`` (and the row
  index and policy history likewise): boolean indexing, a ``nonzero`` (host sync) per index.
- ``batchcond``: BatchCond's ABR (adaptive batch reorganisation), see :class:`BatchCond`:
  per stage, keep masking or drop the exited rows by boolean indexing, chosen at run time
  from a profiled cost table.
- ``batch1``: DeeBERT / SDN / BranchyNet serving: one sample at a time, each stops at its
  exit (one host sync per stage per sample).
- ``compact``: ours, Engine ``compact`` (fused ``exit_score_write`` + ``compact``, one host
  sync per stage).

Every mode that runs stage by stage goes through the runtime's one loop,
:func:`eenet.runtime.run_stages`: each peer is a step of it (how an exit decides and writes,
how the leaving rows leave), as the engine's ``mask`` and ``compact`` modes are.

The peers run exit heads as the peers' code does, in plain torch: ``head(h)`` then the
policy's score from :func:`eenet_kernels.reference.policy_score` (softmax, max, entropy,
patience streak or the EENet scheduler), ``score >= threshold``; ``mask`` and ``compact``
use the library's engine (the fused ``exit_score`` op).

The ideal (:func:`ideal_segments`): the sum over stages of each stage's standalone time
(stage + exit head forward) at its survivor batch size, with no scoring, bookkeeping,
compaction or sync.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from eenet.policies import ExitPolicy
from eenet.runtime import Engine, EngineOutput, RowState, check_network, run_stages
from eenet.runtime.timing import time_fn
from eenet_kernels import reference

MODES: tuple[str, ...] = ("full", "mask", "bool_index", "batchcond", "batch1", "compact")
PEERS: tuple[str, ...] = ("full", "mask", "bool_index", "batchcond", "batch1")
OURS = "compact"
# the engine's other execution modes, measured beside compact when asked for, and the Engine
# arguments of each: the compact loop as one torch.compile graph, as CUDA graphs per (stage,
# bucket) with the bucket chosen after a host read per stage, and as one CUDA graph per batch
# with the buckets chosen on the device by conditional nodes (both CUDA only)
ENGINE_MODE_ARGS: dict[str, dict[str, str]] = {
    "compiled": {"mode": "compiled"},
    "graph": {"mode": "graph"},
    "graph_device": {"mode": "graph", "graph_bucket_choice": "device"},
}
ENGINE_MODES: tuple[str, ...] = tuple(ENGINE_MODE_ARGS)
GRAPH_MODES: tuple[str, ...] = tuple(m for m, a in ENGINE_MODE_ARGS.items()
                                     if a["mode"] == "graph")

Runner = Callable[..., EngineOutput]  # runner(x, **row_inputs)
RowInputs = Mapping[str, torch.Tensor]


class PlainExit(NamedTuple):
    """An exit decision as the peers compute it: logits (n, C) float32, score (n,) float32,
    leave (n,) bool."""

    logits: torch.Tensor
    score: torch.Tensor
    leave: torch.Tensor


class _PlainHeads:
    """Exit decisions as the peers compute them: plain-torch head and policy score. Every
    peer keeps the full history (scores and argmax of the exits passed), as their code does."""

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy) -> None:
        check_network(net, policy)
        self.net = net.eval()
        self.policy = policy
        self.rules = policy.rules()
        self.num_exits = len(net.heads)
        self.num_classes = net.heads[-1].classifier.out_features

    def decide(self, k: int, h: torch.Tensor, rows: RowState) -> PlainExit:
        """Exit k on activation h (n, ...) of the rows present (and their row inputs)."""
        rule = self.rules[k]
        z = self.net.heads[k](h, **rows.inputs).float()
        sw = rule.sched_weight
        if sw is not None:
            sw = sw.to(device=z.device, dtype=torch.float32)
        score = reference.policy_score(z, rule.policy, prev_scores=rows.prev_scores(k),
                                       prev_preds=rows.prev_preds(k), sched_weight=sw,
                                       sched_bias=rule.sched_bias, use_vote=rule.use_vote)
        if k == self.num_exits - 1:
            leave = torch.ones(score.shape, dtype=torch.bool, device=score.device)
        else:
            leave = score >= rule.threshold  # NaN never passes
        return PlainExit(z, score, leave)

    def outputs(self, x: torch.Tensor) -> EngineOutput:
        return EngineOutput.empty(x.shape[0], self.num_classes, x.device)

    def rows(self, n: int, device: torch.device, first: int = 0,
             inputs: RowInputs | None = None) -> RowState:
        """The state of rows first..first+n-1 of a batch at its start (empty history), with
        their row ``inputs`` (each (n, ...))."""
        k = self.num_exits
        return RowState(torch.arange(first, first + n, device=device),
                        torch.zeros(k, n, dtype=torch.float32, device=device),
                        torch.zeros(k, n, dtype=torch.int64, device=device),
                        dict(inputs or {}))


def _write(out: EngineOutput, k: int, rows: RowState, d: PlainExit, leave: torch.Tensor
           ) -> None:
    """The leaving rows' results at their original positions (boolean indexing)."""
    at = rows.index[leave]
    out.logits[at] = d.logits[leave]
    out.score[at] = d.score[leave]
    out.exit_index[at] = k


def _record(k: int, rows: RowState, d: PlainExit) -> None:
    """Exit k's scores and argmax into the rows' history."""
    assert rows.scores is not None and rows.preds is not None
    rows.scores[k] = d.score
    rows.preds[k] = d.logits.argmax(dim=1)


def _select(rows: RowState, keep: torch.Tensor) -> RowState:
    """The rows where ``keep`` (n,) bool holds, by boolean indexing of every state tensor."""
    return RowState(rows.index[keep],
                    None if rows.scores is None else rows.scores[:, keep],
                    None if rows.preds is None else rows.preds[:, keep],
                    {name: t[keep] for name, t in rows.inputs.items()})


class _BoolIndexStep:
    """Drop the leaving rows after every exit: ``h[~exit]`` and likewise for the state."""

    def __init__(self, heads: _PlainHeads, out: EngineOutput) -> None:
        self.heads = heads
        self.out = out

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> PlainExit:
        d = self.heads.decide(k, h, rows)
        _write(self.out, k, rows, d, d.leave)
        return d

    def advance(self, k: int, h: torch.Tensor, rows: RowState, d: PlainExit
                ) -> tuple[torch.Tensor, RowState] | None:
        _record(k, rows, d)
        stay = ~d.leave
        h = h[stay]
        if h.shape[0] == 0:
            return None
        return h, _select(rows, stay)


class BoolIndex(_PlainHeads):
    """FastBERT / bert-squeeze: drop the exited rows after every exit with ``x[~exit]``."""

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        out = self.outputs(x)
        if x.shape[0] > 0:
            run_stages(self.net.stages, x, self.rows(x.shape[0], x.device, inputs=row_inputs),
                       _BoolIndexStep(self, out))
        return out


class _Batch1Step:
    """One sample: after each exit, one ``.item()`` says whether it left."""

    def __init__(self, heads: _PlainHeads, out: EngineOutput, i: int) -> None:
        self.heads = heads
        self.out = out
        self.i = i

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> tuple[PlainExit, bool]:
        d = self.heads.decide(k, h, rows)
        left = bool(d.leave.item())
        if left:
            self.out.logits[self.i] = d.logits[0]
            self.out.score[self.i] = d.score[0]
            self.out.exit_index[self.i] = k
        return d, left

    def advance(self, k: int, h: torch.Tensor, rows: RowState, decision: tuple[PlainExit, bool]
                ) -> tuple[torch.Tensor, RowState] | None:
        d, left = decision
        if left:
            return None
        _record(k, rows, d)
        return h, rows


class Batch1(_PlainHeads):
    """DeeBERT / SDN / BranchyNet serving: samples one at a time; each runs stages until its
    exit takes it (one ``.item()`` per stage per sample). Row inputs are sliced per sample
    with x (a padded row keeps its batch's width and its mask)."""

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        out = self.outputs(x)
        for i in range(x.shape[0]):
            inputs = {name: t[i:i + 1] for name, t in row_inputs.items()}
            run_stages(self.net.stages, x[i:i + 1],
                       self.rows(1, x.device, first=i, inputs=inputs),
                       _Batch1Step(self, out, i))
        return out


@dataclass
class CostTable:
    """BatchCond's hardware profile: per stage k, the time (s) of stage k + its exit at a few
    batch sizes, and the time of dropping rows (boolean indexing of the stage's output and the
    per-row state at 50% keep) at the same sizes; linear interpolation in between, 0 at 0."""

    sizes: list[int]
    stage: list[list[float]]
    drop: list[list[float]]

    def stage_time(self, k: int, n: int) -> float:
        return _interp(n, self.sizes, self.stage[k])

    def drop_time(self, k: int, n: int) -> float:
        return _interp(n, self.sizes, self.drop[k])

    def rest(self, k: int, n: int) -> float:
        """Time of the stages after k at n rows."""
        return sum(self.stage_time(j, n) for j in range(k + 1, len(self.stage)))


def _interp(n: int, sizes: Sequence[int], values: Sequence[float]) -> float:
    if n <= 0:
        return 0.0
    xs = [0, *sizes]
    ys = [0.0, *values]
    if n >= xs[-1]:  # extrapolate linearly from the last two points
        slope = (ys[-1] - ys[-2]) / max(1, xs[-1] - xs[-2])
        return ys[-1] + slope * (n - xs[-1])
    return float(np.interp(n, xs, ys))


def profile_sizes(batch: int) -> list[int]:
    """The batch sizes BatchCond profiles for serving batches of ``batch``: 1, B/4, B/2, B."""
    return sorted({max(1, batch // 4), max(1, batch // 2), 1, max(1, batch)})


@torch.no_grad()
def profile_costs(net: torch.nn.Module, policy: ExitPolicy, x: torch.Tensor,
                  sizes: Sequence[int] | None = None, *, row_inputs: RowInputs | None = None,
                  warmup: int = 1, repeats: int = 3, device: str | torch.device = "cpu"
                  ) -> CostTable:
    """Measure BatchCond's table on example input ``x`` (at least max(sizes) rows) and its
    ``row_inputs``: stage k plus its exit (head and decision) at each size, and the drop
    (``t[keep]`` of the stage output, row index, history and row inputs) at each size,
    medians of ``repeats`` runs."""
    plain = _PlainHeads(net, policy)
    sizes = sorted(set(sizes or profile_sizes(x.shape[0])))
    if x.shape[0] < sizes[-1]:
        raise ValueError(f"profiling needs {sizes[-1]} example rows, got {x.shape[0]}")
    stage_t: list[list[float]] = []
    drop_t: list[list[float]] = []
    h = x[:sizes[-1]]
    extra = {name: t[:sizes[-1]] for name, t in (row_inputs or {}).items()}
    for k, stage in enumerate(net.stages):
        row_s, row_d = [], []
        for n in sizes:
            inp = h[:n].contiguous()
            inputs = {name: t[:n].contiguous() for name, t in extra.items()}
            rows = plain.rows(n, h.device, inputs=inputs)

            def run_stage(inp: torch.Tensor = inp, k: int = k, rows: RowState = rows) -> None:
                plain.decide(k, net.stages[k](inp, **rows.inputs), rows)

            row_s.append(time_fn(run_stage, warmup=warmup, repeats=repeats,
                                 device=device).median)
            out = stage(inp, **inputs)
            keep = torch.arange(n, device=out.device) % 2 == 0

            def run_drop(out: torch.Tensor = out, rows: RowState = rows,
                         keep: torch.Tensor = keep) -> None:
                out[keep]
                _select(rows, keep)

            row_d.append(time_fn(run_drop, warmup=warmup, repeats=repeats,
                                 device=device).median)
        stage_t.append(row_s)
        drop_t.append(row_d)
        h = stage(h, **extra)
    return CostTable(sizes, stage_t, drop_t)


class BatchCond(_PlainHeads):
    """BatchCond's ABR, from its description: the batch runs masked (exited rows frozen,
    still computed) until the profiled table says that dropping them pays.

    Rule, after exit k (k < K-1), with n rows in the batch of which m are still active
    (one ``.item()``): stop if m = 0; if m < n, drop the inactive rows (boolean indexing)
    when ``drop(k, n) + sum_{j>k} T_j(m) < sum_{j>k} T_j(n)``, i.e. when running the rest of
    the network on m rows plus the cost of the drop beats running it masked on n rows
    (dropped rows never come back, so the saving counts for every later stage).
    ``decisions`` records (k, n, m, dropped) of the last call.
    """

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy, table: CostTable) -> None:
        super().__init__(net, policy)
        if len(table.stage) != self.num_exits:
            raise ValueError(f"the cost table has {len(table.stage)} stages, the network "
                             f"{self.num_exits}")
        self.table = table
        self.decisions: list[tuple[int, int, int, bool]] = []

    def should_drop(self, k: int, n: int, m: int) -> bool:
        if m >= n:
            return False
        t = self.table
        return t.drop_time(k, n) + t.rest(k, m) < t.rest(k, n)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        out = self.outputs(x)
        self.decisions = []
        if x.shape[0] > 0:
            run_stages(self.net.stages, x, self.rows(x.shape[0], x.device, inputs=row_inputs),
                       _BatchCondStep(self, out, x.shape[0]))
        return out


class _BatchCondStep:
    """BatchCond's run of one batch: exited rows stay masked (``active``) until its
    ``should_drop`` says to drop the inactive rows by boolean indexing."""

    def __init__(self, batchcond: BatchCond, out: EngineOutput, n: int) -> None:
        self.batchcond = batchcond
        self.out = out
        self.active = torch.ones(n, dtype=torch.bool, device=out.logits.device)

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> PlainExit:
        d = self.batchcond.decide(k, h, rows)
        d = d._replace(leave=d.leave & self.active)
        _write(self.out, k, rows, d, d.leave)
        return d

    def advance(self, k: int, h: torch.Tensor, rows: RowState, d: PlainExit
                ) -> tuple[torch.Tensor, RowState] | None:
        _record(k, rows, d)
        self.active &= ~d.leave
        n, m = h.shape[0], int(self.active.sum().item())
        if m == 0:
            return None
        drop = self.batchcond.should_drop(k, n, m)
        self.batchcond.decisions.append((k, n, m, drop))
        if drop:
            h, rows = h[self.active], _select(rows, self.active)
            self.active = torch.ones(m, dtype=torch.bool, device=h.device)
        return h, rows


def make_runner(mode: str, net: torch.nn.Module, policy: ExitPolicy, *,
                table: CostTable | None = None, backend: str | None = None) -> Runner:
    """The runner of ``mode`` (:data:`MODES`, or one of the engine's own :data:`ENGINE_MODES`);
    ``batchcond`` needs its cost ``table``."""
    if mode in ("full", "mask", "compact"):
        return Engine(net, policy, mode=mode, backend=backend)
    if mode in ENGINE_MODE_ARGS:
        return Engine(net, policy, **ENGINE_MODE_ARGS[mode])
    if mode == "bool_index":
        return BoolIndex(net, policy)
    if mode == "batch1":
        return Batch1(net, policy)
    if mode == "batchcond":
        if table is None:
            raise ValueError("mode 'batchcond' needs a profiled CostTable (profile_costs)")
        return BatchCond(net, policy, table)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class StageInput(NamedTuple):
    """What a stage runs on: its input activation h (n, ...) and the rows' row inputs."""

    h: torch.Tensor
    row_inputs: dict[str, torch.Tensor]


@torch.no_grad()
def stage_activations(net: torch.nn.Module, x: torch.Tensor, **row_inputs: torch.Tensor
                      ) -> list[torch.Tensor]:
    """The activation entering every stage (x for stage 0) on all rows of x."""
    acts = []
    h = x
    for stage in net.stages:
        acts.append(h)
        h = stage(h, **row_inputs)
    return acts


def survivor_inputs(acts: Sequence[torch.Tensor], exit_index: torch.Tensor,
                    row_inputs: RowInputs | None = None) -> list[StageInput]:
    """The ideal's inputs: stage k's input and the row inputs restricted to the rows whose
    exit is >= k (contiguous copies; possibly empty)."""
    out = []
    for k, a in enumerate(acts):
        keep = exit_index >= k
        out.append(StageInput(a[keep].contiguous(), {
            name: t[keep].contiguous() for name, t in (row_inputs or {}).items()}))
    return out


def ideal_segments(net: torch.nn.Module, inputs: Sequence[StageInput]
                   ) -> list[Callable[[], object]]:
    """One callable per non-empty stage: stage k + exit head k on its survivors' input."""
    segs: list[Callable[[], object]] = []
    for k, inp in enumerate(inputs):
        if inp.h.shape[0] == 0:
            continue

        def seg(k: int = k, inp: StageInput = inp) -> object:
            with torch.no_grad():
                return net.heads[k](net.stages[k](inp.h, **inp.row_inputs), **inp.row_inputs)

        segs.append(seg)
    return segs

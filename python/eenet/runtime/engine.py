"""The batched early-exit engine.

Modes:
- ``full``: every stage and exit on every row, decisions afterwards (:func:`simulate`, the
  offline oracle of the EENet authors; no saving).
- ``mask``: every stage on every row still in the batch, exited rows frozen: the batch waits
  for its slowest sample (PABEE-style; stops early only when all rows have exited).
- ``compact``: our ops: ``exit_score_write`` at each exit, then ``compact`` of the
  survivors' state, so stage k+1 runs only on the rows still present. A stage costs the
  stage itself, the fused op and the compaction: the op's outputs (``pred``, ``score``,
  ``keep``) go straight into the compaction, nothing is recomputed or copied beside it. One
  host sync per stage that continues (the survivor count); buffers are reused from batch to
  batch.

- ``compiled``: the compact loop captured whole by ``torch.compile(fullgraph=True)``
  (:mod:`.compiled`): the survivor counts are unbacked sizes of one graph, so no pattern of
  exits recompiles it; no budget guard.

``mask`` and ``compact`` run the shared stage loop (:func:`eenet.runtime.loop.run_stages`).
All modes return results in the input order.

Every mode takes an optional budget guard (:mod:`.guard`: a per-batch cost limit that sends
the survivors out early) and counts every batch (:mod:`.telemetry`).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import eenet_kernels as ek

from ..nn.heads import classifier_operands, head_row_inputs
from .compiled import COMPILE_BACKENDS, CompactLoop, CompiledLoop
from .graphs import DEFAULT_BUCKETS, CudaGraphs, GraphLoop, check_bucket_choice, check_buckets
from .guard import BudgetGuard, GuardLedger
from .loop import RowState, run_stages
from .telemetry import Recorder, Telemetry

if TYPE_CHECKING:  # annotations only: eenet.budget imports eenet.runtime (timing) and
    # eenet.policies imports eenet.budget, so importing policies here would be circular
    from ..budget import Costs
    from ..policies.base import ExitPolicy

MODES: tuple[str, ...] = ("full", "mask", "compact")
"""The eager modes (every one takes a budget guard)."""
ALL_MODES: tuple[str, ...] = (*MODES, "compiled", "graph")
"""Every mode of :class:`Engine`: the eager ones and ``compiled``."""
CACHE_BYTES = 256 << 20
"""Default byte cap of the compact mode's buffer cache (256 MiB)."""


@dataclass
class EngineOutput:
    """Per-sample results in input order: logits (N, C) float32, exit_index (N,) int64,
    score (N,) float32 (the policy's score at the exit taken), forced (N,) bool (the budget
    guard sent the row out at that exit before the policy would have; all False without a
    guard, and by default)."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    score: torch.Tensor
    forced: torch.Tensor = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.forced is None:
            self.forced = torch.zeros(self.exit_index.shape, dtype=torch.bool,
                                      device=self.exit_index.device)

    @classmethod
    def empty(cls, n: int, num_classes: int, device: torch.device) -> EngineOutput:
        """Result buffers for n rows, to be written: logits and score zero, exit_index -1,
        forced False."""
        return cls(torch.zeros(n, num_classes, dtype=torch.float32, device=device),
                   torch.full((n,), -1, dtype=torch.int64, device=device),
                   torch.zeros(n, dtype=torch.float32, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device))


def every_exit_logits(net: torch.nn.Module, x: torch.Tensor,
                      row_inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every exit's logits on every row of x: K tensors (N, C) float32, the stages run one
    after the other (``row_inputs`` to every stage) and each head's classifier as the fused
    op computes it (:func:`eenet_kernels.reference.exit_logits`: fp32 on upcast features
    and weights, also for an fp16/bf16 network, whose heads' own forward rounds the logits
    by far more than the thresholds leave between scores), so a policy calibrated on them
    decides as the engine does."""
    logits = []
    h: object = x
    for k, (stage, head) in enumerate(zip(guarded_stages(net), net.heads, strict=True)):
        h = stage(h, **row_inputs)
        f = exit_features(k, head, h, x.shape[0], row_inputs)
        logits.append(ek.reference.exit_logits(f, head.classifier.weight, head.classifier.bias))
    return logits


@torch.no_grad()
def simulate(net: torch.nn.Module, policy: ExitPolicy, x: torch.Tensor,
             guard: BudgetGuard | None = None, **row_inputs: torch.Tensor) -> EngineOutput:
    """Oracle: run every stage and exit on every sample (:func:`every_exit_logits`, the
    logits the engine's fused op computes), then let the policy pick (reference math), then
    let ``guard`` (if any) cut the batch where the engine would: its rule applied to the
    rows per exit of the policy's decisions (:meth:`BudgetGuard.cut`). ``row_inputs`` go to
    every stage as keyword arguments (see :class:`Engine`)."""
    check_network(net, policy)
    _check_input(x, row_inputs)
    logits = every_exit_logits(net, x, row_inputs)
    exit_index, score = policy.decide(logits)
    forced = torch.zeros(exit_index.shape, dtype=torch.bool, device=exit_index.device)
    if guard is not None:
        _check_guard(guard, len(logits))
        cut = guard.cut(torch.bincount(exit_index, minlength=len(logits)).tolist())
        if cut is not None:
            forced = exit_index > cut
            exit_index = torch.where(forced, cut, exit_index)
            score = torch.where(forced, policy.scores(logits)[:, cut], score)
    stacked = torch.stack(logits, dim=1)
    chosen = stacked[torch.arange(x.shape[0], device=x.device), exit_index]
    return EngineOutput(chosen, exit_index, score, forced)


def check_exit_network(net: torch.nn.Module) -> list[int]:
    """Raise ``TypeError`` / ``ValueError`` naming the culprit unless ``net`` has ``stages``
    and one exit head per stage, each with ``features`` and an ``nn.Linear`` ``classifier``,
    all of them predicting the same C >= 2 classes; returns the heads' class counts."""
    stages, heads = getattr(net, "stages", None), getattr(net, "heads", None)
    if stages is None or heads is None:
        raise TypeError(f"net must have stages and heads (an eenet.nn.MultiExitNetwork), got "
                        f"{type(net).__name__}")
    if len(stages) != len(heads) or len(heads) == 0:
        raise ValueError(f"the network has {len(stages)} stages but {len(heads)} "
                         "exit heads")
    classes = []
    for k, head in enumerate(heads):
        classifier = getattr(head, "classifier", None)
        if not callable(getattr(head, "features", None)) or not isinstance(
                classifier, torch.nn.Linear):
            raise TypeError(f"net.heads[{k}] must have features() and an nn.Linear "
                            f"classifier (an eenet.nn.ExitHead), got {type(head).__name__}")
        classes.append(classifier.out_features)
    if len(set(classes)) != 1 or classes[0] < 2:
        raise ValueError(f"every exit head must predict the same C >= 2 classes; the heads' "
                         f"classifiers have out_features {classes}")
    return classes


def check_network(net: torch.nn.Module, policy: ExitPolicy) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the culprit unless ``net`` has
    ``stages`` and one exit head per stage, each with ``features`` and an ``nn.Linear``
    ``classifier``, all of them predicting the same C >= 2 classes, and ``policy`` is an
    :class:`~eenet.policies.ExitPolicy` with one rule per exit, thresholds the op takes
    (finite; in [0, 1] or NEVER_EXIT for probability-like scores, >= 0 for patience
    streaks) and (if it has its own class count, as EENet's score heads do) the network's C."""
    from ..policies.base import ExitPolicy, threshold_problem

    classes = check_exit_network(net)
    if not isinstance(policy, ExitPolicy):
        raise TypeError(f"policy must be an eenet.policies.ExitPolicy, got "
                        f"{type(policy).__name__}")
    policy.check_network(len(net.heads))
    for k, rule in enumerate(policy.rules()):
        why = threshold_problem(rule.policy, rule.threshold)
        if why is not None:  # a threshold changed after the policy was made
            raise ValueError(f"policy threshold {k} is {rule.threshold:g}: {why} "
                             f"(thresholds {policy.thresholds})")
    policy_classes = getattr(policy, "num_classes", None)
    if policy_classes is not None and policy_classes != classes[0]:
        raise ValueError(f"the {type(policy).__name__} policy's score heads are for "
                         f"{policy_classes} classes but the network has {classes[0]}")


def bucket_rows(n: int) -> int:
    """The buffer row count for a batch of n rows: n rounded up to a multiple of
    2 ** (bit_length(n) - 4), n itself below 16. At most 1/8 more rows than n, 8 to 16
    buckets per doubling of n; batch sizes in one bucket share their buffers."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


# -- compact mode's buffers ------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _StateBuffers:
    """Room for the :class:`RowState` of up to B rows: index (B,) int64, scores (K, B)
    float32 and preds (K, B) int64 when the policy reads them, each row input (B, ...)."""

    index: torch.Tensor
    scores: torch.Tensor | None
    preds: torch.Tensor | None
    inputs: dict[str, torch.Tensor]

    @classmethod
    def allocate(cls, rows: int, exits: int, policy: ExitPolicy, device: torch.device,
                 row_inputs: dict[str, torch.Tensor]) -> _StateBuffers:
        return cls(
            torch.empty(rows, dtype=torch.int64, device=device),
            (torch.empty(exits, rows, dtype=torch.float32, device=device)
             if policy.needs_scores else None),
            (torch.empty(exits, rows, dtype=torch.int64, device=device)
             if policy.needs_preds else None),
            {name: t.new_empty((rows, *t.shape[1:])) for name, t in row_inputs.items()})

    @property
    def nbytes(self) -> int:
        held = [t for t in (self.index, self.scores, self.preds, *self.inputs.values())
                if t is not None]
        return sum(_nbytes(t) for t in held)


class _Buffers:
    """Compact-mode storage for one bucket of batch shapes (B rows, B >= the batch size; a
    batch uses the first N0 rows): the row numbers 0..B-1, one buffer per stage output
    (allocated when the stage first runs), and a ping-pong pair of row-state buffers (stage k
    compacts into member k % 2, so source and destination always differ)."""

    def __init__(self, rows: int, exits: int, policy: ExitPolicy, device: torch.device,
                 row_inputs: dict[str, torch.Tensor]) -> None:
        self.size = rows
        self.stage_out: dict[int, torch.Tensor] = {}
        with torch.inference_mode(False):  # (see stage)
            self.row_numbers = torch.arange(rows, device=device)
            self.state = (_StateBuffers.allocate(rows, exits, policy, device, row_inputs),
                          _StateBuffers.allocate(rows, exits, policy, device, row_inputs))
        self.nbytes = _nbytes(self.row_numbers) + self.state[0].nbytes + self.state[1].nbytes
        """Bytes held, kept up to date as stage buffers are allocated."""

    def stage(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Stage k's output buffer (B, *like.shape[1:]), like's dtype and device; allocated
        anew when stage k's output no longer fits the one held (the network was cast to
        another dtype, or runs under autocast, since the buffers were made)."""
        buf = self.stage_out.get(k)
        if buf is None or (buf.dtype, buf.shape[1:], buf.device) != (
                like.dtype, like.shape[1:], like.device):
            if buf is not None:
                self.nbytes -= _nbytes(buf)
            # ordinary tensors, also when made under torch.inference_mode: a later call
            # outside inference mode writes them too
            with torch.inference_mode(False):
                buf = like.new_empty((self.size, *like.shape[1:]))
            self.stage_out[k] = buf
            self.nbytes += _nbytes(buf)
        return buf


class _BufferCache:
    """Compact-mode buffers by bucket, least recently used first: at most ``max_entries``
    buckets and, between calls, at most ``max_bytes`` bytes (during a call the running
    batch's buffers grow stage by stage; :meth:`trim` after the call restores the caps, and
    drops the batch's own buffers when they alone exceed ``max_bytes``)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Buffers] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], _Buffers]) -> _Buffers:
        buffers = self._entries.pop(key, None) or make()
        self._entries[key] = buffers  # most recently used last
        self.trim()
        return buffers

    def trim(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries
                                 or self.nbytes > self.max_bytes):
            self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


# -- the modes' steps (eenet.runtime.loop.Step) ----------------------------------------------


class _MaskStep:
    """mask mode: the fused ``exit_score`` at every exit on every row; the rows leaving
    (exit and still active) get their results written, the others stay active; the history
    keeps every row's score and prediction. With a guard's ``ledger``, the rows still active
    when it cuts get exit k's results, flagged forced."""

    def __init__(self, heads: torch.nn.ModuleList, out: EngineOutput,
                 stage_kwargs: list[dict[str, Any]], ledger: GuardLedger | None) -> None:
        self.heads = list(heads)
        self.out = out
        self.stage_kwargs = stage_kwargs
        self.ledger = ledger
        self.active = torch.ones(out.exit_index.shape, dtype=torch.bool,
                                 device=out.exit_index.device)

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> ek.ExitScore:
        head = self.heads[k]
        f, weight, bias = classifier_operands(
            head, exit_features(k, head, h, rows.rows, rows.inputs))
        res = ek.exit_score(f, weight, bias, prev_scores=rows.prev_scores(k),
                            prev_preds=rows.prev_preds(k), **self.stage_kwargs[k])
        self._write(k, res, res.exit_mask & self.active)
        return res

    def advance(self, k: int, h: torch.Tensor, rows: RowState, res: ek.ExitScore
                ) -> tuple[torch.Tensor, RowState] | None:
        self.active &= res.keep
        if rows.scores is not None:
            rows.scores[k] = res.score
        if rows.preds is not None:
            rows.preds[k] = res.pred
        survivors = int(self.active.sum())  # the batch waits for its slowest row
        if survivors == 0:
            return None
        if self.ledger is not None and self.ledger.cut_after(k, survivors):
            self._write(k, res, self.active)
            self.out.forced |= self.active
            return None
        return h, rows

    def _write(self, k: int, res: ek.ExitScore, leaving: torch.Tensor) -> None:
        self.out.logits[leaving] = res.logits[leaving]
        self.out.score[leaving] = res.score[leaving]
        self.out.exit_index[leaving] = k


class _CompactStep:
    """compact mode: ``exit_score_write`` writes the leaving rows' results at their input
    positions; ``compact`` moves the staying rows' activation and state (row index, row
    inputs, history with this exit's score and prediction as its newest entry) to the front of
    the other ping-pong member; ``take`` reads the survivor count (the host sync). When a
    guard's ``ledger`` cuts after exit k, the survivors leave with the results the op
    computed at exit k: one scatter of exit k's rows (those that left hold these values
    already), no stage run and no further sync."""

    def __init__(self, heads: torch.nn.ModuleList, out: EngineOutput,
                 stage_kwargs: list[dict[str, Any]], buffers: _Buffers, backend: str,
                 ledger: GuardLedger | None) -> None:
        self.heads = list(heads)  # indexing a ModuleList costs microseconds
        self.out = out
        self.stage_kwargs = stage_kwargs
        self.buffers = buffers
        self.backend = backend
        self.ledger = ledger

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> ek.ExitScore:
        head = self.heads[k]
        f, weight, bias = classifier_operands(
            head, exit_features(k, head, h, rows.rows, rows.inputs))
        return ek.exit_score_write(
            f, weight, bias, row_index=rows.index, exit_index=k, out_logits=self.out.logits,
            out_score=self.out.score, out_exit=self.out.exit_index,
            prev_scores=rows.prev_scores(k), prev_preds=rows.prev_preds(k),
            **self.stage_kwargs[k])

    def advance(self, k: int, h: torch.Tensor, rows: RowState, res: ek.ExitScore
                ) -> tuple[torch.Tensor, RowState] | None:
        n = rows.rows
        dst = self.buffers.state[k % 2]
        names = list(rows.inputs)
        src = [h, rows.index, *rows.inputs.values()]
        out = [self.buffers.stage(k, h), dst.index, *(dst.inputs[name] for name in names)]
        if rows.scores is not None and dst.scores is not None:  # history rows 0..k-1, then k
            src += [*rows.scores[:k, :n], res.score]
            out += [*dst.scores[:k + 1]]
        if rows.preds is not None and dst.preds is not None:
            src += [*rows.preds[:k, :n], res.pred]
            out += [*dst.preds[:k + 1]]
        kept, count = ek.compact(res.keep, src, out=out, backend=self.backend)
        h, index, *rest = ek.take(kept, count)  # the stage's one host sync
        survivors = h.shape[0]
        if survivors == 0:
            return None
        if self.ledger is not None and self.ledger.cut_after(k, survivors):
            result = self.out
            result.logits.index_copy_(0, rows.index, res.logits)
            result.score.index_copy_(0, rows.index, res.score)
            result.exit_index.index_fill_(0, rows.index, k)
            result.forced.index_copy_(0, rows.index, res.keep)
            return None
        inputs = dict(zip(names, rest[:len(names)], strict=True))
        return h, RowState(index, dst.scores, dst.preds, inputs)


# -- the engine ------------------------------------------------------------------------------


class Engine:
    """Batched early-exit inference of a multi-exit network under an exit policy.

    ``net`` has ``stages`` and ``heads`` (``eenet.nn.MultiExitNetwork``); head k exposes
    ``features(h, **row_inputs)`` ((N, D) or (N, D, S)) and ``classifier`` (the Linear the
    fused kernel consumes). ``engine(x)`` returns an :class:`EngineOutput`.

    Policy: the engine serves a copy of ``policy`` taken when it is made (:attr:`policy`
    returns a copy of that copy), so every mode applies the same rules whatever later
    happens to the object passed in; to serve changed thresholds, make a new engine.

    Mode: making an engine puts ``net`` in eval mode (``net.eval()``, inference needs it);
    a call while ``net`` is in train mode again (``net.train()`` since) raises
    ``RuntimeError`` rather than serving with dropout and batch-norm updates.

    Row inputs: ``engine(x, name=t, ...)`` passes per-row side inputs t, each (N, ...) on x's
    device, to every stage as ``stage(h, name=t)`` (e.g. the ``attention_mask`` of padded
    transformer batches), and to every exit head that reads them (its ``row_inputs``
    names, :func:`eenet.nn.head_row_inputs`); in compact mode they are compacted with the
    rows.

    Budget guard: ``guard=BudgetGuard(costs, limit)`` caps what each batch spends, ``limit``
    an average cost per sample (a float: a fraction of the full model's cost); once the
    survivors of exit k could not all reach exit k + 1 within the batch's limit, they leave
    at exit k, flagged in :attr:`EngineOutput.forced` (:mod:`eenet.runtime.guard` gives the
    rule and the bound). Every mode applies the same rule to the same counts, so full, mask
    and compact agree; compact mode reads the counts from its survivor counts (no extra host
    sync) and writes the forced rows from the op's results at exit k (no extra stage).
    Without a guard nothing changes.

    Telemetry (on unless ``telemetry=False``, which saves its few device ops per call):
    after each call, :attr:`last_telemetry` is the batch's
    :class:`~eenet.runtime.telemetry.Telemetry` (rows per exit, forced rows, rows with
    non-finite logits, cost spent and allowed), :meth:`telemetry_totals` the sums since the
    engine was made or :meth:`reset_telemetry`. Costs come from the guard, or from
    ``costs`` (a :class:`~eenet.budget.Costs`, one value per exit) to price the exits
    without a guard. A call counts on the device and adds no host sync; reading does.

    Input checks: x must be a tensor with a batch dimension (``TypeError`` /
    ``ValueError`` naming it); a plain ``RuntimeError`` raised by the first stage on x (a
    dtype or shape the network does not take) comes back as ``TypeError`` (x's dtype is not
    the stage's parameters' dtype) or ``ValueError``, naming x, chained to the original; an
    exit head whose features do not fit its classifier raises ``ValueError`` naming the
    head. ``backend`` must be None or a name of :data:`eenet_kernels.BACKENDS`
    (``ValueError`` at construction; whether it runs on x's device is known at the call).

    Autocast and dtypes: under ``torch.autocast`` every mode runs the stages as autocast
    has them, and an exit's features in another dtype than its classifier are cast with its
    weights to their promoted dtype (:func:`eenet.nn.classifier_operands`), so the fused op
    and the reference score in fp32 as without autocast. A network cast to another dtype
    after the engine was made is served in the new dtype: compact mode's buffers and graph
    mode's graphs follow it.

    Buffers: compact mode keeps its stage and row-state buffers per bucket of input shapes:
    the batch size rounded up by :func:`bucket_rows` (at most 1/8 more rows), the other
    dimensions, dtypes and the row inputs' shapes exact. It keeps the ``cache_shapes``
    buckets used last, and between calls at most ``cache_bytes`` bytes of them (default
    :data:`CACHE_BYTES`, 256 MiB; 0 keeps nothing); a batch whose buffers alone exceed
    ``cache_bytes`` allocates them anew on every call. A server that pads its batches to a
    few sizes reuses the buffers and allocates nothing per batch. :attr:`buffer_bytes` is
    what the cache holds.

    Compiled mode: ``mode="compiled"`` runs the compact loop as one
    ``torch.compile(fullgraph=True)`` graph per device and input shape class
    (:mod:`eenet.runtime.compiled`), compiled on the first call with
    ``compile_backend`` (``"inductor"``, default: generated code for the stages, seconds to
    tens of seconds per graph on a CPU; ``"aot_eager"``: the captured graph run op by op,
    quick to compile; ``"eager"``). Survivor counts are unbacked sizes of the graph, so no
    exit pattern recompiles it; the batch dimension is dynamic (sizes >= 2 share a graph,
    save where a layer's kernel choice depends on the size, e.g. CPU convolutions at 16 rows).
    Results equal compact mode's up to float rounding (a row within rounding of a threshold
    may exit elsewhere). No budget guard (``ValueError``): the guard's cut is a host
    decision after every exit; the ops run the dispatcher's kernels (a ``backend`` override
    to another raises ``ValueError``). :attr:`compiled_graphs` and :attr:`compile_seconds`
    say what was compiled and how long it took. The lock, the input checks and the
    telemetry run outside the graph; the buffer cache is not used (the graph allocates).

    Graph mode: ``mode="graph"`` (CUDA tensors only) captures CUDA graphs per (stage,
    batch-size bucket) on static buffers (:mod:`eenet.runtime.graphs`; buckets
    ``graph_buckets``, default :data:`~eenet.runtime.graphs.DEFAULT_BUCKETS`; larger batches
    are served in chunks of the largest); each stage replays the smallest bucket holding the
    survivors, chosen after one device-to-host read of the survivor count per stage.
    ``graph_bucket_choice="device"`` chooses it on the device instead: one graph per
    first-stage bucket holds the whole batch, each later stage's buckets in CUDA graph
    conditional nodes, so a batch runs with no host sync (from torch's conditional-node
    capture, else from the extension's CUDA build, :mod:`eenet.runtime.graphs`; the first
    call says what is missing otherwise). It captures
    more: every stage at every bucket up to the batch's, per first-stage bucket. Graphs and
    static buffers are per input signature (the shapes past the batch dimension and the
    dtypes of x and the row inputs): the ``cache_shapes`` signatures used last are kept, an
    older one is dropped and captured again when it comes back.
    :attr:`graph_captures` (graphs captured) and :attr:`graph_bytes` report what was
    captured and held. No budget guard (``ValueError``).

    Threads: an engine keeps per-call state (its buffers) and runs one batch at a time; a
    call while another is running (from another thread) raises ``RuntimeError``. Give each
    worker thread (or CUDA stream) its own engine; engines can share the same ``net``.
    """

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy, mode: str = "compact",
                 backend: str | None = None, cache_shapes: int = 8,
                 cache_bytes: int = CACHE_BYTES, guard: BudgetGuard | None = None,
                 costs: Costs | None = None, telemetry: bool = True,
                 compile_backend: str = "inductor",
                 graph_buckets: Sequence[int] = DEFAULT_BUCKETS,
                 graph_bucket_choice: str = "host") -> None:
        from ..budget import Costs

        if mode not in ALL_MODES:
            raise ValueError(f"mode must be one of {ALL_MODES}, got {mode!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got "
                             f"{compile_backend!r}")
        if mode in ("compiled", "graph") and guard is not None:
            raise ValueError(f"mode={mode!r} does not support a budget guard: the guard "
                             "decides on the host after every exit, which a captured graph "
                             "cannot do; use mode='compact' with the guard")
        self.graph_buckets = check_buckets(graph_buckets)
        self.graph_bucket_choice = check_bucket_choice(graph_bucket_choice)
        if isinstance(cache_shapes, bool) or not isinstance(cache_shapes, int) or (
                cache_shapes < 1):
            raise ValueError(f"cache_shapes must be a positive int, got {cache_shapes!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or (
                cache_bytes < 0):
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        check_network(net, policy)
        num_exits = len(net.heads)
        if guard is not None:
            _check_guard(guard, num_exits)
        if costs is not None:
            if not isinstance(costs, Costs):
                raise TypeError(f"costs must be an eenet.budget.Costs, got "
                                f"{type(costs).__name__}")
            if len(costs.values) != num_exits:
                raise ValueError(f"costs has {len(costs.values)} values but the network has "
                                 f"{num_exits} exits")
            if guard is not None and (costs.values, costs.unit) != (guard.costs.values,
                                                                     guard.costs.unit):
                raise ValueError("costs differ from the guard's costs; give one of them")
        if backend is not None and backend not in ek.BACKENDS:
            raise ValueError(f"backend must be None or one of {ek.BACKENDS}, got {backend!r}")
        self.net = net.eval()
        self._policy = copy.deepcopy(policy)  # served by every mode, whatever policy becomes
        self.mode = mode
        self.backend = backend
        self.guard = guard
        self.compile_backend = compile_backend
        self._compiled: dict[torch.device, CompiledLoop] = {}
        self._graphs: dict[torch.device, GraphLoop] = {}
        self._rules = self._policy.rules()
        self._cache = _BufferCache(cache_shapes, cache_bytes)
        self._stage_kwargs_by_device: dict[torch.device, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._recorder = Recorder(num_exits, costs if costs is not None else (
            guard.costs if guard is not None else None), guarded=guard is not None
        ) if telemetry else None

    @property
    def num_exits(self) -> int:
        return len(self.net.heads)

    @property
    def policy(self) -> ExitPolicy:
        """A copy of the policy this engine serves (changing it changes nothing here)."""
        return copy.deepcopy(self._policy)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the compact mode's buffer cache."""
        return self._cache.nbytes

    @property
    def compiled_graphs(self) -> int:
        """Graphs compiled so far by compiled mode (0 in the other modes)."""
        return sum(loop.graphs for loop in self._compiled.values())

    @property
    def graph_captures(self) -> int:
        """Graph mode: (stage, bucket) graphs captured so far (0 in the other modes)."""
        return sum(loop.captures for loop in self._graphs.values())

    @property
    def graph_bytes(self) -> int:
        """Graph mode: bytes of the static buffers plus what the captures reserved."""
        return sum(loop.nbytes for loop in self._graphs.values())

    @property
    def compile_seconds(self) -> list[float]:
        """Compiled mode: the wall time of each call that compiled a graph, in seconds."""
        return [t for loop in self._compiled.values() for t in loop.compile_seconds]

    @property
    def last_telemetry(self) -> Telemetry | None:
        """The last call's telemetry (None before the first call); the first read of a
        call's telemetry waits for its counts (one host sync); None with telemetry off."""
        return None if self._recorder is None else self._recorder.last

    def telemetry_totals(self) -> Telemetry:
        """Telemetry summed over the calls since the engine was made or
        :meth:`reset_telemetry` (one host sync per device used)."""
        if self._recorder is None:
            raise RuntimeError("eenet.runtime.Engine: telemetry is off for this engine "
                               "(Engine(..., telemetry=True) counts the batches)")
        return self._recorder.totals()

    def reset_telemetry(self) -> None:
        """Zero the running telemetry totals."""
        if self._recorder is not None:
            self._recorder.reset()

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        _check_input(x, row_inputs)
        if self.net.training:
            raise RuntimeError("eenet.runtime.Engine: the network is in train mode (net.train() "
                               "was called after the engine was made); call net.eval() "
                               "before running the engine")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "eenet.runtime.Engine: this engine is already running a batch (called from "
                "another thread); an engine keeps per-call buffers and is not thread-safe: "
                "give each thread its own Engine (they can share the same net)")
        try:
            with torch.no_grad():
                if self.mode == "full":
                    out = simulate(self.net, self._policy, x, guard=self.guard, **row_inputs)
                elif self.mode == "mask":
                    out = self._run_mask(x, row_inputs)
                elif self.mode == "compiled":
                    out = self._run_compiled(x, row_inputs)
                elif self.mode == "graph":
                    out = self._run_graph(x, row_inputs)
                else:
                    out = self._run_compact(x, row_inputs)
                rows = x.shape[0]
                if self._recorder is not None:
                    self._recorder.record(out.exit_index, out.forced, out.logits,
                                          None if self.guard is None else
                                          self.guard.batch_limit(rows))
            return out
        finally:
            self._lock.release()

    def _ledger(self, rows: int) -> GuardLedger | None:
        return None if self.guard is None else self.guard.ledger(rows)

    def compact_loop(self, device: torch.device, purpose: str = "a compact loop runs"
                     ) -> CompactLoop:
        """The compact loop of this engine's network and policy on ``device`` as one module
        (:class:`~eenet.runtime.compiled.CompactLoop`), for ``torch.compile`` and
        ``torch.export``; a traced loop records the dispatcher's kernels, so a ``backend``
        override raises ``ValueError`` (``purpose`` starts its message)."""
        stage_kwargs = self.exit_op_kwargs(device)
        chosen = stage_kwargs[0]["backend"]
        if chosen != ek.ops.dispatcher_backend(device):
            raise ValueError(f"{purpose} the dispatcher's kernels "
                             f"({ek.ops.dispatcher_backend(device)!r} on {device}); backend "
                             f"{chosen!r} was requested")
        return CompactLoop(self.net, stage_kwargs, self._policy.needs_scores,
                           self._policy.needs_preds)

    def exit_op_kwargs(self, device: torch.device) -> list[dict[str, Any]]:
        """Per exit, the keyword arguments of ``eenet_kernels.exit_score`` /
        ``exit_score_write`` that do not change from batch to batch (the rule, its scheduler
        weights on ``device``, the backend), built once per device: what any executor that
        runs this policy's exits (the serving engine) hands the op."""
        kwargs = self._stage_kwargs_by_device.get(device)
        if kwargs is None:
            backend = ek.resolve_backend(device, self.backend)
            kwargs = []
            for k, rule in enumerate(self._rules):
                sched_weight = rule.sched_weight
                if sched_weight is not None:
                    sched_weight = sched_weight.to(device=device, dtype=torch.float32)
                kwargs.append({
                    "policy": rule.policy, "threshold": rule.threshold,
                    "is_last": k == len(self._rules) - 1, "sched_weight": sched_weight,
                    "sched_bias": rule.sched_bias, "use_vote": rule.use_vote,
                    "check_finite": False, "backend": backend})
            self._stage_kwargs_by_device[device] = kwargs
        return kwargs

    def _empty_output(self, x: torch.Tensor) -> EngineOutput:
        return EngineOutput.empty(x.shape[0], self.net.heads[-1].classifier.out_features,
                                  x.device)

    def _run_mask(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]) -> EngineOutput:
        n, k, device = x.shape[0], self.num_exits, x.device
        out = self._empty_output(x)
        rows = RowState(
            torch.arange(n, device=device),
            (torch.zeros(k, n, dtype=torch.float32, device=device)
             if self._policy.needs_scores else None),
            (torch.zeros(k, n, dtype=torch.int64, device=device)
             if self._policy.needs_preds else None),
            dict(row_inputs))
        run_stages(guarded_stages(self.net), x, rows, _MaskStep(
            self.net.heads, out, self.exit_op_kwargs(device), self._ledger(n)))
        return out

    def _run_compiled(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                      ) -> EngineOutput:
        device = x.device
        if x.shape[0] == 0:
            return self._empty_output(x)
        loop = self._compiled.get(device)
        if loop is None:
            loop = CompiledLoop(self.compact_loop(device, "mode='compiled' runs"),
                                self.compile_backend)
            self._compiled[device] = loop
        logits, exit_index, score = loop(x, row_inputs)
        return EngineOutput(logits, exit_index, score)

    def _run_graph(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                   ) -> EngineOutput:
        device = x.device
        if device.type != "cuda":
            raise ValueError(f"mode='graph' captures CUDA graphs and needs CUDA tensors, got x "
                             f"on {device}; use mode='compact' or 'compiled' there")
        if x.shape[0] == 0:
            return self._empty_output(x)
        loop = self._graphs.get(device)
        if loop is None:
            choice = self.graph_bucket_choice
            backend = CudaGraphs(device, conditional=choice == "device")
            loop = GraphLoop(self.net, self.exit_op_kwargs(device), self._policy.needs_scores,
                             self._policy.needs_preds, backend, self.graph_buckets, choice,
                             max_signatures=self._cache.max_entries)
            self._graphs[device] = loop
        logits, exit_index, score = loop(x, row_inputs)
        return EngineOutput(logits, exit_index, score)

    def _run_compact(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                     ) -> EngineOutput:
        n0, device = x.shape[0], x.device
        out = self._empty_output(x)
        if n0 == 0:
            return out
        size = bucket_rows(n0)
        key = (size, tuple(x.shape[1:]), x.dtype, device,
               tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in row_inputs.items()))
        buffers = self._cache.get(key, lambda: _Buffers(size, self.num_exits, self._policy,
                                                        device, row_inputs))
        stage_kwargs = self.exit_op_kwargs(device)
        try:
            # stage 0 reads no history and compacts into member 0: member 1 is the source
            first = buffers.state[1]
            rows = RowState(buffers.row_numbers[:n0], first.scores, first.preds,
                            dict(row_inputs))
            run_stages(guarded_stages(self.net), x, rows, _CompactStep(
                self.net.heads, out, stage_kwargs, buffers, stage_kwargs[0]["backend"],
                self._ledger(n0)))
        finally:
            self._cache.trim()
        return out


# -- argument checks -------------------------------------------------------------------------


def _check_guard(guard: object, num_exits: int) -> None:
    if not isinstance(guard, BudgetGuard):
        raise TypeError(f"guard must be an eenet.runtime.BudgetGuard, got "
                        f"{type(guard).__name__}")
    if guard.num_exits != num_exits:
        raise ValueError(f"the guard's costs have {guard.num_exits} values but the network "
                         f"has {num_exits} exits")


def _check_input(x: object, row_inputs: dict[str, object]) -> None:
    """x a tensor with a batch dimension, row inputs as :func:`_check_row_inputs`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor with one row per sample, got "
                        f"{type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension, (N, ...), got a 0-dim tensor")
    _check_row_inputs(x, row_inputs)


def exit_features(k: int, head: Any, h: object, rows: int,
                   row_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Exit head k's features of stage k's output h (and the row inputs it reads, see
    :func:`eenet.nn.head_row_inputs`): (rows, D) or (rows, D, S), D the head's classifier's
    ``in_features``; ``ValueError`` / ``TypeError`` naming the stage or the head otherwise."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"stage {k} returned a {type(h).__name__}, not a tensor")
    f = head.features(h, **head_row_inputs(head, row_inputs))
    d = head.classifier.in_features
    if not isinstance(f, torch.Tensor) or f.dim() not in (2, 3) or f.shape[0] != rows or (
            f.shape[1] != d):
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"exit head {k}: its features must be ({rows}, {d}) or ({rows}, {d}, "
                         f"S) to fit its classifier (in_features = {d}) and the {rows} rows, "
                         f"got {got}")
    return f


# Messages of a device or library failure (a kernel fault, cuBLAS / cuDNN status), which
# torch raises as plain RuntimeError too: they are not about x and pass through unchanged.
_DEVICE_FAILURE = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                   "HIP error", "NCCL error")


def is_device_failure(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a failure of the machine rather than of the input: a subclass of
    ``RuntimeError`` (out of memory, accelerator errors) or an error of CUDA or its
    libraries."""
    return type(exc) is not RuntimeError or any(m in str(exc) for m in _DEVICE_FAILURE)


class _FirstStage:
    """Stage 0 as the loops call it: a plain ``RuntimeError`` it raises on x comes back as
    ``TypeError`` (x's dtype is not the stage's parameters') or ``ValueError`` naming x;
    subclasses (out of memory, accelerator errors) and device or library failures pass
    through as they are."""

    def __init__(self, stage: torch.nn.Module) -> None:
        self.stage = stage

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        try:
            return self.stage(x, **row_inputs)
        except RuntimeError as exc:
            if is_device_failure(exc):
                raise
            dtype = next((p.dtype for p in self.stage.parameters() if p.is_floating_point()),
                         None)
            # integer ids into an embedding are the right dtype: a failure there is not one
            takes_ids = not x.is_floating_point() and any(
                isinstance(m, torch.nn.Embedding) for m in self.stage.modules())
            if dtype is not None and x.dtype != dtype and not takes_ids:
                raise TypeError(f"x has dtype {x.dtype} but the network's first stage computes "
                                f"in {dtype} and fails on it: {exc}") from exc
            raise ValueError(f"x of shape {tuple(x.shape)} and dtype {x.dtype} does not fit the "
                             f"network's first stage, which fails on it: {exc}") from exc


def guarded_stages(net: torch.nn.Module) -> list[Callable[..., torch.Tensor]]:
    """The network's stages, the first one behind :class:`_FirstStage`."""
    stages: list[Callable[..., torch.Tensor]] = list(net.stages)
    stages[0] = _FirstStage(net.stages[0])
    return stages


def _check_row_inputs(x: torch.Tensor, row_inputs: dict[str, object]) -> None:
    for name, t in row_inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"row input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(f"row input {name!r} must have one row per input row, shape "
                             f"({x.shape[0]}, ...), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"row input {name!r} is on {t.device}, the input on {x.device}")

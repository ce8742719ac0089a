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

``mask`` and ``compact`` run the shared stage loop (:func:`eenet.runtime.loop.run_stages`).
All modes return results in the input order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import eenet_kernels as ek

from .loop import RowState, run_stages

if TYPE_CHECKING:  # annotations only: eenet.budget imports eenet.runtime (timing) and
    # eenet.policies imports eenet.budget, so importing policies here would be circular
    from ..policies.base import ExitPolicy

MODES: tuple[str, ...] = ("full", "mask", "compact")
CACHE_BYTES = 256 << 20
"""Default byte cap of the compact mode's buffer cache (256 MiB)."""


@dataclass
class EngineOutput:
    """Per-sample results in input order: logits (N, C) float32, exit_index (N,) int64,
    score (N,) float32 (the policy's score at the exit taken)."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    score: torch.Tensor

    @classmethod
    def empty(cls, n: int, num_classes: int, device: torch.device) -> EngineOutput:
        """Result buffers for n rows, to be written: logits and score zero, exit_index -1."""
        return cls(torch.zeros(n, num_classes, dtype=torch.float32, device=device),
                   torch.full((n,), -1, dtype=torch.int64, device=device),
                   torch.zeros(n, dtype=torch.float32, device=device))


@torch.no_grad()
def simulate(net: torch.nn.Module, policy: ExitPolicy, x: torch.Tensor,
             **row_inputs: torch.Tensor) -> EngineOutput:
    """Oracle: run every exit on every sample, then let the policy pick (reference math).
    ``row_inputs`` go to ``net`` as keyword arguments (see :class:`Engine`)."""
    _check_row_inputs(x, row_inputs)
    logits = [z.float() for z in net(x, **row_inputs)]
    exit_index, score = policy.decide(logits)
    stacked = torch.stack(logits, dim=1)
    chosen = stacked[torch.arange(x.shape[0], device=x.device), exit_index]
    return EngineOutput(chosen, exit_index, score)


def check_network(net: torch.nn.Module, policy: ExitPolicy) -> None:
    """Raise ``ValueError`` unless ``net`` has one exit head per stage and ``policy`` one
    rule per exit."""
    if len(net.stages) != len(net.heads):
        raise ValueError(f"the network has {len(net.stages)} stages but {len(net.heads)} "
                         "exit heads")
    policy.check_network(len(net.heads))


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
        self.row_numbers = torch.arange(rows, device=device)
        self.stage_out: dict[int, torch.Tensor] = {}
        self.state = (_StateBuffers.allocate(rows, exits, policy, device, row_inputs),
                      _StateBuffers.allocate(rows, exits, policy, device, row_inputs))
        self.nbytes = _nbytes(self.row_numbers) + self.state[0].nbytes + self.state[1].nbytes
        """Bytes held, kept up to date as stage buffers are allocated."""

    def stage(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Stage k's output buffer (B, *like.shape[1:]), like's dtype."""
        buf = self.stage_out.get(k)
        if buf is None:
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
    keeps every row's score and prediction."""

    def __init__(self, heads: torch.nn.ModuleList, out: EngineOutput,
                 stage_kwargs: list[dict[str, Any]]) -> None:
        self.heads = list(heads)
        self.out = out
        self.stage_kwargs = stage_kwargs
        self.active = torch.ones(out.exit_index.shape, dtype=torch.bool,
                                 device=out.exit_index.device)

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> ek.ExitScore:
        head = self.heads[k]
        res = ek.exit_score(head.features(h), head.classifier.weight, head.classifier.bias,
                            prev_scores=rows.prev_scores(k), prev_preds=rows.prev_preds(k),
                            **self.stage_kwargs[k])
        leaving = res.exit_mask & self.active
        self.out.logits[leaving] = res.logits[leaving]
        self.out.score[leaving] = res.score[leaving]
        self.out.exit_index[leaving] = k
        return res

    def advance(self, k: int, h: torch.Tensor, rows: RowState, res: ek.ExitScore
                ) -> tuple[torch.Tensor, RowState] | None:
        self.active &= res.keep
        if rows.scores is not None:
            rows.scores[k] = res.score
        if rows.preds is not None:
            rows.preds[k] = res.pred
        if not bool(self.active.any()):  # the batch waits for its slowest row
            return None
        return h, rows


class _CompactStep:
    """compact mode: ``exit_score_write`` writes the leaving rows' results at their input
    positions; ``compact`` moves the staying rows' activation and state (row index, row
    inputs, history with this exit's score and prediction as its newest entry) to the front of
    the other ping-pong member; ``take`` reads the survivor count (the host sync)."""

    def __init__(self, heads: torch.nn.ModuleList, out: EngineOutput,
                 stage_kwargs: list[dict[str, Any]], buffers: _Buffers, backend: str) -> None:
        self.heads = list(heads)  # indexing a ModuleList costs microseconds
        self.out = out
        self.stage_kwargs = stage_kwargs
        self.buffers = buffers
        self.backend = backend

    def exit(self, k: int, h: torch.Tensor, rows: RowState) -> ek.ExitScore:
        head = self.heads[k]
        return ek.exit_score_write(
            head.features(h), head.classifier.weight, head.classifier.bias,
            row_index=rows.index, exit_index=k, out_logits=self.out.logits,
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
        if h.shape[0] == 0:
            return None
        inputs = dict(zip(names, rest[:len(names)], strict=True))
        return h, RowState(index, dst.scores, dst.preds, inputs)


# -- the engine ------------------------------------------------------------------------------


class Engine:
    """Batched early-exit inference of a multi-exit network under an exit policy.

    ``net`` has ``stages`` and ``heads`` (``eenet.nn.MultiExitNetwork``); head k exposes
    ``features(h)`` ((N, D) or (N, D, S)) and ``classifier`` (the Linear the fused kernel
    consumes). ``engine(x)`` returns an :class:`EngineOutput`.

    Row inputs: ``engine(x, name=t, ...)`` passes per-row side inputs t, each (N, ...) on x's
    device, to every stage as ``stage(h, name=t)`` (e.g. the ``attention_mask`` of padded
    transformer batches); in compact mode they are compacted with the rows.

    Buffers: compact mode keeps its stage and row-state buffers per bucket of input shapes:
    the batch size rounded up by :func:`bucket_rows` (at most 1/8 more rows), the other
    dimensions, dtypes and the row inputs' shapes exact. It keeps the ``cache_shapes``
    buckets used last, and between calls at most ``cache_bytes`` bytes of them (default
    :data:`CACHE_BYTES`, 256 MiB; 0 keeps nothing); a batch whose buffers alone exceed
    ``cache_bytes`` allocates them anew on every call. A server that pads its batches to a
    few sizes reuses the buffers and allocates nothing per batch. :attr:`buffer_bytes` is
    what the cache holds.

    Threads: an engine keeps per-call state (its buffers) and runs one batch at a time; a
    call while another is running (from another thread) raises ``RuntimeError``. Give each
    worker thread (or CUDA stream) its own engine; engines can share the same ``net``.
    """

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy, mode: str = "compact",
                 backend: str | None = None, cache_shapes: int = 8,
                 cache_bytes: int = CACHE_BYTES) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(cache_shapes, bool) or not isinstance(cache_shapes, int) or (
                cache_shapes < 1):
            raise ValueError(f"cache_shapes must be a positive int, got {cache_shapes!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or (
                cache_bytes < 0):
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        check_network(net, policy)
        self.net = net.eval()
        self.policy = policy
        self.mode = mode
        self.backend = backend
        self._rules = policy.rules()
        self._cache = _BufferCache(cache_shapes, cache_bytes)
        self._stage_kwargs_by_device: dict[torch.device, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    @property
    def num_exits(self) -> int:
        return len(self.net.heads)

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the compact mode's buffer cache."""
        return self._cache.nbytes

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        _check_row_inputs(x, row_inputs)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "eenet.runtime.Engine: this engine is already running a batch (called from "
                "another thread); an engine keeps per-call buffers and is not thread-safe: "
                "give each thread its own Engine (they can share the same net)")
        try:
            with torch.no_grad():
                if self.mode == "full":
                    return simulate(self.net, self.policy, x, **row_inputs)
                if self.mode == "mask":
                    return self._run_mask(x, row_inputs)
                return self._run_compact(x, row_inputs)
        finally:
            self._lock.release()

    def _stage_kwargs(self, device: torch.device) -> list[dict[str, Any]]:
        """Per exit, the op's keyword arguments that do not change from batch to batch (the
        rule, its scheduler weights on ``device``, the backend), built once per device."""
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
             if self.policy.needs_scores else None),
            (torch.zeros(k, n, dtype=torch.int64, device=device)
             if self.policy.needs_preds else None),
            dict(row_inputs))
        run_stages(self.net.stages, x, rows,
                   _MaskStep(self.net.heads, out, self._stage_kwargs(device)))
        return out

    def _run_compact(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                     ) -> EngineOutput:
        n0, device = x.shape[0], x.device
        out = self._empty_output(x)
        if n0 == 0:
            return out
        size = bucket_rows(n0)
        key = (size, tuple(x.shape[1:]), x.dtype, device,
               tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in row_inputs.items()))
        buffers = self._cache.get(key, lambda: _Buffers(size, self.num_exits, self.policy,
                                                        device, row_inputs))
        stage_kwargs = self._stage_kwargs(device)
        try:
            # stage 0 reads no history and compacts into member 0: member 1 is the source
            first = buffers.state[1]
            rows = RowState(buffers.row_numbers[:n0], first.scores, first.preds,
                            dict(row_inputs))
            run_stages(self.net.stages, x, rows, _CompactStep(
                self.net.heads, out, stage_kwargs, buffers, stage_kwargs[0]["backend"]))
        finally:
            self._cache.trim()
        return out


def _check_row_inputs(x: torch.Tensor, row_inputs: dict[str, object]) -> None:
    for name, t in row_inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"row input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(f"row input {name!r} must have one row per input row, shape "
                             f"({x.shape[0]}, ...), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"row input {name!r} is on {t.device}, the input on {x.device}")

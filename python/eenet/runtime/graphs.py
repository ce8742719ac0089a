"""The engine's ``graph`` mode: the compact loop as CUDA graphs captured per (stage,
batch-size bucket), replayed on static buffers.

Per stage k and bucket b a graph holds what compact mode runs eagerly for b rows: stage k on
the first b rows of the stage's static input buffers, exit head k's features, the fused
``exit_score_write`` (the leaving rows' results written at their input positions) and, except
after the last exit, ``compact_out`` of the staying rows' activation and state into the next
stage's static buffers, with the survivor count copied into a static device scalar. Between
stages the host reads that count (the one device-to-host read per stage) and replays the
next stage's graph of the smallest bucket that holds the survivors.

Rows of a bucket beyond the rows present are padding: stale rows of the static buffers
(zeros at first) whose row indices point into *trash rows*, one per bucket position, past
the largest batch in the result buffers, so that their results land there and nowhere else
(one trash row per position keeps every index of a call distinct, as the op requires).
Every graph sets the indices of the next stage's bucket rows to their trash rows before it
compacts the survivors over the first of them, so no stale index of an earlier batch
survives.

Graphs are captured on first use of a (stage, bucket) for an input signature (the trailing
shapes and dtypes of x and of every row input, and the autocast dtype if autocast is on);
:attr:`GraphLoop.captures` counts them and :attr:`GraphLoop.nbytes` reports the static
buffers' memory plus, on CUDA, what the captures reserved in their memory pool. A graph
reads the network's parameters and buffers where they were when it was captured: when one of
them has moved since (``net.to`` another dtype or device, a ``.data`` replaced; an in-place
``load_state_dict`` moves nothing), every signature's graphs and buffers are dropped and
captured again (checked on every call, some 0.16 us per parameter or buffer on a CPU host; a
parameter replaced by a new object, ``module.weight = nn.Parameter(...)``, is not seen: make
a new engine then). A stage that cannot be captured (it synchronises with the host or
allocates in a way CUDA graphs forbid) raises ``RuntimeError`` naming the stage and bucket.

Bucket choice on the device (``bucket_choice="device"``): instead of one graph per (stage,
bucket) and a host read between stages, one graph per first-stage bucket holds the whole
batch. After each exit, two device-side kernels (the survivor count's bucket, then its
comparison with every bucket number) set one boolean per bucket, and each bucket's stage
step at or below the batch's bucket sits in a CUDA graph conditional IF node on its
boolean, so exactly the smallest bucket that holds the survivors runs (none when no row goes
on). The survivor counts are zeroed at the start of the graph, so that a stage whose
predecessor did not run sees no survivors. A batch then runs with no host sync at all. It
needs conditional nodes, from one of two sources (:data:`IF_NODE_SOURCES`):
``"torch"``, a torch whose ``CUDAGraph`` has ``begin_capture_to_if_node`` (CUDA 12.4+), which
captures the body into the outer graph; or ``"eenet"``, the extension's
:func:`eenet_kernels.cuda_graphs.capture_if_node` (a CUDA build of eenet_kernels, CUDA 13),
which captures the body as a graph of its own on a side stream, into a memory pool shared by
the bodies, and appends an IF node holding a copy of it. ``"auto"`` takes torch's where it
exists. :func:`conditional_nodes_missing` says what is missing. It captures
``stages x buckets`` stage bodies per first-stage bucket. Neither source supports stages
that draw random numbers (torch's raises; with the extension's, a body's random offsets would
not advance between replays): the engine runs the network in eval mode, where dropout draws
none.

How a graph is captured and replayed is a :class:`GraphBackend`'s business:
:class:`CudaGraphs` captures ``torch.cuda.CUDAGraph`` objects sharing one memory pool;
:class:`EagerGraphs` records the stage function and calls it again on replay, so that the
host-side logic (bucket choice, static-buffer reuse, the trash slot, capture bookkeeping) is
tested on CPU against compact mode; its conditional branch tests the boolean on the host.

Not supported: the budget guard (the engine refuses it in this mode). Batches larger than
the largest bucket are served in chunks of it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

import eenet_kernels as ek
from eenet_kernels import cuda_graphs
from eenet_kernels.reference import autocast_on

from ..nn.heads import classifier_operands, head_row_inputs

__all__ = ["BUCKET_CHOICES", "DEFAULT_BUCKETS", "IF_NODE_SOURCES", "CudaGraphs", "EagerGraphs",
           "GraphBackend", "GraphLoop", "choose_bucket", "conditional_nodes_missing",
           "resolve_if_node_source"]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
# "host": a device-to-host read of the survivor count per stage; "device": conditional nodes
BUCKET_CHOICES: tuple[str, ...] = ("host", "device")
# where conditional IF nodes come from (module docstring)
IF_NODE_SOURCES: tuple[str, ...] = ("auto", "torch", "eenet")


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Strictly increasing positive ints, at least one: the graph mode's batch buckets."""
    out = tuple(buckets)
    if not out or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in out):
        raise ValueError(f"graph buckets must be positive ints, got {buckets!r}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"graph buckets must be strictly increasing, got {buckets!r}")
    return out


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` rows (1 <= n <= the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest graph bucket {buckets[-1]}")


def check_bucket_choice(choice: str) -> str:
    """One of :data:`BUCKET_CHOICES`."""
    if choice not in BUCKET_CHOICES:
        raise ValueError(f"graph bucket choice must be one of {BUCKET_CHOICES}, got {choice!r}")
    return choice


def conditional_nodes_missing(source: str = "auto") -> str | None:
    """Why CUDA graph conditional IF nodes from ``source`` (one of :data:`IF_NODE_SOURCES`)
    cannot be captured here, or ``None`` when they can: a CUDA 12.4+ build of torch, and
    for ``"torch"`` a ``torch.cuda.CUDAGraph`` with ``begin_capture_to_if_node``, for
    ``"eenet"`` CUDA 13 and the extension's CUDA build, for ``"auto"`` either."""
    if source not in IF_NODE_SOURCES:
        raise ValueError(f"if-node source must be one of {IF_NODE_SOURCES}, got {source!r}")
    if torch.version.cuda is None or torch.version.hip is not None:
        return f"torch {torch.__version__} is not a CUDA build"
    try:
        cuda = tuple(int(p) for p in torch.version.cuda.split(".")[:2])
    except ValueError:
        return f"unrecognised CUDA version {torch.version.cuda!r}"
    if cuda < (12, 4):
        return f"CUDA {torch.version.cuda} has no graph conditional nodes (they need 12.4)"
    why = {"torch": None, "eenet": None}
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        why["torch"] = (f"torch {torch.__version__} has no CUDAGraph.begin_capture_to_if_node "
                        "(conditional nodes in a stream capture)")
    if cuda < (13, 0):
        why["eenet"] = f"eenet_kernels' conditional nodes need CUDA 13, not {torch.version.cuda}"
    else:
        why["eenet"] = cuda_graphs.if_nodes_missing()
    if source != "auto":
        return why[source]
    if why["torch"] is None or why["eenet"] is None:
        return None
    return f"{why['torch']}, and {why['eenet']}"


def resolve_if_node_source(source: str = "auto") -> str:
    """``"torch"`` or ``"eenet"``: ``source``, or for ``"auto"`` torch's conditional nodes
    where this torch has them, else the extension's."""
    if source != "auto":
        return source
    return "torch" if conditional_nodes_missing("torch") is None else "eenet"


class Replayable(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """Captures a function into something that replays it on the same buffers."""

    def capture(self, fn: Callable[[], None]) -> Replayable: ...

    def branch(self, pred: torch.Tensor, fn: Callable[[], None]) -> None:
        """Inside a function being captured: ``fn``'s work runs on replay only where the 0-d
        bool tensor ``pred`` (on the capture's device, set earlier in the captured work)
        holds at that point of the replay."""

    def reserved_bytes(self) -> int: ...


class _Recorded:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class EagerGraphs:
    """A stand-in for CUDA graphs on any device: ``capture(fn)`` runs ``fn`` once and
    returns an object whose ``replay()`` runs it again, on the same static buffers."""

    def capture(self, fn: Callable[[], None]) -> Replayable:
        fn()
        return _Recorded(fn)

    def branch(self, pred: torch.Tensor, fn: Callable[[], None]) -> None:
        """Runs ``fn`` now if ``pred`` holds (read on the host)."""
        if bool(pred):
            fn()

    def reserved_bytes(self) -> int:
        return 0


class _WithBodies:
    """A captured graph and the body graphs of its extension-made IF nodes, whose memory
    pool holds what the copies of their nodes in the graph use: they live and go together."""

    def __init__(self, graph: torch.cuda.CUDAGraph, bodies: list[torch.cuda.CUDAGraph]) -> None:
        self.graph = graph
        self.bodies = bodies

    def replay(self) -> None:
        self.graph.replay()


def _uncached_casts() -> contextlib.AbstractContextManager[object]:
    """Under CUDA autocast, autocast again with its cast cache off: a graph captured with
    the cache on would read the bf16/fp16 copies of the weights that the cache holds, which
    are freed when the caller's autocast region ends, instead of casting them itself."""
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              cache_enabled=False)
    return contextlib.nullcontext()


class CudaGraphs:
    """``torch.cuda.CUDAGraph`` capture on ``device``: two warm-up calls on a side stream
    (lazy initialisations and autotuning happen outside the capture), then the capture into
    a memory pool that every graph of this backend shares (they replay one after another on
    one stream, and their temporaries are dead between replays). Under autocast the capture
    runs with autocast's cast cache off (the graph casts the weights itself). ``conditional=True``
    enables :meth:`branch`, with IF nodes from ``if_nodes`` (one of
    :data:`IF_NODE_SOURCES`; ``RuntimeError`` saying what is missing where that source has
    none)."""

    def __init__(self, device: torch.device, conditional: bool = False,
                 if_nodes: str = "auto") -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        missing = conditional_nodes_missing(if_nodes)  # also checks the source's name
        if conditional and missing is not None:
            raise RuntimeError(f"graph bucket choice 'device' needs CUDA graph conditional "
                               f"nodes: {missing}; use the bucket choice 'host'")
        self.conditional = conditional
        self.if_nodes = resolve_if_node_source(if_nodes) if conditional else None
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self._reserved = 0
        # "eenet" if-nodes: bodies are graphs of their own, captured one after another on a
        # stream of their own into a pool of their own (the outer capture holds self.pool);
        # those of the capture running, kept with its graph afterwards
        self._bodies: list[torch.cuda.CUDAGraph] = []
        if self.if_nodes == "eenet":
            self._body_pool = torch.cuda.graph_pool_handle()
            self._body_stream = torch.cuda.Stream(device)

    def _run_on(self, stream: torch.cuda.Stream, fn: Callable[[], None], times: int = 1
                ) -> None:
        """``fn`` called ``times`` times on ``stream`` (not capturing), ordered after the
        current stream's work and before what it queues next."""
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(times):
                fn()
        current.wait_stream(stream)

    def capture(self, fn: Callable[[], None]) -> Replayable:
        with _uncached_casts():
            self._run_on(self.stream, fn, times=2)
            before = torch.cuda.memory_reserved(self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    fn()
            finally:
                bodies, self._bodies = self._bodies, []
        self._reserved += max(0, torch.cuda.memory_reserved(self.device) - before)
        return _WithBodies(graph, bodies) if bodies else graph

    def branch(self, pred: torch.Tensor, fn: Callable[[], None]) -> None:
        """During the capture, ``fn`` goes into a conditional IF node on ``pred``. During the
        warm-up calls (no capture running) ``fn`` runs whatever ``pred`` holds, so that every
        branch's lazy initialisations happen before the capture."""
        if not self.conditional:
            raise RuntimeError("this CudaGraphs backend was made without conditional=True")
        if not torch.cuda.is_current_stream_capturing():
            if self.if_nodes == "eenet":
                # on the stream the body will be captured on: lazy per-stream state (cuBLAS's
                # workspace) is made now, not inside the capture
                self._run_on(self._body_stream, fn)
            else:
                fn()
            return
        if self.if_nodes == "eenet":
            self._branch_as_body_graph(pred, fn)
            return
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(pred)
        try:
            fn()
        finally:
            graph.end_capture_to_conditional_node()

    def _branch_as_body_graph(self, pred: torch.Tensor, fn: Callable[[], None]) -> None:
        # the body stream must not wait on the capturing stream: that would join it to the
        # outer capture; nothing runs during a capture, so there is nothing to order
        body = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.stream(self._body_stream):
            body.capture_begin(pool=self._body_pool)
            try:
                fn()
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture is broken already
                    body.capture_end()
                raise
            body.capture_end()
        cuda_graphs.capture_if_node(pred, body)
        self._bodies.append(body)  # its pool holds the memory of the copied nodes

    def reserved_bytes(self) -> int:
        return self._reserved


@dataclass
class _StageBuffers:
    """Static per-row state of the rows entering one stage, ``rows`` = the largest bucket:
    activation (rows, ...), row index (rows,) int64, row inputs (rows, ...), the history of
    earlier exits' scores (K, rows) float32 and predictions (K, rows) int64 (or None)."""

    x: torch.Tensor
    index: torch.Tensor
    inputs: dict[str, torch.Tensor]
    scores: torch.Tensor | None
    preds: torch.Tensor | None

    def nbytes(self) -> int:
        ts = [self.x, self.index, *self.inputs.values()]
        ts += [t for t in (self.scores, self.preds) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


class _StageFailed(Exception):
    """Raised out of a stage step during a capture: which stage, at which bucket."""

    def __init__(self, stage: int, bucket: int) -> None:
        super().__init__(f"stage {stage} (bucket of {bucket} rows) failed")
        self.stage = stage
        self.bucket = bucket


class GraphLoop:
    """The compact loop of ``net`` under fixed exit rules as replayed graphs (module
    docstring). ``stage_kwargs``: per exit, the keyword arguments of
    ``ek.exit_score_write`` that do not change from batch to batch
    (:meth:`eenet.runtime.Engine.exit_op_kwargs`). ``bucket_choice``: ``"host"`` (a graph
    per stage and bucket, the survivor count read between stages) or ``"device"`` (a graph
    per first-stage bucket, conditional nodes choose the later stages' buckets; the backend
    must support :meth:`GraphBackend.branch`). ``max_signatures``: the input signatures
    whose static buffers and graphs are kept, the least recently used dropped first (and
    captured again when it comes back). ``loop(x, row_inputs)`` returns
    ``(logits (N, C) float32, exit_index (N,) int64, score (N,) float32)`` in input order,
    fresh tensors each call."""

    def __init__(self, net: torch.nn.Module, stage_kwargs: Sequence[dict[str, Any]],
                 needs_scores: bool, needs_preds: bool, backend: GraphBackend,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, bucket_choice: str = "host",
                 max_signatures: int = 8) -> None:
        if isinstance(max_signatures, bool) or not isinstance(max_signatures, int) or (
                max_signatures < 1):
            raise ValueError(f"max_signatures must be a positive int, got {max_signatures!r}")
        self.stages = list(net.stages)
        self.heads = list(net.heads)
        self._weights = [*net.parameters(), *net.buffers()]
        self._weights_at: tuple = ()  # where they were when the plans were made
        self.stage_kwargs = [dict(kw) for kw in stage_kwargs]
        self.needs_scores = needs_scores
        self.needs_preds = needs_preds
        self.backend = backend
        self.buckets = check_buckets(buckets)
        self.bucket_choice = check_bucket_choice(bucket_choice)
        self.num_classes = self.heads[-1].classifier.out_features
        self.captures = 0
        self.max_signatures = max_signatures
        # per input signature, least recently used first: static buffers per stage, result
        # buffers, counts, graphs
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes of the static buffers of the input signatures kept, plus what the captures
        reserved in the backend's memory pool (a pool keeps its memory for later captures
        when a signature is dropped)."""
        return sum(p.nbytes() for p in self._plans.values()) + self.backend.reserved_bytes()

    def __call__(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights_at = tuple((t.data_ptr(), t.dtype) for t in self._weights)
        if weights_at != self._weights_at:  # the graphs would read freed or retyped memory
            self._plans.clear()
            self._weights_at = weights_at
        n_all = x.shape[0]
        step = self.buckets[-1]
        parts = [self._run_chunk(x[i:i + step], {k: v[i:i + step] for k, v in
                                                 row_inputs.items()})
                 for i in range(0, n_all, step)]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    # -- one chunk of at most the largest bucket -------------------------------------------

    def _run_chunk(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        plan = self._plan(x, row_inputs)
        first = plan.stage[0]
        b = choose_bucket(n, self.buckets)
        first.x[:n].copy_(x)
        for name, t in row_inputs.items():
            first.inputs[name][:n].copy_(t)
        first.index[:n].copy_(plan.arange[:n])
        first.index[n:b].copy_(plan.trash[n:b])
        plan.out_exit[:n].fill_(-1)
        if self.bucket_choice == "device":
            self._graph(plan, ("batch", b), functools.partial(self._batch_step, plan, b)
                        ).replay()
        else:
            last = len(self.stages) - 1
            for k in range(len(self.stages)):
                self._graph(plan, (k, b), functools.partial(self._stage_step, plan, k, b)
                            ).replay()
                if k == last:
                    break
                survivors = int(plan.counts[k])  # the stage's one device-to-host read
                if survivors == 0:
                    break
                b = choose_bucket(survivors, self.buckets)
        return plan.out_logits[:n].clone(), plan.out_exit[:n].clone(), plan.out_score[:n].clone()

    def _graph(self, plan: _Plan, key: tuple, step: Callable[[], None]) -> Replayable:
        graph = plan.graphs.get(key)
        if graph is None:
            try:
                graph = self.backend.capture(step)
            except Exception as exc:
                if isinstance(exc, _StageFailed):
                    where, cause = f"stage {exc.stage} (bucket of {exc.bucket} rows)", exc.__cause__
                elif key[0] == "batch":
                    where, cause = f"the batch graph (first bucket of {key[1]} rows)", exc
                else:
                    where, cause = f"stage {key[0]} (bucket of {key[1]} rows)", exc
                raise RuntimeError(
                    f"graph mode: {where} could not be captured: {type(cause).__name__}: "
                    f"{cause}. A stage captured in a CUDA graph must not synchronise with the "
                    "host (.item(), .tolist(), nonzero, printing a tensor) nor depend on "
                    "values read back; use mode='compact' for it") from cause
            plan.graphs[key] = graph
            self.captures += 1
        return graph

    def _batch_step(self, plan: _Plan, b0: int) -> None:
        """The whole batch from a first-stage bucket of b0 rows, each later stage's bucket
        chosen on the device: what a ``bucket_choice="device"`` graph records."""
        plan.counts.zero_()
        self._stage_step(plan, 0, b0)
        below = [b for b in self.buckets if b <= b0]
        for k in range(1, len(self.stages)):
            # bucket j + 1 of [0, *buckets] holds the count: bucket j's boolean (none for 0)
            torch.eq(plan.bucket_ids, torch.bucketize(plan.counts[k - 1], plan.bucket_bounds),
                     out=plan.branch_preds[k - 1])
            for j, b in enumerate(below):
                self.backend.branch(plan.branch_preds[k - 1, j],
                                    functools.partial(self._stage_step, plan, k, b))

    def _stage_step(self, plan: _Plan, k: int, b: int) -> None:
        """Stage k on the first b rows of its static buffers: what a graph records."""
        try:
            self._stage_work(plan, k, b)
        except Exception as exc:
            raise _StageFailed(k, b) from exc

    def _stage_work(self, plan: _Plan, k: int, b: int) -> None:
        src = plan.stage[k]
        inputs = {name: t[:b] for name, t in src.inputs.items()}
        h = self.stages[k](src.x[:b], **inputs)
        head = self.heads[k]
        f, weight, bias = classifier_operands(
            head, head.features(h, **head_row_inputs(head, inputs)))
        res = ek.exit_score_write(
            f, weight, bias, row_index=src.index[:b],
            exit_index=k, out_logits=plan.out_logits, out_score=plan.out_score,
            out_exit=plan.out_exit,
            prev_scores=None if src.scores is None else src.scores[:k, :b].t(),
            prev_preds=None if src.preds is None else src.preds[:k, :b].t(),
            **self.stage_kwargs[k])
        if k == len(self.stages) - 1:
            return
        dst = plan.stage[k + 1]
        dst.index[:b].copy_(plan.trash[:b])  # rows past the survivors are padding
        names = list(inputs)
        sources = [h, src.index[:b], *(inputs[name] for name in names)]
        targets = [dst.x[:b], dst.index[:b], *(dst.inputs[name][:b] for name in names)]
        if src.scores is not None and dst.scores is not None:
            sources += [*src.scores[:k, :b], res.score]
            targets += [*dst.scores[:k + 1, :b]]
        if src.preds is not None and dst.preds is not None:
            sources += [*src.preds[:k, :b], res.pred]
            targets += [*dst.preds[:k + 1, :b]]
        real = src.index[:b] < plan.trash[0]  # padding rows never go on, whatever they score
        count = ek.compact(res.keep & real, sources, out=targets,
                           backend=self.stage_kwargs[k]["backend"])[1]
        plan.counts[k].copy_(count)

    # -- static buffers per input signature ------------------------------------------------

    def _plan(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]) -> _Plan:
        """The plan of x's signature, made on first use (its static buffers ordinary tensors,
        also under torch.inference_mode: later calls outside it write them too)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device,
               tuple((name, tuple(t.shape[1:]), t.dtype) for name, t in row_inputs.items()),
               torch.get_autocast_dtype(x.device.type) if autocast_on(x) else None)
        plan = self._plans.pop(key, None)
        if plan is None:
            while len(self._plans) >= self.max_signatures:
                self._plans.popitem(last=False)  # its graphs and buffers go with it
            with torch.inference_mode(False):
                plan = self._allocate(x, row_inputs)
        self._plans[key] = plan  # most recently used last
        return plan

    def _allocate(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]) -> _Plan:
        rows, device = self.buckets[-1], x.device
        k_exits = len(self.stages)
        # each stage's input shape, from one row run through the stages (a probe, untimed)
        shapes, dtypes = [], []
        h = x[:1]
        probe_inputs = {name: t[:1] for name, t in row_inputs.items()}
        for k, stage in enumerate(self.stages):
            shapes.append(tuple(h.shape[1:]))
            dtypes.append(h.dtype)
            if k < k_exits - 1:
                h = stage(h, **probe_inputs)

        def history(dtype: torch.dtype, needed: bool) -> torch.Tensor | None:
            return torch.zeros((k_exits, rows), dtype=dtype, device=device) if needed else None

        stage = [_StageBuffers(
            torch.zeros((rows, *shape), dtype=dtype, device=device),
            torch.arange(rows, 2 * rows, device=device),
            {name: torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=device)
             for name, t in row_inputs.items()},
            history(torch.float32, self.needs_scores), history(torch.int64, self.needs_preds))
            for shape, dtype in zip(shapes, dtypes, strict=True)]
        return _Plan(
            stage=stage, arange=torch.arange(rows, device=device),
            trash=torch.arange(rows, 2 * rows, device=device),
            out_logits=torch.zeros((2 * rows, self.num_classes), dtype=torch.float32,
                                   device=device),
            out_score=torch.zeros((2 * rows,), dtype=torch.float32, device=device),
            out_exit=torch.full((2 * rows,), -1, dtype=torch.int64, device=device),
            counts=torch.zeros((k_exits,), dtype=torch.int64, device=device),
            bucket_bounds=torch.tensor((0, *self.buckets), dtype=torch.int64, device=device),
            bucket_ids=torch.arange(1, len(self.buckets) + 1, device=device),
            branch_preds=torch.zeros((max(k_exits - 1, 0), len(self.buckets)),
                                     dtype=torch.bool, device=device))


@dataclass
class _Plan:
    """Everything one input signature's graphs read and write: per stage its static input
    buffers, the result buffers (rows ``rows .. 2 rows - 1`` are the trash rows, ``trash``
    their indices), the survivor count of every exit, for bucket choice "device" the bucket
    bounds ``[0, *buckets]``, the bucket numbers ``1 .. len(buckets)`` and the conditional
    nodes' booleans (exit k - 1, bucket j: whether stage k runs at bucket j), and the graphs
    captured so far by (stage, bucket), or by ("batch", first bucket)."""

    stage: list[_StageBuffers]
    arange: torch.Tensor
    trash: torch.Tensor
    out_logits: torch.Tensor
    out_score: torch.Tensor
    out_exit: torch.Tensor
    counts: torch.Tensor
    bucket_bounds: torch.Tensor
    bucket_ids: torch.Tensor
    branch_preds: torch.Tensor
    graphs: dict[tuple, Replayable] = field(default_factory=dict)

    def nbytes(self) -> int:
        ts = [self.out_logits, self.out_score, self.out_exit, self.counts, self.arange,
              self.trash, self.bucket_bounds, self.bucket_ids, self.branch_preds]
        return sum(s.nbytes() for s in self.stage) + sum(
            t.numel() * t.element_size() for t in ts)

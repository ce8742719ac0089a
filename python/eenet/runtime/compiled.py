"""The engine's ``compiled`` mode: the compact loop as one ``torch.compile(fullgraph=True)``
graph.

Per stage k the graph holds what compact mode runs eagerly: stage k, exit head k's features,
``eenet::exit_score_write`` (the leaving rows' results written at their input positions),
``eenet::compact_out`` of the staying rows' activation and state into fresh buffers, and
:func:`eenet_kernels.take`, whose count becomes an unbacked symbolic size (bounded by
``torch._check``; the ops' fake kernels give every output shape in terms of it). One graph
serves every survivor pattern: the counts are sizes of the graph, not constants of it. The
batch dimension of the input and the row inputs is marked dynamic
(``torch._dynamo.maybe_mark_dynamic``), so batch sizes >= 2 of one input shape share a graph
too (a batch of 1 is specialised by PyTorch and gets its own, as do the size ranges where
a layer picks its kernel by batch size: CPU convolutions at 16 rows).

What differs from eager compact mode:

- every stage runs, on the rows that survive: a data-dependent early stop would break the
  graph. When no row survives an exit, one placeholder row goes on (the compacted buffers'
  row 0, its index set to n0, a trash slot one past the batch in the result buffers), since
  layers such as batch norm cannot be traced on a size that may be 0;
- buffers are the graph's own (allocated inside it, planned by the compiler), not the
  engine's buffer cache, and the history of earlier exits' scores and predictions travels
  as one (n,) tensor per exit;
- the first stage is called directly (no rewording of its errors);
- the budget guard is not supported: its cut reads the survivor count as a Python int after
  every exit, which a single graph cannot do (the engine refuses ``guard=`` in this mode).

The lock, the input checks and the telemetry stay outside the graph, in
:class:`~eenet.runtime.Engine`.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

import eenet_kernels as ek

from ..nn.heads import classifier_operands, head_row_inputs

COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
"""Backends of ``Engine(mode="compiled", compile_backend=...)``: ``inductor`` (default:
generated code for the stages around the ops' kernels; about 6 s per graph for a small model
on a 2-core CPU, 10 s for the first graph of a process), ``aot_eager`` (the graph captured and
functionalized through the fake kernels, then run op by op; 1-3 s), ``eager`` (capture
only)."""


class CompactLoop(torch.nn.Module):
    """The compact loop of a multi-exit network under fixed exit rules, as a module whose
    ``forward(x, row_inputs)`` returns ``(logits (N, C) float32, exit_index (N,) int64,
    score (N,) float32)`` in input order; written to be captured whole by ``torch.compile``.

    ``stage_kwargs``: per exit, the keyword arguments of ``ek.exit_score_write`` that do not
    change from batch to batch (rule, threshold, scheduler weights, backend)."""

    def __init__(self, net: torch.nn.Module, stage_kwargs: Sequence[dict[str, Any]],
                 needs_scores: bool, needs_preds: bool) -> None:
        super().__init__()
        self.stages = net.stages
        self.heads = net.heads
        self.stage_kwargs = [dict(kw) for kw in stage_kwargs]
        self.needs_scores = needs_scores
        self.needs_preds = needs_preds
        self.num_classes = net.heads[-1].classifier.out_features

    def forward(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n0, device = x.shape[0], x.device
        # one row more than the batch: the trash slot n0, where a placeholder row writes
        out_logits = torch.zeros((n0 + 1, self.num_classes), dtype=torch.float32,
                                 device=device)
        out_exit = torch.full((n0 + 1,), -1, dtype=torch.int64, device=device)
        out_score = torch.zeros((n0 + 1,), dtype=torch.float32, device=device)
        index = torch.arange(n0, device=device)
        names = list(row_inputs)
        inputs = dict(row_inputs)
        scores: list[torch.Tensor] = []  # per exit passed, the rows present: (n,) each
        preds: list[torch.Tensor] = []
        h = x
        last = len(self.stages) - 1
        for k, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            h = stage(h, **inputs)
            f, weight, bias = classifier_operands(
                head, head.features(h, **head_row_inputs(head, inputs)))
            n = index.shape[0]
            prev_scores = prev_preds = None
            if self.needs_scores:
                prev_scores = (torch.stack(scores, dim=1) if scores else
                               torch.zeros((n, 0), dtype=torch.float32, device=device))
            if self.needs_preds:
                prev_preds = (torch.stack(preds, dim=1) if preds else
                              torch.zeros((n, 0), dtype=torch.int64, device=device))
            res = ek.exit_score_write(
                f, weight, bias, row_index=index,
                exit_index=k, out_logits=out_logits, out_score=out_score, out_exit=out_exit,
                prev_scores=prev_scores, prev_preds=prev_preds, **self.stage_kwargs[k])
            if k == last:
                break
            if self.needs_scores:
                scores.append(res.score)
            if self.needs_preds:
                preds.append(res.pred)
            src = [h, index, *(inputs[name] for name in names), *scores, *preds]
            dst = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in src]
            for t, d in zip(src, dst, strict=True):
                # the placeholder row below holds real values (a row input may be indices
                # into an embedding), not whatever was there; detached, so that the buffer
                # never requires grad (the op refuses to write one)
                d[:1].copy_(t[:1].detach())
            dst[1] = torch.full((n,), n0, dtype=torch.int64, device=device)  # rows >= count
            count = ek.compact(res.keep, src, out=dst,
                               backend=self.stage_kwargs[k]["backend"])[1]
            # at least one row goes on: with no survivor, row 0 of the buffers is a
            # placeholder whose index is the trash slot (stages on 0 rows do not trace)
            h, index, *rest = ek.take(dst, count.clamp(min=1))
            torch._check(index.shape[0] >= 1)
            inputs = dict(zip(names, rest[:len(names)], strict=True))
            rest = rest[len(names):]
            # lists, appended to at the next stage (torch 2.11's dynamo unpacks *rest as a
            # tuple)
            scores, preds = list(rest[:len(scores)]), list(rest[len(scores):])
        return out_logits[:n0], out_exit[:n0], out_score[:n0]


def _run(loop: CompactLoop, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return loop(x, row_inputs)


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: torch.compile keeps its graphs (and counts
    them against ``recompile_limit``) per code object, so each compiled loop gets its own
    cache, freed with it, instead of every engine's graphs piling up on one function."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def _inductor_layouts() -> Any:
    """Inductor keeps the eager memory layouts: its layout optimisation (channels-last
    convolutions) disagrees with the strides of the compacted buffers at run time."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(layout_optimization=False)


class CompiledLoop:
    """A :class:`CompactLoop` behind ``torch.compile(fullgraph=True, backend=...)``, with
    the compile time of every graph it compiled (:attr:`compile_seconds`, one entry per
    call that compiled: that call's wall time, the graph's first run included)."""

    def __init__(self, loop: CompactLoop, backend: str) -> None:
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got "
                             f"{backend!r}")
        self.loop = loop
        self.backend = backend
        self.compile_seconds: list[float] = []
        self._backend_calls = 0  # a compile can call the backend more than once (restarts)
        self._fn = torch.compile(_own_code(_run), fullgraph=True, dynamic=None,
                                 backend=self._counting_backend(backend))

    def _counting_backend(self, backend: str) -> Any:
        from torch._dynamo import lookup_backend

        inner = lookup_backend(backend)

        def counted(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            self._backend_calls += 1
            return inner(gm, example_inputs)

        return counted

    @property
    def graphs(self) -> int:
        """Calls that compiled a graph so far (one per input shape class, not per survivor
        pattern)."""
        return len(self.compile_seconds)

    def __call__(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        for t in row_inputs.values():
            torch._dynamo.maybe_mark_dynamic(t, 0)
        before = self._backend_calls
        start = time.perf_counter()
        with torch._dynamo.config.patch(capture_scalar_outputs=True), _inductor_layouts():
            out = self._fn(self.loop, x, row_inputs)
        if self._backend_calls != before:
            self.compile_seconds.append(time.perf_counter() - start)
        return out


def compare_with_compact(net: torch.nn.Module, policy: Any, x: torch.Tensor, *,
                         compile_backend: str = "inductor", warmup: int = 3,
                         repeats: int = 20) -> dict[str, Any]:
    """CPU benchmark of compiled mode against eager compact mode on batch ``x`` (not part of
    the tests): both engines timed in the same run, interleaved, by
    :func:`eenet.runtime.timing.time_entries`. Returns the two :class:`Stats` (``compact``,
    ``compiled``), ``speedup`` (compact median / compiled median), ``compile_seconds`` (the
    compiled engine's first call) and whether the exits agree (``same_exits``)."""
    from .engine import Engine
    from .timing import time_entries, timed

    eager = Engine(net, policy, mode="compact")
    compiled = Engine(net, policy, mode="compiled", compile_backend=compile_backend)
    with torch.no_grad():
        same = torch.equal(eager(x).exit_index, compiled(x).exit_index)
        stats = time_entries({"compact": timed(lambda: eager(x)),
                              "compiled": timed(lambda: compiled(x))},
                             warmup=warmup, repeats=repeats, device=x.device)
    return {**stats, "speedup": stats["compact"].median / stats["compiled"].median,
            "compile_seconds": compiled.compile_seconds, "same_exits": same}

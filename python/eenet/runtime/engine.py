"""The batched early-exit engine.

Modes (DESIGN.md):
- ``full``: every stage on every row, decisions afterwards (the offline oracle of the EENet
  authors; no saving).
- ``mask``: every stage on every row still in the batch, exited rows frozen: the batch waits
  for its slowest sample (PABEE-style; stops early only when all rows have exited).
- ``compact``: our ops: ``exit_score_write`` at each exit, then ``compact`` of the
  survivors' state, so stage k+1 runs only on the rows still present. One host sync per
  stage (the survivor count); buffers are allocated once per batch shape.

All modes return results in the input order and agree with :func:`simulate` (tests).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

import eenet_kernels as ek

from ..policies.base import ExitPolicy

MODES: tuple[str, ...] = ("full", "mask", "compact")


@dataclass
class EngineOutput:
    """Per-sample results in input order: logits (N, C) float32, exit_index (N,) int64,
    score (N,) float32 (the policy's score at the exit taken)."""

    logits: torch.Tensor
    exit_index: torch.Tensor
    score: torch.Tensor


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


class _Buffers:
    """Per-batch-shape storage of the compact mode: one buffer per stage output for the
    activations, ping-pong pairs for the per-row state (row index, policy history, row
    inputs; stage k compacts into member k % 2, so source and destination always differ),
    and the row numbers 0..N0-1."""

    def __init__(self) -> None:
        self.stage_out: dict[int, torch.Tensor] = {}
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None

    def row_numbers(self, n0: int, device: torch.device) -> torch.Tensor:
        if self.rows is None:
            self.rows = torch.arange(n0, device=device)
        return self.rows

    def stage(self, k: int, like: torch.Tensor, n0: int) -> torch.Tensor:
        buf = self.stage_out.get(k)
        if buf is None:
            buf = like.new_empty((n0, *like.shape[1:]))
            self.stage_out[k] = buf
        return buf

    def pair(self, name: str, like: torch.Tensor, n0: int) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.pairs:
            shape = (n0, *like.shape[1:])
            self.pairs[name] = (like.new_empty(shape), like.new_empty(shape))
        return self.pairs[name]


class Engine:
    """Batched early-exit inference of a multi-exit network under an exit policy.

    ``net`` has ``stages`` and ``heads`` (``eenet.nn.MultiExitNetwork``); head k exposes
    ``features(h)`` ((N, D) or (N, D, S)) and ``classifier`` (the Linear the fused kernel
    consumes). ``engine(x)`` returns an :class:`EngineOutput`.

    Row inputs: ``engine(x, name=t, ...)`` passes per-row side inputs t, each (N, ...) on x's
    device, to every stage as ``stage(h, name=t)`` (e.g. the ``attention_mask`` of padded
    transformer batches); in compact mode they are compacted with the rows.

    Buffers: compact mode keeps one set of stage buffers per input shape (batch size
    included), for the ``cache_shapes`` shapes used last; a server that pads its batches to a
    few sizes reuses them and allocates nothing per batch. An engine is not thread-safe:
    give each worker thread (or CUDA stream) its own.
    """

    def __init__(self, net: torch.nn.Module, policy: ExitPolicy, mode: str = "compact",
                 backend: str | None = None, cache_shapes: int = 8) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(cache_shapes, bool) or not isinstance(cache_shapes, int) or (
                cache_shapes < 1):
            raise ValueError(f"cache_shapes must be a positive int, got {cache_shapes!r}")
        check_network(net, policy)
        self.net = net.eval()
        self.policy = policy
        self.mode = mode
        self.backend = backend
        self._rules = policy.rules()
        self._cache_shapes = cache_shapes
        self._buffers: OrderedDict[tuple, _Buffers] = OrderedDict()
        self._rule_kwargs: dict[torch.device, list[dict]] = {}

    @property
    def num_exits(self) -> int:
        return len(self.net.heads)

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> EngineOutput:
        _check_row_inputs(x, row_inputs)
        with torch.no_grad():
            if self.mode == "full":
                return simulate(self.net, self.policy, x, **row_inputs)
            if self.mode == "mask":
                return self._run_mask(x, row_inputs)
            return self._run_compact(x, row_inputs)

    # -- shared pieces ----------------------------------------------------------------------

    def _stage_kwargs(self, device: torch.device) -> list[dict]:
        """Per exit, the op's keyword arguments that do not change from batch to batch (the
        rule, its scheduler weights on ``device``, the backend), built once per device."""
        kwargs = self._rule_kwargs.get(device)
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
            self._rule_kwargs[device] = kwargs
        return kwargs

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        c = self.net.heads[-1].classifier.out_features
        return (torch.zeros(n, c, dtype=torch.float32, device=x.device),
                torch.zeros(n, dtype=torch.float32, device=x.device),
                torch.full((n,), -1, dtype=torch.int64, device=x.device))

    def _history(self, n: int, device: torch.device) -> tuple[torch.Tensor | None,
                                                               torch.Tensor | None]:
        k = self.num_exits
        scores = (torch.zeros(n, k, dtype=torch.float32, device=device)
                  if self.policy.needs_scores else None)
        preds = (torch.zeros(n, k, dtype=torch.int64, device=device)
                 if self.policy.needs_preds else None)
        return scores, preds

    # -- mask mode --------------------------------------------------------------------------

    def _run_mask(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]) -> EngineOutput:
        out_logits, out_score, out_exit = self._outputs(x)
        stage_kwargs = self._stage_kwargs(x.device)
        hist_scores, hist_preds = self._history(x.shape[0], x.device)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        h = x
        for k, (stage, head) in enumerate(zip(self.net.stages, self.net.heads, strict=True)):
            h = stage(h, **row_inputs)
            res = ek.exit_score(head.features(h), head.classifier.weight, head.classifier.bias,
                                prev_scores=_cols(hist_scores, k), prev_preds=_cols(hist_preds, k),
                                **stage_kwargs[k])
            leaving = res.exit_mask & active
            out_logits[leaving] = res.logits[leaving]
            out_score[leaving] = res.score[leaving]
            out_exit[leaving] = k
            active &= ~leaving
            if hist_scores is not None:
                hist_scores[:, k] = res.score
            if hist_preds is not None:
                hist_preds[:, k] = res.logits.argmax(dim=1)
            if not bool(active.any()):  # the batch waits for its slowest row
                break
        return EngineOutput(out_logits, out_exit, out_score)

    # -- compact mode -----------------------------------------------------------------------

    def _run_compact(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]
                     ) -> EngineOutput:
        n0 = x.shape[0]
        out_logits, out_score, out_exit = self._outputs(x)
        if n0 == 0:
            return EngineOutput(out_logits, out_exit, out_score)
        buffers = self._buffers_for(x, row_inputs)
        stage_kwargs = self._stage_kwargs(x.device)
        # the per-row state that travels with the survivors
        state: dict[str, torch.Tensor] = {"idx": buffers.row_numbers(n0, x.device)}
        hist_scores, hist_preds = self._history(n0, x.device)
        if hist_scores is not None:
            state["scores"] = hist_scores
        if hist_preds is not None:
            state["preds"] = hist_preds
        state.update({f"input:{name}": t for name, t in row_inputs.items()})
        last = len(stage_kwargs) - 1
        h = x
        for k, (stage, head) in enumerate(zip(self.net.stages, self.net.heads, strict=True)):
            h = stage(h, **row_inputs)
            res = ek.exit_score_write(
                head.features(h), head.classifier.weight, head.classifier.bias,
                row_index=state["idx"], exit_index=k, out_logits=out_logits,
                out_score=out_score, out_exit=out_exit,
                prev_scores=_cols(state.get("scores"), k), prev_preds=_cols(state.get("preds"), k),
                **stage_kwargs[k])
            if k == last:
                break
            if "scores" in state:
                state["scores"][:, k] = res.score
            if "preds" in state:
                state["preds"][:, k] = res.logits.argmax(dim=1)
            dst = [buffers.stage(k, h, n0),
                   *(buffers.pair(name, t, n0)[k % 2] for name, t in state.items())]
            kept, count = ek.compact(~res.exit_mask, [h, *state.values()], out=dst,
                                     backend=stage_kwargs[k]["backend"])
            h, *rest = ek.take(kept, count)  # the stage's one host sync
            state = dict(zip(state, rest, strict=True))
            row_inputs = {name: state[f"input:{name}"] for name in row_inputs}
            if h.shape[0] == 0:
                break
        return EngineOutput(out_logits, out_exit, out_score)

    def _buffers_for(self, x: torch.Tensor, row_inputs: dict[str, torch.Tensor]) -> _Buffers:
        key = (tuple(x.shape), x.dtype, x.device,
               tuple((name, tuple(t.shape), t.dtype) for name, t in row_inputs.items()))
        buffers = self._buffers.pop(key, None) or _Buffers()
        self._buffers[key] = buffers  # most recently used last
        while len(self._buffers) > self._cache_shapes:
            self._buffers.popitem(last=False)
        return buffers


def _check_row_inputs(x: torch.Tensor, row_inputs: dict[str, object]) -> None:
    for name, t in row_inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"row input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != x.shape[0]:
            raise ValueError(f"row input {name!r} must have one row per input row, shape "
                             f"({x.shape[0]}, ...), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"row input {name!r} is on {t.device}, the input on {x.device}")


def _cols(history: torch.Tensor | None, k: int) -> torch.Tensor | None:
    return None if history is None else history[:, :k]


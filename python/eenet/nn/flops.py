"""FLOPs of one module call, counted by ``torch.utils.flop_counter`` with the formulas it
lacks for ops that multi-exit networks run, and a check that nothing heavy went uncounted.

``torch.utils.flop_counter`` counts matrix products and convolutions by formula, per aten
op; an op without a formula counts 0. Three gaps matter here, and are closed while counting:

- ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode take a fused
  "fast path" (``aten._native_multi_head_attention``, ``aten._transformer_encoder_layer_fwd``)
  that has no formula: the fast path is switched off while counting, so the same maths runs
  as the separate matrix products it is made of.
- scaled dot-product attention on CPU (``aten._scaled_dot_product_flash_attention_for_cpu``,
  also what Hugging Face's ``sdpa`` attention runs there) and the backend-neutral fused kernel
  (``aten._scaled_dot_product_fused_attention_overrideable``) have none: :func:`attention_flops`.
- recurrent layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` through oneDNN, cuDNN or MIOpen)
  have none: :func:`rnn_flops` counts their gate matrix products.

An op the counter still does not know is caught by :func:`check_counted`: a module that
multiplies weight matrices needs at least 2 FLOPs per matrix value per sample, so counting
0 is an error and counting fewer is a warning, each naming the uncounted ops.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopFormula", "attention_flops", "check_counted", "count_call", "rnn_flops",
           "weight_matrix_values"]

# a formula in torch.utils.flop_counter's convention: called with the op's arguments, each
# tensor replaced by its shape, and ``out_shape``; returns the op's FLOPs
FlopFormula = Callable[..., int]

Shape = tuple[int, ...]


def attention_flops(query: Shape, key: Shape, value: Shape, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    """Scaled dot-product attention: Q K^T and P V, 2 FLOPs per multiply-add each.

    ``query`` (..., L, E), ``key`` (..., S, E), ``value`` (..., S, Ev); the leading
    dimensions (batch, query heads) are the query's, so grouped key/value heads count once
    per query head, as the kernels broadcast them. Softmax and scaling are not counted
    (as for every other op in ``torch.utils.flop_counter``).
    """
    *lead, length, e = query
    s, ev = key[-2], value[-1]
    rows = math.prod(lead)
    return 2 * rows * length * s * e + 2 * rows * length * s * ev


def _tokens(input_shape: Shape) -> int:
    """Time steps x rows of an RNN input, (T, N, in), (N, T, in) or packed (sum T, in)."""
    return math.prod(input_shape[:-1])


def rnn_flops(input: Shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """A fused recurrent layer: each gate matrix (input-to-hidden, hidden-to-hidden, the LSTM
    projection) multiplies one vector per time step and row, 2 FLOPs per matrix value.

    oneDNN's ``mkldnn_rnn_layer(input, w_ih, w_hh, b_ih, b_hh, ...)`` is one layer in one
    direction; cuDNN's ``_cudnn_rnn`` and MIOpen's ``miopen_rnn`` take every layer's and
    direction's weights as a list in their second argument. Each layer and direction runs
    over every time step, so the count is ``2 * tokens * (values of all weight matrices)``.
    Gate nonlinearities are not counted.
    """
    weights = args[0] if isinstance(args[0], list) else args[:2]  # a shape is a tuple
    matrices = sum(math.prod(w) for w in weights if w is not None and len(w) == 2)
    return 2 * _tokens(input) * matrices


def _known_formulas() -> dict[Any, FlopFormula]:
    aten = torch.ops.aten
    found: dict[Any, FlopFormula] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", attention_flops),
                          ("_scaled_dot_product_fused_attention_overrideable", attention_flops),
                          ("mkldnn_rnn_layer", rnn_flops), ("_cudnn_rnn", rnn_flops),
                          ("miopen_rnn", rnn_flops)):
        if hasattr(aten, name):  # an op this torch build lacks cannot run either
            found[getattr(aten, name)] = formula
    return found


@contextmanager
def _counting(formulas: Mapping[Any, FlopFormula] | None) -> Iterator[FlopCounterMode]:
    """A FlopCounterMode with this module's formulas and the caller's (which win), with the
    attention fast path off while it is active."""
    mapping = {**_known_formulas(), **(formulas or {})}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def count_call(fn: Callable[[], Any],
               formulas: Mapping[Any, FlopFormula] | None = None) -> tuple[int, Any]:
    """(FLOPs, result) of ``fn()``. ``formulas`` maps ops (``torch.ops.<ns>.<op>`` packets)
    to extra :data:`FlopFormula` s, for ops of your own."""
    with _counting(formulas) as counter:
        result = fn()
    return counter.get_total_flops(), result


class _OpsRun(TorchDispatchMode):
    """Records the ops a call runs that return new tensors (views only alias their input),
    and which of them take one of ``weights`` as an argument."""

    def __init__(self, weights: set[int]) -> None:
        super().__init__()
        self.weights = weights
        self.ops: set[Any] = set()
        self.on_weights: set[Any] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.ops.add(func.overloadpacket)
            if any(id(a) in self.weights for a in pytree.tree_leaves((args, kwargs))):
                self.on_weights.add(func.overloadpacket)
        return func(*args, **kwargs)


def _weight_matrices(module: nn.Module) -> list[nn.Parameter]:
    tables = {id(p) for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
              for p in m.parameters(recurse=False)}
    return [p for p in module.parameters() if p.dim() >= 2 and id(p) not in tables]


def _uncounted_ops(module: nn.Module, fn: Callable[[], Any],
                   formulas: Mapping[Any, FlopFormula] | None) -> list[str]:
    """The ops without a formula that ``fn()`` runs on the module's weight matrices, or
    failing that (a weight reached through a view), all the ops without one it runs."""
    with _counting(formulas) as counter:
        registry = counter.flop_registry
        with _OpsRun({id(p) for p in _weight_matrices(module)}) as run:
            fn()
    for ops in (run.on_weights, run.ops):
        uncounted = sorted(str(op) for op in ops if op not in registry)
        if uncounted:
            return uncounted
    return []


def weight_matrix_values(module: nn.Module) -> int:
    """Values in the module's parameters of two or more dimensions (the weights that matrix
    products and convolutions multiply), not counting embedding tables, which are read."""
    return sum(p.numel() for p in _weight_matrices(module))


def check_counted(what: str, module: nn.Module, flops_per_sample: float,
                  rerun: Callable[[], Any],
                  formulas: Mapping[Any, FlopFormula] | None = None) -> None:
    """Raise (0 FLOPs) or warn (fewer) when ``module``'s count per sample is below the
    2 FLOPs per weight-matrix value every sample needs, naming the ops ``rerun()`` runs that
    have no formula. ``what`` names the module in the message (e.g. ``"stage 2"``)."""
    needed = 2 * weight_matrix_values(module)
    if flops_per_sample >= needed * (1 - 1e-9):
        return
    ops = ", ".join(_uncounted_ops(module, rerun, formulas)) or "none found"
    how = ("torch.utils.flop_counter has no formula for some op it ran (ops without one: "
           f"{ops}); pass formulas={{op: formula}} (see eenet.nn.flops.FlopFormula) or use "
           "measured latency costs (eenet.budget.measure)")
    if flops_per_sample == 0:
        raise ValueError(f"{what} ({type(module).__name__}) counted 0 FLOPs although it holds "
                         f"{needed // 2} weight-matrix values: {how}")
    warnings.warn(f"{what} ({type(module).__name__}) counted {flops_per_sample:.4g} FLOPs per "
                  f"sample, fewer than the {needed:.4g} its weight matrices take at least: "
                  f"{how}", stacklevel=3)

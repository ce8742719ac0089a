"""Ahead-of-time export of the compact loop: :func:`export_engine` gives a
``torch.export.ExportedProgram`` of :class:`~eenet.runtime.compiled.CompactLoop` (the loop of
``Engine(mode="compiled")``: stages, ``eenet::exit_score_write``, ``eenet::compact_out`` and
:func:`eenet_kernels.take` per stage), traced once with ``torch.export.export(strict=False)``.

The batch dimension of ``x`` and of every row input is one dynamic ``torch.export.Dim``
(``batch``, >= 1), and each survivor count is an unbacked size of the graph (``take``'s
``.item()``), so one program serves every batch size and exit pattern. The ops appear in the
graph as ``torch.ops.eenet.*`` calls: ``torch.export.save`` writes them by name, and
``torch.export.load`` finds them once ``eenet_kernels`` is imported (import it before
loading). The program's ``.module()(x, **row_inputs)`` returns ``(logits, exit_index,
score)`` in input order, as ``Engine(net, policy, mode="compact")`` does (up to float
rounding: a row within rounding of a threshold may exit elsewhere).

:func:`package_engine` compiles that program ahead of time with AOTInductor into a ``.pt2``
package: generated C++ for the stages, the ``eenet`` ops called by name through the
package's proxy executor. ``torch._inductor.aoti_load_package(path)`` runs it from Python
(after ``import eenet_kernels``), and a C++ program runs it with
``torch::inductor::AOTIModelPackageLoader`` once it has loaded the ``eenet_ops`` library of
the CMake build (``examples/cpp``), with no Python in the process.

Fixed at export: the policy (rules, thresholds and scheduler weights are constants of the
graph), the network's weights (parameters of the program), x's dtype, device and
non-batch dimensions, the names, dtypes and non-batch dimensions of the row inputs. Not
in the program: the budget guard, the telemetry, the input checks and the empty batch (the
program takes >= 1 rows; ``Engine`` returns an empty result without running anything).
"""

from __future__ import annotations

import keyword
from typing import TYPE_CHECKING, Any

import torch

from .compiled import CompactLoop

if TYPE_CHECKING:
    from ..policies.base import ExitPolicy


def _loop_module(loop: CompactLoop, names: list[str]) -> torch.nn.Module:
    """A module around ``loop`` whose ``forward(x, *, name, ...)`` takes each row input as an
    explicit keyword argument (``torch.export`` mishandles a ``**row_inputs`` signature's
    dynamic shapes), calling ``loop(x, {name: tensor, ...})``."""
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name in ("x", "self"):
            raise ValueError(f"row input name {name!r} cannot be an argument of the exported "
                             "program (a Python identifier other than 'x' and 'self')")
    params = "".join(f", {name}" for name in names)
    star = ", *" if names else ""
    body = ", ".join(f"{name!r}: {name}" for name in names)
    source = (f"def forward(self, x{star}{params}):\n"
              f"    return self.loop(x, {{{body}}})\n")
    scope: dict[str, Any] = {}
    exec(compile(source, "<eenet.runtime.export>", "exec"), scope)

    class ExportedLoop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loop = loop

    ExportedLoop.forward = scope["forward"]  # type: ignore[method-assign]
    return ExportedLoop().eval()


def package_engine(net: torch.nn.Module, policy: ExitPolicy, path: str,
                   example_x: torch.Tensor, **example_row_inputs: torch.Tensor) -> str:
    """:func:`export_engine`, then AOTInductor: the compact loop compiled ahead of time into
    the package ``path`` (a ``.pt2`` file; about 20-40 s for a small CNN on 2 CPU cores).
    The package's ``run`` takes ``[x, *row_inputs]`` in the order given here and returns
    ``[logits, exit_index, score]``. Returns ``path``.

    Inductor keeps the eager memory layouts (``layout_optimization`` off): the compacted
    buffers must keep the strides ``compact_out`` checks, which a channels-last rewrite of
    the convolutions would change."""
    program = export_engine(net, policy, example_x, **example_row_inputs)
    return torch._inductor.aoti_compile_and_package(
        program, package_path=path, inductor_configs={"layout_optimization": False})


def export_engine(net: torch.nn.Module, policy: ExitPolicy, example_x: torch.Tensor,
                  **example_row_inputs: torch.Tensor) -> torch.export.ExportedProgram:
    """Export the compact loop of ``net`` under ``policy`` (module docstring).

    ``example_x`` (N, ...) with N >= 2 (PyTorch specialises sizes 0 and 1) and
    ``example_row_inputs`` (each (N, ...)) fix everything but the batch size. The network
    and the policy go through the engine's checks (``TypeError`` / ``ValueError`` naming the
    culprit), the example inputs through its input checks; the ops run the dispatcher's
    kernels (an ``EENET_BACKEND`` override to another raises ``ValueError``)."""
    from .engine import Engine, _check_input

    engine = Engine(net, policy, mode="compact", telemetry=False)  # the engine's checks
    _check_input(example_x, example_row_inputs)
    if example_x.shape[0] < 2:
        raise ValueError(f"example_x must have at least 2 rows (PyTorch specialises a batch "
                         f"of 0 or 1 and the program would take only that size), got "
                         f"{tuple(example_x.shape)}")
    loop = engine.compact_loop(example_x.device, "export_engine records")
    names = list(example_row_inputs)
    module = _loop_module(loop, names)
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = {"x": {0: batch}, **{name: {0: batch} for name in names}}
    with torch.no_grad():
        return torch.export.export(module, (example_x,), dict(example_row_inputs),
                                   dynamic_shapes=dynamic_shapes, strict=False)

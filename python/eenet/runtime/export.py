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
package's proxy executor. :func:`load_package` runs it from Python: a
:class:`PackagedEngine` around ``torch._inductor.aoti_load_package(path)`` (which runs it
alone, once ``eenet_kernels`` is imported, without checks) that checks the inputs against
what the package was made for (its :class:`PackageInputs`, stored in the package's
metadata under :data:`PACKAGE_INPUTS_KEY`) and answers an empty batch itself. A
C++ program runs the package with ``torch::inductor::AOTIModelPackageLoader`` once it has
loaded the ``eenet_ops`` library of the CMake build (``examples/cpp``), with no Python in the
process; it gets no such checks (``loader.get_metadata()`` holds the same JSON).

Fixed at export: the policy (rules, thresholds and scheduler weights are constants of the
graph), the network's weights (parameters of the program, shared with ``net`` until the
program is saved: an in-place change to ``net``'s weights changes what the program computes,
and ``torch.export.save`` writes them as they are then), x's dtype, device and
non-batch dimensions, the names, dtypes and non-batch dimensions of the row inputs. Not
in the program: the budget guard, the telemetry, the input checks and the empty batch (the
program takes >= 1 rows; ``Engine`` and :class:`PackagedEngine` return an empty result
without running anything; the raw package fails on 0 rows with an unbacked-size error such
as ``Expected u0 <= s77 but received 0``). A package also reads its inputs with contiguous
strides: :func:`package_engine` compiles it for contiguous inputs and
:class:`PackagedEngine` makes its inputs contiguous (the raw package returns wrong results
on a transposed view, without an error).
"""

from __future__ import annotations

import json
import keyword
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..modes import eval_mode
from .compiled import CompactLoop
from .engine import EngineOutput

if TYPE_CHECKING:
    from ..policies.base import ExitPolicy

__all__ = ["PACKAGE_INPUTS_KEY", "PackageInputs", "PackagedEngine", "export_engine",
           "load_package", "package_engine"]

PACKAGE_INPUTS_KEY = "eenet.package_inputs"
"""The metadata key under which :func:`package_engine` stores the package's
:class:`PackageInputs` (JSON, :meth:`PackageInputs.to_json`)."""


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: object) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def _shape_text(dims: tuple[int, ...], n: int | str = "N") -> str:
    return "(" + ", ".join(str(d) for d in (n, *dims)) + ")"


@dataclass(frozen=True)
class PackageInputs:
    """What a package of :func:`package_engine` takes, fixed when it was made: ``x`` of
    shape (N, *x_shape) and dtype ``x_dtype`` on a ``device_type`` device (``"cpu"``,
    ``"cuda"``); ``row_inputs``: per row input, in the package's order, (name, non-batch
    shape, dtype), each (N, *shape) on x's device; ``num_classes``: C of the (N, C) logits."""

    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    device_type: str
    row_inputs: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    num_classes: int

    @classmethod
    def of_examples(cls, example_x: torch.Tensor, example_row_inputs: Mapping[str, torch.Tensor],
                    num_classes: int) -> PackageInputs:
        """The inputs of a package made with these examples (each (N, ...))."""
        return cls(tuple(example_x.shape[1:]), example_x.dtype, example_x.device.type,
                   tuple((name, tuple(t.shape[1:]), t.dtype)
                         for name, t in example_row_inputs.items()), int(num_classes))

    def to_json(self) -> str:
        """``{"x": {"shape": [...], "dtype": "float32"}, "device_type": "cpu", "row_inputs":
        [{"name": ..., "shape": [...], "dtype": ...}, ...], "num_classes": C}``."""
        return json.dumps({
            "x": {"shape": list(self.x_shape), "dtype": _dtype_name(self.x_dtype)},
            "device_type": self.device_type,
            "row_inputs": [{"name": name, "shape": list(shape), "dtype": _dtype_name(dtype)}
                           for name, shape, dtype in self.row_inputs],
            "num_classes": self.num_classes})

    @classmethod
    def from_json(cls, text: str) -> PackageInputs:
        """The inverse of :meth:`to_json` (``ValueError`` on anything else)."""
        try:
            doc = json.loads(text)
            return cls(tuple(int(d) for d in doc["x"]["shape"]), _dtype_of(doc["x"]["dtype"]),
                       str(doc["device_type"]),
                       tuple((str(r["name"]), tuple(int(d) for d in r["shape"]),
                              _dtype_of(r["dtype"])) for r in doc["row_inputs"]),
                       int(doc["num_classes"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"malformed {PACKAGE_INPUTS_KEY} metadata {text!r}: {exc}"
                             ) from exc


class PackagedEngine:
    """A package of :func:`package_engine` loaded for Python (:func:`load_package`):
    ``engine(x, **row_inputs)`` returns ``(logits (N, C) float32, exit_index (N,) int64,
    score (N,) float32)`` in input order, on x's device, as the exported program does.

    Checked before the package runs (``inputs``: what it was made for): ``x`` and every row
    input must be tensors (``TypeError``) of the package's non-batch shape (``ValueError``)
    and dtype (``TypeError``: nothing is cast) on its device type (``ValueError``), the row
    inputs the package's names (``TypeError`` for a missing or unexpected one) with one row
    per row of x on x's device (``ValueError``). A batch of N = 0 returns empty results
    without running the package. Non-contiguous inputs are copied to contiguous ones (the
    layout the package was compiled for). ``runner``: the underlying
    ``torch._inductor.aoti_load_package`` model (no checks)."""

    def __init__(self, runner: Any, inputs: PackageInputs) -> None:
        self.runner = runner
        self.inputs = inputs

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.inputs
        self._check("x", x, spec.x_shape, spec.x_dtype)
        n = x.shape[0]
        names = [name for name, _, _ in spec.row_inputs]
        missing = [name for name in names if name not in row_inputs]
        unexpected = [name for name in row_inputs if name not in names]
        if missing or unexpected:
            what = "; ".join(part for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {unexpected}" if unexpected else "") if part)
            raise TypeError(f"the package takes the row inputs {names} (keyword arguments), "
                            f"got {list(row_inputs)}: {what}")
        for name, shape, dtype in spec.row_inputs:
            t = row_inputs[name]
            self._check(f"row input {name!r}", t, shape, dtype, n)
            if t.device != x.device:
                raise ValueError(f"row input {name!r} is on {t.device}, x on {x.device}")
        if n == 0:
            empty = EngineOutput.empty(0, spec.num_classes, x.device)
            return empty.logits, empty.exit_index, empty.score
        kwargs = {name: row_inputs[name].contiguous() for name in names}
        logits, exit_index, score = self.runner(x.contiguous(), **kwargs)
        return logits, exit_index, score

    def _check(self, what: str, t: object, shape: tuple[int, ...], dtype: torch.dtype,
               rows: int | None = None) -> None:
        want = _shape_text(shape, "N" if rows is None else rows)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of shape {want}, got "
                            f"{type(t).__name__}")
        if t.dim() != 1 + len(shape) or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{what} must have shape {want} (the package's shape, fixed "
                             f"when it was made), got {tuple(t.shape)}")
        if rows is not None and t.shape[0] != rows:
            raise ValueError(f"{what} must have one row per row of x, shape {want}, got "
                             f"{tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{what} has dtype {t.dtype} but the package takes {dtype} (fixed "
                            "when it was made; the package does not cast)")
        if t.device.type != self.inputs.device_type:
            raise ValueError(f"{what} is on {t.device} but the package runs on "
                             f"{self.inputs.device_type}")

    def __repr__(self) -> str:
        spec = self.inputs
        rows = "".join(f", {name}={_shape_text(shape)} {_dtype_name(dtype)}"
                       for name, shape, dtype in spec.row_inputs)
        return (f"PackagedEngine(x={_shape_text(spec.x_shape)} {_dtype_name(spec.x_dtype)} "
                f"on {spec.device_type}{rows}; C={spec.num_classes})")


def load_package(path: str | os.PathLike[str], *, device_index: int = -1,
                 run_single_threaded: bool = False) -> PackagedEngine:
    """Load a package of :func:`package_engine` (``path``, a ``.pt2`` file) as a
    :class:`PackagedEngine`. ``device_index`` and ``run_single_threaded`` go to
    ``torch._inductor.aoti_load_package`` (for a CUDA package: the device to load it to,
    -1 the current one; whether to run without the runner's thread synchronisation).
    ``ValueError`` if the package holds no :class:`PackageInputs` (it was not made by
    :func:`package_engine`: load it with ``torch._inductor.aoti_load_package``)."""
    runner = torch._inductor.aoti_load_package(os.fspath(path),
                                               run_single_threaded=run_single_threaded,
                                               device_index=device_index)
    text = runner.get_metadata().get(PACKAGE_INPUTS_KEY)
    if text is None:
        raise ValueError(f"{os.fspath(path)!r} holds no {PACKAGE_INPUTS_KEY!r} metadata: it was "
                         "not made by eenet.runtime.package_engine, or by one older than this "
                         "metadata (load it with torch._inductor.aoti_load_package, which "
                         "checks no inputs and fails on an empty batch)")
    return PackagedEngine(runner, PackageInputs.from_json(text))


def package_engine(net: torch.nn.Module, policy: ExitPolicy, path: str,
                   example_x: torch.Tensor, **example_row_inputs: torch.Tensor) -> str:
    """:func:`export_engine`, then AOTInductor: the compact loop compiled ahead of time into
    the package ``path`` (a ``.pt2`` file; about 20-40 s for a small CNN on 2 CPU cores).
    ``example_x`` (N >= 2, ...) and ``example_row_inputs`` (each (N, ...)) as
    :func:`export_engine`; the package is compiled for contiguous inputs (the examples are
    made contiguous first). Returns ``path``.

    Run it with :func:`load_package` (input checks, the empty batch). The package's raw
    ``run`` (C++, or ``torch._inductor.aoti_load_package``) takes ``[x, *row_inputs]``, in the
    order given here, contiguous, with N >= 1 rows, and returns ``[logits, exit_index,
    score]``; its metadata holds the :class:`PackageInputs` (JSON) under
    :data:`PACKAGE_INPUTS_KEY`.

    Inductor keeps the eager memory layouts (``layout_optimization`` off): the compacted
    buffers must keep the strides ``compact_out`` checks, which a channels-last rewrite of
    the convolutions would change."""
    if isinstance(example_x, torch.Tensor):
        example_x = example_x.contiguous()
    example_row_inputs = {name: t.contiguous() if isinstance(t, torch.Tensor) else t
                          for name, t in example_row_inputs.items()}
    program = export_engine(net, policy, example_x, **example_row_inputs)
    inputs = PackageInputs.of_examples(example_x, example_row_inputs,
                                       net.heads[-1].classifier.out_features)
    return torch._inductor.aoti_compile_and_package(
        program, package_path=path,
        inductor_configs={"layout_optimization": False,
                          "aot_inductor.metadata": {PACKAGE_INPUTS_KEY: inputs.to_json()}})


def export_engine(net: torch.nn.Module, policy: ExitPolicy, example_x: torch.Tensor,
                  **example_row_inputs: torch.Tensor) -> torch.export.ExportedProgram:
    """Export the compact loop of ``net`` under ``policy`` (module docstring).

    ``example_x`` (N, ...) with N >= 2 (PyTorch specialises sizes 0 and 1) and
    ``example_row_inputs`` (each (N, ...)) fix everything but the batch size. The network
    and the policy go through the engine's checks (``TypeError`` / ``ValueError`` naming the
    culprit), the example inputs through its input checks; the ops run the dispatcher's
    kernels (an ``EENET_BACKEND`` override to another raises ``ValueError``). The loop is
    recorded in eval mode; every submodule of ``net`` gets its own mode back afterwards."""
    with eval_mode(net):
        return _export(net, policy, example_x, example_row_inputs)


def _export(net: torch.nn.Module, policy: ExitPolicy, example_x: torch.Tensor,
            example_row_inputs: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
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

"""CUDA graph conditional IF nodes from the compiled extension, for a torch whose
``torch.cuda.CUDAGraph`` cannot capture into one itself (no ``begin_capture_to_if_node``).

The body is captured as a graph of its own, then :func:`capture_if_node` appends to the
capture running on the current stream an IF node, on a device-side boolean, whose body is a
copy of it::

    body = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.stream(side_stream):        # no wait on the capturing stream
        body.capture_begin(pool=body_pool)      # a pool of its own, not the outer graph's
        work()
        body.capture_end()
    capture_if_node(pred, body)                 # on the capturing stream
    # keep `body` (its memory pool holds the memory the copied nodes use)

On each replay the predicate is read where the IF node sits: ``work`` runs exactly when it
holds. :class:`eenet.runtime.graphs.CudaGraphs` does this for the engine's graph mode with
the device-side bucket choice. The C++ side is ``csrc/cuda/graph_if_launch.h``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops

__all__ = ["capture_if_node", "if_nodes_missing"]


def _binding() -> Callable[[int, int, int], None] | None:
    if not ops.HAVE_EXTENSION:
        return None
    from . import _C

    return getattr(_C, "capture_if_node", None)


def if_nodes_missing() -> str | None:
    """Why :func:`capture_if_node` cannot run here, or ``None`` when it can (the extension
    built with its CUDA kernels, ``EENET_CUDA=1``, against CUDA 13 headers)."""
    if not ops.HAVE_EXTENSION:
        return "the eenet_kernels extension is not built"
    if _binding() is None:
        return ("the eenet_kernels extension was built without its CUDA kernels "
                "(rebuild with EENET_CUDA=1)")
    return None


def capture_if_node(pred: torch.Tensor, body: torch.cuda.CUDAGraph) -> None:
    """Append a conditional IF node on ``pred`` with a copy of ``body`` as its body to the
    CUDA graph capture running on the current stream of ``pred``'s device.

    ``pred``: one-element bool CUDA tensor, set by earlier work of the capture; the graph
    reads it at its address on each replay, so it must stay alive and in place (a static
    buffer). ``body``: a ``torch.cuda.CUDAGraph(keep_graph=True)`` whose capture has ended,
    with no conditional node in it; keep it alive while the outer graph is replayed.

    Raises ``ValueError`` on a bad ``pred``, ``RuntimeError`` when the extension cannot do it
    (:func:`if_nodes_missing`), when the current stream is not capturing, or when a CUDA call
    fails (naming the call).
    """
    if (missing := if_nodes_missing()) is not None:
        raise RuntimeError(f"capture_if_node: {missing}")
    if not isinstance(pred, torch.Tensor):
        raise ValueError(f"capture_if_node: pred must be a tensor, got {type(pred).__name__}")
    if pred.device.type != "cuda" or pred.dtype != torch.bool or pred.numel() != 1:
        raise ValueError("capture_if_node: pred must be a one-element bool CUDA tensor, got "
                         f"{tuple(pred.shape)} {pred.dtype} on {pred.device}")
    with torch.cuda.device(pred.device):
        if not torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"capture_if_node: the current stream of {pred.device} is not "
                               "capturing a CUDA graph")
        stream = torch.cuda.current_stream(pred.device).cuda_stream
        _binding()(pred.data_ptr(), body.raw_cuda_graph(), stream)

"""One dispatch path: every public op call reaches ``torch.ops.eenet.<op>``.

The CUDA side is checked without a GPU: the front-end's choice for a CUDA device, the
kernel registered for the CUDA key, and fake CUDA tensors traced through the front-end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import eenet_kernels as ek
from eenet_kernels import ops
from eenet_kernels import triton as ek_triton

OPS = ("exit_score", "exit_score_write", "compact", "compact_out")


class OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.names.append(str(func.overloadpacket._qualified_op_name))
        return func(*args, **(kwargs or {}))


def exit_inputs(device: str) -> dict[str, torch.Tensor]:
    return {"feats": torch.randn(6, 4, device=device), "weight": torch.randn(3, 4, device=device),
            "row_index": torch.arange(6, device=device),
            "out_logits": torch.zeros(6, 3, device=device),
            "out_score": torch.zeros(6, device=device),
            "out_exit": torch.zeros(6, dtype=torch.int64, device=device)}


def call_all(device: str) -> None:
    t = exit_inputs(device)
    res = ek.exit_score(t["feats"], t["weight"], threshold=0.4)
    ek.exit_score_write(t["feats"], t["weight"], row_index=t["row_index"], exit_index=0,
                        out_logits=t["out_logits"], out_score=t["out_score"],
                        out_exit=t["out_exit"], threshold=0.4)
    ek.compact(res.keep, [t["feats"]])
    ek.compact(res.keep, [t["feats"]], out=[torch.empty(6, 4, device=device)])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_front_end_targets_the_eenet_op(name: str, device: str) -> None:
    assert ops.op_target(name, torch.device(device)) is getattr(torch.ops.eenet, name)


@pytest.mark.skipif(not ek_triton.is_available(), reason="triton cannot be imported")
@pytest.mark.skipif(ops.HAVE_CUDA_KERNELS, reason="built with the CUDA kernels: they hold the "
                    "CUDA key (test_cuda_key_runs_the_compiled_kernels)")
@pytest.mark.parametrize("name", OPS)
def test_cuda_key_runs_the_triton_launcher(name: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eenet::{name}", "CUDA")
    module = ek_triton.load()[0 if name.startswith("exit_score") else 1]
    assert ops.cuda_kernel(name) is getattr(module, name)
    assert ops.dispatcher_backend(torch.device("cuda")) == "triton"
    # asking for triton on CUDA is asking for the dispatcher's own kernel: same path
    assert ops.op_target(name, torch.device("cuda"), "triton") is getattr(torch.ops.eenet, name)


@pytest.mark.skipif(not ops.HAVE_CUDA_KERNELS, reason="built without the CUDA kernels")
@pytest.mark.parametrize("name", OPS)
def test_cuda_key_runs_the_compiled_kernels(name: str) -> None:
    assert "CUDA" in ek.compiled_backends(name)
    assert ops.dispatcher_backend(torch.device("cuda")) == "cuda"
    assert ops.op_target(name, torch.device("cuda"), "cuda") is getattr(torch.ops.eenet, name)
    if ek_triton.is_available():  # triton stays reachable as an override
        assert ops.op_target(name, torch.device("cuda"), "triton") is not getattr(
            torch.ops.eenet, name)


def test_no_second_operator_namespace() -> None:
    ek_triton.load()
    names = {s.name for s in torch._C._jit_get_all_schemas()
             if s.name.startswith("eenet") or "triton" in s.name.split("::")[0]}
    assert names == {f"eenet::{name}" for name in OPS}


def test_cpu_calls_reach_the_dispatcher() -> None:
    with OpRecorder() as rec:
        call_all("cpu")
    eenet_calls = [n for n in rec.names if n.startswith("eenet::")]
    assert eenet_calls == [f"eenet::{name}" for name in OPS]


def test_cuda_calls_reach_the_dispatcher_on_fake_tensors() -> None:
    """No GPU needed: fake CUDA tensors go through the same front-end path as real ones."""
    with FakeTensorMode(), OpRecorder() as rec:
        call_all("cuda")
    eenet_calls = [n for n in rec.names if n.startswith("eenet::")]
    assert eenet_calls == [f"eenet::{name}" for name in OPS]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_debug_override_on_cpu(backend: str) -> None:
    """A backend other than the dispatcher's choice is called directly (debugging only)."""
    device = torch.device("cpu")
    try:
        chosen = ops.resolve_backend(device, backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    target: Callable = ops.op_target("exit_score", device, backend)
    if chosen == ops.dispatcher_backend(device):
        assert target is torch.ops.eenet.exit_score
    else:
        assert target is not torch.ops.eenet.exit_score


def test_compiled_graph_holds_the_eenet_ops() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
        graphs.append(gm)
        return gm.forward

    def step(feats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        res = ek.exit_score(feats, weight, threshold=0.4)
        kept, _ = ek.compact(res.keep, [feats])
        return kept[0] + res.pred[:, None]

    feats, weight = torch.randn(5, 4), torch.randn(3, 4)
    got = torch.compile(step, backend=capture, fullgraph=True)(feats, weight)
    torch.testing.assert_close(got, step(feats, weight))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"eenet.exit_score", "eenet.compact"} <= targets

"""Shared fixtures and tolerance helpers.

Tolerance (README, "How tolerance is defined"): every backend is compared with
``eenet_kernels.reference`` evaluated in float32 on the same (upcast) inputs.
- float32 inputs: relative 1e-5 (plus a small absolute floor for values near zero).
- float16 / bfloat16 inputs: the error may not exceed twice the error that plain torch
  makes computing the same logits in that dtype (``F.linear`` in fp16/bf16 against the fp32
  reference), plus the float32 floor.
- decisions (exit_mask) must agree exactly, except rows whose reference score lies within
  the score tolerance of the threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import eenet_kernels as ek

FP32_RTOL = 1e-5
FP32_ATOL = 1e-5
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# backends that can run on CPU tensors in this build; "reference" is the oracle itself,
# compared against anyway so that the harness is exercised with the extension absent
CPU_BACKENDS = ("reference", "cpp") if ek.HAVE_EXTENSION else ("reference",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tiny models: OpenMP barriers only add synchronisation there
    (20x slower on a busy 2-core machine). Use with ``pytest.mark.usefixtures``."""
    with intra_op_threads(1):
        yield


@pytest.fixture(params=CPU_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def plain_torch_logit_error(feats: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> float:
    """Max abs error of plain torch computing the logits in feats.dtype vs the fp32 oracle."""
    exact = ek.reference.exit_logits(feats, weight, bias)
    if feats.dtype == torch.float32 or feats.shape[0] == 0:
        return 0.0
    x = feats.mean(dim=2) if feats.dim() == 3 else feats
    low = F.linear(x, weight, bias).float()
    return float((low - exact).abs().max())


def logit_tolerance(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    exact: torch.Tensor) -> float:
    """Absolute tolerance for logits of a backend vs the fp32 reference (see module doc)."""
    scale = float(exact.abs().max()) if exact.numel() else 0.0
    return FP32_ATOL + FP32_RTOL * scale + 2.0 * plain_torch_logit_error(feats, weight, bias)


def assert_decisions_agree(mask: torch.Tensor, ref_mask: torch.Tensor, ref_score: torch.Tensor,
                           threshold: float, score_tol: float) -> None:
    """exit masks equal, except rows whose reference score is within score_tol of threshold."""
    near = (ref_score - threshold).abs() <= score_tol
    differ = (mask != ref_mask) & ~near
    assert not bool(differ.any()), (
        f"decisions differ away from the threshold at rows {differ.nonzero().flatten().tolist()}")

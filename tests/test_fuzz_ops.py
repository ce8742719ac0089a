"""Edge cases found by fuzzing the ops, on every backend that runs here.

Each test states the defect it guards against. The oracle is always an independent
computation (``t[keep]``, float64 formulas), never the reference compared with itself;
where a case must fail, every backend must raise the same exception type and message.
Last, a seeded hypothesis fuzz compares every backend with the reference on random shapes,
strides, dtypes, policies and byte masks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eenet_kernels as ek
from eenet_kernels import triton as ek_triton

BACKENDS: list[str] = ["reference"]
if ek.HAVE_EXTENSION:
    BACKENDS.append("cpp")
if ek_triton.interpreting() and ek_triton.is_available():
    BACKENDS.append("triton")

pytestmark = pytest.mark.usefixtures("one_thread")


def raised(fn: Callable[[], Any]) -> tuple[type[BaseException], str] | None:
    """(type, message) of what ``fn`` raises, None when it returns."""
    try:
        fn()
    except Exception as exc:
        return type(exc), str(exc).splitlines()[0]
    return None


def assert_same_error(make: Callable[[str], Callable[[], Any]], kind: type[BaseException],
                      message: str) -> None:
    """Every backend (and the dispatcher's default) raises ``kind`` with ``message``."""
    for backend in [None, *BACKENDS]:
        got = raised(make(backend))
        assert got is not None, f"backend {backend}: no error"
        assert issubclass(got[0], kind), f"backend {backend}: {got}"
        assert got[1] == message, f"backend {backend}: {got[1]!r}"


def byte_mask(values: list[int] | torch.Tensor) -> torch.Tensor:
    """A bool tensor holding the given raw bytes (any non-zero byte means True)."""
    return torch.as_tensor(values, dtype=torch.uint8).view(torch.bool)


# ---------------------------------------------------------------------------------------
# Any non-zero bool byte is True (a uint8 tensor viewed as bool is a valid bool tensor).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 1003])
def test_compact_non_canonical_masks(backend: str, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    raw = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    raw[::3] = 0
    for keep in (byte_mask(raw), byte_mask(torch.full((n,), 2, dtype=torch.uint8)),
                 byte_mask(torch.randint(0, 256, (2 * n,), generator=gen,
                                         dtype=torch.uint8))[::2]):
        truth = keep.view(torch.uint8) != 0
        src = [torch.randn(n, 3, generator=gen), torch.arange(n), torch.randn(n, 2, 5).half()]
        want = [s[truth] for s in src]
        kept, count = ek.compact(keep, src, backend=backend)
        assert int(count) == int(truth.sum())
        for k, w in zip(kept, want, strict=True):
            assert torch.equal(k[: int(count)], w)
        dst = [torch.full((n + 4, *s.shape[1:]), 7, dtype=s.dtype) for s in src]
        _, count = ek.compact(keep, src, out=dst, backend=backend)
        assert int(count) == int(truth.sum())
        for d, w in zip(dst, want, strict=True):
            assert torch.equal(d[: int(count)], w)
            assert bool((d[int(count):] == 7).all())  # rows past n untouched, none written


# ---------------------------------------------------------------------------------------
# Aliasing: an output that overlaps an input would be read while written.


def exit_args(n: int = 4, c: int = 5, d: int = 3, n0: int = 6) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    return {"feats": torch.randn(n, d, generator=gen), "weight": torch.randn(c, d, generator=gen),
            "bias": torch.randn(c, generator=gen), "row_index": torch.tensor([1, 0, 3, 2]),
            "exit_index": 1, "out_logits": torch.zeros(n0, c), "out_score": torch.zeros(n0),
            "out_exit": torch.zeros(n0, dtype=torch.int64)}


def write_call(args: dict[str, Any], **kw: Any) -> Callable[[str | None], Callable[[], Any]]:
    def make(backend: str | None) -> Callable[[], Any]:
        a = dict(args)
        feats, weight, bias = a.pop("feats"), a.pop("weight"), a.pop("bias")
        return lambda: ek.exit_score_write(feats, weight, bias, backend=backend, **a, **kw)
    return make


def test_write_output_aliasing_row_index_is_rejected() -> None:
    args = exit_args()
    shared = torch.tensor([1, 0, 3, 2])
    args.update(row_index=shared, out_exit=shared, out_score=torch.zeros(4),
                out_logits=torch.zeros(4, 5), exit_index=1000)
    assert_same_error(write_call(args, is_last=True), ValueError,
                      "eenet.exit_score_write: out_exit overlaps row_index; pass a separate "
                      "buffer")
    assert torch.equal(shared, torch.tensor([1, 0, 3, 2]))


def test_write_prediction_output_aliasing_row_index_is_rejected() -> None:
    args = exit_args()
    shared = torch.tensor([1, 0, 3, 2])
    args.update(row_index=shared, out_logits=shared, out_score=torch.zeros(4),
                out_exit=torch.zeros(4, dtype=torch.int64))
    assert_same_error(write_call(args, is_last=True), ValueError,
                      "eenet.exit_score_write: out_logits overlaps row_index; pass a separate "
                      "buffer")


def test_write_into_feats_is_rejected() -> None:
    args = exit_args(n=6, c=3, d=3)
    args["row_index"] = torch.arange(6)
    args["out_logits"] = args["feats"]
    args["weight"] = args["weight"][:3]
    args["bias"] = args["bias"][:3]
    assert_same_error(write_call(args), ValueError,
                      "eenet.exit_score_write: out_logits overlaps feats; pass a separate buffer")


def test_write_score_into_history_is_rejected() -> None:
    args = exit_args()
    history = torch.zeros(6, 1)
    args["out_score"] = history[:, 0]
    weight = torch.zeros(5 + 2 + 1)
    assert_same_error(write_call(args, policy="eenet", prev_scores=history[:4],
                                 sched_weight=weight), ValueError,
                      "eenet.exit_score_write: out_score overlaps prev_scores; pass a separate "
                      "buffer")


def test_outputs_overlapping_each_other_are_rejected() -> None:
    args = exit_args()
    buf = torch.zeros(6, dtype=torch.int32)
    args["out_exit"] = buf
    args["out_logits"] = buf
    assert_same_error(write_call(args), ValueError,
                      "eenet.exit_score_write: out_exit overlaps out_logits; pass a separate "
                      "buffer")


def compact_call(keep: torch.Tensor, src: list[torch.Tensor], dst: list[torch.Tensor] | None
                 ) -> Callable[[str | None], Callable[[], Any]]:
    return lambda backend: lambda: ek.compact(keep, src, out=dst, backend=backend)


def test_compact_into_keep_is_rejected() -> None:
    storage = torch.ones(100, dtype=torch.uint8)
    keep = storage[:50].view(torch.bool)
    src = [torch.arange(50, dtype=torch.uint8)]
    assert_same_error(compact_call(keep, src, [storage[:50]]), ValueError,
                      "eenet.compact_out: dst[0] overlaps keep; pass a separate buffer")


def test_compact_dst_overlapping_each_other_is_rejected() -> None:
    buf = torch.zeros(10)
    src = [torch.randn(4), torch.randn(4)]
    assert_same_error(compact_call(torch.ones(4, dtype=torch.bool), src, [buf[:5], buf[3:8]]),
                      ValueError, "eenet.compact_out: dst[1] overlaps dst[0]; pass a separate "
                      "buffer")


def test_compact_overlap_error_names_the_right_source() -> None:
    """The reference enumerated a list without the empty tensors and named the wrong one."""
    base = torch.zeros(4, 2)
    src = [torch.zeros(4, 0), torch.randn(4, 2), base]
    dst = [torch.zeros(4, 0), base, torch.zeros(4, 2)]
    assert_same_error(compact_call(torch.ones(4, dtype=torch.bool), src, dst), ValueError,
                      "eenet.compact_out: dst[1] overlaps src[2]; compaction into its own source "
                      "is not supported, pass a separate buffer")


# ---------------------------------------------------------------------------------------
# Strides: the bias stride, and offsets past 2^31 elements.


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_bias(backend: str) -> None:
    gen = torch.Generator().manual_seed(2)
    feats, weight = torch.randn(9, 4, generator=gen), torch.randn(5, 4, generator=gen)
    for bias in (torch.randn(10, generator=gen)[::2], torch.randn(1, generator=gen).expand(5)):
        exact = feats.double() @ weight.double().t() + bias.double()
        got = ek.exit_score(feats, weight, bias, backend=backend).logits
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_int32(backend: str) -> None:
    """A feature stride of 2^28 elements: index * stride passes 2^31 from feature 8 on.
    Only the addressed elements are touched (the 8 GiB storage stays virtual)."""
    stride = 2**28
    storage = torch.empty(15 * stride + 2, dtype=torch.float16)
    feats = storage.as_strided((2, 16), (1, stride))
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 16, generator=gen).half()
    for j in range(16):
        feats[:, j] = values[:, j]
    weight = torch.randn(3, 16, generator=gen).half()
    exact = values.double() @ weight.double().t()
    got = ek.exit_score(feats, weight, None, backend=backend).logits
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Value ranges and contracts.


def test_exit_index_beyond_out_exit_dtype_is_rejected_before_any_write() -> None:
    args = exit_args()
    args["out_exit"] = torch.zeros(6, dtype=torch.int32)
    score_before = args["out_score"].clone()
    assert_same_error(write_call({**args, "exit_index": 2**32 + 7}, is_last=True), ValueError,
                      "eenet.exit_score_write: exit_index must lie in [0, 2147483647] (out_exit "
                      "is int32), got 4294967303")
    assert torch.equal(args["out_score"], score_before)
    assert not bool(args["out_exit"].any())


def test_duplicate_row_index_is_rejected_on_cpu() -> None:
    args = exit_args()
    args["row_index"] = torch.tensor([4, 3, 3, 0])
    assert_same_error(write_call(args, is_last=True), ValueError,
                      "eenet.exit_score_write: row_index values must be distinct, got 3 at "
                      "positions 1 and 2")
    assert not bool(args["out_score"].any())


def test_non_finite_scheduler_parameters_are_rejected() -> None:
    feats, weight = torch.randn(3, 4), torch.randn(5, 4)
    prev = torch.zeros(3, 0)
    preds = torch.zeros(3, 0, dtype=torch.int64)

    def call(sched_weight: torch.Tensor, sched_bias: float) -> Callable[[str | None], Any]:
        return lambda backend: lambda: ek.exit_score(
            feats, weight, None, policy="eenet", prev_scores=prev, prev_preds=preds,
            sched_weight=sched_weight, sched_bias=sched_bias, use_vote=True, backend=backend)

    good = torch.zeros(5 + 2 + 1)
    assert_same_error(call(good, math.inf), ValueError,
                      "eenet.exit_score: sched_bias must be finite in float32, got inf")
    bad = good.clone()
    bad[-1] = math.inf  # the vote weight at k = 0 (the reference gave NaN, the others exited)
    assert_same_error(call(bad, 0.0), ValueError,
                      "eenet.exit_score: sched_weight must be finite, got inf at position 7")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vote_term_absent_at_the_first_exit(backend: str) -> None:
    """At k = 0 there is no earlier exit to agree with: the vote weight must not matter."""
    gen = torch.Generator().manual_seed(4)
    feats, weight = torch.randn(6, 4, generator=gen), torch.randn(3, 4, generator=gen)
    sched = torch.randn(3 + 2 + 1, generator=gen)
    kwargs = {"policy": "eenet", "prev_scores": torch.zeros(6, 0), "use_vote": True,
              "prev_preds": torch.zeros(6, 0, dtype=torch.int64), "sched_bias": 0.3}
    a = ek.exit_score(feats, weight, None, sched_weight=sched, backend=backend, **kwargs)
    sched2 = sched.clone()
    sched2[-1] = 1e6
    b = ek.exit_score(feats, weight, None, sched_weight=sched2, backend=backend, **kwargs)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)
    z = (feats.double() @ weight.double().t())
    p = torch.softmax(z, dim=1)
    conf = 1 + (p * torch.log(p)).sum(1) / math.log(3)
    feat = torch.cat([p, p.max(1).values[:, None], conf[:, None]], dim=1)
    exact = torch.sigmoid(feat @ sched[:-1].double() + 0.3)
    torch.testing.assert_close(a.score.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_finite_for_spreads_beyond_float_range(backend: str) -> None:
    """[3e38, -3e38]: z - max z is -inf for a finite logit; its class has p = 0 exactly."""
    feats = torch.tensor([[3e38, -3e38], [-3e38, 3e38], [1.0, -1.0]])
    weight = torch.eye(2)
    conf = ek.exit_score(feats, weight, None, policy="entropy", threshold=0.5,
                         backend=backend).score
    p = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64), 0)
    want = torch.tensor([1.0, 1.0, 1 + float((p * p.log()).sum()) / math.log(2)])
    torch.testing.assert_close(conf.double(), want.double(), rtol=1e-6, atol=1e-6)
    sched = torch.tensor([0.5, -0.5, 1.0, 2.0])
    q = ek.exit_score(feats, weight, None, policy="eenet", threshold=0.5, backend=backend,
                      prev_scores=torch.zeros(3, 0), sched_weight=sched).score
    assert bool(torch.isfinite(q).all())
    torch.testing.assert_close(q[0].double(), torch.sigmoid(torch.tensor(0.5 + 1 + 2.0)).double())


# ---------------------------------------------------------------------------------------
# Autograd, meta tensors, layouts.


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_no_output_requires_grad(backend: str | None) -> None:
    feats = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(3, 4, requires_grad=True)
    res = ek.exit_score(feats, weight, None, backend=backend)
    assert not any(t.requires_grad for t in res)
    kept, count = ek.compact(res.keep, [feats], backend=backend)
    assert not kept[0].requires_grad and not count.requires_grad


def test_no_output_requires_grad_through_the_op() -> None:
    feats = torch.randn(5, 4, requires_grad=True)
    res = torch.ops.eenet.exit_score(feats, torch.randn(3, 4), None, "max_prob", 0.5)
    assert not any(t.requires_grad for t in res)


def test_meta_tensors() -> None:
    """Meta storages all have data pointer 0: no false overlap; no host sync by default."""
    keep = torch.empty(8, dtype=torch.bool, device="meta")
    src = [torch.empty(8, 3, device="meta"), torch.empty(8, dtype=torch.int64, device="meta")]
    dst = [torch.empty(8, 3, device="meta"), torch.empty(8, dtype=torch.int64, device="meta")]
    kept, count = ek.compact(keep, src)
    assert kept[0].shape == (8, 3) and count.device.type == "meta"
    ek.compact(keep, src, out=dst)
    feats, weight = torch.empty(8, 4, device="meta"), torch.empty(3, 4, device="meta")
    res = ek.exit_score(feats, weight)
    assert res.pred.shape == (8,) and res.pred.dtype == torch.int64
    res = ek.exit_score(feats, weight, check_finite=True)  # nothing to read: no .item()
    assert res.keep.dtype == torch.bool


def test_fake_kernel_checks_score_arguments_first_under_the_right_name() -> None:
    meta = {"device": "meta"}
    feats, weight = torch.empty(4, 3, **meta), torch.empty(5, 3, **meta)
    outs = {"row_index": torch.empty(4, dtype=torch.int64, **meta), "exit_index": 0,
            "out_logits": torch.empty(6, 5, **meta), "out_score": torch.empty(6, 2, **meta),
            "out_exit": torch.empty(6, dtype=torch.int64, **meta)}
    with pytest.raises(ValueError, match=r"^eenet\.exit_score_write: threshold must lie in"):
        ek.exit_score_write(feats, weight, threshold=2.0, **outs)


SPARSE_FEATS = "eenet.exit_score: feats must be a dense (strided) tensor, got layout sparse_coo"


def test_sparse_and_quantized_inputs() -> None:
    dense = torch.randn(4, 3)
    weight = torch.randn(5, 3)
    assert_same_error(lambda backend: lambda: ek.exit_score(dense.to_sparse(), weight,
                                                            backend=backend),
                      ValueError, SPARSE_FEATS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still accepted
        quant = torch.quantize_per_tensor(dense, 0.1, 0, torch.qint8)
    assert_same_error(lambda backend: lambda: ek.compact(torch.ones(4, dtype=torch.bool),
                                                         [quant], backend=backend),
                      ValueError, "eenet.compact: src[0] must be a dense (strided) tensor, got a "
                      "quantized tensor")
    with pytest.raises(ValueError, match="got layout sparse_coo"):
        torch.ops.eenet.exit_score(dense.to_sparse(), weight, None, "max_prob", 0.5)


# ---------------------------------------------------------------------------------------
# Seeded fuzz: every backend against the reference, the reference against float64.

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@st.composite
def exit_problems(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 40))
    c = draw(st.integers(2, 70))
    d = draw(st.integers(1, 40))
    pooled = draw(st.booleans())
    s = draw(st.integers(1, 5)) if pooled else 0
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    policy = draw(st.sampled_from(["max_prob", "entropy", "patience", "eenet"]))
    k = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (n, d, s) if pooled else (n, d)
    feats = (torch.randn(*shape, generator=gen) * draw(st.sampled_from([0.1, 1.0, 30.0])))
    if draw(st.booleans()) and n:  # a non-contiguous view
        feats = torch.cat([feats, feats], dim=1)[:, ::2]
    use_vote = policy == "eenet" and draw(st.booleans())
    problem: dict[str, Any] = {
        "feats": feats.to(dtype), "weight": torch.randn(c, d, generator=gen).to(dtype),
        "bias": torch.randn(c, generator=gen).to(dtype) if draw(st.booleans()) else None,
        "policy": policy, "is_last": draw(st.booleans()), "use_vote": use_vote,
        "threshold": float(k) if policy == "patience" else draw(st.floats(0.0, 1.0)),
    }
    if policy in ("patience", "eenet"):
        problem["prev_preds"] = torch.randint(0, c, (n, k), generator=gen)
    if policy == "eenet":
        problem["prev_scores"] = torch.rand(n, k, generator=gen)
        problem["sched_weight"] = torch.randn(c + 2 + k + int(use_vote), generator=gen)
        problem["sched_bias"] = float(torch.randn(1, generator=gen))
    if n and draw(st.booleans()):
        problem["feats"][draw(st.integers(0, n - 1))] = math.nan
    return problem


def _exact_logits(p: dict[str, Any]) -> torch.Tensor:
    x = p["feats"].double()
    if x.dim() == 3:
        x = x.mean(dim=2)
    z = x @ p["weight"].double().t()
    return z if p["bias"] is None else z + p["bias"].double()


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _compare(problem: dict[str, Any], backend: str) -> None:
    p = dict(problem)
    feats, weight, bias = p.pop("feats"), p.pop("weight"), p.pop("bias")
    ref = ek.exit_score(feats, weight, bias, backend="reference", **p)
    got = ek.exit_score(feats, weight, bias, backend=backend, **p)
    exact = _exact_logits(problem)
    finite = torch.isfinite(exact).all(dim=1)
    # the reference against float64; every backend against the reference (fp32 contract)
    scale = 1.0 + float(exact[finite].abs().max()) if bool(finite.any()) else 1.0
    tol = 1e-5 * scale * max(1, feats.shape[1]) ** 0.5
    assert _max_abs((ref.logits.double() - exact)[finite]) <= tol
    assert _max_abs((got.logits - ref.logits)[finite]) <= tol
    torch.testing.assert_close(got.score, ref.score, rtol=1e-4, atol=1e-4, equal_nan=True)
    near = (ref.score - problem["threshold"]).abs() <= 1e-4
    assert not bool(((got.exit_mask != ref.exit_mask) & ~near).any())
    assert torch.equal(got.keep, ~got.exit_mask)
    assert not bool(got.exit_mask[~finite].any()) or problem["is_last"]
    # predictions: equal wherever the top two logits are apart
    top2 = exact.topk(2, dim=1).values if exact.shape[0] else exact[:, :2]
    clear = finite & ((top2[:, 0] - top2[:, 1]) > 2 * tol)
    assert torch.equal(got.pred[clear], exact.argmax(dim=1)[clear])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fuzz_exit_score(backend: str) -> None:
    budget = 25 if backend == "cpp" else 10

    @settings(FUZZ, max_examples=budget)
    @given(exit_problems())
    def check(problem: dict[str, Any]) -> None:
        _compare(problem, backend)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_compact(backend: str) -> None:
    @settings(FUZZ, max_examples=30 if backend != "triton" else 10)
    @given(st.integers(0, 300), st.integers(0, 2**31 - 1), st.integers(1, 3))
    def check(n: int, seed: int, step: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        keep = byte_mask(torch.randint(0, 256, (n * step,), generator=gen,
                                       dtype=torch.uint8))[::step]
        keep.view(torch.uint8)[torch.rand(n, generator=gen) < 0.3] = 0
        src = [torch.randn(n, 3, generator=gen)[:, ::2], torch.arange(n, dtype=torch.int32),
               torch.randn(n, 4, 2, generator=gen).bfloat16(), torch.zeros(n, 0)]
        truth = keep.view(torch.uint8) != 0
        kept, count = ek.compact(keep, src, backend=backend)
        assert int(count) == int(truth.sum())
        for k, s in zip(kept, src, strict=True):
            assert torch.equal(k[: int(count)], s[truth])
            assert not bool(k[int(count):].any())

    check()

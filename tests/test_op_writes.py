"""What the ops promise about the buffers they write and the numbers they compare, on every
backend: writes bump version counters as torch's in-place ops do (autograd then refuses a
backward through an overwritten value), inference tensors and buffers requiring grad are
refused before anything is written, ``score >= threshold`` holds exactly (not against the
threshold rounded to float32), and ``take`` / ``exit_index`` refuse what they cannot mean."""

from __future__ import annotations

import math
import struct

import pytest
import torch

import eenet_kernels as ek
from eenet_kernels.checks import FLOAT32_TINY, threshold_as_float32

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, C = 6, 4, 3


def _write(backend: str, out_logits: torch.Tensor, out_score: torch.Tensor,
           out_exit: torch.Tensor) -> ek.ExitScore:
    g = torch.Generator().manual_seed(0)
    return ek.exit_score_write(torch.randn(N, D, generator=g), torch.randn(C, D, generator=g),
                               row_index=torch.arange(N), exit_index=1, out_logits=out_logits,
                               out_score=out_score, out_exit=out_exit, threshold=0.0,
                               backend=backend)


def _outs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(N, C), torch.zeros(N), torch.zeros(N, dtype=torch.int64)


def _compact_out(backend: str, dst: torch.Tensor) -> None:
    ek.compact(torch.ones(N, dtype=torch.bool), [torch.randn(N, 2)], out=[dst], backend=backend)


def test_writes_bump_versions_like_in_place_ops(any_backend: str) -> None:
    outs = _outs()
    _write(any_backend, *outs)
    assert all(t._version > 0 for t in outs)  # (how much a write adds is torch's business)
    dst = torch.zeros(N, 2)
    _compact_out(any_backend, dst)
    assert dst._version > 0
    # the dispatcher's path, as a C++ caller or a compiled graph takes it
    outs = _outs()
    torch.ops.eenet.exit_score_write(torch.randn(N, D), torch.randn(C, D), None, "max_prob",
                                     0.0, row_index=torch.arange(N), exit_index=0,
                                     out_logits=outs[0], out_score=outs[1], out_exit=outs[2])
    assert all(t._version > 0 for t in outs)


def test_backward_through_an_overwritten_buffer_is_refused(any_backend: str) -> None:
    """A value autograd saved and the op then overwrote: backward raises, as after a torch
    in-place op, instead of differentiating with the new values."""
    a = torch.randn(N, requires_grad=True)
    out_logits, out_score, out_exit = _outs()
    out_score.fill_(1.0)
    loss = (a * out_score).sum()
    _write(any_backend, out_logits, out_score, out_exit)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_buffers_that_cannot_be_written_are_refused_first(any_backend: str) -> None:
    with torch.inference_mode():
        made_there = torch.zeros(N)
    out_logits, out_score, out_exit = _outs()
    with pytest.raises(ValueError, match="out_score is an inference tensor"):
        _write(any_backend, out_logits, made_there, out_exit)
    assert bool((out_logits == 0).all())  # nothing written
    with pytest.raises(ValueError, match=r"dst\[0\] is an inference tensor"):
        with torch.inference_mode():
            made = torch.zeros(N, 2)
        _compact_out(any_backend, made)
    with torch.inference_mode():  # inside inference mode they are ordinary buffers
        _write(any_backend, out_logits, made_there, out_exit)
    leaf = torch.zeros(N, C, requires_grad=True)
    with pytest.raises(ValueError, match="out_logits requires grad"):
        _write(any_backend, leaf, out_score, out_exit)
    with torch.no_grad():  # as torch allows in-place writes to such a leaf there
        _write(any_backend, leaf, out_score, out_exit)
    assert bool((leaf != 0).any())


def _next_float32_up(x: float) -> float:
    (bits,) = struct.unpack("<I", struct.pack("<f", x))
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


def test_threshold_as_float32_is_the_smallest_float32_not_below() -> None:
    for t in (0.0, 0.5, 1.0, ek.NEVER_EXIT, 3.0):  # float32 values stay
        assert threshold_as_float32(t) == t
    for t in (0.1, 1 / 3, 1 + 1e-9, 2 + 1e-9, 0.9999999):
        t32 = threshold_as_float32(t)
        assert t32 >= t and struct.unpack("<f", struct.pack("<f", t32))[0] == t32
        (below,) = struct.unpack("<f", struct.pack("<I", struct.unpack(
            "<I", struct.pack("<f", t32))[0] - 1))
        assert below < t, t  # no float32 between t and t32
    assert threshold_as_float32(1e-46) == FLOAT32_TINY
    assert threshold_as_float32(1e39) == math.inf


@pytest.mark.parametrize("policy", ("max_prob", "entropy"))
def test_a_score_just_below_the_threshold_stays(any_backend: str, policy: str) -> None:
    """Thresholds between a row's float32 score and the next float32 up: score < threshold
    in exact arithmetic, so the row stays (rounded to the nearest float32, the threshold
    would equal the score and let it exit); the score itself and the next float32 up
    decide as they should."""
    g = torch.Generator().manual_seed(3)
    feats, weight = torch.randn(8, D, generator=g), torch.randn(C, D, generator=g)
    score = ek.exit_score(feats, weight, policy=policy, threshold=0.5,
                          backend=any_backend).score
    for i in range(8):
        s = float(score[i])
        for t, exits in ((s, True), (s + (_next_float32_up(s) - s) / 4, False),
                         (_next_float32_up(s), False)):
            got = ek.exit_score(feats, weight, policy=policy, threshold=t, backend=any_backend)
            assert bool(got.exit_mask[i]) is exits, (i, s, t)


def test_patience_thresholds_between_integers(any_backend: str) -> None:
    """A streak s exits at threshold t exactly when s >= t: 1 + 1e-9 needs a streak of 2."""
    feats = torch.zeros(3, D)
    feats[:, 0] = 10.0  # argmax 0 on every row
    weight = torch.eye(C, D)
    prev = torch.tensor([[1, 1], [1, 0], [0, 0]])  # streaks 0, 1, 2 of argmax 0
    for t, want in ((1.0, [False, True, True]), (1 + 1e-9, [False, False, True]),
                    (2 + 1e-9, [False, False, False]), (1e-46, [False, True, True])):
        got = ek.exit_score(feats, weight, policy="patience", threshold=t, prev_preds=prev,
                            backend=any_backend)
        assert got.score.tolist() == [0.0, 1.0, 2.0]
        assert got.exit_mask.tolist() == want, t


def test_take_refuses_counts_it_cannot_mean() -> None:
    kept = [torch.arange(10.0), torch.arange(20).view(10, 2)]
    assert [t.shape[0] for t in ek.take(kept, torch.tensor(3))] == [3, 3]
    assert [t.shape[0] for t in ek.take(kept, torch.tensor(10, dtype=torch.int32))] == [10, 10]
    for bad in (torch.tensor(-2), torch.tensor(11)):
        with pytest.raises(ValueError, match=r"eenet.take: count -?\d+ is outside \[0, 10\]"):
            ek.take(kept, bad)
    for bad in (torch.tensor(2.0), torch.tensor([4]), 3):
        with pytest.raises(TypeError, match=r"eenet\.take: count must be the 0-dim int64"):
            ek.take(kept, bad)


def test_exit_index_must_be_an_int() -> None:
    for bad in (1.7, True, "1"):
        with pytest.raises(TypeError, match="exit_index must be an int"):
            ek.exit_score_write(torch.randn(N, D), torch.randn(C, D), row_index=torch.arange(N),
                                exit_index=bad, out_logits=torch.zeros(N, C),
                                out_score=torch.zeros(N),
                                out_exit=torch.zeros(N, dtype=torch.int64))


def test_writes_under_inference_mode_bump_ordinary_buffers(any_backend: str) -> None:
    """Inference mode skips the dispatcher's Autograd step; an ordinary buffer written there
    still gets its version bumped, as by torch's own in-place ops."""
    outs = _outs()
    dst = torch.zeros(N, 2)
    with torch.inference_mode():
        _write(any_backend, *outs)
        _compact_out(any_backend, dst)
    assert all(t._version > 0 for t in (*outs, dst))

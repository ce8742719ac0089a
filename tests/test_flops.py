"""FLOP counting of stages and heads (eenet.nn.flops): attention, transformer layers and
recurrent layers counted against hand-computed formulas, and uncounted ops caught."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from eenet.budget import count_flops
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.nn.flops import attention_flops, rnn_flops, weight_matrix_values

N, L, D, FF, HEADS, C = 3, 10, 16, 24, 4, 5


def _encoder_layer_flops(length: int = L, d: int = D, ff: int = FF) -> int:
    """Per sample: QKV projections, Q K^T, P V, the output projection, the two FFN layers."""
    return (2 * length * d * 3 * d + 2 * length * length * d + 2 * length * length * d
            + 2 * length * d * d + 2 * length * d * ff + 2 * length * ff * d)


def _net(stages: list[nn.Module], features: int) -> MultiExitNetwork:
    torch.manual_seed(0)
    return MultiExitNetwork(stages, [ExitHead.linear(features, C) for _ in stages]).eval()


class _Calls(nn.Module):
    """A stage calling ``fn(module, h)``."""

    def __init__(self, module: nn.Module, fn) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(self.module, h)


@pytest.mark.parametrize("fastpath", [True, False])
def test_transformer_encoder_layers_are_counted_whole(fastpath: bool) -> None:
    """Without the fast path switched off, an eval TransformerEncoderLayer counted 0."""
    layers = [nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
              for _ in range(3)]
    net = _net(layers, L * D)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        costs = count_flops(net, torch.randn(N, L, D))
        assert torch.backends.mha.get_fastpath_enabled() is fastpath  # restored
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    per_exit = _encoder_layer_flops() + 2 * L * D * C
    assert costs.values == [pytest.approx((k + 1) * per_exit, rel=1e-12) for k in range(3)]
    assert costs.meta["stage_flops"] == [_encoder_layer_flops()] * 3
    assert costs.meta["head_flops"] == [2 * L * D * C] * 3
    assert costs.values == list(itertools.accumulate(
        s + h for s, h in zip(costs.meta["stage_flops"], costs.meta["head_flops"],
                              strict=True)))


def test_multihead_attention_with_a_padding_mask() -> None:
    mha = nn.MultiheadAttention(D, HEADS, batch_first=True)
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask[:, 7:] = True
    stage = _Calls(mha, lambda m, h: m(h, h, h, key_padding_mask=mask, need_weights=False)[0])
    f = _net([stage], L * D).flops(torch.randn(N, L, D))
    assert f.stages == [2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D]


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_scaled_dot_product_attention_on_cpu(kv_heads: int) -> None:
    """Q (N, H, L, E) against K, V (N, Hkv, S, E / Ev): 2 L S E + 2 L S Ev per query head."""
    s, e, ev = 7, 6, 5
    k = torch.randn(N, kv_heads, s, e)
    v = torch.randn(N, kv_heads, s, ev)
    proj = nn.Linear(e, e, bias=False)  # gives the stage weights, so the check applies

    def attend(m: nn.Module, q: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(m(q), k, v,
                                                          enable_gqa=kv_heads != HEADS)

    f = _net([_Calls(proj, attend)], HEADS * L * ev).flops(torch.randn(N, HEADS, L, e))
    assert f.stages == [HEADS * (2 * L * e * e + 2 * L * s * e + 2 * L * s * ev)]


def test_attention_formula_by_hand() -> None:
    assert attention_flops((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 6)) == 2 * 2 * 3 * 5 * 7 * (4 + 6)
    # grouped key/value heads count once per query head
    assert attention_flops((2, 8, 5, 4), (2, 2, 7, 4), (2, 2, 7, 4)) == 2 * 2 * 8 * 5 * 7 * 8


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_counts_its_gate_products(bidirectional: bool) -> None:
    """Every layer and direction multiplies its 4 gates' W_ih and W_hh once per step."""
    hidden, layers, t = 8, 2, 6
    lstm = nn.LSTM(D, hidden, num_layers=layers, batch_first=True,
                   bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    stage = _Calls(lstm, lambda m, h: m(h)[0])
    f = _net([stage], t * dirs * hidden).flops(torch.randn(N, t, D))
    per_step = dirs * (4 * hidden * D + 4 * hidden * hidden)  # layer 0
    per_step += (layers - 1) * dirs * (4 * hidden * dirs * hidden + 4 * hidden * hidden)
    assert f.stages == [2 * t * per_step]


def test_rnn_formula_takes_the_weight_list_of_cudnn() -> None:
    """cuDNN / MIOpen pass every layer's weights as one list (matrices and bias vectors)."""
    w = [(32, 16), (32, 8), (32,), (32,), (32, 8), (32, 8), (32,), (32,)]
    assert rnn_flops((6, 3, 16), w, 2, None) == 2 * 6 * 3 * (32 * 16 + 3 * 32 * 8)
    # oneDNN: one layer, (input, w_ih, w_hh, b_ih, b_hh, hx, cx, ...)
    assert rnn_flops((3, 6, 16), (32, 16), (32, 8), (32,), (32,), (3, 8), (3, 8)) == \
        2 * 18 * (32 * 16 + 32 * 8)


@torch.library.custom_op("flopcheck::matmul", mutates_args=())
def _opaque_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@_opaque_matmul.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _matmul_formula(x, w, *args, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * w[0] * w[1]


def test_an_op_without_a_formula_is_an_error_not_a_zero() -> None:
    lin = nn.Linear(D, D)
    stage = _Calls(lin, lambda m, h: torch.ops.flopcheck.matmul(h, m.weight))
    net = _net([stage], D)
    x = torch.randn(N, D)
    with pytest.raises(ValueError, match=r"stage 0 \(_Calls\) counted 0 FLOPs.*"
                                         r"without one: flopcheck\.matmul\)"):
        count_flops(net, x)
    costs = count_flops(net, x, formulas={torch.ops.flopcheck.matmul: _matmul_formula})
    assert costs.meta["stage_flops"] == [2 * D * D]


def test_a_partly_counted_stage_warns() -> None:
    stage = _Calls(nn.ModuleList([nn.Linear(D, D), nn.Linear(D, D)]),
                   lambda m, h: torch.ops.flopcheck.matmul(m[0](h), m[1].weight))
    with pytest.warns(UserWarning, match=r"stage 0 .*fewer than the 1024 .*"
                                         r"one: flopcheck\.matmul\)"):
        f = _net([stage], D).flops(torch.randn(N, D))
    assert f.stages == [2 * D * D]


def test_stages_without_weight_matrices_may_count_zero() -> None:
    """An embedding table is read, not multiplied; activations and norms hold no matrices."""
    emb = nn.Embedding(50, D)
    assert weight_matrix_values(emb) == 0
    assert weight_matrix_values(nn.Sequential(emb, nn.Linear(D, 3))) == 3 * D
    net = MultiExitNetwork([emb, nn.Sequential(nn.ReLU(), nn.LayerNorm(D))],
                           [ExitHead.linear(L * D, C), ExitHead.linear(L * D, C)]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = net.flops(torch.randint(0, 50, (N, L)))
    assert f.stages == [0, 0] and f.heads == [2 * L * D * C] * 2

"""The runtime engine: every mode agrees with the offline oracle, for every policy."""

from __future__ import annotations

import itertools

import pytest
import torch

from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import EENet, Entropy, ExitPolicy, MaxProb, Patience
from eenet.runtime import MODES, Engine, simulate

C = 7


def _conv_net(seed: int = 0) -> MultiExitNetwork:
    """Three conv stages with the paper's conv exit heads (4-D activations, pooled exits)."""
    torch.manual_seed(seed)
    chans = [3, 8, 12, 16]
    stages = [torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.ReLU())
              for a, b in itertools.pairwise(chans)]
    heads = [ExitHead.conv(b, C, width=6) for b in chans[1:]]
    return MultiExitNetwork(stages, heads).eval()


def _mlp_net(seed: int = 0, exits: int = 4) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Tanh()) for _ in range(exits)]
    heads = [ExitHead.linear(10, C) for _ in range(exits)]
    return MultiExitNetwork(stages, heads).eval()


def _median_policy(kind: type[ExitPolicy], net: MultiExitNetwork, x: torch.Tensor
                   ) -> ExitPolicy:
    """Thresholds at each exit's median score on x, so that rows leave at every exit."""
    with torch.no_grad():
        logits = [z.float() for z in net(x)]
    k = len(logits)
    if kind is Patience:
        return Patience([1.0] * k)
    if kind is EENet:
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(C + 2 + j + 1, generator=g) for j in range(k)]
        probe = EENet([0.0] * k, weights, [0.1] * k, use_vote=True)
    else:
        probe = kind([0.0] * k)
    scores = probe.scores(logits)
    thresholds = [float(scores[:, j].median()) for j in range(k)]
    if kind is EENet:
        return EENet(thresholds, weights, [0.1] * k, use_vote=True)
    return kind(thresholds)


POLICIES = [MaxProb, Entropy, Patience, EENet]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", POLICIES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("make_net", [_conv_net, _mlp_net], ids=["conv", "mlp"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_engine_matches_simulate(mode: str, kind: type[ExitPolicy], make_net, n: int) -> None:
    net = make_net()
    x = torch.randn(n, 3, 8, 8) if make_net is _conv_net else torch.randn(n, 10)
    policy = _median_policy(kind, net, torch.randn(64, *x.shape[1:]))
    oracle = simulate(net, policy, x)
    out = Engine(net, policy, mode=mode)(x)
    assert torch.equal(out.exit_index, oracle.exit_index)
    torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.score, oracle.score, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_engine_uses_every_exit_and_reuses_buffers() -> None:
    net = _mlp_net()
    x = torch.randn(256, 10)
    engine = Engine(net, _median_policy(MaxProb, net, x), mode="compact")
    first = engine(x)
    counts = torch.bincount(first.exit_index, minlength=4)
    assert bool((counts > 0).all()), counts
    buffers = next(iter(engine._buffers.values()))
    ptrs = [b.data_ptr() for b in buffers.stage_out.values()]
    second = engine(x)
    assert [b.data_ptr() for b in buffers.stage_out.values()] == ptrs
    assert torch.equal(first.exit_index, second.exit_index)


def test_engine_all_exit_at_first_and_none_early() -> None:
    net = _mlp_net()
    x = torch.randn(32, 10)
    everyone = Engine(net, MaxProb([0.0, 0.0, 0.0, 0.0]))(x)
    assert bool((everyone.exit_index == 0).all())
    nobody = Engine(net, MaxProb([1.0, 1.0, 1.0, 0.0]))(x)
    assert bool((nobody.exit_index == 3).all())
    torch.testing.assert_close(nobody.logits, net(x)[-1])


def test_engine_empty_batch() -> None:
    net = _mlp_net()
    out = Engine(net, MaxProb([0.5] * 4))(torch.randn(0, 10))
    assert out.logits.shape == (0, C) and out.exit_index.shape == (0,)


def test_engine_one_host_sync_per_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """compact mode reads the survivor count once per stage that continues, nothing else."""
    import eenet_kernels.ops as ops

    calls = []
    real_take = ops.take

    def counting_take(kept, count):
        calls.append(1)
        return real_take(kept, count)

    monkeypatch.setattr("eenet.runtime.engine.ek.take", counting_take)
    net = _mlp_net()
    x = torch.randn(64, 10)
    Engine(net, Patience([1.0] * 4))(x)
    assert len(calls) <= 3


def test_engine_bad_inputs() -> None:
    net = _mlp_net()
    with pytest.raises(ValueError, match="mode must be one of"):
        Engine(net, MaxProb([0.5] * 4), mode="fast")
    with pytest.raises(ValueError, match="3 exit rules but the network has 4 exits"):
        Engine(net, MaxProb([0.5] * 3))


class _ScaledStage(torch.nn.Module):
    """A stage with a per-row side input: tanh(linear(h) * scale[:, None])."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(10, 10)

    def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) * scale[:, None])


@pytest.mark.parametrize("mode", MODES)
def test_row_inputs_follow_their_rows(mode: str) -> None:
    """A per-row side input reaches every stage, compacted with the rows in compact mode."""
    torch.manual_seed(3)
    net = MultiExitNetwork([_ScaledStage() for _ in range(4)],
                           [ExitHead.linear(10, C) for _ in range(4)]).eval()
    x = torch.randn(97, 10)
    scale = torch.rand(97) * 4 + 0.1
    before = scale.clone()
    with torch.no_grad():
        scores = MaxProb([0.0] * 4).scores([z.float() for z in net(x, scale=scale)])
    policy = MaxProb([float(scores[:, k].median()) for k in range(3)] + [0.0])
    oracle = simulate(net, policy, x, scale=scale)
    out = Engine(net, policy, mode=mode)(x, scale=scale)
    assert torch.equal(out.exit_index, oracle.exit_index)
    assert len(set(out.exit_index.tolist())) == 4
    torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(scale, before)
    # the side input matters: a wrong one (not compacted alike) would change the results
    other = simulate(net, policy, x, scale=scale.flip(0))
    assert not torch.equal(other.exit_index, oracle.exit_index)


def test_bad_row_inputs() -> None:
    net = _mlp_net()
    engine = Engine(net, MaxProb([0.5] * 4))
    x = torch.randn(8, 10)
    with pytest.raises(ValueError, match=r"row input 'mask' must have one row per input row"):
        engine(x, mask=torch.ones(7))
    with pytest.raises(ValueError, match="one row per input row"):
        engine(x, mask=torch.tensor(1.0))
    with pytest.raises(TypeError, match="row input 'mask' must be a tensor"):
        engine(x, mask=[1] * 8)


def test_buffer_cache_keeps_the_recent_shapes() -> None:
    net = _mlp_net()
    engine = Engine(net, MaxProb([0.5] * 4), cache_shapes=2)
    for n in (8, 9, 8, 10):
        engine(torch.randn(n, 10))
    assert [key[0][0] for key in engine._buffers] == [8, 10]
    with pytest.raises(ValueError, match="cache_shapes must be a positive int"):
        Engine(net, MaxProb([0.5] * 4), cache_shapes=0)

"""eenet.train: the multi-exit loss (against a hand computation) and the training loop."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eenet.nn import MultiExitNetwork, attach_exits
from eenet.train import multi_exit, multi_exit_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _hand_loss(logits: list[list[list[float]]], target: list[int], t: float, w: float) -> float:
    """The loss with plain Python floats: K exits, N rows, C classes."""
    k_exits, n = len(logits), len(target)
    ce = 0.0
    for j in range(k_exits):
        ce_j = sum(-math.log(_softmax(logits[j][i])[target[i]]) for i in range(n)) / n
        ce += (j + 1) * ce_j
    ce /= k_exits * (k_exits + 1) / 2
    if k_exits == 1:
        return ce
    kl = 0.0
    for j in range(k_exits - 1):
        kl_j = 0.0
        for i in range(n):
            p = _softmax(logits[-1][i], t)
            q = _softmax(logits[j][i], t)
            kl_j += sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True))
        kl += kl_j / n
    kl /= k_exits - 1
    return ce + w * t * t * kl


FIXED = [
    [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
    [[2.0, -1.0, 0.0], [0.0, 1.5, -0.5]],
    [[3.0, 0.0, -2.0], [-1.0, 2.5, 0.5]],
]
TARGET = [0, 1]


@pytest.mark.parametrize(("k_exits", "t", "w"), [(3, 3.0, 0.5), (3, 1.0, 2.0), (2, 3.0, 0.5),
                                                 (1, 3.0, 0.5), (3, 3.0, 0.0)])
def test_loss_matches_hand_computation(k_exits: int, t: float, w: float) -> None:
    logits = [torch.tensor(z) for z in FIXED[3 - k_exits:]]
    got = multi_exit_loss(logits, torch.tensor(TARGET), temperature=t, distill_weight=w)
    want = _hand_loss(FIXED[3 - k_exits:], TARGET, t, w)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_loss_teacher_is_detached() -> None:
    """Distillation moves the earlier exits only: the last exit's gradient is the CE one."""
    zs = [torch.tensor(z, requires_grad=True) for z in FIXED]
    multi_exit_loss(zs, torch.tensor(TARGET), 3.0, 0.5).backward()
    grad_with = zs[-1].grad.clone()
    zs = [torch.tensor(z, requires_grad=True) for z in FIXED]
    multi_exit_loss(zs, torch.tensor(TARGET), 3.0, 0.0).backward()
    torch.testing.assert_close(grad_with, zs[-1].grad)


def test_loss_bad_inputs() -> None:
    z = torch.zeros(2, 3)
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="at least one exit"):
        multi_exit_loss([], y)
    with pytest.raises(ValueError, match="temperature"):
        multi_exit_loss([z, z], y, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        multi_exit_loss([z, torch.zeros(2, 4)], y)
    with pytest.raises(ValueError, match="target"):
        multi_exit_loss([z], torch.tensor([0, 1, 2]))
    # labels cross-entropy would skip (-100), cut (7.9 -> 7) or not score (3 of 3 classes)
    for labels, match in (([0, -100], r"in \[0, 3\), got -100"), ([0, 3], "got 3"),
                          ([0.0, 1.9], "integer labels")):
        with pytest.raises(ValueError, match=match):
            multi_exit_loss([z], torch.tensor(labels))


def _data(n: int = 384, d: int = 8, c: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g) * 4.0
    y = torch.randint(0, c, (n,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def _net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    return attach_exits(backbone, ["1", "3"], 3, example_input=torch.randn(2, 8))


def test_training_learns_separable_data() -> None:
    net = _net()
    loader = DataLoader(_data(), batch_size=32, shuffle=True)
    hist = multi_exit(net, loader, epochs=4, lr=1e-2, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert all(set(h) == {"epoch", "loss", "acc_per_exit"} for h in hist)
    assert all(len(h["acc_per_exit"]) == 3 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["acc_per_exit"][-1] > 0.9
    assert not net.training
    # and the trained exits classify the data in eval mode too
    x, y = loader.dataset.tensors
    with torch.no_grad():
        acc = (net(x)[-1].argmax(1) == y).float().mean()
    assert acc > 0.9


def test_training_is_deterministic_and_keeps_global_rng() -> None:
    net = _net()
    net2 = copy.deepcopy(net)
    loader = DataLoader(_data(n=128), batch_size=16, shuffle=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    h1 = multi_exit(net, loader, epochs=2, progress=False, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    h2 = multi_exit(net2, loader, epochs=2, progress=False, seed=7)
    assert h1 == h2
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_progress_off(capsys: pytest.CaptureFixture[str]) -> None:
    multi_exit(_net(), DataLoader(_data(n=32), batch_size=16), epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_without_a_terminal_is_a_line_per_epoch(
        capsys: pytest.CaptureFixture[str]) -> None:
    loader = DataLoader(_data(n=64), batch_size=4)  # 16 batches per epoch
    hist = multi_exit(_net(), loader, epochs=3, progress=True)
    assert not sys.stderr.isatty()  # captured: as in a CI log or a pipe
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3, lines
    for h, line in zip(hist, lines, strict=True):
        accs = " ".join(f"{a:.3f}" for a in h["acc_per_exit"])
        assert line == (f"multi-exit training: epoch {h['epoch']}/3 loss {h['loss']:.4f} "
                        f"train acc per exit {accs}")


def test_progress_on_a_terminal_is_a_bar(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    loader = DataLoader(_data(n=64), batch_size=4)
    multi_exit(_net(), loader, epochs=3, progress=True)
    err = capsys.readouterr().err
    assert "multi-exit training" in err and "48/48" in err and "\r" in err
    assert "epoch 1/3" not in err


def test_training_bad_inputs() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
                       batch_size=4)
    with pytest.raises(ValueError, match="no samples"):
        multi_exit(_net(), empty, epochs=1, progress=False)
    with pytest.raises(TypeError, match="MultiExitNetwork"):
        multi_exit(nn.Linear(2, 2), empty, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        multi_exit(_net(), empty, epochs=-1, progress=False)
    batches = list(DataLoader(_data(16), batch_size=8))
    with pytest.raises(ValueError, match="at epoch 2: a generator or iterator is used up"):
        multi_exit(_net(), (b for b in batches), epochs=2, progress=False)
    x, y = batches[0]
    with pytest.raises(ValueError, match="integer labels"):
        multi_exit(_net(), [(x, y.float() + 0.9)], epochs=1, progress=False)


def test_autocast_takes_the_dtypes_autocast_runs_in() -> None:
    """float32 / float64 would silently train in float32 (torch warns once per batch and
    disables autocast); a string is not a dtype."""
    net = _net()
    loader = DataLoader(_data(n=16), batch_size=8)
    for bad in (torch.float32, torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match="autocast"):
            multi_exit(net, loader, epochs=1, progress=False, autocast=bad)
    multi_exit(net, loader, epochs=1, progress=False, autocast=torch.bfloat16)


def test_a_seeded_run_reseeds_no_other_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed goes to the CPU generator (and the training GPU's): torch.manual_seed would
    also reseed every CUDA device, changing the caller's GPU random state."""
    net, loader = _net(), DataLoader(_data(n=16), batch_size=8)  # (_net seeds torch)
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    before = torch.random.get_rng_state()
    multi_exit(net, loader, epochs=1, progress=False, seed=5)
    assert calls == [] and torch.equal(before, torch.random.get_rng_state())

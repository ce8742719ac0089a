"""eenet.robust training: RDI training, the single-exit baseline and its adversarial
training, on a small CNN and scikit-learn's 8x8 digits (pixels in [0, 1])."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import intra_op_threads
from torch.utils.data import DataLoader, TensorDataset

from eenet.models import small_cnn
from eenet.nn import MultiExitNetwork
from eenet.robust import (
    AttackConfig,
    SingleExit,
    adversarial_train,
    pgd,
    rdi_loss,
    rdi_train,
    single_exit,
    summed_exit_loss,
)
from eenet.train import multi_exit

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
TRAIN_ATTACK = AttackConfig(EPS, 0.0625, 2, seed=11)   # 2 steps: cheap, still robustifying
EVAL_ATTACK = AttackConfig(EPS, 0.025, 6, seed=5)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def _loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=50, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def _net() -> MultiExitNetwork:
    return small_cnn(image_size=8, widths=(8, 16, 32), head_width=8)


class Runs:
    """A 3-exit CNN pre-trained with the standard multi-exit loss (``base``), then two more
    epochs of standard training (``std``) or of RDI training (``rdi``, history ``hist``)."""

    def __init__(self) -> None:
        x, y = _digits()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        tr, te = perm[:600], perm[1300:1600]
        self.x_train, self.y_train = x[tr], y[tr]
        self.x_test, self.y_test = x[te], y[te]
        loader = _loader(self.x_train, self.y_train)
        torch.manual_seed(0)
        self.base = _net()
        multi_exit(self.base, loader, epochs=6, lr=5e-3, progress=False)
        self.std = copy.deepcopy(self.base)
        multi_exit(self.std, loader, epochs=2, lr=5e-3, progress=False)
        self.rdi = copy.deepcopy(self.base)
        self.rdi.train()
        self.hist = rdi_train(self.rdi, loader, 2, TRAIN_ATTACK, lr=5e-3, optimizer="adam",
                              progress=False)


@pytest.fixture(scope="module")
def runs() -> Runs:
    with intra_op_threads(1):
        return Runs()


def _robustness(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[list[float], float]:
    """(accuracy per exit, mean summed loss over exits) under the max-average attack."""
    x_adv = pgd(net, x, y, "max_average", EVAL_ATTACK)
    with torch.no_grad():
        outs = net(x_adv)
        return ([float((z.argmax(1) == y).float().mean()) for z in outs],
                float(summed_exit_loss(outs, y).mean()))


# -- RDI training -------------------------------------------------------------------------


def test_rdi_train_history(runs: Runs) -> None:
    assert [r["epoch"] for r in runs.hist] == [1, 2]
    for r in runs.hist:
        assert set(r) == {"epoch", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc"}
        assert r["loss"] == pytest.approx(0.5 * (r["clean_loss"] + r["adv_loss"]), rel=1e-5)
        assert len(r["clean_acc"]) == len(r["adv_acc"]) == 3
        assert all(0.0 <= a <= 1.0 for a in r["clean_acc"] + r["adv_acc"])
        # adversarial examples are harder than clean ones
        assert r["adv_loss"] > r["clean_loss"]
    assert runs.hist[1]["adv_loss"] < runs.hist[0]["adv_loss"]
    assert not runs.rdi.training   # left in eval mode


def test_rdi_train_makes_every_exit_robust(runs: Runs) -> None:
    """Against the max-average attack, two epochs of RDI training beat both the standard
    model they started from and the same two epochs of standard training, at every exit."""
    x, y = runs.x_test, runs.y_test
    base_acc, base_loss = _robustness(runs.base, x, y)
    std_acc, std_loss = _robustness(runs.std, x, y)
    rdi_acc, rdi_loss_ = _robustness(runs.rdi, x, y)
    for k in range(3):
        assert rdi_acc[k] > max(base_acc[k], std_acc[k]) + 0.05, (rdi_acc, std_acc, base_acc)
    assert rdi_loss_ < min(base_loss, std_loss) - 1.0, (rdi_loss_, std_loss, base_loss)
    with torch.no_grad():   # and it still classifies clean inputs
        clean = [float((z.argmax(1) == y).float().mean()) for z in runs.rdi(x)]
    assert min(clean) > 0.6, clean


def test_rdi_train_deterministic_and_rng_neutral() -> None:
    x, y = _digits()
    cfg = AttackConfig(EPS, 0.1, 1)
    nets = []
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(_net())
    # shuffled by the global RNG, which rdi_train seeds
    loader = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50, shuffle=True)
    state = torch.random.get_rng_state()
    h0 = rdi_train(nets[0], loader, 1, cfg, progress=False)   # SGD, the default
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was used"
    h1 = rdi_train(nets[1], loader, 1, cfg, progress=False)
    assert h0 == h1
    s0, s1 = nets[0].state_dict(), nets[1].state_dict()
    assert all(torch.equal(s0[key], s1[key]) for key in s0)


def test_batch_seeds_wrap_at_the_top_of_the_seed_range(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Batch b is attacked with seed + b, wrapped into [-2**63, 2**63): the largest seed an
    AttackConfig takes trains on past its first batch."""
    from eenet.robust import train as robust_train

    seeds: list[int] = []

    def recording(*args, **kwargs):
        seeds.append(args[4].seed)
        return pgd(*args, **kwargs)

    monkeypatch.setattr(robust_train, "pgd", recording)
    x, y = _digits()
    torch.manual_seed(0)
    rdi_train(_net(), _loader(x[:150], y[:150]), 1, AttackConfig(EPS, 0.1, 1, seed=2**63 - 2),
              progress=False)
    assert seeds == [2**63 - 2, 2**63 - 1, -2**63]


def test_progress_prints_a_line_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = _digits()
    loader = _loader(x[:50], y[:50])
    torch.manual_seed(0)
    rdi_train(_net(), loader, 2, AttackConfig(EPS, 0.1, 1), progress=True)
    adversarial_train(single_exit(_net()), loader, 1, AttackConfig(EPS, 0.1, 1), progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("rdi training: epoch 1/2 clean loss ")
    assert " adv loss " in lines[1] and lines[1].count(" ") >= 11   # 3 per-exit accuracies
    assert lines[2].startswith("adversarial training: epoch 1/1 clean loss ")


def test_rdi_loss_matches_hand_computation() -> None:
    clean = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[2.0, -1.0, 0.0], [0.0, 1.5, -0.5]]]
    adv = [[[0.0, 1.0, -1.0], [0.5, 0.0, 1.0]], [[-1.0, 2.0, 0.0], [1.0, 0.5, 0.5]]]
    target = [0, 1]

    def ce(rows: list[list[float]]) -> float:
        total = 0.0
        for row, t in zip(rows, target, strict=True):
            total += math.log(sum(math.exp(v) for v in row)) - row[t]
        return total / len(rows)

    want_clean, want_adv = sum(ce(z) for z in clean), sum(ce(z) for z in adv)
    loss, c, a = rdi_loss([torch.tensor(z) for z in clean], [torch.tensor(z) for z in adv],
                          torch.tensor(target))
    assert float(c) == pytest.approx(want_clean, rel=1e-6)
    assert float(a) == pytest.approx(want_adv, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * want_clean + 0.5 * want_adv, rel=1e-6)
    with pytest.raises(ValueError, match="same non-zero number"):
        rdi_loss([torch.zeros(2, 3)], [], torch.tensor(target))


@pytest.mark.parametrize("labels, message", [
    ([0, -100], r"labels in \[0, 3\), got -100"),  # cross_entropy's ignore_index
    ([3, 1], r"labels in \[0, 3\), got 3"),
    ([[0, 1]], "1-D tensor of integer labels"),
    ([0.0, 1.0], "1-D tensor of integer labels"),
])
def test_rdi_loss_refuses_labels_it_cannot_score(labels: list, message: str) -> None:
    z = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match=message):
        rdi_loss(z, z, torch.tensor(labels))


# -- the single-exit baseline ------------------------------------------------------------


def test_single_exit_is_the_backbone_and_its_last_head(runs: Runs) -> None:
    net, x = runs.base, runs.x_test[:20]
    copy_ = single_exit(net, reinit=False)
    assert isinstance(copy_, SingleExit) and copy_.num_exits == 1
    with torch.no_grad():
        assert torch.equal(copy_.eval()(x), net(x)[-1])
    shared = {p.data_ptr() for p in net.parameters()} & {p.data_ptr()
                                                        for p in copy_.parameters()}
    assert not shared, "single_exit shares parameters with the multi-exit network"
    # the last head only: stages plus one head
    assert sum(p.numel() for p in copy_.parameters()) == (
        sum(p.numel() for p in net.stages.parameters())
        + sum(p.numel() for p in net.heads[-1].parameters()))

    state = torch.random.get_rng_state()
    fresh, again, other = single_exit(net), single_exit(net), single_exit(net, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    p_net = dict(net.named_parameters())
    p_fresh = dict(fresh.named_parameters())
    w_net, w_fresh = p_net["stages.0.0.weight"], p_fresh["stages.0.0.weight"]
    assert not torch.equal(w_net, w_fresh)   # re-initialised, to train from scratch
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters(),
                                                 strict=True))
    assert not torch.equal(w_fresh, dict(other.named_parameters())["stages.0.0.weight"])
    with pytest.raises(TypeError, match="MultiExitNetwork"):
        single_exit(copy_)  # type: ignore[arg-type]


def test_adversarial_train_runs_and_returns_its_history(runs: Runs) -> None:
    model = single_exit(runs.base)
    before = copy.deepcopy(model.state_dict())
    base_before = copy.deepcopy(runs.base.state_dict())
    hist = adversarial_train(model, _loader(runs.x_train[:300], runs.y_train[:300]), 2,
                             AttackConfig(EPS, 0.1, 1), lr=5e-3, optimizer="adam",
                             progress=False)
    assert [r["epoch"] for r in hist] == [1, 2]
    for r in hist:
        assert set(r) == {"epoch", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc"}
        assert len(r["clean_acc"]) == len(r["adv_acc"]) == 1
        assert math.isfinite(r["clean_loss"]) and math.isfinite(r["adv_loss"])
    assert hist[1]["clean_loss"] < hist[0]["clean_loss"]   # it learns
    assert not model.training
    after = model.state_dict()
    assert not all(torch.equal(before[key], after[key]) for key in before)
    base_after = runs.base.state_dict()   # the multi-exit network is untouched
    assert all(torch.equal(base_before[key], base_after[key]) for key in base_before)


# -- bad arguments ------------------------------------------------------------------------


def test_bad_arguments(runs: Runs) -> None:
    loader = _loader(runs.x_train[:50], runs.y_train[:50])
    net = copy.deepcopy(runs.base)
    cfg = AttackConfig(EPS, 0.1, 1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        rdi_train(net, loader, 1, cfg, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="epochs must be a non-negative int"):
        rdi_train(net, loader, -1, cfg, progress=False)
    with pytest.raises(ValueError, match="lr must be positive"):
        rdi_train(net, loader, 1, cfg, lr=0.0, progress=False)
    with pytest.raises(TypeError, match="AttackConfig"):
        rdi_train(net, loader, 1, {"eps": 0.1}, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="single-output model"):
        adversarial_train(net, loader, 1, cfg, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        rdi_train(net, [], 1, cfg, progress=False)
    x, y = runs.x_train[:8], runs.y_train[:8]
    with pytest.raises(TypeError, match="integer class labels"):  # not cut to integers
        rdi_train(net, [(x, y.float() + 0.9)], 1, cfg, progress=False)
    with pytest.raises(ValueError, match="at epoch 2: a generator or iterator is used up"):
        rdi_train(net, (b for b in [(x, y)]), 2, cfg, progress=False)

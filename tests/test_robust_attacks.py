"""eenet.robust attacks (PGD in RDI-Nets' four forms, the slowdown attack) and the uniform
entropy policy, on a small CNN briefly trained on scikit-learn's 8x8 digits (pixels in
[0, 1])."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import intra_op_threads
from torch.utils.data import DataLoader, TensorDataset

from eenet.models import small_cnn
from eenet.nn import MultiExitNetwork
from eenet.policies import Entropy
from eenet.robust import (
    FORMS,
    AttackConfig,
    attack_defaults,
    pgd,
    single_exit,
    slowdown,
    summed_exit_loss,
    uniform_entropy_policy,
    uniform_entropy_policy_logits,
)
from eenet.train import multi_exit

pytestmark = pytest.mark.usefixtures("one_thread")

# eps 0.1 in pixel units (the digits default); fewer steps than the default, for speed
CFG = AttackConfig(eps=0.1, step=0.025, steps=6, seed=3)
# (form, exit_index) of every attack
CASES = [("main", None), ("single", 0), ("single", 1), ("average", None), ("max_average", None)]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


class Trained:
    """A 3-exit CNN trained briefly on 1000 digits, a validation and a test split. 12 epochs
    leave every exit at 93-96% on the test split; with 8, one CPU's float rounding left the
    last exit at 78%, under the strength tests' 80% floor."""

    def __init__(self) -> None:
        x, y = _digits()
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        tr, va, te = perm[:1000], perm[1000:1300], perm[1300:1600]
        self.x_val, self.y_val = x[va], y[va]
        self.x_test, self.y_test = x[te], y[te]
        torch.manual_seed(0)
        self.net = small_cnn(image_size=8, widths=(8, 16, 32), head_width=8)
        loader = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=50, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        multi_exit(self.net, loader, epochs=12, lr=5e-3, progress=False)
        self.net.eval()

    def val_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=100)


@pytest.fixture(scope="module")
def trained() -> Trained:
    with intra_op_threads(1):
        return Trained()


def _acc(net: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    with torch.no_grad():
        return [float((z.argmax(1) == y).float().mean()) for z in net(x)]


def _attack(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, form: str,
            k: int | None, cfg: AttackConfig = CFG) -> torch.Tensor:
    if form == "slowdown":
        return slowdown(net, x, cfg)
    return pgd(net, x, y, form, cfg, exit_index=k)


ALL = [*CASES, ("slowdown", None)]
IDS = [f"{f}{'' if k is None else k}" for f, k in ALL]


# -- configuration ------------------------------------------------------------------------


def test_attack_defaults_are_the_papers() -> None:
    assert {form for form, _ in CASES} == set(FORMS)
    mnist_train, mnist_test = attack_defaults("mnist", True), attack_defaults("mnist", False)
    for cfg in (mnist_train, mnist_test):
        assert (cfg.eps, cfg.step, cfg.steps) == (0.3, 0.01, 40)
    cifar_train, cifar_test = attack_defaults("cifar10", True), attack_defaults("CIFAR", False)
    assert (cifar_train.eps, cifar_train.step, cifar_train.steps) == (8 / 255, 2 / 255, 10)
    assert (cifar_test.eps, cifar_test.step, cifar_test.steps) == (8 / 255, 2 / 255, 20)
    digits = attack_defaults("digits", False)
    assert digits.clip == (0.0, 1.0) and digits.random_start and 0 < digits.eps <= 0.3
    with pytest.raises(ValueError, match="no attack defaults"):
        attack_defaults("imagenet", True)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"eps": -0.1}, ValueError, "eps must be finite and >= 0"),
    ({"eps": math.nan}, ValueError, "eps must be finite"),
    ({"step": -1.0}, ValueError, "step must be finite and >= 0"),
    ({"steps": -1}, ValueError, "steps must be >= 0"),
    ({"steps": 2.0}, TypeError, "steps must be an int"),
    ({"clip": (1.0, 0.0)}, ValueError, "low < high"),
    ({"clip": (0.0,)}, ValueError, r"clip must be \(low, high\)"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"seed": 2**63}, ValueError, r"seed must lie in \[-2\*\*63, 2\*\*63\)"),
    ({"seed": -2**63 - 1}, ValueError, "seed must lie in"),
    ({"eps": "0.1"}, TypeError, "eps must be a number"),
])
def test_config_rejects_bad_values(kwargs: dict, error: type, match: str) -> None:
    args = {"eps": 0.1, "step": 0.01, "steps": 3, **kwargs}
    with pytest.raises(error, match=match):
        AttackConfig(**args)


def test_config_takes_numpy_scalars_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    cfg = AttackConfig(np.float32(0.25), np.float64(0.125), np.int64(3), seed=np.int32(4))
    assert (cfg.eps, cfg.step, cfg.steps, cfg.seed) == (0.25, 0.125, 3, 4)
    assert type(cfg.eps) is float and type(cfg.steps) is int and type(cfg.seed) is int


def test_to_range_maps_pixels_to_standardised_units() -> None:
    mean, std = 0.3, 0.4
    cfg = AttackConfig(0.1, 0.01, 5).to_range(-mean / std, (1 - mean) / std)
    assert cfg.eps == pytest.approx(0.1 / std) and cfg.step == pytest.approx(0.01 / std)
    assert cfg.clip == pytest.approx((-mean / std, (1 - mean) / std))
    assert cfg.steps == 5 and cfg.seed == 0
    with pytest.raises(ValueError, match="clip=None"):
        AttackConfig(0.1, 0.01, 5, clip=None).to_range(0.0, 1.0)


def test_bad_arguments(trained: Trained) -> None:
    net, x, y = trained.net, trained.x_val[:4], trained.y_val[:4]
    with pytest.raises(ValueError, match="unknown attack form 'max'"):
        pgd(net, x, y, "max", CFG)
    with pytest.raises(ValueError, match="needs exit_index"):
        pgd(net, x, y, "single", CFG)
    for k in (3, -1):
        with pytest.raises(ValueError, match=f"exit_index {k} is out of range .* 3 exits"):
            pgd(net, x, y, "single", CFG, exit_index=k)
    with pytest.raises(ValueError, match="only to form 'single'"):
        pgd(net, x, y, "main", CFG, exit_index=0)
    with pytest.raises(ValueError, match=r"y must be \(N,\) with N = 4"):
        pgd(net, x, y[:3], "main", CFG)
    with pytest.raises(ValueError, match="outside the attack's clip range"):
        pgd(net, x * 2 - 1, y, "main", CFG)
    with pytest.raises(TypeError, match="AttackConfig"):
        pgd(net, x, y, "main", {"eps": 0.1})  # type: ignore[arg-type]
    for bad in (math.nan, math.inf):
        x_bad = x.clone()
        x_bad[1, 0, 3, 3] = bad
        for cfg in (CFG, AttackConfig(0.1, 0.025, 2, clip=None)):
            with pytest.raises(ValueError, match="x holds NaN or inf"):
                pgd(net, x_bad, y, "main", cfg)
        with pytest.raises(ValueError, match="x holds NaN or inf"):
            slowdown(net, x_bad, CFG)
    classes = net.num_classes
    for form, k in CASES:
        # -100 is cross_entropy's ignore_index: that row would go unattacked
        for label, match in ((-100, "labels >= 0, got -100"), (-1, "labels >= 0, got -1"),
                             (classes, f"label {classes}, but .* {classes} classes")):
            with pytest.raises(ValueError, match=match):
                pgd(net, x, torch.tensor([0, label, 1, 2]), form, CFG, exit_index=k)
    # with no ascent step the labels are still checked against the classes
    for form, k in CASES:
        with pytest.raises(ValueError, match=f"label {classes}, but .* {classes} classes"):
            pgd(net, x, torch.tensor([0, classes, 1, 2]), form, AttackConfig(0.1, 0.02, 0),
                exit_index=k)
    with torch.inference_mode():  # an attack needs autograd: a clear error, not autograd's
        for attack in (lambda: pgd(net, x, y, "main", CFG), lambda: slowdown(net, x, CFG)):
            with pytest.raises(RuntimeError, match=r"outside torch\.inference_mode"):
                attack()
        x_inf, y_inf = x.clone(), y.clone()
    x_adv = pgd(net, x_inf, y_inf, "main", CFG)  # tensors made there are fine outside
    torch.testing.assert_close(x_adv, pgd(net, x, y, "main", CFG), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown slowdown objective"):
        slowdown(net, x, CFG, objective="kl")
    with pytest.raises(ValueError, match="exit 3 is out of range"):
        slowdown(net, x, CFG, exits=[3])
    with pytest.raises(ValueError, match="at least one exit"):
        slowdown(net, x, CFG, exits=[])
    with pytest.raises(ValueError, match="only 1 exit"):
        slowdown(single_exit(net), x, CFG)


def test_standardised_inputs_with_the_mapped_config(trained: Trained) -> None:
    """Standardised inputs (float32 rounding included) pass the range check once the config
    is mapped with to_range, and the attack is the pixel-space attack in those units."""
    mean, std = 0.3, 0.45
    x, y = trained.x_val[:16], trained.y_val[:16]
    xs = (x - mean) / std
    cfg = CFG.to_range(-mean / std, (1 - mean) / std)
    with pytest.raises(ValueError, match="outside the attack's clip range"):
        pgd(trained.net, xs, y, "main", CFG)
    x_adv = pgd(trained.net, xs, y, "main", cfg)
    assert float((x_adv - xs).abs().max()) <= cfg.eps * (1 + 1e-5)
    # the clip range in float32, the inputs' dtype
    assert float(x_adv.min()) >= float(torch.tensor(cfg.clip[0]))
    assert float(x_adv.max()) <= float(torch.tensor(cfg.clip[1]))
    with pytest.raises(ValueError, match="outside the attack's clip range"):
        pgd(trained.net, xs - 1e-3, y, "main", cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_stay_in_the_eps_ball(trained: Trained, dtype: torch.dtype
                                                   ) -> None:
    """fp16/bf16 inputs, pixel and standardised: x +- eps rounded to the dtype can lie
    outside the ball, so the bounds round toward x; |x_adv - x| <= eps holds exactly (in
    float64), with most coordinates on the boundary's nearest inner value."""
    net = copy.deepcopy(trained.net).to(dtype)
    x, y = trained.x_val[:32], trained.y_val[:32]
    mean, std = 0.3, 0.45
    for xs, cfg in ((x, CFG), ((x - mean) / std, CFG.to_range(-mean / std, (1 - mean) / std))):
        xs = xs.to(dtype)
        x_adv = pgd(net, xs, y, "main", cfg)
        assert x_adv.dtype == dtype
        moved = (x_adv.double() - xs.double()).abs()
        assert float(moved.max()) <= cfg.eps
        assert float((moved >= cfg.eps * (1 - 2 * torch.finfo(dtype).eps)).float().mean()) > 0.05


# -- invariants of every attack ----------------------------------------------------------


@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_stays_in_the_eps_ball_and_the_clip_range(trained: Trained, form: str,
                                                  k: int | None) -> None:
    x, y = trained.x_val[:64], trained.y_val[:64]
    x_adv = _attack(trained.net, x, y, form, k)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= CFG.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # it moved: most coordinates away from x, some on the boundary of the ball
    moved = (x_adv - x).abs()
    assert float((moved > 0).float().mean()) > 0.5
    assert float((moved >= CFG.eps - 1e-6).float().mean()) > 0.05
    # a ball reaching far outside the clip range (most pixels are 0 or 1)
    wide = AttackConfig(0.3, 0.05, 3)
    x_adv = _attack(trained.net, x, y, form, k, wide)
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_deterministic_for_a_seed(trained: Trained, form: str, k: int | None) -> None:
    x, y = trained.x_val[:32], trained.y_val[:32]
    state = torch.random.get_rng_state()
    a = _attack(trained.net, x, y, form, k)
    assert torch.equal(state, torch.random.get_rng_state()), "the global RNG was used"
    b = _attack(trained.net, x, y, form, k)
    c = _attack(trained.net, x, y, form, k, AttackConfig(CFG.eps, CFG.step, CFG.steps, seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without a random start the seed does not matter
    d = _attack(trained.net, x, y, form, k, AttackConfig(0.1, 0.025, 2, random_start=False))
    e = _attack(trained.net, x, y, form, k,
                AttackConfig(0.1, 0.025, 2, random_start=False, seed=9))
    assert torch.equal(d, e)


@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_leaves_modes_and_parameter_grads_alone(trained: Trained, form: str,
                                                k: int | None) -> None:
    net = copy.deepcopy(trained.net)
    net.train()
    net.heads[0].eval()   # a mixed state: every module's own mode must come back
    params = list(net.parameters())
    for i, p in enumerate(params):
        p.grad = None if i % 2 else torch.full_like(p, 0.5)
    before = copy.deepcopy(net.state_dict())   # BN running statistics included
    modes = [m.training for m in net.modules()]
    x_adv = _attack(net, trained.x_val[:16], trained.y_val[:16], form, k)
    assert [m.training for m in net.modules()] == modes
    for i, p in enumerate(params):
        if i % 2:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, torch.full_like(p, 0.5))
    after = net.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # eval mode: no BN update
    # the attack ran in eval mode: its result matches the attack on the eval-mode net
    assert torch.equal(x_adv, _attack(trained.net, trained.x_val[:16], trained.y_val[:16],
                                      form, k))


class _Plain(torch.nn.Module):
    """A multi-exit model that is not a MultiExitNetwork: its exits are only known from
    its output."""

    def __init__(self, net: MultiExitNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_any_module_returning_the_exits(trained: Trained, form: str, k: int | None) -> None:
    plain = _Plain(copy.deepcopy(trained.net)).train()
    before = copy.deepcopy(plain.state_dict())
    x, y = trained.x_val[:16], trained.y_val[:16]
    got = _attack(plain, x, y, form, k)
    assert plain.training and all(m.training for m in plain.modules())
    after = plain.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    # the same arithmetic as on the network itself (which runs only the stages it needs)
    torch.testing.assert_close(got, _attack(trained.net, x, y, form, k), rtol=0, atol=1e-6)
    if form == "single":
        with pytest.raises(ValueError, match="out of range for a network with 3 exits"):
            pgd(plain, x, y, "single", CFG, exit_index=3)


@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_tiny_batches(trained: Trained, form: str, k: int | None) -> None:
    x, y = trained.x_val, trained.y_val
    one = _attack(trained.net, x[:1], y[:1], form, k)
    assert one.shape == (1, 1, 8, 8) and float((one - x[:1]).abs().max()) <= CFG.eps + 1e-6
    assert not torch.equal(one, x[:1])
    empty = _attack(trained.net, x[:0], y[:0], form, k)
    assert empty.shape == (0, 1, 8, 8) and empty.dtype == x.dtype


def test_eps_zero_returns_x(trained: Trained) -> None:
    x, y = trained.x_val[:8], trained.y_val[:8]
    for form, k in CASES:
        assert torch.equal(pgd(trained.net, x, y, form, AttackConfig(0.0, 0.01, 3),
                               exit_index=k), x)


def test_inputs_within_the_slack_keep_the_eps_ball(trained: Trained) -> None:
    """Inputs accepted a rounding's width outside the clip range: the result stays in the
    eps ball (eps 0 returns x) and goes no further outside the range than x does."""
    x, y = trained.x_val[:16].clone(), trained.y_val[:16]
    x[:, :, 0, :] = -5e-6   # standardising rounding below 0 ...
    x[:, :, 1, :] = 1 + 5e-6   # ... and above 1
    assert torch.equal(pgd(trained.net, x, y, "average", AttackConfig(0.0, 0.01, 3)), x)
    for eps in (0.1, 1e-6):
        x_adv = pgd(trained.net, x, y, "average", AttackConfig(eps, eps / 4, 3))
        assert float((x_adv - x).abs().max()) <= eps * (1 + 1e-6)
        assert bool((x_adv >= torch.clamp(x, max=0.0)).all())
        assert bool((x_adv <= torch.clamp(x, min=1.0)).all())
        inside = (x >= 0) & (x <= 1)
        assert bool(((x_adv >= 0) & (x_adv <= 1))[inside].all())


def test_single_output_model_counts_as_one_exit(trained: Trained) -> None:
    model = single_exit(trained.net, reinit=False)
    x, y = trained.x_val[:8], trained.y_val[:8]
    assert torch.equal(pgd(model, x, y, "main", CFG), pgd(model, x, y, "average", CFG))
    assert torch.equal(pgd(model, x, y, "main", CFG),
                       pgd(model, x, y, "single", CFG, exit_index=0))


# -- strength ---------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "k"), CASES, ids=IDS[:len(CASES)])
def test_attacks_lower_accuracy(trained: Trained, form: str, k: int | None) -> None:
    net, x, y = trained.net, trained.x_test, trained.y_test
    clean = _acc(net, x, y)
    assert min(clean) > 0.8, f"the fixture model is under-trained: {clean}"
    adv = _acc(net, pgd(net, x, y, form, CFG, exit_index=k), y)
    # the attacked exits: the last one (main), exit k (single), every exit (average, max)
    targets = {"main": [2], "single": [k]}.get(form, [0, 1, 2])
    for j in targets:
        assert adv[j] < clean[j] - 0.2, f"exit {j}: {adv[j]:.3f} vs clean {clean[j]:.3f}"


def test_max_average_is_the_strongest_single_exit_attack(trained: Trained) -> None:
    """Per sample, the max-average example's summed loss over exits is the largest of the K
    single-exit attacks' (started from the same point), so at least as large as each."""
    net, x, y = trained.net, trained.x_test[:200], trained.y_test[:200]
    with torch.no_grad():
        best = summed_exit_loss(net(pgd(net, x, y, "max_average", CFG)), y)
        singles = torch.stack([summed_exit_loss(
            net(pgd(net, x, y, "single", CFG, exit_index=k)), y) for k in range(3)], dim=1)
    assert bool((best >= singles.max(dim=1).values * (1 - 1e-5) - 1e-6).all())
    torch.testing.assert_close(best, singles.max(dim=1).values, rtol=1e-5, atol=1e-6)
    # the choice is not always the same exit's attack (else max-average would be trivial)
    assert len(set(singles.argmax(dim=1).tolist())) > 1
    # and it is stronger in sum than each single-exit attack
    assert all(float(best.sum()) > float(singles[:, k].sum()) for k in range(3))


def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(z.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@pytest.mark.parametrize("objective", ["uniform", "entropy"])
def test_slowdown_defeats_early_exits(trained: Trained, objective: str) -> None:
    net, x = trained.net, trained.x_test
    policy = uniform_entropy_policy(net, trained.val_loader())
    cfg = AttackConfig(0.1, 0.025, 6, seed=1)
    x_adv = slowdown(net, x, cfg, objective=objective)
    with torch.no_grad():
        clean, adv = net(x), net(x_adv)
    for k in range(2):
        h_clean, h_adv = float(_entropy(clean[k]).mean()), float(_entropy(adv[k]).mean())
        assert h_adv > h_clean + 0.3, f"exit {k}: entropy {h_adv:.3f} vs clean {h_clean:.3f}"
    early_clean = float((policy.decide(clean)[0] < 2).float().mean())
    early_adv = float((policy.decide(adv)[0] < 2).float().mean())
    assert early_clean > 0.5   # about 2/3 by construction of the policy
    assert early_adv < early_clean - 0.3, f"early exits {early_adv:.3f} vs {early_clean:.3f}"


def test_slowdown_of_chosen_exits(trained: Trained) -> None:
    net, x = trained.net, trained.x_test[:100]
    x_adv = slowdown(net, x, CFG, exits=[0])
    with torch.no_grad():
        clean, adv = net(x), net(x_adv)
    assert float(_entropy(adv[0]).mean()) > float(_entropy(clean[0]).mean()) + 0.3


# -- the test-time policy -----------------------------------------------------------------


def test_uniform_entropy_policy_uses_every_exit_equally(trained: Trained) -> None:
    policy = uniform_entropy_policy(trained.net, trained.val_loader())
    assert isinstance(policy, Entropy) and policy.num_exits == 3
    assert policy.thresholds[-1] == 0.0
    with torch.no_grad():
        logits = trained.net(trained.x_val)
    exit_index, _ = policy.decide(logits)
    n = trained.x_val.shape[0]
    counts = torch.bincount(exit_index, minlength=3).tolist()
    # 100 each by construction (round(n / 3) for the first two exits); ties could add a few
    assert all(abs(c - n / 3) <= 1 for c in counts), counts
    # the logits form gives the same policy
    assert uniform_entropy_policy_logits(logits).thresholds == policy.thresholds


@pytest.mark.gpu
@pytest.mark.parametrize(("form", "k"), ALL, ids=IDS)
def test_on_cuda(trained: Trained, form: str, k: int | None) -> None:
    net = copy.deepcopy(trained.net).cuda()
    x, y = trained.x_val[:64], trained.y_val[:64]
    xc, yc = x.cuda(), y.cuda()
    x_adv = _attack(net, xc, yc, form, k)
    assert x_adv.device == xc.device and x_adv.dtype == xc.dtype
    assert float((x_adv - xc).abs().max()) <= CFG.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - xc).abs().gt(0).float().mean()) > 0.5
    # the random start is drawn on the CPU: the same on every device
    start = AttackConfig(CFG.eps, CFG.step, 0, seed=CFG.seed)
    torch.testing.assert_close(_attack(net, xc, yc, form, k, start).cpu(),
                               _attack(trained.net, x, y, form, k, start), rtol=0, atol=0)
    # and the attack is as strong as on the CPU
    if form != "slowdown":
        with torch.no_grad():
            acc_gpu = _acc(net, x_adv, yc)
            acc_cpu = _acc(trained.net, _attack(trained.net, x, y, form, k), y)
        assert max(abs(a - b) for a, b in zip(acc_gpu, acc_cpu, strict=True)) <= 0.1


@pytest.mark.parametrize(("labels", "match"), [
    ([0, -100, 1], r"class labels in \[0, 4\), got -100"),
    ([0, 4, 1], r"got 4"),
    ([0.0, 1.0, 1.0], "integer labels"),
])
def test_summed_exit_loss_refuses_labels_it_cannot_score(labels: list, match: str) -> None:
    """Cross-entropy gives a row labelled -100 no loss at all; the summed loss refuses it,
    as pgd does, and takes int32 labels as int64."""
    logits = [torch.randn(3, 4, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with pytest.raises(ValueError, match=match):
        summed_exit_loss(logits, torch.tensor(labels))
    y = torch.tensor([0, 3, 1])
    want = sum(torch.nn.functional.cross_entropy(z, y, reduction="none") for z in logits)
    torch.testing.assert_close(summed_exit_loss(logits, y.int()), want)

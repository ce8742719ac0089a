"""L-inf PGD attacks on multi-exit networks (RDI-Nets, ICLR 2020) and the slowdown attack
(DeepSloth, ICLR 2021).

``net(x)`` returns the list of its K exits' logits, each (N, C) (a model returning one
(N, C) tensor counts as one exit). Every attack is projected gradient ascent under the L-inf
norm: an optional random start uniform in the eps ball, then ``steps`` steps
``x_adv <- x_adv + step * sign(grad)``, each followed by the projection onto the eps ball
around x and the clip to the input range. The PGD forms of :func:`pgd`:

- ``"main"``: the cross-entropy of the last exit;
- ``"single"``: the cross-entropy of exit ``exit_index``;
- ``"average"``: the mean cross-entropy over all K exits;
- ``"max_average"``: per sample, among the K single-exit attacks, the adversarial example
  whose cross-entropy summed over all K exits is largest. The K single-exit attacks start
  from the same random point (one start per call), so ``pgd(..., "single", exit_index=k)``
  with the same config returns exactly the k-th candidate (the authors' code draws one
  start per exit; a shared start makes max-average comparable sample by sample with each
  single-exit attack).

:func:`slowdown` pushes every early exit (all but the last) towards the uniform
distribution, so that confidence-based policies let the samples run to the end.

The attacks run the network in eval mode (the previous mode of every submodule is restored
afterwards) and take gradients with respect to the input only
(``torch.autograd.grad``), so no parameter's ``.grad`` changes. Randomness comes from a
``torch.Generator`` seeded with ``config.seed`` (on the CPU, then moved to the input's
device), so an attack repeats exactly for a seed and leaves the global RNG alone. Inputs
may live on any device; the result has the input's shape, dtype and device.

Units: an :class:`AttackConfig` is in the units of the network's input. The paper's
settings (:func:`attack_defaults`) are in pixel units, images in [0, 1]. For standardised
inputs ((pixel - mean) / std, as :mod:`eenet.data` gives), map the config onto the
standardised range with :meth:`AttackConfig.to_range`:
``cfg.to_range((0 - mean) / std, (1 - mean) / std)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modes import eval_mode
from ..nn import MultiExitNetwork
from ..train import check_labels

__all__ = ["CLIP_SLACK", "DEFAULTS", "FORMS", "SLOWDOWN_OBJECTIVES", "AttackConfig",
           "attack_defaults", "exit_logits", "pgd", "slowdown", "summed_exit_loss"]

FORMS: tuple[str, ...] = ("main", "single", "average", "max_average")
CLIP_SLACK = 1e-5
"""How far (relative to the clip range's width) inputs may lie outside ``config.clip``
before an attack refuses them: the rounding of standardised data and of its mapped range."""
SLOWDOWN_OBJECTIVES: tuple[str, ...] = ("uniform", "entropy")


@dataclass(frozen=True)
class AttackConfig:
    """An L-inf PGD attack: radius ``eps``, step size ``step``, ``steps`` iterations.

    ``random_start``: start uniform in the eps ball (else at x). ``clip``: the input range
    ``(low, high)`` every adversarial example is clipped to (inputs must lie inside it, up to
    :data:`CLIP_SLACK` of its width), or None for no clipping. ``seed`` (in [-2**63, 2**63))
    seeds the random start. All in the input's units.
    """

    eps: float
    step: float
    steps: int
    random_start: bool = True
    clip: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("eps", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"AttackConfig.{name} must be a number, got {value!r}")
            value = float(value)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AttackConfig.{name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"AttackConfig.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.steps < 0:
            raise ValueError(f"AttackConfig.steps must be >= 0, got {self.steps}")
        if not -2**63 <= self.seed < 2**63:  # torch's generators take 64 bits; training
            # derives seed + batch number, which must stay within them too
            raise ValueError(f"AttackConfig.seed must lie in [-2**63, 2**63), got {self.seed}")
        if not isinstance(self.random_start, bool):
            raise TypeError(f"AttackConfig.random_start must be a bool, got "
                            f"{self.random_start!r}")
        if self.clip is not None:
            try:
                low, high = (float(v) for v in self.clip)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"AttackConfig.clip must be (low, high) or None, got "
                                 f"{self.clip!r}") from exc
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"AttackConfig.clip must be finite with low < high, got "
                                 f"{self.clip!r}")
            object.__setattr__(self, "clip", (low, high))

    def to_range(self, low: float, high: float) -> AttackConfig:
        """This attack in other input units: the affine map taking ``clip`` onto
        ``(low, high)`` applied to the config (eps and step scale by
        ``(high - low) / (clip[1] - clip[0])``). For inputs standardised as
        ``(pixel - mean) / std``: ``to_range(-mean / std, (1 - mean) / std)``."""
        if self.clip is None:
            raise ValueError("to_range maps the clip range onto another; this config has "
                             "clip=None")
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"to_range needs finite low < high, got ({low}, {high})")
        scale = (high - low) / (self.clip[1] - self.clip[0])
        return dataclasses.replace(self, eps=self.eps * scale, step=self.step * scale,
                                   clip=(low, high))


# (train, test) settings per dataset, pixel units (images in [0, 1]):
# - mnist: the authors' code, eps 0.3, step 0.01, 40 steps in training and evaluation;
# - cifar10: the paper, eps 8/255, step 2/255, 10 steps in training, 20 in evaluation;
# - digits (scikit-learn's 8x8, 17 grey levels): MNIST's step with eps 0.1 and 20 steps
#   (travel 20 x 0.01 = 2 eps; MNIST: 40 x 0.01 = 1.3 eps). Every 8x8 pixel averages a 4x4
#   block of the 32x32 bitmap, so a pixel carries far more of the digit than an MNIST one,
#   and eps 0.3 is much stronger here. Measured with small_cnn(image_size=8, widths=(16, 32,
#   64)), 1200 training digits, 30 epochs of rdi_train (Adam, lr 2e-3), 300 held-out
#   digits: at eps 0.1 clean accuracy 0.99 and max-average accuracy 0.81-0.85 per exit; at
#   eps 0.3 (40 steps) clean 0.94-0.95 and max-average 0.42-0.45, still rising, at twice
#   the training time. 0.1 gives the regime of the paper's MNIST results (robust accuracy
#   well above chance, below clean) in a CPU-sized run.
DEFAULTS: dict[str, tuple[AttackConfig, AttackConfig]] = {
    "mnist": (AttackConfig(0.3, 0.01, 40), AttackConfig(0.3, 0.01, 40)),
    "cifar10": (AttackConfig(8 / 255, 2 / 255, 10), AttackConfig(8 / 255, 2 / 255, 20)),
    "digits": (AttackConfig(0.1, 0.01, 20), AttackConfig(0.1, 0.01, 20)),
}
_ALIASES = {"cifar": "cifar10", "cifar-10": "cifar10"}


def attack_defaults(dataset: str, train: bool) -> AttackConfig:
    """The attack settings for ``dataset`` (``"mnist"``, ``"cifar10"`` (or ``"cifar"``),
    ``"digits"``; see :data:`DEFAULTS`) in training (``train=True``) or evaluation, in pixel
    units with clip (0, 1); :meth:`AttackConfig.to_range` converts them for standardised
    inputs."""
    key = _ALIASES.get(str(dataset).lower(), str(dataset).lower())
    if key not in DEFAULTS:
        raise ValueError(f"no attack defaults for dataset {dataset!r}; known: "
                         f"{sorted(DEFAULTS)} (or build an AttackConfig)")
    return DEFAULTS[key][0 if train else 1]


# -- helpers -----------------------------------------------------------------------------


def exit_logits(net: nn.Module, x: torch.Tensor, upto: int | None = None
                ) -> list[torch.Tensor]:
    """The exits' logits of ``net`` on x: a list of (N, C) tensors (a single-tensor output
    is one exit). ``upto``: only exits 0..upto are needed; a :class:`MultiExitNetwork` then
    runs only stages 0..upto (the same arithmetic as its full forward)."""
    if upto is not None and isinstance(net, MultiExitNetwork):
        outs: list[torch.Tensor] = []
        h = x
        for k in range(upto + 1):
            h = net.stages[k](h)
            outs.append(net.heads[k](h))
        return outs
    out = net(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and all(isinstance(z, torch.Tensor) for z in out):
        return list(out)
    raise TypeError("net(x) must return a tensor of logits or a non-empty list of every exit's "
                    f"logits, got {type(out).__name__}")


def summed_exit_loss(logits: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy summed over the exits: K tensors (N, C), y (N,) integer
    labels in [0, C) (``ValueError`` otherwise: cross-entropy would give a row labelled -100
    no loss) -> (N,) float32. The max-average attack's criterion."""
    if not logits:
        raise ValueError("summed_exit_loss needs the logits of at least one exit")
    check_labels(y, logits[0].shape[1])
    return _summed_ce(logits, y.long())


def _summed_ce(logits: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """:func:`summed_exit_loss` on labels already checked (the attacks' inner loops)."""
    return torch.stack([F.cross_entropy(z.float(), y, reduction="none") for z in logits]).sum(0)


def _num_exits(net: nn.Module, x: torch.Tensor) -> int | None:
    """K from the network (``num_exits``), else from a forward pass (None for N = 0)."""
    k = getattr(net, "num_exits", None)
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    if x.shape[0] == 0:
        return None
    with eval_mode(net), torch.no_grad():   # eval: no batch-norm statistics update
        return len(exit_logits(net, x))


def _check_config(config: AttackConfig) -> None:
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config must be an eenet.robust.AttackConfig, got "
                        f"{type(config).__name__}")


def _check_x(x: torch.Tensor, config: AttackConfig) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("an attack takes gradients with respect to its input: call it "
                           "outside torch.inference_mode() (torch.no_grad() is fine)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: (N, ...)")
    if x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf values; an attack needs finite inputs")
    if config.clip is not None and x.numel() > 0:
        low, high = config.clip
        lo, hi = float(x.min()), float(x.max())
        # rounding of standardised data and of its range: float32's, or x's coarser dtype's
        slack = max(CLIP_SLACK, torch.finfo(x.dtype).eps) * (high - low)
        if lo < low - slack or hi > high + slack:
            raise ValueError(
                f"x has values in [{lo:.4g}, {hi:.4g}], outside the attack's clip range "
                f"({low:.4g}, {high:.4g}); for standardised inputs map the config with "
                "AttackConfig.to_range, or pass clip=None")


Ball = tuple[torch.Tensor, torch.Tensor]


def _ball(x: torch.Tensor, config: AttackConfig) -> Ball:
    """Where an adversarial example of x may lie, as (low, high) bounds in x's dtype: the
    eps ball around x, x -+ eps taken in float64 and rounded toward x (in fp16/bf16
    arithmetic eps itself is rounded first, and the nearest value of x's dtype to x -+ eps
    may lie just outside the ball), intersected with the clip range, which is widened to
    x where x lies (within the accepted slack) outside it: the result never leaves the
    ball to reach the clip range, and never goes further outside it than x. The
    intersection holds x. Computed once per attack: every projection of its steps uses
    it."""
    wide = x.double()
    low, high = wide - config.eps, wide + config.eps
    lo, hi = low.to(x.dtype), high.to(x.dtype)
    lo = torch.where(lo.double() < low, torch.nextafter(lo, x), lo)
    hi = torch.where(hi.double() > high, torch.nextafter(hi, x), hi)
    if config.clip is not None:
        lo = torch.maximum(lo, x.clamp(max=config.clip[0]))
        hi = torch.minimum(hi, x.clamp(min=config.clip[1]))
    return lo, hi


def _project(x_adv: torch.Tensor, ball: Ball) -> torch.Tensor:
    """Into the bounds of :func:`_ball`: the eps ball and the clip range."""
    return torch.minimum(torch.maximum(x_adv, ball[0]), ball[1])


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached; a copy if it was made under inference mode (autograd cannot save
    such a tensor for backward)."""
    return t.clone() if t.is_inference() else t.detach()


def _start(x: torch.Tensor, ball: Ball, config: AttackConfig) -> torch.Tensor:
    """x plus, with ``random_start``, noise uniform in [-eps, eps] drawn from a CPU
    generator seeded with ``config.seed``; projected."""
    if not config.random_start or config.eps == 0:
        return x.clone()
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    noise = torch.rand(x.shape, generator=g, dtype=torch.float32)
    noise = ((2.0 * noise - 1.0) * config.eps).to(device=x.device, dtype=x.dtype)
    return _project(x + noise, ball)


Objective = Callable[[list[torch.Tensor]], torch.Tensor]


def _ascend(net: nn.Module, ball: Ball, start: torch.Tensor, objective: Objective,
            config: AttackConfig, upto: int | None) -> torch.Tensor:
    """``config.steps`` signed-gradient ascent steps on ``objective`` (exit logits -> (N,)
    per-sample values), each projected; gradients w.r.t. the input only."""
    x_adv = start.detach()
    with torch.enable_grad():
        for _ in range(config.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            value = objective(exit_logits(net, x_adv, upto)).sum()
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = _project(x_adv.detach() + config.step * grad.sign(), ball)
    return x_adv.detach()


def _labels_fit(outs: list[torch.Tensor], top: int) -> list[torch.Tensor]:
    """outs, once the largest label ``top`` is known to be one of the exits' C classes."""
    classes = outs[0].shape[1]
    if top >= classes:
        raise ValueError(f"y holds label {top}, but the network's exits have {classes} classes")
    return outs


def _exit_ce(k: int, y: torch.Tensor, top: int) -> Objective:
    return lambda outs: F.cross_entropy(_labels_fit(outs, top)[k].float(), y, reduction="none")


def _average_ce(y: torch.Tensor, top: int) -> Objective:
    return lambda outs: _summed_ce(_labels_fit(outs, top), y) / len(outs)


# -- the attacks ---------------------------------------------------------------------------


def pgd(net: nn.Module, x: torch.Tensor, y: torch.Tensor, form: str, config: AttackConfig,
        exit_index: int | None = None) -> torch.Tensor:
    """L-inf PGD adversarial examples against a multi-exit network (module docstring).

    ``net(x)`` returns K logits (N, C) (or one (N, C) tensor: K = 1); x (N, ...) floating
    point, finite, inside ``config.clip``; y (N,) integer labels in [0, C); ``form`` one of
    :data:`FORMS`;
    ``exit_index`` (0 <= k < K) only and always for ``"single"``. Returns x_adv, detached,
    with x's shape, dtype and device, ``|x_adv - x| <= eps`` elementwise and inside the clip
    range (where x itself lies within :data:`CLIP_SLACK` outside it, no further outside
    than x: the eps ball comes first). N = 0 returns an empty tensor. Raises
    ``ValueError`` on a bad argument.
    """
    if form not in FORMS:
        raise ValueError(f"unknown attack form {form!r}; one of {FORMS}")
    _check_config(config)
    _check_x(x, config)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of labels, got {type(y).__name__}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be (N,) with N = {x.shape[0]} (x is {tuple(x.shape)}), got "
                         f"shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if form == "single":
        if exit_index is None:
            raise ValueError("form 'single' needs exit_index, the exit to attack")
        if isinstance(exit_index, bool) or not isinstance(exit_index, int):
            raise TypeError(f"exit_index must be an int, got {exit_index!r}")
    elif exit_index is not None:
        raise ValueError(f"exit_index applies only to form 'single', not {form!r}")
    k_exits = _num_exits(net, x) if form in ("single", "max_average") else None
    if form == "single" and k_exits is not None and not 0 <= exit_index < k_exits:
        raise ValueError(f"exit_index {exit_index} is out of range for a network with "
                         f"{k_exits} exits (0..{k_exits - 1})")
    if x.shape[0] == 0:
        return x.detach().clone()
    x = _plain(x)
    y = _plain(y.to(device=x.device, dtype=torch.int64))
    low, top = (int(v) for v in torch.aminmax(y))
    if low < 0:  # cross_entropy would skip a row labelled -100 (its ignore_index): no attack
        raise ValueError(f"y must hold class labels >= 0, got {low}")
    ball = _ball(x, config)
    with eval_mode(net):
        if config.steps == 0:  # no ascent step checks the labels against the classes
            with torch.no_grad():
                _labels_fit(exit_logits(net, x), top)
        start = _start(x, ball, config)
        if form == "main":
            return _ascend(net, ball, start, _exit_ce(-1, y, top), config, None)
        if form == "single":
            return _ascend(net, ball, start, _exit_ce(exit_index, y, top), config, exit_index)
        if form == "average":
            return _ascend(net, ball, start, _average_ce(y, top), config, None)
        assert k_exits is not None
        candidates = [_ascend(net, ball, start, _exit_ce(k, y, top), config, k)
                      for k in range(k_exits)]
        with torch.no_grad():
            losses = torch.stack([_summed_ce(exit_logits(net, c), y)
                                  for c in candidates], dim=1)         # (N, K)
        best = losses.argmax(dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.stack(candidates, dim=1)[rows, best]


def _early_exits(k_exits: int | None, exits: Sequence[int] | None) -> list[int] | None:
    if exits is None:
        if k_exits is None:
            return None
        if k_exits < 2:
            raise ValueError("slowdown targets the early exits, and this network has only "
                             f"{k_exits} exit")
        return list(range(k_exits - 1))
    chosen = list(exits)
    if not chosen:
        raise ValueError("exits must name at least one exit to slow down")
    for k in chosen:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"exits must be ints, got {k!r}")
        if k < 0 or (k_exits is not None and k >= k_exits):
            raise ValueError(f"exit {k} is out of range for a network with {k_exits} exits")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"exits lists an exit twice: {chosen}")
    return sorted(chosen)


def slowdown(net: nn.Module, x: torch.Tensor, config: AttackConfig,
             exits: Sequence[int] | None = None, objective: str = "uniform") -> torch.Tensor:
    """L-inf PGD slowdown attack (DeepSloth): perturb x so that the early exits are unsure
    and a confidence-based policy lets the samples run on to the last exit.

    ``exits``: the exits to attack (default: every exit but the last). ``objective``
    (maximised, summed over those exits, per sample):

    - ``"uniform"`` (DeepSloth's): ``-KL(U || softmax(z_k))`` with U the uniform
      distribution over the C classes, i.e. ``mean_c log softmax(z_k)_c`` up to a constant;
      its gradient does not vanish on confident outputs;
    - ``"entropy"``: the entropy H(softmax(z_k)).

    Both are largest at the uniform distribution, where the entropy is ``log C``. x (N, ...)
    floating point, finite, inside ``config.clip``; no labels are needed. Returns x_adv as
    :func:`pgd` does.
    """
    if objective not in SLOWDOWN_OBJECTIVES:
        raise ValueError(f"unknown slowdown objective {objective!r}; one of "
                         f"{SLOWDOWN_OBJECTIVES}")
    _check_config(config)
    _check_x(x, config)
    targets = _early_exits(_num_exits(net, x), exits)
    if x.shape[0] == 0:
        return x.detach().clone()
    assert targets is not None

    def value(outs: list[torch.Tensor]) -> torch.Tensor:
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for k in targets:
            logp = F.log_softmax(outs[k].float(), dim=1)
            if objective == "uniform":
                total = total + logp.mean(dim=1)
            else:
                total = total - (logp.exp() * logp).sum(dim=1)
        return total

    x = _plain(x)
    ball = _ball(x, config)
    with eval_mode(net):
        return _ascend(net, ball, _start(x, ball, config), value, config, max(targets))

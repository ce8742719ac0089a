"""Robust training: RDI-Nets' multi-exit adversarial training and the single-exit baseline.

- :func:`rdi_train`: per exit, 1/2 CE(clean) + 1/2 CE(adversarial), summed over the K exits
  (:func:`rdi_loss`), with the adversarial examples of the max-average attack
  (:func:`eenet.robust.attacks.pgd`, form ``"max_average"``) crafted in eval mode on the
  current weights; the training step then runs in train mode. (The authors' script crafts
  them in train mode, on batch statistics; in eval mode the attack depends on the weights
  alone and only the training step updates the batch-norm running statistics.)
- :func:`adversarial_train`: PGD adversarial training of a single-output model (the paper's
  baseline): 1/2 CE(clean) + 1/2 CE(adversarial) on its one output, the attack on the
  output (the ``"main"`` form).
- :func:`single_exit`: the baseline's backbone, the multi-exit network's stages and last
  exit head as one module, as a fresh copy (re-initialised by default, to be trained from
  scratch).

Optimiser: SGD with momentum 0.9 and weight decay 5e-4 (the authors' MNIST script, lr 0.033)
or Adam (lr 1e-3), constant learning rate. Progress reporting as in :func:`eenet.train.multi_exit`
(:class:`eenet.train.Progress`): a tqdm bar on a terminal, one line per epoch otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import MultiExitNetwork
from ..rng import seeded
from ..train import Progress, check_labels, device_of, used_up
from .attacks import AttackConfig, exit_logits, pgd

__all__ = ["OPTIMIZERS", "SingleExit", "adversarial_train", "rdi_loss", "rdi_train",
           "single_exit"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DEFAULT_LR: dict[str, float] = {"sgd": 0.033, "adam": 1e-3}


class SingleExit(nn.Module):
    """A backbone without early exits: ``stages`` in order, then one exit ``head``.
    ``forward(x)`` returns the head's logits, (N, C)."""

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    @property
    def num_exits(self) -> int:
        """1: the model has one output."""
        return 1

    def forward(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        h = x
        for stage in self.stages:
            h = stage(h, **row_inputs)
        return self.head(h)


def single_exit(net: MultiExitNetwork, reinit: bool = True, seed: int | None = 0
                ) -> SingleExit:
    """The single-exit baseline of ``net``'s architecture: copies of its stages and its last
    exit head (``net`` is not changed, nothing is shared). ``reinit``: reset every
    parameter and buffer of the copy (``reset_parameters`` of each submodule that has one),
    so it trains from scratch; ``seed`` seeds that initialisation (in a forked RNG, the
    global RNG is left alone; None uses the current RNG)."""
    if not isinstance(net, MultiExitNetwork):
        raise TypeError(f"net must be an eenet.nn.MultiExitNetwork, got {type(net).__name__}")
    model = SingleExit(copy.deepcopy(list(net.stages)), copy.deepcopy(net.heads[-1]))
    if reinit:
        with seeded(seed, device_of(model)):
            for m in model.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    return model


def rdi_loss(clean: Sequence[torch.Tensor], adv: Sequence[torch.Tensor], y: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RDI-Nets' training loss of one batch: ``sum_k (CE(clean_k) + CE(adv_k)) / 2``.

    ``clean``, ``adv``: K logits (N, C) each, on the clean and the adversarial inputs;
    y (N,) integer labels in [0, C) (cross-entropy's ignore label -100 is refused, not
    skipped). Returns (loss, clean part sum_k CE(clean_k), adversarial part sum_k CE(adv_k)),
    0-dim float32 tensors (batch means); the loss keeps the graph.
    """
    clean, adv = list(clean), list(adv)
    if not clean or len(clean) != len(adv):
        raise ValueError(f"rdi_loss needs the same non-zero number of clean and adversarial "
                         f"exits, got {len(clean)} and {len(adv)}")
    check_labels(y, clean[0].shape[-1])
    clean_ce = torch.stack([F.cross_entropy(z.float(), y) for z in clean]).sum()
    adv_ce = torch.stack([F.cross_entropy(z.float(), y) for z in adv]).sum()
    return 0.5 * clean_ce + 0.5 * adv_ce, clean_ce.detach(), adv_ce.detach()


def rdi_train(net: nn.Module, loader: Iterable[Any], epochs: int, attack: AttackConfig,
              lr: float | None = None, optimizer: str = "sgd", momentum: float = 0.9,
              weight_decay: float = 5e-4, device: str | torch.device | None = None,
              progress: bool = True, seed: int | None = 0) -> list[dict[str, Any]]:
    """RDI-Nets training of the multi-exit ``net`` (``net(x)`` returns K logits (N, C))
    with :func:`rdi_loss` on max-average adversarial examples.

    ``loader`` yields ``(x, y)``: x inside ``attack.clip``, y (N,) int labels. ``attack``:
    the training attack; batch b (counted from 0 over the whole run) is attacked with seed
    ``attack.seed + b`` (wrapped into [-2**63, 2**63)). ``lr``: default 0.033 for
    ``"sgd"`` (momentum, weight decay as given), 1e-3 for ``"adam"`` (weight decay as L2).
    ``seed`` seeds torch's RNG for the run (shuffling, dropout) in a forked RNG state (None:
    the current RNG). ``device``: default
    where the parameters are (``net`` is moved there). ``progress``: on stderr, a tqdm bar
    on a terminal showing the running clean and adversarial loss, else one line per epoch.

    Returns one dict per epoch: ``epoch`` (1-based), ``loss`` (mean per sample of the
    training loss), ``clean_loss`` and ``adv_loss`` (mean per sample of the summed CE over
    exits), ``clean_acc`` and ``adv_acc`` (training accuracy per exit, K floats, in train
    mode). The network is left in eval mode.
    """
    return _robust_train(net, loader, epochs, attack, "max_average", "rdi training", lr,
                         optimizer, momentum, weight_decay, device, progress, seed,
                         multi=True)


def adversarial_train(model: nn.Module, loader: Iterable[Any], epochs: int,
                      attack: AttackConfig, lr: float | None = None, optimizer: str = "sgd",
                      momentum: float = 0.9, weight_decay: float = 5e-4,
                      device: str | torch.device | None = None, progress: bool = True,
                      seed: int | None = 0) -> list[dict[str, Any]]:
    """PGD adversarial training of a single-output ``model`` (``model(x)`` returns (N, C),
    e.g. :func:`single_exit`): ``(CE(clean) + CE(adversarial)) / 2``, the adversarial
    examples from PGD on its output (form ``"main"``) in eval mode.

    Arguments and the returned history as in :func:`rdi_train` (``clean_acc`` and
    ``adv_acc`` hold one value); the model is left in eval mode.
    """
    return _robust_train(model, loader, epochs, attack, "main", "adversarial training", lr,
                         optimizer, momentum, weight_decay, device, progress, seed,
                         multi=False)


def _make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _robust_train(model: nn.Module, loader: Iterable[Any], epochs: int, attack: AttackConfig,
                  form: str, what: str, lr: float | None, optimizer: str, momentum: float,
                  weight_decay: float, device: str | torch.device | None, progress: bool,
                  seed: int | None, multi: bool) -> list[dict[str, Any]]:
    """The loop of :func:`rdi_train` (``multi``) and :func:`adversarial_train`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not isinstance(attack, AttackConfig):
        raise TypeError(f"attack must be an eenet.robust.AttackConfig, got "
                        f"{type(attack).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not momentum >= 0:
        raise ValueError(f"momentum must be non-negative, got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
    dev = torch.device(device) if device is not None else device_of(model)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    history: list[dict[str, Any]] = []
    batch_index = 0
    with seeded(seed, dev):
        opt = _make_optimizer(params, optimizer, lr, momentum, weight_decay)
        with Progress(what, loader, epochs, progress) as report:
            try:
                for epoch in range(1, epochs + 1):
                    record = _epoch(model, loader, attack, form, opt, dev, multi, epoch,
                                    batch_index, report)
                    batch_index += record.pop("batches")
                    history.append(record)
                    accs = " ".join(f"{a:.3f}" for a in record["adv_acc"])
                    report.epoch(epoch, f"clean loss {record['clean_loss']:.4f} adv loss "
                                        f"{record['adv_loss']:.4f} adv acc per exit {accs}")
            finally:
                model.eval()
    return history


def _epoch(model: nn.Module, loader: Iterable[Any], attack: AttackConfig, form: str,
           opt: torch.optim.Optimizer, dev: torch.device, multi: bool, epoch: int,
           batch_index: int, report: Progress) -> dict[str, Any]:
    """One epoch of :func:`_robust_train`, its batches counted from ``batch_index`` (the
    attack seeds); returns the epoch's record plus ``batches``, the batches it attacked."""
    sums = {"loss": 0.0, "clean_loss": 0.0, "adv_loss": 0.0}
    seen = batches = 0
    correct_clean: torch.Tensor | None = None
    correct_adv: torch.Tensor | None = None
    for batch in loader:
        x, y = batch[0].to(dev), batch[1].to(dev)
        if not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            y = y.long()  # floating-point labels are refused (pgd), never cut to integers
        if y.shape[0] == 0:
            continue
        # wrapped into the 64 bits a seed may hold, as a generator would wrap it
        seed = (attack.seed + batch_index + batches + 2**63) % 2**64 - 2**63
        cfg = dataclasses.replace(attack, seed=seed)
        batches += 1
        model.train()
        x_adv = pgd(model, x, y, form, cfg)   # in eval mode, mode restored
        clean, adv = exit_logits(model, x), exit_logits(model, x_adv)
        if not multi and len(clean) != 1:
            raise ValueError(f"adversarial_train trains a single-output model; this one "
                             f"returns {len(clean)} outputs (use rdi_train for multi-exit "
                             "networks)")
        loss, clean_ce, adv_ce = rdi_loss(clean, adv, y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} at epoch {epoch}; lower the "
                               "learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n = y.shape[0]
        seen += n
        for key, value in (("loss", loss), ("clean_loss", clean_ce), ("adv_loss", adv_ce)):
            sums[key] += float(value.detach()) * n
        with torch.no_grad():
            cc = torch.stack([(z.argmax(1) == y).sum() for z in clean])
            ca = torch.stack([(z.argmax(1) == y).sum() for z in adv])
        correct_clean = cc if correct_clean is None else correct_clean + cc
        correct_adv = ca if correct_adv is None else correct_adv + ca
        report.batch(epoch=epoch, clean=f"{sums['clean_loss'] / seen:.4f}",
                     adv=f"{sums['adv_loss'] / seen:.4f}")
    if seen == 0 or correct_clean is None or correct_adv is None:
        raise used_up("the loader", epoch)
    record: dict[str, Any] = {"epoch": epoch}
    record.update({key: value / seen for key, value in sums.items()})
    record["clean_acc"] = [float(c) / seen for c in correct_clean.tolist()]
    record["adv_acc"] = [float(c) / seen for c in correct_adv.tolist()]
    record["batches"] = batches
    return record

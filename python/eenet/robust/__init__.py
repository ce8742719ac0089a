"""Robust multi-exit networks (RDI-Nets, ICLR 2020): PGD attacks in the paper's four forms
and the DeepSloth slowdown attack (:mod:`.attacks`), RDI training and the single-exit
adversarially trained baseline (:mod:`.train`), the test-time policy with exits used
uniformly on clean validation data (:mod:`.policy`), evaluation as deployed: attacks served
by the runtime engine under a policy, with bootstrap intervals (:mod:`.evaluate`), and the
reproduction of RDI-Nets' comparison and of DeepSloth with the budget guard
(:mod:`.reproduce`, ``eenet robust``, ``make robust``)."""

from __future__ import annotations

from .attacks import (
    DEFAULTS,
    FORMS,
    SLOWDOWN_OBJECTIVES,
    AttackConfig,
    attack_defaults,
    exit_logits,
    pgd,
    slowdown,
    summed_exit_loss,
)
from .policy import uniform_entropy_policy, uniform_entropy_policy_logits
from .train import OPTIMIZERS, SingleExit, adversarial_train, rdi_loss, rdi_train, single_exit

__all__ = [
    "DEFAULTS",
    "FORMS",
    "OPTIMIZERS",
    "SLOWDOWN_OBJECTIVES",
    "AttackConfig",
    "SingleExit",
    "adversarial_train",
    "attack_defaults",
    "exit_logits",
    "pgd",
    "rdi_loss",
    "rdi_train",
    "single_exit",
    "slowdown",
    "summed_exit_loss",
    "uniform_entropy_policy",
    "uniform_entropy_policy_logits",
]

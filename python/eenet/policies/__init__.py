"""Exit policies: heuristics (max-prob, entropy, patience) and the learned EENet scheduler."""

from .base import ExitPolicy, ExitRule, first_exit
from .calibration import collect_exit_logits, geometric_scan, thresholds_for_fractions
from .eenet import EENet
from .heuristics import Entropy, HeuristicPolicy, MaxProb, Patience

__all__ = [
    "EENet",
    "Entropy",
    "ExitPolicy",
    "ExitRule",
    "HeuristicPolicy",
    "MaxProb",
    "Patience",
    "collect_exit_logits",
    "first_exit",
    "geometric_scan",
    "thresholds_for_fractions",
]

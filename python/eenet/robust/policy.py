"""RDI-Nets' test-time exit policy: an entropy threshold per exit, set so that the exits are
used uniformly (1/K of the samples each) on clean validation data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..policies import Entropy, collect_exit_logits, thresholds_for_fractions

__all__ = ["uniform_entropy_policy", "uniform_entropy_policy_logits"]


def uniform_entropy_policy_logits(logits: Sequence[torch.Tensor]) -> Entropy:
    """The :class:`~eenet.policies.Entropy` policy whose thresholds let about N/K of the N
    validation samples leave at each of the K exits, from their logits (K tensors (N, C)).

    Thresholds come from :func:`~eenet.policies.thresholds_for_fractions` on the policy's
    own scores (1 - H(p)/log C) with fractions 1/K each: greedily, exit by exit, the
    round(N/K) most confident samples still present exit (ties at the quantile all exit).
    """
    logits = [z.float() for z in logits]
    if not logits:
        raise ValueError("uniform_entropy_policy needs the logits of at least one exit")
    k_exits = len(logits)
    probe = Entropy([0.0] * k_exits)
    scores = probe.scores(logits)
    thresholds = thresholds_for_fractions(scores, [1.0 / k_exits] * k_exits,
                                          never=probe.never_threshold(k_exits))
    return Entropy(thresholds)


def uniform_entropy_policy(net: nn.Module, val_loader: Iterable[Any]) -> Entropy:
    """:func:`uniform_entropy_policy_logits` on ``net``'s exits over the clean validation
    loader (``(x, y)`` batches; ``net(x)`` returns K logits (N, C); run in eval mode)."""
    logits, _ = collect_exit_logits(net, val_loader)
    return uniform_entropy_policy_logits(logits)

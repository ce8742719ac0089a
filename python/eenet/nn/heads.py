"""Exit heads: a trunk (``body``) that turns a stage's activation into features, and the
linear classifier that the fused ``eenet_kernels.exit_score`` op consumes.

Shapes: N rows, D features, S pooled positions, C classes. A head's ``features(h)`` is
(N, D) or (N, D, S); in the latter case the S positions are averaged (the global average
pool of a CNN head) before the classifier, which is exactly what the fused kernel does
itself, so the runtime can hand ``features(h)`` and ``classifier`` straight to the op.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExitHead", "FirstToken"]


class FirstToken(nn.Module):
    """``h[:, 0]``: the first ([CLS]) token of a batch-first sequence (N, L, H) -> (N, H)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3:
            raise ValueError(f"FirstToken expects a batch-first (N, L, H) sequence, got shape "
                             f"{tuple(h.shape)}")
        return h[:, 0]


class ExitHead(nn.Module):
    """An exit: ``logits = classifier(pool(body(h)))``.

    ``body`` maps a stage's activation ``h`` to features (N, D) or (N, D, S); 3-D features
    are mean-pooled over their last dimension (S) before ``classifier``, an ``nn.Linear``
    with weight (C, D) and bias (C,). Logits come out in the classifier's dtype, (N, C).

    Build the usual heads with :meth:`conv` (the EENet paper's CNN head), :meth:`token`
    (a BERT-style pooler on the first token) and :meth:`linear` (flatten + Linear).
    """

    body: nn.Module
    classifier: nn.Linear

    def __init__(self, body: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"ExitHead body must be an nn.Module, got {type(body).__name__}")
        if not isinstance(classifier, nn.Linear):
            raise TypeError("ExitHead classifier must be an nn.Linear (weight (C, D), bias "
                            f"(C,)), got {type(classifier).__name__}")
        self.body = body
        self.classifier = classifier

    @property
    def num_classes(self) -> int:
        """C, the classifier's ``out_features``."""
        return self.classifier.out_features

    @property
    def in_features(self) -> int:
        """D, the classifier's ``in_features``."""
        return self.classifier.in_features

    def placed_like(self, module: nn.Module) -> ExitHead:
        """This head on the device and floating dtype of ``module``'s first floating
        parameter (unchanged when it has none), in ``module``'s train/eval mode; returns it."""
        ref = next((p for p in module.parameters() if p.is_floating_point()), None)
        head = self if ref is None else self.to(device=ref.device, dtype=ref.dtype)
        head.train(module.training)
        return head

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``body(h)``: (N, D), or (N, D, S) whose S positions the classifier averages."""
        return self.body(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) = classifier(features(h), mean-pooled over S when 3-D)."""
        f = self.features(h)
        if f.dim() == 3:
            f = f.mean(dim=-1)
        elif f.dim() != 2:
            raise ValueError(f"exit head features must be (N, D) or (N, D, S), got shape "
                             f"{tuple(f.shape)} from the body")
        return self.classifier(f)

    @classmethod
    def conv(cls, in_channels: int, num_classes: int, width: int | None = None,
             stride: int = 1) -> ExitHead:
        """The EENet paper's CNN head for (N, in_channels, H, W) activations.

        body: 3 x (conv3x3 padding 1 + BatchNorm2d + ReLU) -> flatten(2), giving features
        (N, width, H'*W'); classifier Linear(width, num_classes). ``width`` defaults to
        ``in_channels``; ``stride`` applies to the first conv (2 makes an early exit on a
        large feature map cheaper). The global average pool is the classifier's mean over
        H'*W' (the fused kernel does it).
        """
        _check_positive(in_channels=in_channels, num_classes=num_classes, stride=stride)
        width = in_channels if width is None else width
        _check_positive(width=width)
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(3):
            layers += [nn.Conv2d(c, width, kernel_size=3, padding=1, stride=stride if i == 0 else 1,
                                 bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        layers.append(nn.Flatten(2))
        return cls(nn.Sequential(*layers), nn.Linear(width, num_classes))

    @classmethod
    def token(cls, hidden: int, num_classes: int) -> ExitHead:
        """Transformer head for batch-first (N, L, hidden) activations.

        body: the BERT pooler, first token h[:, 0] -> Linear(hidden, hidden) -> tanh, giving
        features (N, hidden); classifier Linear(hidden, num_classes).
        """
        _check_positive(hidden=hidden, num_classes=num_classes)
        body = nn.Sequential(FirstToken(), nn.Linear(hidden, hidden), nn.Tanh())
        return cls(body, nn.Linear(hidden, num_classes))

    @classmethod
    def linear(cls, in_features: int, num_classes: int) -> ExitHead:
        """Plain linear head: body Flatten(1) (the identity on (N, D) input), so features are
        (N, in_features) for any (N, ...) activation with that many values per row;
        classifier Linear(in_features, num_classes)."""
        _check_positive(in_features=in_features, num_classes=num_classes)
        return cls(nn.Flatten(1), nn.Linear(in_features, num_classes))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

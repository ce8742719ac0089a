"""Exit heads: a trunk (``body``) that turns a stage's activation into features, and the
linear classifier that the fused ``eenet_kernels.exit_score`` op consumes.

Shapes: N rows, D features, S pooled positions, C classes. A head's ``features(h)`` is
(N, D) or (N, D, S); in the latter case the S positions are averaged (the global average
pool of a CNN head) before the classifier, which is exactly what the fused kernel does
itself, so the runtime can hand ``features(h)`` and ``classifier`` straight to the op.

Row inputs: a head may read per-row side inputs of the batch (a padded batch's
``attention_mask``): it names them in ``ExitHead.row_inputs``, and every caller (the
network's forward, the runtime engine, the cost model) hands it those it has, compacted
with the rows, through :func:`head_row_inputs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from eenet_kernels.reference import autocast_on

__all__ = ["TOKEN_POOLS", "ExitHead", "FirstToken", "MaskedMeanPool", "TokenPooler",
           "head_row_inputs"]

# how a token head reduces a sequence (N, L, H) to one vector per row
TOKEN_POOLS: tuple[str, ...] = ("first", "mean")


def _check_sequence(what: str, h: torch.Tensor) -> None:
    if h.dim() != 3:
        raise ValueError(f"{what} expects a batch-first (N, L, H) sequence, got shape "
                         f"{tuple(h.shape)}")


class FirstToken(nn.Module):
    """``h[:, 0]``: the first ([CLS]) token of a batch-first sequence (N, L, H) -> (N, H)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _check_sequence("FirstToken", h)
        return h[:, 0]


class MaskedMeanPool(nn.Module):
    """The mean over the tokens of a batch-first sequence (N, L, H) -> (N, H), padding left
    out: ``sum_l m[n, l] h[n, l] / sum_l m[n, l]`` with the (N, L) ``attention_mask`` m
    (1 = token, 0 = padding; any integer, bool or float dtype). Without a mask every
    position counts, which is exact for unpadded batches. A row with no token gives zeros.
    Computed in h's dtype for float32/float64, in float32 for half types (and cast back)."""

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        _check_sequence("MaskedMeanPool", h)
        if attention_mask is None:
            return h.mean(dim=1)
        if attention_mask.shape != h.shape[:2]:
            raise ValueError(f"attention_mask must be (N, L) = {tuple(h.shape[:2])} to pool a "
                             f"sequence of shape {tuple(h.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        acc = torch.promote_types(h.dtype, torch.float32)
        m = attention_mask.to(acc)
        total = torch.bmm(m.unsqueeze(1), h.to(acc)).squeeze(1)  # (N, H)
        count = m.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (total / count).to(h.dtype)


class TokenPooler(nn.Module):
    """A sequence (N, L, H) to features (N, H): the tokens pooled (``"first"``: the first
    token, as BERT's pooler; ``"mean"``: :class:`MaskedMeanPool`, as sentence-transformers'
    MiniLM), then Linear(H, H) and tanh. ``attention_mask`` (N, L) is used by ``"mean"``."""

    def __init__(self, hidden: int, pool: str = "first") -> None:
        super().__init__()
        if pool not in TOKEN_POOLS:
            raise ValueError(f"unknown token pool {pool!r}; expected one of {TOKEN_POOLS}")
        self.pool_kind = pool
        self.pool: nn.Module = FirstToken() if pool == "first" else MaskedMeanPool()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        pooled = self.pool(h) if self.pool_kind == "first" else self.pool(h, attention_mask)
        return torch.tanh(self.dense(pooled))

    def extra_repr(self) -> str:
        return f"pool={self.pool_kind!r}"


def head_row_inputs(head: Any, row_inputs: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The row inputs ``head`` reads (its ``row_inputs`` names; none for a head without
    that attribute) among those the batch carries: what to pass to ``head.features``."""
    names: Sequence[str] = getattr(head, "row_inputs", ())
    return {name: row_inputs[name] for name in names if name in row_inputs}


def classifier_operands(head: Any, feats: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(feats, weight, bias)`` as the fused exit op takes them for ``head.classifier``:
    one floating dtype. Under ``torch.autocast`` a stage's output, and so the features, can
    come in another dtype than the classifier's parameters (bf16 features, fp32 weights);
    there all three are cast to their promoted dtype, which loses nothing (the op computes in
    fp32, as :func:`eenet_kernels.reference.exit_logits` does on the upcast values). Outside
    autocast they are passed as they are, and the op refuses a mismatch."""
    weight, bias = head.classifier.weight, head.classifier.bias
    if (feats.dtype == weight.dtype or not feats.is_floating_point()
            or not autocast_on(feats)):
        return feats, weight, bias
    dtype = torch.promote_types(feats.dtype, weight.dtype)
    return (feats.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


class ExitHead(nn.Module):
    """An exit: ``logits = classifier(pool(body(h, **row_inputs)))``.

    ``body`` maps a stage's activation ``h`` to features (N, D) or (N, D, S); 3-D features
    are mean-pooled over their last dimension (S) before ``classifier``, an ``nn.Linear``
    with weight (C, D) and bias (C,). Logits come out in the classifier's dtype, (N, C).

    ``row_inputs`` names the per-row side inputs the body takes as keyword arguments (e.g.
    ``("attention_mask",)`` for a masked mean pool); the head picks them out of whatever
    row inputs it is given and ignores the rest. A body is called with only those the batch
    carries, so it must accept their absence (an unpadded batch carries no mask).

    Build the usual heads with :meth:`conv` (the EENet paper's CNN head), :meth:`token`
    (a BERT-style pooler on the first token, or a masked mean pool) and :meth:`linear`
    (flatten + Linear).
    """

    body: nn.Module
    classifier: nn.Linear

    def __init__(self, body: nn.Module, classifier: nn.Linear,
                 row_inputs: Sequence[str] = ()) -> None:
        super().__init__()
        if not isinstance(body, nn.Module):
            raise TypeError(f"ExitHead body must be an nn.Module, got {type(body).__name__}")
        if not isinstance(classifier, nn.Linear):
            raise TypeError("ExitHead classifier must be an nn.Linear (weight (C, D), bias "
                            f"(C,)), got {type(classifier).__name__}")
        if isinstance(row_inputs, str) or not all(
                isinstance(n, str) and n for n in row_inputs):
            raise TypeError(f"row_inputs must be a sequence of names, got {row_inputs!r}")
        self.body = body
        self.classifier = classifier
        self.row_inputs: tuple[str, ...] = tuple(row_inputs)

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

    def features(self, h: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        """``body(h, **those row_inputs it reads)``: (N, D), or (N, D, S) whose S positions
        the classifier averages."""
        return self.body(h, **head_row_inputs(self, row_inputs))

    def forward(self, h: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) = classifier(features(h, **row_inputs), mean-pooled over S when
        3-D)."""
        f = self.features(h, **row_inputs)
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
    def token(cls, hidden: int, num_classes: int, pool: str = "first") -> ExitHead:
        """Transformer head for batch-first (N, L, hidden) activations.

        body: :class:`TokenPooler`, the tokens pooled -> Linear(hidden, hidden) -> tanh,
        giving features (N, hidden); classifier Linear(hidden, num_classes). ``pool``:
        ``"first"`` (BERT's pooler: the [CLS] token) or ``"mean"`` (the mean over the tokens,
        padding left out through the ``attention_mask`` row input: for mean-pooling models
        such as sentence-transformers' MiniLM, whose first token carries little).
        """
        _check_positive(hidden=hidden, num_classes=num_classes)
        return cls(TokenPooler(hidden, pool), nn.Linear(hidden, num_classes),
                   row_inputs=("attention_mask",) if pool == "mean" else ())

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

"""Multi-exit networks: K stages and K exit heads, and :func:`attach_exits`, which splits an
existing model into stages and adds exit heads to it without copying any weight.

Shapes: N rows; C classes. ``net(x)`` returns the K exits' logits, each (N, C), in the
heads' dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modes import eval_mode
from .flops import FlopFormula, check_counted, count_call
from .heads import ExitHead

__all__ = ["ChainStage", "ExitFlops", "FirstTokenIfSequence", "MultiExitNetwork",
           "architecture_of", "attach_exits", "conv_head_shape", "record_architecture"]

# the attribute under which a module records how it was built (see record_architecture)
ARCH_ATTR = "eenet_architecture"
# attach_exits' default conv heads: width = ceil(in_channels / LIGHT_WIDTH_DIVISOR), and a
# stride-2 first conv on activations at least LIGHT_STRIDE_FROM pixels on both sides
LIGHT_WIDTH_DIVISOR = 4
LIGHT_STRIDE_FROM = 8


def record_architecture(module: nn.Module, arch: str | None, config: dict[str, Any] | None,
                        reason: str | None = None) -> nn.Module:
    """Record on ``module`` how it was built: the registered architecture ``arch`` (see
    :mod:`eenet.models`) and its JSON-able keyword arguments ``config``, which
    :func:`eenet.saving.save_model` writes so that ``load_model`` can rebuild the module.

    ``arch=None`` records that the module cannot be rebuilt, and ``reason`` says why. A
    config that is not JSON-able records that too. Returns ``module``.
    """
    if arch is not None:
        try:
            config = json.loads(json.dumps(config if config is not None else {}))
        except (TypeError, ValueError) as exc:
            arch, reason = None, f"its {arch!r} arguments are not JSON-able ({exc})"
    spec = ({"arch": arch, "config": config} if arch is not None
            else {"arch": None, "reason": reason or "it was not built by a registered builder"})
    object.__setattr__(module, ARCH_ATTR, spec)
    return module


def architecture_of(module: nn.Module) -> dict[str, Any] | None:
    """How ``module`` was built: ``{"arch": name, "config": {...}}``, or ``{"arch": None,
    "reason": why it cannot be rebuilt}``, or None when nothing was recorded."""
    spec = getattr(module, ARCH_ATTR, None)
    return dict(spec) if isinstance(spec, dict) else None


@dataclass
class ExitFlops:
    """FLOPs per sample (``torch.utils.flop_counter``) of each of the K stages and exit
    heads of a :class:`MultiExitNetwork` (lists of K floats)."""

    stages: list[float]
    heads: list[float]

    @property
    def backbone(self) -> float:
        """The network without its early exits: every stage and the last exit head."""
        return sum(self.stages) + self.heads[-1]

    @property
    def head_fractions(self) -> list[float]:
        """Each exit head's FLOPs relative to :attr:`backbone` (K floats; the last exit's
        head is part of the backbone)."""
        b = self.backbone
        return [h / b if b else math.nan for h in self.heads]

    @property
    def overhead(self) -> float:
        """What evaluating every early exit head adds, relative to :attr:`backbone`."""
        b = self.backbone
        return sum(self.heads[:-1]) / b if b else math.nan

HEAD_KINDS: tuple[str, ...] = ("auto", "conv", "token", "linear")

_POOLS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
)
# shape-preserving (in eval) modules allowed between a ResNet-style pool and its final Linear
_PASSTHROUGH: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Flatten, nn.Identity)


class MultiExitNetwork(nn.Module):
    """K stages and K exit heads: ``h_k = stages[k](h_{k-1})`` (h_{-1} = x) and exit k's
    logits are ``heads[k](h_k)``, (N, C).

    ``forward`` returns all K logits, in training and evaluation mode alike; the early-exit
    runtime (``eenet.runtime``) uses ``stages`` and ``heads`` directly.
    """

    stages: nn.ModuleList
    heads: nn.ModuleList

    def __init__(self, stages: Sequence[nn.Module], heads: Sequence[ExitHead]) -> None:
        super().__init__()
        for what, seq in (("stages", stages), ("heads", heads)):
            if isinstance(seq, nn.Module) and not isinstance(seq, nn.ModuleList):
                raise ValueError(f"{what} must be a sequence of modules (a list or an "
                                 f"nn.ModuleList), not a single {type(seq).__name__}")
        stages, heads = list(stages), list(heads)
        if len(stages) == 0:
            raise ValueError("a MultiExitNetwork needs at least one stage and one exit head")
        if len(stages) != len(heads):
            raise ValueError(f"got {len(stages)} stages but {len(heads)} exit heads: every "
                             "stage needs exactly one exit head after it")
        for k, stage in enumerate(stages):
            if not isinstance(stage, nn.Module):
                raise TypeError(f"stage {k} must be an nn.Module, got {type(stage).__name__}")
        for k, head in enumerate(heads):
            if not isinstance(head, ExitHead):
                raise TypeError(f"head {k} must be an eenet.nn.ExitHead, got "
                                f"{type(head).__name__}")
        classes = [h.classifier.out_features for h in heads]
        if len(set(classes)) != 1:
            raise ValueError(f"the exit heads disagree on the number of classes: their "
                             f"classifiers have out_features {classes}")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        """K, the number of exits (= stages)."""
        return len(self.heads)

    @property
    def num_classes(self) -> int:
        """C, shared by every exit head's classifier."""
        return self.heads[0].classifier.out_features

    def forward(self, x: torch.Tensor, **row_inputs: torch.Tensor) -> list[torch.Tensor]:
        """The K exits' logits, each (N, C), for input x (whatever the first stage takes).

        ``row_inputs``: per-row side inputs, each (N, ...), passed to every stage as keyword
        arguments (``attention_mask`` for :func:`eenet.nn.hf_encoder_exits` stages), and to
        every exit head that reads them (:attr:`ExitHead.row_inputs`).
        """
        outs: list[torch.Tensor] = []
        h = x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h, **row_inputs)
            outs.append(head(h, **row_inputs))
        return outs

    @torch.no_grad()
    def flops(self, example_input: torch.Tensor,
              formulas: Mapping[Any, FlopFormula] | None = None,
              **row_inputs: torch.Tensor) -> ExitFlops:
        """FLOPs per sample of every stage and exit head on ``example_input`` (N, ...),
        counted by ``torch.utils.flop_counter`` in eval mode (the mode is restored), with
        the formulas of :mod:`eenet.nn.flops` (attention, recurrent layers) and
        ``formulas`` (op packet -> :data:`eenet.nn.flops.FlopFormula`) for ops of your own;
        ``row_inputs`` as in :meth:`forward`. ``.head_fractions`` gives each head's cost
        relative to the backbone.

        Raises ValueError when a stage or head that holds weight matrices counts 0 FLOPs
        (an op without a formula), and warns when it counts fewer than 2 per matrix value
        (:func:`eenet.nn.flops.check_counted`).
        """
        if example_input.dim() == 0 or example_input.shape[0] == 0:
            raise ValueError("flops needs an example_input with at least one row (FLOPs are "
                             f"counted per sample), got shape {tuple(example_input.shape)}")
        n = int(example_input.shape[0])
        counts: dict[str, list[float]] = {"stage": [], "head": []}

        def counted(what: str, k: int, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
            def call() -> torch.Tensor:
                return module(h, **row_inputs)

            total, out = count_call(call, formulas)
            counts[what].append(total / n)
            check_counted(f"{what} {k}", module, total / n, call, formulas)
            return out

        with eval_mode(self):
            h = example_input
            for k, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
                h = counted("stage", k, stage, h)
                counted("head", k, head, h)
        return ExitFlops(counts["stage"], counts["head"])


def _starts_in_place(block: nn.Module) -> bool:
    """Whether the first module ``block`` runs (down the first children of Sequentials)
    works in place (an ``inplace=True`` activation or dropout)."""
    while isinstance(block, nn.Sequential) and len(block) > 0:
        block = block[0]
    return bool(getattr(block, "inplace", False))


class ChainStage(nn.Module):
    """A stage cut out of a backbone: its blocks (the backbone's own module objects, not
    copies) applied in order. Blocks that are elements of an ``nn.ModuleList`` (transformer
    layers) may return tuples (HF ``BertLayer`` does); their output is unwrapped to ``[0]``.

    ``names`` are the blocks' dotted paths in the backbone. A stage whose first block works
    in place (``nn.ReLU(inplace=True)`` right after a cut, as in VGG-style Sequentials) runs
    it on a copy of its input while autograd records: the exit head before the cut saved
    that input for its backward pass, which the in-place block would overwrite.
    """

    def __init__(self, blocks: Sequence[nn.Module], names: Sequence[str],
                 unwrap: Sequence[bool]) -> None:
        super().__init__()
        if not (len(blocks) == len(names) == len(unwrap)):
            raise ValueError("ChainStage needs one name and one unwrap flag per block")
        self.blocks = nn.ModuleList(blocks)
        self.names: tuple[str, ...] = tuple(names)
        self.unwrap: tuple[bool, ...] = tuple(bool(u) for u in unwrap)
        self.copies_input = bool(blocks) and _starts_in_place(blocks[0])

    def forward(self, h: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        if row_inputs:
            raise TypeError(
                f"the stage of blocks {_show(self.names, 4)} takes no row inputs, got "
                f"{sorted(row_inputs)}: attach_exits chains blocks that take the activation "
                "only; for a padded Hugging Face encoder use eenet.nn.hf_encoder_exits, or "
                "write a stage that takes these keyword arguments")
        if self.copies_input and torch.is_grad_enabled() and h.requires_grad:
            h = h.clone()
        for block, unwrap in zip(self.blocks, self.unwrap, strict=True):
            h = block(h)
            if unwrap and isinstance(h, tuple):
                h = h[0]
        return h

    def extra_repr(self) -> str:
        return f"names={list(self.names)}"


class FirstTokenIfSequence(nn.Module):
    """Input of an encoder model's own final classifier: the first ([CLS]) token of a
    batch-first sequence (N, L, H) -> (N, H); an (N, D) input (already pooled) passes."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 3:
            return h[:, 0]
        if h.dim() == 2:
            return h
        raise ValueError(f"expected (N, L, H) or (N, D) before the final classifier, got shape "
                         f"{tuple(h.shape)}")


@dataclass
class _Item:
    """One block of the backbone's chain: its dotted path, the module, and whether it is an
    ``nn.ModuleList`` element (tuple outputs unwrapped)."""

    name: str
    module: nn.Module
    unwrap: bool = False


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # _modules, not named_children(): a module registered twice (Sequential(a, a)) runs twice
    return [(n, m) for n, m in module._modules.items() if m is not None]


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_plain_encoder(module: nn.Module) -> bool:
    return (isinstance(module, nn.TransformerEncoder)
            and type(module).forward is nn.TransformerEncoder.forward)


def _items_of(prefix: str, module: nn.Module, unwrap_last: bool = False) -> list[_Item]:
    """The chain of a splittable container's children; ModuleLists become their elements."""
    items: list[_Item] = []
    for name, child in _children(module):
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.ModuleList):
            for i, layer in enumerate(child):
                if isinstance(layer, (nn.ModuleList, nn.ModuleDict)):
                    raise ValueError(f"'{path}.{i}' is a {type(layer).__name__}; attach_exits "
                                     "needs the elements of a layer list to be callable layers")
                items.append(_Item(f"{path}.{i}", layer, unwrap=True))
        elif isinstance(child, nn.ModuleDict):
            raise ValueError(f"'{path}' is an nn.ModuleDict: its use depends on the model's "
                             "forward, so attach_exits cannot chain it")
        else:
            items.append(_Item(path, child))
    if items and unwrap_last:
        items[-1].unwrap = True
    return items


def _splittable(module: nn.Module) -> bool:
    return _is_plain_sequential(module) or _is_plain_encoder(module)


def _expand(items: list[_Item], name: str) -> list[_Item]:
    """Expand containers until ``name`` is a block or an expanded container of the chain."""
    while True:
        names = [it.name for it in items]
        if name in names or any(n.startswith(name + ".") for n in names):
            return items
        idx = next((i for i, it in enumerate(items) if name.startswith(it.name + ".")), None)
        if idx is None:
            raise ValueError(f"unknown module name {name!r}: the backbone's blocks are "
                             f"{_show(names)}")
        parent = items[idx]
        if not _splittable(parent.module):
            raise ValueError(
                f"cannot place an exit at {name!r}: it lies inside {parent.name!r} "
                f"({type(parent.module).__name__}), and attach_exits splits only nn.Sequential, "
                "nn.ModuleList and nn.TransformerEncoder containers (their forward order is known)")
        sub = _items_of(parent.name, parent.module, unwrap_last=parent.unwrap)
        items = [*items[:idx], *sub, *items[idx + 1:]]


def _show(names: Sequence[str], limit: int = 24) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _position(items: list[_Item], name: str) -> int:
    for i, it in enumerate(items):
        if it.name == name:
            return i
    inside = [i for i, it in enumerate(items) if it.name.startswith(name + ".")]
    return inside[-1]  # an expanded container: the exit goes after its last block


def _modules_backwards(items: Sequence[_Item]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for it in reversed(items):
        out.extend(reversed(list(it.module.modules())))
    return out


def _infer_width(items: Sequence[_Item], kind: str) -> int | None:
    """Width of the activation after ``items`` read from the last module with a known output
    width (heuristic used only without ``example_input``)."""
    for m in _modules_backwards(items):
        if kind == "conv":
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                return m.out_channels
            if isinstance(m, nn.BatchNorm2d):
                return m.num_features
            if isinstance(m, (nn.Linear, nn.LayerNorm, nn.BatchNorm1d)):
                return None
        elif kind == "token":
            if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
                return m.normalized_shape[0]
            if isinstance(m, nn.MultiheadAttention):
                return m.embed_dim
            if isinstance(m, nn.Linear):
                return m.out_features
            if isinstance(m, nn.Embedding):
                return m.embedding_dim
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                return None
        else:  # linear
            if isinstance(m, nn.Linear):
                return m.out_features
            if isinstance(m, nn.BatchNorm1d):
                return m.num_features
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding,
                              nn.MultiheadAttention, nn.BatchNorm2d)):
                return None
    return None


def conv_head_shape(in_channels: int, spatial: Sequence[int] | None,
                    head_width: int | float | None = None, head_stride: int | None = None
                    ) -> tuple[int, int]:
    """(width, stride) of the conv exit head :func:`attach_exits` puts on an activation
    (N, in_channels, *spatial) (``spatial`` None when unknown).

    ``head_width``: an int is the width in channels; a float in (0, 1] a fraction of
    ``in_channels`` (1.0 is the EENet paper's head, as wide as the activation); None the
    light default, ceil(in_channels / 4). ``head_stride``: the first conv's stride; None
    means 2 where both spatial sides are at least 8 pixels, else 1.
    """
    if head_width is None:
        width = max(1, math.ceil(in_channels / LIGHT_WIDTH_DIVISOR))
    elif isinstance(head_width, float):
        width = max(1, math.ceil(head_width * in_channels))
    else:
        width = int(head_width)
    if head_stride is None:
        stride = 2 if spatial is not None and min(spatial) >= LIGHT_STRIDE_FROM else 1
    else:
        stride = int(head_stride)
    return width, stride


def _check_head_options(head_width: int | float | None, head_stride: int | None) -> None:
    if head_width is not None:
        if isinstance(head_width, bool) or not isinstance(head_width, (int, float)):
            raise ValueError(f"head_width must be an int (channels), a float in (0, 1] (a "
                             f"fraction of the activation's channels) or None, got {head_width!r}")
        if isinstance(head_width, int) and head_width <= 0:
            raise ValueError(f"head_width must be a positive int, got {head_width!r}")
        if isinstance(head_width, float) and not 0.0 < head_width <= 1.0:
            raise ValueError(f"a fractional head_width must lie in (0, 1], got {head_width!r}")
    if head_stride is not None and (isinstance(head_stride, bool)
                                    or not isinstance(head_stride, int) or head_stride <= 0):
        raise ValueError(f"head_stride must be a positive int or None, got {head_stride!r}")


def _make_head(kind: str, shape: torch.Size | None, prefix: Sequence[_Item], num_classes: int,
               where: str, encoder: bool, head_width: int | float | None = None,
               head_stride: int | None = None) -> ExitHead:
    """A new exit head of ``kind`` for the activation (shape, batch first) after ``where``."""
    if kind == "auto":
        if shape is None:
            if not encoder:
                raise ValueError(
                    f"head='auto' needs example_input to see the shape of the activation after "
                    f"{where!r} (or pass head='conv' / 'token' / 'linear')")
            kind = "token"  # every activation of an encoder stack is (N, L, H)
        else:
            rank = len(shape)
            if rank not in (2, 3, 4):
                raise ValueError(f"head='auto': the activation after {where!r} has shape "
                                 f"{tuple(shape)}; only 2-D (linear), 3-D (token) and 4-D "
                                 "(conv) activations have an automatic head")
            kind = {4: "conv", 3: "token", 2: "linear"}[rank]
    need_rank = {"conv": 4, "token": 3}
    if shape is not None and kind in need_rank and len(shape) != need_rank[kind]:
        raise ValueError(f"a {kind} head needs a {need_rank[kind]}-D activation, but the one "
                         f"after {where!r} has shape {tuple(shape)}")
    if shape is not None:
        width = int(shape[1]) if kind == "conv" else int(shape[-1]) if kind == "token" else (
            math.prod(int(s) for s in shape[1:]))
    else:
        found = _infer_width(prefix, kind)
        if found is None:
            raise ValueError(f"cannot tell the width of the activation after {where!r} for a "
                             f"{kind} head; pass example_input")
        width = int(found)
    if kind == "conv":
        spatial = [int(v) for v in shape[2:]] if shape is not None else None
        conv_width, stride = conv_head_shape(width, spatial, head_width, head_stride)
        return ExitHead.conv(width, num_classes, width=conv_width, stride=stride)
    if kind == "token":
        return ExitHead.token(width, num_classes)
    return ExitHead.linear(width, num_classes)


def _run_chain(items: Sequence[_Item], x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    h = x
    for it in items:
        h = it.module(h)
        if it.unwrap and isinstance(h, tuple):
            h = h[0]
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"block {it.name!r} returned a {type(h).__name__}, not a tensor; "
                             "attach_exits chains only tensor -> tensor blocks")
        outs.append(h)
    return outs


def _ends_with_pool_linear(items: Sequence[_Item]) -> bool:
    if not items or not isinstance(items[-1].module, nn.Linear):
        return False
    for it in reversed(items[:-1]):
        if isinstance(it.module, _POOLS):
            return True
        if not isinstance(it.module, _PASSTHROUGH):
            return False
    return False


def attach_exits(backbone: nn.Module, after: Sequence[str], num_classes: int,
                 head: str = "auto", example_input: torch.Tensor | None = None,
                 head_width: int | float | None = None, head_stride: int | None = None
                 ) -> MultiExitNetwork:
    """Split ``backbone`` into stages ending at the named modules and add an exit after each.

    The stages hold the backbone's very own module objects (no weight is copied: training
    the multi-exit network trains the backbone). Exit k (k < len(after)) is a new
    :class:`ExitHead` after ``after[k]``; the last exit is the backbone's own final
    classifier when it has one, else a new head after its last block.

    Supported forms (the backbone is treated as a chain of blocks run in order):

    (a) ``nn.Sequential`` (with the stock forward): the blocks are its children, names are
        the child names (``"2"``). A final ``nn.Linear`` child is the last exit (its input
        must be (N, D)); without one, a new head of kind ``head`` goes after the last child.
    (b) ResNet-style: any other module whose forward applies its top-level children in
        registration order, the children ending with a pooling module and a final
        ``nn.Linear`` (``nn.Dropout`` / ``nn.Flatten`` / ``nn.Identity`` allowed between),
        the forward flattening the pooled (N, D, 1, 1) output before the Linear, like
        torchvision's ResNet (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``).
        The last exit is ``ExitHead(Flatten(1), backbone.fc)``.
    (c) Encoder stacks: a module whose forward applies its top-level children in order and
        iterates an ``nn.ModuleList`` of transformer layers (``model.layers``), or an
        ``nn.TransformerEncoder`` itself; names are ``"layers.3"``. Layers are called with
        the hidden states only (no masks); a tuple output is unwrapped to ``[0]`` (HF
        ``BertLayer``). Activations are batch-first (N, L, H). If the last child is an
        ``nn.Linear`` it is the last exit, applied to the first token (or to (N, D) if the
        block before it already pooled); otherwise a new token head goes after the last block.

    In every form, a name may also be a dotted path into a nested ``nn.Sequential`` /
    ``nn.ModuleList`` / ``nn.TransformerEncoder`` child (``"layer3.1"``, ``"encoder.layers.2"``),
    or name such a container (the exit goes after its last block). The final classifier, if
    any, must have ``out_features == num_classes``.

    Heads: ``head="auto"`` picks :meth:`ExitHead.conv` for 4-D (N, C, H, W) activations,
    :meth:`ExitHead.token` for 3-D (N, L, H) and :meth:`ExitHead.linear` for 2-D; it reads
    the shapes by running ``example_input`` (eval mode, no grad), which it therefore needs,
    except for encoder stacks (every activation is (N, L, H), H read from the layers).
    ``"conv"`` / ``"token"`` / ``"linear"`` force one kind; without ``example_input`` their
    width is read from the last module with a known width before the exit (heuristic).

    Conv heads are light by default: the paper's body (3 x conv3x3 + BN + ReLU, pooled,
    Linear) at a quarter of the activation's channels (``head_width``: an int for that many
    channels, a float for a fraction of the activation's channels, 1.0 being the paper's head
    as wide as the activation), its first conv at stride 2 on activations of at least 8 x 8
    pixels (``head_stride`` sets it for every conv head; without ``example_input`` the
    default is 1). The paper's full-width head after each of ResNet-18's first three stages
    costs 19% of the backbone at 32 x 32 inputs; the default costs 0.6-2.4%.
    :meth:`MultiExitNetwork.flops` reports each head's FLOPs relative to the backbone.
    ``head_width`` / ``head_stride`` apply to conv heads only.
    With ``example_input``, the function also checks that the chain reproduces
    ``backbone(example_input)``, which catches a forward that does not run the children in
    order. New heads get the backbone's device, floating dtype and train/eval mode.

    The network records how it was built (:func:`architecture_of`) when the backbone does
    (a module from a builder registered in :mod:`eenet.models`), so that
    :func:`eenet.saving.save_model` can save it and ``load_model`` rebuild it.

    Raises ValueError for: unknown names, duplicate names or names that land on the same
    position, names not in forward order, an exit on or right before the final classifier
    (it would duplicate the last exit), a final classifier with out_features != num_classes,
    an unsupported model form, a missing ``example_input`` where shapes are needed, and a
    chain that does not reproduce the backbone's output.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {head!r}; expected one of {HEAD_KINDS}")
    _check_head_options(head_width, head_stride)
    if isinstance(after, str):
        raise ValueError(f"after must be a sequence of module names, got the string {after!r} "
                         f"(did you mean [{after!r}]?)")
    after = list(after)
    for name in after:
        if not isinstance(name, str) or not name:
            raise ValueError(f"module names must be non-empty strings, got {name!r}")
    dupes = sorted({n for n in after if after.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate module names in after: {dupes}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")

    # the chain of blocks, containers expanded where the names reach into them
    items = _items_of("", backbone)
    if not items:
        raise ValueError(f"{type(backbone).__name__} has no child modules to split into stages")
    for name in after:
        items = _expand(items, name)
    positions = [_position(items, n) for n in after]
    for i in range(1, len(after)):
        if positions[i] <= positions[i - 1]:
            what = "the same position as" if positions[i] == positions[i - 1] else "before"
            raise ValueError(
                f"names are not in forward order: {after[i]!r} (block {positions[i]}) comes "
                f"{what} {after[i - 1]!r} (block {positions[i - 1]}); list them in the order "
                "the forward runs them")

    # the form of the model
    encoder = any(it.unwrap or _is_plain_encoder(it.module) for it in items)
    if _is_plain_sequential(backbone):
        form = "sequential"
    elif _is_plain_encoder(backbone) or (encoder and not _ends_with_pool_linear(items)):
        form = "encoder"
    elif _ends_with_pool_linear(items):
        form = "resnet"
    else:
        raise ValueError(
            f"unsupported backbone {type(backbone).__name__}: attach_exits handles "
            "nn.Sequential, ResNet-style models whose children end with a pooling module and "
            "an nn.Linear, and encoder stacks with an nn.ModuleList of layers (see the "
            f"docstring); its blocks are {_show([it.name for it in items])}")

    last_module = items[-1].module
    classifier = last_module if isinstance(last_module, nn.Linear) else None
    own = classifier is not None
    body_items = items[:-1] if own else items
    if not body_items:
        raise ValueError("the backbone has no block before its final classifier")
    if classifier is not None and classifier.out_features != num_classes:
        raise ValueError(f"the backbone's final classifier {items[-1].name!r} has "
                         f"out_features={classifier.out_features}, but num_classes="
                         f"{num_classes}")
    last_block = len(body_items) - 1
    for name, pos in zip(after, positions, strict=True):
        if pos > last_block:
            raise ValueError(f"{name!r} is the backbone's final classifier, which is already "
                             "the last exit; leave it out of after")
        if pos == last_block:
            end = (f"the final classifier {items[-1].name!r}" if own
                   else "the end of the backbone")
            raise ValueError(f"no block runs between {name!r} and {end}: an exit there would "
                             "duplicate the last exit; leave it out of after")

    # shapes (and a check of the chain) from example_input
    shapes: list[torch.Size] | None = None
    if example_input is not None:
        shapes = _check_chain(backbone, items, classifier, form, example_input)

    # stages and heads
    cuts = [*positions, last_block]
    stages: list[nn.Module] = []
    heads: list[ExitHead] = []
    start = 0
    for k, cut in enumerate(cuts):
        chunk = body_items[start:cut + 1]
        stages.append(ChainStage([it.module for it in chunk], [it.name for it in chunk],
                                 [it.unwrap for it in chunk]))
        start = cut + 1
        if k < len(after) or classifier is None:
            where = after[k] if k < len(after) else body_items[-1].name
            kind = head
            shape = shapes[cut] if shapes is not None else None
            new = _make_head(kind, shape, body_items[:cut + 1], num_classes, where,
                             encoder=(form == "encoder"), head_width=head_width,
                             head_stride=head_stride)
            heads.append(new.placed_like(backbone))
        else:
            body: nn.Module = FirstTokenIfSequence() if form == "encoder" else nn.Flatten(1)
            heads.append(ExitHead(body, classifier))
    net = MultiExitNetwork(stages, heads)
    # the new wrappers follow the backbone's mode; the backbone's modules keep their own
    own_modules = {id(m) for m in backbone.modules()}
    for m in net.modules():
        if id(m) not in own_modules:
            m.training = backbone.training
    _record_attached(net, backbone, after, num_classes, head, example_input, head_width,
                     head_stride)
    return net


def _record_attached(net: MultiExitNetwork, backbone: nn.Module, after: list[str],
                     num_classes: int, head: str, example_input: torch.Tensor | None,
                     head_width: int | float | None, head_stride: int | None) -> None:
    """Record the arguments of an :func:`attach_exits` call on ``net`` (the example input as
    its shape, batch of at most 2, and dtype: the rebuild runs it as zeros)."""
    spec = architecture_of(backbone)
    if spec is None or spec.get("arch") is None:
        why = spec.get("reason") if spec else "it was not built by a registered builder"
        record_architecture(net, None, None, reason=(
            f"its backbone ({type(backbone).__name__}) cannot be rebuilt: {why}; register the "
            "backbone's builder with eenet.models.register and build it through that"))
        return
    example = None
    if example_input is not None:
        shape = [min(2, int(example_input.shape[0])), *map(int, example_input.shape[1:])]
        example = {"shape": shape, "dtype": str(example_input.dtype).removeprefix("torch.")}
    record_architecture(net, "attach_exits", {
        "backbone": spec, "after": list(after), "num_classes": num_classes, "head": head,
        "example_input": example, "head_width": head_width, "head_stride": head_stride})


@torch.no_grad()
def _check_chain(backbone: nn.Module, items: list[_Item], classifier: nn.Linear | None,
                 form: str, x: torch.Tensor) -> list[torch.Size]:
    """Run the chain on ``x`` in eval mode: the activation shape after every block, and a
    check that the chain (and the last exit) reproduce ``backbone(x)``."""
    ref = next((p for p in backbone.parameters()), None)
    if ref is not None and x.device != ref.device:
        x = x.to(ref.device)
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        if classifier is not None:
            acts = _run_chain(items[:-1], x)
            pooled = FirstTokenIfSequence()(acts[-1]) if form == "encoder" else acts[-1].flatten(1)
            ours = classifier(pooled)
        else:
            acts = _run_chain(items, x)
            ours = acts[-1]
        expected = backbone(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(expected, torch.Tensor):
        raise ValueError(f"backbone(example_input) returned a {type(expected).__name__}; "
                         "attach_exits needs a model that returns a tensor")
    if ours.shape != expected.shape:
        raise ValueError(
            f"the chain of the backbone's blocks gives shape {tuple(ours.shape)} but "
            f"backbone(example_input) gives {tuple(expected.shape)}: its forward is not one of "
            "the forms attach_exits supports (children run in registration order)")
    tol = 1e-4 * (1.0 + float(expected.abs().max())) if expected.numel() else 0.0
    diff = float((ours.float() - expected.float()).abs().max()) if expected.numel() else 0.0
    if not diff <= tol:
        raise ValueError(
            f"the chain of the backbone's blocks does not reproduce backbone(example_input) "
            f"(max abs difference {diff:.3g}): its forward is not one of the forms attach_exits "
            "supports (children run in registration order)")
    return [a.shape for a in acts]

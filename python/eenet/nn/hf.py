"""Exits for Hugging Face encoder models (BERT, RoBERTa, ELECTRA, ... : every model with
``model.embeddings`` and a layer list ``model.encoder.layer``), without importing
``transformers``.

Shapes: input ids (N, L) int64; hidden states (N, L, H) batch first; exit logits (N, C).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .heads import TOKEN_POOLS, ExitHead
from .multi_exit import ChainStage, MultiExitNetwork, _show, record_architecture

__all__ = ["HF_HEADS", "HFEncoderStage", "hf_encoder_exits", "pad_token_id"]

# the exit heads hf_encoder_exits builds by name: ExitHead.token with that pool
HF_HEADS: tuple[str, ...] = TOKEN_POOLS
# the attribute under which hf_encoder_exits records the model's padding token id
PAD_ATTR = "eenet_pad_token_id"


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) mask, 1 = attend / 0 = padding, to the additive (N, 1, 1, L) form that HF
    encoder layers take: 0 where attended, the dtype's lowest value where padded."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class HFEncoderStage(ChainStage):
    """A stage of a Hugging Face encoder: optionally the embeddings, then encoder layers.

    ``forward(h, attention_mask=None, token_type_ids=None)``: h is (N, L) input ids for the
    stage holding the embeddings, else (N, L, H) hidden states; ``attention_mask`` (N, L)
    (1 = token, 0 = padding) reaches every layer in HF's additive form. Without it every
    token attends to every other, which is exact for unpadded batches. ``token_type_ids``
    (N, L), the segment ids a tokenizer and its collator produce, go to the embeddings
    (the stages after them ignore it).
    """

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **row_inputs: torch.Tensor
                ) -> torch.Tensor:
        if row_inputs:
            raise TypeError(f"the encoder stage of {_show(self.names, 4)} takes the row inputs "
                            f"attention_mask and token_type_ids only, got {sorted(row_inputs)} "
                            "as well")
        additive = None
        for block, name, unwrap in zip(self.blocks, self.names, self.unwrap, strict=True):
            if name == "embeddings":
                h = block(h) if token_type_ids is None else _embed(block, h, token_type_ids)
                continue
            if attention_mask is not None and additive is None:
                additive = additive_attention_mask(attention_mask, h.dtype)
            h = block(h, additive)
            if unwrap and isinstance(h, tuple):
                h = h[0]
        return h


def _embed(embeddings: nn.Module, ids: torch.Tensor, token_type_ids: torch.Tensor
           ) -> torch.Tensor:
    try:
        return embeddings(ids, token_type_ids=token_type_ids)
    except TypeError as exc:
        if "token_type_ids" not in str(exc):
            raise
        raise TypeError(f"this encoder's embeddings ({type(embeddings).__name__}) take no "
                        "token_type_ids; leave them out of the batch") from exc


def _layers_of(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(getattr(model, "embeddings", None), nn.Module) or not isinstance(
            layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} is not a Hugging Face encoder model: hf_encoder_exits "
            "needs model.embeddings and the layer list model.encoder.layer (BertModel, "
            "RobertaModel, ...; pass the base model, not a *ForSequenceClassification wrapper)")
    if len(layers) == 0:
        raise ValueError("the model's encoder has no layers")
    return layers


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    norms = [m for m in model.embeddings.modules() if isinstance(m, nn.LayerNorm)]
    if norms and len(norms[-1].normalized_shape) == 1:
        return int(norms[-1].normalized_shape[0])
    raise ValueError("cannot tell the model's hidden size: it has no config.hidden_size and "
                     "its embeddings end with no 1-D LayerNorm")


def pad_token_id(net: nn.Module) -> int | None:
    """The padding token id recorded by :func:`hf_encoder_exits` (from the model's config),
    or None: lets training and calibration refuse padded ids that come without their
    ``attention_mask``."""
    value = getattr(net, PAD_ATTR, None)
    return value if isinstance(value, int) else None


HeadFactory = Callable[[int, int], ExitHead]


def hf_encoder_exits(model: nn.Module, after_layers: Sequence[int], num_classes: int,
                     example_input: torch.Tensor | None = None,
                     head: str | HeadFactory = "first") -> MultiExitNetwork:
    """A :class:`MultiExitNetwork` over a Hugging Face encoder, exits after the given layers.

    Stage 0 is ``model.embeddings`` followed by layers ``0 .. after_layers[0] - 1``; stage k
    runs the next layers, and the last stage ends with the model's last layer. Every exit is a
    new head (the model's own pooler is not used): ``head="first"`` builds
    :meth:`ExitHead.token` (first token -> Linear -> tanh -> Linear, as BERT's pooler and
    classifier), ``head="mean"`` the same on the masked mean of the tokens (for
    mean-pooling models such as all-MiniLM-L6-v2, whose first token carries little at the
    lower layers; the head reads the ``attention_mask`` row input), and a callable
    ``head(hidden, num_classes) -> ExitHead`` builds custom heads (one call per exit; a
    head that reads the mask names it in its ``row_inputs``). The stages hold the model's
    own modules (no weight copied). E.g. BERT-base with ``after_layers=(3, 6, 9)``: exits
    after layers 3, 6, 9 and 12.

    The network records the model's class and config (:func:`eenet.nn.architecture_of`), so
    that :func:`eenet.saving.save_model` can save it and ``load_model`` rebuild it.

    Padded batches: pass the (N, L) ``attention_mask`` as a row input, ``net(ids,
    attention_mask=mask)`` or ``Engine(net, policy)(ids, attention_mask=mask)`` (the engine
    compacts it with the rows); every stage (:class:`HFEncoderStage`) hands it to its layers.
    Without it every token attends to every other, which is exact for unpadded batches.

    Args:
        model: the base encoder (``BertModel``, ``RobertaModel``, ...), any mode and dtype.
        after_layers: strictly increasing layer counts in ``[1, num_layers)``.
        num_classes: C, the classes of every exit head.
        example_input: optional (N, L) input ids (unpadded); if given, the stages' output is
            checked against ``model(example_input).last_hidden_state``.
        head: ``"first"``, ``"mean"`` or a head factory, as above. Networks with named heads
            record how to rebuild them (for :func:`eenet.saving.save_model`); with a factory
            they record that they cannot be rebuilt.

    Raises:
        ValueError: a model without ``embeddings`` / ``encoder.layer``, bad ``after_layers``,
            ``num_classes`` or ``head``, or stages that do not reproduce the model's hidden
            states.
        TypeError: a head factory that does not return an :class:`ExitHead`.
    """
    layers = _layers_of(model)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not callable(head) and head not in HF_HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HF_HEADS} or a callable "
                         "(hidden, num_classes) -> ExitHead")
    cuts = list(after_layers)
    n = len(layers)
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c < n:
            raise ValueError(f"after_layers must hold layer counts in [1, {n}) (the last exit "
                             f"after layer {n} is always there), got {c!r}")
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"after_layers must be strictly increasing, got {cuts}")

    stages: list[nn.Module] = []
    start = 0
    for end in [*cuts, n]:
        blocks = [layers[i] for i in range(start, end)]
        names = [f"encoder.layer.{i}" for i in range(start, end)]
        unwrap = [True] * len(blocks)
        if start == 0:
            blocks, names, unwrap = [model.embeddings, *blocks], ["embeddings", *names], [
                False, *unwrap]
        stages.append(HFEncoderStage(blocks, names, unwrap))
        start = end
    hidden = _hidden_size(model)
    heads = [_make_head(head, hidden, num_classes, k).placed_like(model)
             for k in range(len(stages))]
    net = MultiExitNetwork(stages, heads)
    net.train(model.training)  # the model's mode, for the wrapper as for the heads
    if example_input is not None:
        _check_stages(model, net, example_input)
    _record(net, model, cuts, num_classes, head)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and not isinstance(pad, bool):
        object.__setattr__(net, PAD_ATTR, pad)
    return net


def _make_head(head: str | HeadFactory, hidden: int, num_classes: int, k: int) -> ExitHead:
    if isinstance(head, str):
        return ExitHead.token(hidden, num_classes, pool=head)
    made = head(hidden, num_classes)
    if not isinstance(made, ExitHead):
        raise TypeError(f"the head factory returned a {type(made).__name__} for exit {k}; it "
                        "must return an eenet.nn.ExitHead")
    return made


def _record(net: MultiExitNetwork, model: nn.Module, cuts: list[int], num_classes: int,
            head: str | HeadFactory) -> None:
    """Record how to rebuild ``net``: the transformers class and its config (self-describing:
    no registration needed) with its attention implementation (``eager``, ``sdpa``, ...,
    which ``config.to_dict`` leaves out and which changes the outputs' last bits), the cuts,
    the classes and the heads' name."""
    cls = type(model)
    config = getattr(model, "config", None)
    if not cls.__module__.startswith("transformers.") or not callable(
            getattr(config, "to_dict", None)):
        record_architecture(net, None, None, reason=(
            f"its encoder ({cls.__name__}) is not a transformers model with a config"))
        return
    if not isinstance(head, str):
        record_architecture(net, None, None, reason=(
            "its exit heads come from a head factory, which cannot be saved by name"))
        return
    settings = config.to_dict()
    settings.pop("attn_implementation", None)  # recorded beside it, as the model resolved it
    record_architecture(net, "hf_encoder_exits", {
        "model": {"class": cls.__name__, "config": settings,
                  "attn_implementation": getattr(config, "_attn_implementation", None)},
        "after_layers": list(cuts), "num_classes": num_classes, "head": head})


@torch.no_grad()
def _check_stages(model: nn.Module, net: MultiExitNetwork, ids: torch.Tensor) -> None:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        expected = model(ids).last_hidden_state
        h = ids
        for stage in net.stages:
            h = stage(h)
    finally:
        for m, mode in modes.items():
            m.training = mode
    same_shape = h.shape == expected.shape
    diff = float((h.float() - expected.float()).abs().max()) if same_shape and h.numel() else 0.0
    tol = 1e-4 * (1.0 + float(expected.abs().max())) if same_shape and h.numel() else 0.0
    if not same_shape or not diff <= tol:
        raise ValueError(
            f"the stages do not reproduce model(example_input).last_hidden_state (shape "
            f"{tuple(h.shape)} vs {tuple(expected.shape)}, max abs difference {diff:.3g}): "
            "the model's forward does more than embeddings followed by its layers")

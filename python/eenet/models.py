"""Architectures buildable by name: the registry that saved model files are rebuilt from.

A builder takes JSON-able keyword arguments (its ``config``) and returns a module: a
:class:`~eenet.nn.MultiExitNetwork`, or a plain backbone for :func:`eenet.nn.attach_exits`.
Registering it (:func:`register`) wraps it so that every module it returns records its name
and arguments (:func:`eenet.nn.architecture_of`); :func:`eenet.saving.save_model` writes
them, and :func:`build` rebuilds the module from a file. The library's builders register
themselves:

- ``small_cnn``: the demo's CNN (below);
- ``attach_exits``: a registered backbone with exits attached (recorded by
  :func:`eenet.nn.attach_exits` when its backbone came from a registered builder);
- ``hf_encoder_exits``: a Hugging Face encoder with exits, rebuilt from the transformers
  class name and config it records (needs ``transformers`` to load; no registration).

A backbone of one's own, saved with its exits::

    @eenet.models.register("my_resnet")
    def my_resnet(num_classes: int = 10) -> nn.Module: ...

    net = eenet.nn.attach_exits(my_resnet(num_classes=10), ["layer1", "layer2"], 10,
                                example_input=x[:2])
    eenet.saving.save_model(net, "model.pt")        # load_model("model.pt") rebuilds it
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .nn import ExitHead, MultiExitNetwork, attach_exits, hf_encoder_exits
from .nn.multi_exit import record_architecture

__all__ = ["ARCHITECTURES", "build", "register", "small_cnn"]

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)

ARCHITECTURES: dict[str, Builder] = {}


def register(name: str, builder: F | None = None, *, replace: bool = False
             ) -> F | Callable[[F], F]:
    """Register ``builder`` (``builder(**config) -> nn.Module``, config JSON-able) under
    ``name``; usable as a decorator (``@register("name")``). Returns the wrapped builder:
    call that one (or :func:`build`) so that the modules it returns record how they were
    built. Registering a taken name raises ``ValueError`` unless ``replace``, and so does a
    builder with positional-only parameters or ``*args`` (a file rebuilds with keywords).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an architecture name must be a non-empty string, got {name!r}")

    def wrap(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"builder for {name!r} must be callable, got {type(fn).__name__}")
        if name in ARCHITECTURES and not replace:
            raise ValueError(f"architecture {name!r} is already registered (pass replace=True "
                             "to replace it)")
        signature = inspect.signature(fn)
        by_position = [p.name for p in signature.parameters.values()
                       if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
        if by_position:  # a file rebuilds the module with keyword arguments only
            raise ValueError(f"builder for {name!r} takes {by_position} by position only; a "
                             "saved module is rebuilt as builder(**config): make them "
                             "ordinary or keyword parameters")

        @functools.wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> nn.Module:
            module = fn(*args, **kwargs)
            if not isinstance(module, nn.Module):
                raise TypeError(f"builder {name!r} returned a {type(module).__name__}, not an "
                                "nn.Module")
            record_architecture(module, name, _config_of(signature, args, kwargs))
            return module

        ARCHITECTURES[name] = recorded
        return recorded  # type: ignore[return-value]

    return wrap if builder is None else wrap(builder)


def _config_of(signature: inspect.Signature, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of a builder call by name, defaults included (so that a file keeps
    the architecture even if a default changes later); ``**kwargs`` flattened."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    config: dict[str, Any] = {}
    for pname, value in bound.arguments.items():
        kind = signature.parameters[pname].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            config.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("registered builders take keyword arguments, not *args")
        else:
            config[pname] = value
    return config


def build(arch: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Build the registered architecture ``arch`` from its JSON-able ``config``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)} "
                         "(register a builder with eenet.models.register)")
    config = dict(config or {})
    try:
        inspect.signature(ARCHITECTURES[arch]).bind(**config)
    except TypeError as exc:
        raise ValueError(f"architecture {arch!r} does not take config {config}: {exc}") from exc
    return ARCHITECTURES[arch](**config)


# -- the library's builders ------------------------------------------------------------------


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


@register("small_cnn")
def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
              widths: Sequence[int] = (16, 32, 64, 128), head_width: int = 16,
              head_stride_from: int = 7) -> MultiExitNetwork:
    """A small CNN for (N, in_channels, image_size, image_size) inputs, one exit per stage.

    Stage k: conv3x3 stride 2 + conv3x3, each with BN + ReLU, so every stage halves the
    resolution. Exit k: the paper's conv head (3 x conv3x3 + BN + ReLU, pooled, Linear) of
    width ``head_width``; its first conv has stride 2 where the stage's output is at least
    ``head_stride_from`` pixels wide, which keeps the early exits cheap.
    """
    stages, heads, c_in, size = [], [], in_channels, image_size
    for w in widths:
        size = math.ceil(size / 2)
        stages.append(_block(c_in, w, stride=2))
        heads.append(ExitHead.conv(w, num_classes, width=head_width,
                                   stride=2 if size >= head_stride_from else 1))
        c_in = w
    return MultiExitNetwork(stages, heads)


@register("attach_exits")
def _attached(backbone: dict[str, Any], after: list[str], num_classes: int, head: str = "auto",
              example_input: dict[str, Any] | None = None,
              head_width: int | float | None = None, head_stride: int | None = None
              ) -> MultiExitNetwork:
    """:func:`eenet.nn.attach_exits` on the registered backbone ``{"arch", "config"}``; the
    example input, ``{"shape", "dtype"}``, is run as zeros."""
    if not isinstance(backbone, dict) or not isinstance(backbone.get("arch"), str):
        raise ValueError(f"attach_exits config: backbone must be {{'arch', 'config'}}, got "
                         f"{backbone!r}")
    model = build(backbone["arch"], backbone.get("config"))
    x = None
    if example_input is not None:
        x = torch.zeros(example_input["shape"], dtype=getattr(torch, example_input["dtype"]))
        if x.is_floating_point():  # a float64 / bf16 network ran its example in its dtype
            model.to(x.dtype)
    return attach_exits(model, after, num_classes, head=head, example_input=x,
                        head_width=head_width, head_stride=head_stride)


@register("hf_encoder_exits")
def _hf_encoder(model: dict[str, Any], after_layers: list[int], num_classes: int,
                head: str = "first") -> MultiExitNetwork:
    """:func:`eenet.nn.hf_encoder_exits` on a randomly initialised transformers model
    ``{"class": name in transformers, "config": its config as a dict, "attn_implementation":
    its attention implementation}`` (the weights come from the file)."""
    try:
        import transformers
    except ModuleNotFoundError as exc:
        raise ValueError(f"this network wraps a transformers {model.get('class')}; loading "
                         'it needs transformers: pip install "eenet-kernels[hf]"') from exc
    cls = getattr(transformers, str(model.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)
            and hasattr(cls, "config_class")):
        raise ValueError(f"{model.get('class')!r} is not a transformers model class")
    attention = model.get("attn_implementation")  # (files of earlier versions lack it)
    extra = {"attn_implementation": attention} if isinstance(attention, str) else {}
    encoder = cls(cls.config_class.from_dict(dict(model["config"]), **extra)).eval()  # (a copy:
    # from_dict writes into the dict it is given, which the record keeps)
    return hf_encoder_exits(encoder, after_layers, num_classes, head=head)

"""The batch forms that training, logit collection and policy fitting accept.

A batch is one of:

- ``(x, y)``: x whatever the first stage takes (N, ...), y (N,) integer labels;
- ``(x, y, row_inputs)``: the same and a dict of per-row side inputs, each (N, ...), that go
  to every stage and exit head as keyword arguments (``{"attention_mask": mask}``);
- a dict: the input under ``"x"`` or ``"input_ids"``, the labels under ``"y"``, ``"labels"``
  or ``"label"``, every other entry a row input (the form Hugging Face collators produce).

Anything else is refused with a message, never guessed at: in particular ``(ids, mask, y)``
is ambiguous (the mask would be read as the labels) and raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .nn.hf import pad_token_id

__all__ = ["INPUT_KEYS", "LABEL_KEYS", "check_padding", "split_batch"]

INPUT_KEYS: tuple[str, ...] = ("x", "input_ids")
LABEL_KEYS: tuple[str, ...] = ("y", "labels", "label")


def _one_key(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> str:
    found = [k for k in keys if k in batch]
    if len(found) != 1:
        raise ValueError(f"a dict batch must hold its {what} under exactly one of {keys}; it "
                         f"has the keys {sorted(batch)}")
    return found[0]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(x, y, row_inputs)`` of one batch in any of the module's forms.

    Raises:
        ValueError: an unknown form, a 3-tuple whose last item is not a dict, or a dict
            without exactly one input and one label key.
        TypeError: x, y or a row input that is not a tensor.
    """
    if isinstance(batch, Mapping):
        x_key = _one_key(batch, INPUT_KEYS, "input")
        y_key = _one_key(batch, LABEL_KEYS, "labels")
        x, y = batch[x_key], batch[y_key]
        row_inputs = {k: v for k, v in batch.items() if k not in (x_key, y_key)}
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        row_inputs = {}
    elif isinstance(batch, (tuple, list)) and len(batch) == 3 and isinstance(batch[2], Mapping):
        x, y, row_inputs = batch[0], batch[1], dict(batch[2])
    elif isinstance(batch, (tuple, list)):
        raise ValueError(
            f"a batch of {len(batch)} items is ambiguous: pass (x, y), (x, y, "
            "{'attention_mask': mask, ...}) or a dict batch {'input_ids': x, 'labels': y, "
            "'attention_mask': mask}; (ids, mask, y) would read the mask as the labels")
    else:
        raise ValueError(f"a batch must be (x, y), (x, y, row_inputs) or a dict, got a "
                         f"{type(batch).__name__}")
    for name, t in (("x", x), ("y", y), *row_inputs.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch entry {name!r} must be a tensor, got {type(t).__name__}")
    return x, y, row_inputs


def check_padding(net: torch.nn.Module, x: torch.Tensor,
                  row_inputs: Mapping[str, torch.Tensor]) -> None:
    """Refuse padded token ids that come without their ``attention_mask``: for a network
    that records its padding id (:func:`eenet.nn.hf_encoder_exits`), ids holding it and no
    mask would let every token attend to the padding, silently changing every result."""
    pad = pad_token_id(net)
    if pad is None or "attention_mask" in row_inputs or x.is_floating_point():
        return
    if bool((x == pad).any()):
        raise ValueError(
            f"the input ids hold the padding id {pad} but the batch has no attention_mask: "
            "pass it as a row input ((ids, y, {'attention_mask': mask}) or a dict batch)")

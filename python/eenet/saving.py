"""Saving and loading models and fitted policies.

A model file (``torch.save``, read with ``weights_only=True``) holds ``{"format":
"eenet-model/1", "arch", "config", "state_dict", "meta"}``: a registered architecture
(:mod:`eenet.models`: ``small_cnn``, ``attach_exits`` on a registered backbone,
``hf_encoder_exits``, or one's own), its JSON config and the weights. Every network the
library builds records its architecture, so ``save_model(net, path)`` needs no more.

A policy file is the JSON format of :mod:`eenet.policies.base` (``"format":
"eenet-policy"``, ``"format_version": 1``, the policy, its costs, the budget and ``meta``);
``save_policy`` / ``load_policy`` and :meth:`ExitPolicy.save` / ``load`` read and write the
same files.

Loading checks the format, rebuilds the architecture and refuses a file that does not
match (wrong kind of file, another format version, missing or misshapen weights, a policy
made for another number of exits) with a ``ValueError`` that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any

import torch
from torch import nn

from .budget import Budget, Costs
from .files import write_whole
from .models import ARCHITECTURES, build
from .nn import MultiExitNetwork, architecture_of
from .policies import ExitPolicy
from .policies.base import read_policy_file, write_policy_file

MODEL_FORMAT = "eenet-model/1"

__all__ = ["MODEL_FORMAT", "fingerprint", "load_model", "load_plain", "load_policy",
           "model_mismatch", "model_record", "save_model", "save_policy"]


def save_model(net: MultiExitNetwork, path: str, arch: str | None = None,
               config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
               check: bool = True) -> None:
    """Write ``net``'s weights with the architecture that rebuilds it.

    ``arch`` / ``config``: a registered architecture and its JSON-able config; by default
    the ones ``net`` recorded when it was built (:func:`eenet.nn.architecture_of`).
    ``meta``: free-form JSON-able information (``load_model`` returns it). The file is
    written whole or not at all (:func:`eenet.files.write_whole`): a failed save leaves the
    file that was there. With ``check``,
    the architecture is built once here and its parameter names and shapes are compared
    with ``net``'s, so a file that ``load_model`` would refuse is never written.

    Raises ``ValueError`` for an unregistered ``arch``, a network that records no
    architecture (and none given), a config that is not JSON-able, or (``check``) an
    architecture that does not rebuild ``net``.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    if arch is None:
        spec = architecture_of(net)
        if spec is None or spec.get("arch") is None:
            why = spec.get("reason") if spec else "it records no architecture"
            raise ValueError(
                f"cannot save this {type(net).__name__}: {why}. Build it with a registered "
                "builder (eenet.models: small_cnn, attach_exits on a backbone from "
                "eenet.models.register, hf_encoder_exits), or pass arch= and config= of a "
                f"registered architecture (known: {sorted(ARCHITECTURES)})")
        arch, config = spec["arch"], spec["config"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: a file of it could not be loaded; "
                         f"register its builder with eenet.models.register({arch!r}, builder) "
                         f"(known: {sorted(ARCHITECTURES)})")
    try:
        config = json.loads(json.dumps(config if config is not None else {}))
        meta = json.loads(json.dumps(meta if meta is not None else {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config and meta must be JSON-able: {exc}") from exc
    state = net.state_dict()
    if check:
        _check_rebuilds(arch, config, state)
    blob = {"format": MODEL_FORMAT, "arch": arch, "config": config, "state_dict": state,
            "meta": meta}
    write_whole(path, lambda f: torch.save(blob, f))


def _check_rebuilds(arch: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    try:
        rebuilt = build(arch, config).state_dict()
    except (TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"architecture {arch!r} with config {config} cannot rebuild this "
                         f"network: {type(exc).__name__}: {exc}") from exc
    missing = sorted(set(rebuilt) - set(state))
    unexpected = sorted(set(state) - set(rebuilt))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(rebuilt[k].shape)}"
              for k in sorted(set(state) & set(rebuilt)) if state[k].shape != rebuilt[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} {names[:5]}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected),
                                     ("shapes differ", shapes)) if names]
        raise ValueError(f"architecture {arch!r} with config {config} does not rebuild this "
                         f"network: {'; '.join(parts)}")


def load_model(path: str) -> tuple[MultiExitNetwork, dict[str, Any]]:
    """(network rebuilt from its architecture, weights loaded, in eval mode; the file's
    meta). A missing file raises ``FileNotFoundError``, any other unreadable or mismatched
    file ``ValueError``."""
    blob = load_plain(path, "an eenet model file")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an eenet model file (expected format "
                         f"{MODEL_FORMAT!r})")
    arch, config, state = blob.get("arch"), blob.get("config"), blob.get("state_dict")
    meta = blob.get("meta") or {}
    if not (isinstance(arch, str) and isinstance(config, dict) and isinstance(state, dict)
            and all(isinstance(t, torch.Tensor) for t in state.values())
            and isinstance(meta, dict)):
        raise ValueError(f"{path} is a damaged eenet model file: it needs 'arch' (a name), "
                         "'config' (a dict), 'state_dict' (names to tensors) and optionally "
                         f"'meta' (a dict); it has {sorted(map(str, blob))}")
    bad = sorted(k for k, t in state.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"{path}: weights {bad[:5]}{' ...' if len(bad) > 5 else ''} hold "
                         "NaN or infinite values")
    try:
        net = build(arch, config)
    except (TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{path}: architecture {arch!r} cannot be built from config "
                         f"{config}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, MultiExitNetwork):
        raise ValueError(f"{path}: architecture {arch!r} builds a "
                         f"{type(net).__name__}, not a MultiExitNetwork")
    saved = {t.dtype for t in state.values() if t.is_floating_point()}
    built = {p.dtype for p in net.parameters() if p.is_floating_point()}
    if len(saved) == 1 and saved != built:  # a bf16 / fp16 / fp64 network stays one
        net.to(next(iter(saved)))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match architecture {arch!r} with "
                         f"config {config}: {exc}") from exc
    return net.eval(), dict(meta)


def load_plain(path: str, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only, no
    code of the file runs. ``what`` names the kind of file in errors: a missing file raises
    ``FileNotFoundError``, any other unreadable file ``ValueError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as exc:
        why = str(exc)
        if "global" in why.lower():  # weights_only refused a class or function to import
            raise ValueError(f"{path} is not {what}: it holds Python objects other than "
                             "tensors and plain data, which are not loaded (that would run "
                             "code from the file)") from exc
        detail = [line for line in why.split("WeightsUnpickler error:")[-1].splitlines()
                  if line.strip()]
        raise ValueError(f"{path} is not {what}: not a file torch.save wrote "
                         f"({detail[0].strip() if detail else type(exc).__name__})") from exc
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not {what} ({first})") from exc


def fingerprint(net: nn.Module) -> str:
    """SHA-256 (hex) of a module's state: every entry's name, dtype, shape and bytes. Two
    networks with the same weights share it; retraining changes it."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_record(net: nn.Module) -> dict[str, Any]:
    """What a policy file's meta records of the model it was calibrated on: the weights'
    :func:`fingerprint` and the architecture (:func:`eenet.nn.architecture_of`, JSON), so
    that a model with the same weights but other heads or cuts is told apart too."""
    return {"model_fingerprint": fingerprint(net), "model_architecture": _architecture(net)}


def _architecture(net: nn.Module) -> Any:
    """:func:`eenet.nn.architecture_of` as a policy file holds it (through JSON: tuples
    become lists)."""
    return json.loads(json.dumps(architecture_of(net)))


def model_mismatch(meta: dict[str, Any], net: nn.Module) -> str | None:
    """Why ``net`` is not the model a policy file's ``meta`` (:func:`model_record`) was
    calibrated on, or None (also when the meta records nothing)."""
    recorded = meta.get("model_fingerprint")
    if recorded is not None and recorded != (ours := fingerprint(net)):
        return (f"its model fingerprint {str(recorded)[:12]}... differs from this model's "
                f"{ours[:12]}...")
    arch = meta.get("model_architecture")
    if arch is not None and arch != _architecture(net):
        return "the same weights, but its model architecture (heads, cuts) differs"
    return None


def save_policy(policy: ExitPolicy, path: str, costs: Costs,
                budget: float | Budget | None = None,
                meta: dict[str, Any] | None = None) -> None:
    """Write a policy file with the costs the policy was fitted with (same format as
    :meth:`ExitPolicy.save`)."""
    write_policy_file(path, policy, costs, budget, meta)


def load_policy(path: str, num_exits: int | None = None
                ) -> tuple[ExitPolicy, Costs, dict[str, Any]]:
    """(policy, the costs it was fitted with, the rest of the file). With ``num_exits``,
    refuses a policy fitted for a network with another number of exits; refuses a file
    written without costs."""
    policy, costs, data = read_policy_file(path)
    if costs is None:
        raise ValueError(f"{path} holds no costs (it was saved without them); save it with "
                         "eenet.saving.save_policy(policy, path, costs)")
    if num_exits is not None:
        policy.check_network(num_exits)
    return policy, costs, data

"""Saving and loading models and fitted policies.

A model file (``torch.save``) holds ``{"format": "eenet-model/1", "arch", "config",
"state_dict", "meta"}``; a policy file is JSON ``{"format": "eenet-policy/1", "policy",
"costs", "budget", "meta"}``. Loading checks the format, rebuilds the architecture and
refuses a file that does not match (wrong kind of file, missing or misshapen weights, a
policy made for another number of exits) with a ``ValueError`` that says what differs.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .budget import Costs
from .models import build
from .nn import MultiExitNetwork
from .policies import ExitPolicy

MODEL_FORMAT = "eenet-model/1"
POLICY_FORMAT = "eenet-policy/1"


def save_model(net: MultiExitNetwork, path: str, arch: str, config: dict[str, Any],
               meta: dict[str, Any] | None = None) -> None:
    torch.save({"format": MODEL_FORMAT, "arch": arch, "config": config,
                "state_dict": net.state_dict(), "meta": meta or {}}, path)


def load_model(path: str) -> tuple[MultiExitNetwork, dict[str, Any]]:
    """(network in eval mode, the file's meta)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not an eenet model file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an eenet model file (expected format "
                         f"{MODEL_FORMAT!r})")
    net = build(blob["arch"], blob["config"])
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match architecture {blob['arch']!r} with "
                         f"config {blob['config']}: {exc}") from exc
    return net.eval(), dict(blob.get("meta", {}))


def save_policy(policy: ExitPolicy, path: str, costs: Costs, budget: float | None = None,
                meta: dict[str, Any] | None = None) -> None:
    data = {"format": POLICY_FORMAT, "policy": policy.to_dict(), "costs": costs.to_dict(),
            "budget": budget, "meta": meta or {}}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def load_policy(path: str, num_exits: int | None = None
                ) -> tuple[ExitPolicy, Costs, dict[str, Any]]:
    """(policy, the costs it was fitted with, the rest of the file). With ``num_exits``,
    refuses a policy fitted for a network with another number of exits."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not an eenet policy file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise ValueError(f"{path} is not an eenet policy file (expected format "
                         f"{POLICY_FORMAT!r})")
    policy = ExitPolicy.from_dict(data["policy"])
    costs = Costs.from_dict(data["costs"])
    if len(costs.values) != policy.num_exits:
        raise ValueError(f"{path}: the policy has {policy.num_exits} exits but its costs "
                         f"{len(costs.values)}")
    if num_exits is not None:
        policy.check_network(num_exits)
    return policy, costs, data

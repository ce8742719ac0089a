"""Exit policies: per-exit rules that map onto the ``exit_score`` op, and their offline oracle.

A policy for a K-exit network is K :class:`ExitRule` s. The runtime feeds rule k to
``eenet_kernels.exit_score_write`` at exit k (the last exit always takes the rest), and
:meth:`ExitPolicy.decide` replays the same decisions offline from every exit's logits with
``eenet_kernels.reference`` (the "simulate" oracle of the EENet authors), so the two agree
by construction and the tests check that they do.

Policy files (:meth:`ExitPolicy.save`, ``eenet.saving.save_policy``, the CLI) are one JSON
format::

    {"format": "eenet-policy", "format_version": 1,
     "policy": {"class": "MaxProb", "thresholds": [...], ...},   # ExitPolicy.to_dict()
     "costs": {"values": [...], "unit": "flops", "meta": {...}} or null,
     "budget": 0.5 (a fraction) or {"value": 2.5, "unit": "ms"} or null, "meta": {...}}

Reading a file of another format or another version raises ``ValueError`` saying which.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from eenet_kernels import NEVER_EXIT, reference
from eenet_kernels.checks import threshold_as_float32

from ..budget import Budget, Costs, as_budget, budget_from_json, budget_to_json
from ..files import write_whole

POLICY_FORMAT = "eenet-policy"
POLICY_FORMAT_VERSION = 1


@dataclass
class ExitRule:
    """Parameters of one exit's ``exit_score`` call.

    ``sched_weight`` (C + 2 + k [+ 1],) float32 and ``sched_bias`` only for ``eenet``.
    """

    policy: str
    threshold: float
    sched_weight: torch.Tensor | None = None
    sched_bias: float = 0.0
    use_vote: bool = False


class ExitPolicy:
    """Base class: a policy kind (the op's policy name) and one threshold per exit."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[ExitPolicy]]] = {}

    def __init__(self, thresholds: list[float]) -> None:
        if isinstance(thresholds, str | bytes) or any(
                isinstance(t, str | bytes | bool) for t in thresholds):
            raise TypeError(f"thresholds must be a list of numbers, got {thresholds!r}")
        if len(thresholds) < 1:
            raise ValueError("a policy needs one threshold per exit (at least one exit)")
        self.thresholds = [float(t) for t in thresholds]
        kind = getattr(self, "kind", None)
        for k, t in enumerate(self.thresholds):
            why = threshold_problem(kind, t) if kind is not None else (
                None if math.isfinite(t) else "must be finite")
            if why is not None:
                raise ValueError(f"threshold {k} is {t:g}: {why} (thresholds "
                                 f"{self.thresholds})")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            ExitPolicy.registry[cls.__name__] = cls

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    @property
    def needs_scores(self) -> bool:
        """Whether exit k reads the scores of exits < k (the EENet scheduler does)."""
        return self.kind == "eenet"

    @property
    def needs_preds(self) -> bool:
        """Whether exit k reads the predictions of exits < k (patience, the vote feature)."""
        return self.kind == "patience" or any(r.use_vote for r in self.rules())

    def rules(self) -> list[ExitRule]:
        return [ExitRule(self.kind, t) for t in self.thresholds]

    def check_network(self, num_exits: int) -> None:
        """Raise if this policy was made for a network with another number of exits."""
        if num_exits != self.num_exits:
            raise ValueError(f"{type(self).__name__} has {self.num_exits} exit rules but the "
                             f"network has {num_exits} exits")

    def check_logits(self, logits: list[torch.Tensor]) -> None:
        """Raise unless ``logits`` is one floating-point (N, C) tensor per exit, with the same
        N and C >= 2 throughout (and the policy's own C, for a policy that has one)."""
        if not isinstance(logits, list | tuple):
            raise TypeError(f"logits must be a list of K tensors (N, C), one per exit, got "
                            f"{type(logits).__name__}")
        self.check_network(len(logits))
        classes = getattr(self, "num_classes", None)
        for k, z in enumerate(logits):
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                what = z.dtype if isinstance(z, torch.Tensor) else type(z).__name__
                raise TypeError(f"logits[{k}] must be a floating-point tensor, got {what}")
            first = logits[0].shape
            if z.dim() != 2 or z.shape[1] < 2 or z.shape != first:
                raise ValueError(f"logits[{k}] must be (N, C) with C >= 2 and the shape of "
                                 f"logits[0], {tuple(first)}, got {tuple(z.shape)}")
            if classes is not None and z.shape[1] != classes:
                raise ValueError(f"logits[{k}] has {z.shape[1]} classes but the "
                                 f"{type(self).__name__} policy is for {classes}")

    # -- offline oracle -------------------------------------------------------------------

    def scores(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """(N, K) float32 score of every sample at every exit (reference semantics).

        ``logits``: K floating-point tensors (N, C), exit k's logits for all N samples, the
        same N and C >= 2 at every exit (``TypeError`` / ``ValueError`` naming the entry
        otherwise). Exit k sees the scores / argmax of exits < k as its history, as in the
        runtime.
        """
        self.check_logits(logits)
        rules = self.rules()
        n = logits[0].shape[0]
        scores = torch.empty(n, len(logits), dtype=torch.float32, device=logits[0].device)
        preds = torch.empty(n, len(logits), dtype=torch.int64, device=logits[0].device)
        for k, (z, rule) in enumerate(zip(logits, rules, strict=True)):
            z = z.float()
            # the policy keeps its scheduler weights on the CPU; the logits may be elsewhere
            weight = None if rule.sched_weight is None else rule.sched_weight.to(z.device)
            scores[:, k] = reference.policy_score(
                z, rule.policy, prev_scores=scores[:, :k], prev_preds=preds[:, :k],
                sched_weight=weight, sched_bias=rule.sched_bias,
                use_vote=rule.use_vote)
            preds[:, k] = z.argmax(dim=1)
        return scores

    def decide(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline decisions: (exit_index (N,) int64, score at that exit (N,) float32)."""
        scores = self.scores(logits)
        return first_exit(scores, self.thresholds)

    # -- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitPolicy:
        name = data.get("class")
        if name not in ExitPolicy.registry:
            raise ValueError(f"unknown policy class {name!r}; known: "
                             f"{sorted(ExitPolicy.registry)}")
        target = ExitPolicy.registry[name]
        if cls is not ExitPolicy and not issubclass(target, cls):
            raise ValueError(f"file holds a {name} policy, not a {cls.__name__}")
        try:
            return target._from_dict(data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid {name} policy entry: {exc!r}") from exc

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> ExitPolicy:
        return cls(list(data["thresholds"]))

    def save(self, path: str, costs: Costs | None = None,
             budget: float | Budget | None = None, meta: dict[str, Any] | None = None) -> None:
        """Write the policy file (module docstring), with the costs it was fitted with, the
        budget (a fraction of the full model, or an :class:`eenet.budget.Budget` in the
        costs' unit) and free-form ``meta`` (JSON-able)."""
        write_policy_file(path, self, costs, budget, meta)

    @classmethod
    def load(cls, path: str) -> ExitPolicy:
        """The policy of a policy file; on a subclass, refuses a file holding another kind."""
        policy, _, _ = read_policy_file(path, cls)
        return policy

    def __repr__(self) -> str:
        ts = ", ".join(f"{t:.4g}" for t in self.thresholds)
        return f"{type(self).__name__}(thresholds=[{ts}])"


def threshold_problem(kind: str, threshold: float) -> str | None:
    """Why the ``exit_score`` op refuses ``threshold`` for policy ``kind`` (finite; in [0, 1]
    or NEVER_EXIT for the probability-like scores, >= 0 for patience streaks), or None."""
    high = math.inf if kind == "patience" else NEVER_EXIT
    if math.isfinite(threshold) and 0.0 <= threshold <= high:
        return None
    where = ">= 0" if high == math.inf else "in [0, 1] or NEVER_EXIT (a closed exit)"
    return f"a {kind!r} threshold must be finite and {where}"


def first_exit(scores: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """First exit k with scores[:, k] >= thresholds[k] (the last exit takes the rest).

    scores (N, K) float32 -> (exit_index (N,) int64, score (N,) float32). NaN never passes.
    The comparison is the kernels' (:func:`eenet_kernels.checks.threshold_as_float32`: the
    smallest float32 >= each threshold), so the offline decision is the engine's also for a
    threshold that is not a float32 value; scores of another dtype compare exactly.
    """
    if scores.dtype == torch.float32:
        t = torch.tensor([threshold_as_float32(v) for v in thresholds], dtype=torch.float32,
                         device=scores.device)
        passes = scores >= t
    else:
        passes = scores.double() >= torch.tensor(thresholds, dtype=torch.float64,
                                                 device=scores.device)
    passes[:, -1] = True
    exit_index = passes.to(torch.uint8).argmax(dim=1)
    return exit_index, scores.gather(1, exit_index[:, None]).squeeze(1)


def write_policy_file(path: str, policy: ExitPolicy, costs: Costs | None = None,
                      budget: float | Budget | None = None,
                      meta: dict[str, Any] | None = None) -> None:
    """Write ``policy`` as a policy file (format ``eenet-policy``, ``format_version`` 1),
    whole or not at all (:func:`eenet.files.write_whole`). ``budget``: a fraction of the
    full model or a :class:`eenet.budget.Budget`; with ``costs``, it must be one they can
    meet (:meth:`eenet.budget.Budget.absolute`), else ValueError and nothing is written."""
    if costs is not None and len(costs.values) != policy.num_exits:
        raise ValueError(f"the policy has {policy.num_exits} exits but the costs "
                         f"{len(costs.values)}")
    if budget is not None and costs is not None:
        as_budget(budget).absolute(costs)
    data = {"format": POLICY_FORMAT, "format_version": POLICY_FORMAT_VERSION,
            "policy": policy.to_dict(), "costs": costs.to_dict() if costs is not None else None,
            "budget": budget_to_json(budget) if budget is not None else None,
            "meta": dict(meta or {})}
    text = json.dumps(data, indent=2).encode()  # first: a bad meta writes nothing
    write_whole(path, lambda f: f.write(text))


def read_policy_file(path: str, cls: type[ExitPolicy] = ExitPolicy
                     ) -> tuple[ExitPolicy, Costs | None, dict[str, Any]]:
    """(policy, its costs or None, the whole file as a dict, with its ``"budget"`` entry
    read as an :class:`eenet.budget.Budget` or None) of a policy file; ``cls`` restricts the policy
    class. Raises ``ValueError`` on anything but this format and version, on a file whose
    costs do not have one value per exit, and on a budget its costs cannot meet."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not an eenet policy file (invalid JSON: {exc})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not an eenet policy file (not text: {exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an eenet policy file (no JSON object)")
    fmt, version = data.get("format"), data.get("format_version")
    if fmt != POLICY_FORMAT:
        if fmt is None and "class" in data:
            why = ("a bare policy dict without a format (an earlier layout of "
                   "ExitPolicy.save)")
        elif isinstance(fmt, str) and fmt.startswith(POLICY_FORMAT):
            why = f"format {fmt!r}, an earlier layout"
        else:
            why = f"format {fmt!r}" if fmt is not None else "no 'format' entry"
        raise ValueError(f"{path} is not an eenet policy file of format {POLICY_FORMAT!r} "
                         f"version {POLICY_FORMAT_VERSION}: it has {why}; fit and save the "
                         "policy again")
    if version != POLICY_FORMAT_VERSION:
        raise ValueError(f"{path}: policy file format_version {version!r} is not supported "
                         f"(this eenet reads version {POLICY_FORMAT_VERSION})")
    entry = data.get("policy")
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: the policy file has no 'policy' entry")
    if data.get("meta") is not None and not isinstance(data["meta"], dict):
        raise ValueError(f"{path}: its 'meta' entry must be a JSON object, got "
                         f"{type(data['meta']).__name__}")
    policy = cls.from_dict(entry)
    costs = None
    if data.get("costs") is not None:
        try:
            costs = Costs.from_dict(data["costs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad 'costs' entry: {exc}") from exc
        if len(costs.values) != policy.num_exits:
            raise ValueError(f"{path}: the policy has {policy.num_exits} exits but its costs "
                             f"{len(costs.values)}")
    if data.get("budget") is not None:
        try:
            data["budget"] = budget_from_json(data["budget"])
            if costs is not None:
                data["budget"].absolute(costs)
        except ValueError as exc:
            raise ValueError(f"{path}: bad 'budget' entry: {exc}") from exc
    return policy, costs, data

"""EENet: a learned, budget-constrained exit scheduler (Ilhan et al., WACV 2024).

The scheduler sees only the exits' logits (the exit heads are frozen). For exit k of K, with
p_k = softmax(z_k) over C classes, its features are

    f_k = [p_k (C), max p_k, conf_k = 1 - H(p_k)/log C, q_1..q_{k-1}, vote_k (if use_vote)]

(width C + 2 + k [+ 1], k counted from 0), where q_j are the earlier exits' scores and
vote_k is the fraction of earlier exits whose argmax equals exit k's. Two heads per exit:

- score head     q_k = sigmoid(Linear(f_k)): "how likely exit k is right for this sample";
- assignment head r_k = Linear -> Sigmoid -> Linear -> Sigmoid on f_k (hidden width half the
  input, at least 1), and pi = softmax_k(r): the soft exit assignment.

At inference only the score heads remain: the first exit with q_k >= t_k takes the sample
(t_{K-1} = 0). Each score head is an ``ExitRule("eenet", t_k, w_k, b_k, use_vote)``, whose
score the ``exit_score`` op computes exactly as ``eenet_kernels.reference.policy_score``.

Training (:meth:`EENet.fit_logits`), on validation logits and labels:

    L = sum_k weighted BCE(q_k, correct_k)
        + a_ce   * KL(pi || normalise(q^beta))
        + a_cost * | mean_i sum_k pi_ik c_k - B | / B

(:func:`eenet_loss`; a_ce = 1e-3, a_cost = 1e-2, beta = 1: the KL target is the scores
normalised over the exits as they are). Choices made here, where the paper leaves room, and
fixes for the authors' bugs:

- BCE weights balance each exit's classes: positives weigh N / (2 N_pos,k) and negatives
  N / (2 N_neg,k) (counts on the training data, at least 1), so that an exit that is right
  95% of the time still learns to rank its few mistakes. BCE is summed over exits and
  averaged over samples.
- The cost term is on the batch mean of the expected cost (B is an average per sample, so a
  per-sample term would push every sample to cost B).
- Phases alternate every ``phase_epochs`` (10) epochs, starting with the score phase.
  *Score phase*: steps only the score heads (and their gains, below) on the full loss; their
  gradient comes from the BCE and from the KL target normalise(q^beta) (the assignment heads
  read the earlier scores detached, so the cost term never bends q). *Assignment phase*:
  steps only the assignment heads, on the full loss (a_ce * KL + a_cost * cost are the only
  terms that depend on them). Each group has its own optimiser; both are zeroed every step.
- Optimiser: Adam with *decoupled* weight decay 1e-2 (AdamW): a coupled L2 of 1e-2 would
  outweigh the 1e-3 / 1e-2-scaled gradients of the assignment heads and pull them to zero.
- lr 0.1 and 100 epochs (not the paper's 3e-5 over long schedules): ~1500 validation samples
  are 3 batches of 512, so a restart makes 150 score steps and 150 assignment steps. For
  those to reach the steep slopes a confident exit needs (raw weights of tens on [0, 1]
  probabilities), the score heads are reparametrised: standardised static features (means
  and deviations from the training data) and a per-exit log gain, q_k = sigmoid(e^g (w . z
  + b)). That is folded back exactly into raw (w_k, b_k) (:meth:`Scheduler.raw_head`), and
  training computes q with those raw parameters, in the reference's form. A 4-exit, 10-class
  fit on 1500 samples with 3 restarts takes ~1-3 s on 2 CPU cores (run on one intra-op
  thread: the matrices are tiny and OpenMP barriers only cost time).
- Restarts (3) with different seeds; a checkpoint is evaluated at the end of every cycle
  (score phase + assignment phase) and after the last epoch, and the best one is kept as a
  deep copy of its state: highest calibrated accuracy among those whose cost is within 10%
  of B, else the one closest to B. ``holdout`` > 0 keeps that fraction of the data out of
  training for this selection (default 0: the scheduler is small, and every sample helps set
  the thresholds).
- Thresholds: greedy quantiles (:func:`calibration.thresholds_for_fractions`) of the
  reference scores so that mean(pi_k) of the samples exit at k. mean(pi) alone seldom meets
  the budget (pi is a softmax of values in (0, 1), so it cannot go far from uniform), so a
  final step (:func:`calibrate`) uses fractions proportional to mean(pi_k)^gamma *
  exp(s k / (K - 1)) and bisects on the tilt s until the achieved cost on the data lies in
  [(1 - calib_tol) B, B] (calib_tol = 1%), for gamma in ``gammas`` = (1, 0.5, 0); among all
  settings visited that meet it, the most accurate wins. gamma = 1 is the paper's mean(pi);
  gamma = 0 is the heuristics' geometric family on the learned scores.

Every evaluation scores samples through ``reference.policy_score`` with the rules' own
parameters, so the thresholds, accuracy and cost reported in ``fit_info`` are exactly what
:meth:`EENet.decide` (and the runtime) reproduce.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import torch
from torch import nn

from eenet_kernels import NEVER_EXIT, reference
from eenet_kernels.checks import FLOAT32_MAX

from ..budget import Budget, Costs, as_budget, is_number
from ..rng import seeded
from ..threads import intra_op_threads
from .base import ExitPolicy, ExitRule, first_exit
from .calibration import collect_exit_logits, thresholds_for_fractions

A_CE = 1e-3
A_COST = 1e-2
WITHIN_SELECTION = 0.10  # a checkpoint counts when its cost is within 10% of the budget


# -- the policy ------------------------------------------------------------------------------


class EENet(ExitPolicy):
    """EENet's trained score heads and per-exit thresholds.

    ``sched_weights[k]`` (C + 2 + k [+ 1 if use_vote],) float32 and ``sched_biases[k]`` are
    exit k's score head; ``thresholds[k]`` its threshold (the last exit takes the rest).
    ``fit_info`` holds the training-time evaluation after :meth:`fit_logits` (not saved):
    ``budget`` (absolute), ``cost`` and ``accuracy`` achieved on the fitting data,
    ``exit_index`` (N,) int64 there, ``exit_fractions``, ``pi_fractions`` (mean pi),
    ``target_fractions`` (the tilted fractions the thresholds meet), ``tilt``, ``gamma``,
    ``restart`` / ``epoch`` of the kept checkpoint and ``scheduler`` (the trained
    :class:`Scheduler`, whose ``outputs(logits)`` gives q and pi).
    """

    kind = "eenet"

    def __init__(self, thresholds: list[float], sched_weights: list[torch.Tensor],
                 sched_biases: list[float], use_vote: bool = False) -> None:
        super().__init__(thresholds)
        k_exits = self.num_exits
        if len(sched_weights) != k_exits or len(sched_biases) != k_exits:
            raise ValueError(f"EENet needs one score head per exit: {k_exits} thresholds, "
                             f"{len(sched_weights)} weights, {len(sched_biases)} biases")
        weights = [torch.as_tensor(w).detach().to("cpu", torch.float32).contiguous().clone()
                   for w in sched_weights]
        extra = 3 if use_vote else 2
        for k, w in enumerate(weights):
            if w.dim() != 1:
                raise ValueError(f"sched_weights[{k}] must be 1-D, got shape {tuple(w.shape)}")
            want = weights[0].numel() + k
            if w.numel() != want:
                raise ValueError(f"sched_weights[{k}] has {w.numel()} values, expected {want} "
                                 f"(C + 2 + k{' + 1' if use_vote else ''})")
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"sched_weights[{k}] has NaN/inf values")
        if weights[0].numel() - extra < 2:
            raise ValueError(f"sched_weights[0] has {weights[0].numel()} values: too few for "
                             f"C >= 2 classes (C + 2{' + 1' if use_vote else ''})")
        if not all(is_number(b) for b in sched_biases):
            raise TypeError(f"sched_biases must be numbers, got {list(sched_biases)!r}")
        biases = [float(b) for b in sched_biases]
        if not all(abs(b) <= FLOAT32_MAX for b in biases):  # what the op takes (NaN fails)
            raise ValueError(f"sched_biases must be finite in float32, got {biases}")
        self.sched_weights = weights
        self.sched_biases = biases
        self.use_vote = bool(use_vote)
        self.fit_info: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return self.sched_weights[0].numel() - (3 if self.use_vote else 2)

    def rules(self) -> list[ExitRule]:
        return [ExitRule(self.kind, t, w, b, self.use_vote)
                for t, w, b in zip(self.thresholds, self.sched_weights, self.sched_biases,
                                   strict=True)]

    # -- fitting --------------------------------------------------------------------------

    @classmethod
    def fit_logits(
        cls,
        logits: list[torch.Tensor],
        labels: torch.Tensor,
        costs: Costs,
        budget: float | Budget,
        *,
        use_vote: bool = False,
        epochs: int = 100,
        restarts: int = 3,
        lr: float = 1e-1,
        batch_size: int = 512,
        weight_decay: float = 1e-2,
        a_ce: float = A_CE,
        a_cost: float = A_COST,
        beta: float = 1.0,
        phase_epochs: int = 10,
        holdout: float = 0.0,
        calib_tol: float = 0.01,
        gammas: tuple[float, ...] = (1.0, 0.5, 0.0),
        seed: int = 0,
    ) -> EENet:
        """Train the scheduler on validation logits and set thresholds meeting ``budget``.

        ``logits``: K tensors (N, C) (any float dtype, finite), exit k's logits; ``labels``
        (N,) int; ``costs``: K cumulative costs; ``budget``: a fraction of the full cost or a
        :class:`Budget`. See the module docstring for the loss, phases and calibration.
        """
        with intra_op_threads(1):
            return cls._fit(logits, labels, costs, budget, use_vote=use_vote, epochs=epochs,
                            restarts=restarts, lr=lr, batch_size=batch_size,
                            weight_decay=weight_decay, a_ce=a_ce, a_cost=a_cost, beta=beta,
                            phase_epochs=phase_epochs, holdout=holdout, calib_tol=calib_tol,
                            gammas=tuple(gammas), seed=seed)

    @classmethod
    def _fit(cls, logits: list[torch.Tensor], labels: torch.Tensor, costs: Costs,
             budget: float | Budget, *, use_vote: bool, epochs: int, restarts: int, lr: float,
             batch_size: int, weight_decay: float, a_ce: float, a_cost: float, beta: float,
             phase_epochs: int, holdout: float, calib_tol: float,
             gammas: tuple[float, ...], seed: int) -> EENet:
        data = _prepare(logits, labels, costs)
        b = as_budget(budget).absolute(costs)
        if epochs < 1 or restarts < 1 or batch_size < 1 or phase_epochs < 1:
            raise ValueError("epochs, restarts, batch_size and phase_epochs must be >= 1")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must lie in [0, 1), got {holdout}")
        if not gammas or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                 and math.isfinite(v) and v >= 0 for v in gammas):
            raise ValueError(f"gammas must be one or more finite numbers >= 0, got {gammas!r}")
        n = data.n
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        n_sel = round(holdout * n)
        if holdout > 0 and not 0 < n_sel < n:
            raise ValueError(f"holdout {holdout} of {n} samples leaves an empty split")
        train = data.subset(perm[n_sel:]) if n_sel else data
        select = data.subset(perm[:n_sel]) if n_sel else data
        pos_w, neg_w = balance_weights(train.correct)
        cost_t = torch.tensor(costs.values, dtype=torch.float32)

        best_key: tuple[float, ...] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_where: dict[str, int] = {}
        for restart in range(restarts):
            with seeded(seed * 7919 + restart):
                sched = Scheduler(data.num_classes, data.num_exits, use_vote)
            sched.set_stats(train.base, train.vote)
            opt_score = torch.optim.AdamW(sched.score_parameters(), lr=lr,
                                          weight_decay=weight_decay)
            opt_assign = torch.optim.AdamW(sched.assign_heads.parameters(), lr=lr,
                                           weight_decay=weight_decay)
            shuffle = torch.Generator().manual_seed(seed * 104729 + restart)
            for epoch in range(epochs):
                score_phase = (epoch // phase_epochs) % 2 == 0
                opt = opt_score if score_phase else opt_assign
                order = torch.randperm(train.n, generator=shuffle)
                for start in range(0, train.n, batch_size):
                    idx = order[start:start + batch_size]
                    opt_score.zero_grad(set_to_none=True)
                    opt_assign.zero_grad(set_to_none=True)
                    q, pi = sched(train.base[idx], train.vote[idx])
                    terms = eenet_loss(q, pi, train.correct[idx], cost_t, b, pos_weight=pos_w,
                                       neg_weight=neg_w, a_ce=a_ce, a_cost=a_cost, beta=beta)
                    terms["total"].backward()
                    opt.step()
                if (epoch + 1) % (2 * phase_epochs) == 0 or epoch + 1 == epochs:
                    ev = _evaluate(sched, select, costs, b, calib_tol, gammas)
                    within = abs(ev["cost"] - b) <= WITHIN_SELECTION * b
                    key = (float(within), ev["accuracy"], -abs(ev["cost"] - b))
                    if best_key is None or key > best_key:
                        best_key = key
                        best_state = copy.deepcopy(sched.state_dict())
                        best_where = {"restart": restart, "epoch": epoch + 1}

        assert best_state is not None
        with torch.random.fork_rng(devices=[]):
            sched = Scheduler(data.num_classes, data.num_exits, use_vote)
        sched.load_state_dict(best_state)
        sched.eval()
        ev = _evaluate(sched, data, costs, b, calib_tol, gammas)
        policy = ev["policy"]
        policy.fit_info = {
            "budget": b,
            "cost": ev["cost"],
            "accuracy": ev["accuracy"],
            "exit_index": ev["exit_index"],
            "exit_fractions": ev["exit_fractions"],
            "pi_fractions": ev["pi_fractions"],
            "target_fractions": ev["fractions"],
            "tilt": ev["tilt"],
            "gamma": ev["gamma"],
            "selection_accuracy": best_key[1] if best_key else math.nan,
            **best_where,
            "scheduler": sched,
        }
        return policy

    @classmethod
    def fit(cls, net: nn.Module, val_loader, costs: Costs, budget: float | Budget,
            **kw: Any) -> EENet:
        """Run ``net`` over ``val_loader`` (batches in any form of :mod:`eenet.batches`) and
        :meth:`fit_logits`."""
        logits, labels = collect_exit_logits(net, val_loader)
        return cls.fit_logits(logits, labels, costs, budget, **kw)

    # -- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(),
                "sched_weights": [w.tolist() for w in self.sched_weights],
                "sched_biases": list(self.sched_biases),
                "use_vote": self.use_vote}

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> EENet:
        try:
            weights = [torch.tensor(w, dtype=torch.float32) for w in data["sched_weights"]]
            use_vote = data.get("use_vote", False)
            if not isinstance(use_vote, bool):
                raise ValueError(f"use_vote must be true or false, got {use_vote!r}")
            return cls(list(data["thresholds"]), weights, list(data["sched_biases"]), use_vote)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid EENet policy entry: {exc!r}") from exc

    def __repr__(self) -> str:
        ts = ", ".join(f"{t:.4g}" for t in self.thresholds)
        return (f"EENet(thresholds=[{ts}], classes={self.num_classes}, "
                f"use_vote={self.use_vote})")


# -- the trainable scheduler -----------------------------------------------------------------


class Scheduler(nn.Module):
    """Score heads and assignment heads of all K exits (training only).

    Input: ``base`` (N, K, C + 2) float32, per exit [p, max p, conf]; ``vote`` (N, K) float32.
    Output: ``q`` (N, K) exit scores and ``pi`` (N, K) soft assignment (rows sum to 1).

    The score heads are parametrised in standardised coordinates (feature means ``mu`` and
    standard deviations ``sd`` from :meth:`set_stats`; the earlier scores stay raw), which
    Adam fits in far fewer steps than raw probabilities in [0, 1]; :meth:`raw_head` folds
    the standardisation back, and ``forward`` computes q_k = sigmoid(f_k @ w_k + b_k) with
    exactly those raw parameters, in the reference's form.
    """

    def __init__(self, num_classes: int, num_exits: int, use_vote: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_exits = num_exits
        self.use_vote = use_vote
        widths = [num_classes + 2 + k + int(use_vote) for k in range(num_exits)]
        self.score_heads = nn.ModuleList(nn.Linear(d, 1) for d in widths)
        self.assign_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, max(1, d // 2)), nn.Sigmoid(), nn.Linear(max(1, d // 2), 1),
                          nn.Sigmoid())
            for d in widths)
        # per-exit log gain of the score heads: Adam moves it additively, so the steep slopes a
        # confident exit needs (raw weights of tens) are reached in tens of steps
        self.log_gain = nn.Parameter(torch.zeros(num_exits))
        for k, d in enumerate(widths):
            self.register_buffer(f"mu{k}", torch.zeros(d))
            self.register_buffer(f"sd{k}", torch.ones(d))

    def _stats(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mu{k}"), getattr(self, f"sd{k}")

    @torch.no_grad()
    def set_stats(self, base: torch.Tensor, vote: torch.Tensor) -> None:
        """Standardisation of the static features (not of the earlier scores) from data."""
        c2 = self.num_classes + 2
        for k in range(self.num_exits):
            static = torch.cat([base[:, k], vote[:, k:k + 1]], dim=1) if self.use_vote \
                else base[:, k]
            mu_s = static.mean(dim=0)
            sd_s = static.std(dim=0, unbiased=False) if static.shape[0] > 1 \
                else torch.ones_like(mu_s)
            sd_s = torch.where(sd_s > 1e-4, sd_s, torch.ones_like(sd_s))
            mu, sd = self._stats(k)
            mu.zero_()
            sd.fill_(1.0)
            mu[:c2], sd[:c2] = mu_s[:c2], sd_s[:c2]
            if self.use_vote:
                mu[-1], sd[-1] = mu_s[-1], sd_s[-1]

    def score_parameters(self) -> list[nn.Parameter]:
        """What the score phase trains: the score heads and their gains."""
        return [*self.score_heads.parameters(), self.log_gain]

    def raw_head(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit k's score head on raw features: weight (d_k,) and bias () float32."""
        mu, sd = self._stats(k)
        head = self.score_heads[k]
        gain = torch.exp(self.log_gain[k])
        w = gain * head.weight[0] / sd
        b = gain * head.bias[0] - (w * mu).sum()
        return w, b

    def forward(self, base: torch.Tensor, vote: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n, k_exits, _ = base.shape
        assert k_exits == self.num_exits and vote.shape == (n, k_exits)
        qs: list[torch.Tensor] = []
        rs: list[torch.Tensor] = []
        for k in range(k_exits):
            prev = torch.stack(qs, dim=1) if qs else base.new_zeros(n, 0)
            extra = [vote[:, k:k + 1]] if self.use_vote else []
            f = torch.cat([base[:, k], prev, *extra], dim=1)
            w, b = self.raw_head(k)
            q_k = torch.sigmoid(f @ w + b)
            # the assignment head reads the earlier scores detached: its terms (KL, cost)
            # must not reach the score heads through their inputs
            mu, sd = self._stats(k)
            f_assign = (torch.cat([base[:, k], prev.detach(), *extra], dim=1) - mu) / sd
            r_k = self.assign_heads[k](f_assign).squeeze(1)
            assert q_k.shape == (n,) and r_k.shape == (n,)
            qs.append(q_k)
            rs.append(r_k)
        q = torch.stack(qs, dim=1)
        pi = torch.softmax(torch.stack(rs, dim=1), dim=1)
        return q, pi

    @torch.no_grad()
    def outputs(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """q (N, K) and pi (N, K) float32 on K exits' logits (N, C)."""
        _, base, vote, _ = scheduler_inputs(logits)
        return self(base, vote)

    @torch.no_grad()
    def policy(self, thresholds: list[float] | None = None) -> EENet:
        """An :class:`EENet` with these score heads (thresholds default to 0)."""
        heads = [self.raw_head(k) for k in range(self.num_exits)]
        th = thresholds if thresholds is not None else [0.0] * self.num_exits
        return EENet(th, [w.clone() for w, _ in heads], [float(b) for _, b in heads],
                     use_vote=self.use_vote)


# -- loss ------------------------------------------------------------------------------------


def balance_weights(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-exit BCE weights from ``correct`` (N, K) bool: (pos (K,), neg (K,)) float32.

    pos_k = N / (2 N_pos,k), neg_k = N / (2 N_neg,k) (counts at least 1), so that positives
    and negatives of each exit carry equal total weight.
    """
    c = correct.float()
    n = float(c.shape[0])
    n_pos = c.sum(dim=0).clamp(min=1.0)
    n_neg = (1.0 - c).sum(dim=0).clamp(min=1.0)
    return n / (2.0 * n_pos), n / (2.0 * n_neg)


def eenet_loss(
    q: torch.Tensor,
    pi: torch.Tensor,
    correct: torch.Tensor,
    costs: torch.Tensor,
    budget: float,
    *,
    pos_weight: torch.Tensor | None = None,
    neg_weight: torch.Tensor | None = None,
    a_ce: float = A_CE,
    a_cost: float = A_COST,
    beta: float = 1.0,
    eps: float = 1e-7,
) -> dict[str, torch.Tensor]:
    """EENet's loss terms on a batch; every returned value is a 0-dim tensor.

    q (N, K) scores in (0, 1); pi (N, K) soft assignment (rows sum to 1); correct (N, K)
    bool/float; costs (K,) cumulative; budget B in the costs' unit; pos/neg_weight (K,)
    (default 1). Returns
    - ``bce``  = mean_i sum_k -(w+_k y log q + w-_k (1 - y) log(1 - q)), q clamped to
      [eps, 1 - eps];
    - ``kl``   = mean_i sum_k pi_ik (log pi_ik - log t_ik), t_i = q_i^beta / sum_k q_ik^beta;
    - ``cost`` = | mean_i sum_k pi_ik c_k - B | / B;
    - ``total`` = bce + a_ce * kl + a_cost * cost.
    """
    n, k_exits = q.shape
    # shape checks guard against the authors' (N, N, 1) broadcast
    assert pi.shape == (n, k_exits), f"pi {tuple(pi.shape)} vs q {tuple(q.shape)}"
    assert correct.shape == (n, k_exits), f"correct {tuple(correct.shape)} vs q {tuple(q.shape)}"
    assert costs.shape == (k_exits,), f"costs {tuple(costs.shape)} vs {k_exits} exits"
    y = correct.to(q.dtype)
    ones = q.new_ones(k_exits)
    wp = ones if pos_weight is None else pos_weight.to(q)
    wn = ones if neg_weight is None else neg_weight.to(q)
    assert wp.shape == (k_exits,) and wn.shape == (k_exits,)
    qc = q.clamp(eps, 1.0 - eps)
    bce_ik = -(wp * y * torch.log(qc) + wn * (1.0 - y) * torch.log1p(-qc))
    assert bce_ik.shape == (n, k_exits)
    bce = bce_ik.sum(dim=1).mean()

    log_t = beta * torch.log(qc)
    log_t = log_t - torch.logsumexp(log_t, dim=1, keepdim=True)
    log_pi = torch.log(pi.clamp_min(1e-30))
    kl_i = (pi * (log_pi - log_t)).sum(dim=1)
    assert kl_i.shape == (n,)
    kl = kl_i.mean()

    expected = (pi * costs.to(pi)).sum(dim=1)
    assert expected.shape == (n,)
    cost = (expected.mean() - budget).abs() / budget
    total = bce + a_ce * kl + a_cost * cost
    return {"bce": bce, "kl": kl, "cost": cost, "total": total}


# -- data and evaluation ---------------------------------------------------------------------


class _Data:
    """Precomputed scheduler inputs: base (N, K, C + 2), vote (N, K), correct (N, K) bool,
    and the float32 logits (K tensors (N, C)) for the reference scores."""

    def __init__(self, logits: list[torch.Tensor], base: torch.Tensor, vote: torch.Tensor,
                 correct: torch.Tensor) -> None:
        self.logits = logits
        self.base = base
        self.vote = vote
        self.correct = correct

    @property
    def n(self) -> int:
        return self.base.shape[0]

    @property
    def num_exits(self) -> int:
        return self.base.shape[1]

    @property
    def num_classes(self) -> int:
        return self.base.shape[2] - 2

    def subset(self, idx: torch.Tensor) -> _Data:
        return _Data([z[idx] for z in self.logits], self.base[idx], self.vote[idx],
                     self.correct[idx])


def exit_features(logits: torch.Tensor) -> torch.Tensor:
    """[p (C), max p, conf] (N, C + 2) float32 from logits (N, C), as the reference does."""
    p, max_p, conf = reference.softmax_stats(logits.float())
    return torch.cat([p, max_p[:, None], conf[:, None]], dim=1)


def scheduler_inputs(logits: list[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scheduler's inputs from K exits' logits (N, C): (float32 CPU logits, base
    (N, K, C + 2), vote (N, K) float32, preds (N, K) int64). Raises on bad shapes/values."""
    if len(logits) == 0:
        raise ValueError("EENet needs the logits of at least one exit")
    zs = [z.detach().to("cpu", torch.float32) for z in logits]
    n, c = zs[0].shape if zs[0].dim() == 2 else (-1, -1)
    for k, z in enumerate(zs):
        if z.dim() != 2 or z.shape != (n, c):
            raise ValueError(f"logits[{k}] has shape {tuple(z.shape)}; every exit needs "
                             f"(N, C) = {(n, c)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"logits[{k}] has NaN/inf values")
    if c < 2:
        raise ValueError(f"EENet needs C >= 2 classes, got {c}")
    preds = torch.stack([z.argmax(dim=1) for z in zs], dim=1)
    base = torch.stack([exit_features(z) for z in zs], dim=1)
    vote = torch.stack([reference.vote_fraction(preds[:, k], preds[:, :k])
                        for k in range(len(zs))], dim=1)
    return zs, base, vote, preds


def _prepare(logits: list[torch.Tensor], labels: torch.Tensor, costs: Costs) -> _Data:
    if len(logits) != len(costs.values):
        raise ValueError(f"the network has {len(logits)} exits but costs has "
                         f"{len(costs.values)} values")
    zs, base, vote, preds = scheduler_inputs(logits)
    n = base.shape[0]
    if n < 1:
        raise ValueError("EENet needs at least one validation sample")
    from ..train import check_labels

    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    y = labels.detach().to("cpu")
    check_labels(y, base.shape[2] - 2, "labels")  # -100 or >= C would count as wrong
    return _Data(zs, base, vote, preds == y.long()[:, None])


def tilted_fractions(pi_mean: torch.Tensor, s: float, gamma: float = 1.0) -> torch.Tensor:
    """Fractions (K,) float64 proportional to pi_mean_k^gamma * exp(s k / (K - 1)).

    gamma = 1, s = 0 is mean(pi) itself; gamma = 0 is the heuristics' geometric family.
    """
    k_exits = pi_mean.numel()
    ramp = torch.arange(k_exits, dtype=torch.float64) / max(1, k_exits - 1)
    log_pi = torch.log(pi_mean.double().clamp_min(1e-300))
    return torch.softmax(gamma * log_pi + s * ramp, dim=0)


# the widest tilt calibrate tries: exp(MAX_TILT / (K - 1)) between neighbouring exits
# overwhelms any mean(pi) ratio float64 holds (1e-300 floor) for K up to ~1000
MAX_TILT = 2.0 ** 20


def calibrate(scores: torch.Tensor, pi_mean: torch.Tensor, correct: torch.Tensor, costs: Costs,
              budget: float, tol: float = 0.01, gammas: tuple[float, ...] = (1.0,),
              iterations: int = 40, span: float = 30.0) -> dict[str, Any]:
    """Thresholds from tilted mean(pi) fractions meeting ``budget`` (absolute) on this data.

    scores (N, K) float32 (the reference scores), pi_mean (K,), correct (N, K) bool.
    For each gamma, bisects the tilt s (:func:`tilted_fractions`) for the largest achieved
    cost <= budget, in [-span, span] widened (doubling, up to ``MAX_TILT``) until its low end
    meets the budget and its high end does not, so a budget near the first exit's cost is
    reached however many exits there are and however small mean(pi) is at exit 0. Among all
    settings visited whose cost lies in [(1 - tol) B, B], returns the most accurate (else the
    costliest within budget, else the cheapest). Returns ``thresholds``, ``fractions`` (the
    K targets), ``cost``, ``accuracy``, ``exit_index`` (N,) int64, ``tilt`` and ``gamma``.
    """
    n, k_exits = scores.shape
    rows = torch.arange(n)

    def evaluate(s: float, gamma: float) -> dict[str, Any]:
        fractions = tilted_fractions(pi_mean, s, gamma)
        th = thresholds_for_fractions(scores, fractions, never=NEVER_EXIT)
        exits = first_exit(scores, th)[0]
        return {"thresholds": th, "fractions": fractions.tolist(), "cost": costs.expected(exits),
                "accuracy": float(correct[rows, exits].float().mean()) if n else 0.0,
                "exit_index": exits, "tilt": s, "gamma": gamma}

    visited = []
    for gamma in gammas:
        visited.append(evaluate(0.0, gamma))
        if k_exits == 1:
            continue
        lo, hi = -span, span
        while lo > -MAX_TILT and evaluate(lo, gamma)["cost"] > budget:
            lo *= 2
        while hi < MAX_TILT and evaluate(hi, gamma)["cost"] <= budget:
            hi *= 2
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            ev = evaluate(mid, gamma)
            visited.append(ev)
            if ev["cost"] <= budget:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-3:
                break
        visited += [evaluate(lo, gamma), evaluate(hi, gamma)]
    slack = 1e-9 * budget
    meeting = [v for v in visited if (1 - tol) * budget - slack <= v["cost"] <= budget + slack]
    if meeting:
        return max(meeting, key=lambda v: (v["accuracy"], v["cost"]))
    under = [v for v in visited if v["cost"] <= budget + slack]
    if under:
        return max(under, key=lambda v: (v["cost"], v["accuracy"]))
    return min(visited, key=lambda v: v["cost"])


@torch.no_grad()
def _evaluate(sched: Scheduler, data: _Data, costs: Costs, budget: float, tol: float,
              gammas: tuple[float, ...]) -> dict[str, Any]:
    """Calibrated policy of the scheduler on ``data``, scored through the reference op."""
    probe = sched.policy()
    scores = probe.scores(data.logits)
    _, pi = sched(data.base, data.vote)
    pi_mean = pi.mean(dim=0)
    cal = calibrate(scores, pi_mean, data.correct, costs, budget, tol, gammas)
    policy = sched.policy(cal["thresholds"])
    counts = torch.bincount(cal["exit_index"], minlength=data.num_exits).double()
    return {**cal, "policy": policy, "pi_fractions": pi_mean.tolist(),
            "exit_fractions": (counts / max(1, data.n)).tolist()}


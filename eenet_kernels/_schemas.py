"""Operator schemas of the ``eenet`` library.

``csrc/ops.cpp`` declares the same strings with ``TORCH_LIBRARY(eenet, m)``; when the
compiled extension is absent, :mod:`eenet_kernels.ops` defines them from here so that
``torch.ops.eenet.*`` exists either way. ``tests/test_registration.py`` asserts that the
two copies agree.
"""

from __future__ import annotations

_EXIT_SCORE_ARGS = (
    "Tensor feats, Tensor weight, Tensor? bias, str policy, float threshold, "
    "bool is_last=False, Tensor? prev_scores=None, Tensor? prev_preds=None, "
    "Tensor? sched_weight=None, float sched_bias=0., bool use_vote=False"
)
_EXIT_SCORE_RETURNS = (
    "(Tensor logits, Tensor score, Tensor exit_mask, Tensor pred, Tensor keep)"
)

SCHEMAS: dict[str, str] = {
    "exit_score": f"exit_score({_EXIT_SCORE_ARGS}) -> {_EXIT_SCORE_RETURNS}",
    "exit_score_write": (
        f"exit_score_write({_EXIT_SCORE_ARGS}, *, Tensor row_index, int exit_index, "
        "Tensor(a!) out_logits, Tensor(b!) out_score, Tensor(c!) out_exit) "
        f"-> {_EXIT_SCORE_RETURNS}"
    ),
    "compact": "compact(Tensor keep, Tensor[] src) -> (Tensor[] kept, Tensor count)",
    "compact_out": "compact_out(Tensor keep, Tensor[] src, Tensor(a!)[] dst) -> Tensor count",
}

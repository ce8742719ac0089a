"""Batch forms of training, logit collection and policy fitting (eenet.batches)."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_ids, tiny_bert_exits

from eenet.batches import check_padding, split_batch
from eenet.nn import ExitHead, MultiExitNetwork, attach_exits
from eenet.policies import MaxProb, collect_exit_logits
from eenet.runtime import Engine
from eenet.train import multi_exit

X, Y, M = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.ones(4, 3)


@pytest.mark.parametrize("batch", [
    (X, Y), [X, Y], (X, Y, {"attention_mask": M}), {"x": X, "y": Y, "attention_mask": M},
    {"input_ids": X, "labels": Y, "attention_mask": M}, {"input_ids": X, "label": Y}])
def test_split_batch_forms(batch: object) -> None:
    x, y, rows = split_batch(batch)
    assert x is X and y is Y
    want = {} if (isinstance(batch, tuple | list) and len(batch) == 2) or (
        isinstance(batch, dict) and "attention_mask" not in batch) else {"attention_mask": M}
    assert rows.keys() == want.keys() and all(rows[k] is want[k] for k in want)


@pytest.mark.parametrize(("batch", "error", "match"), [
    ((X, M, Y), ValueError, "ambiguous"), ((X,), ValueError, "ambiguous"),
    ({"x": X, "input_ids": X, "y": Y}, ValueError, "exactly one of"),
    ({"x": X}, ValueError, "labels"), (X, ValueError, "must be"),
    ((X, [0, 1, 1, 0]), TypeError, "'y' must be a tensor"),
    ((X, Y, {"attention_mask": "m"}), TypeError, "'attention_mask'")])
def test_split_batch_refuses(batch: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        split_batch(batch)


def _mean_net() -> tuple[MultiExitNetwork, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = padded_ids([8, 3, 5, 1, 8, 2], 8)
    return tiny_bert_exits(), ids, mask, torch.tensor([0, 1, 0, 1, 1, 0])


def test_padded_ids_without_their_mask_are_refused() -> None:
    net, ids, mask, y = _mean_net()
    check_padding(net, ids, {"attention_mask": mask})
    check_padding(net, ids[:1], {})  # row 0 is unpadded
    with pytest.raises(ValueError, match="no attention_mask"):
        check_padding(net, ids, {})
    with pytest.raises(ValueError, match="no attention_mask"):
        multi_exit(net, [(ids, y)], epochs=1, progress=False)
    with pytest.raises(ValueError, match="ambiguous"):
        collect_exit_logits(net, [(ids, mask, y)])


def test_row_inputs_reach_training_collection_and_fitting() -> None:
    net, ids, mask, y = _mean_net()
    dict_batches = [{"input_ids": ids, "attention_mask": mask, "labels": y}]
    tuple_batches = [(ids, y, {"attention_mask": mask})]
    logits, labels = collect_exit_logits(net, dict_batches)
    with torch.no_grad():
        want = net(ids, attention_mask=mask)
    for z, w in zip(logits, want, strict=True):
        torch.testing.assert_close(z, w.float())
    assert torch.equal(labels, y)
    again, _ = collect_exit_logits(net, tuple_batches)
    for z, w in zip(again, logits, strict=True):
        torch.testing.assert_close(z, w, rtol=0, atol=0)
    from eenet.budget import Costs
    policy = MaxProb.fit(net, dict_batches, Costs([1.0, 2.0], "flops"), 0.75)
    assert policy.num_exits == 2
    before = [p.detach().clone() for p in net.parameters()]
    history = multi_exit(net, tuple_batches, epochs=1, lr=1e-3, progress=False)
    assert len(history) == 1 and any(
        not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_attach_exits_stage_names_itself_on_row_inputs() -> None:
    backbone = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, 2))
    net = attach_exits(backbone, ["1"], 2, example_input=X)
    assert isinstance(net.heads[0], ExitHead)
    with pytest.raises(TypeError, match=r"stage of blocks \['0', '1'\] takes no row inputs"):
        net(X, attention_mask=M)
    with pytest.raises(TypeError, match="takes no row inputs"):
        Engine(net, MaxProb([0.5, 0.0]))(X, attention_mask=M)

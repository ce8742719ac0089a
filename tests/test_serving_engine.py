"""The re-batching serving engine: answers equal the offline oracle under every rebatch mode
(many submitting threads, row inputs of a padded transformer batch), re-batching merges,
failures fail only their run's rows and every future completes exactly once, back-pressure,
cancellation, deadlines, closing, bad inputs and an internal error in the worker."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import nn

import eenet.serving.engine as serving_engine
from eenet.budget import Costs
from eenet.models import small_cnn
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import EENet, ExitPolicy, MaxProb, Patience
from eenet.runtime import EngineOutput, simulate
from eenet.serving import (
    Answer,
    DeadlineExceeded,
    EngineClosed,
    QueueFull,
    RequestCancelled,
    ServingConfig,
    ServingEngine,
    ServingStats,
    StageFailed,
    plan_from_profile,
)

C = 5
WIDTH = 10
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


# -- networks, policies, stage wrappers ------------------------------------------------------


def _mlp(seed: int = 0, exits: int = 4) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(exits)]
    heads = [ExitHead.linear(WIDTH, C) for _ in range(exits)]
    return MultiExitNetwork(stages, heads).eval()


def _drifting_mlp(seed: int = 0, exits: int = 4) -> MultiExitNetwork:
    """Stages near the identity and one classifier for every exit: predictions drift from
    exit to exit, so that patience streaks end at several exits."""
    torch.manual_seed(seed)
    stages = []
    for _ in range(exits):
        stage = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            stage.weight.copy_(torch.eye(WIDTH) + 0.4 * torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
        stages.append(stage)
    first = ExitHead.linear(WIDTH, C)
    heads = [first] + [ExitHead.linear(WIDTH, C) for _ in range(exits - 1)]
    for head in heads[1:]:
        head.load_state_dict(first.state_dict())
    return MultiExitNetwork(stages, heads).eval()


def _cnn() -> MultiExitNetwork:
    torch.manual_seed(0)
    net = small_cnn(num_classes=C, image_size=12, widths=(8, 12, 16), head_width=6).eval()
    with torch.no_grad():  # random init leaves every row's features alike: spread them
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(0.1)
        for head in net.heads:
            head.classifier.weight.mul_(4.0)
    return net


def _halfway(scores: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring scores in the middle half of ``scores``
    (N,): the widest such gap, so that no row lies within rounding of it."""
    s = scores.sort().values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    assert float(gaps.max()) > 20 * TOL
    return float((s[i] + s[i + 1]) / 2)


def _policy(kind: str, net: MultiExitNetwork, x: torch.Tensor,
            **row_inputs: torch.Tensor) -> ExitPolicy:
    """A ``kind`` policy whose thresholds sit halfway between neighbouring scores on x."""
    k = len(net.heads)
    if kind == "patience":
        return Patience([0.5] * k)  # integer streaks: 0.5 is halfway
    with torch.no_grad():
        logits = [z.float() for z in net(x, **row_inputs)]
    if kind == "eenet":
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(C + 3 + j, generator=g) for j in range(k)]
        scores = EENet([0.0] * k, weights, [0.1] * k, use_vote=True).scores(logits)
        return EENet([_halfway(scores[:, j]) for j in range(k)], weights, [0.1] * k,
                     use_vote=True)
    scores = MaxProb([0.0] * k).scores(logits)
    return MaxProb([_halfway(scores[:, j]) for j in range(k)])


class _Wrap(nn.Module):
    """A stage (or head body) with a hook before it: ``before(h)`` may sleep, block, record
    or raise."""

    def __init__(self, inner: nn.Module, before: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.inner = inner
        self.before = before

    def forward(self, h: torch.Tensor, **row_inputs: torch.Tensor) -> torch.Tensor:
        self.before(h)
        return self.inner(h, **row_inputs)


class Flaky(RuntimeError):
    """The injected failure."""


class _Gate:
    """Blocks the wrapped stage while closed; ``entered`` is set once a call arrives."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self, h: torch.Tensor) -> None:
        self.entered.set()
        assert self.open.wait(20), "the test never opened the gate"


def _never_exits(k: int = 4) -> MaxProb:
    return MaxProb([1.0] * k)  # a softmax of these small logits never reaches 1


def _check(ans: Answer, ref: EngineOutput, i: int) -> None:
    assert isinstance(ans, Answer)
    assert ans.exit_index == int(ref.exit_index[i]), i
    assert ans.logits.shape == (C,) and ans.logits.dtype == torch.float32
    assert ans.logits.device.type == "cpu"
    torch.testing.assert_close(ans.logits, ref.logits[i], atol=TOL, rtol=0)
    assert abs(ans.score - float(ref.score[i])) <= TOL
    assert not ans.forced and ans.latency_s >= 0


def _wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


# -- answers equal the oracle ----------------------------------------------------------------


@pytest.mark.parametrize("rebatch", ["always", "never", "auto"])
@pytest.mark.parametrize("case", ["cnn-maxprob", "mlp-eenet", "mlp-patience"])
def test_answers_match_the_oracle_from_many_threads(rebatch: str, case: str) -> None:
    n = 96
    torch.manual_seed(3)
    if case == "cnn-maxprob":
        net, x = _cnn(), torch.randn(n, 1, 12, 12)
    elif case == "mlp-patience":
        net, x = _drifting_mlp(), torch.randn(n, WIDTH) * 2
    else:
        net, x = _mlp(), torch.randn(n, WIDTH) * 2
    policy = _policy(case.split("-")[1], net, x)
    ref = simulate(net, policy, x)
    assert len(set(ref.exit_index.tolist())) >= 3  # rows leave at several exits
    futs: list[cf.Future | None] = [None] * n
    cfg = ServingConfig(max_batch=16, max_wait_ms=5.0, rebatch=rebatch)
    with ServingEngine(net, policy, cfg) as engine:
        def client(t: int) -> None:
            for i in range(t * 3, n, 12):  # thread t: rows 3t..3t+2, then 12 further
                if i % 2:
                    futs[i:i + 3] = engine.submit_many(x[i:i + 3])
                else:
                    for j in range(i, i + 3):
                        futs[j] = engine.submit(x[j])

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        answers = [f.result(timeout=30) for f in futs]
        stats = engine.snapshot()
    for i, ans in enumerate(answers):
        _check(ans, ref, i)
    assert stats.submitted == stats.answered == n and stats.failed == stats.cancelled == 0
    k = len(net.heads)
    assert list(stats.exits) == torch.bincount(ref.exit_index, minlength=k).tolist()
    assert stats.queue_depth == 0 and stats.stage_pending == (0,) * k
    assert stats.stage_rows[0] == n and max(max(b, default=0) for b in stats.batch_sizes) <= 16
    plan = next(iter(engine.plans.values()))
    if rebatch == "never":
        assert plan.merge == (True,) + (False,) * (k - 1)
    elif rebatch == "auto":
        assert plan.sizes == (1, 4, 16) and len(plan.per_row_s) == k


def test_row_inputs_of_a_padded_transformer_match_the_oracle() -> None:
    transformers = pytest.importorskip("transformers")
    from eenet.nn import hf_encoder_exits

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40)).eval()
    net = hf_encoder_exits(model, (1, 2, 3), C, head="mean").eval()
    g = torch.Generator().manual_seed(5)
    groups = []  # two bucketed lengths: two shape groups
    for length, n in ((8, 24), (12, 16)):
        ids = torch.randint(3, 100, (n, length), generator=g)
        used = torch.randint(2, length + 1, (n,), generator=g)
        mask = (torch.arange(length)[None] < used[:, None]).long()
        groups.append((ids * mask, mask))
    with torch.no_grad():
        all_logits = [torch.cat(zs) for zs in zip(*(
            [z.float() for z in net(ids, attention_mask=mask)] for ids, mask in groups),
            strict=True)]
    scores = MaxProb([0.0] * 4).scores(all_logits)
    policy = MaxProb([_halfway(scores[:, j]) for j in range(4)])
    with ServingEngine(net, policy, ServingConfig(max_batch=8, rebatch="always")) as engine:
        futs = [[engine.submit(ids[i], attention_mask=mask[i]) for i in range(len(ids))]
                for ids, mask in groups]
        answers = [[f.result(timeout=30) for f in fs] for fs in futs]
    for (ids, mask), ans in zip(groups, answers, strict=True):
        ref = simulate(net, policy, ids, attention_mask=mask)
        for i, a in enumerate(ans):
            _check(a, ref, i)
    assert len(engine.plans) == 2


# -- re-batching -----------------------------------------------------------------------------


@pytest.mark.parametrize("rebatch", ["always", "never"])
def test_survivors_merge_only_when_rebatching(rebatch: str) -> None:
    net = _mlp()
    calls: list[tuple[int, int]] = []  # (stage, rows) in call order

    def record(k: int) -> Callable[[torch.Tensor], None]:
        def before(h: torch.Tensor) -> None:
            calls.append((k, h.shape[0]))
            time.sleep(0.003)
        return before

    for k in range(4):
        net.stages[k] = _Wrap(net.stages[k], record(k))
    torch.manual_seed(0)
    x = torch.randn(40, WIDTH)
    cfg = ServingConfig(max_batch=8, max_wait_ms=1000.0, rebatch=rebatch)
    with ServingEngine(net, _never_exits(), cfg) as engine:
        futs = []
        for i in range(len(x)):  # one request at a time
            futs.append(engine.submit(x[i]))
            time.sleep(0.001)
        for f in futs:
            assert f.result(timeout=30).exit_index == 3
        stats = engine.snapshot()
    assert stats.stage_rows == (40,) * 4
    means = stats.mean_batch_sizes
    if rebatch == "always":
        assert all(m is not None and m > 1 for m in means[1:]), means
        # no row leaves early, so fewer runs for the same rows means batches merged
        assert stats.stage_runs[3] < stats.stage_runs[0], stats.stage_runs
    else:
        assert stats.stage_runs == (stats.stage_runs[0],) * 4
        # each admitted group runs stages 0, 1, 2, 3 by itself before the next one starts
        assert [k for k, _ in calls] == [0, 1, 2, 3] * stats.stage_runs[0]
        for j in range(0, len(calls), 4):
            group = [rows for _, rows in calls[j:j + 4]]
            assert group == [group[0]] * 4


def test_never_runs_a_group_alone_while_rows_leave() -> None:
    """With early exits, a stage of ``rebatch="never"`` never runs more rows than the stage
    before it ran for the same admitted group."""
    net = _mlp()
    calls: list[tuple[int, int]] = []
    for k in range(4):
        net.stages[k] = _Wrap(net.stages[k], lambda h, k=k: calls.append((k, h.shape[0])))
    torch.manual_seed(1)
    x = torch.randn(64, WIDTH) * 2
    policy = _policy("maxprob", _mlp(), x)
    ref = simulate(_mlp(), policy, x)
    with ServingEngine(net, policy, ServingConfig(max_batch=8, rebatch="never")) as engine:
        futs = engine.submit_many(x)
        for i, f in enumerate(futs):
            _check(f.result(timeout=30), ref, i)
    last = None
    for k, rows in calls:
        if k == 0:
            assert rows <= 8
        else:
            assert last is not None and last[0] == k - 1 and rows <= last[1]
        last = (k, rows)


def test_auto_merges_only_where_bigger_batches_are_cheaper_per_row() -> None:
    net = _mlp()
    # stage 1 costs the same at any batch size (merging pays), stage 2 the same per row. A
    # call's fixed cost o (the MLP, the exit scoring, the sleep's overshoot and, on a loaded
    # machine, waiting for a core) makes stage 2 merge once (20 ms + o8 / 8) <= MERGE_GAIN
    # (20 ms + o1), i.e. at o1 >= 5 ms + o8 / 6.4 (best of the profile's calls); o measured
    # 0.5-0.6 ms on an idle 2-core CPU.
    net.stages[1] = _Wrap(net.stages[1], lambda h: time.sleep(0.010))
    net.stages[2] = _Wrap(net.stages[2], lambda h: time.sleep(0.020 * h.shape[0]))
    cfg = ServingConfig(max_batch=8, rebatch="auto")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        engine.submit(torch.randn(WIDTH)).result(timeout=30)
    (plan,) = engine.plans.values()
    assert plan.sizes == (1, 4, 8)
    assert plan.merge[0] and plan.merge[1] and not plan.merge[2]
    assert plan.per_row_s[1][-1] < 0.5 * plan.per_row_s[1][0]
    assert plan.error is None and engine.describe_plans()


class _Resample(nn.Module):
    """(N, L) -> (N, WIDTH): samples of any length L, linearly resampled to WIDTH."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(h[:, None, :], size=WIDTH, mode="linear",
                                         align_corners=True)[:, 0]


def test_auto_profiles_a_few_shapes_and_the_others_take_the_nearest_plan(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = _mlp()
    net = MultiExitNetwork([nn.Sequential(_Resample(), base.stages[0]), *base.stages[1:]],
                           list(base.heads)).eval()
    torch.manual_seed(4)
    policy = _policy("maxprob", net, torch.randn(200, 16) * 2)
    monkeypatch.setattr(serving_engine, "MAX_PLANS", 5)
    lengths = [6, 25, 15, 10, 11, 20, 7, 24, 12]
    cfg = ServingConfig(max_batch=4, rebatch="auto", max_profiles=3)
    with ServingEngine(net, policy, cfg) as engine:
        seen = {}
        for n in lengths:  # one after the other: the groups appear in this order
            x = torch.randn(n) * 2
            _check(engine.submit(x).result(timeout=30), simulate(net, policy, x[None]), 0)
            seen[n] = {g[0][0]: p for g, p in engine.plans.items()}[n]
        plans = {g[0][0]: p for g, p in engine.plans.items()}
        lines = engine.describe_plans()
    profiled = {n for n, p in seen.items() if p.profiled_on is None}
    assert profiled == {6, 25, 15} and all(seen[n].sizes == (1, 4) for n in profiled)
    # the nearest profiled length, the shorter on a tie (20: 15 and 25)
    nearest = {10: 6, 11: 15, 20: 15, 7: 6, 24: 25, 12: 15}
    for n, source in nearest.items():
        assert seen[n].profiled_on[0] == (source,), n
        assert (seen[n].merge, seen[n].target) == (seen[source].merge, seen[source].target)
    # at most MAX_PLANS kept: the profiled ones and the newest others
    assert set(plans) == {6, 25, 15, 24, 12}
    assert any("x (12,)" in line and "the plan of x (15,)" in line for line in lines), lines


def test_plan_from_profile_thresholds() -> None:
    plan = plan_from_profile((1, 4, 16, 64), [
        (4e-4, 2e-4, 7e-5, 5e-5),      # 8x cheaper per row at 64: merge
        (1e-4, 1e-4, 0.95e-4, 0.9e-4),  # 10% cheaper: below the 20% bar (no merge)
        (1e-4, 0.81e-4, 0.8e-4, 0.8e-4),  # exactly 20%: merge; saturated from 4 rows
    ])
    assert plan.merge == (True, False, True)
    assert plan.target == (64, 16, 4)  # stage 1's target is unused: it does not merge
    with pytest.raises(ValueError, match="start at 1"):
        plan_from_profile((2, 4), [(1.0, 1.0)])


# -- failures ---------------------------------------------------------------------------------


def test_failing_rows_fail_alone_at_several_stages_and_every_future_completes_once(
        ) -> None:
    clean = _mlp()
    torch.manual_seed(2)
    x = torch.randn(300, WIDTH) * 2
    policy = _policy("maxprob", clean, x)
    ref = simulate(clean, policy, x)
    with torch.no_grad():  # acts[k]: what stage k takes for every row; acts[4]: exit 3's
        acts = [x]
        for stage in clean.stages:
            acts.append(stage(acts[-1]))
    # three rows poisoned at each of stages 0-3 and at exit 2's head: the stage (or head)
    # raises on any batch that holds one of them; the rows are picked among those that
    # reach the place, each row poisoned at one place at most
    g = torch.Generator().manual_seed(3)
    places = {"stage 0": (0, 0), "stage 1": (1, 1), "stage 2": (2, 2), "stage 3": (3, 3),
              "exit 2": (2, 3)}  # where -> (stage reported, index of its input in acts)
    poisoned: dict[str, list[int]] = {}
    taken: set[int] = set()
    for where, (stage, _) in places.items():
        reach = [i for i in torch.randperm(len(x), generator=g).tolist()
                 if int(ref.exit_index[i]) >= stage and i not in taken]
        poisoned[where] = reach[:3]
        taken |= set(reach[:3])
    assert len(taken) == 15
    expected_stage = {i: places[where][0] for where, rows in poisoned.items() for i in rows}
    failing = threading.Event()
    failing.set()

    def poison(where: str) -> Callable[[torch.Tensor], None]:
        bad = acts[places[where][1]][poisoned[where]]

        def before(h: torch.Tensor) -> None:
            hit = (h[:, None, :] - bad[None]).abs().amax(-1) < 1e-4
            if failing.is_set() and bool(hit.any()):
                raise Flaky(f"injected failure in {where}")
        return before

    net = _mlp()
    for k in range(4):
        net.stages[k] = _Wrap(net.stages[k], poison(f"stage {k}"))
    net.heads[2].body = _Wrap(net.heads[2].body, poison("exit 2"))
    calls: Counter[int] = Counter()
    lock = threading.Lock()

    def callback_for(i: int) -> Callable[[cf.Future], None]:
        def callback(fut: cf.Future) -> None:
            with lock:
                calls[i] += 1
        return callback

    cfg = ServingConfig(max_batch=16, rebatch="always")
    with ServingEngine(net, policy, cfg) as engine:
        futs: list[cf.Future | None] = [None] * len(x)

        def client(t: int) -> None:
            for i in range(t, len(x), 3):
                futs[i] = engine.submit(x[i], callback=callback_for(i))

        threads = [threading.Thread(target=client, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        cf.wait(futs, timeout=30)
        _wait_until(lambda: sum(calls.values()) == len(x))
        failed: dict[int, int] = {}
        for i, f in enumerate(futs):
            exc = f.exception()
            if exc is None:
                _check(f.result(), ref, i)
                continue
            assert isinstance(exc, StageFailed) and isinstance(exc.__cause__, Flaky)
            assert f"stage {exc.stage}" in str(exc) and exc.attempts >= 1
            assert f"after {exc.attempts} attempt" in str(exc)
            assert exc.rows == 1 or "the last on it alone" in str(exc)
            failed[i] = exc.stage
        assert failed == expected_stage  # exactly the poisoned rows, each at its place
        assert calls == Counter(range(len(x)))  # none twice, none missing
        stats = engine.snapshot()
        assert stats.failed == len(expected_stage)
        assert stats.answered + stats.failed == stats.submitted == len(x)
        failing.clear()  # the engine still serves, the poisoned rows too
        again = sorted(taken)
        for i, f in zip(again, engine.submit_many(x[again]), strict=True):
            _check(f.result(timeout=30), ref, i)


VOCAB, LENGTH = 50, 6


def _embedding_net() -> MultiExitNetwork:
    """Three exits over (LENGTH,) token ids from [0, VOCAB)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Embedding(VOCAB, WIDTH), nn.Flatten(),
                            nn.Linear(LENGTH * WIDTH, WIDTH))]
    stages += [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(2)]
    return MultiExitNetwork(stages, [ExitHead.linear(WIDTH, C) for _ in range(3)]).eval()


def test_one_bad_request_fails_alone_and_the_rest_of_its_batch_is_answered() -> None:
    net = _embedding_net()
    policy = MaxProb([0.3, 0.4, 0.0])
    ids = torch.randint(0, VOCAB, (8, LENGTH))
    bad = ids.clone()
    bad[5, 2] = VOCAB + 7  # outside the vocabulary: the embedding raises on the batch
    good = [i for i in range(8) if i != 5]
    ref = simulate(net, policy, ids)
    with ServingEngine(net, policy, ServingConfig(max_batch=8, rebatch="always")) as engine:
        futs = engine.submit_many(bad)  # one batch of 8 at stage 0
        cf.wait(futs, timeout=30)
        stats = engine.snapshot()
    exc = futs[5].exception()
    assert isinstance(exc, StageFailed) and exc.stage == 0 and exc.rows == 8
    assert isinstance(exc.__cause__, IndexError)
    # 8 -> 4 -> 2 -> 1: one attempt on the batch and one per half that held the bad row
    assert exc.attempts == 4 and "the other 7 rows of its batch ran without it" in str(exc)
    for i in good:
        _check(futs[i].result(), ref, i)
    assert stats.failed == 1 and stats.answered == 7
    assert stats.stage_runs[0] == 3 and stats.stage_rows[0] == 7  # the halves without it


def test_close_without_drain_stops_an_isolation_between_its_parts() -> None:
    net = _mlp()
    calls = itertools.count(1)
    entered = threading.Event()

    def always(h: torch.Tensor) -> None:
        if next(calls) >= 3:
            entered.set()
        time.sleep(0.02)
        raise Flaky("permanent")

    net.stages[0] = _Wrap(net.stages[0], always)
    engine = ServingEngine(net, _never_exits(), ServingConfig(max_batch=32,
                                                              rebatch="always"))
    futs = engine.submit_many(torch.randn(32, WIDTH))  # one run, then 62 parts
    assert entered.wait(30)
    engine.close(drain=False, timeout=30)
    made = next(calls) - 1
    cf.wait(futs, timeout=30)
    kinds = Counter(type(f.exception()).__name__ for f in futs)
    assert made < 20, made  # not the 63 runs of the whole isolation
    assert set(kinds) <= {"StageFailed", "EngineClosed"} and kinds["EngineClosed"] > 0, kinds
    stats = engine.snapshot()
    assert stats.failed == 32 and stats.queue_depth == 0


def test_auto_profiles_a_group_on_a_row_that_passed_stage_0() -> None:
    net = _embedding_net()
    ids = torch.randint(0, VOCAB, (8, LENGTH))
    bad = ids.clone()
    bad[0, 0] = VOCAB  # the first row (the one a profile would copy) is outside the vocabulary
    policy = MaxProb([0.3, 0.4, 0.0])
    ref = simulate(net, policy, ids)
    with ServingEngine(net, policy, ServingConfig(max_batch=8, rebatch="auto")) as engine:
        futs = engine.submit_many(bad)
        cf.wait(futs, timeout=30)
        (plan,) = engine.plans.values()
    assert isinstance(futs[0].exception(), StageFailed)
    for i in range(1, 8):
        _check(futs[i].result(), ref, i)
    assert plan.error is None and plan.sizes == (1, 4, 8)  # profiled, on a good row


def test_retries_absorb_transient_failures_and_then_give_up() -> None:
    clean = _mlp()
    x = torch.randn(40, WIDTH) * 2
    policy = _policy("maxprob", clean, x)
    ref = simulate(clean, policy, x)
    net = _mlp()
    count = itertools.count()

    def every_other(h: torch.Tensor) -> None:
        if next(count) % 2 == 0:
            raise Flaky("transient")

    net.stages[1] = _Wrap(net.stages[1], every_other)
    with ServingEngine(net, policy, ServingConfig(max_batch=8, retries=2)) as engine:
        for i, f in enumerate(engine.submit_many(x)):
            _check(f.result(timeout=30), ref, i)

    broken = _mlp()
    runs = Counter()

    def always(h: torch.Tensor) -> None:
        runs["calls"] += 1
        raise Flaky("permanent")

    broken.stages[2] = _Wrap(broken.stages[2], always)
    cfg = ServingConfig(max_batch=8, retries=1, rebatch="always")
    with ServingEngine(broken, policy, cfg) as engine:
        futs = engine.submit_many(x)
        cf.wait(futs, timeout=30)
        stats = engine.snapshot()
    reaching = [i for i in range(len(x)) if int(ref.exit_index[i]) >= 2]
    for i, f in enumerate(futs):
        if i in reaching:
            exc = f.exception()
            # two attempts on its batch, then one per part of the batch that held it
            assert isinstance(exc, StageFailed) and exc.stage == 2 and exc.attempts >= 2
            assert "stage 2" in str(exc) and f"{exc.attempts} attempts" in str(exc)
            depth = math.log2(exc.rows)  # halvings from its batch down to it alone
            assert 2 + math.floor(depth) <= exc.attempts <= 2 + math.ceil(depth)
            assert isinstance(exc.__cause__, Flaky)
        else:
            _check(f.result(), ref, i)
    # a batch of n that fails everywhere: 2 attempts, then its 2n - 2 parts once each
    assert runs["calls"] == 2 * len(reaching) > 0
    assert stats.failed == len(reaching) and stats.stage_runs[2] == 0


def test_an_internal_error_fails_pending_futures_and_closes_the_engine() -> None:
    engine = ServingEngine(_mlp(), _never_exits(), ServingConfig())

    def boom(now: float, closing: bool) -> None:
        raise KeyError("scheduler bug")

    engine._pick = boom  # type: ignore[method-assign]
    fut = engine.submit(torch.randn(WIDTH))
    assert isinstance(fut.exception(timeout=10), KeyError)
    with pytest.raises(EngineClosed, match="internal error") as info:
        engine.submit(torch.randn(WIDTH))
    assert isinstance(info.value.__cause__, KeyError)
    stats = engine.snapshot()
    assert engine.closed and stats.failed == 1
    assert stats.queue_depth == 0 and stats.stage_pending == (0,) * 4
    engine.close()


# -- back-pressure, cancellation, deadlines --------------------------------------------------


def _gated(stage: int = 0) -> tuple[MultiExitNetwork, _Gate]:
    net, gate = _mlp(), _Gate()
    net.stages[stage] = _Wrap(net.stages[stage], gate)
    return net, gate


def test_reject_when_the_queue_is_full() -> None:
    net, gate = _gated()
    cfg = ServingConfig(queue_size=2, on_full="reject", rebatch="always")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        first = engine.submit(torch.randn(WIDTH))
        assert gate.entered.wait(10)  # the worker runs it: the queue is empty again
        queued = [engine.submit(torch.randn(WIDTH)) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(torch.randn(WIDTH))
        with pytest.raises(QueueFull):
            engine.submit_many(torch.randn(3, WIDTH))  # more than fits, all refused
        stats = engine.snapshot()
        assert stats.rejected == 4 and stats.submitted == 3 and stats.queue_depth == 2
        gate.open.set()
        for f in [first, *queued]:
            assert f.result(timeout=10).exit_index == 3
    assert engine.snapshot().answered == 3


def test_block_waits_for_room_or_times_out() -> None:
    net, gate = _gated()
    cfg = ServingConfig(queue_size=1, on_full="block", block_timeout_s=0.05, rebatch="always")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        engine.submit(torch.randn(WIDTH))
        assert gate.entered.wait(10)
        engine.submit(torch.randn(WIDTH))  # fills the queue
        t0 = time.monotonic()
        with pytest.raises(QueueFull, match="stayed full"):
            engine.submit(torch.randn(WIDTH))
        assert time.monotonic() - t0 >= 0.05
        assert engine.snapshot().rejected == 1
        gate.open.set()
    net, gate = _gated()
    cfg = ServingConfig(queue_size=1, on_full="block", block_timeout_s=10.0, rebatch="always")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        engine.submit(torch.randn(WIDTH))
        assert gate.entered.wait(10)
        engine.submit(torch.randn(WIDTH))
        threading.Timer(0.05, gate.open.set).start()
        t0 = time.monotonic()
        blocked = engine.submit(torch.randn(WIDTH))  # waits until the gate opens
        assert time.monotonic() - t0 >= 0.04
        assert blocked.result(timeout=10).exit_index == 3
    assert engine.snapshot().answered == 3


def test_cancelled_requests_are_never_answered() -> None:
    net, gate = _gated()
    done: Counter[int] = Counter()
    cfg = ServingConfig(max_batch=2, rebatch="always")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        futs = [engine.submit(torch.randn(WIDTH), callback=lambda f, i=i: done.update([i]))
                for i in range(6)]
        assert gate.entered.wait(10)
        assert futs[2].cancel() and futs[3].cancel() and futs[5].cancel()
        assert futs[0].cancel()  # running at stage 0: not answered yet, so cancellable
        assert futs[2].cancelled()
        with pytest.raises(RequestCancelled):
            futs[2].result()
        with pytest.raises(cf.CancelledError):  # RequestCancelled is one
            futs[3].exception()
        # concurrent.futures.wait sees the cancelled futures as done
        finished, _ = cf.wait([futs[2], futs[3]], timeout=1)
        assert len(finished) == 2
        gate.open.set()
        for i in (1, 4):
            assert futs[i].result(timeout=10).exit_index == 3
        assert not futs[1].cancel()  # answered
        _wait_until(lambda: engine.snapshot().stage_pending == (0,) * 4)
        stats = engine.snapshot()
    assert done == Counter(range(6))
    assert futs[0].cancelled()
    assert (stats.submitted, stats.answered, stats.cancelled, stats.failed) == (6, 2, 4, 0)
    assert stats.queue_depth == 0


def test_deadline_forces_the_exit_reached() -> None:
    net = _mlp()
    slow = threading.Event()
    net.stages[1] = _Wrap(net.stages[1], lambda h: slow.is_set() and time.sleep(0.6))
    x = torch.randn(WIDTH)
    with torch.no_grad():
        exit1 = net(x[None])[1][0].float()
    with ServingEngine(net, _never_exits(), ServingConfig(rebatch="always")) as engine:
        engine.submit(x).result(timeout=10)  # warm
        slow.set()
        ans = engine.submit(x, deadline_s=0.3).result(timeout=10)
        stats = engine.snapshot()
    assert ans.forced and ans.exit_index == 1
    torch.testing.assert_close(ans.logits, exit1, atol=TOL, rtol=0)
    assert ans.score == pytest.approx(float(torch.softmax(exit1, 0).max()), abs=TOL)
    assert stats.deadline_forced == 1 and stats.answered == 2 and stats.exits[1] == 1

    cfg = ServingConfig(on_deadline="error", rebatch="always")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        fut = engine.submit(x, deadline_s=0.3)
        with pytest.raises(DeadlineExceeded, match="after exit 1"):
            fut.result(timeout=10)
        assert engine.snapshot().deadline_errors == 1


def test_deadline_before_any_exit_and_earliest_deadline_first() -> None:
    net, gate = _gated()
    seen: list[list[float]] = []
    net.stages[1] = _Wrap(net.stages[1], lambda h: seen.append(h[:, 0].tolist()))
    cfg = ServingConfig(max_batch=2, rebatch="never")
    with ServingEngine(net, _never_exits(), cfg) as engine:
        engine.submit(torch.randn(WIDTH))
        assert gate.entered.wait(10)
        late = engine.submit(torch.randn(WIDTH), deadline_s=0.02)
        xs = torch.randn(4, WIDTH)
        # submitted in this order, deadlines the other way round: EDF runs 3 and 2 first
        futs = [engine.submit(xs[i], deadline_s=30.0 - i) for i in range(4)]
        time.sleep(0.05)
        gate.open.set()
        with pytest.raises(DeadlineExceeded, match="before its first exit"):
            late.result(timeout=10)
        for f in futs:
            assert not f.result(timeout=10).forced
        stats = engine.snapshot()
    assert stats.deadline_errors == 1 and stats.failed == 1 and stats.answered == 5
    # stage 0's second run (after the gated one) took the two earliest deadlines
    with torch.no_grad():
        first_of = net.stages[0].inner(xs)[:, 0]
    second_run = sorted(seen[1])
    assert second_run == pytest.approx(sorted(first_of[[3, 2]].tolist()), abs=TOL)


# -- closing ---------------------------------------------------------------------------------


def test_close_drain_answers_everything_admitted() -> None:
    net = _mlp()
    net.stages[2] = _Wrap(net.stages[2], lambda h: time.sleep(0.002))
    engine = ServingEngine(net, _never_exits(), ServingConfig(max_batch=4)).start()
    futs = engine.submit_many(torch.randn(30, WIDTH))
    engine.close(drain=True)
    assert all(f.done() and f.result().exit_index == 3 for f in futs)
    with pytest.raises(EngineClosed):
        engine.submit(torch.randn(WIDTH))
    assert engine.snapshot().answered == 30


def test_close_without_drain_fails_the_pending_requests() -> None:
    net, gate = _gated()
    engine = ServingEngine(net, _never_exits(), ServingConfig(max_batch=1, rebatch="always"))
    futs = [engine.submit(torch.randn(WIDTH))]
    assert gate.entered.wait(10)
    futs += [engine.submit(torch.randn(WIDTH)) for _ in range(4)]
    closer = threading.Thread(target=engine.close, kwargs={"drain": False})
    closer.start()
    _wait_until(lambda: engine.closed)
    with pytest.raises(EngineClosed):
        engine.submit(torch.randn(WIDTH))
    gate.open.set()  # the run in progress ends; its row was still pending after stage 0
    closer.join(10)
    assert not closer.is_alive()
    for f in futs:
        assert isinstance(f.exception(timeout=1), EngineClosed)
    stats = engine.snapshot()
    assert stats.failed == 5 and stats.answered == 0 and stats.queue_depth == 0


def test_close_before_start() -> None:
    engine = ServingEngine(_mlp(), _never_exits())
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(torch.randn(WIDTH))


def test_close_is_idempotent_and_keeps_no_engine_alive() -> None:
    """close() any number of times, in any order of drain; a closed engine leaves the
    at-exit registry (weak references) and can be collected."""
    from eenet.serving import engine as serving_engine

    engine = ServingEngine(_mlp(), _never_exits()).start()
    assert engine in serving_engine._RUNNING
    futs = engine.submit_many(torch.randn(3, WIDTH))
    engine.close()
    engine.close()
    engine.close(drain=False)
    engine.close(timeout=0)
    assert all(f.result(timeout=1).exit_index == 3 for f in futs)
    assert engine.closed and engine not in serving_engine._RUNNING
    with pytest.raises(EngineClosed):
        engine.submit(torch.randn(WIDTH))
    ref = weakref.ref(engine)
    del engine, futs
    gc.collect()
    assert ref() is None


def _collected(ref: weakref.ref, thread: threading.Thread, timeout_s: float = 5.0) -> bool:
    gc.collect()
    thread.join(timeout_s)
    return ref() is None and not thread.is_alive()


def test_an_engine_dropped_without_close_is_collected_and_its_worker_stops() -> None:
    """The worker holds its engine only weakly while idle: an engine that is used, never
    closed and dropped is collected, and its worker thread stops (not only at exit)."""
    from eenet.serving import engine as serving_engine

    engine = ServingEngine(_mlp(), _never_exits()).start()
    assert engine.submit(torch.randn(WIDTH)).result(timeout=5).exit_index == 3
    thread, ref = engine._thread, weakref.ref(engine)
    assert thread.is_alive() and engine in serving_engine._RUNNING
    del engine
    assert _collected(ref, thread)


def test_a_dropped_engine_answers_what_it_admitted_first() -> None:
    """Dropped with requests pending: its futures keep it alive, every one is answered as
    the oracle says, and once they are dropped too it goes away."""
    net, gate = _gated()  # stage 0 held until the engine is dropped
    x = torch.randn(16, WIDTH)
    policy = _policy("maxprob", _mlp(), x)
    with torch.no_grad():
        want = simulate(_mlp(), policy, x)
    engine = ServingEngine(net, policy).start()
    futs = engine.submit_many(x)
    thread, ref = engine._thread, weakref.ref(engine)
    del engine
    gc.collect()
    assert gate.entered.wait(5) and ref() is not None
    gate.open.set()
    for i, f in enumerate(futs):
        _check(f.result(timeout=5), want, i)
    assert len({int(e) for e in want.exit_index}) > 1  # rows left at different exits
    del futs, f
    assert _collected(ref, thread)


_LEFT_OPEN = textwrap.dedent("""
    import sys
    import threading
    import time

    import torch
    from torch import nn

    from eenet.nn import ExitHead, MultiExitNetwork
    from eenet.policies import MaxProb
    from eenet.serving import ServingConfig, ServingEngine

    torch.set_num_threads(1)
    W = 8
    entered = threading.Event()


    class Busy(nn.Module):
        # stage 0: signals that it runs, then a second of torch ops (each releases the
        # GIL, so that the interpreter starts exiting meanwhile)
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(W, W)

        def forward(self, h):
            entered.set()
            a = torch.randn(128, 128)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                a = torch.tanh(a @ a)
            return self.inner(h)


    net = MultiExitNetwork([Busy(), nn.Linear(W, W)], [ExitHead.linear(W, 3) for _ in "ab"])
    engine = ServingEngine(net.eval(), MaxProb([0.0, 0.0]),
                           ServingConfig(max_batch=1, rebatch="always"))


    def report(i):
        def done(fut):
            exc = fut.exception()
            what = (f"exit {fut.result().exit_index}" if exc is None else
                    f"{type(exc).__name__}: {exc}")
            print(f"request {i}: {what}", flush=True)
        return done


    for i in range(2):
        engine.submit(torch.randn(W), callback=report(i))
    assert entered.wait(60)
    if sys.argv[1] == "drain":
        engine.close(drain=True, timeout=0.01)  # returns with the drain under way
    print("main done", flush=True)
""")


@pytest.mark.parametrize("closed", ["open", "drain"])
def test_an_engine_left_open_is_closed_at_interpreter_exit(closed: str) -> None:
    """The interpreter exits while the worker is inside a torch op of stage 0 (one request
    running, one waiting): the process exits 0 without "terminate called" (a daemon worker
    left in C++ code at finalization aborts it). Never closed: the running request is
    answered, the waiting one fails with EngineClosed saying why; a draining close that
    returned early: its drain is finished."""
    done = subprocess.run([sys.executable, "-c", _LEFT_OPEN, closed], capture_output=True,
                          text=True, timeout=120, check=False)
    assert "terminate called" not in done.stderr
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "main done" and lines[1] == "request 0: exit 0", done.stdout
    if closed == "open":
        assert lines[2].startswith("request 1: EngineClosed: the Python interpreter exited "
                                   "with the serving engine open"), done.stdout
    else:
        assert lines[2] == "request 1: exit 0", done.stdout
    assert len(lines) == 3, done.stdout


# -- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_raise_at_submit_or_fail_their_own_future() -> None:
    net = _cnn()
    policy = MaxProb([0.5] * 3)
    good = torch.randn(1, 12, 12)
    with ServingEngine(net, policy, ServingConfig(rebatch="always")) as engine:
        # at submit
        with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
            engine.submit([[0.0] * 12] * 12)
        with pytest.raises(TypeError, match=r"first stage computes in torch\.float32"):
            engine.submit(good.double())
        with pytest.raises(ValueError, match="on meta"):
            engine.submit(torch.empty(1, 12, 12, device="meta"))
        with pytest.raises(TypeError, match="row input 'mask'"):
            engine.submit(good, mask=[1, 2])
        with pytest.raises(ValueError, match="one row per sample"):
            engine.submit_many(torch.randn(3, 1, 12, 12), mask=torch.ones(2, 4))
        with pytest.raises(ValueError, match="batch dimension"):
            engine.submit_many(torch.tensor(1.0))
        with pytest.raises(ValueError, match="deadline_s"):
            engine.submit(good, deadline_s=-1.0)
        # found by the network: the request's own future, StageFailed at stage 0
        wrong_shape = engine.submit(torch.randn(3, 12, 12))
        wrong_dtype = engine.submit(torch.ones(1, 12, 12, dtype=torch.int64))
        fine = engine.submit_many(torch.randn(8, 1, 12, 12))
        exc = wrong_shape.exception(timeout=10)
        assert isinstance(exc, StageFailed) and exc.stage == 0
        assert isinstance(exc.__cause__, ValueError) and "does not fit" in str(exc.__cause__)
        exc = wrong_dtype.exception(timeout=10)
        assert isinstance(exc, StageFailed) and isinstance(exc.__cause__, TypeError)
        assert all(isinstance(f.result(timeout=10), Answer) for f in fine)
        assert isinstance(engine.submit(good).result(timeout=10), Answer)  # still serving
        stats = engine.snapshot()
    assert stats.failed == 2 and stats.answered == 9 and stats.submitted == 11


def test_submit_keeps_its_own_copy_of_the_sample() -> None:
    """A caller refilling its buffer right after submit (a preallocated input buffer) does
    not change the queued request: the worker is held in stage 0 by an earlier request while
    the buffers are submitted and then overwritten."""
    net = _mlp()
    gate = _Gate()
    net.stages[0] = _Wrap(net.stages[0], gate)
    g = torch.Generator().manual_seed(3)
    x, xs = torch.randn(WIDTH, generator=g), torch.randn(6, WIDTH, generator=g)
    want = simulate(_mlp(), _never_exits(), torch.cat([x[None], xs]))
    with ServingEngine(net, _never_exits(), ServingConfig(max_batch=8)) as engine:
        first = engine.submit(torch.zeros(WIDTH))
        assert gate.entered.wait(10)
        buf, bufs = x.clone(), xs.clone()
        one, many = engine.submit(buf), engine.submit_many(bufs)
        buf.fill_(7.0)
        bufs.fill_(-7.0)
        gate.open.set()
        assert isinstance(first.result(timeout=10), Answer)
        for i, fut in enumerate([one, *many]):
            _check(fut.result(timeout=10), want, i)


def test_deadlines_take_any_real_number() -> None:
    """NumPy scalars and 0-dim tensors are numbers of seconds too; bools, 1-element
    tensors of another shape, NaN and values <= 0 are refused naming the argument."""
    np = pytest.importorskip("numpy")
    with ServingEngine(_mlp(), _never_exits()) as engine:
        for deadline in (np.float32(30), np.int64(30), torch.tensor(30.0), torch.tensor(30),
                         30, 30.0):
            assert isinstance(engine.submit(torch.randn(WIDTH), deadline_s=deadline
                                            ).result(timeout=10), Answer), deadline
        for bad in (True, torch.tensor([30.0]), torch.tensor(True), np.float32("nan"),
                    torch.tensor(0.0), -1, "30", math.inf):
            with pytest.raises(ValueError, match="deadline_s must be None or a finite real"):
                engine.submit(torch.randn(WIDTH), deadline_s=bad)


def test_config_is_checked() -> None:
    for bad in ({"max_batch": 0}, {"buckets": (4, 2)}, {"max_wait_ms": -1},
                {"queue_size": 0}, {"on_full": "drop"}, {"retries": -1}, {"max_profiles": 0},
                {"rebatch": "sometimes"}, {"on_deadline": "ignore"}, {"budget": 0.5}):
        with pytest.raises(ValueError):
            ServingConfig(**bad)
    with pytest.raises(TypeError, match="ServingConfig"):
        ServingEngine(_mlp(), _never_exits(), {"max_batch": 4})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="costs has 2 values"):
        ServingEngine(_mlp(), _never_exits(), ServingConfig(costs=Costs([1, 2], "flops")))


# -- telemetry -------------------------------------------------------------------------------


def test_stats_snapshot_is_json_and_prices_the_exits() -> None:
    net = _mlp()
    x = torch.randn(50, WIDTH) * 2
    policy = _policy("maxprob", net, x)
    ref = simulate(net, policy, x)
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    cfg = ServingConfig(costs=costs, budget=0.5, max_batch=8)
    with ServingEngine(net, policy, cfg) as engine:
        before = engine.snapshot()
        assert before.latency_p50_s is None and before.cost_per_sample is None
        cf.wait(engine.submit_many(x), timeout=30)
        stats = engine.snapshot()
    assert isinstance(stats, ServingStats)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["exits"] == torch.bincount(ref.exit_index, minlength=4).tolist()
    assert sum(stats.exit_rates) == pytest.approx(1.0)
    assert stats.cost_per_sample == pytest.approx(float((ref.exit_index + 1).double().mean()))
    assert stats.budget == 2.0 and stats.cost_unit == "flops"
    assert 0 <= stats.latency_p50_s <= stats.latency_p99_s <= stats.latency_max_s
    assert stats.uptime_s > 0 and stats.in_flight == 0
    assert [len(b) for b in stats.batch_sizes] == list(stats.stage_runs)
    assert sum(stats.batch_sizes[0]) == 50


@pytest.mark.gpu
@pytest.mark.parametrize("rebatch", ["always", "never", "auto"])
def test_cuda_answers_match_the_oracle(rebatch: str) -> None:
    """On a CUDA network: CPU samples are moved per batch; answers come back on the CPU."""
    net = _mlp().cuda()
    torch.manual_seed(4)
    x = torch.randn(64, WIDTH) * 2
    policy = _policy("eenet", _mlp(), x)
    on_device = simulate(net, policy, x.cuda())
    ref = EngineOutput(*(t.cpu() for t in (on_device.logits, on_device.exit_index,
                                           on_device.score, on_device.forced)))
    with ServingEngine(net, policy, ServingConfig(max_batch=16, rebatch=rebatch)) as engine:
        assert engine.device.type == "cuda"
        futs = [engine.submit(x[i]) if i % 2 else engine.submit(x[i].cuda())
                for i in range(len(x))]
        answers = [f.result(timeout=60) for f in futs]
    for i, ans in enumerate(answers):
        _check(ans, ref, i)


@pytest.mark.parametrize("rebatch", ["auto", "always"])
def test_auto_waits_for_more_rows_only_under_backlog(rebatch: str) -> None:
    """Request A is at stage 1 when request B arrives (B is submitted from inside A's stage-0
    run). ``always`` holds A at stage 1 for B (they merge there); ``auto`` with no backlog
    (1 row waiting, max_batch 8) runs A on at once instead of waiting."""
    net = _mlp()
    runs: list[tuple[int, int]] = []
    box: dict[str, ServingEngine] = {}
    later: list[cf.Future] = []

    def stage0(h: torch.Tensor) -> None:
        runs.append((0, h.shape[0]))
        if len(later) == 0 and h.shape[0] == 1 and "engine" in box and runs.count((0, 1)) == 1:
            later.append(box["engine"].submit(torch.randn(WIDTH)))

    net.stages[0] = _Wrap(net.stages[0], stage0)
    net.stages[1] = _Wrap(net.stages[1], lambda h: runs.append((1, h.shape[0])))
    cfg = ServingConfig(max_batch=8, max_wait_ms=10_000, rebatch=rebatch)
    with ServingEngine(net, _never_exits(), cfg) as engine:
        engine.submit_many(torch.randn(8, WIDTH))[0].result(timeout=60)  # auto: profile
        if rebatch == "auto":
            (plan,) = engine.plans.values()
            assert plan.merge[1]  # a merging stage: the difference is only when it waits
        runs.clear()
        box["engine"] = engine
        engine.submit(torch.randn(WIDTH)).result(timeout=60)
        later[0].result(timeout=60)
    first_stage1 = next(n for k, n in runs if k == 1)
    assert first_stage1 == (1 if rebatch == "auto" else 2)

"""The benchmark suite's machinery (no timings asserted): the timing loop's statistics on a
fake timer (``eenet.runtime.timing`` and the runner's interleaving on it), host-sync
counting, the results writer's stamp, that every peer execution mode runs the runtime's
stage loop and returns exactly the oracle's exits and logits (also on padded transformer
batches, their attention_mask a row input), and the SST-2 workload's batches."""

from __future__ import annotations

import csv
import itertools
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_bert_exits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds bench/

from bench import peers, runner
from bench.e2e import ForcedRate
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import ExitPolicy, MaxProb, Patience
from eenet.runtime import simulate, timing
from eenet_kernels.triton import interpreting

C = 6
INTERPRET = interpreting()


pytestmark = pytest.mark.usefixtures("one_thread")


# -- runner ----------------------------------------------------------------------------------


class ScriptedTimer:
    """A fake timer: call i 'takes' durations[i] seconds."""

    def __init__(self, durations: list[float]) -> None:
        self.durations = iter(durations)
        self.calls = 0

    def start(self) -> int:
        return 0

    def stop(self, token: int) -> float:
        self.calls += 1
        return next(self.durations)


def test_stats_drop_warmup_and_interpolate_percentiles() -> None:
    timed = [float(v) for v in range(1, 21)]  # 1..20
    timer = ScriptedTimer([100.0, 100.0, *timed])
    calls: list[str] = []
    stats = timing.time_fn(lambda: calls.append("fn"), warmup=2, repeats=20, timer=timer,
                           setup=lambda i: calls.append(f"setup{i}"),
                           flush=lambda: calls.append("flush"))
    assert timer.calls == 22
    assert stats.runs == 20 and stats.samples == tuple(timed)
    assert stats.median == pytest.approx(10.5)
    assert stats.p10 == pytest.approx(2.9)  # linear interpolation, as numpy
    assert stats.p90 == pytest.approx(18.1)
    assert stats.p99 == pytest.approx(19.81)
    assert stats.mean == pytest.approx(10.5) and stats.min == 1.0 and stats.max == 20.0
    assert calls[:3] == ["setup0", "flush", "fn"] and len(calls) == 66


def test_time_segments_sums_the_segments() -> None:
    timer = ScriptedTimer([1.0, 2.0, 3.0] * 4)
    stats = runner.time_segments(lambda: [lambda: None] * 3, warmup=1, repeats=3, timer=timer)
    assert stats.samples == (6.0, 6.0, 6.0)


def test_time_many_interleaves_and_groups_segments() -> None:
    order: list[str] = []
    # run = a: one call; b: two groups (2 calls, 1 call); warm-up run discarded
    timer = ScriptedTimer([9.0, 9.0, 9.0, 9.0] + [1.0, 2.0, 3.0, 4.0] * 2)
    per_item: dict[str, list[float]] = {}
    stats = runner.time_many(
        {"a": lambda: order.append("a"),
         "b": runner.Segmented(lambda: [[lambda: order.append("b1"), lambda: None],
                                        lambda: order.append("b2")])},
        warmup=1, repeats=2, timer=timer, setup=lambda i: order.append(f"s{i}"),
        item_samples=per_item)
    assert order[:4] == ["s0", "a", "b1", "b2"]
    assert stats["a"].samples == (1.0, 1.0)
    assert stats["b"].samples == (9.0, 9.0)
    assert per_item == {"b": [5.0, 4.0, 5.0, 4.0]}


def test_stats_reject_empty_and_bad_counts() -> None:
    with pytest.raises(ValueError):
        timing.Stats.from_samples([])
    with pytest.raises(ValueError):
        timing.time_fn(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        runner.time_many({"a": lambda: None}, warmup=-1)


def test_count_syncs_on_cpu() -> None:
    x = torch.randn(16, 4)
    mask = torch.arange(16) % 3 == 0
    assert runner.count_syncs(lambda: x + 1)[0].total == 0
    one, _ = runner.count_syncs(lambda: x.sum().item())
    assert one.total == 1 and one.by_name["aten::_local_scalar_dense"] == 1
    assert runner.count_syncs(lambda: x[mask])[0].total == 1
    assert runner.count_syncs(lambda: bool(mask.any()))[0].total == 1
    static = runner.count_syncs(lambda: torch.nonzero_static(mask, size=16))[0]
    assert static.total == 0
    syncs, result = runner.count_syncs(lambda: 7)
    assert result == 7 and syncs.total == 0


def test_cache_flusher_and_llc() -> None:
    assert runner.last_level_cache_bytes("cpu") > 0
    flush = runner.CacheFlusher("cpu", nbytes=1 << 20)
    flush()
    assert flush.nbytes == 1 << 20


def test_copy_bandwidth_and_the_fraction_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference bandwidth is read + write bytes of a timed device copy over its median
    time: with the timer stood in for (no timing in a test), exactly 2 x nbytes / median,
    and the timed call is a copy of the whole buffer."""
    from bench import micro

    timed: dict[str, Any] = {}

    def fake_time_many(fns: dict, **kwargs: Any) -> dict:
        timed.update(fns)
        return {name: types.SimpleNamespace(median=0.002) for name in fns}

    monkeypatch.setattr(runner, "time_many", fake_time_many)
    gbps = runner.copy_bandwidth("cpu", nbytes=1 << 20, repeats=3)
    assert gbps == pytest.approx(2.0 * (1 << 20) / 0.002 / 1e9)
    dst = timed["copy"]()
    assert dst.numel() * dst.element_size() == 1 << 20 and bool((dst == 1).all())
    assert runner.copy_bandwidth_bytes("cpu") >= 64 << 20
    rows = micro._with_bandwidth_fraction([{"gbps": 3.0}, {"gbps": None}], 12.0)
    assert rows[0]["bw_fraction"] == pytest.approx(0.25) and "bw_fraction" not in rows[1]
    # and the report's tables carry it (their pivot keeps the field)
    piv = micro._pivot([{"n": 8, "method": "compact", "backend": "cpp", "runs": 1,
                        "gbps": 3.0, "bw_fraction": 0.25}], ("n",))
    assert piv[0]["compact:bw_fraction"] == 0.25


def test_results_writer_stamps_every_file(tmp_path: Path) -> None:
    stamp = runner.environment("cpu")
    for key in ("device", "driver", "torch", "triton", "cuda", "commit"):
        assert stamp[key], key
    assert stamp["device"].startswith("CPU: ")
    assert stamp["torch"] == torch.__version__
    assert re.fullmatch(r"([0-9a-f]{4,40}(-dirty)?|unknown)", stamp["commit"])
    rows = [{"n": 1, "t": 0.5}, {"n": 2, "t": 0.25, "extra": "x"}]
    cols = [runner.Column("n", "N"), runner.Column("t", "time", "{:.2f}"),
            runner.Column("extra", "extra")]

    def plot(fig) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([r["n"] for r in rows], [r["t"] for r in rows])

    paths = runner.write_results("unit", "cpu", title="Unit", root=tmp_path, csv_rows=rows,
                                 sections=[runner.Section("Table", "text", rows, cols)],
                                 notes=["a note"], plot=plot, stamp=stamp)
    assert paths["md"] == tmp_path / "cpu" / "unit.md"
    md = paths["md"].read_text()
    for key, value in stamp.items():
        assert f"**{key}**: {value}" in md
    assert "| 2 | 0.25 | x |" in md and "| 1 | 0.50 | - |" in md and "a note" in md
    lines = paths["csv"].read_text().splitlines()
    comments = [ln for ln in lines if ln.startswith("# ")]
    assert {c.split(":", 1)[0][2:] for c in comments} == set(stamp)
    data = list(csv.DictReader(ln for ln in lines if not ln.startswith("# ")))
    assert [d["n"] for d in data] == ["1", "2"] and data[1]["extra"] == "x"
    assert paths["png"].stat().st_size > 1000


# -- peer modes ------------------------------------------------------------------------------


def _mlp_net(seed: int = 0, exits: int = 4) -> MultiExitNetwork:
    torch.manual_seed(seed)
    stages = [torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Tanh())
              for _ in range(exits)]
    heads = [ExitHead.linear(12, C) for _ in range(exits)]
    return MultiExitNetwork(stages, heads).eval()


def _conv_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    chans = [3, 8, 12, 16]
    stages = [torch.nn.Sequential(torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.ReLU())
              for a, b in itertools.pairwise(chans)]
    heads = [ExitHead.conv(b, C, width=6) for b in chans[1:]]
    return MultiExitNetwork(stages, heads).eval()


def _policy(kind: type[ExitPolicy], net: MultiExitNetwork, x_cal: torch.Tensor) -> ExitPolicy:
    """Median thresholds on a calibration batch (not the test batch: no exact ties)."""
    k = len(net.heads)
    if kind is Patience:
        return Patience([1.0] * k)
    with torch.no_grad():
        scores = kind([0.0] * k).scores([z.float() for z in net(x_cal)])
    return kind([float(scores[:, j].median()) for j in range(k)])


def _tables(net: MultiExitNetwork, policy: ExitPolicy, x: torch.Tensor
            ) -> dict[str, peers.CostTable]:
    k = len(net.stages)
    sizes = peers.profile_sizes(x.shape[0])
    flat = [[1.0] * len(sizes) for _ in range(k)]
    return {
        "profiled": peers.profile_costs(net, policy, x, warmup=0, repeats=1),
        "always_drop": peers.CostTable(sizes, [[float(n) for n in sizes]] * k,
                                       [[0.0] * len(sizes)] * k),
        "never_drop": peers.CostTable(sizes, flat, [[1e9] * len(sizes)] * k),
    }


@pytest.mark.parametrize("kind", [MaxProb, Patience], ids=lambda p: p.__name__)
@pytest.mark.parametrize("make_net", [_mlp_net, _conv_net], ids=["mlp", "conv"])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_every_mode_matches_the_oracle(kind: type[ExitPolicy], make_net, n: int) -> None:
    net = make_net()
    shape = (12,) if make_net is _mlp_net else (3, 6, 6)
    g = torch.Generator().manual_seed(n)
    x_cal, x = torch.randn(64, *shape, generator=g), torch.randn(n, *shape, generator=g)
    policy = _policy(kind, net, x_cal)
    oracle = simulate(net, policy, x)
    runners = {m: peers.make_runner(m, net, policy) for m in peers.MODES if m != "batchcond"}
    for name, table in _tables(net, policy, x_cal[:8]).items():
        runners[f"batchcond/{name}"] = peers.make_runner("batchcond", net, policy, table=table)
    for name, run in runners.items():
        out = run(x)
        assert torch.equal(out.exit_index, oracle.exit_index), name
        torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(out.score, oracle.score, rtol=1e-5, atol=1e-5, msg=name)


def test_stage_by_stage_modes_share_the_runtime_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """mask, compact and every peer but full run the runtime's one stage loop (batch1 once
    per sample), each as its own step."""
    import eenet.runtime.engine as engine_mod

    real = engine_mod.run_stages
    steps: list[str] = []

    def spy(stages, x, rows, step) -> None:
        steps.append(type(step).__name__)
        real(stages, x, rows, step)

    monkeypatch.setattr(engine_mod, "run_stages", spy)
    monkeypatch.setattr(peers, "run_stages", spy)
    net = _mlp_net()
    x = torch.randn(5, 12)
    policy = _policy(MaxProb, net, torch.randn(64, 12))
    table = _tables(net, policy, x)["always_drop"]
    for mode in peers.MODES:
        steps.clear()
        out = peers.make_runner(mode, net, policy, table=table)(x)
        assert torch.equal(out.exit_index, simulate(net, policy, x).exit_index), mode
        want = {"full": 0, "batch1": x.shape[0]}.get(mode, 1)
        assert len(steps) == want and len(set(steps)) <= 1, (mode, steps)


def test_batchcond_follows_its_table() -> None:
    net = _mlp_net()
    x = torch.randn(64, 12)
    policy = _policy(MaxProb, net, torch.randn(64, 12))
    tables = _tables(net, policy, x[:8])
    drop = peers.BatchCond(net, policy, tables["always_drop"])
    keep = peers.BatchCond(net, policy, tables["never_drop"])
    drop(x)
    keep(x)
    assert drop.decisions and all(d[3] for d in drop.decisions)
    assert keep.decisions and not any(d[3] for d in keep.decisions)
    assert all(d[1] == 64 for d in keep.decisions)  # masked: the batch keeps its 64 rows


def test_compact_syncs_at_most_once_per_stage_and_peers_more() -> None:
    net = _mlp_net()
    x = torch.randn(64, 12)
    policy = _policy(MaxProb, net, torch.randn(64, 12))
    counts = {m: runner.count_syncs(lambda m=m: peers.make_runner(m, net, policy)(x))[0].total
              for m in ("compact", "bool_index", "full")}
    assert counts["compact"] <= len(net.stages) - 1
    assert counts["bool_index"] > counts["compact"]


def test_ideal_inputs_are_the_survivors() -> None:
    net = _mlp_net()
    x = torch.randn(20, 12)
    policy = _policy(MaxProb, net, torch.randn(64, 12))
    exits = simulate(net, policy, x).exit_index
    acts = peers.stage_activations(net, x)
    inputs = peers.survivor_inputs(acts, exits)
    assert [t.h.shape[0] for t in inputs] == [int((exits >= k).sum()) for k in range(4)]
    assert all(t.row_inputs == {} for t in inputs)
    assert len(peers.ideal_segments(net, inputs)) == sum(t.h.shape[0] > 0 for t in inputs)
    stats = runner.time_segments(lambda: peers.ideal_segments(net, inputs), warmup=0,
                                 repeats=2)
    assert stats.runs == 2


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
def test_forced_rate_policy_leaves_the_given_fraction(rate: float) -> None:
    net = _mlp_net(exits=3)
    x = torch.randn(400, 12)
    with torch.no_grad():
        logits = [z.float() for z in net(x)]
    policy = ForcedRate.calibrate(logits, rate)
    assert isinstance(policy, MaxProb) and policy.rate == rate
    exits = policy.decide(logits)[0]
    counts = torch.bincount(exits, minlength=3).double()
    present = 400.0
    for k in range(2):
        assert counts[k] / present == pytest.approx(rate, abs=0.01)
        present -= float(counts[k])


# -- padded transformer batches (the attention_mask a row input) ----------------------------

VOCAB = 100


def _tiny_bert(seed: int = 0) -> MultiExitNetwork:
    """A random 3-layer BERT with masked-mean exits after layers 1, 2 and 3."""
    return tiny_bert_exits(layers=3, after=(1, 2), vocab=VOCAB, seed=seed)


def _padded_ids(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, width) ids padded with 0 where the (n, width) int64 mask is 0; random lengths in
    [1, width], row 0 of length 1 and row 1 of full width."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    lengths[0], lengths[1] = 1, width
    mask = (torch.arange(width)[None] < lengths[:, None]).to(torch.int64)
    ids = torch.randint(1, VOCAB, (n, width), generator=g) * mask
    return ids, mask


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_every_mode_matches_the_oracle_on_padded_batches(rate: float) -> None:
    net = _tiny_bert()
    ids, mask = _padded_ids(40, 12, seed=int(rate * 10))
    with torch.no_grad():
        logits = [z.float() for z in net(ids, attention_mask=mask)]
        unmasked = net(ids)[0]
    assert not torch.allclose(unmasked, logits[0], atol=1e-3)  # the mask matters
    # thresholds halfway between neighbouring scores (ForcedRate): no row on a threshold
    policy = ForcedRate.calibrate(logits, rate)
    oracle = simulate(net, policy, ids, attention_mask=mask)
    counts = torch.bincount(oracle.exit_index, minlength=3)
    assert bool((counts > 0).all()), counts  # rows leave at every exit
    runners = {m: peers.make_runner(m, net, policy) for m in peers.MODES if m != "batchcond"}
    tables = _tables(net, policy, ids[:8])
    tables["profiled"] = peers.profile_costs(net, policy, ids[:8], warmup=0, repeats=1,
                                             row_inputs={"attention_mask": mask[:8]})
    for name, table in tables.items():
        runners[f"batchcond/{name}"] = peers.make_runner("batchcond", net, policy, table=table)
    for name, run in runners.items():
        out = run(ids, attention_mask=mask)
        assert torch.equal(out.exit_index, oracle.exit_index), name
        torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(out.score, oracle.score, rtol=1e-5, atol=1e-5, msg=name)
    drop = runners["batchcond/always_drop"]
    assert isinstance(drop, peers.BatchCond) and any(d[3] for d in drop.decisions)


def test_ideal_inputs_carry_the_row_inputs() -> None:
    net = _tiny_bert()
    ids, mask = _padded_ids(20, 8, seed=3)
    with torch.no_grad():
        logits = [z.float() for z in net(ids, attention_mask=mask)]
    policy = ForcedRate.calibrate(logits, 0.5)
    exits = simulate(net, policy, ids, attention_mask=mask).exit_index
    acts = peers.stage_activations(net, ids, attention_mask=mask)
    inputs = peers.survivor_inputs(acts, exits, {"attention_mask": mask})
    for k, inp in enumerate(inputs):
        assert torch.equal(inp.row_inputs["attention_mask"], mask[exits >= k])
        assert inp.h.shape[0] == inp.row_inputs["attention_mask"].shape[0]
    for k, seg in enumerate(peers.ideal_segments(net, inputs)):
        torch.testing.assert_close(seg(), logits[k][exits >= k].to(seg().dtype),
                                   rtol=1e-5, atol=1e-5)


def _sst2_missing() -> str | None:
    from bench import e2e

    return e2e.sst2_unavailable()


def test_sst2_workload_batches_are_padded_and_bucketed() -> None:
    from bench import e2e

    reason = _sst2_missing()
    if reason is not None:
        pytest.skip(reason)
    w = e2e.WORKLOADS["minilm-sst2"](torch.device("cpu"), False, True)
    assert w.batches == tuple(e2e.SST2_QUICK_PLAN)
    assert "fresh random exit heads" in w.description or "trained" in w.description
    assert "dev split" in w.description and "Padded positions" in w.description
    for b, (rows, reps) in e2e.SST2_QUICK_PLAN.items():
        stream = w.streams[b]
        assert w.repeats[b] == reps and w.stream_size(b) == b * -(-rows // b)
        for ids, row_inputs in stream:
            assert set(row_inputs) == {"attention_mask"}
            mask = row_inputs["attention_mask"]
            assert ids.shape == mask.shape and ids.shape[0] == b and ids.dtype == torch.int64
            lengths = mask.sum(dim=1)
            positions = torch.arange(ids.shape[1])[None]
            assert torch.equal(mask, (positions < lengths[:, None]).to(mask.dtype))
            assert torch.equal(ids != 0, mask.bool())  # pad id 0 exactly where masked
            assert ids.shape[1] <= -(-int(lengths.max()) // 8) * 8  # bucketed: padded to
            assert ids.shape[1] % 8 == 0 or ids.shape[1] == int(lengths.max())  # its longest


def test_sst2_left_out_without_its_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bench import e2e

    names, notes = e2e.default_workloads(str(tmp_path / "missing"))
    assert names == ["resnet56", "bert", "mnist"]
    assert len(notes) == 1 and notes[0].startswith("minilm-sst2 left out")
    assert e2e.main(["--workloads", "minilm-sst2", "--data-dir",
                     str(tmp_path / "missing")]) == 2
    assert "minilm-sst2 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["graph", "graph_device", "bogus"])
def test_e2e_refuses_engine_modes_it_cannot_run(mode: str, capsys: pytest.CaptureFixture
                                                ) -> None:
    from bench import e2e

    with pytest.raises(SystemExit) as stop:
        e2e.main(["--workloads", "resnet56", "--engine-modes", mode])
    assert stop.value.code == 2
    assert f"engine modes ['{mode}'] cannot run here" in capsys.readouterr().err


# -- benchmark drivers (smoke: tiny sizes, one run, nothing written) -------------------------


class _Clock:
    """A settable clock for :class:`bench.runner.TimeLimit` (no real time in tests)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_limit_hands_out_items_until_spent_or_interrupted() -> None:
    from bench.runner import TimeLimit

    clock = _Clock()
    limit = TimeLimit(10.0, clock=clock)
    got = []
    for item in limit.each([1, 2, 3, 4], "sizes"):
        got.append(item)
        if item == 2:
            clock.now = 10.0  # spent while item 2 ran: item 2 counts, 3 does not start
    assert got == [1, 2] and limit.stopped == "the time limit of 10 s was reached"
    assert limit.notes() == ["sizes: 2 of 4 measured, then stopped: the time limit of 10 s "
                             "was reached"]
    assert list(limit.each([5], "rates")) == []  # a later loop starts nothing

    limit = TimeLimit(None, clock=clock)
    done = []
    with limit.interruptible():
        for item in limit.each(["a", "b", "c"], "loads"):
            if item == "b":
                raise KeyboardInterrupt
            done.append(item)
    assert done == ["a"] and limit.stopped == "the run was interrupted (SIGINT)"
    # the item cut off by the interruption is not counted
    assert limit.notes() == ["loads: 1 of 3 measured, then stopped: the run was interrupted "
                             "(SIGINT)"]
    unlimited = TimeLimit()
    assert list(unlimited.each([1, 2], "x")) == [1, 2] and unlimited.notes() == []
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="seconds must be > 0"):
            TimeLimit(bad)


@pytest.mark.parametrize("program", ["micro", "e2e", "serve"])
def test_time_limit_option_refuses_non_positive_seconds(program: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    import importlib

    main = importlib.import_module(f"bench.{program}").main
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as stop:
            main(["--time-limit", bad])
        assert stop.value.code == 2
        assert "argument --time-limit: expected seconds > 0" in capsys.readouterr().err


def test_micro_keeps_the_sizes_measured_before_a_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGINT in the middle of a size keeps the sizes before it whole; a spent limit stops
    the next loop from starting."""
    from bench import micro
    from bench.runner import TimeLimit

    monkeypatch.setattr(micro, "COMPACT_N", (64, 96, 128))
    monkeypatch.setattr(micro, "ROW_BYTES", (16,))
    monkeypatch.setattr(micro, "CacheFlusher", lambda device: (lambda: None))
    calls = []
    real = micro.time_many

    def time_many(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(micro, "time_many", time_many)
    limit = TimeLimit()
    rows = micro.bench_compact(torch.device("cpu"), repeats=1, warmup=0, limit=limit)
    assert {r["n"] for r in rows} == {64}
    assert len(rows) == len(micro.COMPACT_METHODS) + len(micro.LAUNCH_METHODS)
    assert limit.notes() == ["compact sizes: 1 of 3 measured, then stopped: the run was "
                             "interrupted (SIGINT)"]
    assert micro.bench_exit_score(torch.device("cpu"), repeats=1, warmup=0,
                                  sizes=[(16, 8, 4, torch.float32)], use_compile=False,
                                  limit=limit) == []


def test_e2e_keeps_the_rates_measured_before_the_limit(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    from bench import e2e
    from bench.runner import TimeLimit

    clock = _Clock()
    limit = TimeLimit(5.0, clock=clock)
    w = e2e.Workload.from_pool("tiny", "tiny MLP", _mlp_net(), torch.randn(16, 12),
                               batches=(1, 8), repeats={1: 1, 8: 1}, stream=4, warmup=1,
                               profile_repeats=1)
    real_log = e2e._log

    def log(msg: str) -> None:  # the limit is spent once the first rate is measured
        if " rate " in msg:
            clock.now = 5.0
        real_log(msg)

    monkeypatch.setattr(e2e, "_log", log)
    rows = e2e.measure_workload(w, torch.device("cpu"), rates=(0.0, 0.5), limit=limit)
    assert {(r["batch"], r["rate"]) for r in rows} == {(1, 0.0)}
    assert limit.notes() == [
        "tiny batch sizes: 1 of 2 measured, then stopped: the time limit of 5 s was reached",
        "tiny batch 1 exit rates: 1 of 2 measured, then stopped: the time limit of 5 s was "
        "reached"]




def test_micro_drivers_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import micro

    monkeypatch.setattr(micro, "COMPACT_N", (64,))
    monkeypatch.setattr(micro, "ROW_BYTES", (16,))
    monkeypatch.setattr(micro, "CacheFlusher", lambda device: (lambda: None))
    rows = micro.bench_compact(torch.device("cpu"), repeats=1, warmup=0)
    assert {r["method"] for r in rows} == {*micro.COMPACT_METHODS, *micro.LAUNCH_METHODS}
    assert next(r for r in rows if r["method"] == "trivial")["gbps"] is None
    assert next(r for r in rows if r["method"] == "nonzero_static")["syncs"] == 0
    rows = micro.bench_exit_score(torch.device("cpu"), repeats=1, warmup=0,
                                  sizes=[(16, 8, 4, torch.float32)], use_compile=False)
    assert {r["method"] for r in rows} == set(micro.EXIT_METHODS)
    ours = next(r for r in rows if r["method"] == "ours_write")
    assert ours["exit_agree"] == 1.0 and ours["max_logit_diff"] < 1e-5 and ours["syncs"] == 0
    # launch cost: a host time for ours, no CUDA-graph replay on a CPU
    assert ours["host_us"] > 0 and ours["graph_us"] is None
    assert next(r for r in rows if r["method"] == "eager")["host_us"] is None
    assert next(r for r in rows if r["method"] == "compile")["error"] == "not run"


def test_e2e_driver_smoke() -> None:
    from bench import e2e

    w = e2e.Workload.from_pool("tiny", "tiny MLP", _mlp_net(), torch.randn(16, 12),
                               batches=(1, 8), repeats={1: 1, 8: 1}, stream=4, warmup=1,
                               profile_repeats=1)
    assert [len(w.streams[b]) for b in w.batches] == [4, 1]
    rows = e2e.measure_workload(w, torch.device("cpu"), rates=(0.0, 0.5))
    modes = {r["mode"] for r in rows}
    assert modes == {*peers.MODES, "ideal"}
    assert all(r["agree"] == 1.0 for r in rows if r["agree"] is not None)
    assert all(r["syncs"] <= 3 for r in rows if r["mode"] == "compact")
    assert {r["stream"] for r in rows} == {4, 8}
    sections = e2e.sections_for(rows, [w])
    assert sections[0].rows and "ours/ideal" in [c.header for c in sections[0].columns]


def test_e2e_engine_mode_that_fails_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine mode beside compact that raises on its first run is dropped with its error
    (not tried again at the next exit rate); the other modes are still measured."""
    from bench import e2e

    made: list[str] = []
    real = peers.make_runner

    def make_runner(mode: str, *args: object, **kwargs: object) -> peers.Runner:
        made.append(mode)
        if mode != "compiled":
            return real(mode, *args, **kwargs)

        def broken(x: torch.Tensor, **row_inputs: torch.Tensor) -> None:
            raise RuntimeError("graph mode: stage 1 could not be captured")

        return broken

    monkeypatch.setattr(peers, "make_runner", make_runner)
    w = e2e.Workload.from_pool("tiny", "tiny MLP", _mlp_net(), torch.randn(8, 12),
                               batches=(4,), repeats={4: 1}, stream=2, warmup=1,
                               profile_repeats=1)
    failed: dict[str, str] = {}
    rows = e2e.measure_workload(w, torch.device("cpu"), rates=(0.0, 0.5),
                                engine_modes=("compiled",), failed=failed)
    assert {r["mode"] for r in rows} == {*peers.MODES, "ideal"}
    assert failed == {"compiled": "RuntimeError: graph mode: stage 1 could not be captured"}
    assert made.count("compiled") == 1 and made.count("compact") == 2


def test_e2e_driver_smoke_with_row_inputs() -> None:
    """Batches of different widths, each with its attention_mask, through every mode, the
    oracle, the ideal and BatchCond's profiling."""
    from bench import e2e

    net = _tiny_bert()
    stream = []
    for j, width in enumerate((8, 16, 8)):
        ids, mask = _padded_ids(4, width, seed=j)
        stream.append((ids, {"attention_mask": mask}))
    w = e2e.Workload("tiny-text", "tiny BERT", net, {4: stream}, {4: 1}, warmup=1,
                     batch1_max=4, profile_repeats=1)
    rows = e2e.measure_workload(w, torch.device("cpu"), rates=(0.5,))
    assert {r["mode"] for r in rows} == {*peers.MODES, "ideal"}
    assert all(r["agree"] == 1.0 and r["max_logit_err"] < 1e-5 for r in rows
               if r["agree"] is not None)
    assert {r["stream"] for r in rows} == {12}


def test_tune_candidates_and_cpu_exit() -> None:
    from bench import tune

    small = tune.exit_candidates(n=10, c=10)
    assert small and all(bn == 16 and bc == 16 and k == 0 for bn, bc, _, _, k in small)
    big = tune.exit_candidates(n=4096, c=1000)
    assert {bn for bn, *_ in big} == set(tune.BLOCK_N)
    assert all(bn * bc <= 16384 and k * bc < 1000 for bn, bc, _, _, k in big)
    assert {k for *_, k in big} == set(tune.CHUNK_TILES)
    if not torch.cuda.is_available():
        assert tune.main([]) == 2  # the sweep needs a GPU and says so


@pytest.mark.skipif(not INTERPRET, reason="the sweep runs on CPU tensors only interpreted")
def test_tune_sweeps_run_interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import tune

    monkeypatch.setattr(tune, "BLOCK_N", (16,))
    monkeypatch.setattr(tune, "BLOCK_C", (16,))
    monkeypatch.setattr(tune, "BLOCK_D", (16, 32))
    monkeypatch.setattr(tune, "WARPS", (1,))
    summary, every = tune.tune_exit_score([(20, 24, 37, torch.float32)], 1, 0, device="cpu")
    configs = {"16x16x16x1x0", "16x16x32x1x0", "16x16x16x1x1", "16x16x32x1x1",
               "16x16x16x1x2", "16x16x32x1x2"}
    assert summary[0]["best"] in configs and summary[0]["failed"] == 0
    assert {r["config"] for r in every} == {"builtin", *configs}
    monkeypatch.setattr(tune, "COMPACT_BLOCK_R", (16, 32))
    monkeypatch.setattr(tune, "COMPACT_PROGRAMS_PER_SM", (1, 2))
    summary, every = tune.tune_compact([40], [16], 1, 0, device="cpu")
    assert summary[0]["best"] in {r["config"] for r in every} - {"builtin"}


# -- serving under load (bench.serve) ------------------------------------------------------


def test_serve_benchmark_runs_every_configuration() -> None:
    """A tiny Poisson stream through all four configurations: every request is answered or
    counted as rejected, and every answer takes the oracle's exit (no timing asserted)."""
    from bench import serve

    rows, info = serve.measure("mnist", torch.device("cpu"), loads=(0.5,), requests=40,
                               seconds=0.2, max_batch=16, max_wait_ms=1.0, quick=True)
    assert [r["config"] for r in rows] == list(serve.CONFIGS)
    for r in rows:
        assert r["sent"] + r["rejected"] == 40 and r["rejected"] == 0
        assert r["agree"] == 1.0 and r["p50_ms"] <= r["p99_ms"]
    assert set(info["capacity"]) == set(serve.CONFIGS) and info["plans"]

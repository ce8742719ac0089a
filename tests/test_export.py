"""eenet.runtime.export: the compact loop as a torch.export program, saved to a .pt2 file and
loaded back (also in a fresh process), with compact mode's results on batches of other sizes
and exit patterns (up to rows within rounding of a threshold); the AOTInductor package and
its Python loader (input checks, the empty batch, contiguous inputs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_compiled_mode import (
    WIDTH,
    _assert_matches_compact,
    _median_policy,
    _mlp_net,
    _switch_batch,
    _switch_net,
)

from eenet.policies import EENet, MaxProb
from eenet.runtime import Engine, EngineOutput, export_engine
from eenet.runtime.export import (
    PACKAGE_INPUTS_KEY,
    PackagedEngine,
    PackageInputs,
    load_package,
    package_engine,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_and_loaded(program: torch.export.ExportedProgram, path: Path
                      ) -> torch.export.ExportedProgram:
    torch.export.save(program, path)
    assert path.stat().st_size > 0
    return torch.export.load(path)


def _run(program: torch.export.ExportedProgram, x: torch.Tensor,
         **row_inputs: torch.Tensor) -> EngineOutput:
    with torch.no_grad():
        return EngineOutput(*program.module()(x, **row_inputs))


def test_saved_program_every_exit_pattern(tmp_path: Path) -> None:
    """Exported at one batch size and pattern; after save/load, batches of other sizes with
    every row leaving at exit 0, none leaving early and mixed exits: exactly compact mode's
    results. The program holds the eenet ops and unbacked survivor counts."""
    net = _switch_net()
    policy = MaxProb([0.9] * 3)
    program = export_engine(net, policy, _switch_batch([0, 1, 2, 2]))
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"eenet.exit_score_write.default", "eenet.compact_out.default"} <= targets
    loaded = _saved_and_loaded(program, tmp_path / "loop.pt2")
    eager = Engine(net, policy, mode="compact")
    for exits in ([0] * 9, [2] * 5, [1, 0, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2, 2, 0, 1, 2, 0], [1]):
        x = _switch_batch(exits)
        out = _run(loaded, x)
        assert out.exit_index.tolist() == exits
        with torch.no_grad():
            want = eager(x)
        torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.score, want.score, rtol=0, atol=0)


def test_saved_program_history_and_row_inputs(tmp_path: Path) -> None:
    """EENet (score and prediction history through the graph) with a row input compacted
    with the rows: three batches of other sizes than the example, compact mode's results."""
    net = _mlp_net(row_input=True)
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(n, WIDTH, generator=g) for n in (6, 31, 13)]
    scales = [torch.rand(x.shape[0], 1, generator=g) + 0.5 for x in batches]
    policy = _median_policy(EENet, net, torch.cat(batches), scale=torch.cat(scales))
    loaded = _saved_and_loaded(export_engine(net, policy, torch.randn(4, WIDTH),
                                             scale=torch.rand(4, 1)), tmp_path / "eenet.pt2")
    eager = Engine(net, policy, mode="compact")
    seen = set()
    for x, scale in zip(batches, scales, strict=True):
        out = _run(loaded, x, scale=scale)
        with torch.no_grad():
            want = eager(x, scale=scale)
        _assert_matches_compact(out, want, policy, net, x, scale=scale)
        seen.update(out.exit_index.tolist())
    assert seen == {0, 1, 2}, "the batches should leave at every exit"


def test_load_in_fresh_process(tmp_path: Path) -> None:
    """A fresh process that imports eenet_kernels loads the program (the ops by name) and
    runs it."""
    path = tmp_path / "loop.pt2"
    torch.export.save(export_engine(_switch_net(), MaxProb([0.9] * 3), _switch_batch([0, 2])),
                      path)
    x = _switch_batch([2, 0, 1, 1, 0])
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        import eenet_kernels  # registers torch.ops.eenet.*
        program = torch.export.load({str(path)!r})
        with torch.no_grad():
            logits, exit_index, score = program.module()(torch.load({str(tmp_path / 'x.pt')!r}))
        print(exit_index.tolist())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[2, 0, 1, 1, 0]"


def test_bad_network_policy_and_example() -> None:
    net = _switch_net()
    with pytest.raises(TypeError, match=r"policy must be an eenet\.policies\.ExitPolicy"):
        export_engine(net, [0.9] * 3, _switch_batch([0, 1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 exit rules but the network has 3 exits"):
        export_engine(net, MaxProb([0.9] * 2), _switch_batch([0, 1]))
    with pytest.raises(ValueError, match="threshold 1 is 2"):
        export_engine(net, MaxProb([0.9, 2.0, 0.9]), _switch_batch([0, 1]))
    with pytest.raises(TypeError, match="net must have stages and heads"):
        export_engine(torch.nn.Linear(2, 2), MaxProb([0.9] * 3), _switch_batch([0, 1]))
    with pytest.raises(ValueError, match="at least 2 rows"):
        export_engine(net, MaxProb([0.9] * 3), _switch_batch([0]))
    with pytest.raises(ValueError, match="row input 'scale' must have one row per input row"):
        export_engine(net, MaxProb([0.9] * 3), _switch_batch([0, 1]), scale=torch.ones(3, 1))


@pytest.mark.slow  # ~20 s of AOTInductor compile; make cmake-check runs a package from C++
def test_aoti_package_runs_the_loop(tmp_path: Path) -> None:
    """The loop compiled ahead of time (AOTInductor) into a .pt2 package, loaded back: the
    exits of every pattern of a switch network, and logits equal to compact mode's."""
    net = _switch_net()
    policy = MaxProb([0.9] * 3)
    path = package_engine(net, policy, str(tmp_path / "loop.pt2"),
                          _switch_batch([0, 1, 2, 2]))
    runner = torch._inductor.aoti_load_package(path)
    compact = Engine(net, policy, mode="compact")
    for pattern in ([2, 0, 1], [0] * 5, [1, 2], [2] * 9, [0]):
        x = _switch_batch(pattern)
        with torch.no_grad():
            logits, exit_index, score = runner(x)
            want = compact(x)
        assert exit_index.tolist() == pattern
        torch.testing.assert_close(logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score, want.score, rtol=1e-5, atol=1e-5)


# -- the package's Python loader -------------------------------------------------------------

_SCALED = PackageInputs((WIDTH,), torch.float32, "cpu", (("scale", (1,), torch.float32),), 7)


class _FakeRunner:
    """Stands for a loaded package: records each call, returns results for its rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def __call__(self, x: torch.Tensor, **row_inputs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.calls.append((x, row_inputs))
        n = x.shape[0]
        return torch.ones(n, 7), torch.full((n,), 2), torch.ones(n)


def test_package_inputs_json_round_trip() -> None:
    assert PackageInputs.from_json(_SCALED.to_json()) == _SCALED
    bf16 = PackageInputs((3, 8, 8), torch.bfloat16, "cuda", (), 10)
    assert PackageInputs.from_json(bf16.to_json()) == bf16
    with pytest.raises(ValueError, match=r"malformed eenet\.package_inputs metadata"):
        PackageInputs.from_json('{"x": {"shape": [10], "dtype": "float99"}}')
    with pytest.raises(ValueError, match="malformed"):
        PackageInputs.from_json("not json")


def test_packaged_engine_checks_inputs_before_running() -> None:
    """Bad inputs raise naming the input and what the package takes, and never reach the
    package; N = 0 returns empty results of the right shapes and dtypes without running it;
    non-contiguous inputs reach it contiguous."""
    runner = _FakeRunner()
    engine = PackagedEngine(runner, _SCALED)
    x, scale = torch.randn(3, WIDTH), torch.rand(3, 1)
    bad: list[tuple[type[Exception], str, tuple, dict]] = [
        (TypeError, r"x must be a torch.Tensor of shape \(N, 10\), got list",
         ([[0.0] * WIDTH],), {"scale": scale[:1]}),
        (ValueError, r"x must have shape \(N, 10\) .*got \(3, 11\)",
         (torch.randn(3, 11),), {"scale": scale}),
        (ValueError, r"x must have shape \(N, 10\) .*got \(\)", (torch.tensor(1.0),),
         {"scale": scale}),
        (TypeError, "x has dtype torch.float64 but the package takes torch.float32",
         (x.double(),), {"scale": scale}),
        (ValueError, "x is on meta but the package runs on cpu",
         (x.to("meta"),), {"scale": scale}),
        (TypeError, r"takes the row inputs \['scale'\].*missing \['scale'\]", (x,), {}),
        (TypeError, r"unexpected \['mask'\]", (x,), {"scale": scale, "mask": scale}),
        (ValueError, r"row input 'scale' must have one row per row of x, shape \(3, 1\), "
         r"got \(4, 1\)", (x,), {"scale": torch.rand(4, 1)}),
        (ValueError, r"row input 'scale' must have shape \(3, 1\) .*got \(3, 2\)", (x,),
         {"scale": torch.rand(3, 2)}),
        (TypeError, "row input 'scale' has dtype torch.float16", (x,),
         {"scale": scale.half()}),
        (ValueError, "row input 'scale' is on meta but the package runs on cpu", (x,),
         {"scale": scale.to("meta")}),
        (ValueError, r"x must have shape \(N, 10\)", (torch.randn(0, 11),),
         {"scale": torch.rand(0, 1)}),
    ]
    for error, match, args, kwargs in bad:
        with pytest.raises(error, match=match):
            engine(*args, **kwargs)
    assert not runner.calls

    logits, exit_index, score = engine(torch.randn(0, WIDTH), scale=torch.rand(0, 1))
    assert not runner.calls
    want = Engine(_mlp_net(row_input=True), MaxProb([0.5] * 3), mode="compact")(
        torch.randn(0, WIDTH), scale=torch.rand(0, 1))
    for got, ref in ((logits, want.logits), (exit_index, want.exit_index),
                     (score, want.score)):
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device

    engine(torch.randn(WIDTH, 5).t(), scale=torch.rand(1, 5).t())
    (sent, sent_rows), = runner.calls
    assert sent.is_contiguous() and sent_rows["scale"].is_contiguous()
    assert list(sent_rows) == ["scale"]


def test_load_package_needs_the_input_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    class Loaded(_FakeRunner):
        def __init__(self, metadata: dict[str, str]) -> None:
            super().__init__()
            self.metadata = metadata

        def get_metadata(self) -> dict[str, str]:
            return self.metadata

    metadata = {"AOTI_DEVICE_KEY": "cpu"}
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, **kwargs: Loaded(metadata))
    with pytest.raises(ValueError, match=r"holds no 'eenet\.package_inputs' metadata"):
        load_package("foreign.pt2")
    metadata[PACKAGE_INPUTS_KEY] = _SCALED.to_json()
    assert load_package("ours.pt2").inputs == _SCALED


@pytest.fixture(scope="module")
def scaled_package(tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[torch.nn.Module, MaxProb, str]:
    """One package shared by the tests below (~10 s of AOTInductor compile): the MLP with a
    row input ``scale`` (N, 1), thresholds at the median scores; (net, policy, path)."""
    net = _mlp_net(row_input=True)
    g = torch.Generator().manual_seed(3)
    x, scale = torch.randn(64, WIDTH, generator=g), torch.rand(64, 1, generator=g) + 0.5
    policy = _median_policy(MaxProb, net, x, scale=scale)
    path = str(tmp_path_factory.mktemp("package") / "scaled.pt2")
    package_engine(net, policy, path, torch.randn(4, WIDTH), scale=torch.rand(4, 1))
    return net, policy, path


@pytest.mark.slow
def test_loaded_package_matches_compact_mode_and_answers_an_empty_batch(
        scaled_package: tuple[torch.nn.Module, MaxProb, str]) -> None:
    """load_package: compact mode's results at several batch sizes (one row, a transposed
    view); an empty batch gives the eager engine's empty results (the raw package fails on
    it with an unbacked-size error)."""
    net, policy, path = scaled_package
    engine = load_package(path)
    assert engine.inputs == PackageInputs((WIDTH,), torch.float32, "cpu",
                                          (("scale", (1,), torch.float32),), 7)
    compact = Engine(net, policy, mode="compact")
    g = torch.Generator().manual_seed(5)
    seen = set()
    for n, transposed in ((1, False), (9, False), (40, True)):
        x = (torch.randn(WIDTH, n, generator=g).t() if transposed else
             torch.randn(n, WIDTH, generator=g))
        scale = torch.rand(n, 1, generator=g) + 0.5
        with torch.no_grad():
            out = EngineOutput(*engine(x, scale=scale))
            want = compact(x.contiguous(), scale=scale)
        _assert_matches_compact(out, want, policy, net, x.contiguous(), scale=scale)
        seen.update(out.exit_index.tolist())
    assert seen == {0, 1, 2}
    logits, exit_index, score = engine(torch.randn(0, WIDTH), scale=torch.rand(0, 1))
    assert logits.shape == (0, 7) and logits.dtype == torch.float32
    assert exit_index.shape == (0,) and exit_index.dtype == torch.int64
    assert score.shape == (0,) and score.dtype == torch.float32
    with pytest.raises(RuntimeError):
        engine.runner(torch.randn(0, WIDTH), scale=torch.rand(0, 1))


@pytest.mark.slow
def test_loaded_package_rejects_bad_inputs_clearly(
        scaled_package: tuple[torch.nn.Module, MaxProb, str]) -> None:
    """The loaded package's checks name the problem (the raw package reports a failed
    matmul, a dtype mismatch inside addmm or a kwarg mismatch of its call spec)."""
    engine = load_package(Path(scaled_package[2]))
    x, scale = torch.randn(3, WIDTH), torch.rand(3, 1)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 10\)"):
        engine(torch.randn(3, WIDTH + 1), scale=scale)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64"):
        engine(x.double(), scale=scale)
    with pytest.raises(TypeError, match=r"missing \['scale'\]"):
        engine(x)
    with pytest.raises(ValueError, match="one row per row of x"):
        engine(x, scale=torch.rand(4, 1))
    assert engine(x, scale=scale)[0].shape == (3, 7)


class _EmbeddingStage(torch.nn.Module):
    """Linear + an embedding of the per-row input ``kind`` (ids in [0, 5))."""

    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.embed = torch.nn.Embedding(5, width)

    def forward(self, h: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(h) + self.embed(kind))


def test_rows_gone_leave_a_placeholder_of_real_values() -> None:
    """Every row leaves at exit 0: the compiled loop and the program still run the later
    stages on one placeholder row, which must hold a real row's values (uninitialised
    memory as an embedding index raised IndexError, or read out of bounds in a package)."""
    from eenet.nn import ExitHead, MultiExitNetwork

    torch.manual_seed(0)
    net = MultiExitNetwork([_EmbeddingStage() for _ in range(3)],
                           [ExitHead.linear(10, 7) for _ in range(3)]).eval()
    policy = MaxProb([0.0, 0.0, 0.0])
    compact = Engine(net, policy, mode="compact")
    compiled = Engine(net, policy, mode="compiled", compile_backend="aot_eager")
    program = export_engine(net, policy, torch.randn(4, 10), kind=torch.randint(0, 5, (4,)))
    for n in (2, 5, 64):
        torch.full((1 << 16,), 1 << 40, dtype=torch.int64)  # garbage for the allocator
        x, kind = torch.randn(n, 10), torch.randint(0, 5, (n,))
        with torch.no_grad():
            want = compact(x, kind=kind)
            assert bool((want.exit_index == 0).all())
            for out in (compiled(x, kind=kind), EngineOutput(*program.module()(x, kind=kind))):
                assert torch.equal(out.exit_index, want.exit_index)
                torch.testing.assert_close(out.logits, want.logits, rtol=1e-6, atol=1e-6)
        # with grad mode on, as a caller may run the program: no buffer of it requires grad
        assert torch.equal(program.module()(x, kind=kind)[1], want.exit_index)


def test_export_gives_the_network_its_modes_back_and_the_engine_refuses_train_mode() -> None:
    net = _mlp_net()
    net.train()
    net.heads[0].eval()  # a frozen head
    modes = {name: m.training for name, m in net.named_modules()}
    export_engine(net, MaxProb([0.5] * 3), torch.randn(4, 10))
    assert {name: m.training for name, m in net.named_modules()} == modes
    engine = Engine(net, MaxProb([0.5] * 3))
    assert not net.training
    engine(torch.randn(3, 10))
    net.train()
    with pytest.raises(RuntimeError, match="the network is in train mode"):
        engine(torch.randn(3, 10))

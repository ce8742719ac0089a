"""eenet.runtime.export: the compact loop as a torch.export program, saved to a .pt2 file and
loaded back (also in a fresh process), with compact mode's results on batches of other sizes
and exit patterns (up to rows within rounding of a threshold)."""

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
    from eenet.runtime import package_engine

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

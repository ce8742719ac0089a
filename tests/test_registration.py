"""Op registration: schemas, opcheck, torch.compile, the loader without the extension."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import Background, assert_covers, item_names, pairwise_cases, product_seeds

import eenet_kernels as ek
from eenet_kernels._schemas import SCHEMAS

OPS = tuple(SCHEMAS)


@pytest.mark.parametrize("name", OPS)
def test_schema_matches_python_copy(name: str) -> None:
    """The schema the dispatcher holds (C++ when built) equals eenet_kernels._schemas."""
    op = getattr(torch.ops.eenet, name).default
    assert str(op._schema) == f"eenet::{SCHEMAS[name]}"


def _exit_inputs(n: int = 7, d: int = 33, c: int = 5, s: int | None = 4, k: int = 2,
                 dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(n * 31 + d)
    shape = (n, d, s) if s else (n, d)
    return {
        "feats": torch.randn(shape, generator=g).to(dtype),
        "weight": torch.randn(c, d, generator=g).to(dtype),
        "bias": torch.randn(c, generator=g).to(dtype),
        "prev_scores": torch.rand(n, k, generator=g),
        "prev_preds": torch.randint(0, c, (n, k), generator=g),
        "sched_weight": torch.randn(c + 2 + k + 1, generator=g),
    }


OPCHECK_CASES = [
    ("max_prob", 0.5, False, False),
    ("entropy", 0.3, False, False),
    ("patience", 1.0, False, False),
    ("eenet", 0.5, False, True),
    ("entropy", 0.9, True, False),
]


OPCHECK_AXES = {"case": OPCHECK_CASES, "n": (0, 1, 7), "dtype": (torch.float32, torch.bfloat16)}
# every policy case at every size; the dtypes pairwise with both (15 opchecks, not 30)
OPCHECK_GRID = pairwise_cases(OPCHECK_AXES, product_seeds(OPCHECK_AXES, ("case", "n")))


def test_opcheck_grid_covers_every_pair() -> None:
    assert_covers(OPCHECK_GRID, OPCHECK_AXES, ("case", "n"))


@pytest.mark.parametrize(
    ("policy", "threshold", "is_last", "use_vote", "n", "dtype"),
    [(*r["case"], r["n"], r["dtype"]) for r in OPCHECK_GRID],
    ids=[f"{r['case'][0]}-{'last' if r['case'][2] else r['case'][1]}-N{r['n']}-"
         f"{str(r['dtype']).removeprefix('torch.')}" for r in OPCHECK_GRID])
def test_opcheck_exit_score(policy: str, threshold: float, is_last: bool, use_vote: bool,
                            n: int, dtype: torch.dtype) -> None:
    """Schema, fake kernel, autograd registration and functionalization of both exit ops."""
    x = _exit_inputs(n=n, dtype=dtype)
    args = (x["feats"], x["weight"], x["bias"], policy, threshold, is_last, x["prev_scores"],
            x["prev_preds"], x["sched_weight"] if use_vote else x["sched_weight"][:-1], 0.25,
            use_vote)
    torch.library.opcheck(torch.ops.eenet.exit_score.default, args)
    n0 = n + 3
    out = {"row_index": torch.randperm(n0)[:n], "exit_index": 2,
           "out_logits": torch.zeros(n0, 5), "out_score": torch.zeros(n0),
           "out_exit": torch.full((n0,), -1, dtype=torch.int32)}
    torch.library.opcheck(torch.ops.eenet.exit_score_write.default, args, out)


@pytest.mark.parametrize("n", [0, 1, 7, 64])
def test_opcheck_compact(n: int) -> None:
    keep = torch.rand(n) > 0.5
    src = [torch.randn(n, 3), torch.arange(n), torch.randn(n, 2, 2).to(torch.float16)]
    torch.library.opcheck(torch.ops.eenet.compact.default, (keep, src))
    dst = [torch.zeros(n + 2, 3), torch.zeros(n + 2, dtype=torch.int64),
           torch.zeros(n + 2, 2, 2, dtype=torch.float16)]
    torch.library.opcheck(torch.ops.eenet.compact_out.default, (keep, src, dst))


class _TwoStage(torch.nn.Module):
    """Toy early-exit loop: stage, exit, compact, stage on the survivors, last exit."""

    def __init__(self, d: int, c: int, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.stage1 = torch.nn.Linear(d, d)
        self.stage2 = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU())
        self.head1 = torch.nn.Linear(d, c)
        self.head2 = torch.nn.Linear(d, c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, c = x.shape[0], self.head1.out_features
        out_logits = x.new_zeros(n, c)
        out_score = x.new_zeros(n)
        out_exit = torch.full((n,), -1, dtype=torch.int64)
        idx = torch.arange(n)
        h = self.stage1(x)
        common = {"out_logits": out_logits, "out_score": out_score, "out_exit": out_exit,
                  "policy": "max_prob", "threshold": self.threshold,
                  "check_finite": False}
        decision = ek.exit_score_write(h, self.head1.weight, self.head1.bias, row_index=idx,
                                       exit_index=0, **common)
        kept, count = ek.compact(~decision.exit_mask, [h, idx])
        h, idx = ek.take(kept, count)
        h = self.stage2(h)
        ek.exit_score_write(h, self.head2.weight, self.head2.bias, row_index=idx, exit_index=1,
                            is_last=True, **common)
        return out_logits, out_score, out_exit


def _median_threshold_model(d: int, c: int, x: torch.Tensor) -> _TwoStage:
    """A toy model whose first exit takes about half of ``x``."""
    model = _TwoStage(d, c, threshold=0.0).eval()
    with torch.no_grad():
        first = ek.exit_score(model.stage1(x), model.head1.weight, model.head1.bias)
    model.threshold = float(first.score.median())
    return model


@pytest.mark.parametrize("compiler", [
    "aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_two_stage_loop(compiler: str) -> None:
    """torch.compile(fullgraph=True) of a loop using the ops gives the eager results.
    aot_eager (default): the whole graph is captured through the fake kernels and
    functionalized, no code generated; inductor (slow, ~25 s cold): also compiled."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    model = _median_threshold_model(16, 4, x)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=compiler)(x)
    exits = eager[2]
    assert 0 < int((exits == 0).sum()) < 32, "the toy loop should exit some rows at each exit"
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_export_two_stage_loop() -> None:
    """torch.export traces the ops (custom ops with fake kernels) without graph breaks."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = _median_threshold_model(8, 3, x)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("eenet.compact" in t for t in targets)
    with torch.no_grad():
        for e, c in zip(model(x), exported.module()(x), strict=True):
            torch.testing.assert_close(c, e)


# the fresh interpreters of the loader tests, by test: (EENET_SKIP_EXT, code). With
# EENET_SKIP_EXT=1 the ops still exist, run the reference, and nothing warns; a broken _C
# import gives one one-line warning and the reference path, not a crash (EENET_SKIP_EXT=0:
# the import must be attempted)
LOADER_CHECKS = {
    "test_skip_ext_uses_reference_through_dispatcher": ("1", (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, eenet_kernels as ek\n"
        "assert not ek.HAVE_EXTENSION\n"
        "print(torch.ops.eenet.exit_score)\n"
        "keep = torch.tensor([True, False, True])\n"
        "kept, n = torch.ops.eenet.compact(keep, [torch.arange(3)])\n"
        "assert int(n) == 2 and kept[0].tolist() == [0, 2, 0]\n"
        "assert ek.resolve_backend(torch.device('cpu')) == 'reference'\n"
    )),
    "test_missing_extension_warns_once_and_falls_back": ("0", (
        "import sys, types\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'eenet_kernels._C':\n"
        "            raise ImportError('simulated missing build')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import eenet_kernels as ek\n"
        "msgs = [str(x.message) for x in w if 'eenet_kernels' in str(x.message)]\n"
        "assert len(msgs) == 1 and '\\n' not in msgs[0], msgs\n"
        "assert 'simulated missing build' in msgs[0]\n"
        "assert not ek.HAVE_EXTENSION\n"
        "import torch\n"
        "r = ek.exit_score(torch.randn(4, 3), torch.randn(2, 3), policy='entropy', threshold=0.5)\n"
        "assert r.logits.shape == (4, 2)\n"
    )),
}


def _loader_check(background: dict[str, Background], name: str) -> Background:
    if name not in background:
        skip_ext, code = LOADER_CHECKS[name]
        background[name] = Background(code, timeout=120,
                                      env={**os.environ, "EENET_SKIP_EXT": skip_ext})
    return background[name]


def start_subprocesses(items: list[pytest.Item], jobs: dict[str, Background]) -> None:
    """The loader tests' interpreters start with this module's first test (conftest's
    ``background``) and run on the other core while the opchecks run here."""
    for name in LOADER_CHECKS.keys() & item_names(items):
        _loader_check(jobs, name)


def test_skip_ext_uses_reference_through_dispatcher(background: dict[str, Background]
                                                    ) -> None:
    """EENET_SKIP_EXT=1: the ops still exist, run the reference, and nothing warns."""
    result = _loader_check(background,
                           "test_skip_ext_uses_reference_through_dispatcher").result()
    assert result.returncode == 0, result.stderr
    assert "eenet.exit_score" in result.stdout


def test_missing_extension_warns_once_and_falls_back(background: dict[str, Background]
                                                     ) -> None:
    """A broken _C import gives a one-line warning and the reference path, not a crash."""
    result = _loader_check(background,
                           "test_missing_extension_warns_once_and_falls_back").result()
    assert result.returncode == 0, result.stderr


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv("EENET_BACKEND", "reference")
    assert ek.resolve_backend(cpu) == "reference"
    monkeypatch.setenv("EENET_BACKEND", "auto")
    assert ek.resolve_backend(cpu) == ("cpp" if ek.HAVE_EXTENSION else "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        ek.resolve_backend(cpu, "bogus")
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested"):
        ek.resolve_backend(torch.device("meta"), "cpp")


@pytest.mark.skipif(not ek.HAVE_EXTENSION, reason="compiled extension not built")
def test_compiled_cpu_kernels_registered() -> None:
    from eenet_kernels import ops

    want = ("CPU", "CUDA") if ops.HAVE_CUDA_KERNELS else ("CPU",)
    for name in OPS:
        assert ek.compiled_backends(name) == want

